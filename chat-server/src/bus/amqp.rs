//! The bus on RabbitMQ: publisher confirms on every publish, manual acks, and one recovery mechanism
//! per connection, chosen by the role ([`Recovery`]).
//!
//! - The worker roles (translators, fanout) recover by starting over: a failed connection ends their
//!   consumer's stream with an error, the role stops, closes that connection (bounded) and connects
//!   afresh; the broker hands the unacknowledged messages out again. Nothing else reconnects that
//!   connection, so no consumer is left behind on it.
//! - The gateway starts over too, under the same delivery feed ([`super::reconnecting`]): its
//!   sockets stay open while a new connection replaces the failed one.
//! - A standalone process, whose one connection carries every role, keeps it through lapin's
//!   automatic recovery, which replays its exclusive queue, the chats' bindings and the consumers; a
//!   recovery that fails ends the delivery feed, and the process exits non-zero.
//!
//! Either way [`Progress`] records what the broker finished, so that a connection stuck without
//! failing (a socket gone quiet, a recovery that never ends) fails `/healthz` after the stall timeout
//! (a gateway's only while it is not reconnecting, which is bounded apart).

use std::{future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use parley_contract::topology::Topology;
use tokio_util::sync::CancellationToken;

use super::{
    progress::Progress, Acker, Bus, BusError, ChatBinder, DeliveryStream, FeedEvent, Incoming, IncomingStream, Origin,
    Outgoing, Route, Source, TraceHeaders,
};

fn amqp(action: impl Into<String>) -> impl FnOnce(lapin::Error) -> BusError {
    let action = action.into();
    move |source| BusError::Amqp { action, source }
}

/// How a connection comes back after the broker or the network failed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// lapin reconnects and replays the topology, bindings and consumers (a standalone process).
    Automatic,
    /// The connection stays failed: the role starts over on a new one (translators, fanout, gateway).
    StartOver,
}

/// Heartbeat asked for when the URL sets none: a peer that went quiet is noticed within two of them,
/// where the broker's default of 60 s would leave a dead connection looking alive for minutes.
const HEARTBEAT_SECS: u16 = 10;

/// How long one connection attempt may take, when the URL sets no `connection_timeout`.
const CONNECT_TIMEOUT_MS: u64 = 10_000;

/// How long closing a connection may take: a broker that does not answer must not hold a role up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a consumed queue is looked at for messages waiting (see [`Progress::backlog`]).
const BACKLOG_CHECK: Duration = Duration::from_secs(5);

/// One connection to RabbitMQ with a confirming publish channel.
pub struct AmqpBus {
    connection: Arc<Connection>,
    publisher: Channel,
    topology: Topology,
    progress: Arc<Progress>,
    /// Ends the backlog checks with the bus.
    checks: CancellationToken,
}

impl Drop for AmqpBus {
    fn drop(&mut self) {
        self.checks.cancel();
    }
}

