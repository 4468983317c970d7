//! Sign-in against a real OpenID Connect provider (`tests/oidc`, the npm `oidc-provider` package):
//! tokens from its token endpoint, keys through discovery and JWKS, forged tokens refused over HTTP
//! and every WebSocket protocol, groups, expiry, key rotation and the per-user send limit.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::*;

/// The test provider, killed when dropped.
struct Oidc {
    child: Child,
    issuer: String,
}

impl Drop for Oidc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Oidc {
    fn start() -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc");
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "the test OpenID provider is not installed: run (cd tests/oidc && npm ci), as scripts/test does"
        );
        // Under a loaded machine a node process has once hung before listening (CI saw it): each
        // start gets 20 s to say where it listens, and a stuck one is killed and started again.
        for attempt in 1..=3 {
            let mut child = Command::new("node")
                .arg(dir.join("provider.mjs"))
                .env("PORT", "0")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("node runs the test OpenID provider");
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) if !line.is_empty() => {
                    let started: Value =
                        serde_json::from_str(&line).unwrap_or_else(|e| panic!("provider said {line:?}: {e}"));
                    return Self { child, issuer: started["issuer"].as_str().unwrap().to_owned() };
                }
                _ => {
                    eprintln!("the test OpenID provider did not start (attempt {attempt}); starting it again");
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!("the test OpenID provider (node tests/oidc/provider.mjs) did not start in three attempts");
    }

    /// An access token for `client` from the token endpoint (client credentials), for `audience`
    /// (the gateway's, `parley`, when `None`).
    async fn token_for(&self, client: &str, audience: Option<&str>) -> String {
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", client.to_owned()),
            ("client_secret", format!("{client}-secret")),
        ];
        if let Some(audience) = audience {
            form.push(("resource", format!("urn:{audience}")));
        }
        let response: Value = provider_client()
            .post(format!("{}/token", self.issuer))
            .form(&form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        response["access_token"].as_str().unwrap_or_else(|| panic!("no token for {client}: {response}")).to_owned()
    }

    async fn token(&self, client: &str) -> String {
        self.token_for(client, None).await
    }

    /// A token the provider's current key signs, with exactly `claims`.
    async fn signed(&self, claims: Value) -> String {
        let response: Value = provider_client()
            .post(format!("{}/test/sign", self.issuer))
            .json(&claims)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        response["token"].as_str().unwrap().to_owned()
    }

    /// Makes a new key the signing key; with `drop_old`, the old one leaves the JWKS.
    async fn rotate(&self, drop_old: bool) {
        let url = format!("{}/test/rotate{}", self.issuer, if drop_old { "?drop_old=1" } else { "" });
        let response = provider_client().post(url).send().await.unwrap();
        assert!(response.status().is_success());
    }

    async fn public_key_pem(&self) -> String {
        provider_client()
            .get(format!("{}/test/public-key-pem", self.issuer))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Claims that pass every check, for `sub`, to change one at a time.
    fn claims(&self, sub: &str) -> Value {
        let now = now();
        json!({"iss": self.issuer, "aud": "parley", "sub": sub, "iat": now, "exp": now + 600,
               "groups": ["chat-users", "chat-senders"], "name": sub})
    }
}

/// A client for the provider's routes, bounded: a provider that stops answering fails the test
/// instead of holding it up.
fn provider_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A standalone chat signing clients in with `oidc`; readers need `chat-users`, senders
/// `chat-senders`; two messages a second per user, bursts of four.
async fn gateway(oidc: &Oidc, extra: &[&str]) -> Server {
    let languages = if extra.contains(&"--translator") { "es" } else { "" };
    let args: Vec<&str> = [
        &[
            "standalone",
            "--languages",
            languages,
            "--auth",
            "oidc",
            "--auth-issuer",
            &oidc.issuer,
            "--auth-audience",
            "parley",
        ][..],
        &["--read-groups", "chat-users", "--send-groups", "chat-senders", "--send-rate", "2", "--send-burst", "4"],
        extra,
    ]
    .concat();
    Server::start(&args).await
}

