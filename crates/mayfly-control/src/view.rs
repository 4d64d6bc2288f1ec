//! Freshness-classed reads (DESIGN §4): every node keeps a materialized view of the control
//! stream fed by the log tail, and answers each read under the class the caller asked for —
//! `strong`, `bounded` (max lag in log positions and/or max staleness, optional min token)
//! or `best_effort` — or rejects it with a stable reason. It never serves a weaker class
//! than the one asked for.
//!
//! Tokens are global log positions. The view's `served_token` is the position it has folded
//! everything up to; the store's head is the `current_token`; `lag = current - served`.

use crate::model::ControlState;
use crate::service::STREAM;
use mayfly_store::Store;
use mayfly_types::ExecutionId;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The consistency a read asks for.
/// How long a confirmation of the current token may take before the store counts as
/// unavailable for the whole node (a request's own, shorter, deadline counts only for it).
pub const STORE_BOUND: Duration = Duration::from_secs(2);

/// What a view knows of the store before its first answer (not a failure).
const NOT_YET_CONFIRMED: &str = "not yet confirmed";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Confirm the current token at the store and wait (up to the deadline) until the view
    /// has folded up to it.
    Strong,
    /// Serve when the view is within `max_lag` positions and/or `max_staleness_ms` of the
    /// store's current token.
    Bounded,
    /// Serve whatever the view holds, flagged with how fresh it is.
    #[default]
    BestEffort,
}

impl Class {
    pub fn parse(s: &str) -> Option<Class> {
        match s {
            "strong" => Some(Class::Strong),
            "bounded" => Some(Class::Bounded),
            "best_effort" => Some(Class::BestEffort),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Strong => "strong",
            Class::Bounded => "bounded",
            Class::BestEffort => "best_effort",
        }
    }
}

/// One read's freshness requirements.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadRequest {
    pub class: Class,
    /// Bounded: most log positions the view may be behind the current token.
    pub max_lag: Option<u64>,
    /// Bounded: longest the view may have been behind, in ms.
    pub max_staleness_ms: Option<u64>,
    /// Any class: the view must have folded at least this token (read-your-writes: pass a
    /// write's `accepted_token`).
    pub min_token: Option<u64>,
    /// How long to wait for the view before rejecting (default 2 s).
    pub deadline: Option<Duration>,
}

/// How far along the view is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    Fresh,
    Lagging,
    /// The store cannot be reached: the view cannot know how far behind it is.
    Unavailable,
    /// The records after the view's position were compacted: it must rebuild from the
    /// snapshot that summarizes them before it can serve strong or bounded reads.
    BootstrapRequired,
}

/// The node's health with respect to the root (the store holding the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Degraded {
    Healthy,
    /// The tail has not confirmed the current token recently (paused, slow or stuck).
    RootLagging,
    /// The store does not answer.
    RootUnavailable,
    /// A node that serves reads only (it is not the log's appender).
    ViewOnly,
}

/// What every control-plane read reports about its own freshness.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Freshness {
    pub served_token: u64,
    pub current_token: u64,
    /// How long ago the current token was confirmed at the store.
    pub current_token_age_ms: u64,
    pub lag: u64,
    pub catch_up_state: CatchUp,
    pub degraded_mode: Degraded,
    /// The class the read was served under: always the one asked for.
    pub serving_class: Class,
    /// Which log the tokens count in (the hash of its first event; None while it is empty):
    /// a client keeps its floor per log, so nodes sharing a log share it and a fresh log
    /// starts from zero.
    #[serde(default)]
    pub log_id: Option<String>,
}

/// A read the view cannot serve under the asked class, with a stable reason.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error(
        "the view is {lag} positions behind the current token {current} (served {served}); the bound is not met within the deadline"
    )]
    LagExceeded { served: u64, current: u64, lag: u64 },
    #[error(
        "the view has served {served}, not yet the requested min_token {min_token}, within the deadline"
    )]
    MinTokenNotReached { served: u64, min_token: u64 },
    #[error("the root (the store holding the log) is unavailable: {0}")]
    RootUnavailable(String),
    #[error(
        "the log was compacted past this view (it holds control record #{held}; the stream resumes at #{resumes}): it must bootstrap from the snapshot, which it has not done within the deadline"
    )]
    BootstrapRequired { held: u64, resumes: u64 },
    /// The request's own deadline passed before the store answered: that request only (the
    /// node's view of the store is what the store answers, not this).
    #[error("the request's deadline ({0} ms) passed before the store confirmed the current token")]
    DeadlineExceeded(u64),
}

