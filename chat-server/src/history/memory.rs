//! History in the process's memory: `standalone`'s store when no database is configured, and the
//! fanout's when it runs without one. It keeps the newest deliveries of each chat (a bounded window)
//! and forgets everything when the process exits; its `seq` numbering starts again with it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    keys::{IdempotencyKeys, MemoryKeys},
    Appended, ChatSummary, History, HistoryError, Languages, Stored,
};
use crate::wire::{now_rfc3339, Delivery};

/// Deliveries kept per chat by default; older ones are forgotten.
pub const DEFAULT_WINDOW: usize = 10_000;

struct Entry {
    delivery: Arc<Delivery>,
    stored_at: SystemTime,
}

#[derive(Default)]
struct ChatLog {
    last_seq: u64,
    last_message_at: Option<String>,
    entries: VecDeque<Entry>,
}

#[derive(Default)]
struct State {
    chats: HashMap<String, ChatLog>,
    /// (message id, language) → (chat, seq) of every delivery kept.
    delivered: HashMap<(Uuid, String), (String, u64)>,
    /// The chat of every original kept, by message id.
    originals: HashMap<Uuid, String>,
    /// Replies kept, by the id of the message they answer.
    replies: HashMap<Uuid, i64>,
}

impl State {
    fn stored(&self, delivery: &Arc<Delivery>) -> Stored {
        // A translation of a message has its replies too, as on PostgreSQL.
        let reply_count = self.replies.get(&delivery.id).copied().unwrap_or(0);
        Stored { delivery: delivery.clone(), reply_count }
    }

    fn forget(&mut self, delivery: &Delivery) {
        self.delivered.remove(&(delivery.id, delivery.language.clone()));
        if delivery.original {
            self.originals.remove(&delivery.id);
        }
        if let (true, Some(parent)) = (delivery.original, delivery.reply_to) {
            if let Some(count) = self.replies.get_mut(&parent) {
                *count -= 1;
                if *count <= 0 {
                    self.replies.remove(&parent);
                }
            }
        }
    }
}

/// A bounded in-memory history.
pub struct MemoryHistory {
    state: Mutex<State>,
    window: usize,
    keys: Arc<MemoryKeys>,
}

impl Default for MemoryHistory {
    fn default() -> Self {
        Self::with_window(DEFAULT_WINDOW)
    }
}

impl MemoryHistory {
    /// Keeps at most `window` deliveries per chat.
    pub fn with_window(window: usize) -> Self {
        Self { state: Mutex::default(), window: window.max(1), keys: Arc::default() }
    }
}

#[async_trait]
impl History for MemoryHistory {
    async fn append(&self, batch: Vec<Delivery>) -> Result<Vec<Appended>, HistoryError> {
        let mut state = self.state.lock().expect("history lock");
        let now = SystemTime::now();
        let mut appended = Vec::with_capacity(batch.len());
        for mut delivery in batch {
            let key = (delivery.id, delivery.language.clone());
            if let Some((chat, seq)) = state.delivered.get(&key).cloned() {
                let log = &state.chats[&chat];
                let stored = log.entries.iter().find(|e| e.delivery.seq == seq).map(|e| (*e.delivery).clone());
                appended.push(Appended::Duplicate(stored.expect("indexed deliveries are kept")));
                continue;
            }
            let log = state.chats.entry(delivery.chat_id.clone()).or_default();
            log.last_seq += 1;
            log.last_message_at = Some(now_rfc3339());
            delivery.seq = log.last_seq;
            log.entries.push_back(Entry { delivery: Arc::new(delivery.clone()), stored_at: now });
            let evicted = (log.entries.len() > self.window).then(|| log.entries.pop_front()).flatten();
            if let Some(evicted) = evicted {
                state.forget(&evicted.delivery);
            }
            state.delivered.insert(key, (delivery.chat_id.clone(), delivery.seq));
            if delivery.original {
                state.originals.insert(delivery.id, delivery.chat_id.clone());
                if let Some(parent) = delivery.reply_to {
                    *state.replies.entry(parent).or_default() += 1;
                }
            }
            appended.push(Appended::New(delivery));
        }
        Ok(appended)
    }