impl AmqpBus {
    /// Connects (retrying with backoff until `cancel` fires) and declares the topology for `languages`.
    pub async fn connect<S: AsRef<str>>(
        url: &str,
        topology: Topology,
        languages: &[S],
        connection_name: &str,
        recovery: Recovery,
        ca_certificates: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Self, BusError> {
        let mut uri: lapin::uri::AMQPUri = url.parse().map_err(BusError::Url)?;
        uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
        // A broker that accepts TCP and says nothing must not hold a connect up forever. lapin's async
        // connect does not apply the URL's `connection_timeout`, so it is applied here.
        let connect_timeout = Duration::from_millis(uri.query.connection_timeout.unwrap_or(CONNECT_TIMEOUT_MS));
        let mut delay = Duration::from_millis(200);
        let connection = loop {
            let mut props = ConnectionProperties::default().with_connection_name(connection_name.into());
            if recovery == Recovery::Automatic {
                props = props.enable_auto_recover();
            }
            // Bounded, and given up at once when the role stops.
            // An amqps:// URL is checked against `ca_certificates` (PEM) when given, else the system's roots.
            let tls = lapin::tcp::OwnedTLSConfig { identity: None, cert_chain: ca_certificates.map(str::to_owned) };
            let runtime = lapin::runtime::default_runtime()
                .map_err(|source| BusError::Amqp { action: "start the broker connection".into(), source })?;
            let attempt = tokio::time::timeout(
                connect_timeout,
                Connection::connect_uri_with_config(uri.clone(), props, tls, runtime),
            );
            let attempt = tokio::select! {
                _ = cancel.cancelled() => {
                    return Err(BusError::Timeout("connecting to the broker: the role is stopping".into()));
                }
                attempt = attempt => attempt,
            };
            let attempt = attempt.unwrap_or_else(|_| {
                Err(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from the broker within {connect_timeout:?}"),
                )))
            });
            match attempt {
                Ok(connection) => break connection,
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?delay, "cannot connect to the broker");
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            return Err(BusError::Amqp { action: "connect to the broker".into(), source: err });
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        let publisher = connection.create_channel().await.map_err(amqp("open the publish channel"))?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp("enable publisher confirms"))?;
        parley_contract::topology::declare(&publisher, &topology, languages).await?;
        tracing::info!(prefix = topology.prefix(), ?recovery, "connected to the broker and declared the topology");
        let progress = Arc::new(Progress::default());
        let connection = Arc::new(connection);
        Ok(Self { connection, publisher, topology, progress, checks: CancellationToken::new() })
    }

    /// Looks at `queue` every [`BACKLOG_CHECK`] until the bus goes, recording whether messages wait.
    fn watch_backlog(&self, queue: String, single_active: bool) {
        let (connection, progress, stop) = (self.connection.clone(), self.progress.clone(), self.checks.clone());
        tokio::spawn(async move {
            let mut channel: Option<Channel> = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(BACKLOG_CHECK) => {}
                }
                if !connection.status().connected() {
                    continue;
                }
                // A look that never gets its answer (the channel's opening included) is itself work
                // without progress.
                let pending = progress.begin();
                // A channel of its own: a failed look closes it, and nothing else.
                if channel.as_ref().is_none_or(|c| !c.status().connected()) {
                    channel = connection.create_channel().await.ok();
                }
                let Some(open) = &channel else { continue };
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                match open.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                    // An answer is not progress of the role's own: `pending` ends unfinished.
                    Ok(found) => {
                        drop(pending);
                        progress.backlog(&queue, found.message_count() > 0, single_active);
                    }
                    Err(err) => tracing::debug!(queue, error = %err, "could not look at a queue's backlog"),
                }
            }
        });
    }

    /// Publishes `messages` in order and waits for every confirm.
    async fn publish_confirmed(&self, messages: &[Outgoing<'_>]) -> Result<(), BusError> {
        let exchanges: Vec<(String, &str, bool)> = messages
            .iter()
            .map(|message| match message.route {
                Route::Posted => (self.topology.posted_exchange(), "", true),
                Route::Translated => (self.topology.translated_exchange(), "", true),
                // Deliveries feed live sockets only, so they need not survive a broker restart.
                Route::Deliver { chat_id } => (self.topology.deliver_exchange(), chat_id, false),
            })
            .collect();
        let mut publishes: Vec<_> = messages
            .iter()
            .zip(&exchanges)
            .map(|(message, (exchange, routing_key, persistent))| {
                let mut properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(if *persistent { 2 } else { 1 });
                if let Some(headers) = amqp_headers(message.trace) {
                    properties = properties.with_headers(headers);
                }
                let publish = self.publisher.basic_publish(
                    exchange.as_str().into(),
                    (*routing_key).into(),
                    BasicPublishOptions::default(),
                    message.payload,
                    properties,
                );
                Box::pin(futures_util::future::maybe_done(publish))
            })
            .collect();
        // lapin queues a publish's frames when it is first polled: polling each once, in order, sends
        // them in order on the one channel (so per-chat order holds) without a round trip apiece.
        std::future::poll_fn(|cx| {
            for publish in &mut publishes {
                let _ = publish.as_mut().poll(cx);
            }
            std::task::Poll::Ready(())
        })
        .await;
        let mut confirms = Vec::with_capacity(messages.len());
        for (mut publish, (exchange, ..)) in publishes.into_iter().zip(&exchanges) {
            publish.as_mut().await;
            let confirm = publish.as_mut().take_output().expect("a finished publish has its output");
            confirms.push((exchange, confirm.map_err(amqp(format!("publish to {exchange}")))?));
        }
        // Confirmed together: one round trip for the whole batch.
        for (exchange, confirm) in confirms {
            let confirmation = confirm.await.map_err(amqp(format!("confirm a publish to {exchange}")))?;
            if confirmation.is_nack() {
                return Err(BusError::Nacked { route: exchange.clone() });
            }
        }
        Ok(())
    }
}

