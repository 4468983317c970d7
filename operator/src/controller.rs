//! The controller's wiring: pause and the finalizer around the [`reconcile`](crate::reconcile)
//! pipeline, a timer for every pass, and the error policy.

use std::{sync::Arc, time::Duration};

use kube::{
    runtime::{
        controller::Action,
        finalizer::{finalizer, Event as Finalizer},
    },
    Api, Resource, ResourceExt,
};

use crate::{
    crd::ChatDeployment,
    names::{FINALIZER, PAUSED_ANNOTATION},
    reconcile::{self, key, Context, Error},
};

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
            Finalizer::Apply(chat) => reconcile::run(&chat, &ctx).await,
            Finalizer::Cleanup(chat) => reconcile::cleanup(&chat, &ctx).await,
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
    // 2^9 s is past the cap: the ninth failure in a row and every later one wait the full 5 minutes.
    *count = (*count + 1).min(9);
    let delay = Duration::from_secs(2u64.pow(*count)).min(Duration::from_secs(300));
    tracing::warn!(chat = key(&chat), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