    async fn latest(
        &self,
        chat_id: &str,
        languages: Languages<'_>,
        last: u32,
        before: Option<u64>,
    ) -> Result<Vec<Stored>, HistoryError> {
        let state = self.state.lock().expect("history lock");
        let Some(log) = state.chats.get(chat_id) else { return Ok(Vec::new()) };
        let mut found: Vec<Stored> = log
            .entries
            .iter()
            .rev()
            .filter(|e| before.is_none_or(|b| e.delivery.seq < b) && languages.keeps(&e.delivery))
            .take(last as usize)
            .map(|e| state.stored(&e.delivery))
            .collect();
        found.reverse();
        Ok(found)
    }

    async fn range(
        &self,
        chat_id: &str,
        languages: Languages<'_>,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<Stored>, HistoryError> {
        let state = self.state.lock().expect("history lock");
        let Some(log) = state.chats.get(chat_id) else { return Ok(Vec::new()) };
        Ok(log
            .entries
            .iter()
            .filter(|e| e.delivery.seq > after && e.delivery.seq <= up_to && languages.keeps(&e.delivery))
            .take(limit as usize)
            .map(|e| state.stored(&e.delivery))
            .collect())
    }

    async fn last_seq(&self, chat_id: &str) -> Result<u64, HistoryError> {
        Ok(self.state.lock().expect("history lock").chats.get(chat_id).map_or(0, |log| log.last_seq))
    }

    async fn thread(&self, message_id: Uuid, languages: Languages<'_>) -> Result<Vec<Stored>, HistoryError> {
        let state = self.state.lock().expect("history lock");
        let Some(chat) = state.originals.get(&message_id) else {
            return Ok(Vec::new());
        };
        Ok(state.chats[chat]
            .entries
            .iter()
            .filter(|e| e.delivery.id == message_id || e.delivery.reply_to == Some(message_id))
            .filter(|e| languages.keeps(&e.delivery))
            .map(|e| state.stored(&e.delivery))
            .collect())
    }

    async fn chat_of(&self, message_id: Uuid) -> Result<Option<String>, HistoryError> {
        let state = self.state.lock().expect("history lock");
        Ok(state.originals.get(&message_id).cloned())
    }

    async fn chats(&self, first: u32) -> Result<Vec<ChatSummary>, HistoryError> {
        let state = self.state.lock().expect("history lock");
        let mut chats: Vec<ChatSummary> = state
            .chats
            .iter()
            .map(|(chat_id, log)| ChatSummary {
                chat_id: chat_id.clone(),
                last_seq: log.last_seq,
                last_message_at: log.last_message_at.clone(),
            })
            .collect();
        chats.sort_by(|a, b| b.last_message_at.cmp(&a.last_message_at).then_with(|| a.chat_id.cmp(&b.chat_id)));
        chats.truncate(first as usize);
        Ok(chats)
    }

    async fn expire(&self, cutoff: SystemTime, limit: u32) -> Result<u64, HistoryError> {
        let mut state = self.state.lock().expect("history lock");
        let mut expired = Vec::new();
        for log in state.chats.values_mut() {
            while expired.len() < limit as usize && log.entries.front().is_some_and(|e| e.stored_at < cutoff) {
                expired.extend(log.entries.pop_front().map(|e| e.delivery));
            }
        }
        for delivery in &expired {
            state.forget(delivery);
        }
        Ok(expired.len() as u64)
    }

    fn keys(self: Arc<Self>) -> Arc<dyn IdempotencyKeys> {
        self.keys.clone()
    }

    async fn ready(&self) -> bool {
        true
    }
}
