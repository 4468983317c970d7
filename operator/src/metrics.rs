//! Prometheus metrics of the reconciler: counts, errors and durations by result.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LanguageLabels {
    pub namespace: String,
    pub chat: String,
    pub language: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChatLabels {
    pub namespace: String,
    pub chat: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<ResultLabels, Histogram>,
    pub backlog: Family<LanguageLabels, Gauge>,
    pub desired_replicas: Family<LanguageLabels, Gauge>,
    /// Ready gateway replicas by chat, as the last reconcile saw them: zero when no gateway pod is
    /// there to be scraped at all, which no alert on the pods' own metrics can see.
    pub gateway_ready: Family<ChatLabels, Gauge>,
    /// When each reconcile still running started, by timer: what `/healthz` looks at.
    running: Mutex<HashMap<u64, Instant>>,
    next_timer: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<ResultLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ResultLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
        });
        let backlog = Family::<LanguageLabels, Gauge>::default();
        let desired_replicas = Family::<LanguageLabels, Gauge>::default();
        let gateway_ready = Family::<ChatLabels, Gauge>::default();
        let mut registry = Registry::with_prefix("parley_operator");
        registry.register("translator_backlog", "Ready messages waiting in a language's queue", backlog.clone());
        registry.register(
            "translator_desired_replicas",
            "Replicas the builtin autoscaler wants for a language",
            desired_replicas.clone(),
        );
        registry.register(
            "gateway_ready_replicas",
            "Ready gateway replicas of a chat, as its last reconcile saw them",
            gateway_ready.clone(),
        );
        registry.register("reconciles", "Reconciliations by result", reconciles.clone());
        registry.register("reconcile_errors", "Reconciliation errors by kind", errors.clone());
        registry.register("reconcile_duration_seconds", "Reconciliation duration by result", duration.clone());
        Self {
            registry: Mutex::new(registry),
            reconciles,
            errors,
            duration,
            backlog,
            desired_replicas,
            gateway_ready,
            running: Mutex::default(),
            next_timer: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Drops the per-language series of a ChatDeployment that is gone, so they do not outlive it.
    pub fn forget(&self, namespace: &str, chat: &str, languages: &[String]) {
        self.gateway_ready.remove(&ChatLabels { namespace: namespace.to_owned(), chat: chat.to_owned() });
        for language in languages {
            let labels =
                LanguageLabels { namespace: namespace.to_owned(), chat: chat.to_owned(), language: language.clone() };
            self.backlog.remove(&labels);
            self.desired_replicas.remove(&labels);
        }
    }

    /// Starts timing a reconcile; the timer records when dropped (as "error" unless marked ok).
    pub fn timer(&self) -> ReconcileTimer<'_> {
        let (id, start) = (self.next_timer.fetch_add(1, Ordering::Relaxed), Instant::now());
        self.running.lock().expect("running lock").insert(id, start);
        ReconcileTimer { metrics: self, id, start, result: "error" }
    }

    /// Why the controller is stuck, if a reconcile has been running for longer than `after` (every
    /// broker and database call in one is bounded, so one that never ends is hung).
    pub fn stuck(&self, after: Duration) -> Option<String> {
        let oldest = self.running.lock().expect("running lock").values().min().copied()?;
        let running = oldest.elapsed();
        (running > after).then(|| format!("a reconcile has been running for {}s", running.as_secs()))
    }

    pub fn error(&self, label: &str) {
        self.errors.get_or_create(&ErrorLabels { error: label.to_owned() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("registry lock")).expect("metrics always encode");
        out
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    id: u64,
    start: Instant,
    result: &'static str,
}

impl ReconcileTimer<'_> {
    pub fn succeeded(&mut self) {
        self.result = "ok";
    }
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.running.lock().expect("running lock").remove(&self.id);
        let labels = ResultLabels { result: self.result.to_owned() };
        self.metrics.reconciles.get_or_create(&labels).inc();
        self.metrics.duration.get_or_create(&labels).observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use parley_contract::chart_check;

    use super::*;

    #[test]
    fn a_reconcile_that_runs_too_long_is_stuck_and_one_that_ended_is_not() {
        let metrics = Metrics::default();
        assert_eq!(metrics.stuck(Duration::ZERO), None, "nothing running is not stuck");
        let timer = metrics.timer();
        std::thread::sleep(Duration::from_millis(5));
        assert!(metrics.stuck(Duration::ZERO).is_some_and(|why| why.contains("running for")));
        assert_eq!(metrics.stuck(Duration::from_secs(600)), None, "within the limit");
        drop(timer);
        assert_eq!(metrics.stuck(Duration::ZERO), None);
    }

    /// The chart's dashboard and alerts query only operator metrics that exist (the chat server's are
    /// checked against real roles by its own tests).
    #[test]
    fn the_charts_dashboard_and_alerts_use_only_operator_metrics_that_exist() {
        let exported = chart_check::declared(&Metrics::default().encode());
        let unknown = chart_check::unknown(&exported, "parley_operator_", None);
        assert!(unknown.is_empty(), "the chart queries operator metrics that do not exist: {unknown:?}");
    }
}
