//! The fanout role: the one writer of chat history. It consumes originals and translations, has the
//! history store give each a per-chat `seq` (or recognise a redelivery), publishes the deliveries
//! keyed by chat id, and acks only once both the store and the publish are confirmed.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    bus::{next_unless_cancelled, Bus, BusError, Incoming, Origin, Outgoing, Route, Source, TraceHeaders},
    history::{Appended, History, HistoryError},
    wire::{Delivery, MessagePosted, MessageTranslated},
};

/// Why the fanout stopped.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("failed to store a batch of deliveries: {0}")]
    History(#[from] HistoryError),
}

/// Consumes `<P>.fanout` and publishes every new original and translation as a [`Delivery`].
pub struct Fanout {
    pub bus: Arc<dyn Bus>,
    pub history: Arc<dyn History>,
    /// Every fanout runs the retention loop; the store lets one delete at a time (PostgreSQL: the one
    /// holding an advisory lock), so an idle active fanout and a standby alike keep the history short.
    pub retention: Option<Retention>,
}

/// How long deliveries stay in the history, and how it is enforced.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub keep: Duration,
    /// How often a pass runs.
    pub every: Duration,
    /// Deliveries one statement deletes at most.
    pub batch: u32,
}

impl Retention {
    /// Passes often enough to stay close to `keep`, rarely enough to cost nothing, in batches of 1,000.
    pub fn new(keep: Duration) -> Self {
        Self { keep, every: (keep / 100).clamp(Duration::from_secs(1), Duration::from_secs(600)), batch: 1000 }
    }
}

/// A consumed message, decoded into the delivery it becomes (its `seq` not given yet).
fn decode(incoming: &Incoming) -> serde_json::Result<Delivery> {
    match incoming.origin {
        Origin::Posted => {
            serde_json::from_slice::<MessagePosted>(&incoming.payload).map(|m| Delivery::of_original(m, 0))
        }
        Origin::Translated | Origin::Unknown => {
            serde_json::from_slice::<MessageTranslated>(&incoming.payload).map(|m| Delivery::of_translation(m, 0))
        }
    }
}

impl Fanout {
    pub fn new(bus: Arc<dyn Bus>, history: Arc<dyn History>, retention: Option<Retention>) -> Self {
        Self { bus, history, retention }
    }

