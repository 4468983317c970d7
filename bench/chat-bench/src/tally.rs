//! What subscribers received, per phase: counts, the latency histogram, each broadcast's slowest
//! delivery, and when deliveries arrived (to tell the sending window from the drain after it).

use std::collections::HashMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Width of the bins receive times are counted in.
const BIN_NANOS: u64 = 10_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// One phase's deliveries, as one process saw them.
pub struct PhaseTally {
    latencies: Histogram<u64>,
    /// Per broadcast (its send time), the slowest subscriber's latency in µs.
    slowest: HashMap<u64, u64>,
    /// Deliveries by 10 ms bin of their receive time.
    arrivals: HashMap<u64, u64>,
}

impl Default for PhaseTally {
    fn default() -> Self {
        Self { latencies: histogram(), slowest: HashMap::new(), arrivals: HashMap::new() }
    }
}

impl PhaseTally {
    pub fn record(&mut self, sent: u64, received: u64) {
        let micros = received.saturating_sub(sent) / 1000;
        let _ = self.latencies.record(micros.max(1));
        let slowest = self.slowest.entry(sent).or_default();
        *slowest = (*slowest).max(micros);
        *self.arrivals.entry(received / BIN_NANOS).or_default() += 1;
    }

    /// The report of this phase; deliveries that arrived after `window_end` (ns) count as drained.
    pub fn report(&self, window_end: u64) -> PhaseReport {
        let last_bin = window_end / BIN_NANOS;
        let received = self.latencies.len();
        let in_window = self.arrivals.iter().filter(|(bin, _)| **bin <= last_bin).map(|(_, n)| n).sum();
        PhaseReport {
            received,
            in_window,
            latencies: self.latencies.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect(),
            slowest: self.slowest.iter().map(|(k, v)| (*k, *v)).collect(),
            cpu_seconds: 0.0,
            errors: Vec::new(),
        }
    }
}

/// What one process reports for one phase.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct PhaseReport {
    pub received: u64,
    /// Received before the sending window closed.
    pub in_window: u64,
    /// (latency µs, count) pairs.
    pub latencies: Vec<(u64, u64)>,
    pub slowest: Vec<(u64, u64)>,
    /// The process's CPU time so far.
    pub cpu_seconds: f64,
    pub errors: Vec<String>,
}

/// The tallies of every phase one process has seen.
#[derive(Default)]
pub struct Tallies {
    phases: HashMap<u32, PhaseTally>,
    pub errors: Vec<String>,
}

impl Tallies {
    pub fn record(&mut self, phase: u32, sent: u64, received: u64) {
        self.phases.entry(phase).or_default().record(sent, received);
    }

    /// Reports `phase` and forgets it.
    pub fn take_report(&mut self, phase: u32, window_end: u64) -> PhaseReport {
        let mut report = self.phases.remove(&phase).unwrap_or_default().report(window_end);
        report.cpu_seconds = crate::cpu_seconds("self");
        report.errors = std::mem::take(&mut self.errors).into_iter().take(5).collect();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_after_the_window_count_as_drained() {
        let mut tally = PhaseTally::default();
        tally.record(0, 5_000_000_000);
        tally.record(0, 5_500_000_000);
        tally.record(1_000, 7_000_000_000);
        let report = tally.report(6_000_000_000);
        assert_eq!((report.received, report.in_window), (3, 2));
        assert_eq!(report.slowest.iter().find(|(sent, _)| *sent == 0).unwrap().1, 5_500_000);
    }
}
