//! The translator role: competing consumers of one language's queue that translate, publish with a confirm, then ack.

pub mod provider;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    bus::{next_unless_cancelled, Bus, BusError, Incoming, Route, Source},
    wire::{MessagePosted, MessageTranslated, PASSTHROUGH_PROVIDER, WIRE_VERSION},
};
use provider::{Provider, ProviderError};

/// How a translator waits out a provider that is down. It retries the message in hand until the
/// provider answers or the process stops (then the message goes back to the queue): an outage is
/// every message's problem, so requeueing would only burn delivery attempts towards dead-lettering.
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

/// Translates every message of one language's queue.
pub struct Translator {
    pub language: String,
    pub bus: Arc<dyn Bus>,
    pub provider: Arc<dyn Provider>,
    pub retry: RetryPolicy,
}

enum Outcome {
    Translated(MessageTranslated),
    /// Give the message back to the queue (its delivery count goes up; at the limit it dead-letters).
    Retry(String),
    DeadLetter(String),
}

impl Translator {
    /// Consumes until `cancel` fires (finishing the message in hand) or the bus gives up.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), BusError> {
        let mut messages = self.bus.consume(Source::Translate { language: &self.language }).await?;
        tracing::info!(language = %self.language, provider = self.provider.name(), "translator consuming");
        while let Some(incoming) = next_unless_cancelled(&mut messages, &cancel).await {
            self.handle(incoming?, &cancel).await?;
        }
        tracing::info!(language = %self.language, "translator stopped");
        Ok(())
    }

    async fn handle(&self, incoming: Incoming, cancel: &CancellationToken) -> Result<(), BusError> {
        let outcome = match serde_json::from_slice::<MessagePosted>(&incoming.payload) {
            Ok(posted) => self.translate(posted, cancel).await,
            Err(err) => Outcome::DeadLetter(format!("undecodable MessagePosted: {err}")),
        };
        match outcome {
            Outcome::Translated(translated) => {
                let payload = serde_json::to_vec(&translated).expect("a translation always encodes");
                match self.bus.publish(Route::Translated, &payload).await {
                    Ok(()) => incoming.ack().await,
                    Err(err) => {
                        tracing::warn!(id = %translated.id, language = %self.language, error = %err, "translation not confirmed; requeueing");
                        incoming.requeue().await
                    }
                }
            }
            Outcome::Retry(reason) => {
                tracing::warn!(language = %self.language, reason, "giving the message back to the queue");
                incoming.requeue().await
            }
            Outcome::DeadLetter(reason) => {
                tracing::error!(language = %self.language, reason, "dead-lettering a message that cannot be translated");
                incoming.dead_letter().await
            }
        }
    }

    async fn translate(&self, posted: MessagePosted, cancel: &CancellationToken) -> Outcome {
        let translated = |text: String, provider: &str| MessageTranslated {
            v: WIRE_VERSION,
            id: posted.id,
            chat_id: posted.chat_id.clone(),
            language: self.language.clone(),
            text,
            provider: provider.to_owned(),
            source_language: posted.source_language.clone(),
            sender: posted.sender.clone(),
            sent_at: posted.sent_at.clone(),
            reply_to: posted.reply_to,
        };
        if posted.source_language == self.language {
            return Outcome::Translated(translated(posted.text.clone(), PASSTHROUGH_PROVIDER));
        }
        let mut delay = self.retry.first_delay;
        for attempt in 1u64.. {
            match self.provider.translate(&posted.text, &posted.source_language, &self.language).await {
                Ok(text) => return Outcome::Translated(translated(text, self.provider.name())),
                Err(err @ ProviderError::Permanent { .. }) => {
                    return Outcome::DeadLetter(format!(
                        "failed to translate message {} to {}: {err}",
                        posted.id, self.language
                    ));
                }
                Err(err) => {
                    tracing::warn!(id = %posted.id, language = %self.language, attempt, retry_in = ?delay, error = %err, "translation failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Outcome::Retry("shutting down".into()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(self.retry.max_delay);
                }
            }
        }
        unreachable!("the retry loop only ends by returning")
    }
}
