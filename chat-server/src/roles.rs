//! Starting each role: connect the bus, wire the pieces, run until SIGTERM, then drain.

use std::{
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio_util::{
    sync::CancellationToken,
    task::{AbortOnDropHandle, TaskTracker},
};

use crate::{
    bus::{
        amqp::{AmqpBus, Recovery},
        memory::MemoryBus,
        reconnecting::{Connect, ReconnectingBus},
        Bus,
    },
    config::{Role, Settings},
    fanout::{Fanout, Retention},
    gateway,
    history::{self, History},
    translator::{cache::TranslationCache, provider, RetryPolicy, Translator},
};

/// One role of a standalone process, to run on the workers' runtime.
type RoleFuture = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// The history a gateway reads: only a shared store makes sense, the fanout being another process.
async fn gateway_history(settings: &Settings) -> anyhow::Result<Option<Arc<dyn History>>> {
    match settings.history_url.as_deref() {
        None => {
            tracing::info!("no --history-url: history queries answer HISTORY_DISABLED");
            Ok(None)
        }
        Some("memory:") => anyhow::bail!(
            "a gateway cannot read the fanout's in-memory history: give it the fanout's postgres:// --history-url"
        ),
        Some(url) => Ok(Some(history::connect(url, false).await?)),
    }
}

pub async fn run(role: Role, settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    match role {
        Role::Gateway => {
            let auth = Arc::new(settings.auth.build(None)?);
            let history = gateway_history(&settings).await?;
            let dispatcher = gateway::Dispatcher::start().context("failed to start the dispatch thread")?;
            // Each connection on the dispatch thread: lapin spawns a connection's tasks on the runtime it
            // was connected from, and the delivery path runs there.
            let connect_one: Connect = {
                let (settings, cancel, handle) = (settings.clone(), cancel.clone(), dispatcher.handle().clone());
                Arc::new(move || {
                    let (settings, cancel, handle) = (settings.clone(), cancel.clone(), handle.clone());
                    // An attempt given up on (timed out) ends its task, and the connection it holds.
                    Box::pin(async move {
                        AbortOnDropHandle::new(handle.spawn(async move {
                            connect(&settings, &settings.languages, "gateway", Recovery::StartOver, &cancel).await
                        }))
                        .await?
                    })
                })
            };
            let bus: Arc<dyn Bus> = Arc::new(ReconnectingBus::connect(connect_one, cancel.clone()).await?);
            let served = gateway::serve(bus.clone(), history, auth, &settings, &dispatcher, cancel).await;
            bus.close().await;
            drop(dispatcher);
            served
        }
        Role::Translator { language } => {
            let language =
                crate::config::parse_languages(&language)?.pop().context("--language needs one language code")?;
            // Fail fast on configuration, before any broker work.
            settings.provider()?;
            supervised(&settings, &format!("translator-{language}"), &cancel, |current| {
                let (settings, language, cancel) = (settings.clone(), language.clone(), cancel.clone());
                async move {
                    let translator = translator(&settings, &language, None, &cancel).await?;
                    let bus = translator.bus.clone();
                    current.set(bus.clone());
                    let result = translator.run(cancel).await;
                    bus.close().await;
                    result.map_err(anyhow::Error::from)
                }
            })
            .await
        }
        Role::Fanout => {
            let url = settings.history_url.clone().unwrap_or_else(|| {
                tracing::warn!(
                    "no --history-url: keeping history in memory; seq numbering restarts when another fanout takes over"
                );
                "memory:".into()
            });
            // The memory store must outlive reconnects, or numbering would restart with each.
            let memory =
                (url == "memory:").then(|| Arc::new(history::memory::MemoryHistory::default()) as Arc<dyn History>);
            supervised(&settings, "fanout", &cancel, |current| {
                let (settings, cancel, url, memory) = (settings.clone(), cancel.clone(), url.clone(), memory.clone());
                async move {
                    let history = match memory {
                        Some(memory) => memory,
                        None => history::connect(&url, true).await?,
                    };
                    let bus = connect(&settings, &settings.languages, "fanout", Recovery::StartOver, &cancel).await?;
                    current.set(bus.clone());
                    let retention = settings.history_retention.map(Retention::new);
                    let result = Fanout::new(bus.clone(), history, retention).run(cancel).await;
                    bus.close().await;
                    result.map_err(anyhow::Error::from)
                }
            })
            .await
        }
        Role::Standalone => standalone(settings, cancel).await,
    }
}

async fn connect(
    settings: &Settings,
    languages: &[String],
    role: &str,
    recovery: Recovery,
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<dyn Bus>> {
    let url = settings.amqp_url.as_deref().context("the broker URL is missing: pass --amqp-url (PARLEY_AMQP_URL)")?;
    let topology = parley_contract::topology::Topology::new(settings.topology_prefix.as_str())?;
    let ca = match &settings.amqp_ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read the broker's CA file {} (--amqp-ca-file)", path.display()))?;
            // rustls skips what it cannot parse without a word: a file of no certificate is an error here.
            anyhow::ensure!(
                pem.contains("-----BEGIN CERTIFICATE-----"),
                "the broker's CA file {} (--amqp-ca-file) holds no PEM certificate",
                path.display()
            );
            Some(pem)
        }
        None => None,
    };
    let name = format!("parley-{role}");
    let bus = AmqpBus::connect(url, topology, languages, &name, recovery, ca.as_deref(), cancel).await?;
    Ok(Arc::new(bus))
}

