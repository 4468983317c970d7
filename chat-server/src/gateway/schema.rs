//! The GraphQL schema of the gateway: the contract's types and resolvers, apart from any transport.

use std::{collections::HashSet, sync::Arc};

use async_graphql::{Context, ErrorExtensions, Object, Result, Schema, SimpleObject, Subscription, ID};
use futures_util::{stream::BoxStream, Stream, StreamExt};
use uuid::Uuid;

use crate::{
    bus::{Bus, BusError, Route},
    gateway::hub::{Hub, Missed},
    wire::{now_rfc3339, Delivery, MessagePosted, WIRE_VERSION},
};

/// The gateway's schema.
pub type ChatSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// What the resolvers need: the bus to publish to, the hub to subscribe to, and the chat settings.
pub struct ChatContext {
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub settings: ChatSettings,
}

/// The part of the configuration the API enforces.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// ISO 639-1 code of messages sent without a language, or `auto`.
    pub source_language: String,
    /// Target languages this deployment translates into.
    pub languages: Vec<String>,
    pub max_text_bytes: usize,
    pub max_chat_id_bytes: usize,
    pub max_sender_bytes: usize,
}

impl ChatSettings {
    fn known(&self, language: &str) -> bool {
        language == self.source_language || self.languages.iter().any(|l| l == language)
    }

    fn unknown_language(&self, language: &str) -> async_graphql::Error {
        bad_input(format!(
            "unknown language {language:?}: this chat serves {} (source) and [{}]",
            self.source_language,
            self.languages.join(", ")
        ))
    }
}

fn bad_input(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", "BAD_USER_INPUT"))
}

fn unavailable(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", "UNAVAILABLE"))
}

/// A chat message: an original or a translation as delivered, or a message just accepted (the answer
/// to `sendMessage`: the original as it will be delivered, before the fanout has given it a `seq`).
#[derive(Clone)]
pub struct ChatMessage {
    message: Arc<Delivery>,
    sequenced: bool,
}

impl ChatMessage {
    pub fn delivered(delivery: Arc<Delivery>) -> Self {
        Self { message: delivery, sequenced: true }
    }

    fn accepted(posted: MessagePosted) -> Self {
        Self { message: Arc::new(Delivery::of_original(posted, 0)), sequenced: false }
    }
}

#[Object]
impl ChatMessage {
    async fn id(&self) -> ID {
        ID(self.message.id.to_string())
    }

    async fn chat_id(&self) -> ID {
        ID(self.message.chat_id.clone())
    }

    /// Per-chat delivery sequence number, stamped by the fanout; null until delivered.
    async fn seq(&self) -> Option<i64> {
        self.sequenced.then(|| i64::try_from(self.message.seq).ok()).flatten()
    }

    async fn sender(&self) -> Option<&str> {
        self.message.sender.as_deref()
    }

    /// The language of `text`.
    async fn language(&self) -> &str {
        &self.message.language
    }

    async fn source_language(&self) -> &str {
        &self.message.source_language
    }

    /// True for the text as sent, false for a translation.
    async fn original(&self) -> bool {
        self.message.original
    }

    async fn text(&self) -> &str {
        &self.message.text
    }

    async fn sent_at(&self) -> &str {
        &self.message.sent_at
    }
}

/// The seed's `putEvent` answer, shaped like EventBridge's PutEvents result.
#[derive(SimpleObject)]
#[graphql(rename_fields = "PascalCase")]
pub struct PutEventResult {
    entries: Option<Vec<Option<EventDetails>>>,
    failed_entries: Option<i32>,
}

#[derive(SimpleObject)]
#[graphql(rename_fields = "PascalCase")]
pub struct EventDetails {
    event_id: Option<String>,
    error_message: Option<String>,
    error_code: Option<String>,
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// Target languages this deployment serves.
    async fn languages(&self, ctx: &Context<'_>) -> Vec<String> {
        ctx.data_unchecked::<Arc<ChatContext>>().settings.languages.clone()
    }
}

fn check_chat_id(settings: &ChatSettings, chat_id: &str) -> Result<()> {
    if chat_id.is_empty() {
        return Err(bad_input("chatId must not be empty"));
    }
    if chat_id.len() > settings.max_chat_id_bytes {
        return Err(bad_input(format!("chatId is longer than {} bytes", settings.max_chat_id_bytes)));
    }
    Ok(())
}

/// Why a message was not posted.
enum PostError {
    /// The input is wrong; the GraphQL error says how.
    Invalid(async_graphql::Error),
    /// The bus did not take the message.
    Unavailable { id: Uuid, source: BusError },
}

impl From<async_graphql::Error> for PostError {
    fn from(err: async_graphql::Error) -> Self {
        Self::Invalid(err)
    }
}

impl From<PostError> for async_graphql::Error {
    fn from(err: PostError) -> Self {
        match err {
            PostError::Invalid(err) => err,
            PostError::Unavailable { id, source } => unavailable(format!("message {id} was not accepted: {source}")),
        }
    }
}

