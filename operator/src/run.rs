//! The operator process: leader election, controllers for the watched namespaces, health and metrics, graceful shutdown.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use anyhow::Context as _;
use axum::{http::StatusCode, routing::get, Router};
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret, Service},
};
use kube::{
    api::PartialObjectMeta,
    runtime::{
        events::Reporter,
        predicates,
        reflector::{self, ObjectRef},
        watcher, Controller, Predicate, WatchStreamExt,
    },
    Api, Client, ResourceExt,
};
use tokio_util::sync::CancellationToken;

use crate::{
    controller::{error_policy, reconcile},
    crd::ChatDeployment,
    leader::{LeaderElector, RENEW_DEADLINE, RENEW_INTERVAL, RETRY_PERIOD},
    metrics::Metrics,
    reconcile::{Context, Settings},
};

/// Options of `operator run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub namespaces: Vec<String>,
    pub listen: std::net::SocketAddr,
    pub settings: Settings,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
}

/// Reconciles running at once, per watched namespace (or for the cluster).
pub const RECONCILE_CONCURRENCY: u16 = 8;

/// A reconcile running longer than this is hung: `/healthz` fails, and Kubernetes restarts the pod.
/// Each broker and database call in a reconcile is bounded at seconds, and API calls at kube's
/// timeouts, so no healthy reconcile comes near it.
pub const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

fn health_and_metrics(metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Router {
    let watched = metrics.clone();
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let stuck = watched.stuck(STUCK_AFTER);
                async move {
                    match stuck {
                        None => (StatusCode::OK, "ok".to_owned()),
                        Some(reason) => {
                            tracing::error!(reason, "stuck: /healthz fails so that the operator is restarted");
                            (StatusCode::SERVICE_UNAVAILABLE, format!("stuck: {reason}"))
                        }
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move { ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text) }
            }),
        )
}

/// The ChatDeployments in `chats` that reference the Secret `name` in `namespace` (broker, its CA
/// bundle, API key, history database or JWT secret), so a changed credential rolls their pods.
pub fn referencing_secret(
    chats: &[Arc<ChatDeployment>],
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<ChatDeployment>> {
    chats
        .iter()
        .filter(|chat| {
            chat.namespace().as_deref() == namespace
                && (chat.spec.broker.secret_ref.name == name
                    || chat.spec.broker.tls.as_ref().is_some_and(|t| t.ca_secret_ref.name == name)
                    || chat.spec.translation.api_key_secret_ref.as_ref().is_some_and(|r| r.name == name)
                    || chat.spec.history.as_ref().is_some_and(|h| h.database.secret_ref.name == name)
                    || chat.spec.auth.as_ref().and_then(|a| a.jwt_secret_ref.as_ref()).is_some_and(|r| r.name == name))
        })
        .map(|chat| ObjectRef::from_obj(&**chat))
        .collect()
}

fn scoped<K>(client: &Client, scope: Option<&String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    scope.map_or_else(|| Api::all(client.clone()), |ns| Api::namespaced(client.clone(), ns))
}

/// One controller over `api`: ChatDeployments, the objects they own, and the Secrets they reference.
async fn control(
    client: Client,
    api: Api<ChatDeployment>,
    scope: Option<String>,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let owned_only = watcher::Config::default().labels("app.kubernetes.io/managed-by=parley-operator");
    // Only spec, annotation (pause) and finalizer changes wake a ChatDeployment: its own status
    // writes (backlogs change all the time) must not, or busy chats would reconcile in a loop.
    let (reader, writer) = reflector::store();
    let chats = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::annotations).combine(predicates::finalizers),
            Default::default(),
        );
    let mut controller = Controller::for_stream(chats, reader.clone())
        .owns(scoped::<Deployment>(&client, scope.as_ref()), owned_only.clone())
        .owns(scoped::<Service>(&client, scope.as_ref()), owned_only.clone())
        .owns(scoped::<ConfigMap>(&client, scope.as_ref()), owned_only);
    if ctx.settings.watch_secrets {
        // Secrets by metadata only: the reconcile reads the one it needs.
        let secrets = watcher(scoped::<PartialObjectMeta<Secret>>(&client, scope.as_ref()), watcher::Config::default())
            .default_backoff()
            .touched_objects();
        let store = reader;
        controller = controller.watches_stream(secrets, move |secret| {
            referencing_secret(&store.state(), secret.metadata.namespace.as_deref(), &secret.name_any())
        });
    }
    // Backlogs are polled apart from reconciles; a chat whose replicas should change is reconciled.
    let (due, polled) = tokio::sync::mpsc::channel(1024);
    let poller = tokio::spawn(crate::reconcile::poll::run(ctx.clone(), scope.clone(), due, stop.clone()));
    controller
        .reconcile_on(tokio_stream::wrappers::ReceiverStream::new(polled))
        .graceful_shutdown_on(stop.cancelled_owned())
        // A bounded number at once: a thousand chats requeued together must not open a thousand
        // broker steps at the same moment.
        .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(chat = %object, "reconciled"),
                Err(err) => tracing::debug!(error = %err, "reconcile did not complete"),
            }
        })
        .await;
    poller.abort();
}

