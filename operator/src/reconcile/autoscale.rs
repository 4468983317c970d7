//! Autoscale (pure): each builtin-autoscaled language's queue backlog and recent recommendations →
//! its translator replicas, and what changed.
//!
//! `recommend = clamp(ceil(backlog / targetBacklog), min, max)`, the backlog being the ready messages
//! and, when the broker's management API tells, those translators hold unacknowledged. Scaling up
//! happens at once; scaling down goes only as low as the highest recommendation within the
//! stabilization window, so a backlog that dips and returns does not make replicas flap (the HPA's
//! rule). A language goes to zero only when it is idle (see [`Load::idle`]).

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

use super::{
    status::ScalingReport,
    validate::{Bounds, Language, Scaling},
};
use crate::{
    crd::ChatDeploymentStatus,
    events::{Note, Reason},
};

/// What the broker says of one language queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Messages ready for a translator.
    pub ready: i64,
    /// Translators connected to the queue.
    pub consumers: i64,
    /// Messages delivered to translators and not yet acknowledged: known only from the management
    /// API (AMQP shows ready messages only).
    pub unacknowledged: Option<i64>,
    /// Whether messages were published to the queue lately (management API).
    pub publishing: bool,
}

impl Load {
    /// A queue known only by what AMQP's passive declare shows.
    pub fn ready(ready: i64, consumers: i64) -> Self {
        Self { ready, consumers, unacknowledged: None, publishing: false }
    }

    /// The messages the translators have to get through: ready, and held unacknowledged when known.
    pub fn backlog(&self) -> i64 {
        self.ready + self.unacknowledged.unwrap_or(0)
    }

    /// Whether the language may go to zero translators: nothing ready, none being published, and
    /// none held unacknowledged. With that count unknown, only when no translator is connected: a
    /// translator keeping up shows no ready message, and stopping it would only hand back what it
    /// holds and leave the next messages waiting for a pod to start.
    pub fn idle(&self) -> bool {
        self.ready == 0 && !self.publishing && self.unacknowledged.map_or(self.consumers == 0, |n| n == 0)
    }
}

/// Replicas wanted for `backlog` ready messages, within the bounds.
pub fn recommend(backlog: i64, bounds: &Bounds) -> i32 {
    let target = bounds.target_backlog.max(1);
    let raw = if backlog <= 0 { 0 } else { (backlog + target - 1) / target };
    i32::try_from(raw).unwrap_or(i32::MAX).clamp(bounds.min, bounds.max.max(bounds.min))
}

/// Recommendations of one language over the stabilization window, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History(Vec<(Timestamp, i32)>);

impl History {
    /// A history for a language seen for the first time (or after a restart): its current replicas
    /// count as a recommendation made now, so nothing scales down before a whole window has passed.
    pub fn starting_at(now: Timestamp, current: i32) -> Self {
        Self(vec![(now, current)])
    }
}

/// The replicas to run now, given the current replicas, the queue's load, and the window's history.
pub fn decide(current: i32, load: &Load, bounds: &Bounds, history: &mut History, now: Timestamp) -> i32 {
    let mut recommended = recommend(load.backlog(), bounds);
    if !load.idle() {
        recommended = recommended.max(1).min(bounds.max.max(1));
    }
    history.0.push((now, recommended));
    let window = bounds.scale_down_window;
    history.0.retain(|(at, _)| now.duration_since(*at).unsigned_abs() <= window);
    let upper = bounds.max.max(bounds.min);
    if recommended >= current {
        return recommended;
    }
    let stabilized = history.0.iter().map(|(_, r)| *r).max().unwrap_or(recommended);
    stabilized.min(current).clamp(bounds.min, upper)
}

/// A language whose replicas the builtin autoscaler changes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub language: String,
    pub from: i32,
    pub to: i32,
    pub backlog: i64,
    pub target_backlog: i64,
}

