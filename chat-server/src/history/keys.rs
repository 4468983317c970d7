//! Idempotency keys: a retried `sendMessage` names the message its first attempt created.
//!
//! The gateway claims (chat, sender, key) for the id it is about to publish. A claim made within the
//! window answers the first attempt's id and `sentAt`; the gateway then publishes that message again
//! under its first id, and the fanout, which recognises a stored (message id, language), publishes
//! nothing new for it (see `fanout`). So a retry after an answer that was lost, or an error whose
//! publish had in fact gone through, delivers once; a retry whose first attempt never reached the
//! broker delivers then.
//!
//! On PostgreSQL the claims hold across gateways and fanout failover; [`MemoryKeys`] holds them in
//! one process only (a gateway without `--history-url`, or `standalone`).

use std::{
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use uuid::Uuid;

use super::HistoryError;

/// One attempt to send under a key.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub chat_id: &'a str,
    /// `None` for a message without a sender: such messages share one key space per chat.
    pub sender: Option<&'a str>,
    pub key: &'a str,
    /// The id this attempt would create, and its `sentAt`.
    pub id: Uuid,
    pub sent_at: &'a str,
    /// How long a claim holds.
    pub window: Duration,
}

/// The message a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub id: Uuid,
    pub sent_at: String,
    /// Whether this attempt is the first within the window (its own id was recorded).
    pub first: bool,
}

/// Where claims are kept.
#[async_trait]
pub trait IdempotencyKeys: Send + Sync + 'static {
    /// Records `claim.id` under the key, unless a claim within the window holds it; answers the id
    /// the key names now.
    async fn claim(&self, claim: Claim<'_>) -> Result<Claimed, HistoryError>;
}

/// (chat, sender, key).
type KeyOf = (String, String, String);

/// The message a key names, and when it was claimed.
type ClaimOf = (Uuid, String, Instant);

/// Keys most recently claimed, kept in the process: the oldest are forgotten beyond the capacity.
pub struct MemoryKeys {
    claims: Mutex<lru::LruCache<KeyOf, ClaimOf>>,
}

/// Claims a [`MemoryKeys`] keeps by default.
pub const DEFAULT_KEYS: usize = 100_000;

impl Default for MemoryKeys {
    fn default() -> Self {
        Self::with_capacity(NonZeroUsize::new(DEFAULT_KEYS).expect("non-zero"))
    }
}

impl MemoryKeys {
    pub fn with_capacity(capacity: NonZeroUsize) -> Self {
        Self { claims: Mutex::new(lru::LruCache::new(capacity)) }
    }
}

#[async_trait]
impl IdempotencyKeys for MemoryKeys {
    async fn claim(&self, claim: Claim<'_>) -> Result<Claimed, HistoryError> {
        let key = (claim.chat_id.to_owned(), claim.sender.unwrap_or_default().to_owned(), claim.key.to_owned());
        let mut claims = self.claims.lock().expect("keys lock");
        if let Some((id, sent_at, at)) = claims.get(&key) {
            if at.elapsed() < claim.window {
                return Ok(Claimed { id: *id, sent_at: sent_at.clone(), first: false });
            }
        }
        claims.put(key, (claim.id, claim.sent_at.to_owned(), Instant::now()));
        Ok(Claimed { id: claim.id, sent_at: claim.sent_at.to_owned(), first: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt<'a>(key: &'a str, sender: Option<&'a str>, window: Duration) -> Claim<'a> {
        Claim { chat_id: "c", sender, key, id: Uuid::now_v7(), sent_at: "now", window }
    }

    #[tokio::test]
    async fn a_key_names_its_first_message_within_the_window_and_per_sender() {
        let keys = MemoryKeys::default();
        let hour = Duration::from_secs(3600);
        let first = attempt("k", Some("ana"), hour);
        let claimed = keys.claim(first).await.unwrap();
        assert_eq!((claimed.id, claimed.first), (first.id, true));
        let again = keys.claim(attempt("k", Some("ana"), hour)).await.unwrap();
        assert_eq!((again.id, again.first), (first.id, false), "a retry names the first message");
        let other = attempt("k", Some("ben"), hour);
        assert_eq!(keys.claim(other).await.unwrap().id, other.id, "another sender's key is its own");
        let expired = attempt("k", Some("ana"), Duration::ZERO);
        assert_eq!(keys.claim(expired).await.unwrap().id, expired.id, "past the window the key is free again");
    }
}
