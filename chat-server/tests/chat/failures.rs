//! Failure paths over RabbitMQ: nothing is dropped silently.

use std::time::Duration;

use crate::support::*;
use lapin::{Connection, ConnectionProperties};

async fn dead_letters(prefix: &str) -> Option<u32> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = parley_contract::topology::Topology::new(prefix).unwrap();
    parley_contract::topology::queue_depth(&channel, &topology.dead_letters()).await.unwrap().map(|d| d.messages)
}

#[tokio::test]
async fn a_message_the_provider_cannot_translate_is_dead_lettered_not_dropped() {
    let apertium = Apertium::start().await;
    let prefix = unique_prefix("dead-letter");
    // Declared first, so dropped last: after the processes that use the topology.
    let _cleanup = TopologyCleanup::new(&prefix, &["de"]);
    let url = amqp_url();
    // The harness's Apertium has no English→German pair.
    let broker = broker_args(&prefix, &url, "de");
    let gateway = Server::start(&[&["gateway"], broker.as_slice()].concat()).await;
    let _fanout = Server::start(&[&["fanout"], broker.as_slice()].concat()).await;
    let german = Deployment::spawn_translator(&prefix, "de", &apertium.url).ready().await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &gateway.http(), &chat, None).await;
    let before = dead_letters(&prefix).await.unwrap();

    let id = send(&gateway.http(), &chat, "Good morning").await;

    assert_eq!(subscriber.collect_message(&id, 1, DELIVERY).await.len(), 1, "the original is delivered");
    let deadline = std::time::Instant::now() + DELIVERY;
    while dead_letters(&prefix).await.unwrap() == before {
        assert!(std::time::Instant::now() < deadline, "the untranslatable message never reached {prefix}.dead");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(german.log_text().contains("dead-lettering"), "the translator says why");
}

