//! Status (pure): what the API server and the broker reported → conditions, phase and per-role status.
//!
//! `lastTransitionTime` is carried over from the previous status unless the condition flipped.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::apps::v1::Deployment,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use super::{
    observe::{SecretError, Served},
    validate::{Scaling, SpecError, ValidatedChat},
};
use crate::{
    crd::{ChatDeploymentStatus, GatewayStatus, Phase, RoleStatus, TranslatorStatus},
    events::{Note, Reason},
};

pub const READY: &str = "Ready";
pub const BROKER_READY: &str = "BrokerReady";
pub const GATEWAY_READY: &str = "GatewayReady";
pub const TRANSLATORS_READY: &str = "TranslatorsReady";
pub const FANOUT_READY: &str = "FanoutReady";
pub const AUTOSCALING_READY: &str = "AutoscalingReady";
pub const HISTORY_READY: &str = "HistoryReady";
/// In auth mode jwt: whether the gateway's HS256 secret is there to be handed to it.
pub const AUTH_READY: &str = "AuthReady";
/// Whether Prometheus is told to scrape the chat's pods; not part of `Ready`.
pub const METRICS_SCRAPED: &str = "MetricsScraped";

/// What the autoscaling step decided and found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScalingReport {
    /// Replicas the builtin autoscaler wants, by language.
    pub desired: BTreeMap<String, i32>,
    /// When each builtin-autoscaled language last changed replicas (RFC 3339).
    pub last_scale: BTreeMap<String, String>,
    /// Languages in KEDA mode, and whether the KEDA CRDs are installed.
    pub keda: Option<(Vec<String>, bool)>,
}

/// What the broker step found.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerReport {
    /// Topology declared; ready messages per language queue (including draining ones).
    Ready { backlogs: BTreeMap<String, i64> },
    /// The broker step failed; `reason` is a PascalCase condition reason.
    Failed { reason: String, message: String },
}

/// What the history step found, when the spec keeps a history.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryReport {
    Ready,
    /// `reason` is a PascalCase condition reason.
    Failed {
        reason: String,
        message: String,
    },
}

/// The shortest HS256 secret the chat server accepts (RFC 7518 §3.2: the hash's size).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// What the gateway's sign-in needs from the cluster, when it needs something: in auth mode jwt, its
/// HS256 secret. A gateway whose Secret is missing never starts (its pods wait for the Secret).
#[derive(Debug, Clone, PartialEq)]
pub enum AuthReport {
    Ready { message: String },
    Failed { reason: Reason, message: String },
}

impl AuthReport {
    /// The report for `chat`, from the JWT secret as observed: `None` unless the mode is jwt.
    pub fn new(chat: &ValidatedChat, secret: Option<&Result<Vec<u8>, SecretError>>) -> Option<Self> {
        let reference = chat.auth.jwt_secret.as_ref()?;
        let field = "auth.jwtSecretRef";
        Some(match secret? {
            Ok(bytes) if bytes.len() < MIN_JWT_SECRET_BYTES => Self::Failed {
                reason: Reason::JwtSecretTooShort,
                message: format!(
                    "{field}: Secret {} key {} holds {} bytes; the gateway needs at least {MIN_JWT_SECRET_BYTES}",
                    reference.name,
                    reference.key,
                    bytes.len()
                ),
            },
            Ok(_) => Self::Ready {
                message: format!(
                    "the gateway verifies tokens with the secret in Secret {} key {}",
                    reference.name, reference.key
                ),
            },
            Err(err) => Self::Failed {
                reason: match err {
                    SecretError::NotFound(_) => Reason::JwtSecretNotFound,
                    SecretError::KeyMissing { .. } => Reason::JwtSecretKeyMissing,
                },
                message: format!("{field}: {err}"),
            },
        })
    }

    /// A Warning when the report turns to a failure: once, not on every reconcile while it stays.
    pub fn note(&self, previous: Option<&ChatDeploymentStatus>) -> Option<Note> {
        let Self::Failed { reason, message } = self else { return None };
        let was_failing = previous
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == AUTH_READY && c.status == "False" && c.reason == reason.as_str());
        (!was_failing).then(|| Note::warning(*reason, message.clone()))
    }
}

/// A removed language whose queue still drains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draining {
    pub language: String,
    pub since: String,
}

