//! The RabbitMQ topology of one Parley chat deployment, defined once for the chat server and the operator.
//!
//! The pure half ([`Topology`], [`ExchangeSpec`], [`QueueSpec`]) names every exchange and queue and
//! fixes their arguments and bindings; the effectful half ([`declare`], [`queue_depth`],
//! [`delete_language`], [`delete_all`]) applies that definition to a broker over an AMQP channel.
//! Declaring is idempotent: every role and the operator may declare the same topology at any time.

use lapin::{
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
    Channel, ExchangeKind,
};

/// How often a quorum queue hands a message out before dead-lettering it (`x-delivery-limit`).
pub const DELIVERY_LIMIT: i64 = 10;

/// The prefix used by the chat server when it runs outside the operator.
pub const STANDALONE_PREFIX: &str = "parley.local";

/// Errors of defining or applying a topology.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TopologyError {
    #[error("invalid topology prefix {prefix:?}: {reason}")]
    InvalidPrefix { prefix: String, reason: &'static str },
    #[error("invalid language code {code:?}: expected ISO 639 like \"es\" or \"pt-BR\"")]
    InvalidLanguage { code: String },
    #[error("failed to {action} {name}: {source}")]
    Broker {
        action: &'static str,
        name: String,
        #[source]
        source: lapin::Error,
    },
}

/// Checks a language code against the pattern the CRD also enforces: `^[a-z]{2,3}(-[A-Za-z0-9]+)?$`.
pub fn validate_language(code: &str) -> Result<(), TopologyError> {
    let (base, region) = match code.split_once('-') {
        Some((base, region)) => (base, Some(region)),
        None => (code, None),
    };
    let base_ok = (2..=3).contains(&base.len()) && base.bytes().all(|b| b.is_ascii_lowercase());
    let region_ok = region.is_none_or(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric()));
    if base_ok && region_ok {
        Ok(())
    } else {
        Err(TopologyError::InvalidLanguage { code: code.to_owned() })
    }
}

/// The kind of an exchange in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Fanout,
    Direct,
}

/// One exchange to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeType,
}

/// One durable queue to declare, with its arguments and the exchanges it is bound to.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    /// `x-single-active-consumer`: one consumer at a time, so per-chat order holds.
    pub single_active_consumer: bool,
    /// Dead-letter exchange for messages that exhaust [`DELIVERY_LIMIT`]; `None` for the dead queue itself.
    pub dead_letter_exchange: Option<String>,
    /// Exchanges this queue is bound to (all fanout exchanges, so no routing key).
    pub bound_to: Vec<String>,
}

impl QueueSpec {
    /// The `x-*` arguments of this quorum queue, exactly as declared on the broker.
    pub fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        if let Some(dlx) = &self.dead_letter_exchange {
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DELIVERY_LIMIT));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dlx.as_str().into()));
        }
        if self.single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        args
    }
}

