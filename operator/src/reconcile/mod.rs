//! The reconcile pipeline of one ChatDeployment, one module per step, in the order they run:
//!
//! 1. [`validate`] (pure): the spec → a [`ValidatedChat`](validate::ValidatedChat) with defaults resolved;
//! 2. [`observe`]: the referenced Secrets, the owned Deployments' replicas, whether KEDA and the
//!    Prometheus Operator are installed;
//! 3. [`broker`]: declare the topology, read the backlogs, drain removed languages; [`database`]:
//!    whether the history database answers;
//! 4. [`autoscale`] (pure): replicas of the languages the builtin autoscaler scales;
//! 5. [`build`] (pure): every object the ChatDeployment should own;
//! 6. [`apply`]: server-side apply, then prune what is owned but no longer wanted;
//! 7. [`status`] (pure): conditions, phase and per-role status from what the steps found.
//!
//! [`cleanup`] is the finalizer's pipeline: stop the pods, then delete the broker topology.

pub mod apply;
pub mod autoscale;
pub mod broker;
pub mod build;
pub mod database;
pub mod observe;
pub mod poll;
pub mod status;
pub mod validate;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, Recorder, Reporter},
        reflector::ObjectRef,
    },
    Api, Client, Resource, ResourceExt,
};
use parley_contract::topology::Topology;

use crate::{
    crd::{ChatDeployment, ChatDeploymentStatus, Phase},
    events::{Note, Reason},
    metrics::{ChatLabels, LanguageLabels, Metrics},
    names::{Names, DECLARED_ANNOTATION, FIELD_MANAGER},
};
use autoscale::History;
use broker::BrokerError;
use build::{build, Inputs};
use status::Findings;
use validate::{validate, SpecError};

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
    Broker(#[from] BrokerError),
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
            Self::Broker(err) => err.reason().as_str().into(),
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
    /// The key of the checksum of referenced Secrets on pod templates (see [`run::checksum_key`](crate::run::checksum_key)).
    pub checksum_key: Vec<u8>,
    /// Whether the controllers watch Secrets (by metadata), so that a changed credential rolls its
    /// pods at once; without the watch (and the RBAC it needs), at the next resync.
    pub watch_secrets: bool,
}

impl Settings {
    pub fn new(default_image: impl Into<String>) -> Self {
        Self {
            default_image: default_image.into(),
            autoscale_interval: Duration::from_secs(10),
            checksum_key: Vec::new(),
            watch_secrets: false,
        }
    }
}

/// Where the reconciles read the time: the wall clock, or a test's.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Consecutive failures by ChatDeployment, for the error backoff.
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    /// Recent autoscaling recommendations by ChatDeployment and language (lost on restart, which only delays scale-down).
    histories: Mutex<HashMap<String, BTreeMap<String, History>>>,
    pub clock: Arc<dyn Clock>,
    /// Whether the KEDA CRDs are installed, found out by the first reconcile that can ask.
    keda: tokio::sync::OnceCell<bool>,
    /// One recorder for every Event, so one repeated by retries becomes a series with a count.
    recorder: Recorder,
    /// The open broker connections, one per broker.
    pub brokers: broker::Brokers,
    /// What was last applied, so that an unchanged object is not applied again.
    pub applied: apply::Applied,
    /// The broker URI (and CA bundle) each chat last reconciled with, by `namespace/name`: deleting a
    /// namespace deletes the broker Secret too, often before the finalizer runs, and the topology must
    /// still go.
    broker_addresses: Mutex<HashMap<String, broker::BrokerAddress>>,
    /// The chats whose backlogs are polled apart from reconciles (builtin autoscaling).
    pub polling: poll::Polling,
}

