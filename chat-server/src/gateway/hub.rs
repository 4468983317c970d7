//! The gateway's hub: per chat, one broadcast of decoded deliveries shared by every local subscriber.
//!
//! The first subscriber of a chat binds it on the bus and the last one to leave unbinds it, so a
//! gateway process receives one copy of each delivery for the chats its clients watch, decodes it
//! once, and hands every subscriber the same `Arc`. A delivery the fanout publishes again (it retries
//! a batch whose confirms it lost) is recognised by its message id and language and not handed out twice.
//!
//! Deliveries the broker could not route here (while this gateway's connection was down and its
//! queue gone) leave a gap in a chat's `seq`: with a history, the hub reads the missing ones from it
//! and hands them out first, when the next delivery shows the gap or when the feed says it resumed.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex as StdMutex, RwLock},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::sync::{broadcast, Mutex};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    bus::{BusError, ChatBinder, DeliveryStream, FeedEvent, Source},
    history::{History, Languages, MAX_PAGE},
    wire::Delivery,
};

struct Room {
    feed: Arc<RoomFeed>,
    subscribers: usize,
}

/// Deliveries of one chat recently handed out, to recognise one published again. What the fanout
/// publishes again is what it held unacknowledged when its channel failed, at most its prefetch, and it
/// comes before anything newer: twice that is room to spare.
const RECENT: usize = 2 * Source::Fanout.prefetch() as usize;

/// (message id, language) of a delivery.
type DeliveryKey = (Uuid, String);

/// What dispatching to one chat needs.
struct RoomFeed {
    tx: broadcast::Sender<Arc<Delivery>>,
    /// The keys handed out lately, as a set and in order.
    recent: StdMutex<(HashSet<DeliveryKey>, VecDeque<DeliveryKey>)>,
    /// The highest `seq` handed out (0: none yet).
    last_seq: std::sync::atomic::AtomicU64,
}

impl RoomFeed {
    /// False when this delivery was handed out already.
    fn first_time(&self, delivery: &Delivery) -> bool {
        let mut recent = self.recent.lock().expect("recent lock");
        let (seen, order) = &mut *recent;
        let key = (delivery.id, delivery.language.clone());
        if !seen.insert(key.clone()) {
            return false;
        }
        order.push_back(key);
        if order.len() > RECENT {
            if let Some(old) = order.pop_front() {
                seen.remove(&old);
            }
        }
        true
    }
}

/// Deliveries a chat's subscription executions may fall behind before they are dropped. They are few
/// (one per distinct operation, see `shared`) and fast; each client's own queue is bounded elsewhere.
pub const BACKLOG: usize = 1024;

/// How long filling one gap from the history may hold the feed up.
const FILL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long binding a chat on the bus may take before the subscription fails.
const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Rooms by chat id, and the binder that routes a chat's deliveries to this process.
pub struct Hub {
    /// Membership; held across bind and unbind so they stay in order for a chat.
    rooms: Mutex<HashMap<String, Room>>,
    /// What delivery needs, readable without waiting for a bind in progress.
    senders: RwLock<HashMap<String, Arc<RoomFeed>>>,
    binder: Arc<dyn ChatBinder>,
    capacity: usize,
    /// Where gaps are filled from.
    history: Option<Arc<dyn History>>,
}

/// Why a subscription ended early.
#[derive(Debug, PartialEq, Eq)]
pub enum Missed {
    /// The subscriber fell this many deliveries behind and they were dropped for it.
    Lagged(u64),
    /// The hub shut down.
    Closed,
}

/// One subscriber's view of a chat; leaving the chat happens on drop.
pub struct RoomSubscription {
    rx: broadcast::Receiver<Arc<Delivery>>,
    _leave: Leave,
}

impl RoomSubscription {
    pub async fn recv(&mut self) -> Result<Arc<Delivery>, Missed> {
        self.rx.recv().await.map_err(|err| match err {
            broadcast::error::RecvError::Lagged(n) => Missed::Lagged(n),
            broadcast::error::RecvError::Closed => Missed::Closed,
        })
    }
}

struct Leave {
    hub: Arc<Hub>,
    chat_id: String,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let hub = self.hub.clone();
        let chat_id = std::mem::take(&mut self.chat_id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { hub.leave(&chat_id).await });
        }
    }
}

impl Hub {
    /// `capacity` is how many deliveries a subscriber may fall behind before it is dropped.
    pub fn new(binder: Arc<dyn ChatBinder>, capacity: usize) -> Arc<Self> {
        Self::with_history(binder, capacity, None)
    }

