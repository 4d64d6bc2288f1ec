//! `mayfly apply | get | describe | history | audit verify`: the control plane's desired
//! state, against the server at MAYFLY_URL (token MAYFLY_TOKEN).

use crate::remote::Client;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mayfly_control::{Class, Freshness, ReadRequest, check_reply};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Freshness of a control-plane read (see the README's freshness contract).
#[derive(Args, Clone, Default)]
pub struct FreshArgs {
    /// strong | bounded | best_effort (default best_effort).
    #[arg(long)]
    consistency: Option<String>,
    /// Bounded: most log positions the answer may be behind.
    #[arg(long)]
    max_lag: Option<u64>,
    /// Bounded: longest the answer may have been behind, in ms.
    #[arg(long)]
    max_staleness_ms: Option<u64>,
    /// The answer must include at least this token (e.g. an apply's accepted token).
    #[arg(long)]
    min_token: Option<u64>,
    /// How long the server may wait to meet the class (default 2000, at most 30000); past
    /// it the read is refused `deadline_exceeded` (this request only).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Which tenant's object, when you see several (system tenant callers).
    #[arg(long)]
    tenant: Option<String>,
}

/// The session's floor per log: the highest token this client has written or been served
/// in that log. Every read asks for at least it and checks the reply against it, so reads
/// never go back — across every node serving the same log (a replica answers with the
/// leader's floor). Servers say which log their tokens count in (`log_id`); a server at a
/// known URL now serving another log (restored, recreated) starts a new floor. Kept in
/// MAYFLY_SESSION, default ~/.mayfly/session.json: `{"urls": {url: log}, "floors": {log: n}}`.
struct Session {
    path: Option<PathBuf>,
    url: String,
    urls: Map<String, Value>,
    floors: Map<String, Value>,
}

impl Session {
    fn load() -> Session {
        let path = std::env::var_os("MAYFLY_SESSION")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".mayfly/session.json"))
            });
        let doc = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or_default();
        let part = |k: &str| {
            doc.get(k)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default()
        };
        Session {
            path,
            url: std::env::var("MAYFLY_URL").unwrap_or_default(),
            urls: part("urls"),
            floors: part("floors"),
        }
    }

    /// The log this server's tokens counted in when last seen.
    fn log(&self) -> Option<&str> {
        self.urls.get(&self.url).and_then(Value::as_str)
    }

    fn floor(&self) -> u64 {
        self.log()
            .and_then(|l| self.floors.get(l))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// This server now serves `log` (None: an empty log, no floor yet).
    fn serving(&mut self, log: Option<&str>) {
        match log {
            Some(l) => {
                self.urls.insert(self.url.clone(), Value::from(l));
            }
            None => {
                self.urls.remove(&self.url);
            }
        }
    }

    fn raise(&mut self, token: u64) {
        let Some(log) = self.log().map(str::to_owned) else {
            return;
        };
        if token > self.floor() {
            self.floors.insert(log, Value::from(token));
        }
    }

    fn save(&self) {
        let Some(p) = &self.path else { return };
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let doc = serde_json::json!({"urls": self.urls, "floors": self.floors});
        if let Err(e) = std::fs::write(p, doc.to_string()) {
            eprintln!(
                "warning: could not keep the session floor in {}: {e}",
                p.display()
            );
        }
    }
}

impl FreshArgs {
    fn request(&self, floor: u64) -> Result<ReadRequest> {
        let class = match self.consistency.as_deref() {
            None => Class::BestEffort,
            Some(c) => Class::parse(c).ok_or_else(|| {
                anyhow::anyhow!("unknown consistency `{c}` (strong, bounded, best_effort)")
            })?,
        };
        let min = self.min_token.unwrap_or(0).max(floor);
        Ok(ReadRequest {
            class,
            max_lag: self.max_lag,
            max_staleness_ms: self.max_staleness_ms,
            min_token: (min > 0).then_some(min),
            deadline: self.deadline_ms.map(std::time::Duration::from_millis),
        })
    }
}

fn query(req: &ReadRequest, tenant: Option<&str>) -> String {
    let mut q = vec![format!("consistency={}", req.class.as_str())];
    if let Some(t) = tenant {
        q.push(format!("tenant={t}"));
    }
    for (k, v) in [
        ("max_lag", req.max_lag),
        ("max_staleness_ms", req.max_staleness_ms),
        ("min_token", req.min_token),
        ("deadline_ms", req.deadline.map(|d| d.as_millis() as u64)),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={v}"));
        }
    }
    q.join("&")
}

