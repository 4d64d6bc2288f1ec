//! Verified tokens, remembered for a bounded time, so authentication does not need the
//! store on every request — and keeps working through a store outage for that long.
//!
//! The time a verification is trusted ([`TokenCache::ttl`], `--token-cache-ms`, 60 s by
//! default) is part of the freshness budget: a token the store stops knowing (or whose role
//! changes) is honoured as it was by a node for at most that long. An unknown token is never
//! remembered (each attempt asks the store), so a token created a moment ago works at once.

use mayfly_store::TokenGrant;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most verifications remembered at once; beyond it the oldest are forgotten.
const MAX_ENTRIES: usize = 100_000;

/// The default time a verification is trusted.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct TokenCache {
    ttl: Duration,
    map: Mutex<HashMap<String, (TokenGrant, Instant)>>,
}

impl TokenCache {
    pub fn new(ttl: Duration) -> TokenCache {
        TokenCache {
            ttl,
            map: Mutex::default(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The grant of `hash` verified within the last `ttl`, if any.
    pub fn fresh(&self, hash: &str) -> Option<TokenGrant> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(g, _)| g.clone())
    }

    /// The store verified `hash` just now.
    pub fn verified(&self, hash: &str, grant: TokenGrant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= MAX_ENTRIES {
                // All live: drop the oldest half (they are asked again, not refused).
                let mut ages: Vec<Instant> = map.values().map(|(_, at)| *at).collect();
                ages.sort();
                let cut = ages[ages.len() / 2];
                map.retain(|_, (_, at)| *at > cut);
            }
        }
        map.insert(hash.to_owned(), (grant, Instant::now()));
    }

    /// The store no longer knows `hash` (revoked): forget it at once on this node.
    pub fn forget(&self, hash: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(name: &str) -> TokenGrant {
        TokenGrant {
            tenant: "acme".into(),
            role: "author".into(),
            name: name.into(),
        }
    }

    #[test]
    fn verifications_last_their_ttl_and_a_revocation_is_forgotten_at_once() {
        let c = TokenCache::new(Duration::from_millis(50));
        assert_eq!(c.fresh("h1"), None);
        c.verified("h1", grant("dev"));
        assert_eq!(c.fresh("h1"), Some(grant("dev")));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.fresh("h1"), None, "past the ttl the store is asked again");
        c.verified("h1", grant("dev"));
        c.forget("h1");
        assert_eq!(c.fresh("h1"), None);
        // A ttl of zero remembers nothing.
        let off = TokenCache::new(Duration::ZERO);
        off.verified("h1", grant("dev"));
        assert_eq!(off.fresh("h1"), None);
    }
}
