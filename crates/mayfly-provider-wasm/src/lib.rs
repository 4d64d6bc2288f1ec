//! The `wasm` sandbox (wasmtime 48): an actor is a WASM module, fetched by digest from the
//! snapshot store in its tenant's scope, with an HTTP-style handler export.
//!
//! **ABI.** The module exports `memory`, `alloc(len) -> ptr` and the handler (default
//! `handle`): `(method_ptr, method_len, path_ptr, path_len, body_ptr, body_len) -> i64`,
//! the response body packed as `ptr << 32 | len` (status 200; a trap answers 500). An
//! optional `init()` runs once on a fresh start, so a golden snapshot captures an
//! initialized instance. Host imports (module `mayfly`): `identity(ptr, cap) -> len`,
//! `actor(ptr, cap) -> len`, `secret(name_ptr, name_len, ptr, cap) -> len | -1`,
//! `epoch() -> i64`, `nonce() -> i32`.
//!
//! **Snapshots.** Full scope = linear memory (zstd) + every exported mutable global; a
//! restore instantiates the cached pre-linked module, writes memory back and sets the
//! globals, without running `init`. Data scope is not offered.
//!
//! **Delivery.** Identity and secrets are only reachable through host calls during a
//! request; the host zeroes the request and response buffers after every call, so what a
//! handler copied into them never reaches a snapshot. (A module that copies a secret into
//! its own long-lived memory keeps it there; the provider cannot tell data from secrets.)

use async_trait::async_trait;
use mayfly_actor_api::{
    ActorSpec, Capabilities, CheckpointKind, Delivery, Format, Overhead, Refusal, RefusalCode,
    Scope, Workload,
};
use mayfly_actors::{DataRequest, DataResponse, Instance, Sandbox, Streams};
use mayfly_cache::Cache;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use wasmtime::{
    Config, Engine, Extern, Instance as WInstance, InstancePre, Linker, Module, Store, Val,
};

/// Snapshot format of the wasm sandbox's Full scope.
pub fn full_format() -> Format {
    Format {
        id: "mayfly.wasm.memory+globals".into(),
        version: 1,
    }
}

/// Fuel per call: a handler that loops forever traps instead of holding a slot.
const FUEL: u64 = 500_000_000;

/// Linear memory one actor may grow to.
const MAX_MEMORY: usize = 256 << 20;

struct Host {
    limits: wasmtime::StoreLimits,
    identity: Vec<u8>,
    actor: Vec<u8>,
    secrets: BTreeMap<String, Vec<u8>>,
    epoch: u64,
}

fn failed(m: impl Into<String>) -> Refusal {
    Refusal::new(RefusalCode::SandboxFailed, m)
}

/// The wasm sandbox.
pub struct WasmSandbox {
    engine: Engine,
    linker: Arc<Linker<Host>>,
    modules: Arc<dyn Cache>,
    compiled: Mutex<HashMap<String, InstancePre<Host>>>,
}

fn copy_out(caller: &mut wasmtime::Caller<'_, Host>, bytes: &[u8], ptr: i32, cap: i32) -> i32 {
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return -1;
    };
    let n = bytes.len().min(cap.max(0) as usize);
    let bytes = bytes[..n].to_vec();
    match mem.write(caller, ptr.max(0) as usize, &bytes) {
        Ok(()) => n as i32,
        Err(_) => -1,
    }
}