/// A control-plane read: asks with the session's floor, verifies the reply's freshness,
/// raises the floor, and reports the freshness on stderr.
async fn fresh_get(c: &Client, path: &str, fresh: &FreshArgs) -> Result<Value> {
    let mut session = Session::load();
    let mut req = fresh.request(session.floor())?;
    let get = async |req: &ReadRequest| {
        c.send_raw(
            reqwest::Method::GET,
            &format!("{path}?{}", query(req, fresh.tenant.as_deref())),
            None,
        )
        .await
    };
    let (mut status, mut v) = get(&req).await?;
    // Which log the server's tokens count in: a first contact, or a server now serving
    // another log, moves the session to that log's floor (it may know it from another node:
    // read at least what it saw there) — once.
    let theirs = |v: &Value| {
        if v["code"] == "min_token_not_reached" {
            Some(v["log_id"].as_str().map(str::to_owned))
        } else {
            v.get("freshness")
                .map(|f| f["log_id"].as_str().map(str::to_owned))
        }
    };
    if let Some(log) = theirs(&v)
        && log.as_deref() != session.log()
    {
        if session.log().is_some() {
            eprintln!(
                "note: this server serves another log than before; the session floor follows it"
            );
        }
        session.serving(log.as_deref());
        let again = fresh.request(session.floor())?;
        if again != req {
            req = again;
            (status, v) = get(&req).await?;
        }
    }
    if !status.is_success() {
        bail!(
            "{status} {}: {}",
            v["code"].as_str().unwrap_or("error"),
            v["detail"].as_str().unwrap_or_default()
        );
    }
    let f: Freshness = serde_json::from_value(v["freshness"].clone())
        .context("the reply carries no freshness report")?;
    let floor = check_reply(&req, &f, session.floor())
        .map_err(|e| anyhow::anyhow!("the server's freshness report does not verify: {e}"))?;
    session.raise(floor);
    session.save();
    eprintln!(
        "served token {} (current {}, lag {}, {:?}, {:?}, {})",
        f.served_token,
        f.current_token,
        f.lag,
        f.catch_up_state,
        f.degraded_mode,
        f.serving_class.as_str()
    );
    Ok(v)
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Re-read the control stream and verify its hash chain (and, against a server, that
    /// it ends where the server last appended). Exit status 1 when it does not verify.
    Verify {
        /// Verify a local log directly instead of asking the server.
        #[arg(long)]
        db: Option<PathBuf>,
    },
}

/// The manifest files of `path`: the file itself, or a directory's `*.yaml`/`*.yml` files
/// in name order.
fn files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml")
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Apply every manifest file (each file all or nothing), printing one line per object.
pub async fn apply(paths: &[PathBuf]) -> Result<ExitCode> {
    let c = Client::from_env()?;
    let mut failed = false;
    for p in paths {
        for f in files(p)? {
            let body =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            let name = f.display().to_string();
            let query: String = name
                .bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            let (status, v) = c
                .send_raw(
                    reqwest::Method::POST,
                    &format!("/v1/apply?file={query}"),
                    Some(body),
                )
                .await?;
            if let Some(t) = v["accepted_token"].as_u64() {
                // Read-your-writes: later reads of this session (on any node of this log)
                // ask for this token.
                let mut session = Session::load();
                session.serving(v["log_id"].as_str());
                session.raise(t);
                session.save();
            }
            if let Some(results) = v["results"].as_array() {
                for r in results {
                    let what = format!(
                        "{}/{} {}",
                        r["kind"].as_str().unwrap_or_default().to_lowercase(),
                        r["name"].as_str().unwrap_or_default(),
                        r["outcome"].as_str().unwrap_or_default(),
                    );
                    match r["outcome"].as_str() {
                        // Nothing was written: no generation or version to show.
                        Some("denied") | Some("skipped") => {
                            println!("{what}: {}", r["reason"].as_str().unwrap_or_default())
                        }
                        _ => println!(
                            "{what} (generation {}, {})",
                            r["generation"],
                            r["version"].as_str().unwrap_or_default()
                        ),
                    }
                }
            }
            if !status.is_success() {
                failed = true;
                if v.get("results").is_none() {
                    eprintln!(
                        "{status} {}: {}",
                        v["code"].as_str().unwrap_or("error"),
                        v["detail"].as_str().unwrap_or(&v.to_string())
                    );
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `mayfly get KIND [NAME]`: a table (or JSON) of objects with their status.
pub async fn get(
    kind: &str,
    name: Option<&str>,
    json: bool,
    fresh: &FreshArgs,
) -> Result<ExitCode> {
    let c = Client::from_env()?;
    let objects: Vec<Value> = match name {
        Some(n) => vec![fresh_get(&c, &format!("/v1/objects/{kind}/{n}"), fresh).await?],
        None => fresh_get(&c, &format!("/v1/objects/{kind}"), fresh).await?["objects"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&objects)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<12} {:>10} {:<12} VERSION",
        "NAME", "TENANT", "GENERATION", "PHASE"
    );
    for o in objects {
        println!(
            "{:<24} {:<12} {:>10} {:<12} {}",
            o["key"]["name"].as_str().unwrap_or_default(),
            o["key"]["tenant"].as_str().unwrap_or("-"),
            o["generation"],
            o["status"]["phase"].as_str().unwrap_or_default(),
            o["version"].as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `mayfly describe KIND NAME`: the object, its spec and status, as JSON.
pub async fn describe(kind: &str, name: &str, fresh: &FreshArgs) -> Result<ExitCode> {
    let c = Client::from_env()?;
    let v = fresh_get(&c, &format!("/v1/objects/{kind}/{name}"), fresh).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

/// `mayfly history KIND NAME`: every revision, oldest first.
pub async fn history(kind: &str, name: &str, fresh: &FreshArgs) -> Result<ExitCode> {
    let c = Client::from_env()?;
    let v = fresh_get(&c, &format!("/v1/history/{kind}/{name}"), fresh).await?;
    for r in v["revisions"].as_array().cloned().unwrap_or_default() {
        println!(
            "#{} generation {} {} (before {}) by {} request {} policy {}",
            r["seq"],
            r["generation"],
            r["version"].as_str().unwrap_or_default(),
            r["before"].as_str().unwrap_or("-"),
            r["actor"].as_str().unwrap_or_default(),
            r["request_id"].as_str().unwrap_or("-"),
            r["policy_version"].as_str().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `mayfly audit verify`.
pub async fn audit(
    cmd: AuditCmd,
    store: Option<std::sync::Arc<dyn mayfly_store::Store>>,
) -> Result<ExitCode> {
    let AuditCmd::Verify { .. } = cmd;
    let outcome = match store {
        Some(s) => mayfly_control::verify_stored(s.as_ref())
            .await
            .map(|v| serde_json::json!(v))
            .map_err(|e| e.to_string()),
        None => {
            let c = Client::from_env()?;
            let (status, v) = c
                .send_raw(reqwest::Method::GET, "/v1/audit/verify", None)
                .await?;
            if status == reqwest::StatusCode::CONFLICT {
                Err(v["error"].as_str().unwrap_or_default().to_owned())
            } else if !status.is_success() {
                bail!("{status}: {}", v["detail"].as_str().unwrap_or_default());
            } else {
                Ok(v["verified"].clone())
            }
        }
    };
    match outcome {
        Ok(v) => {
            println!(
                "ok: {} control events ({} applied, {} denied), head {}",
                v["events"],
                v["applied"],
                v["denied"],
                v["head"].as_str().unwrap_or_default()
            );
            if let Some(r) = v["compacted"].as_array() {
                println!(
                    "  records #{}..#{} were compacted into a snapshot; the chain is verified from it",
                    r.first().cloned().unwrap_or_default(),
                    r.get(1).cloned().unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("audit does NOT verify: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// How the policies in force judge playbook PATH[@VERSION] (exit 1 when refused).
    Explain { playbook: String },
}

/// `mayfly policy explain PATH[@VERSION]`.
pub async fn policy(cmd: PolicyCmd) -> Result<ExitCode> {
    let PolicyCmd::Explain { playbook } = cmd;
    let c = Client::from_env()?;
    let (path, version) = match playbook.rsplit_once('@') {
        Some((p, v)) => (
            p.to_owned(),
            Some(v.parse::<u32>().context("version after @")?),
        ),
        None => (playbook, None),
    };
    let mut q = format!("path={path}");
    if let Some(v) = version {
        q.push_str(&format!("&version={v}"));
    }
    let v = c
        .send(
            reqwest::Method::GET,
            &format!("/v1/policy/explain?{q}"),
            None,
        )
        .await?;
    let ex = &v["explanation"];
    println!(
        "{}@{} uses tools {} and keychain aliases {}",
        v["path"].as_str().unwrap_or_default(),
        v["version"],
        v["tools"],
        v["aliases"]
    );
    for s in ex["steps"].as_array().cloned().unwrap_or_default() {
        println!(
            "  {:<9} {:<28} {}",
            s["layer"].as_str().unwrap_or_default(),
            s["policy"].as_str().unwrap_or_default(),
            s["outcome"].as_str().unwrap_or_default()
        );
    }
    if let Some(env) = ex["environment"].as_str() {
        println!("  (tenant runs in environment `{env}`)");
    }
    for l in ex["layers"].as_array().cloned().unwrap_or_default() {
        println!(
            "  layer {:<11} version {} ({} policies)",
            l["layer"].as_str().unwrap_or_default(),
            l["version"].as_str().unwrap_or_default(),
            l["policies"]
        );
    }
    let allowed = ex["allowed"] == true;
    println!(
        "{}: {}",
        if allowed { "allowed" } else { "refused" },
        ex["reason"].as_str().unwrap_or_default()
    );
    Ok(if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `mayfly compact`.
pub async fn compact() -> Result<ExitCode> {
    let c = Client::from_env()?;
    let v = c
        .send(reqwest::Method::POST, "/v1/control/compact", None)
        .await?;
    match v["compacted"].as_array() {
        Some(r) => println!(
            "compacted control records #{}..#{} ({} deleted) into snapshot #{}",
            r.first().cloned().unwrap_or_default(),
            r.get(1).cloned().unwrap_or_default(),
            v["deleted"],
            v["snapshot_seq"]
        ),
        None => println!("snapshot #{} (nothing to delete)", v["snapshot_seq"]),
    }
    Ok(ExitCode::SUCCESS)
}
