//! An in-process bus with the topology's semantics, for one process running every role.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    Acker, Bus, BusError, ChatBinder, DeliveryStream, FeedEvent, Incoming, IncomingStream, Origin, Outgoing, Route,
    Source, TraceHeaders,
};

/// A queued message: payload, origin, redelivered, trace.
type Item = (Vec<u8>, Origin, bool, TraceHeaders);

struct Queue {
    tx: mpsc::UnboundedSender<Item>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Item>>>,
}

impl Queue {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx, rx: Mutex::new(Some(rx)) }
    }
}

struct Feed {
    bound: Mutex<HashSet<String>>,
    tx: mpsc::UnboundedSender<FeedEvent>,
}

#[async_trait]
impl ChatBinder for Feed {
    async fn bind(&self, chat_id: &str) -> Result<(), BusError> {
        self.bound.lock().expect("feed lock").insert(chat_id.to_owned());
        Ok(())
    }

    async fn unbind(&self, chat_id: &str) -> Result<(), BusError> {
        self.bound.lock().expect("feed lock").remove(chat_id);
        Ok(())
    }
}

/// Queues live as long as the bus; messages published before a consumer starts wait for it.
pub struct MemoryBus {
    translate: HashMap<String, Arc<Queue>>,
    fanout: Arc<Queue>,
    feeds: Mutex<Vec<Arc<Feed>>>,
    dead: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl MemoryBus {
    pub fn new<S: AsRef<str>>(languages: &[S]) -> Self {
        Self {
            translate: languages.iter().map(|l| (l.as_ref().to_owned(), Arc::new(Queue::new()))).collect(),
            fanout: Arc::new(Queue::new()),
            feeds: Mutex::new(Vec::new()),
            dead: Arc::default(),
        }
    }

    /// Messages that were dead-lettered, oldest first.
    pub fn dead_letters(&self) -> Vec<Vec<u8>> {
        self.dead.lock().expect("dead lock").clone()
    }
}

struct MemoryAcker {
    item: Item,
    queue: Arc<Queue>,
    dead: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn ack_all_up_to(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn requeue(&self) -> Result<(), BusError> {
        let (payload, origin, _, trace) = self.item.clone();
        self.queue.tx.send((payload, origin, true, trace)).map_err(|_| BusError::InProcess("is closed".into()))
    }

    async fn dead_letter(&self) -> Result<(), BusError> {
        tracing::warn!(bytes = self.item.0.len(), "in-process bus dead-lettered a message");
        self.dead.lock().expect("dead lock").push(self.item.0.clone());
        Ok(())
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BusError> {
        let closed = |_| BusError::InProcess("is closed".into());
        let Outgoing { route, payload, trace } = message;
        match route {
            Route::Posted => {
                for queue in self.translate.values().chain(std::iter::once(&self.fanout)) {
                    queue.tx.send((payload.to_vec(), Origin::Posted, false, trace.clone())).map_err(closed)?;
                }
            }
            Route::Translated => {
                self.fanout.tx.send((payload.to_vec(), Origin::Translated, false, trace.clone())).map_err(closed)?;
            }
            Route::Deliver { chat_id } => {
                let feeds = self.feeds.lock().expect("feeds lock");
                for feed in feeds.iter().filter(|f| f.bound.lock().expect("feed lock").contains(chat_id)) {
                    // A feed whose gateway stopped has nobody left to deliver to.
                    let _ = feed.tx.send(FeedEvent::Delivery { payload: payload.to_vec(), trace: trace.clone() });
                }
            }
        }
        Ok(())
    }

    async fn consume(&self, source: Source<'_>) -> Result<IncomingStream, BusError> {
        let queue = match source {
            Source::Fanout => self.fanout.clone(),
            Source::Translate { language, .. } => self
                .translate
                .get(language)
                .cloned()
                .ok_or_else(|| BusError::InProcess(format!("has no queue for language {language}")))?,
        };
        let rx = queue
            .rx
            .lock()
            .expect("queue lock")
            .take()
            .ok_or_else(|| BusError::InProcess(format!("allows one consumer per queue ({source:?})")))?;
        let dead = self.dead.clone();
        let stream = UnboundedReceiverStream::new(rx).map(move |item| {
            let acker = MemoryAcker { item: item.clone(), queue: queue.clone(), dead: dead.clone() };
            Ok(Incoming::new(item.0, item.1, item.2, item.3, Box::new(acker)))
        });
        Ok(stream.boxed())
    }

    async fn delivery_feed(&self) -> Result<(Arc<dyn ChatBinder>, DeliveryStream), BusError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed { bound: Mutex::default(), tx });
        self.feeds.lock().expect("feeds lock").push(feed.clone());
        Ok((feed, UnboundedReceiverStream::new(rx).boxed()))
    }

    fn is_ready(&self) -> bool {
        true
    }

    async fn close(&self) {}
}