    pub async fn run(self, cancel: CancellationToken) -> Result<(), FanoutError> {
        let mut messages = self.bus.consume(Source::Fanout).await?;
        // From 0, so that an alert on its increase sees the first dead letter too.
        let _ = crate::metrics::metrics().dead_lettered.get_or_create(&crate::metrics::RoleLabel { role: "fanout" });
        // A standby consumes too, and receives nothing until the active consumer goes.
        tracing::info!("fanout consuming");
        let _retention = self.start_retention(&cancel).drop_guard();
        let mut active = false;
        while let Some(first) = next_unless_cancelled(&mut messages, &cancel).await {
            if !active {
                tracing::info!("fanout active");
                active = true;
            }
            // Whatever else has already arrived joins the batch: one store transaction and one
            // confirm round trip for all of it.
            let mut batch = vec![first?];
            while batch.len() < Source::Fanout.batch() {
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

    /// Stores a batch in arrival order, publishes its deliveries, and acks each message only after
    /// the store and every publish are confirmed.
    async fn handle(&self, batch: Vec<Incoming>) -> Result<(), FanoutError> {
        let mut held: Vec<Incoming> = Vec::with_capacity(batch.len());
        let mut deliveries: Vec<Delivery> = Vec::with_capacity(batch.len());
        // Where each (message id, language) of the batch is held.
        let mut in_batch: HashMap<(Uuid, String), usize> = HashMap::new();
        // Each held message's part of its trace, from its arrival here to its delivery's publish.
        let mut spans: Vec<tracing::Span> = Vec::with_capacity(batch.len());
        for incoming in batch {
            let delivery = match decode(&incoming) {
                Ok(delivery) => delivery,
                Err(err) => {
                    tracing::error!(origin = ?incoming.origin, error = %err, "dead-lettering an undecodable message");
                    crate::metrics::metrics()
                        .dead_lettered
                        .get_or_create(&crate::metrics::RoleLabel { role: "fanout" })
                        .inc();
                    incoming.dead_letter().await?;
                    continue;
                }
            };
            if let Some(&first) = in_batch.get(&(delivery.id, delivery.language.clone())) {
                tracing::debug!(id = %delivery.id, language = delivery.language, "dropping a duplicate within a batch");
                // The copy kept stands for both: if either was redelivered, its first publish may be lost.
                held[first].redelivered |= incoming.redelivered;
                incoming.ack().await?;
                continue;
            }
            in_batch.insert((delivery.id, delivery.language.clone()), held.len());
            let span = tracing::info_span!("fan_out", trace_id = tracing::field::Empty);
            incoming.trace.continue_in(&span);
            spans.push(span);
            held.push(incoming);
            deliveries.push(delivery);
        }
        if held.is_empty() {
            return Ok(());
        }
        // A batch that cannot be stored is left unsettled: the role stops, and the broker hands it out
        // again, in order, on the next channel.
        let started = std::time::Instant::now();
        let metrics = crate::metrics::metrics();
        metrics.fanout_batch.observe(deliveries.len() as f64);
        let appended = self.history.append(deliveries).await?;
        metrics.store_latency.observe(started.elapsed().as_secs_f64());
        tracing::debug!(deliveries = appended.len(), took = ?started.elapsed(), "stored a batch");
        // A redelivered message is published again with the seq it was stored with: its first publish
        // may not have been confirmed. Gateways recognise a copy they already handed out. A stored one
        // that comes anew (not redelivered) is a second publish of it, by a client retrying with its
        // idempotency key or a translator retrying its message: the first copy was consumed here, so it
        // was either published and acked, or it comes back redelivered. It publishes nothing.
        let payloads: Vec<(String, Vec<u8>, TraceHeaders)> = appended
            .iter()
            .zip(&held)
            .zip(&spans)
            .filter_map(|((a, incoming), span)| {
                let _entered = span.enter();
                if let Appended::Duplicate(d) = a {
                    if !incoming.redelivered {
                        tracing::debug!(id = %d.id, language = d.language, seq = d.seq, "a stored delivery sent again; publishing nothing");
                        return None;
                    }
                    tracing::debug!(id = %d.id, language = d.language, seq = d.seq, "publishing a redelivery again");
                }
                let d = a.delivery();
                tracing::debug!(id = %d.id, language = d.language, seq = d.seq, "stored; publishing the delivery");
                let payload = serde_json::to_vec(d).expect("a delivery always encodes");
                Some((d.chat_id.clone(), payload, TraceHeaders::of(span)))
            })
            .collect();
        let messages: Vec<Outgoing<'_>> = payloads
            .iter()
            .map(|(chat_id, payload, trace)| Outgoing { route: Route::Deliver { chat_id }, payload, trace })
            .collect();
        let started = std::time::Instant::now();
        let published = self.bus.publish_all(&messages).await;
        tracing::debug!(deliveries = messages.len(), took = ?started.elapsed(), "published a batch");
        match published {
            Ok(()) => {
                // One acknowledgement for the batch: the last message's, covering every earlier one.
                if let Some(last) = held.pop() {
                    last.ack_all_up_to().await?;
                }
                Ok(())
            }
            // A refused publish, or a channel gone: the role starts again on a fresh channel, and the
            // broker hands the unacked messages out again in order, so they are published again with
            // their stored numbers before anything later. Requeueing them one by one and going on
            // would publish later numbers first.
            Err(err) => Err(err.into()),
        }
    }
}

impl Fanout {
    /// Starts keeping the history within its retention, if it has one, until the token returned (or
    /// `cancel`) fires.
    fn start_retention(&self, cancel: &CancellationToken) -> CancellationToken {
        let stop = cancel.child_token();
        if let Some(retention) = self.retention {
            tokio::spawn(enforce_retention(self.history.clone(), retention, stop.clone()));
        }
        stop
    }
}

/// Deletes deliveries older than `retention.keep`, in batches, every `retention.every`, until
/// `cancel` fires. A separate task: it never holds up delivery.
pub async fn enforce_retention(history: Arc<dyn History>, retention: Retention, cancel: CancellationToken) {
    let Retention { keep, every, batch } = retention;
    loop {
        let cutoff = std::time::SystemTime::now() - keep;
        let mut deleted = 0u64;
        loop {
            match history.expire(cutoff, batch).await {
                Ok(n) => {
                    deleted += n;
                    if n < u64::from(batch) {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "failed to expire old deliveries; trying again later");
                    break;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                // A pause between batches leaves the database to the deliveries.
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, retention = ?keep, "expired old deliveries");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bus::memory::MemoryBus, history::memory::MemoryHistory, wire::WIRE_VERSION};

    fn posted(chat: &str, text: &str) -> MessagePosted {
        MessagePosted {
            v: WIRE_VERSION,
            id: Uuid::now_v7(),
            chat_id: chat.into(),
            sender: None,
            sender_id: None,
            text: text.into(),
            source_language: "en".into(),
            sent_at: crate::wire::now_rfc3339(),
            reply_to: None,
        }
    }

    #[tokio::test]
    async fn deliveries_are_numbered_per_chat_and_a_stored_one_sent_anew_is_not_delivered_again() {
        let bus = Arc::new(MemoryBus::new::<&str>(&[]));
        let history = Arc::new(MemoryHistory::default());
        let (binder, mut feed) = bus.delivery_feed().await.unwrap();
        binder.bind("x").await.unwrap();
        binder.bind("y").await.unwrap();
        let cancel = CancellationToken::new();
        let running = tokio::spawn(Fanout::new(bus.clone(), history.clone(), None).run(cancel.clone()));
        let (a, b, c, d) = (posted("x", "a"), posted("x", "b"), posted("y", "c"), posted("x", "d"));
        let mut seen = Vec::new();
        // `a` is published again (as an idempotent retry is) in a later batch, before `d`.
        for (round, expected) in [(vec![&a, &b, &c], 3), (vec![&a, &d], 1)] {
            for message in &round {
                let payload = serde_json::to_vec(message).unwrap();
                let trace = TraceHeaders::default();
                bus.publish(Outgoing { route: Route::Posted, payload: &payload, trace: &trace }).await.unwrap();
            }
            for _ in 0..expected {
                let event = tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap();
                let crate::bus::FeedEvent::Delivery { payload, .. } = event else { panic!("{event:?}") };
                let delivery: Delivery = serde_json::from_slice(&payload).unwrap();
                seen.push((delivery.chat_id, delivery.text, delivery.seq));
            }
        }
        cancel.cancel();
        running.await.unwrap().unwrap();
        assert!(feed.next().now_or_never().flatten().is_none(), "nothing more was delivered: {seen:?}");
        let x: Vec<_> =
            seen.iter().filter(|(chat, ..)| chat == "x").map(|(_, text, seq)| (text.as_str(), *seq)).collect();
        assert_eq!(x, vec![("a", 1), ("b", 2), ("d", 3)], "the second `a` is not delivered and takes no number");
        assert!(seen.contains(&("y".into(), "c".into(), 1)), "each chat counts from 1: {seen:?}");
        assert_eq!(history.last_seq("x").await.unwrap(), 3);
    }
}
