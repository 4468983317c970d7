//! Test harness: real chat-server processes, a real Apertium APY, real RabbitMQ, and WebSocket clients for every wire mode.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};

pub const STARTUP: Duration = Duration::from_secs(30);
pub const DELIVERY: Duration = Duration::from_secs(20);

/// A throwaway PostgreSQL database for one test, dropped when it goes.
pub struct TestDatabase {
    pub url: String,
    name: String,
    admin: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        use sqlx::Connection as _;
        let admin = std::env::var("PARLEY_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
        let name = format!("parley_test_{}", uuid::Uuid::now_v7().simple());
        let mut connection = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL must answer at {admin} (scripts/test starts it): {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut connection).await.unwrap();
        let (server, _) = admin.rsplit_once('/').expect("a database URL");
        Self { url: format!("{server}/{name}"), name, admin }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block on its own futures.
        let _ = std::thread::spawn(move || {
            use sqlx::Connection as _;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(mut connection) = sqlx::PgConnection::connect(&admin).await {
                    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(&drop).execute(&mut connection).await;
                }
            })
        })
        .join();
    }
}

pub fn amqp_url() -> String {
    std::env::var("PARLEY_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A topology prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    format!("parley.test.{test}.{}", uuid::Uuid::now_v7().simple())
}

pub fn unique_chat() -> String {
    format!("chat-{}", uuid::Uuid::now_v7().simple())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn log_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("parley-test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn log_file(name: &str) -> (std::fs::File, PathBuf) {
    let path = log_dir().join(format!("{name}-{}.log", uuid::Uuid::now_v7().simple()));
    (std::fs::File::create(&path).unwrap(), path)
}

async fn wait_http_ok(url: &str, child: &mut Child, what: &str, log: &PathBuf) {
    let deadline = Instant::now() + STARTUP;
    let client = reqwest::Client::new();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status} before it was ready; log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Ok(response) = client.get(url).send().await {
            if response.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what} not ready at {url} within {STARTUP:?}; log: {}", log.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
}

/// A real Apertium APY on a free port, killed on drop.
pub struct Apertium {
    child: Child,
    pub url: String,
}

impl Apertium {
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> Self {
        let modes = std::env::var("PARLEY_APERTIUM_MODES").unwrap_or_else(|_| "/usr/share/apertium/modes".into());
        let (log, path) = log_file("apertium");
        let mut child = Command::new("apertium-apy")
            .args(["-p", &port.to_string(), &modes])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("apertium-apy is not installed: run scripts/test, which installs apertium-apy, apertium-eng-spa and apertium-eng-cat");
        let url = format!("http://127.0.0.1:{port}");
        wait_http_ok(&format!("{url}/listPairs"), &mut child, "apertium-apy", &path).await;
        Self { child, url }
    }
}

impl Drop for Apertium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One chat-server process (any role), listening on a free port; killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts `chat-server <args> --listen 127.0.0.1:<free port>` and waits for `/readyz`.
    pub async fn start(args: &[&str]) -> Self {
        let server = Self::spawn(args);
        server.ready().await
    }

    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with_env(args, &[])
    }

    /// Like [`Server::spawn`], with `env` set for the process. Nothing else of the caller's `PARLEY_*`
    /// environment reaches it: a test's server is configured by the test alone. Gateways run without
    /// sign-in (`PARLEY_AUTH=none`) unless the test says otherwise, with `--auth` or in `env`.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let (log, path) = log_file(args.first().copied().unwrap_or("server"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_chat-server"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PARLEY_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info,chat_server=debug")
            .env("PARLEY_AUTH", "none")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, port, log: path }
    }

    pub async fn ready(mut self) -> Self {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let log = self.log.clone();
        wait_http_ok(&url, &mut self.child, "chat-server", &log).await;
        self
    }

    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}/graphql", self.port)
    }

    pub fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/graphql", self.port)
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child);
        self.child.wait().unwrap()
    }

    /// The exit status, once the process has exited, waiting at most `within`.
    pub async fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    /// The status `/healthz` answers (0 when nothing answers).
    pub async fn health(&self) -> u16 {
        let url = format!("http://127.0.0.1:{}/healthz", self.port);
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        client.get(url).send().await.map_or(0, |r| r.status().as_u16())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Broker arguments for one isolated deployment.
pub fn broker_args<'a>(prefix: &'a str, url: &'a str, languages: &'a str) -> Vec<&'a str> {
    vec!["--amqp-url", url, "--topology-prefix", prefix, "--languages", languages]
}

