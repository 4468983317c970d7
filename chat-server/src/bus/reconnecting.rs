//! The gateway's bus: one broker connection at a time, replaced by a fresh one whenever it fails,
//! under the same delivery feed and binder, so that the gateway's sockets outlive a broker restart, a
//! network cut or a broker gone silent.
//!
//! lapin's automatic recovery can go on for good without reconnecting (amqp-rs/lapin#450, seen here
//! under the chaos suite); a gateway that then exits, for its pod to restart, drops every socket it
//! holds. Instead the connection underneath starts over, as the workers' do (no lapin recovery on it):
//! when the feed's connection fails, a new one is opened with backoff (each attempt bounded), the
//! delivery queue declared again, every chat the hub watches bound again, and only then does the feed
//! say [`FeedEvent::Resumed`], so that the hub reads what it missed from the history. Publishes
//! meanwhile fail with the old connection's error (a GraphQL error; clients retry with their
//! idempotency key), and `/readyz` says 503. A publish that fails on a connection still up (its
//! channel closed by the broker) starts the same over.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use async_trait::async_trait;
use futures_util::{future::BoxFuture, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, ChatBinder, DeliveryStream, FeedEvent, IncomingStream, Outgoing, Source};

/// Opens one fresh connection (retrying its own connect until it gives up or the role stops).
pub type Connect = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<Arc<dyn Bus>>> + Send + Sync>;

/// The first wait after a failed reconnect; it doubles up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Most one attempt may take, from the first connect to the last chat bound: past the connection's
/// handshake nothing else bounds a declare or a bind on a broker that keeps the connection alive and
/// answers nothing more. An attempt still connecting to a broker that is down starts over.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// A bus that reconnects underneath its one delivery feed.
pub struct ReconnectingBus {
    shared: Arc<Shared>,
}

struct Shared {
    connect: Connect,
    cancel: CancellationToken,
    /// The connection in use now (a failed one until its replacement is up).
    current: RwLock<Arc<dyn Bus>>,
    /// The binder of the feed's connection now.
    binder: RwLock<Option<Arc<dyn ChatBinder>>>,
    /// The chats bound, to bind again on each new connection.
    bound: Mutex<HashSet<String>>,
    /// Whether the feed's connection failed and no new one carries it yet.
    reconnecting: AtomicBool,
}

impl ReconnectingBus {
    /// Opens the first connection; `connect` opens each one after it. Reconnecting stops with `cancel`.
    pub async fn connect(connect: Connect, cancel: CancellationToken) -> anyhow::Result<Self> {
        let first = connect().await?;
        Ok(Self {
            shared: Arc::new(Shared {
                connect,
                cancel,
                current: RwLock::new(first),
                binder: RwLock::default(),
                bound: Mutex::default(),
                reconnecting: AtomicBool::new(false),
            }),
        })
    }
}

impl Shared {
    fn current(&self) -> Arc<dyn Bus> {
        self.current.read().expect("bus lock").clone()
    }

    /// Replaces the failed connection until a new one carries the feed again; `None` once the role stops.
    async fn reconnect(&self) -> Option<DeliveryStream> {
        self.reconnecting.store(true, Ordering::Release);
        let mut delay = FIRST_DELAY;
        loop {
            let attempt = tokio::select! {
                () = self.cancel.cancelled() => return None,
                attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, self.open()) => attempt
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the attempt took longer than {ATTEMPT_TIMEOUT:?}"))),
            };
            match attempt {
                Ok(feed) => {
                    self.reconnecting.store(false, Ordering::Release);
                    tracing::info!("delivery feed resumed on a new broker connection");
                    return Some(feed);
                }
                Err(err) => {
                    tracing::warn!(error = format!("{err:#}"), retry_in = ?delay, "cannot reconnect the delivery feed")
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_DELAY);
        }
    }

    /// One attempt: a connection, its delivery feed, and every watched chat bound on it.
    async fn open(&self) -> anyhow::Result<DeliveryStream> {
        let bus = (self.connect)().await?;
        let (binder, feed) = match bus.delivery_feed().await {
            Ok(opened) => opened,
            Err(err) => {
                bus.close().await;
                return Err(err.into());
            }
        };
        // The binder first, then the chats to bind: a chat bound meanwhile is bound on the new binder,
        // or was recorded before this read and is bound here.
        *self.binder.write().expect("binder lock") = Some(binder.clone());
        let chats: Vec<String> = self.bound.lock().expect("bound lock").iter().cloned().collect();
        for chat in &chats {
            if let Err(err) = binder.bind(chat).await {
                bus.close().await;
                return Err(err.into());
            }
        }
        // A chat left meanwhile, after the copy above, would stay bound here for good.
        let left: Vec<&String> = {
            let bound = self.bound.lock().expect("bound lock");
            chats.iter().filter(|chat| !bound.contains(*chat)).collect()
        };
        for chat in left {
            if let Err(err) = binder.unbind(chat).await {
                tracing::warn!(chat_id = %chat, error = %err, "failed to unbind a chat nobody here watches any more");
            }
        }
        let old = std::mem::replace(&mut *self.current.write().expect("bus lock"), bus);
        // Failed already: closing it only lets go of what is left of it.
        tokio::spawn(async move { old.close().await });
        Ok(feed)
    }
}

