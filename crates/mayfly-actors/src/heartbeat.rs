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

/// Heartbeat every `every` to `control` (`https://…`) until the task is dropped.
pub async fn run(provider: Arc<Provider>, http: reqwest::Client, control: String, every: Duration) {
    let url = format!("{}/v1/providers/heartbeat", control.trim_end_matches('/'));
    let mut last_ok: Option<Instant> = None;
    let mut lease = Duration::from_millis(mayfly_control::dataplane::DEFAULT_LEASE_MS);
    let mut fenced = false;
    loop {
        let info = provider.info().await;
        let hb = Heartbeat {
            incarnation: info.incarnation,
            capabilities: info.capabilities,
            workers: info.workers,
            running: provider.running().await,
        };
        let answer = async {
            let resp = http
                .post(&url)
                .json(&hb)
                .timeout(every.max(Duration::from_secs(2)))
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
                last_ok = Some(Instant::now());
                lease = Duration::from_millis(a.lease_ms);
                fenced = false;
                for s in a.stop {
                    provider.fence(&s.actor, s.epoch).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                let expired = last_ok.is_none_or(|t| t.elapsed() >= lease);
                if expired && !fenced {
                    tracing::warn!("lease expired without renewal: self-fencing every actor");
                    provider.shutdown().await;
                    fenced = true;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