/// POSTs a GraphQL operation and returns the whole response.
pub async fn graphql(url: &str, query: &str, variables: Value) -> Value {
    graphql_as(url, None, query, variables).await.1
}

/// POSTs a GraphQL operation with `Authorization: Bearer <token>` (when given); returns the HTTP
/// status and the whole response.
pub async fn graphql_as(url: &str, token: Option<&str>, query: &str, variables: Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(url).json(&json!({"query": query, "variables": variables}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The `extensions.code` of the first error in a GraphQL response, or in the error payload of a
/// socket (an array of errors in graphql-transport-ws, `{"errors": [...]}` in a `next`).
pub fn error_code(payload: &Value) -> Option<String> {
    let first = if payload.is_array() { &payload[0] } else { &payload["errors"][0] };
    first["extensions"]["code"].as_str().map(str::to_owned)
}

pub const SEND: &str = "mutation($chatId: ID!, $text: String!) { sendMessage(chatId: $chatId, text: $text) { id } }";
pub const SUBSCRIBE: &str = "subscription($chatId: ID!, $languages: [String!]) { messages(chatId: $chatId, languages: $languages) { id chatId seq language sourceLanguage original text sentAt } }";

/// `messages` from a point in history: a variable, so the subscription joins its shared group.
pub const RESUME: &str = "subscription($chatId: ID!, $after: Int) { messages(chatId: $chatId, after: $after) { id chatId seq language original text } }";

/// Sends `text` to `chat` with `sendMessage` over HTTP and returns the new message id.
pub async fn send(url: &str, chat: &str, text: &str) -> String {
    let response = graphql(url, SEND, json!({"chatId": chat, "text": text})).await;
    response["data"]["sendMessage"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("sendMessage failed: {response}"))
        .to_owned()
}

/// The WebSocket wire modes a client can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    TransportWs,
    LegacyWs,
    Plain,
}

impl Wire {
    fn subprotocol(self) -> Option<&'static str> {
        match self {
            Wire::TransportWs => Some("graphql-transport-ws"),
            Wire::LegacyWs => Some("graphql-ws"),
            Wire::Plain => None,
        }
    }
}

/// What a client received.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A result for operation `id` (`None` on plain frames, which carry no id).
    Next {
        id: Option<String>,
        payload: Value,
    },
    /// An operation-level error for `id`.
    Error {
        id: Option<String>,
        payload: Value,
    },
    Complete {
        id: String,
    },
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    pub wire: Wire,
}

impl WsClient {
    /// Connects and, for the GraphQL protocols, completes the connection_init handshake.
    pub async fn connect(url: &str, wire: Wire) -> Self {
        let mut client = Self::connect_raw(url, wire).await;
        if wire != Wire::Plain {
            client.send_json(json!({"type": "connection_init", "payload": {}})).await;
            let ack = client.next_frame(DELIVERY).await.expect("no connection_ack");
            assert_eq!(ack["type"], "connection_ack", "{ack}");
        }
        client
    }

    /// Connects like [`WsClient::connect`] over a socket with a receive buffer of a few KiB, so
    /// that a client that stops reading soon blocks the server's writes.
    pub async fn connect_with_small_receive_buffer(url: &str, wire: Wire) -> Self {
        let mut request = url.into_client_request().unwrap();
        let protocol = wire.subprotocol().expect("a GraphQL wire");
        request.headers_mut().insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        let host = request.uri().authority().unwrap().as_str().to_owned();
        let stream = socket.connect(host.parse().unwrap()).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await.unwrap();
        let mut client = Self { ws, wire };
        client.send_json(json!({"type": "connection_init", "payload": {}})).await;
        let ack = client.next_frame(DELIVERY).await.expect("no connection_ack");
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        client
    }

    /// Connects without any handshake.
    pub async fn connect_raw(url: &str, wire: Wire) -> Self {
        Self::connect_raw_with_authorization(url, wire, None).await
    }