/// A message's trace context as AMQP headers (none for a message outside any trace).
fn amqp_headers(trace: &TraceHeaders) -> Option<FieldTable> {
    let mut headers = FieldTable::default();
    for (name, value) in trace.pairs() {
        headers.insert(name.into(), lapin::types::AMQPValue::LongString(value.into()));
    }
    (trace.pairs().next().is_some()).then_some(headers)
}

/// The trace context among a consumed message's AMQP headers.
fn trace_of(properties: &BasicProperties) -> TraceHeaders {
    let Some(headers) = properties.headers() else { return TraceHeaders::default() };
    TraceHeaders::from_pairs(headers.inner().iter().filter_map(|(name, value)| {
        let text = match value {
            lapin::types::AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok()?,
            lapin::types::AMQPValue::ShortString(text) => text.as_str(),
            _ => return None,
        };
        Some((name.as_str(), text))
    }))
}

struct AmqpAcker {
    acker: lapin::Acker,
    progress: Arc<Progress>,
}

impl AmqpAcker {
    async fn settle<T>(
        &self,
        action: &str,
        all: bool,
        settled: impl Future<Output = lapin::Result<T>>,
    ) -> Result<(), BusError> {
        let pending = self.progress.begin();
        let result = settled.await.map(drop).map_err(amqp(action));
        if result.is_ok() {
            pending.finish();
            self.progress.settled(all);
        }
        result
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.settle("ack a message", false, self.acker.ack(BasicAckOptions::default())).await
    }

    async fn ack_all_up_to(&self) -> Result<(), BusError> {
        self.settle("ack a batch of messages", true, self.acker.ack(BasicAckOptions { multiple: true })).await
    }

    async fn requeue(&self) -> Result<(), BusError> {
        let options = BasicNackOptions { requeue: true, ..Default::default() };
        self.settle("requeue a message", false, self.acker.nack(options)).await
    }

    async fn dead_letter(&self) -> Result<(), BusError> {
        // Rejecting without requeue sends the message to the queue's dead-letter exchange.
        let options = BasicNackOptions { requeue: false, ..Default::default() };
        self.settle("dead-letter a message", false, self.acker.nack(options)).await
    }
}

/// Turns a lapin consumer into a stream that waits out recoverable connection failures.
/// `Ok(None)` says the consumer resumed after its connection recovered (only with
/// [`Recovery::Automatic`]; otherwise the first error ends the stream).
fn recovering(
    channel: Channel,
    consumer: lapin::Consumer,
) -> futures_util::stream::BoxStream<'static, lapin::Result<Option<lapin::message::Delivery>>> {
    futures_util::stream::unfold(Some((channel, consumer)), |state| async move {
        let (channel, mut consumer) = state?;
        match consumer.next().await? {
            Ok(delivery) => Some((Ok(Some(delivery)), Some((channel, consumer)))),
            Err(err) => {
                tracing::warn!(error = %err, "consumer interrupted; waiting for the connection to recover");
                if let Err(err) = channel.wait_for_recovery(err).await {
                    return Some((Err(err), None));
                }
                tracing::info!("consumer resumed after recovery");
                Some((Ok(None), Some((channel, consumer))))
            }
        }
    })
    .boxed()
}

struct AmqpBinder {
    channel: Channel,
    queue: String,
    exchange: String,
}

#[async_trait]
impl ChatBinder for AmqpBinder {
    async fn bind(&self, chat_id: &str) -> Result<(), BusError> {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                chat_id.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("bind chat {chat_id} to {}", self.queue)))
    }

    async fn unbind(&self, chat_id: &str) -> Result<(), BusError> {
        self.channel
            .queue_unbind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                chat_id.into(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("unbind chat {chat_id} from {}", self.queue)))
    }
}

