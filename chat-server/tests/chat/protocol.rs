//! Transport behaviour of the gateway: HTTP verbs, errors that keep the socket usable, limits, shutdown.
//! These run the standalone server on the in-process bus, so they need neither RabbitMQ nor Apertium.

use std::time::Duration;

use crate::support::*;
use futures_util::{FutureExt, StreamExt};
use serde_json::json;

async fn originals_only(extra: &[&str]) -> Server {
    Server::start(&[&["standalone", "--languages", ""], extra].concat()).await
}

#[tokio::test]
async fn mutations_and_queries_work_over_post_and_get() {
    let server = originals_only(&[]).await;
    let posted = graphql(&server.http(), SEND, json!({"chatId": "c", "text": "hi"})).await;
    assert!(posted["data"]["sendMessage"]["id"].is_string(), "{posted}");

    let client = reqwest::Client::new();
    let query = "mutation { putEvent(message: \"hi\", chatId: \"c\") { Entries { EventId } FailedEntries } }";
    let got: serde_json::Value =
        client.get(server.http()).query(&[("query", query)]).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["data"]["putEvent"]["FailedEntries"], 0, "{got}");
    let languages: serde_json::Value =
        client.get(server.http()).query(&[("query", "{ languages }")]).send().await.unwrap().json().await.unwrap();
    assert_eq!(languages, json!({"data": {"languages": []}}));
}