/// A provider address the test holds from start to end: it answers 503 until [`Outage::end`], then
/// forwards every request to a real Apertium APY. (A port left unbound while the provider is "down"
/// could be taken by another process meanwhile.)
#[derive(Clone, Default)]
struct Outage {
    upstream: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Outage {
    async fn serve(self) -> String {
        use axum::{body::Bytes, extract::State, http::HeaderMap, routing::any};
        async fn forward(
            State(outage): State<Outage>,
            uri: axum::http::Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> (axum::http::StatusCode, Bytes) {
            let Some(upstream) = outage.upstream.lock().unwrap().clone() else {
                return (axum::http::StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"down for the test"));
            };
            let mut request = reqwest::Client::new().post(format!("{upstream}{uri}")).body(body);
            if let Some(kind) = headers.get("content-type") {
                request = request.header("content-type", kind.as_bytes());
            }
            match request.send().await {
                Ok(answer) => (
                    axum::http::StatusCode::from_u16(answer.status().as_u16()).unwrap(),
                    answer.bytes().await.unwrap_or_default(),
                ),
                Err(_) => (axum::http::StatusCode::BAD_GATEWAY, Bytes::new()),
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(any(forward)).with_state(self);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn end(&self, upstream: &str) {
        *self.upstream.lock().unwrap() = Some(upstream.to_owned());
    }
}

/// A gateway, a fanout and a Spanish translator on RabbitMQ whose provider is down (behind
/// `outage`), and a subscriber of a new chat.
struct DuringOutage {
    outage: Outage,
    provider_url: String,
    prefix: String,
    gateway: Server,
    _fanout: Server,
    translator: Server,
    chat: String,
    subscriber: WsClient,
    /// Last, so dropped last: after the processes that use the topology.
    _cleanup: TopologyCleanup,
}

impl DuringOutage {
    async fn start(test: &str) -> Self {
        let outage = Outage::default();
        let provider_url = outage.clone().serve().await;
        let prefix = unique_prefix(test);
        let cleanup = TopologyCleanup::new(&prefix, &["es"]);
        let url = amqp_url();
        let broker = broker_args(&prefix, &url, "es");
        let gateway = Server::start(&[&["gateway"], broker.as_slice()].concat()).await;
        let fanout = Server::start(&[&["fanout"], broker.as_slice()].concat()).await;
        let translator = Deployment::spawn_translator(&prefix, "es", &provider_url).ready().await;
        let chat = unique_chat();
        let mut subscriber = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
        subscriber.subscribe_messages("1", &gateway.http(), &chat, None).await;
        Self { outage, provider_url, prefix, gateway, _fanout: fanout, translator, chat, subscriber, _cleanup: cleanup }
    }
}

#[tokio::test]
async fn a_translator_retries_a_provider_that_is_down_and_translates_once_it_is_up() {
    let mut d = DuringOutage::start("provider-down").await;

    let id = send(&d.gateway.http(), &d.chat, "Good morning, how are you?").await;
    let early = d.subscriber.collect_message(&id, 2, Duration::from_secs(2)).await;
    assert_eq!(early.len(), 1, "only the original while the provider is down");

    let apertium = Apertium::start().await;
    d.outage.end(&apertium.url);
    let late = d.subscriber.collect_message(&id, 1, Duration::from_secs(60)).await;
    assert_eq!(late.len(), 1, "the translation arrives once the provider is back");
    assert!(late[0]["text"].as_str().unwrap().contains("Buenos días"), "{}", late[0]);
    assert_eq!(dead_letters(&d.prefix).await, Some(0), "nothing was dead-lettered");
    // Waited out in place, with backoff: the translator kept the message and retried the provider,
    // never giving it back to the queue (which would count towards the delivery limit).
    let log = d.translator.log_text();
    assert!(log.contains("translation failed; retrying") && log.contains("attempt=3"), "{log}");
    assert!(!log.contains("giving the message back to the queue"), "{log}");
}

/// Messages ready (not handed to a consumer) in `queue`.
async fn ready(queue: &str) -> u32 {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    parley_contract::topology::queue_depth(&channel, queue).await.unwrap().map_or(0, |d| d.messages)
}

#[tokio::test]
async fn a_translator_stopped_while_its_provider_is_down_gives_the_message_back_and_the_next_one_translates_it() {
    let mut d = DuringOutage::start("stop-in-outage").await;

    let id = send(&d.gateway.http(), &d.chat, "Good morning, how are you?").await;
    let deadline = std::time::Instant::now() + DELIVERY;
    while !d.translator.log_text().contains("translation failed; retrying") {
        assert!(std::time::Instant::now() < deadline, "the translator never tried the provider");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(d.translator.terminate().success(), "a clean exit on SIGTERM");
    assert!(d.translator.log_text().contains("giving the message back to the queue"), "{}", d.translator.log_text());
    let queue = parley_contract::topology::Topology::new(d.prefix.as_str()).unwrap().translate_queue("es");
    // It, and the warm-ups sent while subscribing, wait in the queue.
    assert!(ready(&queue).await >= 1, "the message waits in its queue");

    let apertium = Apertium::start().await;
    d.outage.end(&apertium.url);
    let _second = Deployment::spawn_translator(&d.prefix, "es", &d.provider_url).ready().await;
    let translated: Vec<_> = d
        .subscriber
        .collect_message(&id, 2, Duration::from_secs(60))
        .await
        .into_iter()
        .filter(|m| m["language"] == "es")
        .collect();
    assert_eq!(translated.len(), 1, "translated once, by the next translator");
}

#[tokio::test]
async fn a_fanout_whose_store_fails_delivers_nothing_unstored_and_catches_up_once_it_works() {
    use sqlx::Connection as _;
    let d = Deployment::with("store-down", Layout { history: true, ..Layout::default() }).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &d.gateway().http(), &chat, None).await;
    let database = d._history.as_ref().unwrap().url.clone();
    let mut admin = sqlx::PgConnection::connect(&database).await.unwrap();
    sqlx::query("ALTER TABLE parley_deliveries RENAME TO parley_deliveries_away").execute(&mut admin).await.unwrap();

    let id = send(&d.gateway().http(), &chat, "while the store fails").await;
    assert!(
        subscriber.collect_message(&id, 1, Duration::from_secs(3)).await.is_empty(),
        "nothing is published before it is stored"
    );
    assert!(d.fanouts[0].log_text().contains("failed to store a batch"), "{}", d.fanouts[0].log_text());

    sqlx::query("ALTER TABLE parley_deliveries_away RENAME TO parley_deliveries").execute(&mut admin).await.unwrap();
    let got = subscriber.collect_message(&id, 1, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1, "delivered once the store works");
    let again = subscriber.collect_message(&id, 1, Duration::from_secs(2)).await;
    assert!(again.is_empty(), "and once only: {again:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM parley_deliveries WHERE message_id = $1::uuid")
        .bind(&id)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(stored, 1);
}

/// A gateway whose broker goes silent (lapin's own recovery would wait forever on it,
/// amqp-rs/lapin#450) keeps its sockets: it goes unready, not unhealthy, and once the broker answers
/// again it carries on over a new connection, its subscriber getting first what was sent meanwhile
/// (from the history), then what follows, in `seq` order, on the same socket.
#[tokio::test]
async fn a_gateway_whose_broker_goes_silent_keeps_its_sockets_and_resumes_on_a_new_connection() {
    let prefix = unique_prefix("silent-broker");
    let _cleanup = TopologyCleanup::new(&prefix, &[]);
    let history = TestDatabase::create().await;
    let url = amqp_url();
    let (proxy, proxied) = crate::proxy::Proxy::in_front_of(&url).await;
    let proxied = format!("{proxied}{}heartbeat=2", if proxied.contains('?') { "&" } else { "?" });
    let stored = ["--history-url", history.url.as_str(), "--stall-timeout-secs", "2"];
    let direct = [broker_args(&prefix, &url, "").as_slice(), &stored].concat();
    let _fanout = Server::start(&[&["fanout"], direct.as_slice()].concat()).await;
    let other = Server::start(&[&["gateway"], direct.as_slice()].concat()).await;
    let args = [&["gateway"], broker_args(&prefix, &proxied, "").as_slice(), &stored].concat();
    let gateway = Server::start(&args).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &gateway.http(), &chat, None).await;
    let before = send(&gateway.http(), &chat, "before the silence").await;
    let before = subscriber.collect_message(&before, 1, DELIVERY).await;
    assert_eq!(before.len(), 1);

    proxy.set(crate::proxy::Mode::Quiet);
    // Heartbeats notice (2 s each); the bound is the behaviour's, not a timing goal.
    crate::disruptive::until_ready_is(&[&gateway], 503, Duration::from_secs(60)).await;
    let during = send(&other.http(), &chat, "sent while the broker is silent to the first gateway").await;
    // Still alive, well past the stall timeout: restarting it would not bring the broker back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(gateway.health().await, 200, "{}", gateway.log_text());
    proxy.set(crate::proxy::Mode::Forward);
    crate::disruptive::until_ready_is(&[&gateway], 200, Duration::from_secs(60)).await;

    let after = send(&gateway.http(), &chat, "after the silence").await;
    // Everything up to the message sent after: what was sent meanwhile, once, then that one.
    let got = subscriber.collect_until(&after).await;
    let ids: Vec<&str> = got.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, [during.as_str(), after.as_str()], "once each, in order: {}", gateway.log_text());
    let seqs: Vec<i64> = [&before[0], &got[0], &got[1]].iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in seq order: {seqs:?}");
    let late = subscriber.collect(1, Duration::from_secs(2)).await;
    assert!(late.is_empty(), "and nothing twice: {late:?}");
    let log = gateway.log_text();
    assert!(log.contains("delivery feed resumed on a new broker connection"), "says so: {log}");
    // No second connection beside the new one (the failed one goes from the proxy once it passes
    // traffic again).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy.open() != 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(proxy.open(), 1, "one broker connection");
}

/// A publish channel the broker closes under a connection that stays up (here: the exchange messages
/// are posted to is deleted, and the publish gets 404) is not left broken: the gateway answers that
/// send with a GraphQL error, starts over on a new connection, which declares the topology again, and
/// the next send is delivered to the subscriber on the same socket.
#[tokio::test]
async fn a_gateway_whose_publish_channel_the_broker_closes_starts_over_on_a_new_connection() {
    let prefix = unique_prefix("closed-channel");
    let _cleanup = TopologyCleanup::new(&prefix, &[]);
    let url = amqp_url();
    let broker = broker_args(&prefix, &url, "");
    let _fanout = Server::start(&[&["fanout"], broker.as_slice()].concat()).await;
    let gateway = Server::start(&[&["gateway"], broker.as_slice()].concat()).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &gateway.http(), &chat, None).await;

    let connection = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let posted = parley_contract::topology::Topology::new(prefix.as_str()).unwrap().posted_exchange();
    channel.exchange_delete(posted.as_str().into(), lapin::options::ExchangeDeleteOptions::default()).await.unwrap();
    let refused = graphql(&gateway.http(), SEND, serde_json::json!({"chatId": chat, "text": "into the void"})).await;
    assert!(refused["errors"].is_array(), "a GraphQL error: {refused}");

    // The bound is the behaviour's, not a timing goal.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let id = loop {
        let response = graphql(&gateway.http(), SEND, serde_json::json!({"chatId": chat, "text": "once again"})).await;
        if let Some(id) = response["data"]["sendMessage"]["id"].as_str() {
            break id.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "never accepted again: {}", gateway.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(subscriber.collect_message(&id, 1, DELIVERY).await.len(), 1, "{}", gateway.log_text());
    assert!(gateway.log_text().contains("starting over on a new connection"), "says so");
    let _ = connection.close(200, "done".into()).await;
}

/// A standalone process's one connection carries every role through lapin's automatic recovery,
/// which can go on for good without reconnecting (amqp-rs/lapin#450): when it stays down, the process
/// gives up and exits non-zero, for its pod to restart, instead of staying up unready. Here the
/// broker goes silent behind a proxy: a heartbeat notices, and lapin's recovery then waits forever on
/// a broker that accepts connections and says nothing.
#[tokio::test]
async fn a_standalone_process_whose_broker_connection_never_comes_back_exits_non_zero_to_be_restarted() {
    let prefix = unique_prefix("unrecovered");
    let _cleanup = TopologyCleanup::new(&prefix, &[]);
    let (proxy, proxied) = crate::proxy::Proxy::in_front_of(&amqp_url()).await;
    let url = format!("{proxied}{}heartbeat=2", if proxied.contains('?') { "&" } else { "?" });
    let args = [&["standalone"], broker_args(&prefix, &url, "").as_slice(), &["--stall-timeout-secs", "1"]].concat();
    let mut standalone = Server::start(&args).await;

    proxy.set(crate::proxy::Mode::Quiet);

    let status = standalone.exited_within(Duration::from_secs(90)).await;
    let log = standalone.log_text();
    let status = status.unwrap_or_else(|| panic!("still up, unready, with no broker: {log}"));
    assert!(!status.success(), "{status}");
    assert!(log.contains("has not recovered"), "says why: {log}");
}
