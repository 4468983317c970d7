//! The fanout role: stamps per-chat sequence numbers, drops duplicates, and publishes deliveries keyed by chat id.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use futures_util::{FutureExt, StreamExt};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    bus::{next_unless_cancelled, Bus, BusError, Incoming, Origin, Route, Source},
    wire::{Delivery, MessagePosted, MessageTranslated},
};

/// Per-chat sequence numbers and a bounded memory of what was already delivered.
///
/// Reserving a number and committing it are separate so that a delivery the bus did not confirm
/// leaves no trace: its redelivery gets the same number and is not mistaken for a duplicate.
pub struct Sequencer {
    next: HashMap<String, u64>,
    seen: HashSet<(Uuid, String)>,
    order: VecDeque<(Uuid, String)>,
    capacity: usize,
}

impl Sequencer {
    /// Remembers the last `capacity` deliveries for duplicate detection.
    pub fn new(capacity: usize) -> Self {
        Self { next: HashMap::new(), seen: HashSet::new(), order: VecDeque::new(), capacity }
    }

    /// The number the next delivery of `chat_id` gets, or `None` if (`id`, `language`) was delivered already.
    pub fn reserve(&self, chat_id: &str, id: Uuid, language: &str) -> Option<u64> {
        if self.seen.contains(&(id, language.to_owned())) {
            return None;
        }
        Some(self.next.get(chat_id).copied().unwrap_or(1))
    }

    /// Records that the delivery reserved for (`id`, `language`) in `chat_id` was published.
    pub fn commit(&mut self, chat_id: &str, id: Uuid, language: &str) {
        *self.next.entry(chat_id.to_owned()).or_insert(1) += 1;
        let key = (id, language.to_owned());
        if self.seen.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }
}

/// Consumes `<P>.fanout` and publishes every new original and translation as a [`Delivery`].
pub struct Fanout {
    pub bus: Arc<dyn Bus>,
    pub sequencer: Sequencer,
}

impl Fanout {
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        Self { bus, sequencer: Sequencer::new(1 << 20) }
    }

    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), BusError> {
        let mut messages = self.bus.consume(Source::Fanout).await?;
        tracing::info!("fanout consuming");
        while let Some(first) = next_unless_cancelled(&mut messages, &cancel).await {
            // Whatever else has already arrived joins the batch: one confirm round trip for all of it.
            let mut batch = vec![first?];
            while batch.len() < usize::from(Source::Fanout.prefetch()) {
                match messages.next().now_or_never() {
                    Some(Some(incoming)) => batch.push(incoming?),
                    _ => break,
                }
            }
            self.handle(batch).await?;
        }
        tracing::info!("fanout stopped");
        Ok(())
    }

    /// Sequences a batch in arrival order, publishes its deliveries, and acks each message only after
    /// every delivery is confirmed (or requeues the batch, leaving its sequence numbers unused).
    async fn handle(&mut self, batch: Vec<Incoming>) -> Result<(), BusError> {
        let mut staged: Vec<Staged> = Vec::with_capacity(batch.len());
        let mut taken: HashMap<String, u64> = HashMap::new();
        let mut seen: HashSet<(Uuid, String)> = HashSet::new();
        for incoming in batch {
            let decoded = match incoming.origin {
                Origin::Posted => serde_json::from_slice::<MessagePosted>(&incoming.payload)
                    .map(|m| (m.chat_id.clone(), m.id, m.source_language.clone(), Received::Posted(m))),
                Origin::Translated | Origin::Unknown => serde_json::from_slice::<MessageTranslated>(&incoming.payload)
                    .map(|m| (m.chat_id.clone(), m.id, m.language.clone(), Received::Translated(m))),
            };
            let (chat_id, id, language, message) = match decoded {
                Ok(decoded) => decoded,
                Err(err) => {
                    tracing::error!(origin = ?incoming.origin, error = %err, "dead-lettering an undecodable message");
                    incoming.dead_letter().await?;
                    continue;
                }
            };
            let fresh = seen.insert((id, language.clone()));
            let Some(next) = self.sequencer.reserve(&chat_id, id, &language).filter(|_| fresh) else {
                tracing::debug!(%id, language, "dropping a duplicate");
                incoming.ack().await?;
                continue;
            };
            let offset = taken.entry(chat_id.clone()).or_default();
            let seq = next + *offset;
            *offset += 1;
            let delivery = match message {
                Received::Posted(m) => Delivery::of_original(m, seq),
                Received::Translated(m) => Delivery::of_translation(m, seq),
            };
            let payload = serde_json::to_vec(&delivery).expect("a delivery always encodes");
            staged.push(Staged { incoming, chat_id, id, language, payload });
        }
        if staged.is_empty() {
            return Ok(());
        }
        let messages: Vec<(Route<'_>, &[u8])> =
            staged.iter().map(|s| (Route::Deliver { chat_id: &s.chat_id }, s.payload.as_slice())).collect();
        let published = self.bus.publish_all(&messages).await;
        drop(messages);
        match published {
            Ok(()) => {
                for s in staged {
                    self.sequencer.commit(&s.chat_id, s.id, &s.language);
                    s.incoming.ack().await?;
                }
            }
            Err(err) => {
                tracing::warn!(messages = staged.len(), error = %err, "deliveries not confirmed; requeueing");
                for s in staged {
                    s.incoming.requeue().await?;
                }
            }
        }
        Ok(())
    }
}

struct Staged {
    incoming: Incoming,
    chat_id: String,
    id: Uuid,
    language: String,
    payload: Vec<u8>,
}

/// A consumed message, decoded.
enum Received {
    Posted(MessagePosted),
    Translated(MessageTranslated),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_count_per_chat_from_one() {
        let mut s = Sequencer::new(10);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(s.reserve("x", a, "en"), Some(1));
        s.commit("x", a, "en");
        assert_eq!(s.reserve("x", a, "es"), Some(2));
        s.commit("x", a, "es");
        assert_eq!(s.reserve("y", b, "en"), Some(1));
    }

    #[test]
    fn a_redelivered_message_in_the_same_language_is_a_duplicate() {
        let mut s = Sequencer::new(10);
        let a = Uuid::now_v7();
        s.commit("x", a, "en");
        assert_eq!(s.reserve("x", a, "en"), None);
        assert_eq!(s.reserve("x", a, "ca"), Some(2));
    }

    #[test]
    fn an_unconfirmed_delivery_keeps_its_number_for_the_retry() {
        let s = Sequencer::new(10);
        let a = Uuid::now_v7();
        assert_eq!(s.reserve("x", a, "en"), Some(1));
        // Not committed: the publish failed and the message comes back.
        assert_eq!(s.reserve("x", a, "en"), Some(1));
    }

    #[test]
    fn duplicate_memory_is_bounded() {
        let mut s = Sequencer::new(2);
        let ids: Vec<_> = (0..3).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            s.commit("x", *id, "en");
        }
        assert_eq!(s.reserve("x", ids[0], "en"), Some(4), "oldest forgotten");
        assert_eq!(s.reserve("x", ids[2], "en"), None);
    }
}
