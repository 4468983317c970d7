//! Prometheus metrics of a chat-server process (OpenMetrics text on `/metrics`, every role).
//!
//! One registry per process, reached through [`metrics()`]: the roles count where the work happens.
//! Nothing here is per subscriber or per frame: a broadcast to ten thousand sockets costs the same
//! few atomic increments as one to a single socket.

use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Protocol {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LanguageLabel {
    pub language: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Translation {
    pub language: String,
    pub provider: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub language: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderError {
    pub language: String,
    pub provider: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

/// Seconds, from a millisecond to two minutes.
fn latency() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0])
}

pub struct Metrics {
    registry: Mutex<Registry>,
    // Every role.
    pub ready: Gauge,
    // Gateway.
    pub connections: Family<Protocol, Gauge>,
    pub subscriptions: Gauge,
    pub shared_groups: Gauge,
    pub posted: Family<Outcome, Counter>,
    pub deliveries: Counter,
    pub gap_filled: Counter,
    pub slow_consumer_closes: Counter,
    pub delivered_latency: Family<LanguageLabel, Histogram>,
    // Translators.
    pub translations: Family<Translation, Counter>,
    pub provider_latency: Family<ProviderLabels, Histogram>,
    pub provider_errors: Family<ProviderError, Counter>,
    pub translated_latency: Family<LanguageLabel, Histogram>,
    // Translators and fanout.
    pub dead_lettered: Family<RoleLabel, Counter>,
    // Fanout.
    pub fanout_batch: Histogram,
    pub store_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("parley");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            ready: Gauge::default(),
            connections: Family::default(),
            subscriptions: Gauge::default(),
            shared_groups: Gauge::default(),
            posted: Family::default(),
            deliveries: Counter::default(),
            gap_filled: Counter::default(),
            slow_consumer_closes: Counter::default(),
            delivered_latency: Family::new_with_constructor(latency),
            translations: Family::default(),
            provider_latency: Family::new_with_constructor(latency),
            provider_errors: Family::default(),
            translated_latency: Family::new_with_constructor(latency),
            dead_lettered: Family::default(),
            fanout_batch: Histogram::new([1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 512.0]),
            store_latency: latency(),
        };
        registry.register(
            "ready",
            "1 when the process can serve (what /readyz answers: the broker connection is up)",
            m.ready.clone(),
        );
        registry.register("connections", "Open WebSocket connections, by subprotocol", m.connections.clone());
        registry.register("subscriptions", "Running subscription operations", m.subscriptions.clone());
        registry.register(
            "shared_groups",
            "Distinct subscriptions executed once and shared by their subscribers",
            m.shared_groups.clone(),
        );
        registry.register("messages_posted", "Messages sent by clients, by result", m.posted.clone());
        registry.register(
            "deliveries",
            "Deliveries handed to a chat's local subscribers (once per chat, not per subscriber)",
            m.deliveries.clone(),
        );
        registry.register(
            "gap_filled_deliveries",
            "Deliveries the broker did not route here, read from the history to fill a gap",
            m.gap_filled.clone(),
        );
        registry.register(
            "slow_consumer_closes",
            "Sockets closed because their client read too slowly",
            m.slow_consumer_closes.clone(),
        );
        registry.register(
            "delivered_latency_seconds",
            "From a message's sentAt to its delivery (original or translation) reaching this gateway",
            m.delivered_latency.clone(),
        );
        registry.register(
            "translations",
            "Messages a translator settled, by language, provider and result",
            m.translations.clone(),
        );
        registry.register(
            "provider_call_seconds",
            "Duration of one translation provider call",
            m.provider_latency.clone(),
        );
        registry.register(
            "provider_errors",
            "Translation provider calls that failed, by kind",
            m.provider_errors.clone(),
        );
        registry.register(
            "translated_latency_seconds",
            "From a message's sentAt to its translation being published",
            m.translated_latency.clone(),
        );
        registry.register("dead_lettered", "Messages sent to the dead-letter queue, by role", m.dead_lettered.clone());
        registry.register(
            "fanout_batch_size",
            "Messages the fanout stored and published as one batch",
            m.fanout_batch.clone(),
        );
        registry.register("history_store_seconds", "Duration of storing one fanout batch", m.store_latency.clone());
        *m.registry.lock().expect("registry lock") = registry;
        m
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("registry lock")).expect("metrics always encode");
        out
    }
}

/// Seconds since an RFC 3339 `sentAt`, when it parses and is not in the future.
pub fn since(sent_at: &str) -> Option<f64> {
    let sent = humantime::parse_rfc3339_weak(sent_at).ok()?;
    SystemTime::now().duration_since(sent).ok().map(|d: Duration| d.as_secs_f64())
}

/// Counts one up while alive.
pub struct Counted(Gauge);

impl Counted {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_the_parley_prefix() {
        let m = Metrics::default();
        m.posted.get_or_create(&Outcome { result: "accepted" }).inc();
        let text = m.encode();
        assert!(text.contains("parley_messages_posted_total{result=\"accepted\"} 1"), "{text}");
        for name in ["parley_connections", "parley_deliveries_total", "parley_history_store_seconds"] {
            assert!(text.contains(name), "{name} in {text}");
        }
        assert!(since(&crate::wire::now_rfc3339()).is_some_and(|s| s < 5.0));
        assert_eq!(since("not a time"), None);
    }
}
