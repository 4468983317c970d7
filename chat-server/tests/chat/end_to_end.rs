//! The chat over RabbitMQ as separate processes, with real Apertium translations.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

#[tokio::test]
async fn graphql_transport_ws_subscriber_receives_the_original_and_apertium_translations() {
    let d = Deployment::start("transport-ws", &["es", "ca"], 1).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &d.gateway().http(), &chat, Some(&["es", "ca"])).await;

    let id = send(&d.gateway().http(), &chat, "Good morning, how are you?").await;
    let messages = subscriber.collect_message(&id, 3, DELIVERY).await;

    assert_translated_good_morning(&messages, &id);
}

#[tokio::test]
async fn legacy_graphql_ws_subscriber_receives_the_original_and_apertium_translations() {
    let d = Deployment::start("legacy-ws", &["es", "ca"], 1).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::LegacyWs).await;
    subscriber.subscribe_messages("1", &d.gateway().http(), &chat, None).await;

    let id = send(&d.gateway().http(), &chat, "Good morning, how are you?").await;
    let messages = subscriber.collect_message(&id, 3, DELIVERY).await;

    assert_translated_good_morning(&messages, &id);
}

#[tokio::test]
async fn subscriber_asking_for_one_language_gets_the_original_and_only_that_translation() {
    let d = Deployment::start("one-language", &["es", "ca"], 1).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &d.gateway().http(), &chat, Some(&["ca"])).await;
    // A subscriber of every language shows when the Spanish translation has been handed out.
    let mut everything = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    everything.subscribe_messages("1", &d.gateway().http(), &chat, None).await;

    let id = send(&d.gateway().http(), &chat, "Good morning, how are you?").await;
    let all = everything.collect_message(&id, 3, DELIVERY).await;
    assert!(all.iter().any(|m| m["language"] == "es"), "the Spanish translation exists: {all:?}");
    let mut messages = subscriber.collect_message(&id, 2, DELIVERY).await;
    // Anything of `id` would come before a message sent after it was all handed out.
    let sentinel = send(&d.gateway().http(), &chat, "sentinel").await;
    let rest = subscriber.collect_until(&sentinel).await;
    messages.extend(rest.into_iter().filter(|m| m["id"] == id.as_str()));
    messages.sort_by_key(|m| m["language"].as_str().unwrap().to_owned());

    let languages: Vec<_> = messages.iter().map(|m| m["language"].as_str().unwrap()).collect();
    assert_eq!(languages, vec!["ca", "en"]);
}

#[tokio::test]
async fn plain_frames_carry_the_seed_put_event_and_chat_subscription() {
    let d = Deployment::start("plain", &["es", "ca"], 1).await;
    let chat = unique_chat();
    let mut client = WsClient::connect(&d.gateway().ws(), Wire::Plain).await;
    client.start("", &format!("subscription {{ chat(chatId: \"{chat}\") }}"), json!({})).await;
    // Wait until the chat is routed here: a warm-up sent over HTTP comes back as a string.
    let mut live = false;
    for _ in 0..40 {
        send(&d.gateway().http(), &chat, "warm-up").await;
        if let Some(Received::Next { payload, .. }) = client.next(Duration::from_millis(500)).await {
            live = payload["data"]["chat"].is_string();
            if live {
                break;
            }
        }
    }
    assert!(live, "the chat subscription never became live");

    let put = format!("mutation postMessage {{ putEvent(message: \"Good morning\", chatId: \"{chat}\") {{ Entries {{ EventId }} }} }}");
    client.start("", &put, json!({})).await;

    let mut texts = Vec::new();
    let mut event_id = None;
    let deadline = tokio::time::Instant::now() + DELIVERY;
    while !(texts.iter().any(|t: &String| t.contains("Buenos días"))
        && texts.iter().any(|t| t.contains("Bon dia"))
        && texts.iter().any(|t| t == "Good morning")
        && event_id.is_some())
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next(left).await {
            Some(Received::Next { payload, .. }) => {
                if let Some(text) = payload["data"]["chat"].as_str() {
                    texts.push(text.to_owned());
                }
                if let Some(id) = payload["data"]["putEvent"]["Entries"][0]["EventId"].as_str() {
                    event_id = Some(id.to_owned());
                }
            }
            other => {
                panic!("expected the original and both translations, got {other:?} after {texts:?}")
            }
        }
    }
    assert!(uuid::Uuid::parse_str(event_id.as_deref().unwrap()).is_ok());
}