    /// Connects without any handshake, the upgrade request carrying `authorization` as its
    /// `Authorization` header when given.
    pub async fn connect_raw_with_authorization(url: &str, wire: Wire, authorization: Option<&str>) -> Self {
        let mut request = url.into_client_request().unwrap();
        if let Some(authorization) = authorization {
            request.headers_mut().insert("Authorization", authorization.parse().unwrap());
        }
        let protocol = wire.subprotocol();
        if let Some(protocol) = protocol {
            request.headers_mut().insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
        }
        let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        let negotiated = response.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(negotiated.as_deref(), protocol, "server must echo the subprotocol");
        Self { ws, wire }
    }

    /// Signs in with `token`: in `connection_init` for the GraphQL protocols (waiting for the ack),
    /// in a first `{"authorization": …}` frame for plain frames. Returns what answered instead of an
    /// ack, if anything did (the close of a refused token).
    pub async fn sign_in(&mut self, token: &str) -> Option<Received> {
        let authorization = json!({"authorization": format!("Bearer {token}")});
        if self.wire == Wire::Plain {
            self.send_json(authorization).await;
            return None;
        }
        self.send_json(json!({"type": "connection_init", "payload": authorization})).await;
        match self.next(DELIVERY).await {
            Some(Received::Next { payload, .. }) if payload["type"] == "connection_ack" => None,
            other => Some(other.expect("neither an ack nor a close")),
        }
    }

    /// Sends `text` as a text frame, whatever it holds.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.to_owned().into())).await.unwrap();
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws.send(Message::Text(value.to_string().into())).await.unwrap();
    }

    /// Starts operation `id` (subscription, query or mutation).
    pub async fn start(&mut self, id: &str, query: &str, variables: Value) {
        let payload = json!({"query": query, "variables": variables});
        let frame = match self.wire {
            Wire::TransportWs => json!({"type": "subscribe", "id": id, "payload": payload}),
            Wire::LegacyWs => json!({"type": "start", "id": id, "payload": payload}),
            Wire::Plain => payload,
        };
        self.send_json(frame).await;
    }

    async fn next_frame(&mut self, within: Duration) -> Option<Value> {
        match self.next(within).await? {
            Received::Next { payload, .. } => Some(payload),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next meaningful message, skipping keep-alives, or `None` after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Received> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()?;
            let text = match frame {
                None => return Some(Received::Closed { code: None, reason: "stream ended".into() }),
                Some(Err(err)) => return Some(Received::Closed { code: None, reason: err.to_string() }),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|CloseFrame { code, reason }| (Some(u16::from(code)), reason.to_string()))
                        .unwrap_or((None, String::new()));
                    return Some(Received::Closed { code, reason });
                }
                Some(Ok(Message::Text(text))) => text.to_string(),
                Some(Ok(_)) => continue,
            };
            let value: Value = serde_json::from_str(&text).unwrap();
            if self.wire == Wire::Plain {
                let id = None;
                return Some(if value.get("data").is_some_and(|d| !d.is_null()) {
                    Received::Next { id, payload: value }
                } else {
                    Received::Error { id, payload: value }
                });
            }
            let id = value["id"].as_str().map(str::to_owned);
            match value["type"].as_str().unwrap_or_default() {
                "ka" | "ping" | "pong" => continue,
                "connection_ack" => return Some(Received::Next { id: None, payload: value }),
                "next" | "data" => {
                    let payload = value["payload"].clone();
                    return Some(if payload["errors"].is_array() && payload["data"].is_null() {
                        Received::Error { id, payload }
                    } else {
                        Received::Next { id, payload }
                    });
                }
                "error" => return Some(Received::Error { id, payload: value["payload"].clone() }),
                "complete" => return Some(Received::Complete { id: id.unwrap_or_default() }),
                other => panic!("unexpected message type {other}: {value}"),
            }
        }
    }

    /// The `messages` payloads received for message `id` until `count` arrived or `within` passed.
    pub async fn collect_message(&mut self, id: &str, count: usize, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut found = Vec::new();
        while found.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Received::Next { payload, .. }) => {
                    let message = payload["data"]["messages"].clone();
                    if message["id"] == id {
                        found.push(message);
                    }
                }
                Some(other @ Received::Closed { .. }) => {
                    panic!("socket closed while waiting: {other:?}")
                }
                Some(_) => {}
                None => break,
            }
        }
        found
    }

    /// Every `messages` payload up to and including message `id`'s first delivery: with `id` a message
    /// sent after others, whatever of those others was going to arrive has arrived.
    pub async fn collect_until(&mut self, id: &str) -> Vec<Value> {
        let mut got = Vec::new();
        while !got.iter().any(|m: &Value| m["id"] == id) {
            let next = self.collect(1, DELIVERY).await;
            assert!(!next.is_empty(), "message {id} never arrived; got {got:?}");
            got.extend(next);
        }
        got
    }

    /// The next `count` `messages` payloads of any operation, or fewer when `within` passes first.
    pub async fn collect(&mut self, count: usize, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut found = Vec::new();
        while found.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Received::Next { payload, .. }) if payload["data"]["messages"].is_object() => {
                    found.push(payload["data"]["messages"].clone())
                }
                Some(other @ (Received::Closed { .. } | Received::Error { .. })) => {
                    panic!("expected messages, got {other:?} after {} of them", found.len())
                }
                Some(_) => {}
                None => break,
            }
        }
        found
    }

    /// Subscribes to `messages(chatId, languages)` as operation `op` and returns once the gateway
    /// demonstrably routes this chat to the subscriber (a warm-up message sent over HTTP arrived).
    pub async fn subscribe_messages(&mut self, op: &str, http: &str, chat: &str, languages: Option<&[&str]>) {
        self.start(op, SUBSCRIBE, json!({"chatId": chat, "languages": languages})).await;
        let deadline = Instant::now() + STARTUP;
        loop {
            let warmup = send(http, chat, "warm-up").await;
            if !self.collect_message(&warmup, 1, Duration::from_millis(500)).await.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "subscription to {chat} never became live");
        }
    }
}