impl WasmSandbox {
    /// A sandbox fetching modules from `modules` (the snapshot store).
    pub fn new(modules: Arc<dyn Cache>) -> Result<WasmSandbox, Refusal> {
        let mut cfg = Config::new();
        cfg.consume_fuel(true);
        let engine = Engine::new(&cfg).map_err(|e| failed(format!("wasm engine: {e}")))?;
        let mut linker: Linker<Host> = Linker::new(&engine);
        let wrap = |r: Result<&mut Linker<Host>, wasmtime::Error>| {
            r.map(drop).map_err(|e| failed(format!("wasm linker: {e}")))
        };
        wrap(linker.func_wrap(
            "mayfly",
            "identity",
            |mut c: wasmtime::Caller<'_, Host>, ptr: i32, cap: i32| -> i32 {
                let id = c.data().identity.clone();
                copy_out(&mut c, &id, ptr, cap)
            },
        ))?;
        wrap(linker.func_wrap(
            "mayfly",
            "actor",
            |mut c: wasmtime::Caller<'_, Host>, ptr: i32, cap: i32| -> i32 {
                let a = c.data().actor.clone();
                copy_out(&mut c, &a, ptr, cap)
            },
        ))?;
        wrap(linker.func_wrap(
            "mayfly",
            "secret",
            |mut c: wasmtime::Caller<'_, Host>, np: i32, nl: i32, ptr: i32, cap: i32| -> i32 {
                let Some(Extern::Memory(mem)) = c.get_export("memory") else {
                    return -1;
                };
                let mut name = vec![0u8; nl.clamp(0, 256) as usize];
                if mem.read(&c, np.max(0) as usize, &mut name).is_err() {
                    return -1;
                }
                let v = String::from_utf8(name)
                    .ok()
                    .and_then(|n| c.data().secrets.get(&n).cloned());
                match v {
                    Some(v) => copy_out(&mut c, &v, ptr, cap),
                    None => -1,
                }
            },
        ))?;
        wrap(
            linker.func_wrap("mayfly", "epoch", |c: wasmtime::Caller<'_, Host>| -> i64 {
                c.data().epoch as i64
            }),
        )?;
        wrap(linker.func_wrap("mayfly", "nonce", || -> i32 {
            let n = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(7);
            (n & 0x3fff_ffff) as i32
        }))?;
        Ok(WasmSandbox {
            engine,
            linker: Arc::new(linker),
            modules,
            compiled: Mutex::new(HashMap::new()),
        })
    }

    /// The module `digest` of `tenant`, compiled and pre-linked once per provider.
    async fn module(&self, tenant: &str, digest: &str) -> Result<InstancePre<Host>, Refusal> {
        let cache_key = format!("{tenant}/{digest}");
        if let Some(p) = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
        {
            return Ok(p.clone());
        }
        let bytes = self
            .modules
            .get(tenant, digest)
            .await
            .map_err(|e| Refusal::new(RefusalCode::BlobDigestMismatch, format!("module: {e}")))?
            .ok_or_else(|| {
                Refusal::new(
                    RefusalCode::BlobDigestMismatch,
                    format!("module {digest} is not in the snapshot store"),
                )
            })?;
        let engine = self.engine.clone();
        let linker = self.linker.clone();
        let pre = tokio::task::spawn_blocking(move || -> Result<InstancePre<Host>, String> {
            let m = Module::new(&engine, &bytes).map_err(|e| format!("module: {e}"))?;
            linker.instantiate_pre(&m).map_err(|e| format!("link: {e}"))
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| Refusal::new(RefusalCode::SandboxFailed, e))?;
        self.compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cache_key, pre.clone());
        Ok(pre)
    }
}

#[async_trait]
impl Sandbox for WasmSandbox {
    fn class(&self) -> &'static str {
        "wasm"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            contract: mayfly_actor_api::CONTRACT_VERSION.into(),
            classes: vec!["wasm".into()],
            scopes: vec![Scope::Full],
            kinds: vec![CheckpointKind::Local, CheckpointKind::External],
            formats: vec![full_format()],
            golden_restore: true,
            overhead: Overhead {
                memory_bytes: 1 << 20,
                start_ms: 1,
            },
        }
    }

    fn format(&self, scope: Scope) -> Option<Format> {
        (scope == Scope::Full).then(full_format)
    }

    async fn start(
        &self,
        spec: &ActorSpec,
        epoch: u64,
        delivery: &Delivery,
        restored: Option<(Scope, Streams)>,
    ) -> Result<Box<dyn Instance>, Refusal> {
        let Workload::Wasm { module, handler } = &spec.workload else {
            return Err(Refusal::new(
                RefusalCode::UnsupportedClass,
                "the wasm sandbox runs only wasm workloads",
            ));
        };
        let pre = self.module(&spec.tenant, module).await?;
        let host = Host {
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(MAX_MEMORY)
                .instances(1)
                .tables(4)
                .build(),
            identity: delivery.identity.as_bytes().to_vec(),
            actor: spec.actor.as_bytes().to_vec(),
            secrets: delivery
                .secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                .collect(),
            epoch,
        };
        let engine = self.engine.clone();
        let handler = handler.clone();
        let state = tokio::task::spawn_blocking(move || -> Result<State, Refusal> {
            let mut store = Store::new(&engine, host);
            store.limiter(|h| &mut h.limits);
            store.set_fuel(FUEL).map_err(|e| failed(e.to_string()))?;
            let instance = pre
                .instantiate(&mut store)
                .map_err(|e| failed(format!("instantiate: {e}")))?;
            let mut st = State {
                store,
                instance,
                handler,
            };
            match restored {
                Some((_, streams)) => st.restore(&streams)?,
                None => {
                    if let Ok(init) = st.instance.get_typed_func::<(), ()>(&mut st.store, "init") {
                        init.call(&mut st.store, ())
                            .map_err(|e| failed(format!("init trapped: {e}")))?;
                    }
                }
            }
            Ok(st)
        })
        .await
        .map_err(|e| failed(e.to_string()))??;
        Ok(Box::new(WasmInstance {
            state: Arc::new(Mutex::new(Some(state))),
        }))
    }
}