    /// A hub that fills the gaps in a chat's deliveries from `history`.
    pub fn with_history(binder: Arc<dyn ChatBinder>, capacity: usize, history: Option<Arc<dyn History>>) -> Arc<Self> {
        Arc::new(Self { rooms: Mutex::default(), senders: RwLock::default(), binder, capacity, history })
    }

    /// Joins `chat_id`, binding it on the bus first when this is its first local subscriber.
    pub async fn subscribe(self: &Arc<Self>, chat_id: &str) -> Result<RoomSubscription, BusError> {
        let mut rooms = self.rooms.lock().await;
        let rx = match rooms.get_mut(chat_id) {
            Some(room) => {
                room.subscribers += 1;
                room.feed.tx.subscribe()
            }
            None => {
                // Holding the lock across the bind keeps a concurrent leave from unbinding under us.
                tokio::time::timeout(BIND_TIMEOUT, self.binder.bind(chat_id))
                    .await
                    .map_err(|_| BusError::Timeout(format!("binding chat {chat_id}")))??;
                let (tx, rx) = broadcast::channel(self.capacity);
                // Where the chat stands now, so that a delivery lost before the first one arrives here
                // is a gap too (bound first: whatever comes after this read is routed here).
                let newest = match &self.history {
                    Some(history) => {
                        tokio::time::timeout(FILL_TIMEOUT, history.last_seq(chat_id)).await.ok().and_then(Result::ok)
                    }
                    None => None,
                };
                let last_seq = std::sync::atomic::AtomicU64::new(newest.unwrap_or(0));
                let feed = Arc::new(RoomFeed { tx, recent: StdMutex::default(), last_seq });
                self.senders.write().expect("senders lock").insert(chat_id.to_owned(), feed.clone());
                rooms.insert(chat_id.to_owned(), Room { feed, subscribers: 1 });
                rx
            }
        };
        Ok(RoomSubscription { rx, _leave: Leave { hub: self.clone(), chat_id: chat_id.to_owned() } })
    }

    async fn leave(&self, chat_id: &str) {
        let mut rooms = self.rooms.lock().await;
        let Some(room) = rooms.get_mut(chat_id) else {
            return;
        };
        room.subscribers -= 1;
        if room.subscribers == 0 {
            rooms.remove(chat_id);
            self.senders.write().expect("senders lock").remove(chat_id);
            if let Err(err) = self.binder.unbind(chat_id).await {
                tracing::warn!(chat_id, error = %err, "failed to unbind a chat nobody here watches any more");
            }
        }
    }

    /// How many chats have local subscribers.
    pub async fn chats(&self) -> usize {
        self.rooms.lock().await.len()
    }

    /// Hands one delivery to every local subscriber of its chat, unless it was handed out already;
    /// deliveries missing before it are read from the history and handed out first.
    pub async fn dispatch(&self, delivery: Arc<Delivery>) {
        let feed = self.senders.read().expect("senders lock").get(&delivery.chat_id).cloned();
        if let Some(feed) = feed {
            let last = feed.last_seq.load(std::sync::atomic::Ordering::Acquire);
            if last > 0 && delivery.seq > last + 1 {
                self.fill_within(&feed, &delivery.chat_id, last, delivery.seq - 1).await;
            }
            Self::hand_out(&feed, delivery);
        }
    }

    fn hand_out(feed: &RoomFeed, delivery: Arc<Delivery>) {
        if !feed.first_time(&delivery) {
            tracing::debug!(id = %delivery.id, language = delivery.language, "dropping a delivery published again");
            return;
        }
        feed.last_seq.fetch_max(delivery.seq, std::sync::atomic::Ordering::AcqRel);
        let metrics = crate::metrics::metrics();
        metrics.deliveries.inc();
        if let Some(seconds) = crate::metrics::since(&delivery.sent_at) {
            let language = crate::metrics::LanguageLabel { language: delivery.language.clone() };
            metrics.delivered_latency.get_or_create(&language).observe(seconds);
        }
        // No receivers left means the last subscriber is leaving right now: nothing to do.
        let _ = feed.tx.send(delivery);
    }

    /// [`Hub::fill`], given up after [`FILL_TIMEOUT`]: a history that does not answer must not hold
    /// every chat's deliveries up.
    async fn fill_within(&self, feed: &RoomFeed, chat_id: &str, after: u64, up_to: u64) {
        if tokio::time::timeout(FILL_TIMEOUT, self.fill(feed, chat_id, after, up_to)).await.is_err() {
            tracing::warn!(chat_id, after, "the history did not answer in time; a gap stays unfilled");
        }
    }

