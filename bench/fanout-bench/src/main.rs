//! fanout-bench: what keeping history costs the fanout, measured on a real RabbitMQ with a real
//! `chat-server fanout` process.
//!
//! - `throughput`: fills the fanout's queue with N originals and, per original, one translation into
//!   each of L languages, then starts the fanout and times how long it takes to publish every
//!   delivery. Reports originals and deliveries per second.
//! - `latency`: starts the fanout, then publishes R originals per second (and their L translations at
//!   once) for D seconds, and measures each delivery's latency from its publish to its arrival on the
//!   delivery exchange.
//!
//! Translations are published directly, not by translators: only the fanout is measured. Run each mode
//! once with `--history-url postgres://…` and once without (the fanout's memory store).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use parley_contract::topology::{self, Topology};
use serde_json::json;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Throughput,
    Latency,
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
    /// The fanout's history; its memory store when omitted.
    #[arg(long)]
    history_url: Option<String>,
    /// Originals (throughput).
    #[arg(long, default_value_t = 20_000)]
    originals: usize,
    /// Originals per second (latency).
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Seconds of sending (latency).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Translations per original.
    #[arg(long, default_value_t = 2)]
    languages: usize,
    /// Chats the messages spread over.
    #[arg(long, default_value_t = 100)]
    chats: usize,
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64
}

/// The wire messages of one original and its translations; the text carries the send time.
fn messages(chat: &str, languages: usize) -> Vec<(bool, Vec<u8>)> {
    let id = uuid::Uuid::now_v7();
    let sent = now_nanos().to_string();
    let posted = json!({"v": 1, "id": id, "chatId": chat, "text": sent, "sourceLanguage": "en",
        "sentAt": "2026-01-01T00:00:00.000Z"});
    let mut all = vec![(true, posted.to_string().into_bytes())];
    for l in 0..languages {
        let translated = json!({"v": 1, "id": id, "chatId": chat, "language": format!("l{l}"), "text": sent,
            "provider": "bench", "sourceLanguage": "en", "sentAt": "2026-01-01T00:00:00.000Z"});
        all.push((false, translated.to_string().into_bytes()));
    }
    all
}

async fn publish(channel: &Channel, topology: &Topology, batch: &[(bool, Vec<u8>)]) -> anyhow::Result<()> {
    let mut confirms = Vec::new();
    for (original, payload) in batch {
        let exchange = if *original { topology.posted_exchange() } else { topology.translated_exchange() };
        let properties = BasicProperties::default().with_delivery_mode(2);
        confirms.push(
            channel
                .basic_publish(exchange.as_str().into(), "".into(), BasicPublishOptions::default(), payload, properties)
                .await?,
        );
    }
    for confirm in confirms {
        confirm.await?;
    }
    Ok(())
}

/// A queue bound to the delivery exchange for every benchmark chat.
async fn deliveries(channel: &Channel, topology: &Topology, chats: usize) -> anyhow::Result<lapin::Consumer> {
    let queue = topology.gateway_queue(&uuid::Uuid::now_v7().simple().to_string());
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await?;
    for chat in 0..chats {
        let key = format!("bench-{chat}");
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.deliver_exchange().as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
    Ok(channel.basic_consume(queue.as_str().into(), "".into(), consume, FieldTable::default()).await?)
}

struct Fanout(Child);

impl Drop for Fanout {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_fanout(args: &Args, prefix: &str) -> anyhow::Result<Fanout> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut command = Command::new(&args.chat_server);
    command
        .args(["fanout", "--amqp-url", &args.amqp_url, "--topology-prefix", prefix, "--languages", ""])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", std::env::var("FANOUT_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null());
    if let Some(url) = &args.history_url {
        command.args(["--history-url", url]);
    }
    Ok(Fanout(command.spawn().context("failed to start the fanout")?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let prefix = format!("parley.bench.fanout.{}", uuid::Uuid::now_v7().simple());
    let topology = Topology::new(prefix.as_str())?;
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare::<&str>(&channel, &topology, &[]).await?;
    let receiving = connection.create_channel().await?;
    let mut consumer = deliveries(&receiving, &topology, args.chats).await?;
    let per_original = 1 + args.languages;
    let result = match args.mode {
        Mode::Throughput => {
            for batch in 0..args.originals.div_ceil(100) {
                let mut messages_batch = Vec::new();
                for i in 0..100.min(args.originals - batch * 100) {
                    messages_batch
                        .extend(messages(&format!("bench-{}", (batch * 100 + i) % args.chats), args.languages));
                }
                publish(&channel, &topology, &messages_batch).await?;
            }
            let expected = args.originals * per_original;
            let spawned = Instant::now();
            let _fanout = start_fanout(&args, &prefix)?;
            // The clock starts with the first delivery: the fanout's start (connecting, migrating) is apart.
            let mut started = None;
            let mut received = 0;
            while received < expected {
                match tokio::time::timeout(Duration::from_secs(60), consumer.next()).await {
                    Ok(Some(Ok(_))) => received += 1,
                    _ => bail!("only {received} of {expected} deliveries arrived"),
                }
                started.get_or_insert_with(Instant::now);
            }
            let started = started.expect("deliveries arrived");
            let seconds = started.elapsed().as_secs_f64();
            // The first delivery is not part of the timed stretch.
            let timed = (expected - 1) as f64;
            json!({"mode": "throughput", "history": args.history_url.is_some(), "originals": args.originals,
                "deliveries": expected, "startup_seconds": (started - spawned).as_secs_f64(), "seconds": seconds,
                "originals_per_sec": timed / per_original as f64 / seconds, "deliveries_per_sec": timed / seconds})
        }
        Mode::Latency => {
            let _fanout = start_fanout(&args, &prefix)?;
            // Wait until the fanout consumes, then warm it up for a second (connections, prepared statements).
            publish(&channel, &topology, &messages("bench-0", 0)).await?;
            tokio::time::timeout(Duration::from_secs(60), consumer.next()).await.context("the fanout never started")?;
            for i in 0..300 {
                publish(&channel, &topology, &messages(&format!("bench-{}", i % args.chats), args.languages)).await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for _ in 0..300 * per_original {
                tokio::time::timeout(Duration::from_secs(60), consumer.next()).await.context("warm-up")?;
            }
            let sender = {
                let (channel, topology) = (channel.clone(), topology.clone());
                let (rate, duration, chats, languages) = (args.rate, args.duration, args.chats, args.languages);
                tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                    for i in 0..rate * duration {
                        ticks.tick().await;
                        let batch = messages(&format!("bench-{}", i as usize % chats), languages);
                        if let Err(err) = publish(&channel, &topology, &batch).await {
                            eprintln!("publish failed: {err}");
                        }
                    }
                })
            };
            let expected = (args.rate * args.duration) as usize * per_original;
            let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut received = 0;
            while received < expected {
                let delivery = match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
                    Ok(Some(Ok(delivery))) => delivery,
                    _ => bail!("only {received} of {expected} deliveries arrived"),
                };
                let now = now_nanos();
                let value: serde_json::Value = serde_json::from_slice(&delivery.data)?;
                let sent: u64 = value["text"].as_str().and_then(|t| t.parse().ok()).context("a benchmark delivery")?;
                latencies.record((now.saturating_sub(sent) / 1000).max(1))?;
                received += 1;
            }
            sender.await?;
            let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
            json!({"mode": "latency", "history": args.history_url.is_some(), "rate": args.rate,
                "languages": args.languages, "deliveries": received,
                "latency_ms": {"p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99), "max": latencies.max() as f64 / 1000.0}})
        }
    };
    topology::delete_all::<&str>(&channel, &topology, &[]).await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
