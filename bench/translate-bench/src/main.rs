//! translate-bench: translations per second of one `chat-server translator` replica, on a real
//! RabbitMQ.
//!
//! - `libretranslate`: against a stand-in for LibreTranslate's `POST /translate` (a text, or an array
//!   of texts, per call) served by this process, which answers each call after `--latency-ms`, as a
//!   cloud API would. The stand-in exists for this benchmark only; it echoes the texts.
//! - `apertium`: against a real Apertium APY at `--provider-url`. In the same run it also measures
//!   what APY itself serves to a client that keeps `--direct-concurrency` requests in flight, so the
//!   translator can be set against its provider's own limit.
//!
//! The language queue is filled with `--messages` originals first (distinct texts, so the translator's
//! cache never answers), then the translator starts; the rate is timed over the steady part, from the
//! end of the first tenth of the translations to the last, as read off `<P>.translated`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use axum::{extract::State, routing::post, Json, Router};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties, Connection, ConnectionProperties,
};
use parley_contract::topology::{self, Topology};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Libretranslate,
    Apertium,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    /// The chat-server binary.
    #[arg(long)]
    chat_server: PathBuf,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Originals in the queue.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// How long the LibreTranslate stand-in takes to answer a call.
    #[arg(long, default_value_t = 300)]
    latency_ms: u64,
    /// The Apertium APY (apertium mode).
    #[arg(long, default_value = "http://127.0.0.1:2737")]
    provider_url: String,
    /// `--translate-concurrency` for the translator; its default when omitted.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Requests the direct client keeps in flight against APY.
    #[arg(long, default_value_t = 16)]
    direct_concurrency: usize,
    /// Seconds the direct client runs.
    #[arg(long, default_value_t = 10)]
    direct_seconds: u64,
}

/// Calls and texts the stand-in has answered.
#[derive(Clone, Default)]
struct StandIn {
    latency: Duration,
    calls: Arc<AtomicU64>,
    texts: Arc<AtomicU64>,
}

async fn stand_in_translate(State(stand_in): State<StandIn>, Json(body): Json<Value>) -> Json<Value> {
    tokio::time::sleep(stand_in.latency).await;
    stand_in.calls.fetch_add(1, Ordering::Relaxed);
    let translated = match &body["q"] {
        Value::Array(texts) => {
            stand_in.texts.fetch_add(texts.len() as u64, Ordering::Relaxed);
            Value::Array(texts.clone())
        }
        text => {
            stand_in.texts.fetch_add(1, Ordering::Relaxed);
            text.clone()
        }
    };
    Json(json!({ "translatedText": translated }))
}

async fn serve_stand_in(stand_in: StandIn) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address: SocketAddr = listener.local_addr()?;
    let app = Router::new().route("/translate", post(stand_in_translate)).with_state(stand_in);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{address}"))
}

fn text(i: usize) -> String {
    format!("Good morning number {i}, how are you today?")
}

struct Translator(Child);

impl Drop for Translator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_translator(args: &Args, prefix: &str, kind: &str, url: &str) -> anyhow::Result<Translator> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut command = Command::new(&args.chat_server);
    command
        .args(["translator", "--language", "es", "--translator", kind, "--translator-url", url])
        .args(["--amqp-url", &args.amqp_url, "--topology-prefix", prefix])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(concurrency) = args.concurrency {
        command.args(["--translate-concurrency", &concurrency.to_string()]);
    }
    Ok(Translator(command.spawn().context("failed to start the translator")?))
}

/// Translations per second APY serves to a client with `concurrency` requests in flight, counting
/// only the answers that arrive within the window.
async fn direct_apertium(url: &str, concurrency: usize, seconds: u64) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let window = Duration::from_secs(seconds);
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (client, url, done) = (client.clone(), format!("{url}/translate"), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = worker * 1_000_000;
            while started.elapsed() < window {
                let q = text(i);
                let form = [("langpair", "eng|spa"), ("q", q.as_str()), ("markUnknown", "no")];
                let answered = client.post(&url).form(&form).send().await.map(|r| r.status().is_success());
                if answered.unwrap_or(false) && started.elapsed() < window {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / window.as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let prefix = format!("parley.bench.translate.{}", uuid::Uuid::now_v7().simple());
    let topology = Topology::new(prefix.as_str())?;
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare(&channel, &topology, &["es"]).await?;
    // The translations, read off the translated exchange by a queue of this process.
    let receiving = connection.create_channel().await?;
    let queue = format!("{prefix}.bench-translations");
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    receiving.queue_declare(queue.as_str().into(), exclusive, FieldTable::default()).await?;
    receiving
        .queue_bind(
            queue.as_str().into(),
            topology.translated_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut translations =
        receiving.basic_consume(queue.as_str().into(), "".into(), consume, FieldTable::default()).await?;

    let mut confirms = Vec::new();
    for i in 0..args.messages {
        let posted = json!({"v": 1, "id": uuid::Uuid::now_v7(), "chatId": "bench", "text": text(i),
            "sourceLanguage": "en", "sentAt": "2026-01-01T00:00:00.000Z"});
        let payload = posted.to_string().into_bytes();
        let properties = BasicProperties::default().with_delivery_mode(2);
        let exchange = topology.posted_exchange();
        confirms.push(
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        confirm.await?;
    }

    let stand_in = StandIn { latency: Duration::from_millis(args.latency_ms), ..StandIn::default() };
    let (kind, url) = match args.mode {
        Mode::Libretranslate => ("libretranslate", serve_stand_in(stand_in.clone()).await?),
        Mode::Apertium => ("apertium", args.provider_url.clone()),
    };
    let translator = start_translator(&args, &prefix, kind, &url)?;
    // The rate is taken over the steady part: from the translation that ends the first tenth to the
    // last. The start (connecting, the first calls going out together) is left out, and so is every
    // translation counted before the clock starts.
    let skip = args.messages / 10;
    let mut from = None;
    let mut received = 0;
    while received < args.messages {
        match tokio::time::timeout(Duration::from_secs(120), translations.next()).await {
            Ok(Some(Ok(_))) => received += 1,
            _ => bail!("only {received} of {} translations arrived", args.messages),
        }
        if received == skip.max(1) {
            from = Some(Instant::now());
        }
    }
    let seconds = from.expect("translations arrived").elapsed().as_secs_f64();
    drop(translator);
    let rate = (args.messages - skip.max(1)) as f64 / seconds;
    let mut result = json!({"mode": kind, "messages": args.messages, "concurrency": args.concurrency,
        "seconds": seconds, "translations_per_sec": rate});
    match args.mode {
        Mode::Libretranslate => {
            let calls = stand_in.calls.load(Ordering::Relaxed);
            result["latency_ms"] = json!(args.latency_ms);
            result["provider_calls"] = json!(calls);
            result["texts_per_call"] = json!(stand_in.texts.load(Ordering::Relaxed) as f64 / calls.max(1) as f64);
        }
        Mode::Apertium => {
            let direct = direct_apertium(&args.provider_url, args.direct_concurrency, args.direct_seconds).await?;
            result["apy_direct_per_sec"] = json!(direct);
            result["direct_concurrency"] = json!(args.direct_concurrency);
            result["share_of_apy"] = json!(rate / direct);
        }
    }
    topology::delete_all(&channel, &topology, &["es"]).await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