#[tokio::test]
async fn graphiql_health_and_readiness_are_served() {
    let server = originals_only(&[]).await;
    let base = format!("http://127.0.0.1:{}", server.port);
    let page = reqwest::get(format!("{base}/")).await.unwrap().text().await.unwrap();
    assert!(page.contains("graphiql"), "GraphiQL at /");
    assert_eq!(reqwest::get(format!("{base}/healthz")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(format!("{base}/readyz")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn bad_operations_get_graphql_errors_and_the_socket_serves_the_next_one() {
    let server = originals_only(&["--max-text-bytes", "64"]).await;
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;

    client.start("syntax", "subscription { messages(chatId: ", json!({})).await;
    let error = client.result_of("syntax", DELIVERY).await;
    assert!(error.to_string().contains("expected"), "a parse error: {error}");

    client.start("lang", SUBSCRIBE, json!({"chatId": "c", "languages": ["xx"]})).await;
    let error = client.result_of("lang", DELIVERY).await;
    assert!(error.to_string().contains("unknown language \\\"xx\\\""), "{error}");

    client.start("long", SEND, json!({"chatId": "c", "text": "x".repeat(65)})).await;
    let error = client.result_of("long", DELIVERY).await;
    assert!(error.to_string().contains("more than the limit of 64 bytes"), "{error}");

    let chat = unique_chat();
    client.subscribe_messages("ok", &server.http(), &chat, None).await;
    let id = send(&server.http(), &chat, "still here").await;
    assert_eq!(client.collect_message(&id, 1, DELIVERY).await.len(), 1);
}

#[tokio::test]
async fn invalid_graphql_over_http_is_a_graphql_error() {
    let server = originals_only(&[]).await;
    let response = graphql(&server.http(), "{ nope }", json!({})).await;
    assert!(response["errors"][0]["message"].as_str().unwrap().contains("nope"), "{response}");
    let too_deep = "{ __schema { types { fields { type { fields { type { fields { type { fields { type { name } } } } } } } } } } }";
    let response = graphql(&server.http(), too_deep, json!({})).await;
    assert!(response["errors"].to_string().contains("nested too deep"), "{response}");
}

#[tokio::test]
async fn plain_frames_that_are_not_requests_get_an_error_frame_and_the_socket_stays_open() {
    let server = originals_only(&[]).await;
    let mut client = WsClient::connect(&server.ws(), Wire::Plain).await;
    client.send_json(json!(["not", "a", "request"])).await;
    match client.next(DELIVERY).await {
        Some(Received::Error { payload, .. }) => {
            assert!(payload["errors"][0]["message"].is_string())
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    client.start("", "{ languages }", json!({})).await;
    match client.next(DELIVERY).await {
        Some(Received::Next { payload, .. }) => {
            assert_eq!(payload, json!({"data": {"languages": []}}))
        }
        other => panic!("expected a result frame, got {other:?}"),
    }
}

#[tokio::test]
async fn subscriptions_beyond_the_per_connection_limit_are_refused_and_the_first_keeps_working() {
    let server = originals_only(&["--max-subscriptions-per-connection", "1"]).await;
    let chat = unique_chat();
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    client.subscribe_messages("first", &server.http(), &chat, None).await;

    client.start("second", SUBSCRIBE, json!({"chatId": chat})).await;
    let error = client.result_of("second", DELIVERY).await;
    assert!(error.to_string().contains("too many subscriptions"), "{error}");

    let id = send(&server.http(), &chat, "one more").await;
    assert_eq!(client.collect_message(&id, 1, DELIVERY).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_closed_as_a_slow_consumer_while_others_get_everything() {
    const MESSAGES: usize = 2000;
    let server = originals_only(&["--subscriber-buffer", "256"]).await;
    let chat = unique_chat();
    let mut stalled = WsClient::connect_with_small_receive_buffer(&server.ws(), Wire::TransportWs).await;
    stalled.subscribe_messages("s", &server.http(), &chat, None).await;
    let mut reader = WsClient::connect(&server.ws(), Wire::LegacyWs).await;
    reader.subscribe_messages("r", &server.http(), &chat, None).await;
    let reading = tokio::spawn(async move {
        let mut texts = 0;
        while texts < MESSAGES {
            match reader.next(DELIVERY).await {
                Some(Received::Next { payload, .. }) if payload["data"]["messages"]["text"] != "warm-up" => texts += 1,
                Some(Received::Next { .. }) => {}
                other => panic!("the reading subscriber got {other:?} after {texts} messages"),
            }
        }
        texts
    });

    // 7 MB of frames: more than the socket buffers (the server's grows to 4 MiB), the writer's and 256 frames hold.
    let text = "x".repeat(3500);
    let http = server.http();
    futures_util::stream::iter(0..MESSAGES).for_each_concurrent(32, |_| send(&http, &chat, &text).map(drop)).await;

    assert_eq!(reading.await.unwrap(), MESSAGES, "a subscriber that reads gets every message");
    let mut received = 0;
    let closed = loop {
        match stalled.next(DELIVERY).await {
            Some(Received::Next { .. }) => received += 1,
            other => break other,
        }
    };
    match closed {
        Some(Received::Closed { code, reason }) => {
            assert_eq!(code, Some(1008), "{reason}");
            assert!(reason.contains("slow consumer"), "{reason}");
        }
        other => panic!("expected a 1008 close after {received} frames, got {other:?}"),
    }
    assert!(received < MESSAGES, "the stalled subscriber was closed early, after {received} of {MESSAGES}");
}

#[tokio::test]
async fn a_subscribe_that_reuses_a_running_id_is_closed_with_4409() {
    let server = originals_only(&[]).await;
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    client.subscribe_messages("1", &server.http(), &unique_chat(), None).await;
    client.start("1", SUBSCRIBE, json!({"chatId": unique_chat()})).await;
    match client.next(DELIVERY).await {
        Some(Received::Closed { code, reason }) => assert_eq!(code, Some(4409), "{reason}"),
        other => panic!("expected a 4409 close, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_that_never_sends_connection_init_is_closed_with_4408() {
    let server = originals_only(&["--connection-init-timeout-secs", "1"]).await;
    let mut client = WsClient::connect_raw(&server.ws(), Wire::TransportWs).await;
    match client.next(Duration::from_secs(10)).await {
        Some(Received::Closed { code, .. }) => assert_eq!(code, Some(4408)),
        other => panic!("expected a 4408 close, got {other:?}"),
    }
}

#[tokio::test]
async fn sigterm_closes_open_sockets_with_a_going_away_frame_and_exits_cleanly() {
    let mut server = originals_only(&[]).await;
    let mut graphql_ws = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    graphql_ws.subscribe_messages("1", &server.http(), &unique_chat(), None).await;
    let mut plain = WsClient::connect(&server.ws(), Wire::Plain).await;

    let status = server.terminate();

    assert!(status.success(), "exit status {status}");
    for client in [&mut graphql_ws, &mut plain] {
        match client.next(Duration::from_secs(10)).await {
            Some(Received::Closed { code, .. }) => assert_eq!(code, Some(1001)),
            other => panic!("expected a 1001 close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_translating_server_without_a_provider_refuses_to_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"))
        .args(["standalone", "--languages", "es", "--listen", "127.0.0.1:0"])
        .env_remove("PARLEY_TRANSLATOR")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--translator"), "{stderr}");
}
