//! In-process queue with JetStream semantics. Durability is not its job: in embedded mode
//! the store's command table is the outbox, and undelivered commands are re-published from
//! it on restart.

use crate::{Acker, CommandQueue, Delivery, QueueConfig, QueueError};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Ids remembered for publish dedupe.
const DEDUPE_WINDOW: usize = 100_000;

#[derive(Clone)]
struct Msg {
    id: String,
    payload: Arc<Vec<u8>>,
    delivered: u32,
}

#[derive(Default)]
struct State {
    /// Waiting messages by (visible at, arrival order).
    ready: BTreeMap<(Instant, u64), Msg>,
    /// Delivered and not yet acknowledged, by delivery token.
    inflight: HashMap<u64, (Msg, Instant)>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    next: u64,
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    cfg: QueueConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere mid-update; the data is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exhausted(&self, m: &Msg) -> bool {
        self.cfg.max_deliver > 0 && m.delivered >= self.cfg.max_deliver
    }
}

/// The in-process backend.
#[derive(Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

impl MemoryQueue {
    pub fn new(cfg: QueueConfig) -> Self {
        MemoryQueue {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                notify: Notify::new(),
                cfg,
            }),
        }
    }
}

struct MemAcker {
    shared: Arc<Shared>,
    token: u64,
}

#[async_trait]
impl Acker for MemAcker {
    async fn ack(&self) -> Result<(), QueueError> {
        self.shared.lock().inflight.remove(&self.token);
        Ok(())
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), QueueError> {
        let mut st = self.shared.lock();
        if let Some((m, _)) = st.inflight.remove(&self.token)
            && !self.shared.exhausted(&m)
        {
            let d = delay.unwrap_or_else(|| self.shared.cfg.backoff_for(m.delivered));
            let k = st.next;
            st.next += 1;
            st.ready.insert((Instant::now() + d, k), m);
            drop(st);
            self.shared.notify.notify_waiters();
        }
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), QueueError> {
        if let Some((_, deadline)) = self.shared.lock().inflight.get_mut(&self.token) {
            *deadline = Instant::now() + self.shared.cfg.ack_wait;
        }
        Ok(())
    }

    async fn term(&self) -> Result<(), QueueError> {
        self.shared.lock().inflight.remove(&self.token);
        Ok(())
    }
}

#[async_trait]
impl CommandQueue for MemoryQueue {
    async fn publish(&self, id: &str, payload: &[u8]) -> Result<(), QueueError> {
        let mut st = self.shared.lock();
        if !st.seen.insert(id.to_owned()) {
            return Ok(());
        }
        st.seen_order.push_back(id.to_owned());
        if st.seen_order.len() > DEDUPE_WINDOW
            && let Some(old) = st.seen_order.pop_front()
        {
            st.seen.remove(&old);
        }
        let k = st.next;
        st.next += 1;
        st.ready.insert(
            (Instant::now(), k),
            Msg {
                id: id.to_owned(),
                payload: Arc::new(payload.to_vec()),
                delivered: 0,
            },
        );
        drop(st);
        self.shared.notify.notify_waiters();
        Ok(())
    }

    async fn pull(&self, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let until = Instant::now() + wait;
        loop {
            let notified = self.shared.notify.notified();
            let wake = {
                let mut st = self.shared.lock();
                let now = Instant::now();
                // Deliveries whose ack_wait ran out go back to the queue (or are given up).
                let expired: Vec<u64> = st
                    .inflight
                    .iter()
                    .filter(|(_, (_, d))| *d <= now)
                    .map(|(t, _)| *t)
                    .collect();
                for t in expired {
                    if let Some((m, _)) = st.inflight.remove(&t)
                        && !self.shared.exhausted(&m)
                    {
                        let k = st.next;
                        st.next += 1;
                        st.ready.insert((now, k), m);
                    }
                }
                let first = st.ready.keys().next().copied();
                if let Some(key) = first
                    && key.0 <= now
                    && let Some(mut m) = st.ready.remove(&key)
                {
                    m.delivered += 1;
                    let token = st.next;
                    st.next += 1;
                    st.inflight
                        .insert(token, (m.clone(), now + self.shared.cfg.ack_wait));
                    let acker = Box::new(MemAcker {
                        shared: self.shared.clone(),
                        token,
                    });
                    return Ok(Some(Delivery {
                        id: m.id,
                        payload: m.payload.to_vec(),
                        delivered: m.delivered,
                        acker,
                    }));
                }
                let next_ready = first.map(|k| k.0);
                let next_expiry = st.inflight.values().map(|(_, d)| *d).min();
                [Some(until), next_ready, next_expiry]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(until)
            };
            if Instant::now() >= until {
                return Ok(None);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let st = self.shared.lock();
        Ok((st.ready.len() + st.inflight.len()) as u64)
    }
}