struct State {
    store: Store<Host>,
    instance: WInstance,
    handler: String,
}

impl State {
    fn memory(&mut self) -> Result<wasmtime::Memory, Refusal> {
        self.instance
            .get_memory(&mut self.store, "memory")
            .ok_or_else(|| failed("the module exports no `memory`"))
    }

    /// Exported mutable globals, by name.
    fn globals(&mut self) -> Vec<(String, wasmtime::Global)> {
        let exports: Vec<(String, Extern)> = self
            .instance
            .exports(&mut self.store)
            .map(|e| (e.name().to_owned(), e.into_extern()))
            .collect();
        exports
            .into_iter()
            .filter_map(|(n, e)| match e {
                Extern::Global(g)
                    if g.ty(&self.store).mutability() == wasmtime::Mutability::Var =>
                {
                    Some((n, g))
                }
                _ => None,
            })
            .collect()
    }

    fn capture(&mut self) -> Result<Streams, Refusal> {
        let mem = self.memory()?;
        let data = mem.data(&self.store);
        let memory = zstd::encode_all(data, 3).map_err(|e| failed(e.to_string()))?;
        let mut globals = BTreeMap::new();
        for (name, g) in self.globals() {
            let v = match g.get(&mut self.store) {
                Val::I32(x) => serde_json::json!({"i32": x}),
                Val::I64(x) => serde_json::json!({"i64": x}),
                Val::F32(x) => serde_json::json!({"f32": x}),
                Val::F64(x) => serde_json::json!({"f64": x}),
                _ => continue,
            };
            globals.insert(name, v);
        }
        let globals = serde_json::to_vec(&globals).map_err(|e| failed(e.to_string()))?;
        Ok(Streams::from([
            ("memory".to_owned(), memory),
            ("globals".to_owned(), globals),
        ]))
    }

    fn restore(&mut self, streams: &Streams) -> Result<(), Refusal> {
        let unreadable = |m: String| Refusal::new(RefusalCode::ManifestUnreadable, m);
        let memory = streams
            .get("memory")
            .ok_or_else(|| unreadable("no memory stream".into()))?;
        let bytes =
            zstd::decode_all(&memory[..]).map_err(|e| unreadable(format!("memory: {e}")))?;
        let mem = self.memory()?;
        let page = 65_536usize;
        let have = mem.data_size(&self.store);
        if bytes.len() % page != 0 {
            return Err(unreadable("memory image is not whole pages".into()));
        }
        if bytes.len() > have {
            mem.grow(&mut self.store, ((bytes.len() - have) / page) as u64)
                .map_err(|e| unreadable(format!("memory does not grow to the image: {e}")))?;
        }
        mem.data_mut(&mut self.store)[..bytes.len()].copy_from_slice(&bytes);
        let globals: BTreeMap<String, serde_json::Value> = match streams.get("globals") {
            Some(g) => {
                serde_json::from_slice(g).map_err(|e| unreadable(format!("globals: {e}")))?
            }
            None => BTreeMap::new(),
        };
        let live: HashMap<String, wasmtime::Global> = self.globals().into_iter().collect();
        for (name, v) in globals {
            let Some(g) = live.get(&name) else {
                return Err(unreadable(format!(
                    "global `{name}` is not exported by the module"
                )));
            };
            let val = if let Some(x) = v.get("i32").and_then(|x| x.as_i64()) {
                Val::I32(x as i32)
            } else if let Some(x) = v.get("i64").and_then(|x| x.as_i64()) {
                Val::I64(x)
            } else if let Some(x) = v.get("f32").and_then(|x| x.as_u64()) {
                Val::F32(x as u32)
            } else if let Some(x) = v.get("f64").and_then(|x| x.as_u64()) {
                Val::F64(x)
            } else {
                return Err(unreadable(format!("global `{name}`: {v}")));
            };
            g.set(&mut self.store, val)
                .map_err(|e| unreadable(format!("global `{name}`: {e}")))?;
        }
        Ok(())
    }

