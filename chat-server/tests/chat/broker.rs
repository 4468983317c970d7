//! What the broker path guarantees, on the real RabbitMQ: the delivery limit dead-letters, a message
//! published twice is delivered once and stored once, `seq` rises strictly per chat, and a gateway
//! stops taking a chat's deliveries when its last subscriber leaves.

use std::time::Duration;

use lapin::{
    options::{
        BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use parley_contract::topology::{self, Topology};
use serde_json::{json, Value};

use crate::support::*;

async fn channel() -> (Connection, Channel) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    (connection, channel)
}

/// Publishes `payload` to `exchange` with `routing_key`; the confirmation says whether it was routed.
async fn publish(channel: &Channel, exchange: &str, routing_key: &str, payload: &[u8]) -> lapin::Confirmation {
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    channel
        .basic_publish(exchange.into(), routing_key.into(), options, payload, BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap()
}

fn posted(chat: &str, text: &str) -> Value {
    json!({"v": 1, "id": uuid::Uuid::now_v7(), "chatId": chat, "text": text, "sourceLanguage": "en",
        "sentAt": "2026-01-01T00:00:00.000Z"})
}

#[tokio::test]
async fn a_message_handed_out_more_than_the_delivery_limit_is_dead_lettered() {
    let prefix = unique_prefix("delivery-limit");
    let _cleanup = TopologyCleanup::new(&prefix, &["de"]);
    let topology = Topology::new(prefix.as_str()).unwrap();
    let (_connection, channel) = channel().await;
    topology::declare(&channel, &topology, &["de"]).await.unwrap();
    publish(&channel, &topology.posted_exchange(), "", posted("c", "never translated").to_string().as_bytes()).await;

    // A consumer that keeps giving the message back, as a failing translator would.
    let queue = topology.translate_queue("de");
    let mut deliveries = 0;
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        match channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap() {
            Some(message) => {
                deliveries += 1;
                message.delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
            }
            None if deliveries > 0 => break,
            None => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "still in {queue} after {deliveries} deliveries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!((10..=11).contains(&deliveries), "x-delivery-limit is 10: handed out {deliveries} times");
    let dead = topology.dead_letters();
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let depth = topology::queue_depth(&channel, &dead).await.unwrap().map_or(0, |d| d.messages);
        if depth == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{dead} holds {depth} messages");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_message_published_twice_is_delivered_once_and_stored_once() {
    let d = Deployment::with("twice", Layout { history: true, ..Layout::default() }).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &d.gateway().http(), &chat, None).await;
    let topology = Topology::new(d.prefix.as_str()).unwrap();
    let (_connection, channel) = channel().await;

    // A probe of what the fanout publishes for this chat, beside the gateway's own queue.
    let probe = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let probe = probe.name().as_str().to_owned();
    let exchange = topology.deliver_exchange();
    let (queue, key) = (probe.as_str().into(), chat.as_str().into());
    channel
        .queue_bind(queue, exchange.as_str().into(), key, QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();

    // The same original twice, as a gateway that lost a confirm and retried would publish it.
    let message = posted(&chat, "once only");
    let id = message["id"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        publish(&channel, &topology.posted_exchange(), "", message.to_string().as_bytes()).await;
    }
    let sentinel = send(&d.gateway().http(), &chat, "sentinel").await;
    let got = subscriber.collect_until(&sentinel).await;
    let copies: Vec<&Value> = got.iter().filter(|m| m["id"] == id.as_str()).collect();
    assert_eq!(copies.len(), 1, "{got:?}");
    // The fanout stored it once and published it once: the copy came anew, not redelivered, so the
    // first was published (or comes back redelivered) and the copy needs nothing.
    let mut published = Vec::new();
    while let Some(message) = channel.basic_get(probe.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap()
    {
        let delivery: Value = serde_json::from_slice(&message.delivery.data).unwrap();
        if delivery["id"] == id.as_str() {
            published.push(delivery["seq"].clone());
        }
    }
    assert_eq!(published, [copies[0]["seq"].clone()], "published once");

    // A delivery the fanout publishes again (it lost the confirms of a batch) is handed out once too.
    let delivery = json!({"v": 1, "id": id, "chatId": chat, "seq": copies[0]["seq"], "language": "en",
        "sourceLanguage": "en", "original": true, "text": "once only", "sentAt": "2026-01-01T00:00:00.000Z"});
    publish(&channel, &topology.deliver_exchange(), &chat, delivery.to_string().as_bytes()).await;
    let after = send(&d.gateway().http(), &chat, "after").await;
    let later = subscriber.collect_until(&after).await;
    assert!(later.iter().all(|m| m["id"] != id.as_str()), "handed out again: {later:?}");

    let stored =
        graphql(&d.gateway().http(), "query($c: ID!) { messages(chatId: $c) { id } }", json!({"c": chat})).await;
    let rows = stored["data"]["messages"].as_array().unwrap().iter().filter(|m| m["id"] == id.as_str()).count();
    assert_eq!(rows, 1, "stored once: {stored}");
}

#[tokio::test]
async fn seq_rises_strictly_per_chat_in_what_every_subscriber_receives() {
    // Numbered by the fanout through PostgreSQL, as in a deployment.
    let layout = Layout { languages: &["es", "ca"], gateways: 2, history: true, ..Layout::default() };
    let d = Deployment::with("seq-order", layout).await;
    let chat = unique_chat();
    let mut subscribers = Vec::new();
    for gateway in &d.gateways {
        let mut client = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
        client.subscribe_messages("1", &gateway.http(), &chat, None).await;
        subscribers.push(client);
    }
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..30 {
            ids.push(send(&d.gateways[i % 2].http(), &chat, &format!("Message number {i}")).await);
        }
        ids
    };
    for (g, subscriber) in subscribers.iter_mut().enumerate() {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while seen.iter().filter(|m: &&Value| ids.iter().any(|id| m["id"] == id.as_str())).count() < ids.len() * 3 {
            assert!(tokio::time::Instant::now() < deadline, "gateway {g}: got {} deliveries", seen.len());
            seen.extend(subscriber.collect(1, Duration::from_secs(1)).await);
        }
        let seqs: Vec<u64> = seen.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "gateway {g}: seq must rise strictly: {seqs:?}");
        let ours = seen.iter().filter(|m| ids.iter().any(|id| m["id"] == id.as_str())).count();
        assert_eq!(ours, 90, "gateway {g}: each of the 30 messages in 3 languages, once");
    }
}

#[tokio::test]
async fn a_gateway_unbinds_a_chat_from_its_queue_when_the_last_subscriber_leaves() {
    let d = Deployment::start("unbind", &[], 1).await;
    let chat = unique_chat();
    let topology = Topology::new(d.prefix.as_str()).unwrap();
    let (_connection, channel) = channel().await;
    let probe = json!({"v": 1, "id": uuid::Uuid::now_v7(), "chatId": chat, "seq": 1, "language": "en",
        "sourceLanguage": "en", "original": true, "text": "probe", "sentAt": "2026-01-01T00:00:00.000Z"})
    .to_string();
    let routed = |confirmation: lapin::Confirmation| confirmation.take_message().is_none();
    assert!(
        !routed(publish(&channel, &topology.deliver_exchange(), &chat, probe.as_bytes()).await),
        "no one watches it yet"
    );

    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &d.gateway().http(), &chat, None).await;
    assert!(
        routed(publish(&channel, &topology.deliver_exchange(), &chat, probe.as_bytes()).await),
        "bound while watched"
    );

    drop(subscriber);
    let deadline = tokio::time::Instant::now() + DELIVERY;
    while routed(publish(&channel, &topology.deliver_exchange(), &chat, probe.as_bytes()).await) {
        assert!(tokio::time::Instant::now() < deadline, "the chat stayed bound to the gateway's queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TLS front for the test broker (socat, as a managed broker's TLS listener): a certificate of its
/// own for 127.0.0.1, signed by nobody the system trusts. Stopped when dropped.
struct TlsFront {
    child: std::process::Child,
    port: u16,
    certificate: std::path::PathBuf,
    _dir: std::path::PathBuf,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl TlsFront {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("parley-tls-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // A CA of the test's own, and the broker's certificate signed by it (a CA certificate itself
        // is refused as a server's).
        let (certificate, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
        let (server, key, request, extensions) =
            (dir.join("broker.pem"), dir.join("broker.key"), dir.join("broker.csr"), dir.join("ext"));
        std::fs::write(
            &extensions,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let openssl = |args: &[&std::ffi::OsStr]| {
            let made = std::process::Command::new("openssl")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl makes the test broker's certificates");
            assert!(made.success(), "openssl {args:?}");
        };
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        openssl(
            &[os("req"), os("-x509"), os("-newkey"), os("rsa:2048"), os("-nodes"), os("-days"), os("1")]
                .into_iter()
                .chain([
                    os("-subj"),
                    os("/CN=Parley test CA"),
                    os("-keyout"),
                    ca_key.as_os_str(),
                    os("-out"),
                    certificate.as_os_str(),
                ])
                .collect::<Vec<_>>(),
        );
        openssl(
            &[os("req"), os("-newkey"), os("rsa:2048"), os("-nodes"), os("-subj"), os("/CN=127.0.0.1")]
                .into_iter()
                .chain([os("-keyout"), key.as_os_str(), os("-out"), request.as_os_str()])
                .collect::<Vec<_>>(),
        );
        openssl(
            &[os("x509"), os("-req"), os("-in"), request.as_os_str(), os("-CA"), certificate.as_os_str()]
                .into_iter()
                .chain([os("-CAkey"), ca_key.as_os_str(), os("-CAcreateserial"), os("-days"), os("1")])
                .chain([os("-extfile"), extensions.as_os_str(), os("-out"), server.as_os_str()])
                .collect::<Vec<_>>(),
        );
        let port = free_port();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            server.display(),
            key.display()
        );
        let child = std::process::Command::new("socat")
            .args([listen.as_str(), "TCP:127.0.0.1:5672"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("socat fronts the broker with TLS");
        Self { child, port, certificate, _dir: dir }
    }

    /// The test broker's URL, over this front with amqps://.
    fn url(&self) -> String {
        let plain = amqp_url();
        let vhost = plain.rsplit_once('/').map(|(_, v)| v).unwrap_or("%2f");
        format!("amqps://guest:guest@127.0.0.1:{}/{vhost}", self.port)
    }
}

#[tokio::test]
async fn an_amqps_broker_is_reached_over_tls_checked_against_the_ca_file_and_refused_without_it() {
    let front = TlsFront::start();
    let (url, prefix) = (front.url(), unique_prefix("amqps"));
    let _cleanup = TopologyCleanup::new(&prefix, &[]);
    let ca = front.certificate.to_str().unwrap().to_owned();
    let broker = broker_args(&prefix, &url, "");
    let server = Server::start(&[&["standalone"], broker.as_slice(), &["--amqp-ca-file", &ca]].concat()).await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("m", &server.http(), &chat, None).await;
    let id = send(&server.http(), &chat, "over TLS").await;
    assert_eq!(subscriber.collect_message(&id, 1, DELIVERY).await.len(), 1, "a message goes through the TLS broker");

    // Without the CA file the certificate is not trusted: the role never connects.
    let mut untrusting =
        Server::spawn(&[&["gateway"], broker_args(&unique_prefix("amqps"), &url, "").as_slice()].concat());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !untrusting.log_text().contains("cannot connect to the broker") {
        assert!(std::time::Instant::now() < deadline, "no failed connect: {}", untrusting.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!untrusting.log_text().contains("connected to the broker"), "{}", untrusting.log_text());
    untrusting.kill();
}
