//! The controller: finalizer wrapper → validate → build → apply → prune → broker → status.

use std::{collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{finalizer, Event as Finalizer},
    },
    Api, Client, Resource, ResourceExt,
};
use parley_topology::Topology;
use sha2::{Digest, Sha256};

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::ListParams;

use crate::{
    apply,
    autoscale::{self, History},
    broker,
    build::{build, Inputs},
    crd::{ChatDeployment, SecretKeyRef},
    keda::ScaledObject,
    metrics::{LanguageLabels, Metrics},
    names::{FIELD_MANAGER, FINALIZER, PAUSED_ANNOTATION},
    status::{self, BrokerReport, ScalingReport},
    validate::{validate, Scaling, ValidatedChat},
};

/// Requeue interval of a healthy ChatDeployment, to refresh backlogs.
const RESYNC: Duration = Duration::from_secs(60);
/// Requeue interval while something is still converging.
const CONVERGING: Duration = Duration::from_secs(10);
/// After this long in deletion, an unreachable broker no longer blocks removing the finalizer.
const CLEANUP_GRACE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Not an error: a step waits for the cluster and asks to be retried.
    #[error("waiting: {0}")]
    Waiting(String),
}

impl Error {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> String {
        match self {
            Self::Kube(_) => "kube".into(),
            Self::Broker(err) => err.reason().into(),
            Self::Finalizer(_) => "finalizer".into(),
            Self::Waiting(_) => "waiting".into(),
        }
    }
}

/// Settings of the operator process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub default_image: String,
    /// How often languages with builtin autoscaling have their backlog polled.
    pub autoscale_interval: Duration,
}

impl Settings {
    pub fn new(default_image: impl Into<String>) -> Self {
        Self { default_image: default_image.into(), autoscale_interval: Duration::from_secs(10) }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    failures: Mutex<HashMap<String, u32>>,
    /// Recent autoscaling recommendations by ChatDeployment and language (lost on restart, which only delays scale-down).
    histories: Mutex<HashMap<(String, String), History>>,
}

impl Context {
    pub fn new(client: Client, reporter: Reporter, metrics: Arc<Metrics>, settings: Settings) -> Self {
        Self { client, reporter, metrics, settings, failures: Mutex::default(), histories: Mutex::default() }
    }

    async fn publish(&self, chat: &ChatDeployment, type_: EventType, reason: &str, note: String) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(err) = recorder.publish(&event, &chat.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "failed to publish an Event");
        }
    }
}

fn key(chat: &ChatDeployment) -> String {
    format!("{}/{}", chat.namespace().unwrap_or_default(), chat.name_any())
}

fn paused(chat: &ChatDeployment) -> bool {
    chat.annotations().get(PAUSED_ANNOTATION).is_some_and(|v| v == "true")
}