    /// One request: copy it in, call the handler, copy the response out, scrub both.
    fn call(&mut self, req: &DataRequest) -> Result<DataResponse, Refusal> {
        self.store
            .set_fuel(FUEL)
            .map_err(|e| failed(e.to_string()))?;
        let mem = self.memory()?;
        let alloc = self
            .instance
            .get_typed_func::<i32, i32>(&mut self.store, "alloc")
            .map_err(|e| failed(format!("the module exports no `alloc`: {e}")))?;
        let handle = self
            .instance
            .get_typed_func::<(i32, i32, i32, i32, i32, i32), i64>(&mut self.store, &self.handler)
            .map_err(|e| failed(format!("handler `{}`: {e}", self.handler)))?;
        let mut regions = Vec::new();
        let mut put = |st: &mut Store<Host>, bytes: &[u8]| -> Result<(i32, i32), Refusal> {
            let len = i32::try_from(bytes.len()).map_err(|_| Refusal::invalid("body too large"))?;
            let ptr = alloc
                .call(&mut *st, len.max(1))
                .map_err(|e| failed(format!("alloc trapped: {e}")))?;
            mem.write(&mut *st, ptr.max(0) as usize, bytes)
                .map_err(|_| failed("alloc returned memory out of bounds"))?;
            regions.push((ptr.max(0) as usize, bytes.len()));
            Ok((ptr, len))
        };
        let (mp, ml) = put(&mut self.store, req.method.as_bytes())?;
        let (pp, pl) = put(&mut self.store, req.path_and_query.as_bytes())?;
        let (bp, bl) = put(&mut self.store, &req.body)?;
        let result = handle.call(&mut self.store, (mp, ml, pp, pl, bp, bl));
        let answer = match result {
            Ok(packed) => {
                let ptr = (packed as u64 >> 32) as usize;
                let len = (packed as u64 & 0xffff_ffff) as usize;
                // Bounds first: the length is the module's word, not an allocation order.
                let inside = ptr
                    .checked_add(len)
                    .is_some_and(|end| end <= mem.data_size(&self.store));
                let mut out = if inside { vec![0u8; len] } else { Vec::new() };
                match (inside, mem.read(&self.store, ptr, &mut out)) {
                    (true, Ok(())) => {
                        regions.push((ptr, len));
                        DataResponse {
                            status: 200,
                            headers: vec![("content-type".into(), "application/json".into())],
                            body: out.into(),
                        }
                    }
                    _ => DataResponse {
                        status: 500,
                        headers: vec![],
                        body: "the handler returned a response out of bounds".into(),
                    },
                }
            }
            Err(e) => DataResponse {
                status: 500,
                headers: vec![],
                body: format!("the handler trapped: {e}").into(),
            },
        };
        let data = mem.data_mut(&mut self.store);
        for (p, n) in regions {
            if let Some(r) = data.get_mut(p..p.saturating_add(n)) {
                r.fill(0);
            }
        }
        Ok(answer)
    }
}

struct WasmInstance {
    state: Arc<Mutex<Option<State>>>,
}

impl WasmInstance {
    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<R, Refusal> + Send + 'static,
    ) -> Result<R, Refusal> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = state.lock().unwrap_or_else(|p| p.into_inner());
            match g.as_mut() {
                Some(st) => f(st),
                None => Err(Refusal::new(
                    RefusalCode::UnknownActor,
                    "the actor was stopped",
                )),
            }
        })
        .await
        .map_err(|e| failed(e.to_string()))?
    }
}

#[async_trait]
impl Instance for WasmInstance {
    fn address(&self) -> Option<String> {
        None
    }

    async fn alive(&self) -> bool {
        self.state.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    async fn handle(&self, req: DataRequest) -> Result<DataResponse, Refusal> {
        self.with(move |st| st.call(&req)).await
    }

    async fn capture(&self, scope: Scope, teardown: bool) -> Result<Streams, Refusal> {
        if scope != Scope::Full {
            return Err(Refusal::new(
                RefusalCode::UnsupportedScope,
                "the wasm sandbox captures Full scope only",
            ));
        }
        let streams = self.with(|st| st.capture()).await?;
        if teardown {
            self.stop().await;
        }
        Ok(streams)
    }

    async fn stop(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *g = None;
    }
}
