//! Tests that restart the shared RabbitMQ and PostgreSQL. They are ignored by a plain `cargo test`,
//! because they would break every other test running at the time; `scripts/test` runs them
//! afterwards, one at a time.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// Runs `command` in a shell, as root where the test itself is not (through sudo).
fn as_root(command: &str) {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let line = if root { command.to_owned() } else { format!("sudo {command}") };
    let status = std::process::Command::new("sh").args(["-c", &line]).status().unwrap();
    assert!(status.success(), "`{line}` failed");
}

/// Restarts the broker's application (`rabbitmqctl stop_app`, then `start_app`) and waits for it.
pub fn restart_broker() {
    for action in ["stop_app", "start_app", "await_startup"] {
        as_root(&format!("rabbitmqctl -q {action}"));
    }
}

/// Restarts the PostgreSQL server: `PARLEY_TEST_POSTGRES_RESTART` when set, else the newest Debian
/// cluster's `pg_ctlcluster … restart`.
fn restart_postgres() {
    let command = std::env::var("PARLEY_TEST_POSTGRES_RESTART").unwrap_or_else(|_| {
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n 1) main restart".into()
    });
    as_root(&command);
}

const LAST_100: &str = "query($chatId: ID!) { messages(chatId: $chatId, last: 100) { id seq language text } }";

#[tokio::test]
#[ignore = "restarts the shared broker and database: scripts/test runs it alone"]
async fn the_history_is_the_same_after_every_process_the_broker_and_the_database_restart() {
    let mut d = Deployment::with("restart", Layout { languages: &["es"], history: true, ..Layout::default() }).await;
    let chat = unique_chat();
    for i in 0..20 {
        send(&d.gateway().http(), &chat, &format!("Message {i} before the restart")).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        let response = graphql(&d.gateway().http(), LAST_100, json!({"chatId": chat})).await;
        if response["data"]["messages"].as_array().is_some_and(|m| m.len() == 40) {
            break response["data"]["messages"].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{response}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    for process in d.gateways.iter_mut().chain(&mut d.fanouts).chain(&mut d.translators) {
        assert!(process.terminate().success());
    }
    restart_broker();
    restart_postgres();
    let gateway = d.start_role("gateway").await;
    let _fanout = d.start_role("fanout").await;

    let after = graphql(&gateway.http(), LAST_100, json!({"chatId": chat})).await;
    assert_eq!(after["data"]["messages"], before, "the same history after the restart");
    // And numbering goes on where it was.
    let id = send(&gateway.http(), &chat, "after the restart").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = graphql(&gateway.http(), LAST_100, json!({"chatId": chat})).await;
        if let Some(newest) = response["data"]["messages"].as_array().and_then(|m| m.last().cloned()) {
            if newest["id"] == id {
                assert_eq!(newest["seq"], 41, "{response}");
                return;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{response}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
