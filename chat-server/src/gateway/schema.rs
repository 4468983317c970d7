//! The GraphQL schema of the gateway: the contract's types and resolvers, apart from any transport.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use async_graphql::{Context, ErrorExtensions, Object, Result, Schema, SimpleObject, Subscription, ID};
use futures_util::{stream::BoxStream, Stream, StreamExt};
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    auth::{limits::Limits, Auth, Caller, Identity},
    bus::{Bus, BusError, Outgoing, Route, TraceHeaders},
    gateway::hub::{Hub, Missed},
    history::{
        self,
        keys::{Claim, IdempotencyKeys},
        History, HistoryError, Languages, Stored,
    },
    wire::{now_rfc3339, Delivery, MessagePosted, WIRE_VERSION},
};

/// The gateway's schema.
pub type ChatSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// What the resolvers need: the bus to publish to, the hub to subscribe to, the history to read
/// (when there is one), and the chat settings.
pub struct ChatContext {
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub history: Option<Arc<dyn History>>,
    /// Where `idempotencyKey`s are claimed: beside the history when there is one, else in the process.
    pub keys: Arc<dyn IdempotencyKeys>,
    pub settings: ChatSettings,
    /// Who may send; the transports have checked who may read.
    pub auth: Arc<Auth>,
    pub limits: Arc<Limits>,
}

impl ChatContext {
    fn history(&self) -> Result<&Arc<dyn History>> {
        self.history.as_ref().ok_or_else(|| {
            async_graphql::Error::new(
                "this gateway keeps no history: start it with --history-url (PARLEY_HISTORY_URL) for \
                 messages, thread, chats, replies and resuming with `after`",
            )
            .extend_with(|_, e| e.set("code", "HISTORY_DISABLED"))
        })
    }
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

    /// The languages a reader asked for, checked.
    fn languages(&self, asked: Option<Vec<String>>) -> Result<Option<Vec<String>>> {
        if let Some(unknown) = asked.iter().flatten().find(|l| !self.known(l)) {
            return Err(self.unknown_language(unknown));
        }
        Ok(asked)
    }
}

fn bad_input(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", "BAD_USER_INPUT"))
}

fn unavailable(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", "UNAVAILABLE"))
}

fn history_unavailable(err: HistoryError) -> async_graphql::Error {
    tracing::warn!(error = %err, "a history read failed");
    unavailable(format!("the history cannot be read right now: {err}"))
}

/// A non-negative `Int` argument as a `seq`.
fn seq_argument(name: &str, value: Option<i64>) -> Result<Option<u64>> {
    match value {
        Some(n) if n < 0 => Err(bad_input(format!("{name} must not be negative"))),
        Some(n) => Ok(Some(n as u64)),
        None => Ok(None),
    }
}

fn parse_message_id(id: &ID, argument: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| bad_input(format!("{argument} {:?} is not a message id", id.as_str())))
}

/// Request data of a shared group's execution (see `groups`): the resolver reports which delivery
/// each result comes from and when it watches its chat; `after` is left to each member's replay.
#[derive(Default)]
pub struct GroupFeed {
    seq: AtomicU64,
    watching: AtomicBool,
    changed: Notify,
}

impl GroupFeed {
    /// The `seq` of the delivery the latest result came from (0 for a result that came from none).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    fn set_seq(&self, seq: u64) {
        self.seq.store(seq, Ordering::Release);
    }

    /// The execution watches its chat: from now on, every delivery of it reaches the results.
    fn watch(&self) {
        self.watching.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// The execution ended; nobody needs to wait for it any more.
    pub fn end(&self) {
        self.watch();
    }

    /// Waits until the execution watches its chat, or has ended.
    pub async fn watching(&self) {
        loop {
            let changed = self.changed.notified();
            if self.watching.load(Ordering::Acquire) {
                return;
            }
            changed.await;
        }
    }
}

/// Request data of a member's replay: only the history after `after`, up to what was stored when the
/// replay began. The `seq` it covered is reported to the [`GroupFeed`] it carries.
pub struct ReplayOnly(pub Arc<GroupFeed>);

