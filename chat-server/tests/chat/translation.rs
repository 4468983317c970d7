//! How a translator uses its provider: the texts waiting go in one call where the API takes several,
//! and a text translated before costs no call.
//!
//! LibreTranslate cannot run here (its models are downloaded at start), so these tests talk to a
//! double of its documented `POST /translate` API: `q` is a text or an array of texts, and
//! `translatedText` answers in the same shape.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, routing::post, Json, Router};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::support::*;

/// A LibreTranslate double: records the `q` of every call and answers `<text> [<target>]`; after
/// [`LibreTranslateDouble::hold`], it holds each call until it is released.
#[derive(Clone, Default)]
struct LibreTranslateDouble {
    calls: Arc<Mutex<Vec<Value>>>,
    release: Arc<Notify>,
    released: Arc<std::sync::atomic::AtomicBool>,
}

impl LibreTranslateDouble {
    async fn serve(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().route("/translate", post(translate)).with_state(self);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn hold(&self) {
        self.calls.lock().unwrap().clear();
        self.released.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn release(&self) {
        self.released.store(true, std::sync::atomic::Ordering::SeqCst);
        self.release.notify_waiters();
    }

    fn calls(&self) -> Vec<Value> {
        self.calls.lock().unwrap().clone()
    }
}

async fn translate(State(double): State<LibreTranslateDouble>, Json(body): Json<Value>) -> Json<Value> {
    // Whether to hold this call is decided before it is recorded: a call the test has seen recorded
    // before it called `hold` is never held.
    let held = !double.released.load(std::sync::atomic::Ordering::SeqCst);
    let released = double.release.notified();
    double.calls.lock().unwrap().push(body["q"].clone());
    if held && !double.released.load(std::sync::atomic::Ordering::SeqCst) {
        released.await;
    }
    let target = body["target"].as_str().unwrap_or_default().to_owned();
    let one = |text: &Value| json!(format!("{} [{target}]", text.as_str().unwrap_or_default()));
    let translated = match &body["q"] {
        Value::Array(texts) => Value::Array(texts.iter().map(one).collect()),
        text => one(text),
    };
    Json(json!({ "translatedText": translated }))
}

/// Messages ready in `queue` (not yet handed to a consumer).
async fn ready_messages(queue: &str) -> u32 {
    let connection = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    parley_contract::topology::queue_depth(&channel, queue).await.unwrap().map_or(0, |d| d.messages)
}

#[tokio::test]
async fn waiting_texts_go_to_libretranslate_in_one_call_and_a_repeated_text_in_none() {
    let double = LibreTranslateDouble::default();
    double.release();
    let provider = double.clone().serve().await;
    let prefix = unique_prefix("libre-batch");
    // Declared first, so dropped last: after the processes that use the topology.
    let _cleanup = TopologyCleanup::new(&prefix, &["es"]);
    let url = amqp_url();
    let broker = broker_args(&prefix, &url, "es");
    let gateway = Server::start(&[&["gateway"], broker.as_slice()].concat()).await;
    let _fanout = Server::start(&[&["fanout"], broker.as_slice()].concat()).await;
    let _spanish = Server::start(
        &[
            &["translator", "--language", "es", "--translator", "libretranslate", "--translator-url", &provider],
            broker.as_slice(),
            &["--translate-concurrency", "1"],
        ]
        .concat(),
    )
    .await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &gateway.http(), &chat, Some(&["es"])).await;
    let warmed = Instant::now() + DELIVERY;
    while double.calls().is_empty() {
        assert!(Instant::now() < warmed, "the warm-up message was never translated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    double.hold();

    // The first text takes the translator's one call; the others wait for it in the consumer.
    let first = send(&gateway.http(), &chat, "hello").await;
    let deadline = Instant::now() + DELIVERY;
    while !double.calls().contains(&json!("hello")) {
        assert!(Instant::now() < deadline, "the translator never called the provider");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ids = vec![first];
    for text in ["one", "two", "hello", "three"] {
        ids.push(send(&gateway.http(), &chat, text).await);
    }
    let queue = parley_contract::topology::Topology::new(&prefix).unwrap().translate_queue("es");
    while ready_messages(&queue).await > 0 {
        assert!(Instant::now() < deadline, "the translator never took the waiting messages");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    double.release();

    let mut spanish = std::collections::HashMap::new();
    let deadline = Instant::now() + DELIVERY;
    while !ids.iter().all(|id| spanish.contains_key(id.as_str())) {
        assert!(Instant::now() < deadline, "translations missing; got {spanish:?}");
        for message in subscriber.collect(1, Duration::from_millis(500)).await {
            if message["language"] == "es" {
                spanish
                    .insert(message["id"].as_str().unwrap().to_owned(), message["text"].as_str().unwrap().to_owned());
            }
        }
    }
    let translated: Vec<&str> = ids.iter().map(|id| spanish[id.as_str()].as_str()).collect();
    assert_eq!(translated, ["hello [es]", "one [es]", "two [es]", "hello [es]", "three [es]"], "each its own");
    assert_eq!(
        double.calls(),
        [json!("hello"), json!(["one", "two", "three"])],
        "the waiting texts in one call, and the repeated one from memory"
    );
}