/// The controllers for `namespaces` (`--namespaces`; every namespace when empty), until `stop`: with
/// namespaces given, each watches and lists only inside its own, so namespaced RBAC suffices.
pub async fn control_namespaces(client: Client, namespaces: &[String], ctx: Arc<Context>, stop: CancellationToken) {
    let mut runs = Vec::new();
    if namespaces.is_empty() {
        runs.push(control(client.clone(), Api::all(client.clone()), None, ctx.clone(), stop.clone()).boxed());
    } else {
        for ns in namespaces {
            let api = Api::namespaced(client.clone(), ns);
            runs.push(control(client.clone(), api, Some(ns.clone()), ctx.clone(), stop.clone()).boxed());
        }
    }
    futures_util::future::join_all(runs).await;
}

/// The Secret, in the operator's namespace, holding the key of the checksum of referenced Secrets.
pub const CHECKSUM_KEY_SECRET: &str = "parley-operator-checksum-key";

/// The checksum key from [`CHECKSUM_KEY_SECRET`] in `namespace`, which the first replica to ask creates
/// with 32 random bytes; every replica then uses the same one, so a new leader rolls no pods.
pub async fn checksum_key(client: &Client, namespace: &str) -> anyhow::Result<Vec<u8>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |secret: Secret| secret.data.and_then(|mut d| d.remove("key")).map(|k| k.0).filter(|k| !k.is_empty());
    let what = || format!("the checksum key Secret {namespace}/{CHECKSUM_KEY_SECRET}");
    if let Some(key) = secrets.get_opt(CHECKSUM_KEY_SECRET).await.with_context(what)?.and_then(read) {
        return Ok(key);
    }
    let mut key = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("no system randomness for the checksum key"))?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some(CHECKSUM_KEY_SECRET.into()), ..Default::default() },
        data: Some([("key".to_owned(), k8s_openapi::ByteString(key.clone()))].into()),
        ..Default::default()
    };
    match secrets.create(&Default::default(), &secret).await {
        Ok(_) => Ok(key),
        // Another replica created it first: use that one.
        Err(kube::Error::Api(e)) if e.code == 409 => secrets
            .get(CHECKSUM_KEY_SECRET)
            .await
            .ok()
            .and_then(read)
            .ok_or_else(|| anyhow::anyhow!("{} exists but holds no key", what())),
        Err(err) => Err(err).with_context(what),
    }
}