/// A chat message: an original or a translation as delivered or stored, or a message just accepted
/// (the answer to `sendMessage`: the original as it will be delivered, before it has a `seq`).
#[derive(Clone)]
pub struct ChatMessage {
    message: Arc<Delivery>,
    sequenced: bool,
    reply_count: Option<i64>,
}

impl ChatMessage {
    pub fn delivered(delivery: Arc<Delivery>) -> Self {
        Self { message: delivery, sequenced: true, reply_count: None }
    }

    fn accepted(posted: MessagePosted) -> Self {
        Self { message: Arc::new(Delivery::of_original(posted, 0)), sequenced: false, reply_count: Some(0) }
    }

    fn stored(stored: Stored) -> Self {
        Self { message: stored.delivery, sequenced: true, reply_count: Some(stored.reply_count) }
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

    /// The sender's display name: from its sign-in when the gateway has one, else as sent.
    async fn sender(&self) -> Option<&str> {
        self.message.sender.as_deref()
    }

    /// The signed-in sender's stable id (the token's `sub`); null without sign-in.
    async fn sender_id(&self) -> Option<ID> {
        self.message.sender_id.clone().map(ID)
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

    /// The message this one answers (threads).
    async fn reply_to(&self) -> Option<ID> {
        self.message.reply_to.map(|id| ID(id.to_string()))
    }

    /// Replies to this message so far, as the history has them; null on live deliveries.
    async fn reply_count(&self) -> Option<i64> {
        self.reply_count
    }
}

/// One chat in the room list.
#[derive(SimpleObject)]
pub struct Chat {
    id: ID,
    /// The `seq` of the chat's latest delivery.
    last_seq: i64,
    /// When its latest delivery was stored (RFC 3339).
    last_message_at: Option<String>,
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

    /// A chat's history: the newest `last` (at most 500) deliveries with `seq < before`, oldest first;
    /// each original and its translations into `languages` (all when omitted).
    async fn messages(
        &self,
        ctx: &Context<'_>,
        chat_id: ID,
        languages: Option<Vec<String>>,
        #[graphql(default = 50)] last: Option<i32>,
        before: Option<i64>,
    ) -> Result<Vec<ChatMessage>> {
        let chat = ctx.data_unchecked::<Arc<ChatContext>>();
        check_chat_id(&chat.settings, &chat_id)?;
        let languages = chat.settings.languages(languages)?;
        let last = last.unwrap_or(50);
        if !(1..=history::MAX_PAGE as i32).contains(&last) {
            return Err(bad_input(format!("last must be between 1 and {}", history::MAX_PAGE)));
        }
        let before = seq_argument("before", before)?;
        let found = chat
            .history()?
            .latest(&chat_id, Languages(languages.as_deref()), last as u32, before)
            .await
            .map_err(history_unavailable)?;
        Ok(found.into_iter().map(ChatMessage::stored).collect())
    }

    /// A message and every reply to it, in `seq` order, in `languages` (all when omitted).
    async fn thread(
        &self,
        ctx: &Context<'_>,
        message_id: ID,
        languages: Option<Vec<String>>,
    ) -> Result<Vec<ChatMessage>> {
        let chat = ctx.data_unchecked::<Arc<ChatContext>>();
        let id = parse_message_id(&message_id, "messageId")?;
        let languages = chat.settings.languages(languages)?;
        let found = chat.history()?.thread(id, Languages(languages.as_deref())).await.map_err(history_unavailable)?;
        Ok(found.into_iter().map(ChatMessage::stored).collect())
    }

    /// The chats with messages, the most recently active first.
    async fn chats(&self, ctx: &Context<'_>, #[graphql(default = 50)] first: Option<i32>) -> Result<Vec<Chat>> {
        let chat = ctx.data_unchecked::<Arc<ChatContext>>();
        let first = first.unwrap_or(50);
        if !(1..=history::MAX_PAGE as i32).contains(&first) {
            return Err(bad_input(format!("first must be between 1 and {}", history::MAX_PAGE)));
        }
        let found = chat.history()?.chats(first as u32).await.map_err(history_unavailable)?;
        Ok(found
            .into_iter()
            .map(|c| Chat {
                id: ID(c.chat_id),
                last_seq: i64::try_from(c.last_seq).unwrap_or(i64::MAX),
                last_message_at: c.last_message_at,
            })
            .collect())
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

/// A message as a client asked to send it.
struct NewMessage {
    chat_id: String,
    text: String,
    language: Option<String>,
    sender: Option<String>,
    reply_to: Option<ID>,
    idempotency_key: Option<String>,
}

/// How long an `idempotencyKey` names its first message (on PostgreSQL, at most as long as the
/// history's retention keeps it).
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Longest `idempotencyKey`, in bytes.
const MAX_KEY_BYTES: usize = 256;

/// Validates and publishes a new message in a span of its own: the root of the message's trace, or a
/// child of the caller's when the request carried a W3C `traceparent`.
async fn post(ctx: &Context<'_>, message: NewMessage) -> Result<MessagePosted, PostError> {
    let chat = ctx.data_unchecked::<Arc<ChatContext>>();
    let caller = ctx.data_opt::<Caller>();
    chat.auth.may_send(caller).map_err(|e| e.graphql())?;
    let identity = caller.and_then(|c| c.identity.as_deref());
    if let Some(identity) = identity {
        if message.sender.is_some() {
            return Err(bad_input("sender comes from your sign-in: leave the sender argument out").into());
        }
        // Signed-in users are limited one by one; without sign-in there is no one to tell apart.
        chat.limits.send(&identity.sub)?;
    }
    let span = tracing::info_span!("send_message", trace_id = tracing::field::Empty);
    ctx.data_opt::<TraceHeaders>().cloned().unwrap_or_default().continue_in(&span);
    let trace = TraceHeaders::of(&span);
    publish_new(chat, message, identity, &trace).instrument(span).await
}

/// Validates and publishes a new message; the gateway is where message ids are born.
async fn publish_new(
    chat: &ChatContext,
    message: NewMessage,
    identity: Option<&Identity>,
    trace: &TraceHeaders,
) -> Result<MessagePosted, PostError> {
    let NewMessage { chat_id, text, language, sender, reply_to, idempotency_key } = message;
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
    if idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_BYTES) {
        return Err(bad_input(format!("idempotencyKey must be 1 to {MAX_KEY_BYTES} bytes")).into());
    }
    if sender.as_ref().is_some_and(|s| s.len() > settings.max_sender_bytes) {
        return Err(bad_input(format!("sender is longer than {} bytes", settings.max_sender_bytes)).into());
    }
    let source_language = match language {
        Some(language) if !settings.known(&language) => return Err(settings.unknown_language(&language).into()),
        Some(language) => language,
        None => settings.source_language.clone(),
    };
    let reply_to = match reply_to {
        None => None,
        Some(id) => {
            let parent = parse_message_id(&id, "replyTo")?;
            let found = chat.history()?.chat_of(parent).await.map_err(history_unavailable)?;
            if found.as_deref() != Some(chat_id.as_str()) {
                return Err(bad_input(format!("replyTo {parent} is not a message of chat {chat_id:?}")).into());
            }
            Some(parent)
        }
    };
    let (sender, sender_id) = match identity {
        Some(identity) => (Some(identity.name.clone()), Some(identity.sub.clone())),
        None => (sender, None),
    };
    let mut posted = MessagePosted {
        v: WIRE_VERSION,
        id: Uuid::now_v7(),
        chat_id,
        sender,
        sender_id,
        text,
        source_language,
        sent_at: now_rfc3339(),
        reply_to,
    };
    if let Some(key) = idempotency_key.as_deref() {
        let claim = Claim {
            chat_id: &posted.chat_id,
            // A signed-in sender's keys are its own whatever its display name.
            sender: posted.sender_id.as_deref().or(posted.sender.as_deref()),
            key,
            id: posted.id,
            sent_at: &posted.sent_at,
            window: IDEMPOTENCY_WINDOW,
        };
        let claimed = chat.keys.claim(claim).await.map_err(|err| {
            tracing::warn!(error = %err, "an idempotency key could not be claimed");
            unavailable(format!("the idempotency key cannot be checked right now, so nothing was sent: {err}"))
        })?;
        if !claimed.first {
            // Published again under its first id: the fanout delivers it only if the first attempt
            // never reached it.
            tracing::debug!(id = %claimed.id, "a retry of an idempotent send");
            crate::metrics::metrics().posted.get_or_create(&crate::metrics::Outcome { result: "retried" }).inc();
            posted.id = claimed.id;
            posted.sent_at = claimed.sent_at;
        }
    }
    let payload = serde_json::to_vec(&posted).expect("a message always encodes");
    let posts = &crate::metrics::metrics().posted;
    if let Err(source) = chat.bus.publish(Outgoing { route: Route::Posted, payload: &payload, trace }).await {
        tracing::error!(id = %posted.id, error = %source, "failed to publish a message");
        posts.get_or_create(&crate::metrics::Outcome { result: "unavailable" }).inc();
        return Err(PostError::Unavailable { id: posted.id, source });
    }
    posts.get_or_create(&crate::metrics::Outcome { result: "accepted" }).inc();
    tracing::debug!(id = %posted.id, "message posted");
    Ok(posted)
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Sends a message to a chat; every subscriber receives it and its translations.
    #[allow(clippy::too_many_arguments, reason = "one argument per GraphQL argument of the contract")]
    async fn send_message(
        &self,
        ctx: &Context<'_>,
        chat_id: ID,
        text: String,
        #[graphql(desc = "ISO 639-1 code of `text`; the deployment's source language when omitted")] language: Option<
            String,
        >,
        #[graphql(desc = "Display name, without sign-in only: a signed-in sender's comes from its token")]
        sender: Option<String>,
        #[graphql(desc = "The message this one answers, in the same chat (needs history)")] reply_to: Option<ID>,
        #[graphql(desc = "A retry with the same key (same chat and sender, within 24 hours) answers the first \
                          attempt's message and delivers nothing new")]
        idempotency_key: Option<String>,
    ) -> Result<ChatMessage> {
        let message = NewMessage { chat_id: chat_id.0, text, language, sender, reply_to, idempotency_key };
        Ok(post(ctx, message).await.map(ChatMessage::accepted)?)
    }

    /// The seed's mutation: sends `message` to `chatId` in the source language.
    async fn put_event(
        &self,
        ctx: &Context<'_>,
        message: String,
        chat_id: String,
        #[graphql(desc = "As sendMessage's: a retry with the same key answers the first event's id")]
        idempotency_key: Option<String>,
    ) -> Result<PutEventResult> {
        let message =
            NewMessage { chat_id, text: message, language: None, sender: None, reply_to: None, idempotency_key };
        let entry = match post(ctx, message).await {
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

/// Pages of stored deliveries of a chat with `after < seq <= up_to`.
fn replay(
    history: Arc<dyn History>,
    chat_id: String,
    languages: Option<Vec<String>>,
    after: u64,
    up_to: u64,
) -> BoxStream<'static, Result<Arc<Delivery>>> {
    futures_util::stream::unfold(Some(after), move |cursor| {
        let (history, chat_id, languages) = (history.clone(), chat_id.clone(), languages.clone());
        async move {
            let cursor = cursor?;
            if cursor >= up_to {
                return None;
            }
            match history.range(&chat_id, Languages(languages.as_deref()), cursor, up_to, history::MAX_PAGE).await {
                Ok(page) => {
                    // A short page is the last; a full one is followed by the next from its last seq.
                    let next = (page.len() == history::MAX_PAGE as usize)
                        .then(|| page.last().map(|s| s.delivery.seq))
                        .flatten();
                    let items: Vec<Result<Arc<Delivery>>> = page.into_iter().map(|s| Ok(s.delivery)).collect();
                    Some((futures_util::stream::iter(items), next))
                }
                Err(err) => Some((futures_util::stream::iter(vec![Err(history_unavailable(err))]), None)),
            }
        }
    })
    .flatten()
    .boxed()
}

/// The deliveries of one chat that pass `keep`: with `after`, first those stored after it, then the
/// live ones, with no gap and no repeat at the seam. Ends with an error if the subscriber falls behind.
async fn deliveries<T, F>(
    ctx: &Context<'_>,
    chat_id: &str,
    languages: Option<Vec<String>>,
    after: Option<u64>,
    keep: F,
) -> Result<BoxStream<'static, Result<T>>>
where
    T: Send + 'static,
    F: Fn(&Arc<Delivery>) -> Option<T> + Send + 'static,
{
    let chat = ctx.data_unchecked::<Arc<ChatContext>>();
    check_chat_id(&chat.settings, chat_id)?;
    let languages = chat.settings.languages(languages)?;
    let wanted: Option<HashSet<String>> = languages.clone().map(|l| l.into_iter().collect());
    let keep = move |d: &Arc<Delivery>| {
        let language_ok = d.original || wanted.as_ref().is_none_or(|w| w.contains(&d.language));
        language_ok.then(|| keep(d)).flatten()
    };
    // A member's replay of a shared group: history only, up to what is stored now.
    if let Some(ReplayOnly(feed)) = ctx.data_opt::<ReplayOnly>() {
        let history = chat.history()?.clone();
        let up_to = history.last_seq(chat_id).await.map_err(history_unavailable)?;
        // The member goes on with live results after this: deliveries up to here came from history.
        feed.set_seq(up_to.max(after.unwrap_or(0)));
        let stored = replay(history, chat_id.to_owned(), languages, after.unwrap_or(0), up_to);
        return Ok(stored.filter_map(move |d| futures_util::future::ready(d.map(|d| keep(&d)).transpose())).boxed());
    }
    let feed = ctx.data_opt::<Arc<GroupFeed>>().cloned();
    // Watch the chat before reading the history, so whatever the history misses arrives live.
    let subscription =
        chat.hub.subscribe(chat_id).await.map_err(|err| unavailable(format!("cannot watch chat {chat_id}: {err}")))?;
    if let Some(feed) = &feed {
        feed.watch();
    }
    // Executed alone (not in a group), the resolver replays history itself.
    let (stored, seam) = match (after, &feed) {
        (Some(after), None) => {
            let history = chat.history()?.clone();
            let up_to = history.last_seq(chat_id).await.map_err(history_unavailable)?;
            (replay(history, chat_id.to_owned(), languages, after, up_to), up_to.max(after))
        }
        _ => (futures_util::stream::empty().boxed(), 0),
    };
    let lag_feed = feed.clone();
    let live = futures_util::stream::unfold(Some(subscription), move |state| {
        let feed = lag_feed.clone();
        async move {
            let mut subscription = state?;
            loop {
                match subscription.recv().await {
                    Ok(delivery) if delivery.seq > seam => return Some((Ok(delivery), Some(subscription))),
                    Ok(_) => {}
                    Err(Missed::Lagged(n)) => {
                        if let Some(feed) = &feed {
                            feed.set_seq(0);
                        }
                        let err = async_graphql::Error::new(format!(
                            "this subscriber fell {n} messages behind and was dropped; subscribe again"
                        ))
                        .extend_with(|_, e| e.set("code", "SLOW_CONSUMER"));
                        return Some((Err(err), None));
                    }
                    Err(Missed::Closed) => return None,
                }
            }
        }
    });
    Ok(stored
        .chain(live)
        .filter_map(move |item| {
            let kept = match item {
                Ok(delivery) => keep(&delivery).map(|kept| {
                    if let Some(feed) = &feed {
                        feed.set_seq(delivery.seq);
                    }
                    Ok(kept)
                }),
                Err(err) => Some(Err(err)),
            };
            futures_util::future::ready(kept)
        })
        .boxed())
}

#[Subscription]
impl SubscriptionRoot {
    /// Every message of a chat: each original, and its translations into `languages` (all when
    /// omitted). With `after`, first every stored delivery with `seq > after`, then the live ones.
    async fn messages(
        &self,
        ctx: &Context<'_>,
        chat_id: ID,
        languages: Option<Vec<String>>,
        after: Option<i64>,
    ) -> Result<impl Stream<Item = Result<ChatMessage>>> {
        let after = seq_argument("after", after)?;
        deliveries(ctx, &chat_id, languages, after, |d| Some(ChatMessage::delivered(d.clone()))).await
    }

    /// The seed's subscription: the text of every original and translation of a chat.
    async fn chat(&self, ctx: &Context<'_>, chat_id: String) -> Result<impl Stream<Item = Result<String>>> {
        deliveries(ctx, &chat_id, None, None, |d| Some(d.text.clone())).await
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
        .extension(super::nesting::NestingLimit { max_depth: limits.max_depth })
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity)
        .finish()
}