async fn translator(
    settings: &Settings,
    language: &str,
    bus: Option<Arc<dyn Bus>>,
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<Translator>> {
    let (kind, url) = settings.provider()?;
    let provider = provider::build(kind, url, settings.translator_api_key.clone(), settings.translator_timeout)?;
    let bus = match bus {
        Some(bus) => bus,
        None => {
            let role = format!("translator-{language}");
            connect(settings, &[language.to_owned()], &role, Recovery::StartOver, cancel).await?
        }
    };
    Ok(Arc::new(Translator {
        language: language.to_owned(),
        bus,
        provider: provider.into(),
        retry: RetryPolicy::default(),
        concurrency: settings.translate_concurrency,
        cache: Arc::new(TranslationCache::new(settings.translation_cache_entries)),
    }))
}

/// The bus a supervised worker currently runs on, for `/readyz`.
#[derive(Clone, Default)]
pub struct CurrentBus(Arc<RwLock<Option<Arc<dyn Bus>>>>);

impl CurrentBus {
    fn set(&self, bus: Arc<dyn Bus>) {
        *self.0.write().expect("bus lock") = Some(bus);
    }

    fn clear(&self) {
        *self.0.write().expect("bus lock") = None;
    }

    fn is_ready(&self) -> bool {
        self.0.read().expect("bus lock").as_ref().is_some_and(|bus| bus.is_ready())
    }

    fn stalled(&self, timeout: Duration) -> Option<String> {
        self.0.read().expect("bus lock").as_ref().and_then(|bus| bus.stalled(timeout))
    }
}

/// Runs a worker role beside a health server on `--listen`, starting it again on a fresh connection
/// (with backoff) whenever it fails, until SIGTERM. Brokers refuse work in passing states too: a
/// quorum queue another process is still declaring fails a consume with INTERNAL_ERROR.
async fn supervised<F, Fut>(
    settings: &Settings,
    role: &str,
    cancel: &CancellationToken,
    mut attempt: F,
) -> anyhow::Result<()>
where
    F: FnMut(CurrentBus) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}", settings.listen))?;
    let current = CurrentBus::default();
    let health = axum::serve(
        listener,
        crate::health::routes::<()>(
            {
                let current = current.clone();
                move || current.is_ready()
            },
            {
                let (current, timeout) = (current.clone(), settings.stall_timeout);
                move || current.stalled(timeout)
            },
        ),
    )
    .with_graceful_shutdown(cancel.clone().cancelled_owned());
    let health = tokio::spawn(async move { health.await });
    const FIRST_DELAY: Duration = Duration::from_millis(500);
    let mut delay = FIRST_DELAY;
    let result = loop {
        let started = std::time::Instant::now();
        let outcome = attempt(current.clone()).await;
        // A role that ran a good while failed afresh: the next failure starts the backoff over.
        if started.elapsed() > Duration::from_secs(60) {
            delay = FIRST_DELAY;
        }
        current.clear();
        if cancel.is_cancelled() {
            break outcome;
        }
        match outcome {
            Ok(()) => tracing::warn!(role, retry_in = ?delay, "consumer ended; reconnecting"),
            Err(err) => {
                tracing::error!(role, error = format!("{err:#}"), retry_in = ?delay, "role failed; reconnecting")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    };
    let _ = health.await;
    result
}

/// How many stall timeouts a standalone process's broker connection may stay down before it gives
/// up on its recovery (see [`watch_recovery`]).
const RECOVERY_STALLS: u32 = 6;

/// Gives up on a standalone process's broker connection once it has been down for `limit`: lapin's
/// automatic recovery can go on for good without reconnecting after a broker restart (its io loop
/// busy, the connection never back; amqp-rs/lapin#450). `failed` then stops the process, which exits
/// non-zero rather than stay up unready. Long enough for a broker restart, which lapin does recover
/// from.
fn watch_recovery(bus: Arc<dyn Bus>, limit: Duration, failed: CancellationToken, cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut down_since: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                () = failed.cancelled() => return,
                // Stopping: a shutdown during an outage is not a failed recovery.
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if bus.is_ready() {
                down_since = None;
                continue;
            }
            let since = *down_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= limit {
                tracing::error!(
                    down_for = ?since.elapsed(),
                    "the broker connection has not recovered; giving up on it so that the process restarts"
                );
                failed.cancel();
                return;
            }
        }
    });
}