impl Rejection {
    /// The stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::LagExceeded { .. } => "lag_exceeded",
            Rejection::MinTokenNotReached { .. } => "min_token_not_reached",
            Rejection::RootUnavailable(_) => "root_unavailable",
            Rejection::BootstrapRequired { .. } => "bootstrap_required",
            Rejection::DeadlineExceeded(_) => "deadline_exceeded",
        }
    }
}

/// The pure rule: given what the view holds and what the store says, may a read of `req`
/// be served now? (`None` current: the store did not answer.)
pub fn admits(
    req: &ReadRequest,
    served: u64,
    current: Option<u64>,
    staleness_ms: u64,
) -> Result<(), Rejection> {
    if let Some(m) = req.min_token
        && served < m
    {
        return Err(Rejection::MinTokenNotReached {
            served,
            min_token: m,
        });
    }
    let lagging = |current: u64| Rejection::LagExceeded {
        served,
        current,
        lag: current.saturating_sub(served),
    };
    match req.class {
        Class::BestEffort => Ok(()),
        Class::Strong => match current {
            None => Err(Rejection::RootUnavailable(
                "the current token cannot be confirmed".into(),
            )),
            Some(c) if served >= c => Ok(()),
            Some(c) => Err(lagging(c)),
        },
        Class::Bounded => match current {
            None => Err(Rejection::RootUnavailable(
                "the current token cannot be confirmed".into(),
            )),
            Some(c) => {
                let lag = c.saturating_sub(served);
                if req.max_lag.is_some_and(|m| lag > m)
                    || req
                        .max_staleness_ms
                        .is_some_and(|m| lag > 0 && staleness_ms > m)
                {
                    Err(lagging(c))
                } else {
                    Ok(())
                }
            }
        },
    }
}

#[derive(Clone)]
struct HeadSeen {
    token: u64,
    at: Instant,
    error: Option<String>,
}

struct Inner {
    store: Arc<dyn Store>,
    state: RwLock<ControlState>,
    served: AtomicU64,
    head: Mutex<HeadSeen>,
    /// When the view last had everything the store had (staleness is measured from here).
    fresh_at: Mutex<Instant>,
    /// When the tail last completed a round (a paused, slow or stopped tail is lagging).
    tail_at: Mutex<Instant>,
    paused: AtomicBool,
    view_only: bool,
    /// Wakes readers waiting for the view to advance.
    advanced: Notify,
    /// Wakes the tail (a local write, a reader in a hurry, a resume).
    poke: Notify,
    failure: Mutex<Option<String>>,
    /// The log's identity, once it has a first event.
    log_id: Mutex<Option<String>>,
    /// Held by the tail for a whole round (pause waits on it).
    round: tokio::sync::Mutex<()>,
    /// Records past the view's position were compacted (the control seq the stream resumes
    /// at); cleared once the tail folds the snapshot.
    bootstrap: Mutex<Option<u64>>,
}

/// A node's materialized view of the control stream, fed by the log tail.
#[derive(Clone)]
pub struct View {
    inner: Arc<Inner>,
    tail: Arc<tokio::task::JoinHandle<()>>,
}

/// Tail period when nothing pokes it.
const TAIL_EVERY: Duration = Duration::from_millis(200);
/// A current token older than this makes the node `root_lagging`.
const HEAD_STALE: Duration = Duration::from_secs(2);

impl View {
    /// Start a view of `store`'s control stream. `view_only`: this node does not append
    /// (it reports `view_only` when otherwise healthy).
    pub fn start(store: Arc<dyn Store>, view_only: bool) -> View {
        let inner = Arc::new(Inner {
            store,
            state: RwLock::new(ControlState::default()),
            served: AtomicU64::new(0),
            head: Mutex::new(HeadSeen {
                token: 0,
                at: Instant::now(),
                error: Some(NOT_YET_CONFIRMED.into()),
            }),
            fresh_at: Mutex::new(Instant::now()),
            tail_at: Mutex::new(Instant::now()),
            paused: AtomicBool::new(false),
            view_only,
            advanced: Notify::new(),
            poke: Notify::new(),
            failure: Mutex::new(None),
            log_id: Mutex::new(None),
            bootstrap: Mutex::new(None),
            round: tokio::sync::Mutex::new(()),
        });
        let tail = tokio::spawn(tail(inner.clone()));
        // Learn the log's identity early, so answers never wait on the store for it.
        let learner = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(i) = learner.upgrade() {
                if learn_log_id(&i).await.is_some() {
                    return;
                }
                drop(i);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        View {
            inner,
            tail: Arc::new(tail),
        }
    }

    /// Stop folding the tail (operational drills, tests); reads keep being answered under
    /// their classes from what the view holds. Returns once no tail round is under way, so
    /// nothing more is folded after it.
    pub async fn pause(&self) {
        self.inner.paused.store(true, Ordering::SeqCst);
        drop(self.inner.round.lock().await);
    }

    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
        self.inner.poke.notify_one();
    }

