//! The translator role: competing consumers of one language's queue that translate, publish with a
//! confirm, then ack.
//!
//! Up to `--translate-concurrency` provider calls are in flight per replica, so a replica's throughput
//! is not one over the provider's latency. Where the provider takes several texts per call
//! (LibreTranslate), the messages waiting are sent together. Recent translations are remembered
//! ([`cache`]), so a text said again costs no provider call. Translations are published as their
//! calls finish, so those of one chat may reach the fanout (and get their `seq`) in another order
//! than their originals, as they already could with several replicas.

pub mod cache;
pub mod provider;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::metrics::{metrics, LanguageLabel, ProviderLabels, RoleLabel, Translation};
use crate::{
    bus::{next_unless_cancelled, Bus, BusError, Incoming, Outgoing, Route, Source, TraceHeaders},
    wire::{MessagePosted, MessageTranslated, PASSTHROUGH_PROVIDER, WIRE_VERSION},
};
use cache::TranslationCache;
use provider::{Provider, ProviderError};

/// How a translator waits out a provider that is down. It retries the messages in hand until the
/// provider answers or the process stops (then they go back to the queue): an outage is every
/// message's problem, so requeueing would only burn delivery attempts towards dead-lettering.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { first_delay: Duration::from_millis(250), max_delay: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The waits before each retry: from `first_delay`, doubling up to `max_delay`, then steady.
    pub fn delays(self) -> impl Iterator<Item = Duration> {
        std::iter::successors(Some(self.first_delay), move |delay| Some((*delay * 2).min(self.max_delay)))
    }
}

/// Translates every message of one language's queue.
pub struct Translator {
    pub language: String,
    pub bus: Arc<dyn Bus>,
    pub provider: Arc<dyn Provider>,
    pub retry: RetryPolicy,
    /// Provider calls in flight at most.
    pub concurrency: usize,
    pub cache: Arc<TranslationCache>,
}

/// What becomes of one message.
enum Outcome {
    Translated(Box<MessageTranslated>),
    /// Give the message back to the queue (its delivery count goes up; at the limit it dead-letters).
    Retry(String),
    DeadLetter(String),
}

/// A message taken from the queue, decoded.
struct Work {
    incoming: Incoming,
    posted: MessagePosted,
    /// The message's part of its trace, from its arrival here to its translation's publish.
    span: tracing::Span,
}