const LANGUAGES: &str = "{ languages }";
const SEND_AS: &str = "mutation($chatId: ID!, $text: String!, $sender: String) { sendMessage(chatId: $chatId, text: $text, sender: $sender) { id sender senderId } }";
const SUBSCRIBE_SENDERS: &str =
    "subscription($chatId: ID!) { messages(chatId: $chatId) { id language original text sender senderId } }";

const WIRES: [Wire; 3] = [Wire::TransportWs, Wire::LegacyWs, Wire::Plain];

/// How a socket signing in with `token` ends: the close code, or `None` while it stays open and
/// serves (a plain socket has no ack: its sign-in shows in the answer to a query).
async fn socket_outcome(url: &str, wire: Wire, token: &str) -> Option<u16> {
    let mut client = WsClient::connect_raw(url, wire).await;
    let answered = client.sign_in(token).await;
    let answered = match (answered, wire) {
        (Some(answered), _) => Some(answered),
        (None, Wire::Plain) => {
            client.start("q", LANGUAGES, json!({})).await;
            client.next(DELIVERY).await.filter(|r| !matches!(r, Received::Next { .. }))
        }
        (None, _) => None,
    };
    match answered {
        None => None,
        Some(Received::Closed { code, .. }) => Some(code.expect("a close code")),
        Some(other) => panic!("{wire:?}: expected a close, got {other:?}"),
    }
}