impl Context {
    pub fn new(client: Client, reporter: Reporter, metrics: Arc<Metrics>, settings: Settings) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            client,
            reporter,
            metrics,
            settings,
            failures: Mutex::default(),
            histories: Mutex::default(),
            clock: Arc::new(SystemClock),
            keda: tokio::sync::OnceCell::new(),
            brokers: broker::Brokers::default(),
            applied: apply::Applied::default(),
            broker_addresses: Mutex::default(),
            polling: poll::Polling::default(),
        }
    }

    /// The same context reading the time from `clock`.
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        Self { clock, ..self }
    }

    /// Drops what this process kept about `chat` once its finalizer lets go: the backoff count, the
    /// autoscaling history and the metric series of its `languages`.
    fn forget(&self, chat: &ChatDeployment, languages: &[String]) {
        let key = key(chat);
        self.failures.lock().expect("failures lock").remove(&key);
        let histories = self.histories.lock().expect("histories lock").remove(&key);
        let mut languages = languages.to_vec();
        languages.extend(histories.into_iter().flat_map(|h| h.into_keys()));
        self.metrics.forget(&chat.namespace().unwrap_or_default(), &chat.name_any(), &languages);
        self.applied.forget(&chat.namespace().unwrap_or_default(), &chat.name_any());
        self.broker_addresses.lock().expect("broker addresses lock").remove(&key);
        self.polling.set(key, None);
    }

    async fn publish(&self, chat: &ChatDeployment, note: Note) {
        let event = Event {
            type_: note.kind,
            reason: note.reason.as_str().into(),
            note: Some(note.text),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &chat.object_ref(&())).await {
            tracing::warn!(error = %err, reason = %note.reason, "failed to publish an Event");
        }
    }
}

/// `namespace/name` of a ChatDeployment, for logs and per-object state.
pub fn key(chat: &ChatDeployment) -> String {
    format!("{}/{}", chat.namespace().unwrap_or_default(), chat.name_any())
}

fn elapsed_since(since: &str, now: Timestamp) -> Duration {
    since.parse::<Timestamp>().ok().and_then(|t| now.duration_since(t).try_into().ok()).unwrap_or_default()
}

