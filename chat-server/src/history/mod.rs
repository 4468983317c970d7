//! Chat history: every delivery (original and translation) with its per-chat `seq`, written by the
//! fanout alone and read by the gateways.
//!
//! The fanout [`History::append`]s each consumed batch before it publishes it: the store gives each
//! new delivery the next `seq` of its chat and recognises a redelivered one by (message id, language),
//! answering with what it stored the first time, so a retry publishes the same `seq` again and never
//! a second copy. [`postgres`] is the durable store for deployments; [`memory`] keeps a bounded
//! window in the process, for `standalone` and for a fanout run without a database.

pub mod keys;
pub mod memory;
pub mod postgres;

use std::{sync::Arc, time::SystemTime};

use async_trait::async_trait;
use uuid::Uuid;

use crate::wire::Delivery;

/// Most deliveries one history query returns.
pub const MAX_PAGE: u32 = 500;

/// Errors of a history store.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("the history database failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the history database migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("another writer stored deliveries of these chats meanwhile: {inserted} of {expected} rows inserted")]
    Conflict { expected: u64, inserted: u64 },
}

/// What [`History::append`] did with one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Appended {
    /// Stored for the first time, with its new `seq`.
    New(Delivery),
    /// Stored before (a redelivery): the delivery as it was stored, `seq` included.
    Duplicate(Delivery),
}

impl Appended {
    pub fn delivery(&self) -> &Delivery {
        match self {
            Self::New(d) | Self::Duplicate(d) => d,
        }
    }
}

/// A stored delivery, as history queries return it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub delivery: Arc<Delivery>,
    /// Replies to this message (originals in the same chat whose `replyTo` is its id).
    pub reply_count: i64,
}

/// One chat in the room list.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSummary {
    pub chat_id: String,
    pub last_seq: u64,
    /// RFC 3339.
    pub last_message_at: Option<String>,
}

/// Which deliveries a reader wants: every language, or the originals and these languages.
#[derive(Debug, Clone, Copy)]
pub struct Languages<'a>(pub Option<&'a [String]>);

impl Languages<'_> {
    pub fn keeps(&self, delivery: &Delivery) -> bool {
        delivery.original || self.0.is_none_or(|wanted| wanted.contains(&delivery.language))
    }
}

/// A history store.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Sequences and stores `batch` (deliveries whose `seq` is not set yet), in order, answering one
    /// [`Appended`] per delivery. Only the active fanout calls this.
    async fn append(&self, batch: Vec<Delivery>) -> Result<Vec<Appended>, HistoryError>;
    /// The newest `last` deliveries of a chat with `seq < before` (all when `None`), in ascending order.
    async fn latest(
        &self,
        chat_id: &str,
        languages: Languages<'_>,
        last: u32,
        before: Option<u64>,
    ) -> Result<Vec<Stored>, HistoryError>;
    /// Deliveries of a chat with `after < seq <= up_to`, in ascending order, at most `limit`.
    async fn range(
        &self,
        chat_id: &str,
        languages: Languages<'_>,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<Stored>, HistoryError>;
    /// The highest `seq` of a chat (0 for a chat with none).
    async fn last_seq(&self, chat_id: &str) -> Result<u64, HistoryError>;
    /// A message and its replies, in `seq` order; empty when the message is unknown.
    async fn thread(&self, message_id: Uuid, languages: Languages<'_>) -> Result<Vec<Stored>, HistoryError>;
    /// The chat an original message was sent to, if it is stored.
    async fn chat_of(&self, message_id: Uuid) -> Result<Option<String>, HistoryError>;
    /// Chats by most recent message first.
    async fn chats(&self, first: u32) -> Result<Vec<ChatSummary>, HistoryError>;
    /// Deletes at most `limit` deliveries stored before `cutoff` (and as many idempotency keys claimed
    /// before it); returns the larger count, so a caller repeats while either is full. A chat keeps
    /// its `lastSeq`, so its numbering goes on.
    async fn expire(&self, cutoff: SystemTime, limit: u32) -> Result<u64, HistoryError>;
    /// Whether the store can be read and written right now.
    async fn ready(&self) -> bool;
    /// The idempotency keys kept beside this history.
    fn keys(self: Arc<Self>) -> Arc<dyn keys::IdempotencyKeys>;
}

/// Connects the store a URL names: `postgres://…` (or `postgresql://…`), or `memory:`.
pub async fn connect(url: &str, migrate: bool) -> anyhow::Result<Arc<dyn History>> {
    if url == "memory:" {
        return Ok(Arc::new(memory::MemoryHistory::default()));
    }
    anyhow::ensure!(
        url.starts_with("postgres://") || url.starts_with("postgresql://"),
        "--history-url must be a postgres:// URL or memory:, not {}",
        redact(url)
    );
    let store = postgres::PostgresHistory::connect(url).await?;
    if migrate {
        store.migrate().await?;
    }
    Ok(Arc::new(store))
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("postgres://app:s3cret@db:5432/app"), "postgres://app:***@db:5432/app");
        assert_eq!(redact("postgres://db/app"), "postgres://db/app");
    }
}
