//! The `chat-server` binary: parse configuration, set up logging and signals, run one role.

#![forbid(unsafe_code)]

use chat_server::config::{Cli, Role, Settings};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS crypto provider for every client that asks rustls for the process default (the OTLP
    // exporter's); an error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let settings = Settings::resolve(cli.options, cli.config.as_ref())?;
    let service = match &cli.role {
        Role::Gateway => "parley-gateway",
        Role::Translator { .. } => "parley-translator",
        Role::Fanout => "parley-fanout",
        Role::Standalone => "parley-standalone",
    };
    // Exports what is still buffered when dropped, after the role has stopped.
    let telemetry = chat_server::telemetry::init(
        settings.log_format,
        settings.otlp_endpoint.as_deref(),
        settings.trace_sample_ratio,
        service,
    )?;
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone(), settings.shutdown_timeout));
    let result = chat_server::roles::run(cli.role, settings, cancel).await;
    // Stopped in time: the deadline no longer applies to the spans' export that follows.
    STOPPED.store(true, std::sync::atomic::Ordering::Release);
    drop(telemetry);
    result
}

/// Set once the role has stopped, so that the shutdown deadline does not cut its last words short.
static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// SIGTERM or Ctrl-C starts a graceful shutdown; one that takes longer than `deadline` (a publish
/// waiting for a broker that went quiet, say) ends in an exit with status 1 all the same.
async fn stop_on_signal(cancel: CancellationToken, deadline: std::time::Duration) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!(deadline = ?deadline, "shutting down");
    cancel.cancel();
    // A thread of its own: it must fire even when the runtime's threads are the ones stuck.
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        if STOPPED.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        tracing::error!(
            deadline = ?deadline,
            "shutdown did not finish in time; exiting now: the messages in hand are abandoned unacknowledged, \
             and the broker delivers them again to another consumer"
        );
        std::process::exit(1);
    });
}
