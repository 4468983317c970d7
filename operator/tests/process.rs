//! The operator process as a cluster runs it: JSON logs, health while it waits for leadership, and
//! a clean exit on SIGTERM. The API server here is one that never answers, which is enough: the
//! process must still serve its health and say, in JSON, that it cannot read its Lease.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// A kubeconfig naming an API server on a port nothing listens on.
fn unreachable_kubeconfig() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("parley-kubeconfig-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    write!(
        file,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster: {{server: 'http://127.0.0.1:1'}}\n\
         contexts:\n- name: none\n  context: {{cluster: none, user: none}}\ncurrent-context: none\n\
         users:\n- name: none\n  user: {{token: none}}\n"
    )
    .unwrap();
    path
}

/// The operator process, killed when the test ends however it ends.
struct Killed(std::process::Child);

impl std::ops::Deref for Killed {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_operator_logs_json_serves_health_and_metrics_while_it_waits_and_stops_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::env::temp_dir().join(format!("parley-operator-{}.log", std::process::id()));
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_operator"))
            .args(["run", "--chat-server-image", "img", "--listen", &format!("127.0.0.1:{port}"), "--identity", "test"])
            .env("KUBECONFIG", unreachable_kubeconfig())
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("cannot read the leader lease") {
            break;
        }
        assert!(Instant::now() < deadline, "the operator never tried its Lease: {text}");
        assert!(child.try_wait().unwrap().is_none(), "the operator exited: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let get = |path: &str| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
        answer
    };
    let health = |path: &str| get(path).lines().next().unwrap_or_default().to_owned();
    assert!(health("/healthz").contains("200"), "{}", health("/healthz"));
    assert!(health("/readyz").contains("200"), "a standby is ready: {}", health("/readyz"));
    let metrics = get("/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("application/openmetrics-text"), "{metrics}");
    // OpenMetrics names a counter's family without its `_total` suffix.
    for family in [
        "parley_operator_reconciles counter",
        "parley_operator_reconcile_errors counter",
        "parley_operator_reconcile_duration_seconds histogram",
        "parley_operator_translator_backlog gauge",
        "parley_operator_translator_desired_replicas gauge",
    ] {
        assert!(metrics.contains(&format!("# TYPE {family}\n")), "{family} on /metrics: {metrics}");
    }

    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the operator did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["fields"].is_object(), "{line}");
    }
}