/// Languages the previous status listed that the spec no longer has, with when their removal was first seen.
pub fn draining(previous: Option<&ChatDeploymentStatus>, languages: &[String], now: &str) -> Vec<Draining> {
    previous
        .map(|s| s.translators.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|t| !languages.contains(&t.language))
        .map(|t| Draining {
            language: t.language.clone(),
            since: t.draining_since.clone().unwrap_or_else(|| now.to_owned()),
        })
        .collect()
}

struct Observed {
    replicas: i32,
    ready: i32,
    desired: i32,
    exists: bool,
    rolled_out: bool,
}

fn observe(deployments: &[Deployment], name: &str) -> Observed {
    match deployments.iter().find(|d| d.metadata.name.as_deref() == Some(name)) {
        None => Observed { replicas: 0, ready: 0, desired: 0, exists: false, rolled_out: false },
        Some(d) => {
            let status = d.status.clone().unwrap_or_default();
            let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let rolled_out = status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
                && status.updated_replicas.unwrap_or(0) >= desired;
            Observed {
                replicas: status.replicas.unwrap_or(0),
                ready: status.ready_replicas.unwrap_or(0),
                desired,
                exists: true,
                rolled_out,
            }
        }
    }
}

impl Observed {
    fn ready(&self) -> bool {
        self.exists && self.rolled_out && self.ready >= self.desired
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: String, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Keeps each condition's previous `lastTransitionTime` when its status did not change.
fn carry_transitions(mut conditions: Vec<Condition>, previous: &[Condition]) -> Vec<Condition> {
    for c in &mut conditions {
        if let Some(p) = previous.iter().find(|p| p.type_ == c.type_ && p.status == c.status) {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
    conditions
}

fn role_condition(kind: &str, what: &str, o: &Observed, generation: Option<i64>, now: &Time) -> Condition {
    let (ok, reason, message) = if !o.exists {
        (false, "NotCreated", format!("the {what} Deployment does not exist yet"))
    } else if o.desired == 0 {
        (false, "ScaledToZero", format!("the {what} has 0 replicas"))
    } else if o.ready() {
        (true, "AllReplicasReady", format!("{}/{} {what} replicas ready", o.ready, o.desired))
    } else {
        (false, "ReplicasNotReady", format!("{}/{} {what} replicas ready", o.ready, o.desired))
    };
    condition(kind, ok, reason, message, generation, now)
}

/// What one reconcile found, for the status.
#[derive(Debug, Clone, Copy)]
pub struct Findings<'a> {
    /// The Deployments as the API server returned them from the apply.
    pub deployments: &'a [Deployment],
    pub broker: &'a BrokerReport,
    /// Removed languages still draining.
    pub draining: &'a [Draining],
    pub scaling: &'a ScalingReport,
    /// `None` when the spec keeps no history.
    pub history: Option<&'a HistoryReport>,
    /// `None` unless the gateway's sign-in needs something from the cluster (auth mode jwt).
    pub auth: Option<&'a AuthReport>,
    /// Whether PodMonitors can be made.
    pub pod_monitors: &'a Served,
}

/// What AutoscalingReady says while translators scale: that a language meant to reach zero will not
/// while its translators are connected, when there is no management API to tell it is idle.
fn scaling_message(chat: &ValidatedChat) -> String {
    let to_zero: Vec<&str> = chat
        .languages
        .iter()
        .filter(|l| matches!(l.scaling, Scaling::Builtin(b) if b.min == 0))
        .map(|l| l.code.as_str())
        .collect();
    if chat.management_url.is_some() || to_zero.is_empty() {
        return "translators scale on their backlog".into();
    }
    format!(
        "translators scale on their backlog; languages [{}] have minReplicas 0 but are not scaled to zero while \
         translators are connected: AMQP shows no unacknowledged messages, so set broker.managementUrl (RabbitMQ's \
         management API) to let them go to zero when idle",
        to_zero.join(", ")
    )
}

/// The status of a valid ChatDeployment of `generation`, keeping the transition times of `previous`.
pub fn compute(
    chat: &ValidatedChat,
    generation: Option<i64>,
    found: Findings<'_>,
    previous: &[Condition],
    now: &Time,
) -> ChatDeploymentStatus {
    let Findings { deployments, broker, draining, scaling, history, auth, pod_monitors } = found;
    let names = &chat.names;
    let gateway = observe(deployments, &names.gateway());
    let fanout = observe(deployments, &names.fanout());
    let backlog = |language: &str| match broker {
        BrokerReport::Ready { backlogs } => backlogs.get(language).copied(),
        BrokerReport::Failed { .. } => None,
    };
    let mut translators = Vec::new();
    let mut not_ready = Vec::new();
    let mut any_exists = gateway.exists || fanout.exists;
    for language in &chat.languages {
        let o = observe(deployments, &names.translator(&language.code));
        any_exists |= o.exists;
        if !(o.exists && o.rolled_out && o.ready >= o.desired) {
            not_ready.push(format!("{} ({}/{})", language.code, o.ready, o.desired));
        }
        translators.push(TranslatorStatus {
            language: language.code.clone(),
            replicas: o.replicas,
            ready_replicas: o.ready,
            backlog: backlog(&language.code),
            draining_since: None,
            desired_replicas: scaling.desired.get(&language.code).copied(),
            last_scale_time: scaling.last_scale.get(&language.code).cloned(),
        });
    }
    translators.extend(draining.iter().map(|d| {
        let o = observe(deployments, &names.translator(&d.language));
        TranslatorStatus {
            language: d.language.clone(),
            replicas: o.replicas,
            ready_replicas: o.ready,
            backlog: backlog(&d.language),
            draining_since: Some(d.since.clone()),
            desired_replicas: None,
            last_scale_time: None,
        }
    }));

    let translators_ready = not_ready.is_empty();
    let translators_condition = if translators_ready {
        condition(
            TRANSLATORS_READY,
            true,
            "AllReplicasReady",
            format!("{} languages ready", chat.languages.len()),
            generation,
            now,
        )
    } else {
        condition(
            TRANSLATORS_READY,
            false,
            "ReplicasNotReady",
            format!("not ready: {}", not_ready.join(", ")),
            generation,
            now,
        )
    };
    let broker_condition = match broker {
        BrokerReport::Ready { .. } => {
            condition(BROKER_READY, true, "TopologyDeclared", "exchanges and queues declared".into(), generation, now)
        }
        BrokerReport::Failed { reason, message } => {
            condition(BROKER_READY, false, reason, message.clone(), generation, now)
        }
    };
    let mut parts = vec![
        broker_condition,
        role_condition(GATEWAY_READY, "gateway", &gateway, generation, now),
        translators_condition,
        role_condition(FANOUT_READY, "fanout", &fanout, generation, now),
    ];
    // Without its history the fanout cannot sequence anything: the chat is not serving.
    parts.extend(history.map(|report| match report {
        HistoryReport::Ready => {
            condition(HISTORY_READY, true, "DatabaseReachable", "the history database answers".into(), generation, now)
        }
        HistoryReport::Failed { reason, message } => {
            condition(HISTORY_READY, false, reason, message.clone(), generation, now)
        }
    }));
    // Without its secret the gateway cannot start: the chat is not serving.
    parts.extend(auth.map(|report| match report {
        AuthReport::Ready { message } => {
            condition(AUTH_READY, true, "JwtSecretFound", message.clone(), generation, now)
        }
        AuthReport::Failed { reason, message } => {
            condition(AUTH_READY, false, reason.as_str(), message.clone(), generation, now)
        }
    }));
    let failing: Vec<&str> = parts.iter().filter(|c| c.status != "True").map(|c| c.type_.as_str()).collect();
    let ready = if failing.is_empty() {
        condition(READY, true, "AllComponentsReady", "the chat is serving".into(), generation, now)
    } else {
        condition(READY, false, "ComponentsNotReady", format!("not ready: {}", failing.join(", ")), generation, now)
    };
    let phase = if matches!(broker, BrokerReport::Failed { .. })
        || matches!(history, Some(HistoryReport::Failed { .. }))
        || matches!(auth, Some(AuthReport::Failed { .. }))
    {
        Phase::Degraded
    } else if failing.is_empty() {
        Phase::Ready
    } else if !any_exists {
        Phase::Pending
    } else {
        Phase::Progressing
    };
    let mut conditions = vec![ready];
    conditions.extend(parts);
    let autoscaled = chat.languages.iter().any(|l| matches!(l.scaling, Scaling::Builtin(_) | Scaling::Keda(_)));
    if autoscaled {
        conditions.push(match &scaling.keda {
            Some((languages, false)) => condition(
                AUTOSCALING_READY,
                false,
                "KedaNotInstalled",
                format!(
                    "languages [{}] use autoscaling mode keda, but the KEDA CRDs (scaledobjects.keda.sh) are not installed; their replicas are left as they are",
                    languages.join(", ")
                ),
                generation,
                now,
            ),
            _ => condition(AUTOSCALING_READY, true, "Scaling", scaling_message(chat), generation, now),
        });
    }
    if chat.monitoring.pod_monitor {
        conditions.push(metrics_condition(chat, pod_monitors, generation, now));
    }
    ChatDeploymentStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions: carry_transitions(conditions, previous),
        gateway: Some(GatewayStatus {
            replicas: gateway.replicas,
            ready_replicas: gateway.ready,
            endpoint: names.gateway_endpoint(),
        }),
        fanout: Some(RoleStatus { replicas: fanout.replicas, ready_replicas: fanout.ready }),
        languages: Some(
            translators
                .iter()
                .filter(|t| t.draining_since.is_none())
                .map(|t| t.language.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        backlog: translators.iter().map(|t| t.backlog).sum(),
        translators,
    }
}

/// Whether a PodMonitor has Prometheus scrape the chat's pods, and what to do where none can.
fn metrics_condition(chat: &ValidatedChat, served: &Served, generation: Option<i64>, now: &Time) -> Condition {
    let names = &chat.names;
    let otherwise = format!(
        "scrape port http, path /metrics, of the pods labelled {}={} another way",
        crate::names::DEPLOYMENT_LABEL,
        names.instance
    );
    match served {
        Served::Yes => {
            let message = format!(
                "PodMonitor {} applied, selecting /metrics of every pod of the chat (a Prometheus whose \
                 podMonitorSelector matches its labels scrapes them)",
                names.instance
            );
            condition(METRICS_SCRAPED, true, "PodMonitorApplied", message, generation, now)
        }
        Served::NotInstalled => {
            let message = format!(
                "the Prometheus Operator's CRD (podmonitors.monitoring.coreos.com) is not installed, so no PodMonitor \
                 was created: {otherwise}"
            );
            condition(METRICS_SCRAPED, false, "PrometheusOperatorNotInstalled", message, generation, now)
        }
        Served::Forbidden(why) => {
            let message = format!(
                "the operator may not list PodMonitors ({why}): grant it list, patch and delete on \
                 podmonitors.monitoring.coreos.com (the chart's RBAC does), or {otherwise}"
            );
            condition(METRICS_SCRAPED, false, "PodMonitorForbidden", message, generation, now)
        }
    }
}

/// The status of a ChatDeployment whose spec is invalid: nothing else is touched.
pub fn invalid(
    previous: Option<&ChatDeploymentStatus>,
    errors: &[SpecError],
    generation: Option<i64>,
    now: &Time,
) -> ChatDeploymentStatus {
    let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    not_ready(previous, Reason::InvalidSpec, message, generation, now)
}

/// The previous status with `Ready=False` for `reason` and the phase Degraded; the other conditions
/// stay as they were observed.
pub fn not_ready(
    previous: Option<&ChatDeploymentStatus>,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> ChatDeploymentStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let previous_conditions = std::mem::take(&mut status.conditions);
    let mut conditions: Vec<Condition> = previous_conditions.iter().filter(|c| c.type_ != READY).cloned().collect();
    conditions.insert(0, condition(READY, false, reason.as_str(), message, generation, now));
    status.conditions = carry_transitions(conditions, &previous_conditions);
    status.phase = Some(Phase::Degraded);
    status.observed_generation = generation;
    status
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use kube::api::ObjectMeta;

    use super::*;
    use crate::{fixtures::chat, reconcile::validate::validate};

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn deployment(name: &str, desired: i32, ready: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta { name: Some(name.into()), generation: Some(1), ..Default::default() },
            spec: Some(DeploymentSpec { replicas: Some(desired), ..Default::default() }),
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                replicas: Some(desired),
                ready_replicas: Some(ready),
                updated_replicas: Some(desired),
                ..Default::default()
            }),
        }
    }

    fn all_ready() -> Vec<Deployment> {
        vec![
            deployment("town-hall-gateway", 2, 2),
            deployment("town-hall-fanout", 2, 2),
            deployment("town-hall-translator-de", 1, 1),
        ]
    }

    /// One status computation: `town-hall` with `de`, everything ready, the broker answering, no
    /// previous status, at 2026-01-01T00:00:00Z; each method changes one of those.
    struct Case {
        generation: Option<i64>,
        deployments: Vec<Deployment>,
        broker: BrokerReport,
        history: Option<HistoryReport>,
        auth: Option<AuthReport>,
        pod_monitor_installed: bool,
        previous: Vec<Condition>,
        now: Time,
    }

    fn case() -> Case {
        Case {
            generation: Some(3),
            deployments: all_ready(),
            broker: BrokerReport::Ready { backlogs: [("de".to_owned(), 4)].into() },
            history: None,
            auth: None,
            pod_monitor_installed: false,
            previous: Vec::new(),
            now: time("2026-01-01T00:00:00Z"),
        }
    }

    impl Case {
        fn generation(self, generation: i64) -> Self {
            Self { generation: Some(generation), ..self }
        }

        fn deployment(mut self, index: usize, deployment: Deployment) -> Self {
            self.deployments[index] = deployment;
            self
        }

        fn no_deployments(self) -> Self {
            Self { deployments: Vec::new(), ..self }
        }

        fn broker(self, broker: BrokerReport) -> Self {
            Self { broker, ..self }
        }

        fn pod_monitor_installed(self) -> Self {
            Self { pod_monitor_installed: true, ..self }
        }

        fn history(self, history: HistoryReport) -> Self {
            Self { history: Some(history), ..self }
        }

        fn after(self, previous: &ChatDeploymentStatus, now: &str) -> Self {
            Self { previous: previous.conditions.clone(), now: time(now), ..self }
        }

        fn compute(&self) -> ChatDeploymentStatus {
            let valid = validate(&chat(&[("de", Some(1))]), "img").unwrap();
            let scaling = ScalingReport::default();
            let found = Findings {
                deployments: &self.deployments,
                broker: &self.broker,
                draining: &[],
                scaling: &scaling,
                history: self.history.as_ref(),
                auth: self.auth.as_ref(),
                pod_monitors: if self.pod_monitor_installed { &Served::Yes } else { &Served::NotInstalled },
            };
            compute(&valid, self.generation, found, &self.previous, &self.now)
        }
    }

    fn get<'a>(s: &'a ChatDeploymentStatus, kind: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == kind).unwrap()
    }

    #[test]
    fn a_deployment_whose_rollout_is_in_progress_is_not_ready_though_its_old_replicas_are() {
        // The Deployment controller has not seen the new template yet (observed 1 of generation 2).
        let mut behind = deployment("town-hall-gateway", 2, 2);
        behind.metadata.generation = Some(2);
        let s = case().deployment(0, behind).compute();
        assert_eq!(get(&s, GATEWAY_READY).status, "False");
        assert_eq!(get(&s, READY).status, "False");
        assert_ne!(s.phase, Some(Phase::Ready));
        // Or it has, and only some replicas run the new template yet.
        let mut rolling = deployment("town-hall-gateway", 2, 2);
        rolling.status.as_mut().unwrap().updated_replicas = Some(1);
        let s = case().deployment(0, rolling).compute();
        assert_eq!(get(&s, GATEWAY_READY).status, "False");
        assert_ne!(s.phase, Some(Phase::Ready));
    }

    #[test]
    fn all_deployments_ready_makes_the_chat_ready() {
        let s = case().compute();
        assert_eq!(s.phase, Some(Phase::Ready));
        for kind in [READY, BROKER_READY, GATEWAY_READY, TRANSLATORS_READY, FANOUT_READY] {
            assert_eq!(get(&s, kind).status, "True", "{kind}");
        }
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.translators[0].backlog, Some(4));
        assert_eq!(s.gateway.as_ref().unwrap().endpoint, "town-hall-gateway.events.svc:80");
    }

    #[test]
    fn metrics_scraping_is_reported_but_never_holds_the_chat_back() {
        let without = case().compute();
        let scraped = get(&without, METRICS_SCRAPED);
        assert_eq!((scraped.status.as_str(), scraped.reason.as_str()), ("False", "PrometheusOperatorNotInstalled"));
        assert!(scraped.message.contains("chat.parley.dev/deployment=town-hall"), "{}", scraped.message);
        assert_eq!(without.phase, Some(Phase::Ready), "Prometheus is not needed to chat");
        let with = case().pod_monitor_installed().compute();
        assert_eq!(get(&with, METRICS_SCRAPED).reason, "PodMonitorApplied");
        // An operator whose RBAC lacks PodMonitors says what to grant, and the chat still serves.
        let valid = validate(&chat(&[("de", Some(1))]), "img").unwrap();
        let (broker, scaling) = (case().broker, ScalingReport::default());
        let forbidden = Served::Forbidden("podmonitors is forbidden".into());
        let found = Findings {
            deployments: &all_ready(),
            broker: &broker,
            draining: &[],
            scaling: &scaling,
            history: None,
            auth: None,
            pod_monitors: &forbidden,
        };
        let s = compute(&valid, Some(1), found, &[], &time("2026-01-01T00:00:00Z"));
        let scraped = get(&s, METRICS_SCRAPED);
        assert_eq!(scraped.reason, "PodMonitorForbidden");
        assert!(scraped.message.contains("grant it list, patch and delete"), "{}", scraped.message);
        assert_eq!(s.phase, Some(Phase::Ready));
    }

    #[test]
    fn a_translator_not_ready_makes_the_chat_progressing() {
        let s = case().deployment(2, deployment("town-hall-translator-de", 1, 0)).compute();
        assert_eq!(s.phase, Some(Phase::Progressing));
        assert_eq!(get(&s, TRANSLATORS_READY).status, "False");
        assert!(get(&s, TRANSLATORS_READY).message.contains("de (0/1)"));
        assert_eq!(get(&s, READY).status, "False");
    }

    #[test]
    fn nothing_created_yet_is_pending() {
        let s = case().generation(1).no_deployments().compute();
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(get(&s, GATEWAY_READY).reason, "NotCreated");
    }

    #[test]
    fn kubectl_columns_show_every_language_and_the_whole_backlog() {
        let valid = validate(&chat(&[("es", Some(1)), ("ca", Some(1))]), "img").unwrap();
        let broker =
            BrokerReport::Ready { backlogs: [("es".to_owned(), 3), ("ca".to_owned(), 2), ("fr".to_owned(), 5)].into() };
        let draining = [Draining { language: "fr".into(), since: "2026-01-01T00:00:00Z".into() }];
        let scaling = ScalingReport::default();
        let found = Findings {
            deployments: &all_ready(),
            broker: &broker,
            draining: &draining,
            scaling: &scaling,
            history: None,
            auth: None,
            pod_monitors: &Served::NotInstalled,
        };
        let s = compute(&valid, Some(1), found, &[], &time("2026-01-01T00:00:00Z"));
        assert_eq!(s.languages.as_deref(), Some("es,ca"), "a draining language is no longer one of the chat's");
        assert_eq!(s.backlog, Some(10), "but what waits in its queue still counts");

        let unknown = BrokerReport::Failed { reason: "BrokerUnreachable".into(), message: "refused".into() };
        let found = Findings { broker: &unknown, ..found };
        assert_eq!(compute(&valid, Some(1), found, &[], &time("2026-01-01T00:00:00Z")).backlog, None);
    }

    #[test]
    fn a_broker_failure_degrades_the_chat_with_its_reason() {
        let broker = BrokerReport::Failed { reason: "BrokerUnreachable".into(), message: "connection refused".into() };
        let s = case().generation(1).broker(broker).compute();
        assert_eq!(s.phase, Some(Phase::Degraded));
        let c = get(&s, BROKER_READY);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "BrokerUnreachable"));
        assert_eq!(s.translators[0].backlog, None);
    }

    #[test]
    fn an_unreachable_history_database_degrades_the_chat() {
        let s = case().compute();
        assert!(s.conditions.iter().all(|c| c.type_ != HISTORY_READY), "no history, no condition");
        let s = case().history(HistoryReport::Ready).compute();
        assert_eq!((get(&s, HISTORY_READY).status.as_str(), s.phase), ("True", Some(Phase::Ready)));
        let failed = HistoryReport::Failed { reason: "DatabaseUnreachable".into(), message: "refused".into() };
        let s = case().history(failed).compute();
        let c = get(&s, HISTORY_READY);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "DatabaseUnreachable"));
        assert_eq!((get(&s, READY).status.as_str(), s.phase), ("False", Some(Phase::Degraded)));
    }

    fn jwt_chat() -> ValidatedChat {
        let mut c = chat(&[("de", Some(1))]);
        c.spec.auth = Some(crate::crd::AuthSpec {
            mode: crate::crd::AuthMode::Jwt,
            jwt_secret_ref: Some(crate::crd::SecretKeyRef { name: "parley-jwt".into(), key: "secret".into() }),
            ..Default::default()
        });
        validate(&c, "img").unwrap()
    }

    #[test]
    fn a_jwt_secret_that_is_missing_or_too_short_degrades_the_chat_with_its_reason() {
        let open = validate(&chat(&[("de", Some(1))]), "img").unwrap();
        assert_eq!(AuthReport::new(&open, None), None, "nothing to report without mode jwt");
        let s = case().compute();
        assert!(s.conditions.iter().all(|c| c.type_ != AUTH_READY));

        let chat = jwt_chat();
        let missing = AuthReport::new(&chat, Some(&Err(SecretError::NotFound("parley-jwt".into())))).unwrap();
        let s = Case { auth: Some(missing.clone()), ..case() }.compute();
        let c = get(&s, AUTH_READY);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "JwtSecretNotFound"));
        assert_eq!(c.message, "auth.jwtSecretRef: Secret parley-jwt not found");
        assert_eq!((get(&s, READY).status.as_str(), s.phase), ("False", Some(Phase::Degraded)));
        assert_eq!(missing.note(None).map(|n| n.reason), Some(Reason::JwtSecretNotFound));
        assert!(missing.note(Some(&s)).is_none(), "said once, not on every reconcile");

        let key = SecretError::KeyMissing { secret: "parley-jwt".into(), key: "secret".into() };
        let report = AuthReport::new(&chat, Some(&Err(key))).unwrap();
        assert!(matches!(report, AuthReport::Failed { reason: Reason::JwtSecretKeyMissing, .. }), "{report:?}");
        assert!(report.note(Some(&s)).is_some(), "another failure is news");
        let short = AuthReport::new(&chat, Some(&Ok(b"too short".to_vec()))).unwrap();
        assert!(
            matches!(&short, AuthReport::Failed { reason: Reason::JwtSecretTooShort, message } if message.contains("9 bytes"))
        );

        let found = AuthReport::new(&chat, Some(&Ok(vec![7; MIN_JWT_SECRET_BYTES]))).unwrap();
        let s = Case { auth: Some(found), ..case() }.compute();
        assert_eq!(get(&s, AUTH_READY).status, "True");
        assert_eq!(s.phase, Some(Phase::Ready));
    }

    #[test]
    fn transition_time_changes_only_when_a_condition_flips() {
        let first = case().generation(1).compute();
        let same = case().generation(1).after(&first, "2026-01-01T01:00:00Z").compute();
        assert_eq!(get(&same, READY).last_transition_time, time("2026-01-01T00:00:00Z"));
        let flipped = case()
            .generation(1)
            .deployment(0, deployment("town-hall-gateway", 2, 1))
            .after(&same, "2026-01-01T02:00:00Z")
            .compute();
        assert_eq!(get(&flipped, GATEWAY_READY).last_transition_time, time("2026-01-01T02:00:00Z"));
        assert_eq!(get(&flipped, BROKER_READY).last_transition_time, time("2026-01-01T00:00:00Z"));
    }

    #[test]
    fn a_removed_language_drains_from_when_it_was_first_seen_gone() {
        let previous = ChatDeploymentStatus {
            translators: vec![
                TranslatorStatus { language: "de".into(), ..Default::default() },
                TranslatorStatus { language: "fr".into(), ..Default::default() },
                TranslatorStatus { language: "it".into(), draining_since: Some("T0".into()), ..Default::default() },
            ],
            ..Default::default()
        };
        let d = draining(Some(&previous), &["de".to_owned()], "T1");
        assert_eq!(
            d,
            vec![
                Draining { language: "fr".into(), since: "T1".into() },
                Draining { language: "it".into(), since: "T0".into() }
            ]
        );
        assert!(draining(Some(&previous), &["de".into(), "fr".into(), "it".into()], "T1").is_empty(), "re-added");
    }

    #[test]
    fn an_invalid_spec_sets_ready_false_and_keeps_other_conditions() {
        let before = case().generation(1).compute();
        let s = invalid(
            Some(&before),
            &[SpecError::DuplicateLanguage("de".into())],
            Some(2),
            &time("2026-01-01T01:00:00Z"),
        );
        let ready = get(&s, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
        assert!(ready.message.contains("more than once"));
        assert_eq!(get(&s, BROKER_READY).status, "True");
        assert_eq!(s.phase, Some(Phase::Degraded));
    }
}
