//! Starting each role: connect the bus, wire the pieces, run until SIGTERM, then drain.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::{amqp::AmqpBus, memory::MemoryBus, Bus},
    config::{Role, Settings},
    fanout::Fanout,
    graphql::{build_schema, ChatContext, ChatSettings, QueryLimits},
    http::{health_routes, router, AppState, SocketLimits},
    hub::Hub,
    translator::{provider, RetryPolicy, Translator},
};

/// How long open sockets get to receive their close frame after the listener stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(role: Role, settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    match role {
        Role::Gateway => {
            let bus = connect(&settings, &settings.languages, "gateway", &cancel).await?;
            serve_gateway(bus, &settings, cancel).await
        }
        Role::Translator { language } => {
            let language = crate::config::parse_languages(&language)?
                .pop()
                .context("--language needs one language code")?;
            let translator = translator(&settings, &language, None, &cancel).await?;
            with_health(
                &settings,
                translator.bus.clone(),
                translator.run(cancel.clone()),
            )
            .await
        }
        Role::Fanout => {
            let bus = connect(&settings, &settings.languages, "fanout", &cancel).await?;
            let fanout = Fanout::new(bus.clone());
            with_health(&settings, bus, fanout.run(cancel.clone())).await
        }
        Role::Standalone => standalone(settings, cancel).await,
    }
}

async fn connect(
    settings: &Settings,
    languages: &[String],
    role: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<dyn Bus>> {
    let url = settings
        .amqp_url
        .as_deref()
        .context("the broker URL is missing: pass --amqp-url (PARLEY_AMQP_URL)")?;
    let topology = parley_topology::Topology::new(settings.topology_prefix.as_str())?;
    let bus = AmqpBus::connect(url, topology, languages, &format!("parley-{role}"), cancel).await?;
    Ok(Arc::new(bus))
}

async fn translator(
    settings: &Settings,
    language: &str,
    bus: Option<Arc<dyn Bus>>,
    cancel: &CancellationToken,
) -> anyhow::Result<Translator> {
    let (kind, url) = settings.provider()?;
    let provider = provider::build(
        kind,
        url,
        settings.translator_api_key.clone(),
        settings.translator_timeout,
    )?;
    let bus = match bus {
        Some(bus) => bus,
        None => {
            connect(
                settings,
                &[language.to_owned()],
                &format!("translator-{language}"),
                cancel,
            )
            .await?
        }
    };
    Ok(Translator {
        language: language.to_owned(),
        bus,
        provider: provider.into(),
        retry: RetryPolicy::default(),
    })
}

/// Runs a worker role beside a health server on `--listen`; stops when the worker does.
async fn with_health(
    settings: &Settings,
    bus: Arc<dyn Bus>,
    work: impl std::future::Future<Output = Result<(), crate::bus::BusError>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}", settings.listen))?;
    let health = axum::serve(listener, health_routes::<()>(bus.clone()));
    let result = tokio::select! {
        result = work => result.map_err(anyhow::Error::from),
        result = health => result.context("health server failed"),
    };
    bus.close().await;
    result
}

async fn serve_gateway(
    bus: Arc<dyn Bus>,
    settings: &Settings,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (binder, feed) = bus.delivery_feed().await?;
    let hub = Hub::new(binder, settings.subscriber_buffer);
    let feed_task = tokio::spawn(hub.clone().run_feed(feed));
    let chat = ChatContext {
        bus: bus.clone(),
        hub,
        settings: ChatSettings {
            source_language: settings.source_language.clone(),
            languages: settings.languages.clone(),
            max_text_bytes: settings.max_text_bytes,
            max_chat_id_bytes: 200,
        },
    };
    let limits = QueryLimits {
        max_depth: settings.max_query_depth,
        max_complexity: settings.max_query_complexity,
    };
    let state = AppState {
        schema: build_schema(Arc::new(chat), limits),
        bus: bus.clone(),
        limits: SocketLimits {
            max_subscriptions_per_connection: settings.max_subscriptions_per_connection,
            connection_init_timeout: settings.connection_init_timeout,
            max_message_bytes: settings.max_text_bytes * 4 + 16 * 1024,
        },
        shutdown: cancel.clone(),
        sockets: TaskTracker::new(),
    };
    let sockets = state.sockets.clone();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}", settings.listen))?;
    tracing::info!(address = %listener.local_addr()?, "gateway serving GraphQL on /graphql");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await?;
    sockets.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, sockets.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sockets did not close in time");
    }
    feed_task.abort();
    bus.close().await;
    tracing::info!("gateway stopped");
    Ok(())
}

async fn standalone(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    if !settings.languages.is_empty() {
        settings
            .provider()
            .context("standalone mode translates into the given --languages")?;
    }
    let bus: Arc<dyn Bus> = match settings.amqp_url {
        Some(_) => connect(&settings, &settings.languages, "standalone", &cancel).await?,
        None => {
            tracing::info!("no --amqp-url: running on the in-process bus");
            Arc::new(MemoryBus::new(&settings.languages))
        }
    };
    let workers = TaskTracker::new();
    let failed = CancellationToken::new();
    let mut roles: Vec<(
        String,
        std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
    )> = Vec::new();
    roles.push((
        "fanout".into(),
        Box::pin(Fanout::new(bus.clone()).run(cancel.clone())),
    ));
    for language in &settings.languages {
        let translator = translator(&settings, language, Some(bus.clone()), &cancel).await?;
        let stop = cancel.clone();
        roles.push((
            format!("translator-{language}"),
            Box::pin(async move { translator.run(stop).await }),
        ));
    }
    for (name, role) in roles {
        let failed = failed.clone();
        workers.spawn(async move {
            if let Err(err) = role.await {
                tracing::error!(role = name, error = %err, "role failed");
                failed.cancel();
            }
        });
    }
    workers.close();
    let gateway_cancel = cancel.child_token();
    let stop_gateway = gateway_cancel.clone();
    let failed_watch = failed.clone();
    tokio::spawn(async move {
        failed_watch.cancelled().await;
        stop_gateway.cancel();
    });
    let served = serve_gateway(bus, &settings, gateway_cancel).await;
    cancel.cancel();
    workers.wait().await;
    served?;
    anyhow::ensure!(!failed.is_cancelled(), "a role failed; see the log above");
    Ok(())
}