/// Checks the three deliveries of "Good morning, how are you?" in English, Spanish and Catalan.
pub fn assert_translated_good_morning(messages: &[Value], id: &str) {
    let by_language = |l: &str| {
        messages
            .iter()
            .find(|m| m["language"] == l)
            .unwrap_or_else(|| panic!("no {l} delivery for {id} in {messages:?}"))
    };
    let en = by_language("en");
    assert_eq!(en["original"], true);
    assert_eq!(en["text"], "Good morning, how are you?");
    let es = by_language("es");
    assert_eq!(es["original"], false);
    assert!(es["text"].as_str().unwrap().contains("Buenos días"), "{es}");
    let ca = by_language("ca");
    assert_eq!(ca["original"], false);
    assert!(ca["text"].as_str().unwrap().contains("Bon dia"), "{ca}");
    for m in messages {
        assert_eq!(m["id"], id);
        assert_eq!(m["sourceLanguage"], "en");
    }
    let seqs: Vec<i64> = messages.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "each delivery has its own seq, rising as received: {messages:?}");
}

/// A whole chat deployment over RabbitMQ as separate processes: gateways, a fanout, one translator per language.
pub struct Deployment {
    pub prefix: String,
    pub apertium: Option<Apertium>,
    pub gateways: Vec<Server>,
    /// The first one started is the active consumer; the others wait.
    pub fanouts: Vec<Server>,
    pub translators: Vec<Server>,
    /// The history database, when the deployment keeps one; dropped with the deployment.
    pub _history: Option<TestDatabase>,
    /// Removes the broker topology once the processes (dropped before it) are gone.
    pub _topology: TopologyCleanup,
    /// The arguments every gateway and fanout got, to start another.
    pub common: Vec<String>,
}

/// What a [`Deployment`] runs.
pub struct Layout<'a> {
    pub languages: &'a [&'a str],
    pub gateways: usize,
    pub fanouts: usize,
    /// A PostgreSQL history in a database of its own.
    pub history: bool,
    /// Arguments every process gets besides the broker's.
    pub extra: &'a [&'a str],
}

impl Default for Layout<'_> {
    fn default() -> Self {
        Self { languages: &[], gateways: 1, fanouts: 1, history: false, extra: &[] }
    }
}

/// Deletes a topology when dropped, so that tests leave no durable queues on the broker (whichever
/// vhost `PARLEY_TEST_AMQP_URL` names).
pub struct TopologyCleanup {
    pub prefix: String,
    pub languages: Vec<String>,
}

impl TopologyCleanup {
    pub fn new(prefix: &str, languages: &[&str]) -> Self {
        Self { prefix: prefix.to_owned(), languages: languages.iter().map(|l| l.to_string()).collect() }
    }
}