#[tokio::test]
async fn forged_and_unfit_tokens_are_refused_over_http_and_every_socket_protocol_and_others_are_unaffected() {
    let oidc = Oidc::start();
    let server = gateway(&oidc, &[]).await;
    let valid = oidc.token("alice").await;
    // A signed-in subscriber, connected throughout the attempts below.
    let chat = unique_chat();
    let mut bystander = WsClient::connect_raw(&server.ws(), Wire::TransportWs).await;
    assert_eq!(bystander.sign_in(&valid).await, None);
    bystander.start("m", SUBSCRIBE_SENDERS, json!({"chatId": chat})).await;
    let kid = jsonwebtoken::decode_header(&valid).unwrap().kid.unwrap();
    // The valid token's header and claims under the signature of another token.
    let other = oidc.token("bob").await;
    let wrong_signature = format!("{}.{}", valid.rsplit_once('.').unwrap().0, other.rsplit_once('.').unwrap().1);
    let unsigned = {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
        let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", part(json!({"alg": "none", "typ": "JWT", "kid": kid})), part(oidc.claims("mallory")))
    };
    let hs256_with_public_key = encode(
        &Header { kid: Some(kid.clone()), ..Header::new(Algorithm::HS256) },
        &oidc.claims("mallory"),
        &EncodingKey::from_secret(oidc.public_key_pem().await.as_bytes()),
    )
    .unwrap();
    let with = |change: Value| {
        let mut claims = oidc.claims("mallory");
        claims.as_object_mut().unwrap().extend(change.as_object().unwrap().clone());
        claims
    };
    let expired = oidc.signed(with(json!({"exp": now() - 3600, "iat": now() - 7200}))).await;
    let not_yet_valid = oidc.signed(with(json!({"nbf": now() + 3600}))).await;
    let wrong_issuer = oidc.signed(with(json!({"iss": "https://issuer.example"}))).await;
    let wrong_audience = oidc.token_for("alice", Some("wrong-audience")).await;
    let without = |claim: &str| {
        let mut claims = oidc.claims("mallory");
        claims.as_object_mut().unwrap().remove(claim);
        claims
    };
    // A token that names no audience (or issuer) is no token for this gateway either.
    let no_audience = oidc.signed(without("aud")).await;
    let no_issuer = oidc.signed(without("iss")).await;
    let no_groups = oidc.token("nogroups").await;

    let cases: [(&str, &str, u16, u16); 11] = [
        ("wrong signature", &wrong_signature, 401, 4401),
        ("alg none", &unsigned, 401, 4401),
        ("HS256 signed with the RSA public key", &hs256_with_public_key, 401, 4401),
        ("expired", &expired, 401, 4401),
        ("not yet valid", &not_yet_valid, 401, 4401),
        ("wrong issuer", &wrong_issuer, 401, 4401),
        ("wrong audience", &wrong_audience, 401, 4401),
        ("no audience", &no_audience, 401, 4401),
        ("no issuer", &no_issuer, 401, 4401),
        ("no groups", &no_groups, 403, 4403),
        ("garbage", "not.a.token", 401, 4401),
    ];
    for (case, token, status, close) in cases {
        let (got, body) = graphql_as(&server.http(), Some(token), LANGUAGES, json!({})).await;
        assert_eq!(got, status, "{case} over HTTP: {body}");
        let code = if status == 401 { "UNAUTHENTICATED" } else { "FORBIDDEN" };
        assert_eq!(error_code(&body).as_deref(), Some(code), "{case}: {body}");
        for wire in WIRES {
            assert_eq!(socket_outcome(&server.ws(), wire, token).await, Some(close), "{case} over {wire:?}");
        }
    }
    // No token at all.
    let (status, body) = graphql_as(&server.http(), None, LANGUAGES, json!({})).await;
    assert_eq!((status, error_code(&body).as_deref()), (401, Some("UNAUTHENTICATED")), "{body}");
    for wire in WIRES {
        let mut client = WsClient::connect_raw(&server.ws(), wire).await;
        let init = match wire {
            Wire::Plain => json!({"query": LANGUAGES}),
            _ => json!({"type": "connection_init", "payload": {}}),
        };
        client.send_json(init).await;
        let closed = client.next(DELIVERY).await;
        assert!(
            matches!(closed, Some(Received::Closed { code: Some(4401), .. })),
            "{wire:?} without a token: {closed:?}"
        );
    }

    // The process stayed up, and a valid token is served on every transport.
    let (status, body) = graphql_as(&server.http(), Some(&valid), LANGUAGES, json!({})).await;
    assert_eq!(status, 200, "{body}");
    for wire in WIRES {
        assert_eq!(socket_outcome(&server.ws(), wire, &valid).await, None, "a valid token over {wire:?}");
    }
    // The bystander never noticed.
    let (status, sent) =
        graphql_as(&server.http(), Some(&valid), SEND, json!({"chatId": chat, "text": "still here"})).await;
    assert_eq!(status, 200, "{sent}");
    let id = sent["data"]["sendMessage"]["id"].as_str().unwrap();
    assert_eq!(bystander.collect_message(id, 1, DELIVERY).await.len(), 1, "the signed-in subscriber still receives");
    // The upgrade request's header signs a socket in as well.
    let authorization = format!("Bearer {valid}");
    let mut client = WsClient::connect_raw_with_authorization(&server.ws(), Wire::Plain, Some(&authorization)).await;
    client.start("q", LANGUAGES, json!({})).await;
    assert!(matches!(client.next(DELIVERY).await, Some(Received::Next { .. })));
}

