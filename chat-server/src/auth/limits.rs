//! Abuse limits: how fast one user sends, how many sockets one address holds, and how fast one
//! socket subscribes. Each limit is per user, address or socket, so one client's flood never slows
//! anyone else; a request over a limit is answered `RATE_LIMITED` (HTTP 429, close 4429).

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_graphql::ErrorExtensions;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// The close code of a socket refused for a limit.
pub const RATE_LIMITED_CLOSE: u16 = 4429;

/// Keys a keyed limiter keeps before it forgets those that are full again.
const RETAIN_ABOVE: usize = 10_000;
/// Sends between two looks at the limiter's size.
const PRUNE_EVERY: u64 = 4096;

pub fn rate_limited(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", "RATE_LIMITED"))
}

/// The limits, as configured.
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// Messages per second one user sends, sustained, and the burst above it.
    pub send_rate: NonZeroU32,
    pub send_burst: NonZeroU32,
    /// Subscriptions per second one socket starts (bursts of five times as many pass).
    pub subscribe_rate: NonZeroU32,
    /// Sockets one address holds at once; 0 for no limit.
    pub max_connections_per_ip: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            send_rate: NonZeroU32::new(5).expect("nonzero"),
            send_burst: NonZeroU32::new(20).expect("nonzero"),
            subscribe_rate: NonZeroU32::new(10).expect("nonzero"),
            max_connections_per_ip: 0,
        }
    }
}

/// The limits every request of a gateway shares.
pub struct Limits {
    pub settings: LimitSettings,
    senders: DefaultKeyedRateLimiter<String>,
    sends: std::sync::atomic::AtomicU64,
    connections: Mutex<HashMap<IpAddr, usize>>,
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Arc<Self> {
        let quota = Quota::per_second(settings.send_rate).allow_burst(settings.send_burst);
        Arc::new(Self {
            settings,
            senders: DefaultKeyedRateLimiter::keyed(quota),
            sends: Default::default(),
            connections: Mutex::default(),
        })
    }

    /// One more message from `sender`, a signed-in user's `sub`.
    pub fn send(&self, sender: &str) -> async_graphql::Result<()> {
        // Forgetting full buckets scans every key under the limiter's lock: now and then, not per send.
        if self.sends.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PRUNE_EVERY == 0
            && self.senders.len() > RETAIN_ABOVE
        {
            self.senders.retain_recent();
        }
        self.senders.check_key(&sender.to_owned()).map_err(|_| {
            rate_limited(format!(
                "sending too fast: at most {} messages a second (bursts of {}); try again shortly",
                self.settings.send_rate, self.settings.send_burst
            ))
        })
    }

    /// A socket from `ip`, counted until the guard drops; `None` when the address holds its limit.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionGuard> {
        let max = self.settings.max_connections_per_ip;
        let mut connections = self.connections.lock().expect("connections lock");
        let held = connections.entry(ip).or_default();
        if max > 0 && *held >= max {
            return None;
        }
        *held += 1;
        Some(ConnectionGuard { limits: self.clone(), ip })
    }

    /// The limiter of one socket's subscriptions.
    pub fn subscriptions(&self) -> SubscribeLimiter {
        let rate = self.settings.subscribe_rate;
        let burst = rate.saturating_mul(NonZeroU32::new(5).expect("nonzero"));
        SubscribeLimiter { limiter: DefaultDirectRateLimiter::direct(Quota::per_second(rate).allow_burst(burst)), rate }
    }
}

/// A counted socket; dropping it frees its place.
pub struct ConnectionGuard {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut connections = self.limits.connections.lock().expect("connections lock");
        if let Some(held) = connections.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                connections.remove(&self.ip);
            }
        }
    }
}

/// How fast one socket may start subscriptions.
pub struct SubscribeLimiter {
    limiter: DefaultDirectRateLimiter,
    rate: NonZeroU32,
}

impl SubscribeLimiter {
    pub fn check(&self) -> async_graphql::Result<()> {
        self.limiter.check().map_err(|_| {
            rate_limited(format!(
                "subscribing too fast: at most {} subscriptions a second on one connection",
                self.rate
            ))
        })
    }
}

/// How long a limit that refused waits, for logs and `Retry-After`.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections_per_ip: usize) -> Arc<Limits> {
        Limits::new(LimitSettings {
            send_rate: NonZeroU32::new(1).unwrap(),
            send_burst: NonZeroU32::new(3).unwrap(),
            max_connections_per_ip,
            ..LimitSettings::default()
        })
    }

    #[test]
    fn a_sender_over_its_burst_is_limited_and_another_is_not() {
        let limits = limits(0);
        for _ in 0..3 {
            limits.send("flooder").unwrap();
        }
        let err = limits.send("flooder").unwrap_err();
        assert_eq!(
            err.extensions.as_ref().and_then(|e| e.get("code")).map(|c| c.to_string()),
            Some("\"RATE_LIMITED\"".into())
        );
        limits.send("someone else").unwrap();
    }

    #[test]
    fn an_address_holds_at_most_its_connections_until_one_closes() {
        let limits = limits(2);
        let ip = IpAddr::from([10, 0, 0, 1]);
        let (first, _second) = (limits.connect(ip).unwrap(), limits.connect(ip).unwrap());
        assert!(limits.connect(ip).is_none());
        assert!(limits.connect(IpAddr::from([10, 0, 0, 2])).is_some(), "another address has its own");
        drop(first);
        assert!(limits.connect(ip).is_some());
    }
}