impl Drop for TopologyCleanup {
    fn drop(&mut self) {
        let (prefix, languages) = (std::mem::take(&mut self.prefix), std::mem::take(&mut self.languages));
        // Drop runs inside the test's runtime, which cannot block on its own futures.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let Ok(topology) = parley_contract::topology::Topology::new(prefix.as_str()) else { return };
                let properties = lapin::ConnectionProperties::default();
                if let Ok(connection) = lapin::Connection::connect(&amqp_url(), properties).await {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = parley_contract::topology::delete_all(&channel, &topology, &languages).await;
                    }
                }
            })
        })
        .join();
    }
}

impl Deployment {
    pub async fn start(test: &str, languages: &[&str], gateways: usize) -> Self {
        Self::with(test, Layout { languages, gateways, ..Layout::default() }).await
    }

    pub async fn with(test: &str, layout: Layout<'_>) -> Self {
        let prefix = unique_prefix(test);
        let url = amqp_url();
        let list = layout.languages.join(",");
        let apertium = if layout.languages.is_empty() { None } else { Some(Apertium::start().await) };
        let history = if layout.history { Some(TestDatabase::create().await) } else { None };
        let mut common = broker_args(&prefix, &url, &list);
        if let Some(database) = &history {
            common.extend(["--history-url", database.url.as_str()]);
        }
        common.extend(layout.extra);
        let spawned_gateways: Vec<Server> =
            (0..layout.gateways).map(|_| Server::spawn(&[&["gateway"], common.as_slice()].concat())).collect();
        let mut fanouts = Vec::new();
        for _ in 0..layout.fanouts {
            // One at a time, so that the first is the active consumer.
            fanouts.push(Server::spawn(&[&["fanout"], common.as_slice()].concat()).ready().await);
        }
        let mut translators = Vec::new();
        for language in layout.languages {
            let provider = &apertium.as_ref().unwrap().url;
            translators.push(Self::spawn_translator_with(&prefix, language, provider, layout.extra));
        }
        let mut ready_gateways = Vec::new();
        for gateway in spawned_gateways {
            ready_gateways.push(gateway.ready().await);
        }
        let mut ready_translators = Vec::new();
        for translator in translators {
            ready_translators.push(translator.ready().await);
        }
        let common = common.iter().map(|a| a.to_string()).collect();
        let topology = TopologyCleanup::new(&prefix, layout.languages);
        Self {
            prefix,
            apertium,
            gateways: ready_gateways,
            fanouts,
            translators: ready_translators,
            _history: history,
            _topology: topology,
            common,
        }
    }

    /// Starts one more process of `role` ("gateway" or "fanout") like the others.
    pub async fn start_role(&self, role: &str) -> Server {
        let args: Vec<&str> = std::iter::once(role).chain(self.common.iter().map(String::as_str)).collect();
        Server::start(&args).await
    }

    /// A translator process for `language` calling the Apertium APY at `provider_url`.
    pub fn spawn_translator(prefix: &str, language: &str, provider_url: &str) -> Server {
        Self::spawn_translator_with(prefix, language, provider_url, &[])
    }

    /// [`Deployment::spawn_translator`], with `extra` arguments.
    pub fn spawn_translator_with(prefix: &str, language: &str, provider_url: &str, extra: &[&str]) -> Server {
        let url = amqp_url();
        let args: Vec<&str> = [
            "translator",
            "--language",
            language,
            "--amqp-url",
            &url,
            "--topology-prefix",
            prefix,
            "--translator",
            "apertium",
            "--translator-url",
            provider_url,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
        Server::spawn(&args)
    }

    pub fn gateway(&self) -> &Server {
        &self.gateways[0]
    }
}

impl WsClient {
    /// The first result or error of operation `op` (for plain frames, of any operation), skipping others.
    pub async fn result_of(&mut self, op: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Received::Next { id, payload } | Received::Error { id, payload })
                    if id.as_deref().is_none_or(|id| id == op) =>
                {
                    return payload
                }
                Some(closed @ Received::Closed { .. }) => {
                    panic!("socket closed while waiting for {op}: {closed:?}")
                }
                Some(_) => {}
                None => panic!("no result for operation {op} within {within:?}"),
            }
        }
    }
}