/// Reconciles one ChatDeployment.
pub async fn reconcile(chat: Arc<ChatDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let mut timer = ctx.metrics.timer();
    // Paused stops changes, but never deletion.
    if paused(&chat) && chat.meta().deletion_timestamp.is_none() {
        tracing::info!(chat = key(&chat), "paused; leaving it as it is");
        timer.succeeded();
        return Ok(Action::await_change());
    }
    let namespace = chat.namespace().unwrap_or_default();
    let api: Api<ChatDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, FINALIZER, chat, |event| async {
        match event {
            Finalizer::Apply(chat) => apply_chat(&chat, &ctx).await,
            Finalizer::Cleanup(chat) => cleanup(&chat, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        kube::runtime::finalizer::Error::ApplyFailed(err) | kube::runtime::finalizer::Error::CleanupFailed(err) => err,
        other => Error::Finalizer(Box::new(other)),
    })?;
    timer.succeeded();
    Ok(action)
}

/// Requeues with exponential backoff per object: 2s, 4s, … up to 5 minutes.
pub fn error_policy(chat: Arc<ChatDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(&error.metric_label());
    let mut failures = ctx.failures.lock().expect("failures lock");
    let count = failures.entry(key(&chat)).or_insert(0);
    *count = (*count + 1).min(8);
    let delay = Duration::from_secs(2u64.pow(*count)).min(Duration::from_secs(300));
    tracing::warn!(chat = key(&chat), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// A Secret key's value; `Ok(Err(..))` when the Secret or key does not exist, `Err` when the API could not be asked
/// (then nothing is built: hashing a transient failure into the pod template would roll every pod twice).
async fn secret_value(
    client: &Client,
    namespace: &str,
    reference: &SecretKeyRef,
) -> Result<Result<Vec<u8>, broker::BrokerError>, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = secrets.get_opt(&reference.name).await? else {
        return Ok(Err(broker::BrokerError::SecretNotFound(reference.name.clone())));
    };
    Ok(secret.data.and_then(|mut data| data.remove(&reference.key)).map(|bytes| bytes.0).ok_or_else(|| {
        broker::BrokerError::SecretKeyMissing { secret: reference.name.clone(), key: reference.key.clone() }
    }))
}

fn digest<'a>(parts: impl Iterator<Item = &'a Result<Vec<u8>, broker::BrokerError>>) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        match part {
            Ok(bytes) => hasher.update(bytes),
            Err(err) => hasher.update(err.reason().as_bytes()),
        }
        hasher.update([0]);
    }
    hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn elapsed_since(since: &str) -> Duration {
    since.parse::<Timestamp>().ok().and_then(|t| Timestamp::now().duration_since(t).try_into().ok()).unwrap_or_default()
}

