//! The controller: finalizer wrapper → validate → build → apply → prune → broker → status.

use std::{collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

use k8s_openapi::{
    api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
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

use crate::{
    apply, broker,
    build::{build, Inputs},
    crd::{ChatDeployment, SecretKeyRef},
    metrics::Metrics,
    names::{FIELD_MANAGER, FINALIZER, PAUSED_ANNOTATION},
    status::{self, BrokerReport},
    validate::validate,
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
}

impl Error {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> String {
        match self {
            Self::Kube(_) => "kube".into(),
            Self::Broker(err) => err.reason().into(),
            Self::Finalizer(_) => "finalizer".into(),
        }
    }
}

/// Settings of the operator process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub default_image: String,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        Self {
            client,
            reporter,
            metrics,
            settings,
            failures: Mutex::default(),
        }
    }

    async fn publish(&self, chat: &ChatDeployment, type_: EventType, reason: &str, note: String) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, &chat.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "failed to publish an Event");
        }
    }
}

fn key(chat: &ChatDeployment) -> String {
    format!(
        "{}/{}",
        chat.namespace().unwrap_or_default(),
        chat.name_any()
    )
}

fn paused(chat: &ChatDeployment) -> bool {
    chat.annotations()
        .get(PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true")
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
        kube::runtime::finalizer::Error::ApplyFailed(err)
        | kube::runtime::finalizer::Error::CleanupFailed(err) => err,
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

async fn secret_value(
    client: &Client,
    namespace: &str,
    reference: &SecretKeyRef,
) -> Result<Vec<u8>, broker::BrokerError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(&reference.name)
        .await
        .map_err(|err| {
            broker::BrokerError::Unreachable(format!(
                "cannot read Secret {}: {err}",
                reference.name
            ))
        })?
        .ok_or_else(|| broker::BrokerError::SecretNotFound(reference.name.clone()))?;
    secret
        .data
        .and_then(|mut data| data.remove(&reference.key))
        .map(|bytes| bytes.0)
        .ok_or_else(|| broker::BrokerError::SecretKeyMissing {
            secret: reference.name.clone(),
            key: reference.key.clone(),
        })
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
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn elapsed_since(since: &str) -> Duration {
    since
        .parse::<Timestamp>()
        .ok()
        .and_then(|t| Timestamp::now().duration_since(t).try_into().ok())
        .unwrap_or_default()
}

async fn patch_status(
    ctx: &Context,
    chat: &ChatDeployment,
    status: crate::crd::ChatDeploymentStatus,
) -> Result<(), Error> {
    let api: Api<ChatDeployment> =
        Api::namespaced(ctx.client.clone(), &chat.namespace().unwrap_or_default());
    let patch = serde_json::json!({"status": status});
    api.patch_status(
        &chat.name_any(),
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn apply_chat(chat: &ChatDeployment, ctx: &Context) -> Result<Action, Error> {
    let namespace = chat.namespace().unwrap_or_default();
    let now = now();
    let valid = match validate(chat, &ctx.settings.default_image) {
        Ok(valid) => valid,
        Err(errors) => {
            let status =
                status::invalid(chat.status.as_ref(), &errors, chat.meta().generation, &now);
            let flipped = chat.status.as_ref().map(|s| &s.conditions) != Some(&status.conditions);
            patch_status(ctx, chat, status).await?;
            if flipped {
                let note = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                ctx.publish(chat, EventType::Warning, "InvalidSpec", note)
                    .await;
            }
            ctx.metrics.error("InvalidSpec");
            // A bad spec will not fix itself: wait for the next edit instead of retrying.
            return Ok(Action::await_change());
        }
    };

    let broker_url = secret_value(&ctx.client, &namespace, &valid.broker).await;
    let api_key = match &valid.api_key {
        Some(reference) => Some(secret_value(&ctx.client, &namespace, reference).await),
        None => None,
    };
    let owner = chat
        .controller_owner_ref(&())
        .expect("a stored ChatDeployment has a uid");
    let secrets_digest = digest(std::iter::once(&broker_url).chain(api_key.as_ref()));
    let desired = build(
        &valid,
        &Inputs {
            owner,
            secrets_digest,
        },
    );
    let deployments = apply::apply(&ctx.client, &namespace, &desired).await?;
    for pruned in apply::prune(&ctx.client, &valid.names, &desired).await? {
        ctx.publish(
            chat,
            EventType::Normal,
            "Pruned",
            format!("deleted {pruned}, no longer in the spec"),
        )
        .await;
    }

    let draining = status::draining(
        chat.status.as_ref(),
        &valid.language_codes(),
        &now.0.to_string(),
    );
    let topology =
        Topology::new(valid.topology_prefix.as_str()).map_err(broker::BrokerError::from)?;
    let synced = match broker_url {
        Ok(url) => {
            let url = String::from_utf8_lossy(&url).trim().to_owned();
            let drain_timeout = Duration::from_secs(valid.drain_timeout_seconds.max(0) as u64);
            broker::sync(
                &url,
                &topology,
                &valid.language_codes(),
                draining.clone(),
                drain_timeout,
                elapsed_since,
            )
            .await
        }
        Err(err) => Err(err),
    };
    let (report, still_draining, failure) = match synced {
        Ok(outcome) => {
            for (language, lost) in &outcome.deleted {
                let (kind, note) = if *lost == 0 {
                    (
                        EventType::Normal,
                        format!("deleted the drained queue of removed language {language}"),
                    )
                } else {
                    (EventType::Warning, format!("deleted the queue of removed language {language} after the drain timeout with {lost} messages untranslated"))
                };
                ctx.publish(chat, kind, "LanguageQueueDeleted", note).await;
            }
            (
                BrokerReport::Ready {
                    backlogs: outcome.backlogs,
                },
                outcome.draining,
                None,
            )
        }
        Err(err) => {
            ctx.publish(chat, EventType::Warning, err.reason(), err.to_string())
                .await;
            (err.report(), draining, Some(err))
        }
    };

    let status = status::compute(
        &valid,
        chat.meta().generation,
        &deployments,
        &report,
        &still_draining,
        chat.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
        &now,
    );
    let ready = status.phase == Some(crate::crd::Phase::Ready);
    patch_status(ctx, chat, status).await?;
    if let Some(err) = failure {
        // Everything else is applied; the broker is retried with backoff.
        return Err(err.into());
    }
    ctx.failures
        .lock()
        .expect("failures lock")
        .remove(&key(chat));
    Ok(Action::requeue(if ready && still_draining.is_empty() {
        RESYNC
    } else {
        CONVERGING
    }))
}

async fn cleanup(chat: &ChatDeployment, ctx: &Context) -> Result<Action, Error> {
    let namespace = chat.namespace().unwrap_or_default();
    let mut languages: Vec<String> = chat.spec.languages.iter().map(|l| l.code.clone()).collect();
    languages.extend(
        chat.status
            .iter()
            .flat_map(|s| s.translators.iter().map(|t| t.language.clone())),
    );
    languages.sort();
    languages.dedup();
    languages.retain(|l| parley_topology::validate_language(l).is_ok());
    let topology = Topology::for_chat_deployment(&namespace, &chat.name_any())
        .map_err(broker::BrokerError::from)?;
    let removed = match secret_value(&ctx.client, &namespace, &chat.spec.broker.secret_ref).await {
        Ok(url) => {
            broker::remove(String::from_utf8_lossy(&url).trim(), &topology, &languages).await
        }
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
            let deleting_for = chat
                .meta()
                .deletion_timestamp
                .as_ref()
                .map(|t| elapsed_since(&t.0.to_string()))
                .unwrap_or_default();
            let secret_gone = matches!(
                err,
                broker::BrokerError::SecretNotFound(_)
                    | broker::BrokerError::SecretKeyMissing { .. }
            );
            if secret_gone || deleting_for >= CLEANUP_GRACE {
                // Never block deletion forever: say what was left behind instead.
                let note = format!("left {}.* on the broker: {err}", topology.prefix());
                ctx.publish(chat, EventType::Warning, "TopologyLeftBehind", note)
                    .await;
                Ok(Action::await_change())
            } else {
                ctx.publish(chat, EventType::Warning, err.reason(), err.to_string())
                    .await;
                Err(err.into())
            }
        }
    }
}