/// Writes `status`, unless it is what the object already says: a reconcile that finds nothing new
/// writes nothing.
async fn patch_status(ctx: &Context, chat: &ChatDeployment, status: ChatDeploymentStatus) -> Result<(), Error> {
    if chat.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ChatDeployment> = Api::namespaced(ctx.client.clone(), &chat.namespace().unwrap_or_default());
    let patch = serde_json::json!({"status": status});
    api.patch_status(&chat.name_any(), &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Brings the cluster and the broker to what `chat` asks for, then writes its status: the steps in order.
pub async fn run(chat: &ChatDeployment, ctx: &Context) -> Result<Action, Error> {
    let now = Time(ctx.clock.now());
    let valid = match validate(chat, &ctx.settings.default_image) {
        Ok(valid) => valid,
        Err(errors) => return reject(chat, ctx, &errors, &now).await,
    };
    let observed = match observe::observe(&ctx.client, &valid, &ctx.keda).await {
        Ok(observed) => observed,
        Err(err) => return Err(read_failed(chat, ctx, err, &now).await),
    };
    let address = observed
        .broker_url()
        .ok()
        .map(|url| broker::BrokerAddress::new(url, observed.broker_ca().and_then(Result::ok)));
    if let Some(address) = &address {
        ctx.broker_addresses.lock().expect("broker addresses lock").insert(key(chat), address.clone());
    }
    // What may be on the broker is recorded before anything more is declared.
    let recorded = declared(chat);
    let mut declaring: Vec<String> = recorded.iter().chain(&valid.language_codes()).cloned().collect();
    declaring.sort();
    declaring.dedup();
    if declaring != recorded {
        record_declared(ctx, chat, &declaring).await?;
    }
    // The broker first: its backlogs drive the autoscaler and decide which removed languages still drain.
    let mut draining = status::draining(chat.status.as_ref(), &valid.language_codes(), &now.0.to_string());
    // Declared once but in neither the spec nor the status (a status write that failed): drained too.
    for language in &recorded {
        if !valid.language_codes().contains(language) && !draining.iter().any(|d| &d.language == language) {
            draining.push(status::Draining { language: language.clone(), since: now.0.to_string() });
        }
    }
    let broker = broker::step(&ctx.brokers, &observed, &valid, draining, |since| elapsed_since(since, now.0)).await;
    let history = database::step(&observed).await;
    let auth = status::AuthReport::new(&valid, observed.jwt_secret.as_ref());
    if !broker.deleted.is_empty() {
        let left: Vec<String> =
            declaring.iter().filter(|l| !broker.deleted.iter().any(|(gone, _)| gone == *l)).cloned().collect();
        record_declared(ctx, chat, &left).await?;
    }
    let plan = {
        let mut histories = ctx.histories.lock().expect("histories lock");
        let histories = histories.entry(key(chat)).or_default();
        let current = &observed.translator_replicas;
        autoscale::plan(
            &valid.languages,
            current,
            broker.loads.as_ref(),
            histories,
            chat.status.as_ref(),
            observed.keda_installed,
            now.0,
        )
    };
    record_scaling(&ctx.metrics, &valid.names, &plan);

    let owner = chat.controller_owner_ref(&()).expect("a stored ChatDeployment has a uid");
    let mut inputs = Inputs::new(owner, observed.secrets_digest(&ctx.settings.checksum_key));
    inputs.scaled = plan.report.desired.clone();
    inputs.keda_installed = observed.keda_installed;
    inputs.pod_monitor_installed = observed.pod_monitors.yes();
    inputs.broker_port =
        observed.broker_url().ok().and_then(|url| Some(url.parse::<lapin::uri::AMQPUri>().ok()?.authority.port));
    inputs.history_port =
        observed.history_url().and_then(Result::ok).and_then(|url| url::Url::parse(&url).ok()?.port());
    // A removed language keeps translating its accepted messages until its queue is drained; with none
    // ready, its translators go to zero, handing back any they hold, before the queue is deleted.
    inputs.draining = broker
        .draining
        .iter()
        .map(|d| {
            let replicas = if broker.idle.contains(&d.language) {
                0
            } else {
                observed.translator_replicas.get(&d.language).copied().unwrap_or(1).max(1)
            };
            (d.language.clone(), replicas)
        })
        .collect();
    let desired = build(&valid, &inputs);
    let applied = match apply::apply(&ctx.client, &valid.names, &ctx.applied, &desired).await {
        Ok(applied) => applied,
        Err(err) => return Err(apply_failed(chat, ctx, err, &now).await),
    };
    let installed = apply::Installed { keda: observed.keda_installed, pod_monitor: observed.pod_monitors.yes() };
    let pruned = apply::prune(&ctx.client, &valid.names, &desired, installed).await?;

    let notes = pruned
        .iter()
        .map(|pruned| Note::normal(Reason::Pruned, format!("deleted {pruned}, no longer in the spec")))
        .chain(plan.changes.iter().map(autoscale::Change::note))
        .chain(broker.notes())
        .chain(history.note(chat.status.as_ref()))
        .chain(auth.as_ref().and_then(|a| a.note(chat.status.as_ref())));
    for note in notes.collect::<Vec<_>>() {
        ctx.publish(chat, note).await;
    }

    let history_report = history.report();
    let found = Findings {
        deployments: &applied,
        broker: &broker.report,
        draining: &broker.draining,
        scaling: &plan.report,
        history: history_report.as_ref(),
        auth: auth.as_ref(),
        pod_monitors: &observed.pod_monitors,
    };
    let previous = chat.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let status = status::compute(&valid, chat.meta().generation, found, previous, &now);
    let ready = status.phase == Some(Phase::Ready);
    let gateway_ready = status.gateway.as_ref().map_or(0, |g| g.ready_replicas);
    let labels = ChatLabels { namespace: valid.names.namespace.clone(), chat: valid.names.instance.clone() };
    ctx.metrics.gateway_ready.get_or_create(&labels).set(i64::from(gateway_ready));
    patch_status(ctx, chat, status).await?;
    if let Some(err) = broker.failure {
        // Everything else is applied; the broker is retried with backoff.
        return Err(err.into());
    }
    ctx.failures.lock().expect("failures lock").remove(&key(chat));
    // Backlogs are polled apart from reconciles (`poll`), which bring a chat back when its replicas
    // should change.
    let polled = address.and_then(|a| poll::Polled::new(ObjectRef::from_obj(chat), &valid, a, &plan.report.desired));
    ctx.polling.set(key(chat), polled);
    let next = if ready && broker.draining.is_empty() { RESYNC } else { CONVERGING };
    Ok(Action::requeue(jittered(next)))
}

/// The languages [`DECLARED_ANNOTATION`] records, sorted.
fn declared(chat: &ChatDeployment) -> Vec<String> {
    let mut languages: Vec<String> = chat
        .annotations()
        .get(DECLARED_ANNOTATION)
        .map(|list| list.split(',').filter(|l| parley_contract::topology::validate_language(l).is_ok()))
        .into_iter()
        .flatten()
        .map(str::to_owned)
        .collect();
    languages.sort();
    languages.dedup();
    languages
}

/// Records `languages` as those whose queues may exist on the broker.
async fn record_declared(ctx: &Context, chat: &ChatDeployment, languages: &[String]) -> Result<(), Error> {
    let api: Api<ChatDeployment> = Api::namespaced(ctx.client.clone(), &chat.namespace().unwrap_or_default());
    let patch = serde_json::json!({"metadata": {"annotations": {DECLARED_ANNOTATION: languages.join(",")}}});
    api.patch(&chat.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// `interval` give or take a tenth, in whole milliseconds: chats created together would otherwise
/// reconcile, and ask their broker, in lockstep.
fn jittered(interval: Duration) -> Duration {
    use std::hash::BuildHasher;
    let spread = u64::try_from(interval.as_millis() / 10).unwrap_or(u64::MAX);
    if spread == 0 {
        return interval;
    }
    let random = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
    interval - Duration::from_millis(spread) + Duration::from_millis(random % (2 * spread + 1))
}

/// A spec that cannot be reconciled: `Ready=False` with the errors, one Event when that is new, and
/// no retry until the next edit (a bad spec does not fix itself).
async fn reject(chat: &ChatDeployment, ctx: &Context, errors: &[SpecError], now: &Time) -> Result<Action, Error> {
    let status = status::invalid(chat.status.as_ref(), errors, chat.meta().generation, now);
    let text = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    write_not_ready(chat, ctx, status, Note::warning(Reason::InvalidSpec, text)).await?;
    ctx.metrics.error(Reason::InvalidSpec.as_str());
    Ok(Action::await_change())
}

/// Writes a `Ready=False` status, then publishes `note` if that changed a condition (a retry that
/// finds the same failure says nothing new).
async fn write_not_ready(
    chat: &ChatDeployment,
    ctx: &Context,
    status: ChatDeploymentStatus,
    note: Note,
) -> Result<(), Error> {
    let flipped = chat.status.as_ref().map(|s| &s.conditions) != Some(&status.conditions);
    patch_status(ctx, chat, status).await?;
    if flipped {
        ctx.publish(chat, note).await;
    }
    Ok(())
}

/// An object the API server refused: `Ready=False` with its error (and an Event when that is news),
/// so an old `Ready=True` never stands while the reconcile backs off.
async fn apply_failed(chat: &ChatDeployment, ctx: &Context, err: kube::Error, now: &Time) -> Error {
    let message = format!("applying the chat's objects failed: {err}");
    let status =
        status::not_ready(chat.status.as_ref(), Reason::ApplyFailed, message.clone(), chat.meta().generation, now);
    if let Err(status_err) = write_not_ready(chat, ctx, status, Note::warning(Reason::ApplyFailed, message)).await {
        tracing::warn!(chat = key(chat), error = %status_err, "failed to write the apply failure to status");
    }
    Error::Kube(err)
}

/// A read the reconcile needs failed (a Secret the operator may not read, an API that answers
/// nothing useful): `Ready=False` naming the read (and an Event when that is news), retried with the
/// backoff, so that the failure shows on the object instead of only in the operator's log.
async fn read_failed(chat: &ChatDeployment, ctx: &Context, err: observe::ReadError, now: &Time) -> Error {
    let message = err.to_string();
    let status =
        status::not_ready(chat.status.as_ref(), Reason::ReadFailed, message.clone(), chat.meta().generation, now);
    if let Err(status_err) = write_not_ready(chat, ctx, status, Note::warning(Reason::ReadFailed, message)).await {
        tracing::warn!(chat = key(chat), error = %status_err, "failed to write the read failure to status");
    }
    Error::Kube(err.source)
}

/// The autoscaler's readings and decisions as metrics.
fn record_scaling(metrics: &Metrics, names: &Names, plan: &autoscale::Plan) {
    let labels = |language: &str| LanguageLabels {
        namespace: names.namespace.clone(),
        chat: names.instance.clone(),
        language: language.to_owned(),
    };
    for (language, backlog) in &plan.backlogs {
        metrics.backlog.get_or_create(&labels(language)).set(*backlog);
    }
    for (language, desired) in &plan.report.desired {
        metrics.desired_replicas.get_or_create(&labels(language)).set(i64::from(*desired));
    }
}

/// The finalizer: deletes the owned Deployments, then, once no pod of the chat is left, the broker
/// topology.
pub async fn cleanup(chat: &ChatDeployment, ctx: &Context) -> Result<Action, Error> {
    let namespace = chat.namespace().unwrap_or_default();
    let mut languages: Vec<String> = chat.spec.languages.iter().map(|l| l.code.clone()).collect();
    languages.extend(chat.status.iter().flat_map(|s| s.translators.iter().map(|t| t.language.clone())));
    languages.extend(declared(chat));
    languages.sort();
    languages.dedup();
    languages.retain(|l| parley_contract::topology::validate_language(l).is_ok());
    let Ok(topology) = Topology::for_chat_deployment(&namespace, &chat.name_any()) else {
        // No valid prefix means nothing was ever declared: never hold deletion for it.
        return Ok(Action::await_change());
    };
    // Running pods declare the topology again when they reconnect: remove them first.
    let names = Names::new(&chat.name_any(), &namespace);
    let selector = ListParams::default().labels(&names.owned_selector());
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let owned = deployments.list(&selector).await?;
    if !owned.items.is_empty() {
        for deployment in owned.items {
            // Foreground: the Deployment stays until its ReplicaSets and their pods are gone.
            deployments.delete(&deployment.name_any(), &kube::api::DeleteParams::foreground()).await?;
        }
        return Err(Error::Waiting(format!("deleting the Deployments of {} before its topology", key(chat))));
    }
    // A pod outlives its Deployment while it terminates (up to its grace period), and one still
    // connected would declare the topology again after it was deleted, leaving queues nobody removes.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let left = pods.list(&selector).await?.items.len();
    if left > 0 {
        return Err(Error::Waiting(format!(
            "{left} pods of {} still terminating; its topology waits for them",
            key(chat)
        )));
    }
    let last = ctx.broker_addresses.lock().expect("broker addresses lock").get(&key(chat)).cloned();
    let url = match observe::secret_value(&ctx.client, &namespace, &chat.spec.broker.secret_ref).await? {
        Ok(url) => Ok(String::from_utf8_lossy(&url).trim().to_owned()),
        // Gone with its namespace, say: the URI the chat last reconciled with still reaches the broker.
        Err(err) => last.as_ref().map(|a| a.url.clone()).ok_or(err),
    };
    let ca = match &chat.spec.broker.tls {
        None => None,
        Some(tls) => match observe::secret_value(&ctx.client, &namespace, &tls.ca_secret_ref).await? {
            Ok(pem) => Some(String::from_utf8_lossy(&pem).into_owned()),
            Err(_) => last.and_then(|a| a.ca),
        },
    };
    let removed = match url {
        Ok(url) => broker::remove(&ctx.brokers, &broker::BrokerAddress::new(url, ca), &topology, &languages).await,
        Err(err) => Err(err.into()),
    };
    match removed {
        Ok(()) => {
            let text = format!("deleted {}.* from the broker", topology.prefix());
            ctx.publish(chat, Note::normal(Reason::TopologyRemoved, text)).await;
            ctx.forget(chat, &languages);
            Ok(Action::await_change())
        }
        Err(err) => {
            let deleting_for = chat
                .meta()
                .deletion_timestamp
                .as_ref()
                .map(|t| elapsed_since(&t.0.to_string(), ctx.clock.now()))
                .unwrap_or_default();
            let secret_gone = matches!(err, BrokerError::Secret(_));
            if secret_gone || deleting_for >= CLEANUP_GRACE {
                // Never block deletion forever: say what was left behind instead.
                let text = format!("left {}.* on the broker: {err}", topology.prefix());
                ctx.publish(chat, Note::warning(Reason::TopologyLeftBehind, text)).await;
                ctx.forget(chat, &languages);
                Ok(Action::await_change())
            } else {
                ctx.publish(chat, Note::warning(err.reason(), err.to_string())).await;
                Err(err.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requeue_interval_is_spread_by_a_tenth_either_way() {
        let seen: Vec<Duration> = (0..200).map(|_| jittered(Duration::from_secs(10))).collect();
        assert!(seen.iter().all(|d| (Duration::from_secs(9)..=Duration::from_secs(11)).contains(d)), "{seen:?}");
        assert!(seen.iter().any(|d| *d != seen[0]), "spread, not one fixed value");
    }
}
