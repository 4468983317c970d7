//! The message bus the roles talk through: RabbitMQ, or an in-process stand-in when one process runs every role.
//!
//! Roles see only [`Bus`]: publish to a [`Route`], consume a [`Source`] with explicit
//! acknowledgement, and (for the gateway) a feed of encoded deliveries for the chats it binds. Every
//! message carries its W3C trace context ([`TraceHeaders`]) beside its payload.

pub mod amqp;
pub mod memory;
pub mod progress;
pub mod reconnecting;

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

pub use crate::telemetry::TraceHeaders;

/// Where a message is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// An original message, to every translator and the fanout.
    Posted,
    /// A translation, to the fanout.
    Translated,
    /// A delivery, to the gateways that watch `chat_id`.
    Deliver { chat_id: &'a str },
}

/// One message to publish: its payload, and the trace it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub route: Route<'a>,
    pub payload: &'a [u8],
    pub trace: &'a TraceHeaders,
}

/// Where a role consumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// The work queue of one language's translators, with the messages a consumer may hold.
    Translate { language: &'a str, prefetch: u16 },
    /// The fanout's input.
    Fanout,
}

impl Source<'_> {
    /// Messages a consumer of this source may hold unacknowledged: a translator's are what its
    /// concurrent provider calls take; the fanout's keep it busy (see [`Source::batch`]).
    pub const fn prefetch(self) -> u16 {
        match self {
            Self::Translate { prefetch, .. } => prefetch,
            Self::Fanout => 1024,
        }
    }

    /// Most messages handled as one batch: half the prefetch, so the broker goes on sending the next
    /// batch while this one is stored and published.
    pub const fn batch(self) -> usize {
        self.prefetch() as usize / 2
    }
}

/// Which route a consumed message was published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Posted,
    Translated,
    Unknown,
}

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the broker refused (nacked) a message published to {route}")]
    Nacked { route: String },
    #[error("failed to {action}: {source}")]
    Amqp {
        action: String,
        #[source]
        source: lapin::Error,
    },
    #[error(transparent)]
    Topology(#[from] parley_contract::topology::TopologyError),
    #[error("the in-process bus {0}")]
    InProcess(String),
    #[error("timed out {0}")]
    Timeout(String),
    #[error("invalid broker URL: {0}")]
    Url(String),
}

/// Settles one consumed message.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done: the downstream effect is confirmed.
    async fn ack(&self) -> Result<(), BusError>;
    /// Done, and so is every earlier message consumed from the same source and not settled yet: one
    /// acknowledgement for a whole batch.
    async fn ack_all_up_to(&self) -> Result<(), BusError>;
    /// Not done: hand the message out again (counts towards the delivery limit).
    async fn requeue(&self) -> Result<(), BusError>;
    /// Never doable: send the message to the dead-letter queue.
    async fn dead_letter(&self) -> Result<(), BusError>;
}

/// A consumed message that must be settled with exactly one of its methods.
pub struct Incoming {
    pub payload: Vec<u8>,
    pub origin: Origin,
    pub redelivered: bool,
    /// The trace the message belongs to (empty when its publisher sent none).
    pub trace: TraceHeaders,
    acker: Box<dyn Acker>,
}

impl Incoming {
    pub fn new(
        payload: Vec<u8>,
        origin: Origin,
        redelivered: bool,
        trace: TraceHeaders,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self { payload, origin, redelivered, trace, acker }
    }

    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    /// Acks this message and every earlier unsettled one of the same consumer (the rest of a batch,
    /// which the caller drops unsettled).
    pub async fn ack_all_up_to(self) -> Result<(), BusError> {
        self.acker.ack_all_up_to().await
    }

    pub async fn requeue(self) -> Result<(), BusError> {
        self.acker.requeue().await
    }

    pub async fn dead_letter(self) -> Result<(), BusError> {
        self.acker.dead_letter().await
    }
}

/// Consumed messages; the stream ends when the bus can no longer deliver.
pub type IncomingStream = BoxStream<'static, Result<Incoming, BusError>>;

/// The next consumed message, or `None` once `cancel` fires or the stream ends. A message in hand
/// is never abandoned: cancellation is only noticed between messages.
pub async fn next_unless_cancelled(
    messages: &mut IncomingStream,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<Result<Incoming, BusError>> {
    tokio::select! {
        // Checked first: a message that arrives as the role stops is left to the broker.
        biased;
        _ = cancel.cancelled() => None,
        next = futures_util::StreamExt::next(messages) => next,
    }
}

/// What a gateway's delivery feed brings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// One encoded delivery, and the trace of the message it delivers.
    Delivery { payload: Vec<u8>, trace: TraceHeaders },
    /// The feed resumed after an interruption, in which deliveries may have been lost.
    Resumed,
}

/// Deliveries for the chats bound through the paired [`ChatBinder`].
pub type DeliveryStream = BoxStream<'static, FeedEvent>;

/// Chooses which chats' deliveries reach one gateway process.
#[async_trait]
pub trait ChatBinder: Send + Sync {
    async fn bind(&self, chat_id: &str) -> Result<(), BusError>;
    async fn unbind(&self, chat_id: &str) -> Result<(), BusError>;
}

/// The bus as the roles see it.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes and returns once the bus has taken responsibility (a publisher confirm on RabbitMQ).
    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BusError>;
    /// Publishes `messages` in order and returns once every one is confirmed. On RabbitMQ the confirms
    /// are awaited together, so a batch costs one round trip instead of one per message.
    async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Result<(), BusError> {
        for message in messages {
            self.publish(*message).await?;
        }
        Ok(())
    }
    /// Starts consuming `source` with manual acknowledgement.
    async fn consume(&self, source: Source<'_>) -> Result<IncomingStream, BusError>;
    /// Opens this process's delivery feed.
    async fn delivery_feed(&self) -> Result<(Arc<dyn ChatBinder>, DeliveryStream), BusError>;
    /// Whether the bus can publish right now (drives `/readyz`).
    fn is_ready(&self) -> bool;
    /// Why the bus is stuck, if it has had work and made no progress for `timeout` (drives `/healthz`).
    fn stalled(&self, timeout: std::time::Duration) -> Option<String> {
        let _ = timeout;
        None
    }
    /// Closes the connection cleanly.
    async fn close(&self);
}