#[tokio::test]
async fn the_sender_comes_from_the_token_in_every_delivery_including_translations() {
    let apertium = Apertium::start().await;
    let oidc = Oidc::start();
    let url = apertium.url.clone();
    let server = gateway(&oidc, &["--translator", "apertium", "--translator-url", &url]).await;
    let (alice, bob) = (oidc.token("alice").await, oidc.token("bob").await);
    let chat = unique_chat();

    let mut subscriber = WsClient::connect_raw(&server.ws(), Wire::TransportWs).await;
    assert_eq!(subscriber.sign_in(&alice).await, None);
    subscriber.start("m", SUBSCRIBE_SENDERS, json!({"chatId": chat})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, sent) =
        graphql_as(&server.http(), Some(&bob), SEND_AS, json!({"chatId": chat, "text": "Good morning"})).await;
    assert_eq!(status, 200, "{sent}");
    let message = &sent["data"]["sendMessage"];
    assert_eq!((message["sender"].as_str(), message["senderId"].as_str()), (Some("Bob Example"), Some("bob")));
    let id = message["id"].as_str().unwrap();
    let deliveries = subscriber.collect_message(id, 2, DELIVERY).await;
    assert_eq!(deliveries.len(), 2, "the original and its translation: {deliveries:?}");
    for delivery in &deliveries {
        assert_eq!(delivery["sender"], "Bob Example", "{delivery}");
        assert_eq!(delivery["senderId"], "bob", "{delivery}");
    }
    assert!(deliveries.iter().any(|d| d["language"] == "es" && d["original"] == false), "{deliveries:?}");

    // With sign-in, a sender argument is refused rather than believed.
    let (status, body) = graphql_as(
        &server.http(),
        Some(&bob),
        SEND_AS,
        json!({"chatId": chat, "text": "hi", "sender": "Alice Example"}),
    )
    .await;
    assert_eq!((status, error_code(&body).as_deref()), (200, Some("BAD_USER_INPUT")), "{body}");
}

#[tokio::test]
async fn a_reader_may_subscribe_but_not_send_over_http_or_a_socket() {
    let oidc = Oidc::start();
    let server = gateway(&oidc, &[]).await;
    let reader = oidc.token("reader").await;
    let chat = unique_chat();
    let (status, body) = graphql_as(&server.http(), Some(&reader), SEND, json!({"chatId": chat, "text": "hi"})).await;
    assert_eq!((status, error_code(&body).as_deref()), (403, Some("FORBIDDEN")), "{body}");

    let mut client = WsClient::connect_raw(&server.ws(), Wire::TransportWs).await;
    assert_eq!(client.sign_in(&reader).await, None, "a reader may connect");
    client.start("send", SEND, json!({"chatId": chat, "text": "hi"})).await;
    match client.next(DELIVERY).await {
        Some(Received::Error { payload, .. }) => assert_eq!(error_code(&payload).as_deref(), Some("FORBIDDEN")),
        Some(Received::Next { payload, .. }) => {
            assert_eq!(error_code(&payload).as_deref(), Some("FORBIDDEN"), "{payload}")
        }
        other => panic!("expected FORBIDDEN, got {other:?}"),
    }
    // The socket is still open for reading.
    client.start("q", LANGUAGES, json!({})).await;
    assert!(matches!(client.next(DELIVERY).await, Some(Received::Next { .. } | Received::Complete { .. })));
}

#[tokio::test]
async fn a_socket_closes_with_4401_when_its_token_expires() {
    let oidc = Oidc::start();
    let server = gateway(&oidc, &["--auth-clock-skew-secs", "0"]).await;
    let token = oidc.token("shortlived").await;
    let mut client = WsClient::connect_raw(&server.ws(), Wire::TransportWs).await;
    assert_eq!(client.sign_in(&token).await, None);
    client.start("m", SUBSCRIBE_SENDERS, json!({"chatId": unique_chat()})).await;
    match client.next(Duration::from_secs(15)).await {
        Some(Received::Closed { code: Some(4401), reason }) => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("expected a close with 4401, got {other:?}"),
    }
}

#[tokio::test]
async fn a_key_rotation_at_the_provider_needs_no_restart() {
    let oidc = Oidc::start();
    let server = gateway(&oidc, &[]).await;
    let before = oidc.token("alice").await;
    assert_eq!(graphql_as(&server.http(), Some(&before), LANGUAGES, json!({})).await.0, 200);

    oidc.rotate(true).await;
    let after = oidc.token("alice").await;
    assert_ne!(jsonwebtoken::decode_header(&before).unwrap().kid, jsonwebtoken::decode_header(&after).unwrap().kid);
    let (status, body) = graphql_as(&server.http(), Some(&after), LANGUAGES, json!({})).await;
    assert_eq!(status, 200, "a token of the new key verifies once the gateway fetched it: {body}");
    // The keys fetched for it no longer hold the retired one.
    let (status, body) = graphql_as(&server.http(), Some(&before), LANGUAGES, json!({})).await;
    assert_eq!(status, 401, "a token of the retired key: {body}");
    assert_eq!(socket_outcome(&server.ws(), Wire::TransportWs, &after).await, None);
}

