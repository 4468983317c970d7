//! Idempotent sends: a retry with the same `idempotencyKey` answers the first message's id and
//! delivers nothing new, across gateways and fanout failover (keys on PostgreSQL), and within one
//! standalone process (keys in memory).

use serde_json::{json, Value};

use crate::support::*;

const KEYED: &str = "mutation($chatId: ID!, $text: String!, $sender: String, $key: String) { \
    sendMessage(chatId: $chatId, text: $text, sender: $sender, idempotencyKey: $key) { id sentAt } }";

async fn keyed(http: &str, chat: &str, text: &str, sender: &str, key: &str) -> Value {
    let response = graphql(http, KEYED, json!({"chatId": chat, "text": text, "sender": sender, "key": key})).await;
    assert!(response["errors"].is_null(), "{response}");
    response["data"]["sendMessage"].clone()
}

/// Everything a subscriber receives up to `count` deliveries of message `id`.
async fn until_delivered(client: &mut WsClient, id: &str, count: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.iter().filter(|m: &&Value| m["id"] == id).count() < count {
        let next = client.collect(1, DELIVERY).await;
        assert!(!next.is_empty(), "message {id} did not arrive {count} times; got {got:?}");
        got.extend(next);
    }
    got
}

fn deliveries_of(received: &[Value], id: &Value) -> Vec<(String, i64)> {
    received
        .iter()
        .filter(|m| &m["id"] == id)
        .map(|m| (m["language"].as_str().unwrap().to_owned(), m["seq"].as_i64().unwrap()))
        .collect()
}

#[tokio::test]
async fn a_retry_with_its_key_delivers_once_across_gateways_and_a_fanout_failover() {
    let layout = Layout { languages: &["es"], gateways: 2, fanouts: 2, history: true, ..Layout::default() };
    let mut d = Deployment::with("idempotency", layout).await;
    let chat = unique_chat();
    let (first_gateway, second_gateway) = (d.gateways[0].http(), d.gateways[1].http());
    let mut client = WsClient::connect(&d.gateways[0].ws(), Wire::TransportWs).await;
    client.subscribe_messages("1", &first_gateway, &chat, None).await;

    let first = keyed(&first_gateway, &chat, "Good morning", "ana", "k-1").await;
    let mut received = until_delivered(&mut client, first["id"].as_str().unwrap(), 2).await;
    // The answer was lost, say: the client retries through the other gateway, then again after the
    // active fanout died.
    let retry = keyed(&second_gateway, &chat, "Good morning", "ana", "k-1").await;
    assert_eq!(retry, first, "a retry answers the first message, id and sentAt");
    d.fanouts[0].kill();
    let again = keyed(&first_gateway, &chat, "Good morning", "ana", "k-1").await;
    assert_eq!(again, first, "and still after a fanout failover");

    // The same key is another message for another sender, or in another chat.
    let other_sender = keyed(&first_gateway, &chat, "Good morning", "ben", "k-1").await;
    assert_ne!(other_sender["id"], first["id"]);
    let elsewhere = keyed(&first_gateway, &unique_chat(), "Good morning", "ana", "k-1").await;
    assert_ne!(elsewhere["id"], first["id"]);

    // Once the next message and its translation are through, the retries have had their chance.
    received.extend(until_delivered(&mut client, other_sender["id"].as_str().unwrap(), 2).await);
    let mut once = deliveries_of(&received, &first["id"]);
    once.sort();
    assert_eq!(
        once.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        ["en", "es"],
        "once per language: {received:?}"
    );
    let seqs: Vec<i64> = received.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "no seq twice, none taken by a retry: {seqs:?}");
    let history = graphql(
        &second_gateway,
        "query($c: ID!) { messages(chatId: $c, last: 100) { id language } }",
        json!({"c": chat}),
    )
    .await;
    let stored = history["data"]["messages"].as_array().unwrap().iter().filter(|m| m["id"] == first["id"]).count();
    assert_eq!(stored, 2, "stored once per language: {history}");
}

#[tokio::test]
async fn a_retry_with_its_key_delivers_once_in_a_standalone_process() {
    let server = Server::start(&["standalone", "--languages", ""]).await;
    let chat = unique_chat();
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    client.subscribe_messages("1", &server.http(), &chat, None).await;
    let first = keyed(&server.http(), &chat, "hello", "ana", "k").await;
    assert_eq!(keyed(&server.http(), &chat, "hello", "ana", "k").await, first);
    let next = send(&server.http(), &chat, "next").await;
    let received = client.collect_until(&next).await;
    assert_eq!(deliveries_of(&received, &first["id"]).len(), 1, "{received:?}");

    for bad in ["", &"k".repeat(257)] {
        let response = graphql(&server.http(), KEYED, json!({"chatId": chat, "text": "x", "key": bad})).await;
        assert_eq!(error_code(&response).as_deref(), Some("BAD_USER_INPUT"), "{response}");
    }
}
