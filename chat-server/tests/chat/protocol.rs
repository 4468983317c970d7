//! Transport behaviour of the gateway: HTTP verbs, errors that keep the socket usable, limits, shutdown.
//! Each runs the standalone server twice, on the in-process bus and on RabbitMQ (`on_both_buses!`);
//! none needs Apertium.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::support::*;
use futures_util::{FutureExt, StreamExt};
use serde_json::json;

async fn originals_only(extra: &[&str]) -> Server {
    Server::start(&[&["standalone", "--languages", ""], extra].concat()).await
}

/// Which bus a transport test's standalone server runs on.
#[derive(Clone, Copy)]
enum Bus {
    InProcess,
    /// RabbitMQ: deliveries then reach the gateway through its own queue, as in a deployment.
    RabbitMq,
}

/// A standalone server with no languages, and (on RabbitMQ) the topology it leaves behind.
struct BusServer {
    server: Server,
    _cleanup: Option<TopologyCleanup>,
}

impl std::ops::Deref for BusServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl std::ops::DerefMut for BusServer {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}

impl Bus {
    async fn server(self, extra: &[&str]) -> BusServer {
        match self {
            Self::InProcess => BusServer { server: originals_only(extra).await, _cleanup: None },
            Self::RabbitMq => {
                let prefix = unique_prefix("protocol");
                let cleanup = TopologyCleanup::new(&prefix, &[]);
                let url = amqp_url();
                let args = ["--amqp-url", url.as_str(), "--topology-prefix", prefix.as_str()];
                BusServer { server: originals_only(&[&args[..], extra].concat()).await, _cleanup: Some(cleanup) }
            }
        }
    }
}