    /// Ask the tail to look now (after a local write).
    pub fn poke(&self) {
        self.inner.poke.notify_one();
    }

    /// The token this view has folded everything up to (monotonic).
    pub fn served(&self) -> u64 {
        self.inner.served.load(Ordering::SeqCst)
    }

    /// Serve `f` over the view under `req`'s class, or reject it.
    pub async fn read<T>(
        &self,
        req: &ReadRequest,
        f: impl FnOnce(&ControlState) -> T,
    ) -> Result<(T, Freshness), Rejection> {
        let i = &self.inner;
        // Without a deadline of its own a request waits out the store's bound (and a little
        // more, so the probe's verdict, not the clock, decides).
        let deadline = Instant::now()
            + req
                .deadline
                .unwrap_or(STORE_BOUND + Duration::from_millis(100));
        // Strong and bounded reads confirm the current token at the store themselves.
        let confirm = req.class != Class::BestEffort;
        let current = if confirm {
            // The probe runs on its own (up to the store's bound, STORE_BOUND) and what the
            // store answers is what the node notes; a request whose own deadline passes
            // first is refused `deadline_exceeded`, and nobody else is told anything.
            let store = i.store.clone();
            let inner = self.inner.clone();
            let mut probe = tokio::spawn(async move {
                let r = match tokio::time::timeout(STORE_BOUND, store.head()).await {
                    Ok(Ok(h)) => Ok(h),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "the store did not answer within {} ms",
                        STORE_BOUND.as_millis()
                    )),
                };
                note_head(&inner, r.clone());
                r
            });
            match tokio::time::timeout_at(deadline.into(), &mut probe).await {
                Ok(Ok(Ok(h))) => Some(h),
                Ok(Ok(Err(e))) => return Err(Rejection::RootUnavailable(e)),
                Ok(Err(e)) => return Err(Rejection::RootUnavailable(e.to_string())),
                Err(_) => {
                    // Known down already (the tail or an earlier probe saw it): say so.
                    let known = i.head.lock().ok().and_then(|h| h.error.clone());
                    if let Some(e) = known
                        && e != NOT_YET_CONFIRMED
                    {
                        return Err(Rejection::RootUnavailable(e));
                    }
                    let ms = req.deadline.unwrap_or(STORE_BOUND).as_millis() as u64;
                    return Err(Rejection::DeadlineExceeded(ms));
                }
            }
        } else {
            None
        };
        // Behind the confirmed head: were the records it lacks compacted away?
        if let Some(c) = current
            && c > i.served.load(Ordering::SeqCst)
        {
            let held = i.state.read().map(|s| s.seq).unwrap_or(0);
            let next = tokio::time::timeout_at(
                deadline.into(),
                i.store.read(&ExecutionId::from(STREAM), held + 1, 1),
            )
            .await;
            if let Ok(Ok(next)) = next
                && let Some(e) = next.first()
                && e.seq > held + 1
            {
                *i.bootstrap.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.seq);
                i.poke.notify_one();
            }
        }
        loop {
            // Register for the next advance before checking, so none is missed.
            let advanced = i.advanced.notified();
            let served = i.served.load(Ordering::SeqCst);
            let staleness = staleness_ms(i, served, current);
            let pending = *i.bootstrap.lock().unwrap_or_else(|p| p.into_inner());
            let verdict = match pending {
                Some(resumes) if req.class != Class::BestEffort => {
                    Err(Rejection::BootstrapRequired {
                        held: i.state.read().map(|s| s.seq).unwrap_or(0),
                        resumes,
                    })
                }
                _ => admits(req, served, current, staleness),
            };
            match verdict {
                Ok(()) => {
                    let (out, served) = {
                        let st = i.state.read().unwrap_or_else(|p| p.into_inner());
                        // The state may have moved past `served` meanwhile; report what was
                        // folded into it (never less than what was checked).
                        let served = i.served.load(Ordering::SeqCst);
                        (f(&st), served)
                    };
                    let mut f = self.freshness(req.class, served, current);
                    if f.log_id.is_none() {
                        // Not learnt by the tail yet (a young log): ask the store once,
                        // within the read's deadline (a store that does not answer leaves
                        // it unknown; the read is still served).
                        let wait = deadline
                            .saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(300));
                        f.log_id = tokio::time::timeout(wait, self.log_id())
                            .await
                            .ok()
                            .flatten();
                    }
                    return Ok((out, f));
                }
                Err(Rejection::RootUnavailable(e)) => return Err(Rejection::RootUnavailable(e)),
                Err(r) => {
                    i.poke.notify_one();
                    if tokio::time::timeout_at(deadline.into(), advanced)
                        .await
                        .is_err()
                    {
                        return Err(r);
                    }
                }
            }
        }
    }

    fn freshness(&self, class: Class, served: u64, confirmed: Option<u64>) -> Freshness {
        let i = &self.inner;
        let seen = i.head.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let current = confirmed.unwrap_or(seen.token).max(served);
        let lag = current - served;
        let unavailable = seen.error.is_some() && confirmed.is_none();
        let log_id = i.log_id.lock().ok().and_then(|l| l.clone());
        Freshness {
            log_id,
            served_token: served,
            current_token: current,
            current_token_age_ms: if confirmed.is_some() {
                0
            } else {
                seen.at.elapsed().as_millis() as u64
            },
            lag,
            catch_up_state: if unavailable {
                CatchUp::Unavailable
            } else if i
                .bootstrap
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
            {
                CatchUp::BootstrapRequired
            } else if lag == 0 {
                CatchUp::Fresh
            } else {
                CatchUp::Lagging
            },
            degraded_mode: if unavailable {
                Degraded::RootUnavailable
            } else if self.failure().is_some()
                || i.tail_at
                    .lock()
                    .map(|t| t.elapsed() > HEAD_STALE)
                    .unwrap_or(true)
            {
                // The tail is paused, slow, or stopped at a record that does not verify.
                Degraded::RootLagging
            } else if i.view_only {
                Degraded::ViewOnly
            } else {
                Degraded::Healthy
            },
            serving_class: class,
        }
    }

    /// The log's identity if this view has learnt it (never asks the store).
    pub fn known_log_id(&self) -> Option<String> {
        self.inner.log_id.lock().ok().and_then(|l| l.clone())
    }

    /// The identity of the log this view follows: the hash of its first event (None while
    /// the log is empty or the store does not answer).
    pub async fn log_id(&self) -> Option<String> {
        learn_log_id(&self.inner).await
    }

    /// Why the view stopped folding, if it did (a record that does not verify).
    pub fn failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if Arc::strong_count(&self.tail) == 1 {
            self.tail.abort();
        }
    }
}

