//! The provider's heartbeat to the control plane (over mTLS, as its enrolled identity).
//! Each heartbeat reports the provider's incarnation, capabilities, workers with their
//! used slots, and the actors it runs with their epochs; the answer renews the lease and
//! names actors to stop. A provider that cannot renew its lease fences itself: once the
//! lease has run out it stops every actor, because the control plane has by then declared
//! its workers lost and may be restoring those actors elsewhere.

use crate::Provider;
use crate::dataplane::{Heartbeat, HeartbeatAnswer};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Heartbeat every `every` to `control` (`https://…`) until the task is dropped. A
/// watchdog fences the provider at 80% of the lease, counted from when the last renewed
/// heartbeat was *sent* (the control plane counts from when it arrived, later): the provider
/// stops its actors before the control plane may place them elsewhere.
pub async fn run(provider: Arc<Provider>, http: reqwest::Client, control: String, every: Duration) {
    let url = format!("{}/v1/providers/heartbeat", control.trim_end_matches('/'));
    let default_lease = Duration::from_millis(mayfly_control::dataplane::DEFAULT_LEASE_MS);
    // (sent instant of the last renewal, lease). Starting counts as one: a provider that
    // never reaches the control plane holds nothing past one lease either.
    let renewed: Arc<std::sync::Mutex<Option<(Instant, Duration)>>> =
        Arc::new(std::sync::Mutex::new(Some((Instant::now(), default_lease))));
    // What actors and the data path are told: the same 80% the watchdog fences at, on the
    // wall clock (a contained actor's keeper reads it).
    let fence_at =
        |lease: Duration| Some(mayfly_types::now_ms() + lease.mul_f64(0.8).as_millis() as u64);
    provider.set_lease(fence_at(default_lease));
    let watchdog = tokio::spawn({
        let provider = provider.clone();
        let renewed = renewed.clone();
        async move {
            let mut fenced_for: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let last = *renewed.lock().unwrap_or_else(|p| p.into_inner());
                let Some((sent, lease)) = last else { continue };
                if sent.elapsed() >= lease.mul_f64(0.8) && fenced_for != Some(sent) {
                    tracing::warn!(
                        "lease about to expire without renewal: self-fencing every actor"
                    );
                    provider.shutdown().await;
                    fenced_for = Some(sent);
                }
            }
        }
    });
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _watchdog = Abort(watchdog);
    loop {
        let info = provider.info().await;
        let hb = Heartbeat {
            incarnation: info.incarnation,
            capabilities: info.capabilities,
            workers: info.workers,
            running: provider.running().await,
        };
        let sent = Instant::now();
        let lease_now = renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(default_lease, |(_, l)| l);
        let answer = async {
            let resp = http
                .post(&url)
                .json(&hb)
                .timeout(lease_now / 4)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                return Err(format!("{status}: {body}"));
            }
            resp.json::<HeartbeatAnswer>()
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match answer {
            Ok(a) => {
                let lease = Duration::from_millis(a.lease_ms);
                *renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some((sent, lease));
                provider.set_lease(fence_at(lease).map(|t| t - sent.elapsed().as_millis() as u64));
                for s in a.stop {
                    provider.fence(&s.tenant, &s.actor, s.epoch).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        tokio::time::sleep(every).await;
    }
}