/// Runs a transport test once on the in-process bus and once on RabbitMQ: `<test>::in_process` and
/// `<test>::on_rabbitmq`.
macro_rules! on_both_buses {
    ($(#[$attr:meta])* async fn $name:ident($bus:ident: Bus) $body:block) => {
        mod $name {
            use super::*;

            async fn run($bus: Bus) $body

            $(#[$attr])*
            async fn in_process() {
                run(Bus::InProcess).await
            }

            $(#[$attr])*
            async fn on_rabbitmq() {
                run(Bus::RabbitMq).await
            }
        }
    };
}

on_both_buses! {
#[tokio::test]
async fn mutations_and_queries_work_over_post_and_get(bus: Bus) {
    let server = bus.server(&[]).await;
    let posted = graphql(&server.http(), SEND, json!({"chatId": "c", "text": "hi"})).await;
    assert!(posted["data"]["sendMessage"]["id"].is_string(), "{posted}");
    // The answer is the original, in the source language, under a time-ordered UUID (version 7).
    let answer = "mutation { sendMessage(chatId: \"c\", text: \"Good morning\") { id language text original } }";
    let posted = graphql(&server.http(), answer, json!({})).await;
    let message = &posted["data"]["sendMessage"];
    assert_eq!((&message["language"], &message["text"], &message["original"]), (&json!("en"), &json!("Good morning"), &json!(true)), "{posted}");
    let id = uuid::Uuid::parse_str(message["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7, "{id}");

    let client = reqwest::Client::new();
    let query = "mutation { putEvent(message: \"hi\", chatId: \"c\") { Entries { EventId } FailedEntries } }";
    let got: serde_json::Value =
        client.get(server.http()).query(&[("query", query)]).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["data"]["putEvent"]["FailedEntries"], 0, "{got}");
    let languages: serde_json::Value =
        client.get(server.http()).query(&[("query", "{ languages }")]).send().await.unwrap().json().await.unwrap();
    assert_eq!(languages, json!({"data": {"languages": []}}));
}
}

on_both_buses! {
#[tokio::test]
async fn the_chat_page_graphiql_health_and_readiness_are_served(bus: Bus) {
    let server = bus.server(&[]).await;
    let base = format!("http://127.0.0.1:{}", server.port);
    let page = reqwest::get(format!("{base}/")).await.unwrap().text().await.unwrap();
    assert!(page.contains("app.js") && page.contains("graphiql"), "the chat page at /, with a link to GraphiQL");
    let graphiql = reqwest::get(format!("{base}/graphiql")).await.unwrap().text().await.unwrap();
    assert!(graphiql.contains("graphiql"), "GraphiQL at /graphiql");
    let config: serde_json::Value = reqwest::get(format!("{base}/chat-config.json")).await.unwrap().json().await.unwrap();
    assert_eq!((config["auth"].as_str(), config["sourceLanguage"].as_str()), (Some("none"), Some("en")), "{config}");
    for asset in ["app.js", "style.css"] {
        assert_eq!(reqwest::get(format!("{base}/{asset}")).await.unwrap().status(), 200, "{asset}");
    }
    assert_eq!(reqwest::get(format!("{base}/healthz")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(format!("{base}/readyz")).await.unwrap().status(), 200);
}
}

on_both_buses! {
#[tokio::test]
async fn bad_operations_get_graphql_errors_and_the_socket_serves_the_next_one(bus: Bus) {
    let server = bus.server(&["--max-text-bytes", "64"]).await;
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;

    client.start("syntax", "subscription { messages(chatId: ", json!({})).await;
    let error = client.result_of("syntax", DELIVERY).await;
    assert!(error.to_string().contains("expected"), "a parse error: {error}");

    client.start("lang", SUBSCRIBE, json!({"chatId": "c", "languages": ["xx"]})).await;
    let error = client.result_of("lang", DELIVERY).await;
    assert!(error.to_string().contains("unknown language \\\"xx\\\""), "{error}");
    assert_eq!(error_code(&error).as_deref(), Some("BAD_USER_INPUT"), "{error}");

    client.start("long", SEND, json!({"chatId": "c", "text": "x".repeat(65)})).await;
    let error = client.result_of("long", DELIVERY).await;
    assert!(error.to_string().contains("more than the limit of 64 bytes"), "{error}");
    assert_eq!(error_code(&error).as_deref(), Some("BAD_USER_INPUT"), "{error}");

    let chat = unique_chat();
    client.subscribe_messages("ok", &server.http(), &chat, None).await;
    let id = send(&server.http(), &chat, "still here").await;
    assert_eq!(client.collect_message(&id, 1, DELIVERY).await.len(), 1);
}
}

on_both_buses! {
#[tokio::test]
async fn invalid_graphql_over_http_is_a_graphql_error(bus: Bus) {
    let server = bus.server(&[]).await;
    let response = graphql(&server.http(), "{ nope }", json!({})).await;
    assert!(response["errors"][0]["message"].as_str().unwrap().contains("nope"), "{response}");
    let too_deep = "{ __schema { types { fields { type { fields { type { fields { type { fields { type { name } } } } } } } } } } }";
    let response = graphql(&server.http(), too_deep, json!({})).await;
    assert!(response["errors"].to_string().contains("nested too deep"), "{response}");
    // Far deeper than the parser's own recursion limit: the depth limit answers first, with the same
    // message, over HTTP and on a socket.
    let far_too_deep = format!("{{{}", "a { ".repeat(3000));
    let response = graphql(&server.http(), &far_too_deep, json!({})).await;
    assert_eq!(response["errors"][0]["message"], "The query is nested too deep.", "{response}");
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    client.start("deep", &far_too_deep, json!({})).await;
    let error = client.result_of("deep", DELIVERY).await;
    assert!(error.to_string().contains("The query is nested too deep."), "{error}");

    // A body over the limit is refused with 413 and a GraphQL error, not plain text.
    let text = "x".repeat(200_000);
    let body = json!({"query": SEND, "variables": {"chatId": "c", "text": text}});
    let response = reqwest::Client::new().post(server.http()).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 413);
    let response: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error_code(&response).as_deref(), Some("PAYLOAD_TOO_LARGE"), "{response}");
    assert!(response["errors"][0]["message"].as_str().unwrap().contains("larger than the limit"), "{response}");
}
}

on_both_buses! {
#[tokio::test]
async fn a_query_over_the_complexity_limit_is_refused_and_one_under_it_runs(bus: Bus) {
    let server = bus.server(&["--max-query-complexity", "3"]).await;
    let wide = "{ languages a: languages b: languages c: languages }";
    let response = graphql(&server.http(), wide, json!({})).await;
    assert!(response["errors"].to_string().contains("too complex"), "{response}");
    assert!(response["data"].is_null(), "{response}");
    let narrow = "{ languages a: languages }";
    let response = graphql(&server.http(), narrow, json!({})).await;
    assert_eq!(response, json!({"data": {"languages": [], "a": []}}));
}
}

#[tokio::test]
async fn a_history_that_cannot_be_read_is_unavailable() {
    // A gateway whose history database has no tables yet (only the fanout migrates): reading fails.
    let database = TestDatabase::create().await;
    let prefix = unique_prefix("unavailable");
    // Declared first, so dropped last: after the processes that use the topology.
    let _cleanup = TopologyCleanup::new(&prefix, &[]);
    let url = amqp_url();
    let broker = broker_args(&prefix, &url, "");
    let gateway =
        Server::start(&[&["gateway"], broker.as_slice(), &["--history-url", database.url.as_str()]].concat()).await;
    let response = graphql(&gateway.http(), "{ messages(chatId: \"c\") { id } }", json!({})).await;
    assert_eq!(error_code(&response).as_deref(), Some("UNAVAILABLE"), "{response}");
}

on_both_buses! {
#[tokio::test]
async fn plain_frames_that_are_not_requests_get_an_error_frame_and_the_socket_stays_open(bus: Bus) {
    let server = bus.server(&[]).await;
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
}

on_both_buses! {
#[tokio::test]
async fn subscriptions_beyond_the_per_connection_limit_are_refused_and_the_first_keeps_working(bus: Bus) {
    let server = bus.server(&["--max-subscriptions-per-connection", "1"]).await;
    let chat = unique_chat();
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    client.subscribe_messages("first", &server.http(), &chat, None).await;

    client.start("second", SUBSCRIBE, json!({"chatId": chat})).await;
    let error = client.result_of("second", DELIVERY).await;
    assert!(error.to_string().contains("too many subscriptions"), "{error}");
    assert_eq!(error_code(&error).as_deref(), Some("LIMIT_EXCEEDED"), "{error}");

    let id = send(&server.http(), &chat, "one more").await;
    assert_eq!(client.collect_message(&id, 1, DELIVERY).await.len(), 1);
}
}

on_both_buses! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_closed_as_a_slow_consumer_while_others_get_everything(bus: Bus) {
    let server = bus.server(&["--subscriber-buffer", "256"]).await;
    let chat = unique_chat();
    let mut stalled = WsClient::connect_with_small_receive_buffer(&server.ws(), Wire::TransportWs).await;
    stalled.subscribe_messages("s", &server.http(), &chat, None).await;
    let mut reader = WsClient::connect(&server.ws(), Wire::LegacyWs).await;
    reader.subscribe_messages("r", &server.http(), &chat, None).await;
    let read = Arc::new(AtomicUsize::new(0));
    let reading = tokio::spawn({
        let read = read.clone();
        async move {
            loop {
                match reader.next(DELIVERY).await {
                    Some(Received::Next { payload, .. }) if payload["data"]["messages"]["text"] != "warm-up" => {
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Received::Next { .. }) => {}
                    other => panic!("the reading subscriber got {other:?} after {} messages", read.load(Ordering::Relaxed)),
                }
            }
        }
    });

    // However large this machine's socket buffers are: frames of 3.5 KB, 200 at a time, until the
    // server closes the subscriber that does not read.
    let text = "x".repeat(3500);
    let http = server.http();
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !server.log_text().contains("closing a slow consumer") {
        assert!(tokio::time::Instant::now() < deadline, "the stalled subscriber was never closed after {sent} messages");
        futures_util::stream::iter(0..200).for_each_concurrent(32, |_| send(&http, &chat, &text).map(drop)).await;
        sent += 200;
    }
    let deadline = tokio::time::Instant::now() + DELIVERY;
    while read.load(Ordering::Relaxed) < sent {
        assert!(tokio::time::Instant::now() < deadline, "the reader got {} of {sent}", read.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reading.abort();
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
    assert!(received < sent, "the stalled subscriber was closed early, after {received} of {sent}");
}
}

on_both_buses! {
#[tokio::test]
async fn a_subscribe_that_reuses_a_running_id_is_closed_with_4409(bus: Bus) {
    let server = bus.server(&[]).await;
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    client.subscribe_messages("1", &server.http(), &unique_chat(), None).await;
    client.start("1", SUBSCRIBE, json!({"chatId": unique_chat()})).await;
    match client.next(DELIVERY).await {
        Some(Received::Closed { code, reason }) => assert_eq!(code, Some(4409), "{reason}"),
        other => panic!("expected a 4409 close, got {other:?}"),
    }
}
}

/// The close code `client` gets next.
async fn close_code(client: &mut WsClient) -> Option<u16> {
    loop {
        match client.next(DELIVERY).await {
            Some(Received::Closed { code, .. }) => return code,
            Some(_) => {}
            None => return None,
        }
    }
}

on_both_buses! {
#[tokio::test]
async fn graphql_transport_ws_violations_close_with_the_protocols_codes(bus: Bus) {
    let server = bus.server(&[]).await;
    let mut garbled = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    garbled.send_text("this is not a protocol message").await;
    assert_eq!(close_code(&mut garbled).await, Some(4400), "an invalid message");

    let mut early = WsClient::connect_raw(&server.ws(), Wire::TransportWs).await;
    early.start("1", SUBSCRIBE, json!({"chatId": "c"})).await;
    assert_eq!(close_code(&mut early).await, Some(4401), "an operation before connection_ack");

    let mut twice = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    twice.send_json(json!({"type": "connection_init", "payload": {}})).await;
    assert_eq!(close_code(&mut twice).await, Some(4429), "a second connection_init");
}
}

on_both_buses! {
#[tokio::test]
async fn a_client_that_never_sends_connection_init_is_closed_with_4408(bus: Bus) {
    let server = bus.server(&["--connection-init-timeout-secs", "1"]).await;
    let mut client = WsClient::connect_raw(&server.ws(), Wire::TransportWs).await;
    match client.next(Duration::from_secs(10)).await {
        Some(Received::Closed { code, .. }) => assert_eq!(code, Some(4408)),
        other => panic!("expected a 4408 close, got {other:?}"),
    }
}
}

on_both_buses! {
#[tokio::test]
async fn sigterm_closes_open_sockets_with_a_going_away_frame_and_exits_cleanly(bus: Bus) {
    let mut server = bus.server(&[]).await;
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