impl Change {
    /// The Event that tells of this change.
    pub fn note(&self) -> Note {
        let text = format!(
            "scaled translator {} from {} to {} replicas (backlog {}, target {} per replica)",
            self.language, self.from, self.to, self.backlog, self.target_backlog
        );
        Note::normal(Reason::TranslatorScaled, text)
    }
}

/// The builtin autoscaler's decisions for one ChatDeployment in one reconcile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Desired replicas and last scale times, for the build and status steps.
    pub report: ScalingReport,
    /// The backlog of every builtin-autoscaled language that could be read.
    pub backlogs: BTreeMap<String, i64>,
    pub changes: Vec<Change>,
}

/// Decides the replicas of every language in builtin mode. `current` holds the replicas the
/// Deployments have now, `loads` what the broker says of each queue (`None` when it could not be asked:
/// then nothing changes), and `histories` each language's recommendations, kept between reconciles.
/// Languages in KEDA mode are listed with `keda_installed`, for the status.
pub fn plan(
    languages: &[Language],
    current: &BTreeMap<String, i32>,
    loads: Option<&BTreeMap<String, Load>>,
    histories: &mut BTreeMap<String, History>,
    previous: Option<&ChatDeploymentStatus>,
    keda_installed: bool,
    now: Timestamp,
) -> Plan {
    let mut plan = Plan::default();
    let keda: Vec<String> =
        languages.iter().filter(|l| matches!(l.scaling, Scaling::Keda(_))).map(|l| l.code.clone()).collect();
    if !keda.is_empty() {
        plan.report.keda = Some((keda, keda_installed));
    }
    let last_scale = |language: &str| {
        previous
            .and_then(|s| s.translators.iter().find(|t| t.language == language))
            .and_then(|t| t.last_scale_time.clone())
    };
    for language in languages {
        let Scaling::Builtin(bounds) = language.scaling else {
            continue;
        };
        let code = &language.code;
        let existing = current.get(code).copied();
        let now_replicas = existing.unwrap_or(bounds.min);
        let load = loads.and_then(|l| l.get(code)).copied();
        let desired = match &load {
            None => now_replicas.clamp(bounds.min, bounds.max),
            Some(load) => {
                plan.backlogs.insert(code.clone(), load.backlog());
                let history = histories.entry(code.clone()).or_insert_with(|| History::starting_at(now, now_replicas));
                decide(now_replicas, load, &bounds, history, now)
            }
        };
        plan.report.desired.insert(code.clone(), desired);
        match existing {
            Some(from) if from != desired => {
                plan.report.last_scale.insert(code.clone(), now.to_string());
                plan.changes.push(Change {
                    language: code.clone(),
                    from,
                    to: desired,
                    backlog: load.map(|l| l.backlog()).unwrap_or_default(),
                    target_backlog: bounds.target_backlog,
                });
            }
            _ => {
                if let Some(at) = last_scale(code) {
                    plan.report.last_scale.insert(code.clone(), at);
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn bounds(min: i32, max: i32) -> Bounds {
        Bounds { min, max, target_backlog: 100, scale_down_window: Duration::from_secs(120) }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    /// Runs a scripted sequence of (second, load) through `decide`, returning the replicas after each.
    fn run_loads(start: i32, bounds: Bounds, script: &[(i64, Load)]) -> Vec<i32> {
        let mut history = History::starting_at(at(0), start);
        let mut current = start;
        script
            .iter()
            .map(|(second, load)| {
                current = decide(current, load, &bounds, &mut history, at(*second));
                current
            })
            .collect()
    }

    /// [`run_loads`] for queues with `backlog` ready messages, nothing held and no translator connected.
    fn run(start: i32, bounds: Bounds, script: &[(i64, i64)]) -> Vec<i32> {
        let loads: Vec<(i64, Load)> = script.iter().map(|(at, backlog)| (*at, Load::ready(*backlog, 0))).collect();
        run_loads(start, bounds, &loads)
    }

    #[test]
    fn a_language_keeping_up_is_not_scaled_to_zero_whatever_its_ready_count() {
        // Translators connected and nothing ready: AMQP alone cannot tell a busy queue from an idle one.
        let connected = Load::ready(0, 2);
        assert_eq!(run_loads(1, bounds(0, 10), &[(10, connected), (200, connected), (400, connected)]), [1, 1, 1]);
        // The management API tells: messages in flight, or being published, keep one translator.
        let in_flight = Load { unacknowledged: Some(3), ..connected };
        let publishing = Load { unacknowledged: Some(0), publishing: true, ..connected };
        assert_eq!(run_loads(1, bounds(0, 10), &[(10, in_flight), (200, publishing), (400, publishing)]), [1, 1, 1]);
        // Idle by its count: after the window, zero.
        let idle = Load { unacknowledged: Some(0), ..connected };
        assert_eq!(run_loads(1, bounds(0, 10), &[(10, idle), (200, idle)]), [1, 0]);
    }

    #[test]
    fn unacknowledged_messages_count_in_the_backlog() {
        let held = Load { ready: 50, consumers: 1, unacknowledged: Some(250), publishing: true };
        assert_eq!(run_loads(1, bounds(0, 10), &[(10, held)]), [3]);
    }

    #[test]
    fn autoscaling_recommends_ceil_of_backlog_over_target_within_bounds() {
        let b = bounds(1, 10);
        assert_eq!(recommend(0, &b), 1);
        assert_eq!(recommend(1, &b), 1);
        assert_eq!(recommend(101, &b), 2);
        assert_eq!(recommend(250, &b), 3);
        assert_eq!(recommend(1_000_000, &b), 10);
    }

    #[test]
    fn autoscaling_scales_up_at_once() {
        assert_eq!(run(1, bounds(1, 10), &[(10, 450)]), vec![5]);
    }

    #[test]
    fn autoscaling_scales_down_only_after_the_window() {
        let replicas = run(1, bounds(1, 10), &[(10, 450), (20, 0), (100, 0), (129, 0), (131, 0)]);
        assert_eq!(replicas, vec![5, 5, 5, 5, 1]);
    }

    #[test]
    fn autoscaling_suppresses_flapping() {
        // The backlog dips and returns every 10 s; replicas stay at the peak.
        let script: Vec<(i64, i64)> = (1..=12).map(|i| (i * 10, if i % 2 == 0 { 20 } else { 480 })).collect();
        assert!(run(1, bounds(1, 10), &script).iter().all(|r| *r == 5));
    }

    #[test]
    fn autoscaling_steps_down_through_the_window_maximum() {
        let replicas = run(1, bounds(1, 10), &[(0, 900), (60, 300), (125, 0), (185, 0), (250, 0)]);
        assert_eq!(replicas, vec![9, 9, 3, 1, 1]);
    }

    #[test]
    fn autoscaling_wakes_a_language_from_zero_when_messages_wait() {
        let replicas = run(0, bounds(0, 10), &[(10, 0), (20, 1), (30, 0), (200, 0)]);
        assert_eq!(replicas, vec![0, 1, 1, 0]);
    }

    #[test]
    fn autoscaling_respects_bounds_even_when_they_change() {
        assert_eq!(run(1, bounds(2, 4), &[(10, 0), (20, 100_000)]), vec![2, 4]);
        // Current replicas above a lowered maximum come down at once.
        assert_eq!(run(20, bounds(1, 10), &[(10, 5000)]), vec![10]);
    }

    #[test]
    fn autoscaling_after_a_restart_waits_a_window_before_scaling_down() {
        // A fresh history seeded with the current replicas: no scale-down before 120 s.
        assert_eq!(run(6, bounds(1, 10), &[(5, 0), (119, 0), (121, 0)]), vec![6, 6, 1]);
    }
}