impl Translator {
    /// Consumes until `cancel` fires (finishing the messages in hand) or the bus gives up.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> Result<(), BusError> {
        let batch = self.provider.max_batch().max(1);
        let concurrency = self.concurrency.max(1);
        // Enough for every call in flight and one more call's worth waiting, and no more: the
        // operator's autoscaler and drain count a queue's ready messages, not the ones replicas hold.
        let prefetch = u16::try_from(concurrency + batch).unwrap_or(u16::MAX);
        let mut messages = self.bus.consume(Source::Translate { language: &self.language, prefetch }).await?;
        // From 0, so that an alert on its increase sees the first dead letter too.
        let _ = metrics().dead_lettered.get_or_create(&RoleLabel { role: "translator" });
        tracing::info!(language = %self.language, provider = self.provider.name(), concurrency, "translator consuming");
        // Ends the retries of the calls in hand however the role ends, not only on SIGTERM.
        let stop = cancel.child_token();
        let calls = Arc::new(Semaphore::new(concurrency));
        let mut in_flight: JoinSet<Result<(), BusError>> = JoinSet::new();
        let result = 'consume: loop {
            // A finished batch that lost the bus stops the role: its messages go back to the queue.
            while let Some(done) = in_flight.try_join_next() {
                if let Err(err) = settled(done) {
                    break 'consume Err(err);
                }
            }
            let permit = tokio::select! {
                _ = cancel.cancelled() => break 'consume Ok(()),
                permit = calls.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let mut taken = match next_unless_cancelled(&mut messages, &cancel).await {
                None => break Ok(()),
                Some(Err(err)) => break Err(err),
                Some(Ok(first)) => vec![first],
            };
            // Whatever else waits already goes along, as far as one provider call takes it.
            while taken.len() < batch {
                match messages.next().now_or_never() {
                    Some(Some(Ok(incoming))) => taken.push(incoming),
                    Some(Some(Err(err))) => break 'consume Err(err),
                    _ => break,
                }
            }
            let (translator, stop) = (self.clone(), stop.clone());
            in_flight.spawn(async move {
                let _permit = permit;
                translator.handle(taken, &stop).await
            });
        };
        stop.cancel();
        // The messages in hand are finished: translated and published, or, when the provider is down,
        // given back to the queue.
        while let Some(done) = in_flight.join_next().await {
            if let Err(err) = settled(done) {
                tracing::warn!(language = %self.language, error = %err, "a batch could not be settled");
            }
        }
        tracing::info!(language = %self.language, "translator stopped");
        result
    }

    /// Translates, publishes and settles one batch.
    async fn handle(&self, batch: Vec<Incoming>, cancel: &CancellationToken) -> Result<(), BusError> {
        let mut work = Vec::with_capacity(batch.len());
        for incoming in batch {
            match serde_json::from_slice::<MessagePosted>(&incoming.payload) {
                Ok(posted) => {
                    let span =
                        tracing::info_span!("translate", language = %self.language, trace_id = tracing::field::Empty);
                    incoming.trace.continue_in(&span);
                    work.push(Work { incoming, posted, span })
                }
                Err(err) => {
                    tracing::error!(language = %self.language, error = %err, "dead-lettering an undecodable MessagePosted");
                    metrics().dead_lettered.get_or_create(&RoleLabel { role: "translator" }).inc();
                    incoming.dead_letter().await?;
                }
            }
        }
        let outcomes = self.translate(&work, cancel).await;
        let mut translated = Vec::new();
        for (item, outcome) in work.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Translated(message) => translated.push((item.incoming, *message, item.span)),
                Outcome::Retry(reason) => {
                    item.span.in_scope(|| {
                        tracing::warn!(language = %self.language, id = %item.posted.id, reason, "giving the message back to the queue")
                    });
                    self.count(self.provider.name(), "requeued");
                    item.incoming.requeue().await?;
                }
                Outcome::DeadLetter(reason) => {
                    item.span.in_scope(|| {
                        tracing::error!(language = %self.language, id = %item.posted.id, reason, "dead-lettering a message that cannot be translated")
                    });
                    self.count(self.provider.name(), "dead_lettered");
                    metrics().dead_lettered.get_or_create(&RoleLabel { role: "translator" }).inc();
                    item.incoming.dead_letter().await?;
                }
            }
        }
        if translated.is_empty() {
            return Ok(());
        }
        let payloads: Vec<(Vec<u8>, TraceHeaders)> = translated
            .iter()
            .map(|(_, m, span)| (serde_json::to_vec(m).expect("a translation always encodes"), TraceHeaders::of(span)))
            .collect();
        let messages: Vec<Outgoing<'_>> =
            payloads.iter().map(|(payload, trace)| Outgoing { route: Route::Translated, payload, trace }).collect();
        match self.bus.publish_all(&messages).await {
            Ok(()) => {
                let latency = metrics()
                    .translated_latency
                    .get_or_create(&LanguageLabel { language: self.language.clone() })
                    .clone();
                for (incoming, message, span) in translated {
                    span.in_scope(
                        || tracing::debug!(id = %message.id, provider = message.provider, "translation published"),
                    );
                    self.count(&message.provider, "translated");
                    if let Some(seconds) = crate::metrics::since(&message.sent_at) {
                        latency.observe(seconds);
                    }
                    incoming.ack().await?;
                }
            }
            Err(err) => {
                tracing::warn!(language = %self.language, messages = translated.len(), error = %err, "translations not confirmed; requeueing");
                for (incoming, ..) in translated {
                    incoming.requeue().await?;
                }
            }
        }
        Ok(())
    }

    /// One message settled with `result`.
    fn count(&self, provider: &str, result: &'static str) {
        let labels = Translation { language: self.language.clone(), provider: provider.to_owned(), result };
        metrics().translations.get_or_create(&labels).inc();
    }

    /// One provider call that took `took`, and how it failed if it did.
    fn count_call(&self, took: Duration, failed: Option<&ProviderError>) {
        let provider = self.provider.name().to_owned();
        let labels = ProviderLabels { language: self.language.clone(), provider: provider.clone() };
        metrics().provider_latency.get_or_create(&labels).observe(took.as_secs_f64());
        if let Some(err) = failed {
            let kind = match err {
                ProviderError::Transient { .. } => "transient",
                ProviderError::Permanent { .. } => "permanent",
            };
            let labels = crate::metrics::ProviderError { language: self.language.clone(), provider, kind };
            metrics().provider_errors.get_or_create(&labels).inc();
        }
    }

    fn translated(&self, posted: &MessagePosted, text: String, provider: &str) -> MessageTranslated {
        MessageTranslated {
            v: WIRE_VERSION,
            id: posted.id,
            chat_id: posted.chat_id.clone(),
            language: self.language.clone(),
            text,
            provider: provider.to_owned(),
            source_language: posted.source_language.clone(),
            sender: posted.sender.clone(),
            sender_id: posted.sender_id.clone(),
            sent_at: posted.sent_at.clone(),
            reply_to: posted.reply_to,
        }
    }

    /// The outcome of each message, in order: passthroughs and remembered texts at once, the rest in
    /// one provider call per source language.
    async fn translate(&self, work: &[Work], cancel: &CancellationToken) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(work.len());
        let mut asked: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, item) in work.iter().enumerate() {
            let posted = &item.posted;
            let known = if posted.source_language == self.language {
                Some(self.translated(posted, posted.text.clone(), PASSTHROUGH_PROVIDER))
            } else {
                self.cache
                    .get(&posted.source_language, &self.language, &posted.text)
                    .map(|text| self.translated(posted, text, self.provider.name()))
            };
            if known.is_none() {
                asked.entry(posted.source_language.as_str()).or_default().push(i);
            }
            outcomes.push(known.map(|m| Outcome::Translated(Box::new(m))));
        }
        for (from, indices) in asked {
            let texts: Vec<&str> = indices.iter().map(|i| work[*i].posted.text.as_str()).collect();
            let results = self.translate_texts(&texts, from, cancel).await;
            for (i, result) in indices.into_iter().zip(results) {
                let posted = &work[i].posted;
                outcomes[i] = Some(match result {
                    Ok(text) => {
                        self.cache.put(from, &self.language, &posted.text, &text);
                        Outcome::Translated(Box::new(self.translated(posted, text, self.provider.name())))
                    }
                    Err(TextFailure::Permanent(err)) => Outcome::DeadLetter(format!(
                        "failed to translate message {} to {}: {err}",
                        posted.id, self.language
                    )),
                    Err(TextFailure::Stopped) => Outcome::Retry("shutting down".into()),
                });
            }
        }
        outcomes.into_iter().map(|o| o.expect("every message has an outcome")).collect()
    }

    /// Translates `texts` from `from`, waiting out transient failures; a call refused for good is
    /// split, so that one bad text does not take the others with it.
    async fn translate_texts(
        &self,
        texts: &[&str],
        from: &str,
        cancel: &CancellationToken,
    ) -> Vec<Result<String, TextFailure>> {
        let mut delays = self.retry.delays();
        for attempt in 1u64.. {
            if cancel.is_cancelled() {
                return texts.iter().map(|_| Err(TextFailure::Stopped)).collect();
            }
            let started = std::time::Instant::now();
            let call = async {
                if texts.len() == 1 {
                    self.provider.translate(texts[0], from, &self.language).await.map(|t| vec![t])
                } else {
                    self.provider.translate_many(texts, from, &self.language).await
                }
            };
            // A call in flight does not hold a stopping translator up: its texts go back to the queue.
            let called = tokio::select! {
                _ = cancel.cancelled() => return texts.iter().map(|_| Err(TextFailure::Stopped)).collect(),
                called = call => called,
            };
            self.count_call(started.elapsed(), called.as_ref().err());
            match called {
                Ok(translations) => return translations.into_iter().map(Ok).collect(),
                Err(err @ ProviderError::Permanent { .. }) if texts.len() == 1 => {
                    return vec![Err(TextFailure::Permanent(err))];
                }
                Err(ProviderError::Permanent { .. }) => {
                    let mut one_by_one = Vec::with_capacity(texts.len());
                    for text in texts {
                        one_by_one.extend(Box::pin(self.translate_texts(&[text], from, cancel)).await);
                    }
                    return one_by_one;
                }
                // A batch that keeps failing may hold the one text the provider chokes on: the others
                // go on alone, each waiting out the outage by itself.
                Err(err) if texts.len() > 1 && attempt >= SPLIT_AFTER => {
                    tracing::warn!(language = %self.language, texts = texts.len(), attempt, error = %err, "a batch keeps failing; translating its texts one by one");
                    let mut one_by_one = Vec::with_capacity(texts.len());
                    for text in texts {
                        one_by_one.extend(Box::pin(self.translate_texts(&[text], from, cancel)).await);
                    }
                    return one_by_one;
                }
                Err(err) => {
                    let delay = delays.next().expect("the delays never end");
                    tracing::warn!(language = %self.language, texts = texts.len(), attempt, retry_in = ?delay, error = %err, "translation failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return texts.iter().map(|_| Err(TextFailure::Stopped)).collect(),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        unreachable!("the retry loop only ends by returning")
    }
}

/// Failed attempts of a call carrying several texts before they are sent one by one.
const SPLIT_AFTER: u64 = 3;

/// A finished batch's outcome; a batch that panicked takes the role with it.
fn settled(done: Result<Result<(), BusError>, tokio::task::JoinError>) -> Result<(), BusError> {
    match done {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        // Aborted: only when the set is dropped, which this role does not do while it runs.
        Err(_) => Ok(()),
    }
}

/// Why one text was not translated.
enum TextFailure {
    Permanent(ProviderError),
    /// The process is stopping while the provider was down.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_that_is_down_is_retried_from_250_ms_doubling_up_to_30_s() {
        let waits: Vec<Duration> = RetryPolicy::default().delays().take(10).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            waits,
            [ms(250), ms(500), ms(1000), ms(2000), ms(4000), ms(8000), ms(16000), ms(30000), ms(30000), ms(30000)]
        );
    }
}