pub async fn run(options: RunOptions, stop: CancellationToken) -> anyhow::Result<()> {
    let client = Client::try_default().await.context("no Kubernetes configuration found (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("failed to listen on {}", options.listen))?;
    let server = axum::serve(listener, health_and_metrics(metrics.clone(), ready.clone()))
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    // Standbys are ready: they serve health and take over when the leader's lease lapses.
    ready.store(true, Ordering::Relaxed);
    let lease = Lease { namespace: &options.lease_namespace, name: &options.lease_name, identity: &options.identity };
    let (controllers_client, options) = (client.clone(), &options);
    lead(client, lease, &stop, |controllers| async move {
        let client = controllers_client;
        // The leader reads the checksum key (the first one creates it) before it reconciles anything.
        let mut settings = options.settings.clone();
        settings.checksum_key = loop {
            match checksum_key(&client, &options.lease_namespace).await {
                Ok(key) => break key,
                Err(err) => {
                    tracing::warn!(error = format!("{err:#}"), "cannot read or create the checksum key; retrying");
                    tokio::select! {
                        _ = controllers.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_PERIOD) => {}
                    }
                }
            }
        };
        let reporter = Reporter { controller: "parley-operator".into(), instance: Some(options.identity.clone()) };
        let ctx = Arc::new(Context::new(client.clone(), reporter, metrics, settings));
        control_namespaces(client, &options.namespaces, ctx, controllers).await;
    })
    .await?;
    let _ = server.await;
    Ok(())
}

/// The Lease this process competes for.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub identity: &'a str,
}