#[tokio::test]
async fn two_gateways_deliver_each_message_exactly_once_to_every_subscriber_of_the_chat_only() {
    let d = Deployment::start("two-gateways", &[], 2).await;
    let (a, b) = (&d.gateways[0], &d.gateways[1]);
    let chat = unique_chat();
    let other_chat = unique_chat();
    let mut watchers = Vec::new();
    for gateway in [a, a, b, b] {
        let mut client = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
        client.subscribe_messages("1", &gateway.http(), &chat, None).await;
        watchers.push(client);
    }
    let mut bystander = WsClient::connect(&b.ws(), Wire::TransportWs).await;
    bystander.subscribe_messages("1", &b.http(), &other_chat, None).await;

    let id = send(&a.http(), &chat, "hello everyone").await;

    for watcher in &mut watchers {
        let got = watcher.collect_message(&id, 1, DELIVERY).await;
        assert_eq!(got.len(), 1, "every subscriber gets the message");
        assert_eq!(got[0]["text"], "hello everyone");
    }
    for watcher in &mut watchers {
        let again = watcher.collect_message(&id, 1, Duration::from_millis(1500)).await;
        assert!(again.is_empty(), "no subscriber gets it twice: {again:?}");
    }
    let leaked = bystander.collect_message(&id, 1, Duration::from_millis(500)).await;
    assert!(leaked.is_empty(), "a subscriber of another chat got {leaked:?}");
}

#[tokio::test]
async fn messages_posted_while_no_translator_runs_are_translated_once_it_starts() {
    let mut d = Deployment::start("late-translator", &["es"], 1).await;
    let stopped = d.translators.pop().unwrap();
    drop(stopped);
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &d.gateway().http(), &chat, None).await;

    let id = send(&d.gateway().http(), &chat, "Good morning, how are you?").await;
    let early = subscriber.collect_message(&id, 2, Duration::from_secs(2)).await;
    assert_eq!(early.len(), 1, "only the original while no translator runs: {early:?}");

    let translator = Deployment::spawn_translator(&d.prefix, "es", &d.apertium.as_ref().unwrap().url).ready().await;
    let late = subscriber.collect_message(&id, 1, DELIVERY).await;
    assert_eq!(late.len(), 1, "the translation arrives once a translator runs");
    assert!(late[0]["text"].as_str().unwrap().contains("Buenos días"), "{}", late[0]);
    drop(translator);
}

#[tokio::test]
async fn a_message_already_in_a_target_language_passes_through_and_a_reply_keeps_its_parent_in_every_language() {
    let d = Deployment::with("passthrough", Layout { languages: &["es"], history: true, ..Layout::default() }).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    let live = "subscription($c: ID!) { messages(chatId: $c) { id seq language original text replyTo replyCount } }";
    subscriber.start("1", live, json!({"c": chat})).await;
    // Live once a warm-up sent over HTTP comes back.
    let deadline = tokio::time::Instant::now() + STARTUP;
    loop {
        let warmup = send(&d.gateway().http(), &chat, "warm-up").await;
        if !subscriber.collect_message(&warmup, 1, Duration::from_millis(500)).await.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the subscription never became live");
    }

    // Sent in Spanish to a deployment that translates into Spanish: the translator passes it through
    // (Apertium has no Spanish→Spanish pair: a call would dead-letter it), and the fanout keeps one
    // delivery per message and language, so the original is the Spanish delivery.
    let send_in = "mutation($c: ID!, $t: String!, $l: String, $r: ID) { sendMessage(chatId: $c, text: $t, language: $l, replyTo: $r) { id seq replyTo } }";
    let sent = graphql(&d.gateway().http(), send_in, json!({"c": chat, "t": "Hola a todos", "l": "es"})).await;
    assert!(sent["data"]["sendMessage"]["seq"].is_null(), "not numbered yet when answered: {sent}");
    let root = sent["data"]["sendMessage"]["id"].as_str().unwrap().to_owned();
    let got = subscriber.collect_message(&root, 1, DELIVERY).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (&got[0]["language"], &got[0]["original"], &got[0]["text"]),
        (&json!("es"), &json!(true), &json!("Hola a todos"))
    );

    // A reply: every delivery of it, original and translation, names its parent; live deliveries
    // carry no reply count (that comes from the history).
    let reply = graphql(&d.gateway().http(), send_in, json!({"c": chat, "t": "Good morning", "r": root})).await;
    let id = reply["data"]["sendMessage"]["id"].as_str().unwrap().to_owned();
    let deliveries = subscriber.collect_message(&id, 2, DELIVERY).await;
    let languages: std::collections::BTreeSet<&str> =
        deliveries.iter().map(|m| m["language"].as_str().unwrap()).collect();
    assert_eq!(languages, ["en", "es"].into_iter().collect(), "{deliveries:?}");
    for delivery in &deliveries {
        assert_eq!(delivery["replyTo"], root.as_str(), "{delivery}");
        assert!(delivery["replyCount"].is_null(), "{delivery}");
    }
    let translator = d.translators[0].log_text();
    assert!(!translator.contains("dead-lettering"), "the Spanish message was passed through: {translator}");
}