#[async_trait]
impl Bus for AmqpBus {
    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BusError> {
        self.publish_all(&[message]).await
    }

    async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Result<(), BusError> {
        let pending = self.progress.begin();
        self.publish_confirmed(messages).await?;
        pending.finish();
        Ok(())
    }

    async fn consume(&self, source: Source<'_>) -> Result<IncomingStream, BusError> {
        let queue = match source {
            Source::Translate { language, .. } => self.topology.translate_queue(language),
            Source::Fanout => self.topology.fanout_queue(),
        };
        let prefetch = source.prefetch();
        let channel = self.connection.create_channel().await.map_err(amqp("open a consume channel"))?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(amqp("set prefetch"))?;
        let consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(amqp(format!("consume {queue}")))?;
        self.progress.consuming();
        self.watch_backlog(queue.clone(), source == Source::Fanout);
        let posted = self.topology.posted_exchange();
        let translated = self.topology.translated_exchange();
        let progress = self.progress.clone();
        let stream =
            recovering(channel, consumer).filter_map(|delivery| futures_util::future::ready(delivery.transpose()));
        let stream = stream.map(move |delivery| {
            let delivery = delivery.map_err(amqp(format!("consume {queue}")))?;
            progress.delivered();
            let origin = if delivery.exchange.as_str() == posted {
                Origin::Posted
            } else if delivery.exchange.as_str() == translated {
                Origin::Translated
            } else {
                Origin::Unknown
            };
            let trace = trace_of(&delivery.properties);
            let acker = AmqpAcker { acker: delivery.acker, progress: progress.clone() };
            Ok(Incoming::new(delivery.data, origin, delivery.redelivered, trace, Box::new(acker)))
        });
        Ok(stream.boxed())
    }

    async fn delivery_feed(&self) -> Result<(Arc<dyn ChatBinder>, DeliveryStream), BusError> {
        let queue = self.topology.gateway_queue(&uuid::Uuid::now_v7().simple().to_string());
        let channel = self.connection.create_channel().await.map_err(amqp("open the delivery channel"))?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
            .map_err(amqp(format!("declare {queue}")))?;
        // Deliveries only feed live sockets, so the broker may forget them once sent.
        let consume = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
        let consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), consume, FieldTable::default())
            .await
            .map_err(amqp(format!("consume {queue}")))?;
        let stream = recovering(channel.clone(), consumer)
            .take_while(|delivery| {
                if let Err(err) = delivery {
                    tracing::warn!(error = %err, "delivery feed lost with its broker connection");
                }
                futures_util::future::ready(delivery.is_ok())
            })
            .filter_map({
                let progress = self.progress.clone();
                move |delivery| {
                    progress.advanced();
                    // Resumed after a recovery: the hub fills what it missed.
                    futures_util::future::ready(delivery.ok().map(|d| match d {
                        Some(d) => FeedEvent::Delivery { trace: trace_of(&d.properties), payload: d.data },
                        None => FeedEvent::Resumed,
                    }))
                }
            });
        let binder = AmqpBinder { channel, queue, exchange: self.topology.deliver_exchange() };
        Ok((Arc::new(binder), stream.boxed()))
    }

    /// The connection, and the channel publishes go through (which the broker may close alone).
    fn is_ready(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    fn stalled(&self, timeout: Duration) -> Option<String> {
        let status = self.connection.status();
        // A broker that blocks publishers (a memory or disk alarm) holds every role up alike; a
        // restart would not help.
        if status.blocked() {
            self.progress.advanced();
            return None;
        }
        self.progress.stalled(status.connected(), timeout)
    }

    async fn close(&self) {
        self.checks.cancel();
        match tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, "shutting down".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(error = %err, "closing the broker connection"),
            Err(_) => tracing::warn!(
                "the broker did not confirm closing the connection within {CLOSE_TIMEOUT:?}; leaving it \
                 (the broker drops it when its heartbeats stop, and hands its messages out again)"
            ),
        }
    }
}
