//! What sign-in costs: token verification alone (HS256, and RS256 with an OpenID issuer's keys
//! cached), and side by side with sign-in off, a query over HTTP and a WebSocket connection up to
//! its `connection_ack`, on one `chat-server standalone` each. Needs the test OpenID provider
//! (`(cd tests/oidc && npm ci)`). Run: `cargo bench -p chat-server --bench auth`; method and results
//! in BENCHMARKS.md.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use chat_server::auth::Verifier;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

const VERIFICATIONS: usize = 20_000;
const REQUESTS: usize = 2_000;
const CONNECTIONS: usize = 500;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

fn report(what: &str, samples: Vec<Duration>) -> (f64, f64) {
    let (p50, p99) = percentiles(samples);
    println!("{what:<58} p50 {p50:>9.1} µs   p99 {p99:>9.1} µs");
    (p50, p99)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_server(args: &[&str]) -> (Killed, u16) {
    let port = free_port();
    let child = Killed(
        Command::new(env!("CARGO_BIN_EXE_chat-server"))
            .args(["standalone", "--languages", "", "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ready = format!("http://127.0.0.1:{port}/readyz");
    for _ in 0..300 {
        if reqwest::get(&ready).await.is_ok_and(|r| r.status().is_success()) {
            return (child, port);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chat-server {args:?} never became ready");
}

async fn queries(port: u16, token: Option<&str>) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/graphql");
    let mut samples = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS + 100 {
        let mut request = client.post(&url).json(&json!({"query": "{ languages }"}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let started = Instant::now();
        let response = request.send().await.unwrap();
        assert!(response.status().is_success());
        response.bytes().await.unwrap();
        if i >= 100 {
            samples.push(started.elapsed());
        }
    }
    samples
}

async fn connections(port: u16, token: Option<&str>) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(CONNECTIONS);
    let payload = token.map(|t| json!({"authorization": format!("Bearer {t}")})).unwrap_or(json!({}));
    for i in 0..CONNECTIONS + 20 {
        let mut request = format!("ws://127.0.0.1:{port}/graphql").into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
        let started = Instant::now();
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let init = json!({"type": "connection_init", "payload": payload}).to_string();
        ws.send(Message::Text(init.into())).await.unwrap();
        let ack = ws.next().await.unwrap().unwrap();
        assert!(ack.to_text().unwrap().contains("connection_ack"), "{ack:?}");
        if i >= 20 {
            samples.push(started.elapsed());
        }
        let _ = ws.close(None).await;
    }
    samples
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc");
    let mut provider = Command::new("node")
        .arg(dir.join("provider.mjs"))
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node runs tests/oidc/provider.mjs (npm ci there first)");
    let mut line = String::new();
    BufReader::new(provider.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _provider = Killed(provider);
    let issuer =
        serde_json::from_str::<Value>(&line).expect("the provider's first line")["issuer"].as_str().unwrap().to_owned();
    let token: Value = reqwest::Client::new()
        .post(format!("{issuer}/token"))
        .form(&[("grant_type", "client_credentials"), ("client_id", "alice"), ("client_secret", "alice-secret")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();

    println!("Token verification, in process ({VERIFICATIONS} calls each):");
    let secret = b"a shared secret of at least thirty-two bytes";
    let hs = Verifier::hs256(secret, None, None, Duration::from_secs(30));
    let claims = json!({"sub": "u", "exp": 4_000_000_000u64, "groups": ["chat-users"]});
    let hs_token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap();
    let mut samples = Vec::with_capacity(VERIFICATIONS);
    for _ in 0..VERIFICATIONS {
        let started = Instant::now();
        hs.verify(&hs_token).await.unwrap();
        samples.push(started.elapsed());
    }
    report("HS256", samples);
    let oidc = Verifier::issuer(&issuer, "parley", Duration::from_secs(30)).unwrap();
    oidc.verify(&token).await.unwrap(); // fetches and caches the keys
    let mut samples = Vec::with_capacity(VERIFICATIONS);
    for _ in 0..VERIFICATIONS {
        let started = Instant::now();
        oidc.verify(&token).await.unwrap();
        samples.push(started.elapsed());
    }
    report("RS256, issuer keys cached", samples);

    let (_open, open) = start_server(&["--auth", "none"]).await;
    let oidc_args = ["--auth", "oidc", "--auth-issuer", &issuer, "--auth-audience", "parley"];
    let (_signed, signed) = start_server(&oidc_args).await;
    println!("\nSide by side, sequential, one client ({REQUESTS} queries, {CONNECTIONS} connections each):");
    let (_, none_q) = report("HTTP query { languages }, --auth none", queries(open, None).await);
    let (_, oidc_q) = report("HTTP query { languages }, --auth oidc", queries(signed, Some(&token)).await);
    let (_, none_c) = report("WebSocket connect to connection_ack, --auth none", connections(open, None).await);
    let (_, oidc_c) =
        report("WebSocket connect to connection_ack, --auth oidc", connections(signed, Some(&token)).await);
    println!("\np99 added by sign-in: per request {:.1} µs, per connection {:.1} µs", oidc_q - none_q, oidc_c - none_c);
}