#[tokio::test]
async fn a_user_flooding_at_ten_times_the_rate_is_limited_while_another_users_messages_all_arrive() {
    let oidc = Oidc::start();
    let server = gateway(&oidc, &[]).await;
    let (alice, bob) = (oidc.token("alice").await, oidc.token("bob").await);
    let chat = unique_chat();
    let mut subscriber = WsClient::connect_raw(&server.ws(), Wire::TransportWs).await;
    assert_eq!(subscriber.sign_in(&bob).await, None);
    subscriber.start("m", SUBSCRIBE_SENDERS, json!({"chatId": chat})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let http = server.http();
    // Alice: 40 messages in about two seconds, ten times the 2 a second allowed; Bob: 4, within his burst.
    let flood = async {
        let mut statuses = Vec::new();
        for i in 0..40 {
            let text = format!("flood {i}");
            let (status, body) = graphql_as(&http, Some(&alice), SEND, json!({"chatId": chat, "text": text})).await;
            if status == 429 {
                assert_eq!(error_code(&body).as_deref(), Some("RATE_LIMITED"), "{body}");
            }
            statuses.push(status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        statuses
    };
    let steady = async {
        let mut ids = Vec::new();
        for i in 0..4 {
            let (status, body) =
                graphql_as(&server.http(), Some(&bob), SEND, json!({"chatId": chat, "text": format!("bob {i}")})).await;
            assert_eq!(status, 200, "Bob is never limited by Alice's flood: {body}");
            ids.push(body["data"]["sendMessage"]["id"].as_str().unwrap().to_owned());
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        ids
    };
    let (statuses, ids) = tokio::join!(flood, steady);
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(accepted + limited, 40, "{statuses:?}");
    assert!(limited >= 25, "most of the flood is refused: {accepted} accepted, {limited} limited");
    assert!(accepted >= 4, "the burst passes: {statuses:?}");
    let received = subscriber.collect(accepted + ids.len(), DELIVERY).await;
    for id in &ids {
        assert!(received.iter().any(|m| m["id"] == id.as_str() && m["senderId"] == "bob"), "Bob's {id} arrived");
    }
    assert_eq!(received.len(), accepted + ids.len(), "exactly the accepted messages arrive");
}

#[tokio::test]
async fn hs256_tokens_sign_in_with_the_shared_secret_and_the_gateway_needs_an_auth_mode() {
    let secret = "a shared secret of at least thirty-two bytes";
    let server = Server::start(&["standalone", "--languages", "", "--auth", "jwt", "--jwt-secret", secret]).await;
    let claims = json!({"sub": "u-1", "name": "Una", "exp": now() + 600});
    let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap();
    let chat = unique_chat();
    let (status, body) = graphql_as(&server.http(), Some(&token), SEND_AS, json!({"chatId": chat, "text": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["sendMessage"]["senderId"], "u-1");
    let forged =
        encode(&Header::default(), &claims, &EncodingKey::from_secret(b"another secret, thirty-two bytes or more"))
            .unwrap();
    assert_eq!(graphql_as(&server.http(), Some(&forged), LANGUAGES, json!({})).await.0, 401);

    // A gateway with no --auth at all refuses to start, naming the setting.
    let mut gateway = Server::spawn_with_env(&["gateway", "--amqp-url", &amqp_url()], &[("PARLEY_AUTH", "")]);
    let status = gateway.exited_within(STARTUP).await.expect("a gateway without --auth exits");
    assert!(!status.success());
    assert!(gateway.log_text().contains("--auth"), "{}", gateway.log_text());
}
