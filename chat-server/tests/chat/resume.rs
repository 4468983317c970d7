//! Durable, resumable chats on RabbitMQ and PostgreSQL: a subscriber that comes back misses nothing,
//! and a fanout that takes over goes on numbering where the last one stopped.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::{json, Value};

use crate::support::*;

/// (id, language) of every delivery, checking that none repeats.
fn distinct_keys(deliveries: &[Value]) -> HashSet<(String, String)> {
    let mut keys = HashSet::new();
    for d in deliveries {
        let key = (d["id"].as_str().unwrap().to_owned(), d["language"].as_str().unwrap().to_owned());
        assert!(keys.insert(key.clone()), "{key:?} delivered twice");
    }
    keys
}

fn is_failover(delivery: &Value) -> bool {
    delivery["text"].as_str().is_some_and(|t| t.starts_with("failover"))
}

fn seqs(deliveries: &[Value]) -> Vec<u64> {
    deliveries.iter().map(|d| d["seq"].as_u64().unwrap()).collect()
}

/// Polls the room list until `chat` has reached `seq`.
async fn until_stored(http: &str, chat: &str, seq: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let response = graphql(http, "{ chats(first: 500) { id lastSeq } }", json!({})).await;
        let last = response["data"]["chats"]
            .as_array()
            .and_then(|chats| chats.iter().find(|c| c["id"] == chat))
            .and_then(|c| c["lastSeq"].as_u64())
            .unwrap_or(0);
        if last >= seq {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "chat {chat} reached seq {last} of {seq}: {response}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_subscriber_that_missed_200_messages_resumes_with_every_delivery_once_in_order_then_live() {
    let d = Deployment::with("resume", Layout { languages: &["es", "ca"], history: true, ..Layout::default() }).await;
    let (http, ws) = (d.gateway().http(), d.gateway().ws());
    let chat = unique_chat();
    // A first message, seen live (or, should the subscription not be bound in time, not at all).
    let mut before = WsClient::connect(&ws, Wire::TransportWs).await;
    before.start("1", SUBSCRIBE, json!({"chatId": chat})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = send(&http, &chat, "Good morning, how are you?").await;
    let got = before.collect_message(&seen, 3, Duration::from_secs(10)).await;
    let last_seen = got.iter().map(|m| m["seq"].as_u64().unwrap()).max().unwrap_or(0);
    drop(before);

    // While nobody listens, 200 messages and their translations into es and ca.
    for i in 0..200 {
        send(&http, &chat, &format!("Message number {i} of the afternoon")).await;
    }
    let stored = 3 + 600;
    until_stored(&http, &chat, stored).await;
    let missed_count = (stored - last_seen) as usize;

    // One client resumes through its shared group (the point as a variable), one alone (written inline).
    let mut shared = WsClient::connect(&ws, Wire::TransportWs).await;
    shared.start("1", RESUME, json!({"chatId": chat, "after": last_seen})).await;
    let inline = format!(
        "subscription {{ messages(chatId: \"{chat}\", after: {last_seen}) {{ id chatId seq language original text }} }}"
    );
    let mut alone = WsClient::connect(&ws, Wire::TransportWs).await;
    alone.start("1", &inline, json!({})).await;
    for client in [&mut shared, &mut alone] {
        let missed = client.collect(missed_count, DELIVERY).await;
        assert_eq!(missed.len(), missed_count, "every missed original and translation");
        assert_eq!(seqs(&missed), (last_seen + 1..=stored).collect::<Vec<u64>>(), "in seq order");
        let keys = distinct_keys(&missed);
        assert!(keys.iter().filter(|(_, l)| l == "es").count() >= 200);
        assert!(keys.iter().filter(|(_, l)| l == "ca").count() >= 200);
        assert!(missed.iter().any(|m| m["language"] == "es" && m["text"].as_str().unwrap().contains("de la tarde")));
    }

    // Then live, with nothing repeated at the seam.
    let live = send(&http, &chat, "Good evening").await;
    for client in [&mut shared, &mut alone] {
        let got = client.collect_message(&live, 3, DELIVERY).await;
        assert_eq!(got.len(), 3);
        assert!(seqs(&got).iter().all(|s| *s > stored), "{got:?}");
        let again = client.collect(1, Duration::from_millis(500)).await;
        assert!(again.is_empty(), "nothing after the live message: {again:?}");
    }
}

#[tokio::test]
async fn when_the_active_fanout_is_killed_the_standby_numbers_on_without_gap_or_repeat() {
    let mut d = Deployment::with("failover", Layout { fanouts: 2, history: true, ..Layout::default() }).await;
    let (http, ws) = (d.gateway().http(), d.gateway().ws());
    let chats: Vec<String> = (0..4).map(|_| unique_chat()).collect();
    let mut subscribers = Vec::new();
    for chat in &chats {
        let mut client = WsClient::connect(&ws, Wire::TransportWs).await;
        client.subscribe_messages("1", &http, chat, None).await;
        subscribers.push(client);
    }
    let warmed: Vec<u64> = {
        let mut last = Vec::new();
        for chat in &chats {
            let response = graphql(&http, "{ chats(first: 500) { id lastSeq } }", json!({})).await;
            let seq = response["data"]["chats"].as_array().unwrap().iter().find(|c| c["id"] == *chat).unwrap()
                ["lastSeq"]
                .as_u64()
                .unwrap();
            last.push(seq);
        }
        last
    };

    // The warm-ups went through one fanout: the active one.
    let active: Vec<usize> = (0..2).filter(|&f| d.fanouts[f].log_text().contains("fanout active")).collect();
    assert_eq!(active.len(), 1, "exactly one fanout is active: {active:?}");
    let (active, standby) = (active[0], 1 - active[0]);

    // 1,000 messages, 250 per chat, 20 in flight at a time; the active fanout dies a third of the way
    // in, while messages are in flight.
    let accepted = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn({
        let (chats, http, accepted) = (chats.clone(), http.clone(), accepted.clone());
        async move {
            let client = reqwest::Client::new();
            let mut sent = Vec::new();
            for round in 0..50 {
                let mut in_flight = Vec::new();
                for (i, chat) in chats.iter().enumerate().cycle().skip(round * 20).take(20) {
                    let (client, http, chat) = (client.clone(), http.clone(), chat.clone());
                    let body =
                        json!({"query": SEND, "variables": {"chatId": chat, "text": format!("failover {round} {i}")}});
                    in_flight.push(tokio::spawn(async move {
                        let response: Value =
                            client.post(&http).json(&body).send().await.unwrap().json().await.unwrap();
                        (i, response["data"]["sendMessage"]["id"].as_str().map(str::to_owned))
                    }));
                }
                for task in in_flight {
                    let (i, id) = task.await.unwrap();
                    sent.push((i, id.expect("every message is accepted")));
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
            sent
        }
    });
    let deadline = tokio::time::Instant::now() + STARTUP;
    while accepted.load(Ordering::Relaxed) < 330 {
        assert!(!sender.is_finished(), "the sender stopped early");
        assert!(tokio::time::Instant::now() < deadline, "only {} messages accepted", accepted.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.fanouts[active].kill();
    let sent = sender.await.unwrap();

    for (i, (chat, subscriber)) in chats.iter().zip(&mut subscribers).enumerate() {
        let expected = sent.iter().filter(|(c, _)| *c == i).count();
        until_stored(&http, chat, warmed[i] + expected as u64).await;
        // The stored numbering: 1..N, nothing missing, nothing twice.
        let mut stored = Vec::new();
        let mut before: Option<u64> = None;
        loop {
            let query = "query($chatId: ID!, $before: Int) { messages(chatId: $chatId, last: 500, before: $before) { id seq } }";
            let page = graphql(&http, query, json!({"chatId": chat, "before": before})).await;
            let page = page["data"]["messages"].as_array().unwrap().clone();
            if page.is_empty() {
                break;
            }
            before = page[0]["seq"].as_u64();
            stored.splice(0..0, page);
        }
        let n = warmed[i] + expected as u64;
        assert_eq!(seqs(&stored), (1..=n).collect::<Vec<u64>>(), "chat {i} is numbered 1..{n}");
        // The subscriber got each message once (late warm-ups aside).
        let mut live = Vec::new();
        let deadline = tokio::time::Instant::now() + DELIVERY;
        while live.len() < expected && tokio::time::Instant::now() < deadline {
            live.extend(subscriber.collect(1, Duration::from_secs(1)).await.into_iter().filter(is_failover));
        }
        let keys = distinct_keys(&live);
        assert_eq!(keys.len(), expected, "chat {i}: every message reached its subscriber");
        let extra: Vec<Value> =
            subscriber.collect(10, Duration::from_millis(500)).await.into_iter().filter(is_failover).collect();
        assert!(extra.is_empty(), "chat {i}: nothing twice: {extra:?}");
    }
    assert!(d.fanouts[standby].log_text().contains("fanout active"), "the standby took over");
}
