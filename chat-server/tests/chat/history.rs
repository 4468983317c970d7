//! The history stores, PostgreSQL (a throwaway database) and memory, held to the same behaviour.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use chat_server::{
    history::{self, memory::MemoryHistory, Appended, History, Languages},
    wire::{now_rfc3339, Delivery, WIRE_VERSION},
};
use uuid::Uuid;

use crate::support::*;

fn delivery(chat: &str, id: Uuid, language: &str, reply_to: Option<Uuid>) -> Delivery {
    Delivery {
        v: WIRE_VERSION,
        id,
        chat_id: chat.into(),
        seq: 0,
        language: language.into(),
        source_language: "en".into(),
        original: language == "en",
        text: format!("{language} text of {id}"),
        sender: Some("ana".into()),
        sender_id: None,
        sent_at: now_rfc3339(),
        reply_to,
    }
}

fn original(chat: &str) -> Delivery {
    delivery(chat, Uuid::now_v7(), "en", None)
}

/// Runs `check` against a PostgreSQL store in a fresh database, then against a memory store.
async fn each_store<F, Fut>(check: F)
where
    F: Fn(Arc<dyn History>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let database = TestDatabase::create().await;
    let postgres = history::connect(&database.url, true).await.unwrap();
    check(postgres).await;
    check(Arc::new(MemoryHistory::default())).await;
}

fn seqs(found: &[history::Stored]) -> Vec<u64> {
    found.iter().map(|s| s.delivery.seq).collect()
}

#[tokio::test]
async fn each_chat_counts_from_one_and_a_redelivery_gets_its_stored_seq() {
    each_store(|store| async move {
        let (x, y) = (unique_chat(), unique_chat());
        let (a, b) = (original(&x), original(&x));
        let appended = store.append(vec![a.clone(), delivery(&x, a.id, "es", None), original(&y), b]).await.unwrap();
        let numbered: Vec<(String, u64)> =
            appended.iter().map(|a| (a.delivery().chat_id.clone(), a.delivery().seq)).collect();
        assert_eq!(numbered, vec![(x.clone(), 1), (x.clone(), 2), (y.clone(), 1), (x.clone(), 3)]);
        let again = store.append(vec![delivery(&x, a.id, "es", None), original(&x)]).await.unwrap();
        assert!(matches!(&again[0], Appended::Duplicate(d) if d.seq == 2 && d.text == format!("es text of {}", a.id)));
        assert!(matches!(&again[1], Appended::New(d) if d.seq == 4));
        assert_eq!(store.last_seq(&x).await.unwrap(), 4);
        assert_eq!(store.last_seq(&unique_chat()).await.unwrap(), 0);
    })
    .await;
}

#[tokio::test]
async fn the_newest_deliveries_come_oldest_first_and_page_backwards_with_before() {
    each_store(|store| async move {
        let chat = unique_chat();
        let mut batch = Vec::new();
        for _ in 0..5 {
            let message = original(&chat);
            batch.push(delivery(&chat, message.id, "es", None));
            batch.push(message);
        }
        store.append(batch).await.unwrap();
        let all = Languages(None);
        assert_eq!(seqs(&store.latest(&chat, all, 3, None).await.unwrap()), vec![8, 9, 10]);
        assert_eq!(seqs(&store.latest(&chat, all, 3, Some(8)).await.unwrap()), vec![5, 6, 7]);
        assert_eq!(seqs(&store.latest(&chat, all, 50, Some(3)).await.unwrap()), vec![1, 2]);
        let originals_only = vec!["ca".to_owned()];
        let found = store.latest(&chat, Languages(Some(&originals_only)), 2, None).await.unwrap();
        assert!(found.iter().all(|s| s.delivery.original), "only originals, as nothing is in ca");
        assert_eq!(seqs(&store.range(&chat, all, 4, 7, 500).await.unwrap()), vec![5, 6, 7]);
    })
    .await;
}

