//! The gateway role: GraphQL over HTTP and WebSocket for clients, fed by this process's delivery queue.
//!
//! - [`schema`]: the GraphQL types and resolvers, apart from any transport; [`nesting`]: the depth
//!   limit, applied before the parser;
//! - [`http`]: the axum routes; [`page`]: the participants' chat page; [`socket`]: the WebSocket
//!   connection loop and its limits;
//! - [`framing`]: how each wire protocol frames a result; [`outbox`]: what wakes a connection, and
//!   the frames that are its own;
//! - [`groups`]: identical subscriptions executed once, their results written once to a [`ring`] that
//!   every member reads; [`hub`]: per chat, the deliveries of the bus handed to the local subscribers.

pub mod framing;
pub mod groups;
pub mod http;
pub mod hub;
pub mod nesting;
pub mod outbox;
pub mod page;
pub mod ring;
pub mod schema;
pub mod socket;

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::serve::ListenerExt;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{limits::Limits, Auth},
    bus::Bus,
    config::Settings,
    history::History,
};
use groups::SharedSubscriptions;
use http::AppState;
use hub::Hub;
use schema::{build_schema, ChatContext, ChatSettings, QueryLimits};
use socket::{SocketLimits, Sockets};

/// How long open sockets get to receive their close frame after the listener stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A runtime of its own, on its own thread, for the delivery path: the broker connection's own tasks
/// (connect the bus with [`Dispatcher::run`]), the hub's feed and the groups' executions. On the
/// connections' runtime a delivery would wait behind every connection task the previous broadcast
/// woke, at each hop from the broker to the ring.
pub struct Dispatcher {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dispatcher {
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("parley-dispatch".into()).spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            })
        })?;
        Ok(Self { handle, stop: Some(stop), thread: Some(thread) })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `work` on the dispatch thread and waits for it: whatever it spawns (lapin spawns its
    /// connection's tasks on the runtime it was connected from) stays there.
    pub async fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> T {
        match self.handle.spawn(work).await {
            Ok(done) => done,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        // Ends the thread; its runtime drops the tasks still on it.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves until `cancel` fires or the delivery feed is lost for good (then it fails, so the pod restarts).
/// The delivery path runs on `dispatcher`, where the bus should be connected. The caller closes the
/// bus, after whatever else still uses it has stopped, and only then drops the dispatcher.
pub async fn serve(
    bus: Arc<dyn Bus>,
    history: Option<Arc<dyn History>>,
    auth: Arc<Auth>,
    settings: &Settings,
    dispatcher: &Dispatcher,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (binder, feed) = bus.delivery_feed().await?;
    let hub = Hub::with_history(binder, hub::BACKLOG, history.clone());
    let serving = cancel.child_token();
    let feed_lost = CancellationToken::new();
    let feed_task = dispatcher.handle().spawn({
        let (hub, serving, feed_lost) = (hub.clone(), serving.clone(), feed_lost.clone());
        async move {
            hub.run_feed(feed).await;
            feed_lost.cancel();
            serving.cancel();
        }
    });
    let has_history = history.is_some();
    let keys = match &history {
        Some(history) => history.clone().keys(),
        None => Arc::new(crate::history::keys::MemoryKeys::default()),
    };
    let abuse = Limits::new(settings.limits);
    tokio::spawn({
        let auth = auth.clone();
        async move { auth.prefetch().await }
    });
    let chat = ChatContext {
        auth: auth.clone(),
        limits: abuse.clone(),
        bus: bus.clone(),
        hub,
        history,
        keys,
        settings: ChatSettings {
            source_language: settings.source_language.clone(),
            languages: settings.languages.clone(),
            max_text_bytes: settings.max_text_bytes,
            max_chat_id_bytes: 200,
            max_sender_bytes: 256,
        },
    };
    let limits = QueryLimits { max_depth: settings.max_query_depth, max_complexity: settings.max_query_complexity };
    let schema = build_schema(Arc::new(chat), limits);
    let sockets = Sockets {
        shared: SharedSubscriptions::new(schema.clone(), settings.subscriber_buffer, dispatcher.handle().clone()),
        schema: schema.clone(),
        limits: SocketLimits {
            max_subscriptions_per_connection: settings.max_subscriptions_per_connection,
            connection_init_timeout: settings.connection_init_timeout,
            max_message_bytes: settings.max_text_bytes * 4 + 16 * 1024,
            send_queue_frames: settings.subscriber_buffer,
        },
        auth: auth.clone(),
        abuse,
        shutdown: serving.clone(),
        tracker: TaskTracker::new(),
        closing: Arc::default(),
    };
    sockets.watch_shutdown();
    let open_sockets = sockets.tracker.clone();
    let page = page::PageConfig {
        auth: match settings.auth.mode {
            Some(crate::config::AuthMode::Jwt) if auth.enabled() => "jwt",
            Some(crate::config::AuthMode::Oidc) if auth.enabled() => "oidc",
            _ => "none",
        },
        issuer: settings.auth.issuer.clone().filter(|_| auth.enabled()),
        client_id: settings.auth.client_id.clone().filter(|_| auth.enabled()),
        source_language: settings.source_language.clone(),
        languages: settings.languages.clone(),
        history: has_history,
    };
    let state = AppState { schema, bus: bus.clone(), auth, page, sockets, stall_timeout: settings.stall_timeout };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}", settings.listen))?;
    tracing::info!(address = %listener.local_addr()?, "gateway serving GraphQL on /graphql");
    // Without TCP_NODELAY a small frame waits behind the client's delayed ACK (Nagle), adding tens of ms.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(error = %err, "failed to set TCP_NODELAY");
        }
    });
    let app = http::router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(serving.cancelled_owned()).await?;
    open_sockets.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, open_sockets.wait()).await.is_err() {
        tracing::warn!("some sockets did not close in time");
    }
    feed_task.abort();
    anyhow::ensure!(
        cancel.is_cancelled() || !feed_lost.is_cancelled(),
        "the broker delivery feed was lost and could not be recovered"
    );
    tracing::info!("gateway stopped");
    Ok(())
}