/// The names of one chat deployment's exchanges and queues, all under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    /// A topology under `prefix`, which must be a non-empty run of `[A-Za-z0-9._-]`.
    pub fn new(prefix: impl Into<String>) -> Result<Self, TopologyError> {
        let prefix = prefix.into();
        let reason = if prefix.is_empty() {
            Some("must not be empty")
        } else if prefix.len() > 150 {
            Some("must be at most 150 bytes, so queue names stay under AMQP's 255")
        } else if !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            Some("may only contain letters, digits, '.', '_' and '-'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(TopologyError::InvalidPrefix { prefix, reason }),
            None => Ok(Self { prefix }),
        }
    }

    /// The topology the operator gives the ChatDeployment `name` in `namespace`: `parley.<namespace>.<name>`.
    pub fn for_chat_deployment(namespace: &str, name: &str) -> Result<Self, TopologyError> {
        Self::new(format!("parley.{namespace}.{name}"))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Fanout exchange the gateway publishes every `MessagePosted` to.
    pub fn posted_exchange(&self) -> String {
        format!("{}.posted", self.prefix)
    }

    /// Fanout exchange the translators publish every `MessageTranslated` to.
    pub fn translated_exchange(&self) -> String {
        format!("{}.translated", self.prefix)
    }

    /// Direct exchange the fanout publishes every `Delivery` to, routing key = chat id.
    pub fn deliver_exchange(&self) -> String {
        format!("{}.deliver", self.prefix)
    }

    /// Exchange and queue (same name) that hold messages which kept failing.
    pub fn dead_letters(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The work queue of the translators for `language`.
    pub fn translate_queue(&self, language: &str) -> String {
        format!("{}.translate.{language}", self.prefix)
    }

    /// The fanout's input: originals and translations, in arrival order.
    pub fn fanout_queue(&self) -> String {
        format!("{}.fanout", self.prefix)
    }

    /// The exclusive, auto-deleted delivery queue of one gateway process.
    pub fn gateway_queue(&self, instance: &str) -> String {
        format!("{}.gateway.{instance}", self.prefix)
    }

    /// Every exchange of the topology.
    pub fn exchanges(&self) -> Vec<ExchangeSpec> {
        vec![
            ExchangeSpec { name: self.posted_exchange(), kind: ExchangeType::Fanout },
            ExchangeSpec { name: self.translated_exchange(), kind: ExchangeType::Fanout },
            ExchangeSpec { name: self.deliver_exchange(), kind: ExchangeType::Direct },
            ExchangeSpec { name: self.dead_letters(), kind: ExchangeType::Fanout },
        ]
    }

    /// The queue of one language's translators.
    pub fn translate_queue_spec(&self, language: &str) -> QueueSpec {
        QueueSpec {
            name: self.translate_queue(language),
            single_active_consumer: false,
            dead_letter_exchange: Some(self.dead_letters()),
            bound_to: vec![self.posted_exchange()],
        }
    }

    /// Every durable queue of the topology for the given target languages.
    pub fn queues<S: AsRef<str>>(&self, languages: &[S]) -> Vec<QueueSpec> {
        let mut queues = vec![
            QueueSpec {
                name: self.fanout_queue(),
                single_active_consumer: true,
                dead_letter_exchange: Some(self.dead_letters()),
                bound_to: vec![self.posted_exchange(), self.translated_exchange()],
            },
            QueueSpec {
                name: self.dead_letters(),
                single_active_consumer: false,
                dead_letter_exchange: None,
                bound_to: vec![self.dead_letters()],
            },
        ];
        queues.extend(languages.iter().map(|l| self.translate_queue_spec(l.as_ref())));
        queues
    }
}

fn broker_error<'a>(action: &'static str, name: &'a str) -> impl FnOnce(lapin::Error) -> TopologyError + 'a {
    move |source| TopologyError::Broker { action, name: name.to_owned(), source }
}

async fn declare_queue(channel: &Channel, queue: &QueueSpec) -> Result<(), TopologyError> {
    channel
        .queue_declare(queue.name.as_str().into(), QueueDeclareOptions::durable(), queue.arguments())
        .await
        .map_err(broker_error("declare queue", &queue.name))?;
    for exchange in &queue.bound_to {
        channel
            .queue_bind(
                queue.name.as_str().into(),
                exchange.as_str().into(),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_error("bind queue", &queue.name))?;
    }
    Ok(())
}

/// Declares every exchange, queue and binding of `topology` for `languages`. Idempotent.
pub async fn declare<S: AsRef<str>>(
    channel: &Channel,
    topology: &Topology,
    languages: &[S],
) -> Result<(), TopologyError> {
    for language in languages {
        validate_language(language.as_ref())?;
    }
    for exchange in topology.exchanges() {
        let kind = match exchange.kind {
            ExchangeType::Fanout => ExchangeKind::Fanout,
            ExchangeType::Direct => ExchangeKind::Direct,
        };
        let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(exchange.name.as_str().into(), kind, options, FieldTable::default())
            .await
            .map_err(broker_error("declare exchange", &exchange.name))?;
    }
    for queue in topology.queues(languages) {
        declare_queue(channel, &queue).await?;
    }
    Ok(())
}

/// Ready messages and consumers of a queue, as the broker reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    pub messages: u32,
    pub consumers: u32,
}

/// Reads a queue's depth with a passive declare; `None` when the queue does not exist.
///
/// A passive declare of a missing queue closes the channel (404), so pass a channel that may be lost.
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<Option<QueueDepth>, TopologyError> {
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(queue.into(), options, FieldTable::default()).await {
        Ok(q) => Ok(Some(QueueDepth { messages: q.message_count(), consumers: q.consumer_count() })),
        Err(err) if is_not_found(&err) => Ok(None),
        Err(source) => Err(TopologyError::Broker { action: "inspect queue", name: queue.to_owned(), source }),
    }
}

fn is_not_found(err: &lapin::Error) -> bool {
    // lapin does not expose the reply code as a stable type here; the broker's text is stable.
    err.to_string().contains("NOT_FOUND")
}