async fn patch_status(
    ctx: &Context,
    chat: &ChatDeployment,
    status: crate::crd::ChatDeploymentStatus,
) -> Result<(), Error> {
    let api: Api<ChatDeployment> = Api::namespaced(ctx.client.clone(), &chat.namespace().unwrap_or_default());
    let patch = serde_json::json!({"status": status});
    api.patch_status(&chat.name_any(), &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Whether the KEDA CRDs are installed in the cluster, asked only when a language needs them.
async fn keda_installed(client: &Client, namespace: &str) -> Result<bool, kube::Error> {
    let api: Api<ScaledObject> = Api::namespaced(client.clone(), namespace);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(err) => Err(err),
    }
}

/// The builtin autoscaler's decisions for this reconcile; returns the report and the Events to publish.
fn autoscale(
    ctx: &Context,
    chat: &ChatDeployment,
    valid: &ValidatedChat,
    current: &BTreeMap<String, i32>,
    backlogs: Option<&BTreeMap<String, i64>>,
    now: &Time,
) -> (ScalingReport, Vec<String>) {
    let mut report = ScalingReport::default();
    let mut events = Vec::new();
    let previous = |language: &str| {
        chat.status
            .as_ref()
            .and_then(|s| s.translators.iter().find(|t| t.language == language))
            .and_then(|t| t.last_scale_time.clone())
    };
    let mut histories = ctx.histories.lock().expect("histories lock");
    for language in &valid.languages {
        let Scaling::Builtin(bounds) = language.scaling else {
            continue;
        };
        let labels = LanguageLabels {
            namespace: valid.names.namespace.clone(),
            chat: valid.names.instance.clone(),
            language: language.code.clone(),
        };
        let existing = current.get(&language.code).copied();
        let now_replicas = existing.unwrap_or(bounds.min);
        let desired = match backlogs.and_then(|b| b.get(&language.code)) {
            // Without a backlog reading (broker down), nothing changes.
            None => now_replicas.clamp(bounds.min, bounds.max),
            Some(backlog) => {
                ctx.metrics.backlog.get_or_create(&labels).set(*backlog);
                let history = histories
                    .entry((key(chat), language.code.clone()))
                    .or_insert_with(|| History::starting_at(now.0, now_replicas));
                autoscale::decide(now_replicas, *backlog, &bounds, history, now.0)
            }
        };
        ctx.metrics.desired_replicas.get_or_create(&labels).set(i64::from(desired));
        report.desired.insert(language.code.clone(), desired);
        match existing {
            Some(from) if from != desired => {
                report.last_scale.insert(language.code.clone(), now.0.to_string());
                let backlog = backlogs.and_then(|b| b.get(&language.code)).copied().unwrap_or_default();
                events.push(format!(
                    "scaled translator {} from {from} to {desired} replicas (backlog {backlog}, target {} per replica)",
                    language.code, bounds.target_backlog
                ));
            }
            _ => {
                if let Some(at) = previous(&language.code) {
                    report.last_scale.insert(language.code.clone(), at);
                }
            }
        }
    }
    (report, events)
}

async fn apply_chat(chat: &ChatDeployment, ctx: &Context) -> Result<Action, Error> {
    let namespace = chat.namespace().unwrap_or_default();
    let now = now();
    let valid = match validate(chat, &ctx.settings.default_image) {
        Ok(valid) => valid,
        Err(errors) => {
            let status = status::invalid(chat.status.as_ref(), &errors, chat.meta().generation, &now);
            let flipped = chat.status.as_ref().map(|s| &s.conditions) != Some(&status.conditions);
            patch_status(ctx, chat, status).await?;
            if flipped {
                let note = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                ctx.publish(chat, EventType::Warning, "InvalidSpec", note).await;
            }
            ctx.metrics.error("InvalidSpec");
            // A bad spec will not fix itself: wait for the next edit instead of retrying.
            return Ok(Action::await_change());
        }
    };

    let broker_url = secret_value(&ctx.client, &namespace, &valid.broker).await?;
    let api_key = match &valid.api_key {
        Some(reference) => Some(secret_value(&ctx.client, &namespace, reference).await?),
        None => None,
    };
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let current: BTreeMap<String, i32> = deployments
        .list(&ListParams::default().labels(&valid.names.owned_selector()))
        .await?
        .items
        .into_iter()
        .filter_map(|d| {
            let language = d.labels().get(crate::names::LANGUAGE_LABEL).cloned()?;
            Some((language, d.spec.and_then(|s| s.replicas)?))
        })
        .collect();

    // The broker first: its backlogs drive the autoscaler and decide which removed languages still drain.
    let draining = status::draining(chat.status.as_ref(), &valid.language_codes(), &now.0.to_string());
    let topology = Topology::new(valid.topology_prefix.as_str()).map_err(broker::BrokerError::from)?;
    let synced = match &broker_url {
        Ok(url) => {
            let url = String::from_utf8_lossy(url).trim().to_owned();
            let drain_timeout = Duration::from_secs(valid.drain_timeout_seconds.max(0) as u64);
            broker::sync(&url, &topology, &valid.language_codes(), draining.clone(), drain_timeout, elapsed_since).await
        }
        Err(err) => Err(err.clone()),
    };
    let (report, still_draining, failure, deleted) = match synced {
        Ok(outcome) => (BrokerReport::Ready { backlogs: outcome.backlogs }, outcome.draining, None, outcome.deleted),
        // Without the broker nothing is known to have drained: keep every draining Deployment.
        Err(err) => (err.report(), draining, Some(err), Vec::new()),
    };
    let backlogs = match &report {
        BrokerReport::Ready { backlogs } => Some(backlogs),
        BrokerReport::Failed { .. } => None,
    };
    let (mut scaling, scaled_events) = autoscale(ctx, chat, &valid, &current, backlogs, &now);
    let keda_languages: Vec<String> =
        valid.languages.iter().filter(|l| matches!(l.scaling, Scaling::Keda(_))).map(|l| l.code.clone()).collect();
    let keda = if keda_languages.is_empty() { false } else { keda_installed(&ctx.client, &namespace).await? };
    if !keda_languages.is_empty() {
        scaling.keda = Some((keda_languages, keda));
    }

    let owner = chat.controller_owner_ref(&()).expect("a stored ChatDeployment has a uid");
    let mut inputs = Inputs::new(owner, digest(std::iter::once(&broker_url).chain(api_key.as_ref())));
    inputs.scaled = scaling.desired.clone();
    inputs.keda_installed = keda;
    // A removed language keeps translating its accepted messages until its queue is drained.
    inputs.draining = still_draining
        .iter()
        .map(|d| (d.language.clone(), current.get(&d.language).copied().unwrap_or(1).max(1)))
        .collect();
    let desired = build(&valid, &inputs);
    let applied = apply::apply(&ctx.client, &namespace, &desired).await?;
    for pruned in apply::prune(&ctx.client, &valid.names, &desired, keda).await? {
        ctx.publish(chat, EventType::Normal, "Pruned", format!("deleted {pruned}, no longer in the spec")).await;
    }
    for note in scaled_events {
        ctx.publish(chat, EventType::Normal, "TranslatorScaled", note).await;
    }
    for (language, lost) in &deleted {
        let (kind, note) = if *lost == 0 {
            (EventType::Normal, format!("deleted the drained queue of removed language {language}"))
        } else {
            (EventType::Warning, format!("deleted the queue of removed language {language} after the drain timeout with {lost} messages untranslated"))
        };
        ctx.publish(chat, kind, "LanguageQueueDeleted", note).await;
    }
    if let Some(err) = &failure {
        ctx.publish(chat, EventType::Warning, err.reason(), err.to_string()).await;
    }

    let status = status::compute(
        &valid,
        chat.meta().generation,
        &applied,
        &report,
        &still_draining,
        &scaling,
        chat.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default(),
        &now,
    );
    let ready = status.phase == Some(crate::crd::Phase::Ready);
    patch_status(ctx, chat, status).await?;
    if let Some(err) = failure {
        // Everything else is applied; the broker is retried with backoff.
        return Err(err.into());
    }
    ctx.failures.lock().expect("failures lock").remove(&key(chat));
    let autoscaling = valid.languages.iter().any(|l| matches!(l.scaling, Scaling::Builtin(_)));
    let next = if autoscaling {
        ctx.settings.autoscale_interval
    } else if ready && still_draining.is_empty() {
        RESYNC
    } else {
        CONVERGING
    };
    Ok(Action::requeue(next))
}

async fn cleanup(chat: &ChatDeployment, ctx: &Context) -> Result<Action, Error> {
    let namespace = chat.namespace().unwrap_or_default();
    let mut languages: Vec<String> = chat.spec.languages.iter().map(|l| l.code.clone()).collect();
    languages.extend(chat.status.iter().flat_map(|s| s.translators.iter().map(|t| t.language.clone())));
    languages.sort();
    languages.dedup();
    languages.retain(|l| parley_topology::validate_language(l).is_ok());
    let Ok(topology) = Topology::for_chat_deployment(&namespace, &chat.name_any()) else {
        // No valid prefix means nothing was ever declared: never hold deletion for it.
        return Ok(Action::await_change());
    };
    // Running pods declare the topology again when they reconnect: remove them first.
    let names = crate::names::Names::new(&chat.name_any(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let owned = deployments.list(&ListParams::default().labels(&names.owned_selector())).await?;
    if !owned.items.is_empty() {
        for deployment in owned.items {
            deployments.delete(&deployment.name_any(), &kube::api::DeleteParams::background()).await?;
        }
        return Err(Error::Waiting(format!("deleting the Deployments of {} before its topology", key(chat))));
    }
    let removed = match secret_value(&ctx.client, &namespace, &chat.spec.broker.secret_ref).await? {
        Ok(url) => broker::remove(String::from_utf8_lossy(&url).trim(), &topology, &languages).await,
        Err(err) => Err(err),
    };
    match removed {
        Ok(()) => {
            ctx.publish(
                chat,
                EventType::Normal,
                "TopologyRemoved",
                format!("deleted {}.* from the broker", topology.prefix()),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(err) => {
            let deleting_for =
                chat.meta().deletion_timestamp.as_ref().map(|t| elapsed_since(&t.0.to_string())).unwrap_or_default();
            let secret_gone =
                matches!(err, broker::BrokerError::SecretNotFound(_) | broker::BrokerError::SecretKeyMissing { .. });
            if secret_gone || deleting_for >= CLEANUP_GRACE {
                // Never block deletion forever: say what was left behind instead.
                let note = format!("left {}.* on the broker: {err}", topology.prefix());
                ctx.publish(chat, EventType::Warning, "TopologyLeftBehind", note).await;
                Ok(Action::await_change())
            } else {
                ctx.publish(chat, EventType::Warning, err.reason(), err.to_string()).await;
                Err(err.into())
            }
        }
    }
}