    /// Hands out the stored deliveries of a chat with `after < seq <= up_to`.
    async fn fill(&self, feed: &RoomFeed, chat_id: &str, after: u64, up_to: u64) {
        let Some(history) = &self.history else { return };
        let mut cursor = after;
        while cursor < up_to {
            match history.range(chat_id, Languages(None), cursor, up_to, MAX_PAGE).await {
                Ok(page) if page.is_empty() => break,
                Ok(page) => {
                    tracing::info!(chat_id, after = cursor, deliveries = page.len(), "filling a gap from the history");
                    crate::metrics::metrics().gap_filled.inc_by(page.len() as u64);
                    for stored in page {
                        cursor = stored.delivery.seq;
                        Self::hand_out(feed, stored.delivery);
                    }
                }
                Err(err) => {
                    tracing::warn!(chat_id, error = %err, "cannot read the history to fill a gap");
                    break;
                }
            }
        }
    }

    /// After the feed resumed: each chat's deliveries newer than the last handed out, from the history.
    async fn fill_every_chat(&self) {
        let feeds: Vec<(String, Arc<RoomFeed>)> =
            self.senders.read().expect("senders lock").iter().map(|(c, f)| (c.clone(), f.clone())).collect();
        for (chat_id, feed) in feeds {
            let last = feed.last_seq.load(std::sync::atomic::Ordering::Acquire);
            if last > 0 {
                // Up to whatever is stored: one range read, paged, with no count first.
                self.fill_within(&feed, &chat_id, last, u64::MAX).await;
            }
        }
    }