/// Unbinds one language's queue from the posted exchange, so a removed language takes no new messages
/// while its backlog drains. Idempotent (a missing queue or binding is not an error).
pub async fn unbind_language(channel: &Channel, topology: &Topology, language: &str) -> Result<(), TopologyError> {
    let name = topology.translate_queue(language);
    if queue_depth(channel, &name).await?.is_none() {
        return Ok(());
    }
    channel
        .queue_unbind(
            name.as_str().into(),
            topology.posted_exchange().as_str().into(),
            "".into(),
            FieldTable::default(),
        )
        .await
        .map_err(broker_error("unbind queue", &name))
}

/// Deletes one language's queue. With `only_if_empty`, a queue still holding messages is kept
/// and `Ok(false)` returned, so accepted messages are not thrown away.
pub async fn delete_language(
    channel: &Channel,
    topology: &Topology,
    language: &str,
    only_if_empty: bool,
) -> Result<bool, TopologyError> {
    let name = topology.translate_queue(language);
    if only_if_empty {
        match queue_depth(channel, &name).await? {
            None => return Ok(true),
            Some(depth) if depth.messages > 0 => return Ok(false),
            Some(_) => {}
        }
    }
    channel
        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await
        .map_err(broker_error("delete queue", &name))?;
    Ok(true)
}

/// Deletes every queue and exchange of `topology` for `languages`.
pub async fn delete_all<S: AsRef<str>>(
    channel: &Channel,
    topology: &Topology,
    languages: &[S],
) -> Result<(), TopologyError> {
    for queue in topology.queues(languages) {
        channel
            .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(broker_error("delete queue", &queue.name))?;
    }
    for exchange in topology.exchanges() {
        channel
            .exchange_delete(exchange.name.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .map_err(broker_error("delete exchange", &exchange.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix_of_the_chat_deployment() {
        let t = Topology::for_chat_deployment("events", "town-hall").unwrap();
        assert_eq!(t.posted_exchange(), "parley.events.town-hall.posted");
        assert_eq!(t.translate_queue("de"), "parley.events.town-hall.translate.de");
        assert_eq!(t.fanout_queue(), "parley.events.town-hall.fanout");
        assert_eq!(t.deliver_exchange(), "parley.events.town-hall.deliver");
        assert_eq!(t.dead_letters(), "parley.events.town-hall.dead");
    }

    #[test]
    fn prefix_with_spaces_or_empty_is_rejected() {
        assert!(Topology::new("").is_err());
        assert!(Topology::new("a b").is_err());
        assert!(Topology::new("x".repeat(151)).is_err());
        assert!(Topology::new("parley.local").is_ok());
    }

    #[test]
    fn fanout_queue_takes_originals_and_translations_with_one_active_consumer() {
        let t = Topology::new("p").unwrap();
        let queues = t.queues(&["es"]);
        let fanout = queues.iter().find(|q| q.name == "p.fanout").unwrap();
        assert!(fanout.single_active_consumer);
        assert_eq!(fanout.bound_to, vec!["p.posted", "p.translated"]);
        let args = fanout.arguments();
        let args = args.inner();
        assert_eq!(args.get("x-queue-type"), Some(&AMQPValue::LongString("quorum".into())));
        assert_eq!(args.get("x-delivery-limit"), Some(&AMQPValue::LongLongInt(DELIVERY_LIMIT)));
        assert_eq!(args.get("x-dead-letter-exchange"), Some(&AMQPValue::LongString("p.dead".into())));
    }

    #[test]
    fn each_language_gets_a_dead_lettering_queue_bound_to_posted() {
        let t = Topology::new("p").unwrap();
        let queues = t.queues(&["es", "ca"]);
        let names: Vec<_> = queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, vec!["p.fanout", "p.dead", "p.translate.es", "p.translate.ca"]);
        let es = &queues[2];
        assert_eq!(es.bound_to, vec!["p.posted"]);
        assert!(!es.single_active_consumer);
        assert_eq!(es.dead_letter_exchange.as_deref(), Some("p.dead"));
    }

    #[test]
    fn dead_letter_queue_does_not_dead_letter_again() {
        let t = Topology::new("p").unwrap();
        let dead = t.queues::<&str>(&[]).into_iter().find(|q| q.name == "p.dead").unwrap();
        assert!(!dead.arguments().inner().contains_key("x-delivery-limit"));
    }

    #[test]
    fn language_codes_follow_the_crd_pattern() {
        for ok in ["es", "ca", "ast", "pt-BR", "zh-Hant"] {
            assert!(validate_language(ok).is_ok(), "{ok}");
        }
        for bad in ["", "e", "ES", "espa", "es-", "es_ES", "es.x", "es-!"] {
            assert!(validate_language(bad).is_err(), "{bad}");
        }
    }
}