/// The log's identity (the hash of its first event), remembered once known; asked of the
/// store within 2 s (callers put it on answers that must not hang on a silent store).
async fn learn_log_id(i: &Inner) -> Option<String> {
    if let Some(id) = i.log_id.lock().ok().and_then(|l| l.clone()) {
        return Some(id);
    }
    let first = tokio::time::timeout(Duration::from_secs(2), i.store.read_since(0, 1))
        .await
        .ok()?
        .ok()?;
    let id = first.first().map(|e| e.hash.clone())?;
    if let Ok(mut l) = i.log_id.lock() {
        *l = Some(id.clone());
    }
    Some(id)
}

fn note_head(i: &Inner, r: Result<u64, String>) {
    let mut h = i.head.lock().unwrap_or_else(|p| p.into_inner());
    match r {
        Ok(t) => {
            h.token = h.token.max(t);
            h.at = Instant::now();
            h.error = None;
        }
        Err(e) => h.error = Some(e),
    }
}

fn staleness_ms(i: &Inner, served: u64, current: Option<u64>) -> u64 {
    match current {
        Some(c) if served >= c => 0,
        _ => i
            .fresh_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            .as_millis() as u64,
    }
}

/// The tail: observe the head, then fold every control event not yet folded. Positions
/// become visible in commit order, so after reading the stream past what it holds, the view
/// has everything up to the head it observed first.
/// It runs until the last [`View`] clone is dropped (which aborts it).
async fn tail(i: Arc<Inner>) {
    let stream = ExecutionId::from(STREAM);
    loop {
        let round = i.round.lock().await;
        if !i.paused.load(Ordering::SeqCst) && i.failure.lock().is_ok_and(|f| f.is_none()) {
            let sampled = Instant::now();
            match i.store.head().await {
                Err(e) => note_head(&i, Err(e.to_string())),
                Ok(head) => {
                    note_head(&i, Ok(head));
                    if head > 0
                        && i.log_id.lock().is_ok_and(|l| l.is_none())
                        && let Ok(first) = i.store.read_since(0, 1).await
                        && let (Some(e), Ok(mut l)) = (first.first(), i.log_id.lock())
                    {
                        *l = Some(e.hash.clone());
                    }
                    let from = i.state.read().map(|s| s.seq + 1).unwrap_or(1);
                    match i.store.read(&stream, from, 10_000).await {
                        Err(e) => note_head(&i, Err(e.to_string())),
                        Ok(events) => {
                            let full = events.len() == 10_000;
                            let mut last = head;
                            // In chunks: readers are never held up for a whole catch-up.
                            'fold: for chunk in events.chunks(256) {
                                let mut st = i.state.write().unwrap_or_else(|p| p.into_inner());
                                for e in chunk {
                                    if let Err(err) = st.apply(e) {
                                        tracing::error!(error = %err, "control view: a record does not verify; the view stops here");
                                        if let Ok(mut f) = i.failure.lock() {
                                            *f = Some(err.to_string());
                                        }
                                        last = 0;
                                        break 'fold;
                                    }
                                    last = last.max(e.position.unwrap_or(0));
                                }
                            }
                            // A compaction it had fallen behind is resolved once the
                            // snapshot is folded (the fold takes it as its base).
                            let held = i.state.read().map(|s| s.seq).unwrap_or(0);
                            if let Ok(mut b) = i.bootstrap.lock()
                                && b.is_some_and(|resumes| held >= resumes)
                            {
                                *b = None;
                            }
                            if !full && last > 0 {
                                // Monotonic: the served token never goes back.
                                let before = i.served.fetch_max(last, Ordering::SeqCst);
                                if last >= before
                                    && let Ok(mut f) = i.fresh_at.lock()
                                {
                                    // Fresh as of when the head was sampled, not later.
                                    *f = sampled;
                                }

                                i.advanced.notify_waiters();
                            }
                            if full {
                                i.poke.notify_one();
                            } else if last > 0 || head == 0 {
                                // A whole round: the view holds everything up to the head.
                                if let Ok(mut t) = i.tail_at.lock() {
                                    *t = Instant::now();
                                }
                            }
                        }
                    }
                }
            }
        }
        drop(round);
        let _ = tokio::time::timeout(TAIL_EVERY, i.poke.notified()).await;
    }
}