/// Binds through whichever connection carries the feed now, and remembers what it bound.
struct ReconnectingBinder(Arc<Shared>);

/// Removes a chat from the bound ones when dropped, unless its bind went through.
struct Forget<'a> {
    shared: &'a Shared,
    chat_id: Option<&'a str>,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(chat_id) = self.chat_id {
            self.shared.bound.lock().expect("bound lock").remove(chat_id);
        }
    }
}

impl ReconnectingBinder {
    fn binder(&self) -> Result<Arc<dyn ChatBinder>, BusError> {
        self.0
            .binder
            .read()
            .expect("binder lock")
            .clone()
            .ok_or_else(|| BusError::Timeout("waiting for the delivery feed to open".into()))
    }
}

#[async_trait]
impl ChatBinder for ReconnectingBinder {
    async fn bind(&self, chat_id: &str) -> Result<(), BusError> {
        self.0.bound.lock().expect("bound lock").insert(chat_id.to_owned());
        // Until the bind succeeds, the chat is forgotten again when this ends: by an error, or by the
        // hub's timeout dropping this future. (A binding a reconnect made meanwhile only routes
        // deliveries that nobody here takes.)
        let mut pending = Forget { shared: &self.0, chat_id: Some(chat_id) };
        let binder = self.binder()?;
        binder.bind(chat_id).await?;
        pending.chat_id = None;
        Ok(())
    }

    async fn unbind(&self, chat_id: &str) -> Result<(), BusError> {
        self.0.bound.lock().expect("bound lock").remove(chat_id);
        self.binder()?.unbind(chat_id).await
    }
}

#[async_trait]
impl Bus for ReconnectingBus {
    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BusError> {
        self.publish_all(&[message]).await
    }

    /// A publish that fails and leaves the bus unable to publish may have failed its channel alone
    /// (an exchange deleted under it, say), which nothing reopens: the connection is closed, so that
    /// the feed starts over on a new one, declaring the topology again. (Closing a connection that
    /// failed already changes nothing.)
    async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Result<(), BusError> {
        let bus = self.shared.current();
        let result = bus.publish_all(messages).await;
        if let Err(err) = &result {
            if !bus.is_ready() && !self.shared.reconnecting.load(Ordering::Acquire) {
                tracing::warn!(error = %err, "a publish failed and the bus cannot publish; starting over on a new connection");
                tokio::spawn(async move { bus.close().await });
            }
        }
        result
    }

    /// Consumes on the connection of the moment; such a stream ends with it (only the delivery feed
    /// reconnects).
    async fn consume(&self, source: Source<'_>) -> Result<IncomingStream, BusError> {
        self.shared.current().consume(source).await
    }

    /// The one delivery feed of this bus: it ends only when reconnecting stops (the role stopping).
    async fn delivery_feed(&self) -> Result<(Arc<dyn ChatBinder>, DeliveryStream), BusError> {
        let (binder, feed) = self.shared.current().delivery_feed().await?;
        *self.shared.binder.write().expect("binder lock") = Some(binder);
        let shared = self.shared.clone();
        let stream = futures_util::stream::unfold((shared, feed), |(shared, mut feed)| async move {
            if let Some(event) = feed.next().await {
                return Some((event, (shared, feed)));
            }
            if shared.cancel.is_cancelled() {
                return None;
            }
            tracing::warn!("the delivery feed's broker connection failed; reconnecting on a new one");
            let feed = shared.reconnect().await?;
            Some((FeedEvent::Resumed, (shared, feed)))
        });
        Ok((Arc::new(ReconnectingBinder(self.shared.clone())), stream.boxed()))
    }

    fn is_ready(&self) -> bool {
        !self.shared.reconnecting.load(Ordering::Acquire) && self.shared.current().is_ready()
    }

    /// Not while it reconnects (each attempt is bounded by [`ATTEMPT_TIMEOUT`], and retried): a broker
    /// that stays away makes the gateway unready, not unhealthy, since restarting it would not bring
    /// the broker back and would drop its sockets.
    fn stalled(&self, timeout: Duration) -> Option<String> {
        if self.shared.reconnecting.load(Ordering::Acquire) {
            return None;
        }
        self.shared.current().stalled(timeout)
    }

