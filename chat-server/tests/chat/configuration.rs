//! How a chat-server process takes its settings: flags over `PARLEY_*` environment variables over
//! the `--config` file; and the log formats.

use serde_json::{json, Value};

use crate::support::*;

/// Whether a `text` of `bytes` bytes is accepted by `server`.
async fn accepts(server: &Server, bytes: usize) -> bool {
    let response = graphql(&server.http(), SEND, json!({"chatId": "c", "text": "x".repeat(bytes)})).await;
    if response["data"]["sendMessage"]["id"].is_string() {
        return true;
    }
    assert!(response.to_string().contains("more than the limit"), "{response}");
    false
}

#[tokio::test]
async fn flags_override_the_environment_which_overrides_the_config_file() {
    let file = std::env::temp_dir().join(format!("parley-config-{}.toml", uuid::Uuid::now_v7().simple()));
    std::fs::write(&file, "languages = \"\"\nmax-text-bytes = 100\n").unwrap();
    let config = file.to_str().unwrap();

    let from_file = Server::start(&["standalone", "--config", config]).await;
    assert!(accepts(&from_file, 90).await && !accepts(&from_file, 120).await, "the file's limit");

    let environment = [("PARLEY_MAX_TEXT_BYTES", "50")];
    let from_env = Server::spawn_with_env(&["standalone", "--config", config], &environment).ready().await;
    assert!(accepts(&from_env, 40).await && !accepts(&from_env, 60).await, "the environment's limit");

    let from_flag = Server::spawn_with_env(&["standalone", "--config", config, "--max-text-bytes", "80"], &environment)
        .ready()
        .await;
    assert!(accepts(&from_flag, 70).await && !accepts(&from_flag, 90).await, "the flag's limit");
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn an_unknown_key_in_the_config_file_is_an_error_that_names_it() {
    let file = std::env::temp_dir().join(format!("parley-config-{}.toml", uuid::Uuid::now_v7().simple()));
    std::fs::write(&file, "languages = \"\"\nmax-text-byte = 100\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"))
        .args(["standalone", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("max-text-byte"), "{said}");
}

#[tokio::test]
async fn json_logs_are_one_json_object_a_line() {
    let server = Server::start(&["standalone", "--languages", "", "--log-format", "json"]).await;
    send(&server.http(), "c", "hello").await;
    let log = server.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["timestamp"].is_string() && entry["fields"].is_object(), "{line}");
    }
}

#[tokio::test]
async fn the_roles_take_broker_languages_and_history_from_the_environment_and_translators_share_a_language() {
    // As in the README: the broker, the languages and the history from PARLEY_* variables; here the
    // translators' settings too, and two translators of one language at once (competing consumers).
    let apertium = Apertium::start().await;
    let database = TestDatabase::create().await;
    let prefix = unique_prefix("environment");
    let _cleanup = TopologyCleanup::new(&prefix, &["es"]);
    let url = amqp_url();
    let common = [
        ("PARLEY_AMQP_URL", url.as_str()),
        ("PARLEY_TOPOLOGY_PREFIX", prefix.as_str()),
        ("PARLEY_LANGUAGES", "es"),
        ("PARLEY_HISTORY_URL", database.url.as_str()),
    ];
    let translating =
        [("PARLEY_LANGUAGE", "es"), ("PARLEY_TRANSLATOR", "apertium"), ("PARLEY_TRANSLATOR_URL", &apertium.url)];
    let translator_env = [&common[..], &translating[..]].concat();
    let fanout = Server::spawn_with_env(&["fanout"], &common).ready().await;
    let gateway = Server::spawn_with_env(&["gateway"], &common).ready().await;
    let translators = [
        Server::spawn_with_env(&["translator"], &translator_env).ready().await,
        Server::spawn_with_env(&["translator"], &translator_env).ready().await,
    ];

    let languages = graphql(&gateway.http(), "{ languages }", json!({})).await;
    assert_eq!(languages, json!({"data": {"languages": ["es"]}}), "PARLEY_LANGUAGES");
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &gateway.http(), &chat, None).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(send(&gateway.http(), &chat, &format!("Good morning number {i}")).await);
    }
    let sentinel = ids.last().unwrap().clone();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + DELIVERY;
    let translated = |got: &[Value]| {
        got.iter()
            .filter(|m| m["language"] == "es" && ids.contains(&m["id"].as_str().unwrap_or_default().to_owned()))
            .count()
    };
    while translated(&got) < ids.len() {
        assert!(tokio::time::Instant::now() < deadline, "translations missing: {got:?}");
        got.extend(subscriber.collect(1, std::time::Duration::from_secs(1)).await);
    }
    for id in &ids {
        let of = |language: &str| got.iter().filter(|m| m["id"] == id.as_str() && m["language"] == language).count();
        assert_eq!((of("en"), of("es")), (1, 1), "{id}: once in each language, whichever translator took it");
    }
    let es = got.iter().find(|m| m["id"] == sentinel.as_str() && m["language"] == "es").unwrap();
    assert!(es["text"].as_str().unwrap().contains("Buenos días"), "{es}");
    let stored =
        graphql(&gateway.http(), "query($c: ID!) { messages(chatId: $c, last: 100) { id } }", json!({"c": chat})).await;
    let stored = stored["data"]["messages"].as_array().unwrap();
    let ours = stored.iter().filter(|m| ids.contains(&m["id"].as_str().unwrap().to_owned())).count();
    assert_eq!(ours, 40, "each original and translation in the history: {stored:?}");
    drop((translators, gateway, fanout));
}
