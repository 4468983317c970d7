//! The CI smoke of chat-bench: 50 subscribers against Parley's standalone server for 2 s, every delivery arrives.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

/// A binary of this workspace, built next to this test's own target directory.
fn workspace_binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let path = deps.parent().unwrap().join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace` (scripts/test does)", path.display());
    path
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fifty_subscribers_for_two_seconds_all_receive_every_message() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = Killed(
        Command::new(workspace_binary("chat-server"))
            .args(["standalone", "--languages", "", "--listen", &format!("127.0.0.1:{port}")])
            .env_remove("PARLEY_AMQP_URL")
            .spawn()
            .unwrap(),
    );
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_ok(&ready).is_err() {
        assert!(Instant::now() < deadline, "chat-server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let json = std::env::temp_dir().join(format!("chat-bench-smoke-{port}.json"));
    let status = Command::new(env!("CARGO_BIN_EXE_chat-bench"))
        .args(["--url", &format!("http://127.0.0.1:{port}/graphql"), "--subscribers", "50", "--chats", "5"])
        .args(["--rate", "10", "--duration", "2", "--drain", "2", "--server-pid", &server.0.id().to_string()])
        .arg("--json")
        .arg(&json)
        .status()
        .unwrap();
    assert!(status.success());
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(results["connected"], 50, "{results}");
    assert_eq!(results["reach"], 1.0, "every subscriber gets every message: {results}");
    assert!(results["deliveries_per_sec"].as_f64().unwrap() > 0.0);
    assert!(results["server_rss_bytes"].as_u64().unwrap() > 0);
    for key in ["latency_ms", "send_ms", "last_subscriber_ms_p99", "client_cpu_seconds"] {
        assert!(results.get(key).is_some(), "missing {key}: {results}");
    }
}

/// A blocking GET good enough for a readiness probe, without pulling in reqwest's blocking client.
fn http_ok(url: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host)?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(response))
    }
}