    /// Decodes each encoded delivery of `feed` once and dispatches it, inside a span of the message's
    /// trace, until the feed ends; when the feed resumed after its connection recovered, fills what it
    /// missed.
    pub async fn run_feed(self: Arc<Self>, mut feed: DeliveryStream) {
        while let Some(event) = feed.next().await {
            let (payload, trace) = match event {
                FeedEvent::Delivery { payload, trace } => (payload, trace),
                FeedEvent::Resumed => {
                    self.fill_every_chat().await;
                    continue;
                }
            };
            let span = tracing::info_span!("deliver", trace_id = tracing::field::Empty);
            trace.continue_in(&span);
            // One entry into the span for the whole delivery: this is the broadcast path.
            async {
                match serde_json::from_slice::<Delivery>(&payload) {
                    Ok(delivery) => {
                        tracing::debug!(id = %delivery.id, language = delivery.language, seq = delivery.seq, "delivery received");
                        self.dispatch(Arc::new(delivery)).await;
                    }
                    Err(err) => tracing::error!(error = %err, bytes = payload.len(), "dropping an undecodable delivery"),
                }
            }
            .instrument(span)
            .await;
        }
        tracing::warn!("delivery feed ended");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex as StdMutex;

    use async_trait::async_trait;

    use super::*;

    #[derive(Default)]
    struct RecordingBinder(StdMutex<Vec<String>>);

    #[async_trait]
    impl ChatBinder for RecordingBinder {
        async fn bind(&self, chat_id: &str) -> Result<(), BusError> {
            self.0.lock().unwrap().push(format!("bind {chat_id}"));
            Ok(())
        }

        async fn unbind(&self, chat_id: &str) -> Result<(), BusError> {
            self.0.lock().unwrap().push(format!("unbind {chat_id}"));
            Ok(())
        }
    }

    /// An original English delivery of `text` to `chat_id`.
    pub(crate) fn delivery(chat_id: &str, text: &str) -> Arc<Delivery> {
        Arc::new(Delivery {
            v: 1,
            id: uuid::Uuid::now_v7(),
            chat_id: chat_id.into(),
            seq: 1,
            language: "en".into(),
            source_language: "en".into(),
            original: true,
            text: text.into(),
            sender: None,
            sender_id: None,
            sent_at: String::new(),
            reply_to: None,
        })
    }

    /// Waits until `chat_id` has `count` local subscribers (leaving runs in a task of its own).
    async fn until_subscribers(hub: &Hub, chat_id: &str, count: usize) {
        for _ in 0..1000 {
            let now = hub.rooms.lock().await.get(chat_id).map_or(0, |room| room.subscribers);
            if now == count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{chat_id} never had {count} subscribers");
    }

    #[tokio::test]
    async fn a_chat_is_bound_for_its_first_subscriber_and_unbound_after_its_last() {
        let binder = Arc::new(RecordingBinder::default());
        let hub = Hub::new(binder.clone(), 8);
        let first = hub.subscribe("c").await.unwrap();
        let second = hub.subscribe("c").await.unwrap();
        drop(first);
        // The first has left (so an unbind would have happened by now), and the chat stays bound.
        until_subscribers(&hub, "c", 1).await;
        assert_eq!(*binder.0.lock().unwrap(), vec!["bind c"]);
        drop(second);
        until_subscribers(&hub, "c", 0).await;
        // The room goes before the unbind call; the binder is called under the same lock.
        assert_eq!(hub.chats().await, 0);
        assert_eq!(*binder.0.lock().unwrap(), vec!["bind c", "unbind c"]);
    }

    #[tokio::test]
    async fn every_subscriber_of_a_chat_shares_one_decoded_delivery() {
        let hub = Hub::new(Arc::new(RecordingBinder::default()), 8);
        let mut a = hub.subscribe("c").await.unwrap();
        let mut b = hub.subscribe("c").await.unwrap();
        let mut other = hub.subscribe("d").await.unwrap();
        let sent = delivery("c", "hi");
        hub.dispatch(sent.clone()).await;
        let (got_a, got_b) = (a.recv().await.unwrap(), b.recv().await.unwrap());
        assert!(Arc::ptr_eq(&got_a, &sent) && Arc::ptr_eq(&got_b, &sent));
        hub.dispatch(delivery("d", "hi")).await;
        assert_eq!(other.recv().await.unwrap().chat_id, "d");
    }

    #[tokio::test]
    async fn a_delivery_published_again_is_handed_out_once() {
        let hub = Hub::new(Arc::new(RecordingBinder::default()), 8);
        let mut subscriber = hub.subscribe("c").await.unwrap();
        let first = delivery("c", "hi");
        hub.dispatch(first.clone()).await;
        hub.dispatch(Arc::new((*first).clone())).await;
        let next = delivery("c", "next");
        hub.dispatch(next.clone()).await;
        assert!(Arc::ptr_eq(&subscriber.recv().await.unwrap(), &first));
        assert!(Arc::ptr_eq(&subscriber.recv().await.unwrap(), &next), "the copy was dropped");
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_learns_how_much_it_missed() {
        let hub = Hub::new(Arc::new(RecordingBinder::default()), 2);
        let mut slow = hub.subscribe("c").await.unwrap();
        for _ in 0..5 {
            hub.dispatch(delivery("c", "hi")).await;
        }
        assert_eq!(slow.recv().await.unwrap_err(), Missed::Lagged(3));
    }

    #[tokio::test]
    async fn a_gap_in_a_chats_seq_is_filled_from_the_history_before_the_delivery_that_shows_it() {
        let history = Arc::new(crate::history::memory::MemoryHistory::default());
        let hub = Hub::with_history(Arc::new(RecordingBinder::default()), 16, Some(history.clone()));
        let mut subscriber = hub.subscribe("c").await.unwrap();
        let stored: Vec<Delivery> = (0..5).map(|i| Delivery::clone(&delivery("c", &format!("m{i}")))).collect();
        let appended = history.append(stored).await.unwrap();
        let numbered: Vec<Arc<Delivery>> = appended.iter().map(|a| Arc::new(a.delivery().clone())).collect();
        // 2 and 3 never came from the bus; 4 shows the gap. 5 is lost too, and the feed then resumes.
        hub.dispatch(numbered[0].clone()).await;
        hub.dispatch(numbered[3].clone()).await;
        let mut seqs = Vec::new();
        for _ in 0..4 {
            seqs.push(subscriber.recv().await.unwrap().seq);
        }
        assert_eq!(seqs, [1, 2, 3, 4]);
        hub.fill_every_chat().await;
        assert_eq!(subscriber.recv().await.unwrap().seq, 5, "what was lost at the end, after a resume");
        hub.dispatch(numbered[4].clone()).await;
        hub.dispatch(numbered[1].clone()).await;
        assert!(subscriber.rx.try_recv().is_err(), "nothing twice");

        // A chat joined after deliveries were stored starts from where it stands: the first delivery
        // lost after joining is a gap too.
        let before: Vec<Delivery> = (0..2).map(|i| Delivery::clone(&delivery("d", &format!("d{i}")))).collect();
        history.append(before).await.unwrap();
        let mut other = hub.subscribe("d").await.unwrap();
        let after: Vec<Delivery> = (0..2).map(|i| Delivery::clone(&delivery("d", &format!("e{i}")))).collect();
        let after = history.append(after).await.unwrap();
        hub.dispatch(Arc::new(after[1].delivery().clone())).await;
        assert_eq!(other.recv().await.unwrap().seq, 3, "seq 3 was lost and filled");
        assert_eq!(other.recv().await.unwrap().seq, 4);
    }
}
