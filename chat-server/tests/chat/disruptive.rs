//! Tests that restart the shared RabbitMQ and PostgreSQL. They are ignored by a plain `cargo test`,
//! because they would break every other test running at the time; `scripts/test` runs them
//! afterwards, one at a time.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// Runs `command` in a shell, as root where the test itself is not (through sudo).
pub fn as_root(command: &str) {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    // The whole line as root, not its first command alone.
    let line = if root { command.to_owned() } else { format!("sudo sh -c '{command}'") };
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

/// Starts the broker's application again when dropped, should a test stop half way.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for action in ["start_app", "await_startup"] {
                let _ = std::process::Command::new("sh").args(["-c", &format!("rabbitmqctl -q {action}")]).status();
            }
        }
    }
}

/// `/readyz` of `server`, as a status code (0 when it does not answer).
async fn readiness(server: &Server) -> u16 {
    let url = format!("http://127.0.0.1:{}/readyz", server.port);
    match reqwest::Client::new().get(url).timeout(Duration::from_secs(5)).send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits until `/readyz` of each of `servers` answers `status`, failing the test after `within`.
pub async fn until_ready_is(servers: &[&Server], status: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    for server in servers {
        loop {
            let now = readiness(server).await;
            if now == status {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz of {} stayed {now}, not {status}",
                server.log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
#[ignore = "restarts the shared broker: scripts/test runs it alone"]
async fn readiness_follows_the_broker_connection_and_the_chat_works_again_after_it_returns() {
    let d = Deployment::with("readiness", Layout { languages: &["es"], ..Layout::default() }).await;
    let roles = [d.gateway(), &d.fanouts[0], &d.translators[0]];
    until_ready_is(&roles, 200, DELIVERY).await;

    as_root("rabbitmqctl -q stop_app");
    // Whatever happens below, the broker comes back for the tests after this one.
    let _restart = StartAppOnDrop;
    until_ready_is(&roles, 503, Duration::from_secs(30)).await;
    // Still alive: liveness is not readiness.
    let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", d.gateway().port)).await.unwrap();
    assert_eq!(health.status(), 200);

    for action in ["start_app", "await_startup"] {
        as_root(&format!("rabbitmqctl -q {action}"));
    }
    until_ready_is(&roles, 200, Duration::from_secs(60)).await;
    // The same processes carry a translated chat again.
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &d.gateway().http(), &chat, None).await;
    let id = send(&d.gateway().http(), &chat, "Good morning, how are you?").await;
    let got = subscriber.collect_message(&id, 2, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 2, "the original and its translation: {got:?}");
}
