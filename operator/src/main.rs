//! The `operator` binary: `operator crd` prints the CRD, `operator run` reconciles ChatDeployments.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use parley_operator::{reconcile::Settings, run::RunOptions};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "operator", version, about = "Parley operator: reconciles ChatDeployments into running chats")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ChatDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print the RBAC rules the operator needs, as the Helm chart renders them.
    Rbac,
    /// Run the controller.
    Run {
        /// Namespaces to watch (comma-separated); all namespaces when empty.
        #[arg(long, env = "PARLEY_WATCH_NAMESPACES", default_value = "", value_delimiter = ',')]
        namespaces: Vec<String>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "PARLEY_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
        /// chat-server image for ChatDeployments that name none.
        #[arg(long, env = "PARLEY_CHAT_SERVER_IMAGE")]
        chat_server_image: String,
        /// Namespace of the leader-election Lease (the operator's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Name of the leader-election Lease.
        #[arg(long, env = "PARLEY_LEASE_NAME", default_value = "parley-operator")]
        lease_name: String,
        /// This replica's identity in the Lease (default: the hostname and a random suffix).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds between backlog polls of languages with builtin autoscaling.
        #[arg(long, env = "PARLEY_AUTOSCALE_INTERVAL_SECS", default_value_t = 10)]
        autoscale_interval_secs: u64,
        /// Watch Secrets (by metadata) so that a changed credential rolls its pods at once; this needs
        /// list and watch on Secrets. Without it a change is seen at the next resync (60 s, give or take a tenth).
        #[arg(long, env = "PARLEY_WATCH_SECRETS", default_value_t = false, action = clap::ArgAction::Set)]
        watch_secrets: bool,
        /// Log as JSON lines.
        #[arg(long, env = "PARLEY_LOG_JSON", default_value_t = true, action = clap::ArgAction::Set)]
        json_logs: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS crypto provider for the process, whichever rustls backends the build links.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", parley_operator::crd_yaml());
            Ok(())
        }
        Command::Rbac => {
            print!("{}", parley_operator::rbac::rules_yaml());
            Ok(())
        }
        Command::Run {
            autoscale_interval_secs,
            namespaces,
            listen,
            chat_server_image,
            lease_namespace,
            lease_name,
            identity,
            watch_secrets,
            json_logs,
        } => {
            let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn"));
            // Colours only for a person at a terminal: a pod's log gets plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
            let logs = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
            if json_logs {
                logs.json().init();
            } else {
                logs.init();
            }
            let stop = CancellationToken::new();
            tokio::spawn({
                let stop = stop.clone();
                async move {
                    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                    tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
                    tracing::info!("shutting down");
                    stop.cancel();
                }
            });
            let identity = identity.unwrap_or_else(parley_operator::leader::default_identity);
            let namespaces = namespaces.into_iter().filter(|n| !n.is_empty()).collect();
            let options = RunOptions {
                namespaces,
                listen,
                settings: Settings {
                    autoscale_interval: std::time::Duration::from_secs(autoscale_interval_secs.max(1)),
                    watch_secrets,
                    ..Settings::new(chat_server_image)
                },
                lease_namespace,
                lease_name,
                identity,
            };
            parley_operator::run::run(options, stop).await
        }
    }
}
