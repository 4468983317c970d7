//! Backlog polling apart from reconciles. Every autoscale interval, the load of each
//! builtin-autoscaled language queue is read (passive declares over the shared broker connection,
//! or the management API) and goes into the autoscaler's history; a chat is reconciled only when
//! its translators' replicas should change. A reconcile reads every owned object and declares the
//! topology, so polling through reconciles cost a thousand chats a hundred of those a second.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use kube::runtime::reflector::ObjectRef;
use tokio_util::sync::CancellationToken;

use super::{
    autoscale::{self, History, Load},
    broker::BrokerAddress,
    validate::{Bounds, Scaling, ValidatedChat},
    Context,
};
use crate::crd::ChatDeployment;

/// Chats polled at once.
const POLL_CONCURRENCY: usize = 8;

/// What the poller needs of one chat, as its last reconcile left it.
#[derive(Debug, Clone)]
pub struct Polled {
    pub chat: ObjectRef<ChatDeployment>,
    pub address: BrokerAddress,
    pub management: Option<String>,
    /// Each builtin-autoscaled language's queue, bounds, and the replicas last applied.
    pub languages: BTreeMap<String, (String, Bounds, i32)>,
}

impl Polled {
    /// What to poll for `chat`, whose translators were just given `desired` replicas; `None` when
    /// no language of it is in builtin autoscaling.
    pub fn new(
        chat: ObjectRef<ChatDeployment>,
        valid: &ValidatedChat,
        address: BrokerAddress,
        desired: &BTreeMap<String, i32>,
    ) -> Option<Self> {
        let languages: BTreeMap<String, (String, Bounds, i32)> = valid
            .languages
            .iter()
            .filter_map(|l| match l.scaling {
                Scaling::Builtin(bounds) => {
                    let replicas = desired.get(&l.code).copied().unwrap_or(bounds.min);
                    Some((l.code.clone(), (valid.topology.translate_queue(&l.code), bounds, replicas)))
                }
                _ => None,
            })
            .collect();
        (!languages.is_empty()).then(|| Self { chat, address, management: valid.management_url.clone(), languages })
    }

    fn queues(&self) -> BTreeMap<String, String> {
        self.languages.iter().map(|(code, (queue, _, _))| (code.clone(), queue.clone())).collect()
    }
}

/// The chats to poll, by `namespace/name`.
#[derive(Default)]
pub struct Polling(Mutex<HashMap<String, Polled>>);

impl Polling {
    /// Polls `chat` (replacing what was polled for it), or stops polling it when `polled` is `None`.
    pub fn set(&self, key: String, polled: Option<Polled>) {
        let mut chats = self.0.lock().expect("polling lock");
        match polled {
            Some(polled) => chats.insert(key, polled),
            None => chats.remove(&key),
        };
    }

    /// How many chats are polled.
    pub fn len(&self) -> usize {
        self.0.lock().expect("polling lock").len()
    }

    /// Whether no chat is polled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn in_scope(&self, scope: Option<&str>) -> Vec<(String, Polled)> {
        let chats = self.0.lock().expect("polling lock");
        chats
            .iter()
            .filter(|(_, p)| scope.is_none_or(|ns| p.chat.namespace.as_deref() == Some(ns)))
            .map(|(key, p)| (key.clone(), p.clone()))
            .collect()
    }
}

/// Each language queue's load, by language.
type Loads = BTreeMap<String, Load>;

/// The loads of one polled chat's queues: the management API's when it is configured and answers,
/// AMQP's otherwise (which never lets a language with translators connected go to zero).
async fn loads(ctx: &Context, polled: &Polled) -> Option<Loads> {
    let queues = polled.queues();
    if let Some(management) = &polled.management {
        match ctx.brokers.management_loads(&polled.address, management, &queues).await {
            Ok(loads) => return Some(loads),
            Err(err) => tracing::warn!(chat = %polled.chat, error = %err, "the management API did not answer"),
        }
    }
    match ctx.brokers.amqp_loads(&polled.address, &queues).await {
        Ok(loads) => Some(loads),
        Err(err) => {
            tracing::warn!(chat = %polled.chat, error = %err, "could not read the backlogs");
            None
        }
    }
}

/// One poll of the chats in `scope` (every namespace when `None`): each load goes into its
/// language's history, and the chats whose replicas should change now are returned.
pub async fn poll(ctx: &Context, scope: Option<&str>) -> Vec<ObjectRef<ChatDeployment>> {
    let chats = ctx.polling.in_scope(scope);
    let measured: Vec<(String, Polled, Option<Loads>)> = futures_util::stream::iter(chats)
        .map(|(key, polled)| async move {
            let loads = loads(ctx, &polled).await;
            (key, polled, loads)
        })
        .buffer_unordered(POLL_CONCURRENCY)
        .collect()
        .await;
    let now = ctx.clock.now();
    let mut due = Vec::new();
    let mut histories = ctx.histories.lock().expect("histories lock");
    for (key, polled, loads) in measured {
        let Some(loads) = loads else { continue };
        let chat_histories = histories.entry(key).or_default();
        let mut changes = false;
        for (code, (_, bounds, replicas)) in &polled.languages {
            let Some(load) = loads.get(code) else { continue };
            let history = chat_histories.entry(code.clone()).or_insert_with(|| History::starting_at(now, *replicas));
            changes |= autoscale::decide(*replicas, load, bounds, history, now) != *replicas;
        }
        if changes {
            due.push(polled.chat.clone());
        }
    }
    due
}

/// Polls the chats in `scope` every `ctx.settings.autoscale_interval` (spread by a tenth) until
/// `stop`, sending each chat whose replicas should change to `due`, which the controller reconciles.
pub async fn run(
    ctx: Arc<Context>,
    scope: Option<String>,
    due: tokio::sync::mpsc::Sender<ObjectRef<ChatDeployment>>,
    stop: CancellationToken,
) {
    loop {
        let interval: Duration = super::jittered(ctx.settings.autoscale_interval);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        for chat in poll(&ctx, scope.as_deref()).await {
            if due.send(chat).await.is_err() {
                return;
            }
        }
    }
}