    async fn close(&self) {
        self.shared.current().close().await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio::sync::mpsc;

    use super::*;

    /// Records its binds; fails those of chats named "fails", and never finishes those of "hangs".
    #[derive(Default)]
    struct Recording(Mutex<Vec<String>>);

    #[async_trait]
    impl ChatBinder for Recording {
        async fn bind(&self, chat_id: &str) -> Result<(), BusError> {
            match chat_id {
                "fails" => return Err(BusError::InProcess("refused the bind".into())),
                "hangs" => std::future::pending::<()>().await,
                _ => {}
            }
            self.0.lock().unwrap().push(format!("bind {chat_id}"));
            Ok(())
        }

        async fn unbind(&self, chat_id: &str) -> Result<(), BusError> {
            self.0.lock().unwrap().push(format!("unbind {chat_id}"));
            Ok(())
        }
    }

    /// One connection: its binder, and a feed that ends (the connection failing) when its sender is dropped.
    struct Connection {
        binder: Arc<Recording>,
        feed: Mutex<Option<mpsc::Receiver<FeedEvent>>>,
    }

    #[async_trait]
    impl Bus for Connection {
        async fn publish(&self, _: Outgoing<'_>) -> Result<(), BusError> {
            Ok(())
        }

        async fn consume(&self, _: Source<'_>) -> Result<IncomingStream, BusError> {
            Err(BusError::InProcess("consumes nothing".into()))
        }

        async fn delivery_feed(&self) -> Result<(Arc<dyn ChatBinder>, DeliveryStream), BusError> {
            let feed = self.feed.lock().unwrap().take().expect("one feed per connection");
            Ok((self.binder.clone(), tokio_stream::wrappers::ReceiverStream::new(feed).boxed()))
        }

        fn is_ready(&self) -> bool {
            true
        }

        async fn close(&self) {}
    }

    /// A bus over `count` connections opened in turn; their binders, and the senders whose drop fails
    /// each connection's feed.
    async fn bus_over(count: usize) -> (ReconnectingBus, Vec<Arc<Recording>>, Vec<mpsc::Sender<FeedEvent>>) {
        let (mut connections, mut binders, mut fails) = (VecDeque::new(), Vec::new(), Vec::new());
        for _ in 0..count {
            let (fail, feed) = mpsc::channel(1);
            let binder = Arc::new(Recording::default());
            binders.push(binder.clone());
            fails.push(fail);
            connections.push_back(Arc::new(Connection { binder, feed: Mutex::new(Some(feed)) }) as Arc<dyn Bus>);
        }
        let connections = Arc::new(Mutex::new(connections));
        let connect: Connect = Arc::new(move || {
            let next = connections.lock().unwrap().pop_front();
            Box::pin(async move { next.ok_or_else(|| anyhow::anyhow!("no more connections")) })
        });
        (ReconnectingBus::connect(connect, CancellationToken::new()).await.unwrap(), binders, fails)
    }

    #[tokio::test]
    async fn the_chats_watched_are_bound_again_on_the_new_connection_before_the_feed_says_it_resumed() {
        let (bus, binders, mut fails) = bus_over(2).await;
        let (binder, mut feed) = bus.delivery_feed().await.unwrap();
        for chat in ["a", "b", "c"] {
            binder.bind(chat).await.unwrap();
        }
        binder.unbind("b").await.unwrap();
        assert!(bus.is_ready());

        drop(fails.remove(0));
        assert!(matches!(feed.next().await, Some(FeedEvent::Resumed)));
        let mut rebound = binders[1].0.lock().unwrap().clone();
        rebound.sort();
        assert_eq!(rebound, ["bind a", "bind c"]);
        assert!(bus.is_ready());
        // Binds go to the new connection from now on.
        binder.bind("d").await.unwrap();
        assert_eq!(binders[1].0.lock().unwrap().last().unwrap(), "bind d");
    }

    #[tokio::test]
    async fn a_bind_that_failed_or_was_given_up_on_is_not_bound_again() {
        let (bus, binders, mut fails) = bus_over(2).await;
        let (binder, mut feed) = bus.delivery_feed().await.unwrap();
        binder.bind("kept").await.unwrap();
        assert!(binder.bind("fails").await.is_err());
        // As the hub gives up on a bind that takes too long: the future is dropped.
        assert!(tokio::time::timeout(Duration::from_millis(50), binder.bind("hangs")).await.is_err());

        drop(fails.remove(0));
        assert!(matches!(feed.next().await, Some(FeedEvent::Resumed)));
        assert_eq!(*binders[1].0.lock().unwrap(), ["bind kept"]);
    }
}
