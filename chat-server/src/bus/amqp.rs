//! The bus on RabbitMQ: publisher confirms on every publish, manual acks, lapin's automatic recovery.
//!
//! Recovery is driven by the connection's state: lapin reconnects with backoff and replays the
//! declared topology, bindings and consumers; a consumer that sees an error waits for that
//! recovery and goes on, or ends its stream when the connection cannot be recovered.

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

use super::{Acker, Bus, BusError, ChatBinder, DeliveryStream, Incoming, IncomingStream, Origin, Route, Source};

fn amqp(action: impl Into<String>) -> impl FnOnce(lapin::Error) -> BusError {
    let action = action.into();
    move |source| BusError::Amqp { action, source }
}

/// One connection to RabbitMQ with a confirming publish channel.
pub struct AmqpBus {
    connection: Connection,
    publisher: Channel,
    topology: Topology,
}

impl AmqpBus {
    /// Connects (retrying with backoff until `cancel` fires) and declares the topology for `languages`.
    pub async fn connect<S: AsRef<str>>(
        url: &str,
        topology: Topology,
        languages: &[S],
        connection_name: &str,
        cancel: &CancellationToken,
    ) -> Result<Self, BusError> {
        let mut delay = Duration::from_millis(200);
        let connection = loop {
            let props =
                ConnectionProperties::default().with_connection_name(connection_name.into()).enable_auto_recover();
            match Connection::connect(url, props).await {
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
        tracing::info!(prefix = topology.prefix(), "connected to the broker and declared the topology");
        Ok(Self { connection, publisher, topology })
    }
}

struct AmqpAcker(lapin::Acker);

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.0.ack(BasicAckOptions::default()).await.map(drop).map_err(amqp("ack a message"))
    }

    async fn ack_all_up_to(&self) -> Result<(), BusError> {
        self.0.ack(BasicAckOptions { multiple: true }).await.map(drop).map_err(amqp("ack a batch of messages"))
    }

    async fn requeue(&self) -> Result<(), BusError> {
        let options = BasicNackOptions { requeue: true, ..Default::default() };
        self.0.nack(options).await.map(drop).map_err(amqp("requeue a message"))
    }

    async fn dead_letter(&self) -> Result<(), BusError> {
        // Rejecting without requeue sends the message to the queue's dead-letter exchange.
        let options = BasicNackOptions { requeue: false, ..Default::default() };
        self.0.nack(options).await.map(drop).map_err(amqp("dead-letter a message"))
    }
}

/// Turns a lapin consumer into a stream that waits out recoverable connection failures.
fn recovering(
    channel: Channel,
    consumer: lapin::Consumer,
) -> futures_util::stream::BoxStream<'static, lapin::Result<lapin::message::Delivery>> {
    futures_util::stream::unfold(Some((channel, consumer)), |state| async move {
        let (channel, mut consumer) = state?;
        loop {
            match consumer.next().await? {
                Ok(delivery) => return Some((Ok(delivery), Some((channel, consumer)))),
                Err(err) => {
                    tracing::warn!(error = %err, "consumer interrupted; waiting for the connection to recover");
                    if let Err(err) = channel.wait_for_recovery(err).await {
                        return Some((Err(err), None));
                    }
                    tracing::info!("consumer resumed after recovery");
                }
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
    async fn publish(&self, route: Route<'_>, payload: &[u8]) -> Result<(), BusError> {
        self.publish_all(&[(route, payload)]).await
    }

    async fn publish_all(&self, messages: &[(Route<'_>, &[u8])]) -> Result<(), BusError> {
        let exchanges: Vec<(String, &str, bool)> = messages
            .iter()
            .map(|(route, _)| match route {
                Route::Posted => (self.topology.posted_exchange(), "", true),
                Route::Translated => (self.topology.translated_exchange(), "", true),
                // Deliveries feed live sockets only, so they need not survive a broker restart.
                Route::Deliver { chat_id } => (self.topology.deliver_exchange(), *chat_id, false),
            })
            .collect();
        let mut publishes: Vec<_> = messages
            .iter()
            .zip(&exchanges)
            .map(|((_, payload), (exchange, routing_key, persistent))| {
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(if *persistent { 2 } else { 1 });
                let publish = self.publisher.basic_publish(
                    exchange.as_str().into(),
                    (*routing_key).into(),
                    BasicPublishOptions::default(),
                    payload,
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
        let posted = self.topology.posted_exchange();
        let translated = self.topology.translated_exchange();
        let stream = recovering(channel, consumer).map(move |delivery| {
            let delivery = delivery.map_err(amqp(format!("consume {queue}")))?;
            let origin = if delivery.exchange.as_str() == posted {
                Origin::Posted
            } else if delivery.exchange.as_str() == translated {
                Origin::Translated
            } else {
                Origin::Unknown
            };
            Ok(Incoming::new(delivery.data, origin, delivery.redelivered, Box::new(AmqpAcker(delivery.acker))))
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
                    tracing::error!(error = %err, "delivery feed lost and not recoverable");
                }
                futures_util::future::ready(delivery.is_ok())
            })
            .filter_map(|delivery| futures_util::future::ready(delivery.ok().map(|d| d.data)));
        let binder = AmqpBinder { channel, queue, exchange: self.topology.deliver_exchange() };
        Ok((Arc::new(binder), stream.boxed()))
    }

    fn is_ready(&self) -> bool {
        self.connection.status().connected()
    }

    async fn close(&self) {
        if let Err(err) = self.connection.close(200, "shutting down".into()).await {
            tracing::debug!(error = %err, "closing the broker connection");
        }
    }
}