/// Waits for the Lease, then runs `work` with a token that ends it, renewing the Lease meanwhile, and
/// gives the Lease up once `work` is done (on SIGTERM, `stop`), so a standby takes over at once. A
/// leader that cannot renew in time stops `work` (and the process) before the Lease can lapse, and
/// this returns an error.
pub async fn lead<F, Fut>(client: Client, lease: Lease<'_>, stop: &CancellationToken, work: F) -> anyhow::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let elector = LeaderElector::new(client.clone(), lease.namespace, lease.name, lease.identity);
    tracing::info!(lease = %lease.name, identity = %lease.identity, "waiting for leadership");
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            acquired = elector.try_acquire() => match acquired {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "cannot read the leader lease"),
            },
        }
        tokio::select! { _ = stop.cancelled() => return Ok(()), _ = tokio::time::sleep(RENEW_INTERVAL) => {} }
    }
    tracing::info!("leading: starting controllers");

    let lost = CancellationToken::new();
    let controllers = stop.child_token();
    let renewer = {
        let controllers = controllers.clone();
        let lost = lost.clone();
        let stop = stop.clone();
        async move {
            let mut last_renewal = tokio::time::Instant::now();
            let mut wait = RENEW_INTERVAL;
            loop {
                let left = RENEW_DEADLINE.saturating_sub(last_renewal.elapsed());
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(wait.min(left)) => {} }
                // Each attempt is bounded by what is left before the deadline, so a hung call cannot
                // carry this leader past it.
                let left = RENEW_DEADLINE.saturating_sub(last_renewal.elapsed());
                match tokio::time::timeout(left, elector.try_acquire()).await {
                    Ok(Ok(true)) => {
                        last_renewal = tokio::time::Instant::now();
                        wait = RENEW_INTERVAL;
                        continue;
                    }
                    Ok(Ok(false)) => {
                        // Another replica took the lease (it expired, or was written under us): stop at once.
                        tracing::error!("another replica holds the leader lease; stopping");
                        lost.cancel();
                        controllers.cancel();
                        stop.cancel();
                        return;
                    }
                    Ok(Err(err)) => tracing::warn!(error = %err, "failed to renew the leader lease"),
                    Err(_) => tracing::warn!("renewing the leader lease timed out"),
                }
                wait = RETRY_PERIOD;
                // Stop before the lease can expire, so a standby never leads while this one still does.
                if last_renewal.elapsed() >= RENEW_DEADLINE {
                    tracing::error!("could not renew the leader lease in time; stopping");
                    lost.cancel();
                    controllers.cancel();
                    stop.cancel();
                    return;
                }
            }
        }
    };
    let renew = tokio::spawn(renewer);
    work(controllers).await;
    renew.abort();
    let elector = LeaderElector::new(client, lease.namespace, lease.name, lease.identity);
    // Bounded, like every call here: an API server that does not answer must not hold up the exit.
    if tokio::time::timeout(RETRY_PERIOD, elector.release()).await.is_err() {
        tracing::warn!("releasing the leader lease timed out; a standby takes it when it expires");
    }
    anyhow::ensure!(!lost.is_cancelled(), "leadership lost");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ChatDeploymentSpec, DatabaseSpec, HistorySpec, SecretKeyRef, TranslationSpec};

    fn chat(namespace: &str, name: &str, broker: &str, api_key: Option<&str>) -> Arc<ChatDeployment> {
        let mut spec = ChatDeploymentSpec::default();
        spec.broker.secret_ref = SecretKeyRef { name: broker.into(), key: "uri".into() };
        spec.translation = TranslationSpec {
            api_key_secret_ref: api_key.map(|n| SecretKeyRef { name: n.into(), key: "key".into() }),
            ..Default::default()
        };
        let mut chat = ChatDeployment::new(name, spec);
        chat.metadata.namespace = Some(namespace.into());
        Arc::new(chat)
    }

    fn with_history(chat: Arc<ChatDeployment>, secret: &str) -> Arc<ChatDeployment> {
        let mut chat = (*chat).clone();
        chat.spec.history = Some(HistorySpec {
            database: DatabaseSpec { secret_ref: SecretKeyRef { name: secret.into(), key: "uri".into() } },
            ..Default::default()
        });
        Arc::new(chat)
    }

    #[tokio::test]
    async fn the_checksum_key_is_created_once_and_then_shared() {
        let client = kube_fake_client::ClientBuilder::new().build().await.unwrap();
        let first = checksum_key(&client, "parley-system").await.unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(checksum_key(&client, "parley-system").await.unwrap(), first, "a second replica reads the same");
        let other = kube_fake_client::ClientBuilder::new().build().await.unwrap();
        assert_ne!(checksum_key(&other, "parley-system").await.unwrap(), first, "random per cluster");
    }

    #[test]
    fn a_secret_wakes_the_chat_deployments_of_its_namespace_that_reference_it() {
        let chats = vec![
            chat("events", "a", "rabbitmq", None),
            chat("events", "b", "other", Some("rabbitmq")),
            chat("events", "c", "other", None),
            chat("elsewhere", "d", "rabbitmq", None),
            with_history(chat("events", "e", "other", None), "rabbitmq"),
        ];
        let woken: Vec<String> =
            referencing_secret(&chats, Some("events"), "rabbitmq").into_iter().map(|r| r.name).collect();
        assert_eq!(woken, vec!["a", "b", "e"]);
    }

    #[test]
    fn the_jwt_secret_and_the_broker_ca_wake_the_chat_deployments_that_reference_them() {
        let mut jwt = (*chat("events", "jwt", "rabbitmq", None)).clone();
        jwt.spec.auth = Some(crate::crd::AuthSpec {
            mode: crate::crd::AuthMode::Jwt,
            jwt_secret_ref: Some(SecretKeyRef { name: "parley-jwt".into(), key: "secret".into() }),
            ..Default::default()
        });
        let mut tls = (*chat("events", "tls", "rabbitmq", None)).clone();
        tls.spec.broker.tls = Some(crate::crd::BrokerTlsSpec {
            ca_secret_ref: SecretKeyRef { name: "rabbitmq-ca".into(), key: "ca.crt".into() },
        });
        let chats = vec![Arc::new(jwt), Arc::new(tls), chat("events", "neither", "rabbitmq", None)];
        let woken = |secret: &str| -> Vec<String> {
            referencing_secret(&chats, Some("events"), secret).into_iter().map(|r| r.name).collect()
        };
        assert_eq!(woken("parley-jwt"), ["jwt"]);
        assert_eq!(woken("rabbitmq-ca"), ["tls"]);
    }
}