#[tokio::test]
async fn a_thread_is_its_message_and_the_replies_to_it_with_their_count() {
    each_store(|store| async move {
        let chat = unique_chat();
        let root = original(&chat);
        let reply = delivery(&chat, Uuid::now_v7(), "en", Some(root.id));
        let reply_es = delivery(&chat, reply.id, "es", Some(root.id));
        store.append(vec![root.clone(), original(&chat), reply.clone(), reply_es]).await.unwrap();
        assert_eq!(store.chat_of(root.id).await.unwrap(), Some(chat.clone()));
        assert_eq!(store.chat_of(Uuid::now_v7()).await.unwrap(), None);
        let thread = store.thread(root.id, Languages(None)).await.unwrap();
        let ids: Vec<(Uuid, &str)> = thread.iter().map(|s| (s.delivery.id, s.delivery.language.as_str())).collect();
        assert_eq!(ids, vec![(root.id, "en"), (reply.id, "en"), (reply.id, "es")]);
        assert_eq!(thread[0].reply_count, 1, "one reply, whatever its translations");
        assert!(store.thread(Uuid::now_v7(), Languages(None)).await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn the_room_list_puts_the_latest_activity_first() {
    each_store(|store| async move {
        let (quiet, busy) = (unique_chat(), unique_chat());
        store.append(vec![original(&quiet)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.append(vec![original(&busy), original(&busy)]).await.unwrap();
        let chats = store.chats(500).await.unwrap();
        let mine: Vec<(String, u64)> = chats
            .iter()
            .filter(|c| c.chat_id == quiet || c.chat_id == busy)
            .map(|c| (c.chat_id.clone(), c.last_seq))
            .collect();
        assert_eq!(mine, vec![(busy.clone(), 2), (quiet.clone(), 1)]);
        assert!(chats.iter().all(|c| c.last_message_at.as_deref().is_some_and(|t| t.ends_with('Z'))));
    })
    .await;
}

#[tokio::test]
async fn expiring_deletes_old_deliveries_in_batches_and_numbering_goes_on() {
    each_store(|store| async move {
        let chat = unique_chat();
        store.append((0..5).map(|_| original(&chat)).collect()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let cutoff = SystemTime::now();
        store.append(vec![original(&chat)]).await.unwrap();
        let mut deleted = 0;
        loop {
            let n = store.expire(cutoff, 2).await.unwrap();
            assert!(n <= 2, "batches are bounded");
            deleted += n;
            if n < 2 {
                break;
            }
        }
        assert!(deleted >= 5, "the five old deliveries of this chat are gone ({deleted} deleted in all)");
        assert_eq!(seqs(&store.latest(&chat, Languages(None), 50, None).await.unwrap()), vec![6]);
        let next = store.append(vec![original(&chat)]).await.unwrap();
        assert_eq!(next[0].delivery().seq, 7, "a chat keeps its numbering after retention");
    })
    .await;
}

#[tokio::test]
async fn two_writers_at_once_never_give_one_seq_twice() {
    let database = TestDatabase::create().await;
    let (a, b) =
        (history::connect(&database.url, true).await.unwrap(), history::connect(&database.url, true).await.unwrap());
    let chat = unique_chat();
    let write = |store: Arc<dyn History>, chat: String| async move {
        for _ in 0..20 {
            store.append(vec![original(&chat), original(&chat)]).await.unwrap();
        }
    };
    tokio::join!(write(a.clone(), chat.clone()), write(b, chat.clone()));
    let stored = seqs(&a.latest(&chat, Languages(None), 500, None).await.unwrap());
    assert_eq!(stored, (1..=80).collect::<Vec<u64>>());
}

#[tokio::test]
async fn one_fanout_at_a_time_deletes_expired_deliveries_and_another_takes_over_when_it_goes() {
    let database = TestDatabase::create().await;
    let (first, second) =
        (history::connect(&database.url, true).await.unwrap(), history::connect(&database.url, true).await.unwrap());
    let chat = unique_chat();
    first.append((0..4).map(|_| original(&chat)).collect()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cutoff = SystemTime::now();
    assert_eq!(first.expire(cutoff, 1).await.unwrap(), 1, "the first to ask holds the lock and deletes");
    assert_eq!(second.expire(cutoff, 10).await.unwrap(), 0, "the other deletes nothing while it does");
    assert_eq!(first.expire(cutoff, 1).await.unwrap(), 1);
    drop(first);
    // The lock goes with its holder's session; the other takes over.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let deleted = second.expire(cutoff, 10).await.unwrap();
        if deleted > 0 {
            assert_eq!(deleted, 2, "the rest of the expired deliveries");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the lock was never released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_memory_store_keeps_the_newest_deliveries_of_each_chat_within_its_window() {
    // Standalone keeps `DEFAULT_WINDOW` (10,000) per chat; a window of 3 behaves the same, smaller.
    assert_eq!(history::memory::DEFAULT_WINDOW, 10_000);
    let store = MemoryHistory::with_window(3);
    let (chat, other) = (unique_chat(), unique_chat());
    store.append((0..5).map(|_| original(&chat)).collect()).await.unwrap();
    store.append(vec![original(&other)]).await.unwrap();
    assert_eq!(seqs(&store.latest(&chat, Languages(None), 50, None).await.unwrap()), vec![3, 4, 5]);
    assert_eq!(seqs(&store.latest(&other, Languages(None), 50, None).await.unwrap()), vec![1], "per chat");
    assert_eq!(store.append(vec![original(&chat)]).await.unwrap()[0].delivery().seq, 6, "numbering goes on");
}