async fn standalone(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    let auth = Arc::new(settings.auth.build(Some(crate::config::AuthMode::None))?);
    if !settings.languages.is_empty() {
        settings.provider().context("standalone mode translates into the given --languages")?;
    }
    let history = match settings.history_url.as_deref() {
        Some(url) => history::connect(url, true).await?,
        None => {
            tracing::info!("no --history-url: keeping history in memory (bounded, lost on exit)");
            Arc::new(history::memory::MemoryHistory::default())
        }
    };
    let dispatcher = gateway::Dispatcher::start().context("failed to start the dispatch thread")?;
    let bus: Arc<dyn Bus> = match settings.amqp_url {
        // The broker connection's tasks run on the dispatch thread, not behind the connections' tasks.
        Some(_) => dispatcher
            .run({
                let (settings, cancel) = (settings.clone(), cancel.clone());
                async move { connect(&settings, &settings.languages, "standalone", Recovery::Automatic, &cancel).await }
            })
            .await?,
        None => {
            tracing::info!("no --amqp-url: running on the in-process bus");
            Arc::new(MemoryBus::new(&settings.languages))
        }
    };
    let mut roles: Vec<(String, RoleFuture)> = Vec::new();
    let retention = settings.history_retention.map(Retention::new);
    let fanout = Fanout::new(bus.clone(), history.clone(), retention).run(cancel.clone());
    roles.push(("fanout".into(), Box::pin(async move { Ok(fanout.await?) })));
    for language in &settings.languages {
        let translator = translator(&settings, language, Some(bus.clone()), &cancel).await?;
        let stop = cancel.clone();
        roles.push((format!("translator-{language}"), Box::pin(async move { Ok(translator.run(stop).await?) })));
    }
    // The workers get a runtime of their own: behind thousands of busy connection tasks they would
    // fall behind the gateway's sockets.
    let failed = CancellationToken::new();
    let workers = {
        let failed = failed.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("parley-workers")
            .enable_all()
            .build()
            .context("failed to start the workers' runtime")?;
        std::thread::Builder::new().name("parley-workers".into()).spawn(move || {
            runtime.block_on(async move {
                let tracker = TaskTracker::new();
                for (name, role) in roles {
                    let failed = failed.clone();
                    tracker.spawn(async move {
                        if let Err(err) = role.await {
                            tracing::error!(role = name, error = format!("{err:#}"), "role failed");
                            failed.cancel();
                        }
                    });
                }
                tracker.close();
                tracker.wait().await;
            })
        })?
    };
    if settings.amqp_url.is_some() {
        watch_recovery(bus.clone(), settings.stall_timeout * RECOVERY_STALLS, failed.clone(), cancel.clone());
    }
    let gateway_cancel = cancel.child_token();
    let stop_gateway = gateway_cancel.clone();
    let failed_watch = failed.clone();
    tokio::spawn(async move {
        failed_watch.cancelled().await;
        stop_gateway.cancel();
    });
    let served = gateway::serve(bus.clone(), Some(history), auth, &settings, &dispatcher, gateway_cancel).await;
    cancel.cancel();
    let _ = tokio::task::spawn_blocking(move || workers.join()).await;
    bus.close().await;
    drop(dispatcher);
    served?;
    anyhow::ensure!(!failed.is_cancelled(), "a role failed; see the log above");
    Ok(())
}
