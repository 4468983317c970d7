//! Tests that restart the shared RabbitMQ. They are ignored by a plain `cargo test`, because they would
//! break every other test running at the time; `scripts/test` runs them afterwards, one at a time.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// Restarts the broker's application (`rabbitmqctl stop_app`, then `start_app`) and waits for it.
pub fn restart_broker() {
    for action in ["stop_app", "start_app", "await_startup"] {
        let status = std::process::Command::new("rabbitmqctl")
            .args(["-q", action])
            .status()
            .unwrap_or_else(|e| panic!("rabbitmqctl is needed to restart the broker: {e}"));
        assert!(status.success(), "rabbitmqctl {action} failed");
    }
}

const LAST_100: &str = "query($chatId: ID!) { messages(chatId: $chatId, last: 100) { id seq language text } }";

#[tokio::test]
#[ignore = "restarts the shared broker: scripts/test runs it alone"]
async fn the_history_is_the_same_after_every_process_and_the_broker_restart() {
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
