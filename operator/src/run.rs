//! The operator process: leader election, controllers for the watched namespaces, health and metrics, graceful shutdown.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use axum::{http::StatusCode, routing::get, Router};
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret, Service},
};
use kube::{
    runtime::{events::Reporter, reflector::ObjectRef, watcher, Controller},
    Api, Client, ResourceExt,
};
use tokio_util::sync::CancellationToken;

use crate::{
    controller::{error_policy, reconcile, Context, Settings},
    crd::ChatDeployment,
    leader::{LeaderElector, RENEW_INTERVAL},
    metrics::Metrics,
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

fn health_and_metrics(metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
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
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
}

/// One controller over `api`: ChatDeployments, the objects they own, and the Secrets they reference.
async fn control(
    client: Client,
    api: Api<ChatDeployment>,
    scope: Option<String>,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let owned = |client: &Client| match &scope {
        Some(ns) => Api::<Deployment>::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let services: Api<Service> = scope.as_ref().map_or_else(
        || Api::all(client.clone()),
        |ns| Api::namespaced(client.clone(), ns),
    );
    let config_maps: Api<ConfigMap> = scope.as_ref().map_or_else(
        || Api::all(client.clone()),
        |ns| Api::namespaced(client.clone(), ns),
    );
    let secrets: Api<Secret> = scope.as_ref().map_or_else(
        || Api::all(client.clone()),
        |ns| Api::namespaced(client.clone(), ns),
    );
    let owned_only =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=parley-operator");
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    let store = controller.store();
    controller
        .owns(owned(&client), owned_only.clone())
        .owns(services, owned_only.clone())
        .owns(config_maps, owned_only)
        .watches(
            secrets,
            watcher::Config::default(),
            move |secret: Secret| {
                // A changed broker or API-key Secret rolls the pods of every ChatDeployment that references it.
                let namespace = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|chat| {
                        chat.namespace() == namespace
                            && (chat.spec.broker.secret_ref.name == name
                                || chat
                                    .spec
                                    .translation
                                    .api_key_secret_ref
                                    .as_ref()
                                    .is_some_and(|r| r.name == name))
                    })
                    .map(|chat| ObjectRef::from_obj(&*chat))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(chat = %object, "reconciled"),
                Err(err) => tracing::debug!(error = %err, "reconcile did not complete"),
            }
        })
        .await;
}

pub async fn run(options: RunOptions, stop: CancellationToken) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration found (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("failed to listen on {}", options.listen))?;
    let server = axum::serve(listener, health_and_metrics(metrics.clone(), ready.clone()))
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    let elector = LeaderElector::new(
        client.clone(),
        &options.lease_namespace,
        &options.lease_name,
        &options.identity,
    );
    tracing::info!(lease = %options.lease_name, identity = %options.identity, "waiting for leadership");
    // Standbys are ready: they serve health and take over when the leader's lease lapses.
    ready.store(true, Ordering::Relaxed);
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
            let mut failures_since = None::<tokio::time::Instant>;
            loop {
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(RENEW_INTERVAL) => {} }
                match elector.try_acquire().await {
                    Ok(true) => failures_since = None,
                    result => {
                        let since = *failures_since.get_or_insert_with(tokio::time::Instant::now);
                        if matches!(result, Ok(false)) || since.elapsed() > Duration::from_secs(10)
                        {
                            tracing::error!("lost the leader lease; stopping");
                            lost.cancel();
                            controllers.cancel();
                            return;
                        }
                    }
                }
            }
        }
    };
    let reporter = Reporter {
        controller: "parley-operator".into(),
        instance: Some(options.identity.clone()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        reporter,
        metrics,
        options.settings.clone(),
    ));
    let mut runs = Vec::new();
    if options.namespaces.is_empty() {
        runs.push(
            control(
                client.clone(),
                Api::all(client.clone()),
                None,
                ctx.clone(),
                controllers.clone(),
            )
            .boxed(),
        );
    } else {
        for ns in &options.namespaces {
            let api = Api::namespaced(client.clone(), ns);
            runs.push(
                control(
                    client.clone(),
                    api,
                    Some(ns.clone()),
                    ctx.clone(),
                    controllers.clone(),
                )
                .boxed(),
            );
        }
    }
    let renew = tokio::spawn(renewer);
    futures_util::future::join_all(runs).await;
    renew.abort();
    let elector = LeaderElector::new(
        client,
        &options.lease_namespace,
        &options.lease_name,
        &options.identity,
    );
    elector.release().await;
    let _ = server.await;
    anyhow::ensure!(!lost.is_cancelled(), "leadership lost");
    Ok(())
}