/// Validates and publishes a new message; the gateway is where message ids are born.
async fn post(
    chat: &ChatContext,
    chat_id: String,
    text: String,
    language: Option<String>,
    sender: Option<String>,
) -> Result<MessagePosted, PostError> {
    let settings = &chat.settings;
    check_chat_id(settings, &chat_id)?;
    if text.trim().is_empty() {
        return Err(bad_input("text must not be empty").into());
    }
    if text.len() > settings.max_text_bytes {
        return Err(bad_input(format!(
            "text is {} bytes, more than the limit of {} bytes",
            text.len(),
            settings.max_text_bytes
        ))
        .into());
    }
    if sender.as_ref().is_some_and(|s| s.len() > settings.max_sender_bytes) {
        return Err(bad_input(format!("sender is longer than {} bytes", settings.max_sender_bytes)).into());
    }
    let source_language = match language {
        Some(language) if !settings.known(&language) => return Err(settings.unknown_language(&language).into()),
        Some(language) => language,
        None => settings.source_language.clone(),
    };
    let posted = MessagePosted {
        v: WIRE_VERSION,
        id: Uuid::now_v7(),
        chat_id,
        sender,
        text,
        source_language,
        sent_at: now_rfc3339(),
    };
    let payload = serde_json::to_vec(&posted).expect("a message always encodes");
    if let Err(source) = chat.bus.publish(Route::Posted, &payload).await {
        tracing::error!(id = %posted.id, error = %source, "failed to publish a message");
        return Err(PostError::Unavailable { id: posted.id, source });
    }
    Ok(posted)
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Sends a message to a chat; every subscriber receives it and its translations.
    async fn send_message(
        &self,
        ctx: &Context<'_>,
        chat_id: ID,
        text: String,
        #[graphql(desc = "ISO 639-1 code of `text`; the deployment's source language when omitted")] language: Option<
            String,
        >,
        sender: Option<String>,
    ) -> Result<ChatMessage> {
        let chat = ctx.data_unchecked::<Arc<ChatContext>>();
        Ok(post(chat, chat_id.0, text, language, sender).await.map(ChatMessage::accepted)?)
    }

    /// The seed's mutation: sends `message` to `chatId` in the source language.
    async fn put_event(&self, ctx: &Context<'_>, message: String, chat_id: String) -> Result<PutEventResult> {
        let chat = ctx.data_unchecked::<Arc<ChatContext>>();
        let entry = match post(chat, chat_id, message, None, None).await {
            Ok(posted) => EventDetails { event_id: Some(posted.id.to_string()), error_message: None, error_code: None },
            // EventBridge reports a failed entry in the result, not as an error of the call.
            Err(err @ PostError::Unavailable { .. }) => EventDetails {
                event_id: None,
                error_message: Some(async_graphql::Error::from(err).message),
                error_code: Some("Unavailable".into()),
            },
            Err(PostError::Invalid(err)) => return Err(err),
        };
        let failed = i32::from(entry.event_id.is_none());
        Ok(PutEventResult { entries: Some(vec![Some(entry)]), failed_entries: Some(failed) })
    }
}

pub struct SubscriptionRoot;

/// The deliveries of one chat that pass `keep`, ending with an error if the subscriber falls behind.
async fn deliveries<T, F>(ctx: &Context<'_>, chat_id: &str, keep: F) -> Result<BoxStream<'static, Result<T>>>
where
    T: Send + 'static,
    F: Fn(&Arc<Delivery>) -> Option<T> + Send + 'static,
{
    let chat = ctx.data_unchecked::<Arc<ChatContext>>();
    check_chat_id(&chat.settings, chat_id)?;
    let subscription =
        chat.hub.subscribe(chat_id).await.map_err(|err| unavailable(format!("cannot watch chat {chat_id}: {err}")))?;
    Ok(futures_util::stream::unfold(Some((subscription, keep)), |state| async move {
        let (mut subscription, keep) = state?;
        loop {
            match subscription.recv().await {
                Ok(delivery) => {
                    if let Some(item) = keep(&delivery) {
                        return Some((Ok(item), Some((subscription, keep))));
                    }
                }
                Err(Missed::Lagged(n)) => {
                    let err = async_graphql::Error::new(format!(
                        "this subscriber fell {n} messages behind and was dropped; subscribe again"
                    ))
                    .extend_with(|_, e| e.set("code", "SLOW_CONSUMER"));
                    return Some((Err(err), None));
                }
                Err(Missed::Closed) => return None,
            }
        }
    })
    .boxed())
}

#[Subscription]
impl SubscriptionRoot {
    /// Every message of a chat: each original, and its translations into `languages` (all when omitted).
    async fn messages(
        &self,
        ctx: &Context<'_>,
        chat_id: ID,
        languages: Option<Vec<String>>,
    ) -> Result<impl Stream<Item = Result<ChatMessage>>> {
        let settings = &ctx.data_unchecked::<Arc<ChatContext>>().settings;
        if let Some(unknown) = languages.iter().flatten().find(|l| !settings.known(l)) {
            return Err(settings.unknown_language(unknown));
        }
        let wanted: Option<HashSet<String>> = languages.map(|l| l.into_iter().collect());
        deliveries(ctx, &chat_id, move |d| {
            let keep = d.original || wanted.as_ref().is_none_or(|w| w.contains(&d.language));
            keep.then(|| ChatMessage::delivered(d.clone()))
        })
        .await
    }

    /// The seed's subscription: the text of every original and translation of a chat.
    async fn chat(&self, ctx: &Context<'_>, chat_id: String) -> Result<impl Stream<Item = Result<String>>> {
        deliveries(ctx, &chat_id, |d| Some(d.text.clone())).await
    }
}

/// Limits the schema enforces on every operation.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    pub max_depth: usize,
    pub max_complexity: usize,
}

pub fn build_schema(chat: Arc<ChatContext>, limits: QueryLimits) -> ChatSchema {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(chat)
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity)
        .finish()
}