/// The client side of the contract: recompute what a reply claims and keep the session's
/// floor. A reply is accepted only if its lag is `current - served`, its class is the one
/// asked for, its catch-up state agrees with its lag, it honours `min_token` and it does
/// not go behind the floor (what this session has already seen or written); the new floor
/// is returned.
pub fn check_reply(req: &ReadRequest, f: &Freshness, floor: u64) -> Result<u64, String> {
    if f.current_token < f.served_token {
        return Err(format!(
            "served token {} is ahead of the current token {}",
            f.served_token, f.current_token
        ));
    }
    if f.lag != f.current_token - f.served_token {
        return Err(format!(
            "lag {} is not current {} - served {}",
            f.lag, f.current_token, f.served_token
        ));
    }
    if f.serving_class != req.class {
        return Err(format!(
            "asked for {}, served as {}",
            req.class.as_str(),
            f.serving_class.as_str()
        ));
    }
    let state_ok = match f.catch_up_state {
        CatchUp::Fresh => f.lag == 0,
        CatchUp::Lagging => f.lag > 0,
        CatchUp::Unavailable => req.class == Class::BestEffort,
        // Only a best-effort read is served by a view that must bootstrap.
        CatchUp::BootstrapRequired => req.class == Class::BestEffort,
    };
    if !state_ok {
        return Err(format!(
            "catch-up state {:?} contradicts lag {} under {}",
            f.catch_up_state,
            f.lag,
            req.class.as_str()
        ));
    }
    if req.class == Class::Strong && f.lag != 0 {
        return Err(format!("a strong read served with lag {}", f.lag));
    }
    if req.class == Class::Bounded && req.max_lag.is_some_and(|m| f.lag > m) {
        return Err(format!("lag {} exceeds max_lag", f.lag));
    }
    if let Some(m) = req.min_token
        && f.served_token < m
    {
        return Err(format!(
            "served token {} is below min_token {m}",
            f.served_token
        ));
    }
    if f.served_token < floor {
        return Err(format!(
            "served token {} went back behind this session's floor {floor}",
            f.served_token
        ));
    }
    Ok(floor.max(f.served_token))
}
