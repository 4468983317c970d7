//! chat-bench: opens N graphql-transport-ws subscribers over K chats (and several gateways, source
//! addresses and worker processes), sends R messages per second per chat with `sendMessage`, and
//! measures every delivery's end-to-end latency.
//!
//! The parent process spawns W workers (itself with `--worker i/W`); each holds its share of the
//! subscribers on a single-threaded runtime and reports a latency histogram when told to stop.

use std::{
    cell::RefCell,
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    rc::Rc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

/// A process may hold at most 20,000 open files here; leave room for the rest.
const SUBSCRIBERS_PER_WORKER: usize = 18_000;
const SEND: &str = "mutation($chatId: ID!, $text: String!) { sendMessage(chatId: $chatId, text: $text) { id } }";
const SUBSCRIBE: &str = "subscription($chatId: ID!) { messages(chatId: $chatId) { id text } }";
const MARK: &str = "\"text\":\"bench ";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "chat-bench",
    about = "Load a chat server's sendMessage + messages subscription and measure delivery latency"
)]
struct Args {
    /// GraphQL endpoints (comma-separated); subscribers round-robin over them, messages go to the first.
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// Subscriber connections in all.
    #[arg(long)]
    subscribers: usize,
    /// Chats the subscribers spread over.
    #[arg(long, default_value_t = 1)]
    chats: usize,
    /// Messages per second per chat.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Worker processes; by default enough to stay under the per-process file limit.
    #[arg(long)]
    workers: Option<usize>,
    /// Loopback source addresses to connect from, e.g. 127.0.0.2-127.0.0.20.
    #[arg(long)]
    source_ips: Option<String>,
    /// Server process ids whose RSS is summed at the end.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds to wait for deliveries in flight after sending stops.
    #[arg(long, default_value_t = 3)]
    drain: u64,
    /// Connections a worker opens at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    #[arg(long, hide = true)]
    worker: Option<String>,
}

/// What a worker reports.
#[derive(Serialize, Deserialize, Default)]
struct WorkerReport {
    connected_per_chat: Vec<u64>,
    received: u64,
    /// (latency µs, count) pairs of the worker's histogram.
    latencies: Vec<(u64, u64)>,
    /// Per broadcast (send timestamp in ns), the slowest subscriber's latency in µs.
    slowest: Vec<(u64, u64)>,
    cpu_seconds: f64,
    errors: Vec<String>,
}

/// The results, with exactly the keys the benchmark documents.
#[derive(Serialize, Debug)]
struct Summary {
    connected: u64,
    deliveries_per_sec: f64,
    reach: f64,
    latency_ms: Percentiles,
    last_subscriber_ms_p99: f64,
    client_cpu_seconds: f64,
    server_rss_bytes: u64,
}

#[derive(Serialize, Debug)]
struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64
}

/// This process's CPU time (user + system) from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn source_ips(spec: Option<&str>) -> anyhow::Result<Vec<Ipv4Addr>> {
    let Some(spec) = spec else { return Ok(vec![Ipv4Addr::LOCALHOST]) };
    let (from, to) = spec.split_once('-').unwrap_or((spec, spec));
    let (from, to): (Ipv4Addr, Ipv4Addr) = (from.parse()?, to.parse()?);
    let ips: Vec<Ipv4Addr> = (u32::from(from)..=u32::from(to)).map(Ipv4Addr::from).collect();
    if ips.is_empty() || !ips.iter().all(|ip| ip.is_loopback()) {
        bail!("--source-ips must be a non-empty range of loopback addresses");
    }
    Ok(ips)
}

/// The latency in µs carried by a `next` frame's text, if it is one of ours.
fn latency_of(frame: &str, now: u64) -> Option<(u64, u64)> {
    let start = frame.find(MARK)? + MARK.len();
    let digits = &frame[start..];
    let end = digits.find(|c: char| !c.is_ascii_digit())?;
    let sent: u64 = digits[..end].parse().ok()?;
    Some((sent, now.saturating_sub(sent) / 1000))
}

async fn subscribe(
    url: &str,
    source: Ipv4Addr,
    chat: usize,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut request = ws_url.as_str().into_client_request()?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let host = request.uri().host().context("url has no host")?.to_owned();
    let port = request.uri().port_u16().unwrap_or(80);
    let server: SocketAddr = tokio::net::lookup_host((host.as_str(), port)).await?.next().context("no address")?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    ws.send(Message::Text(json!({"type": "connection_init", "payload": {}}).to_string().into())).await?;
    loop {
        match ws.next().await.context("closed before connection_ack")?? {
            Message::Text(text) if text.contains("connection_ack") => break,
            Message::Text(text) => bail!("unexpected frame before connection_ack: {text}"),
            _ => {}
        }
    }
    let subscribe = json!({"type": "subscribe", "id": "1", "payload": {"query": SUBSCRIBE, "variables": {"chatId": format!("bench-{chat}")}}});
    ws.send(Message::Text(subscribe.to_string().into())).await?;
    Ok(ws)
}

#[derive(Default)]
struct Tally {
    received: u64,
    latencies: Option<Histogram<u64>>,
    slowest: HashMap<u64, u64>,
    errors: Vec<String>,
}

/// One worker: subscribes its share, says `ready`, counts deliveries until `stop` arrives on stdin.
fn run_worker(args: &Args, index: usize, count: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let ips = source_ips(args.source_ips.as_deref())?;
        let tally = Rc::new(RefCell::new(Tally {
            latencies: Some(Histogram::new_with_bounds(1, 600_000_000, 3)?),
            ..Default::default()
        }));
        let mut connected_per_chat = vec![0u64; args.chats];
        let mine: Vec<usize> = (0..args.subscribers).filter(|i| i % count == index).collect();
        let limit = Rc::new(tokio::sync::Semaphore::new(args.connect_concurrency));
        let mut pending = Vec::new();
        for i in mine {
            let (url, chat, source) = (args.url[i % args.url.len()].clone(), i % args.chats, ips[i % ips.len()]);
            let limit = limit.clone();
            pending.push(tokio::task::spawn_local(async move {
                let _permit = limit.acquire().await;
                (chat, subscribe(&url, source, chat).await)
            }));
        }
        let mut streams = Vec::new();
        for task in pending {
            match task.await? {
                (chat, Ok(ws)) => {
                    connected_per_chat[chat] += 1;
                    streams.push(ws);
                }
                (_, Err(err)) => tally.borrow_mut().errors.push(format!("subscribe: {err:#}")),
            }
        }
        for mut ws in streams {
            let tally = tally.clone();
            tokio::task::spawn_local(async move {
                while let Some(frame) = ws.next().await {
                    let Ok(Message::Text(text)) = frame else { continue };
                    let mut t = tally.borrow_mut();
                    match latency_of(text.as_str(), now_nanos()) {
                        Some((sent, micros)) => {
                            t.received += 1;
                            let _ = t.latencies.as_mut().expect("histogram").record(micros.max(1));
                            let slowest = t.slowest.entry(sent).or_default();
                            *slowest = (*slowest).max(micros);
                        }
                        None if text.contains("\"error\"") || text.contains("\"complete\"") => {
                            t.errors.push(format!("server ended the subscription: {text}"));
                            break;
                        }
                        None => {}
                    }
                }
            });
        }
        println!("{}", json!({"ready": connected_per_chat.iter().sum::<u64>()}));
        std::io::stdout().flush()?;
        let mut line = String::new();
        let stop = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line));
        let _ = stop.await;
        let t = tally.borrow();
        let latencies = t.latencies.as_ref().expect("histogram");
        let report = WorkerReport {
            connected_per_chat,
            received: t.received,
            latencies: latencies.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect(),
            slowest: t.slowest.iter().map(|(k, v)| (*k, *v)).collect(),
            cpu_seconds: cpu_seconds("self"),
            errors: t.errors.iter().take(5).cloned().collect(),
        };
        println!("{}", serde_json::to_string(&report)?);
        std::io::stdout().flush()?;
        Ok::<_, anyhow::Error>(())
    })?;
    // The subscribers' sockets close with the process.
    std::process::exit(0)
}

struct Worker {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Worker {
    fn next_json(&mut self) -> anyhow::Result<serde_json::Value> {
        let line = self.lines.next().context("worker exited early")??;
        serde_json::from_str(&line).with_context(|| format!("worker said: {line}"))
    }
}

async fn send_messages(args: &Args) -> anyhow::Result<Vec<u64>> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    for chat in 0..args.chats {
        let (client, url) = (client.clone(), args.url[0].clone());
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = 0u64;
            let mut in_flight = tokio::task::JoinSet::new();
            while tokio::time::Instant::now() < deadline {
                ticks.tick().await;
                let body = json!({"query": SEND, "variables": {"chatId": format!("bench-{chat}"), "text": format!("bench {}", now_nanos())}});
                let (client, url) = (client.clone(), url.clone());
                in_flight.spawn(async move {
                    let response = client.post(&url).json(&body).send().await.ok()?;
                    let value: serde_json::Value = response.json().await.ok()?;
                    value["data"]["sendMessage"]["id"].is_string().then_some(())
                });
                while let Some(done) = in_flight.try_join_next() {
                    sent += u64::from(matches!(done, Ok(Some(()))));
                }
            }
            while let Some(done) = in_flight.join_next().await {
                sent += u64::from(matches!(done, Ok(Some(()))));
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.push(task.await?);
    }
    Ok(sent)
}

fn percentile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

fn run(args: Args) -> anyhow::Result<Summary> {
    if args.subscribers == 0 || args.chats == 0 || args.rate <= 0.0 {
        bail!("--subscribers, --chats and --rate must be positive");
    }
    let workers = args.workers.unwrap_or_else(|| args.subscribers.div_ceil(SUBSCRIBERS_PER_WORKER)).max(1);
    let exe = std::env::current_exe()?;
    // Workers get the same arguments without `--workers N` / `--workers=N`.
    let mut inherited = Vec::new();
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        if arg == "--workers" {
            given.next();
        } else if !arg.starts_with("--workers=") {
            inherited.push(arg);
        }
    }
    let mut spawned = Vec::new();
    for i in 0..workers {
        let mut child = Command::new(&exe)
            .args(&inherited)
            .args(["--worker", &format!("{i}/{workers}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to spawn a worker")?;
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        spawned.push(Worker { child, lines });
    }
    let mut connected = 0;
    for worker in &mut spawned {
        connected += worker.next_json()?["ready"].as_u64().unwrap_or(0);
    }
    eprintln!("chat-bench: {connected} of {} subscribers connected over {workers} worker(s)", args.subscribers);
    // Let the servers finish binding the chats before the clock starts.
    std::thread::sleep(Duration::from_secs(1));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let started = Instant::now();
    let sent = runtime.block_on(send_messages(&args))?;
    let sending = started.elapsed();
    std::thread::sleep(Duration::from_secs(args.drain));
    let server_rss_bytes = args.server_pid.iter().map(|pid| rss_bytes(*pid)).sum();

    let mut latencies = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut slowest: HashMap<u64, u64> = HashMap::new();
    let mut connected_per_chat = vec![0u64; args.chats];
    let (mut received, mut cpu) = (0u64, cpu_seconds("self"));
    for worker in &mut spawned {
        writeln!(worker.child.stdin.as_mut().expect("piped"), "stop")?;
        let report: WorkerReport = serde_json::from_value(worker.next_json()?)?;
        for (chat, n) in report.connected_per_chat.iter().enumerate() {
            connected_per_chat[chat] += n;
        }
        received += report.received;
        cpu += report.cpu_seconds;
        for (value, count) in report.latencies {
            latencies.record_n(value, count)?;
        }
        for (sent_at, micros) in report.slowest {
            let entry = slowest.entry(sent_at).or_default();
            *entry = (*entry).max(micros);
        }
        for error in report.errors {
            eprintln!("chat-bench worker: {error}");
        }
        let _ = worker.child.wait();
    }
    let expected: u64 = sent.iter().zip(&connected_per_chat).map(|(s, c)| s * c).sum();
    let mut last = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for micros in slowest.values() {
        last.record((*micros).max(1))?;
    }
    Ok(Summary {
        connected,
        deliveries_per_sec: received as f64 / sending.as_secs_f64(),
        reach: if expected == 0 { 0.0 } else { received as f64 / expected as f64 },
        latency_ms: Percentiles {
            p50: percentile_ms(&latencies, 0.50),
            p95: percentile_ms(&latencies, 0.95),
            p99: percentile_ms(&latencies, 0.99),
            max: latencies.max() as f64 / 1000.0,
        },
        last_subscriber_ms_p99: percentile_ms(&last, 0.99),
        client_cpu_seconds: cpu,
        server_rss_bytes,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(worker) = args.worker.clone() {
        let (index, count) = worker.split_once('/').context("--worker i/n")?;
        return run_worker(&args, index.parse()?, count.parse()?);
    }
    let summary = run(args.clone())?;
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, text + "\n").with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_read_from_the_text_of_a_next_frame() {
        let frame = r#"{"type":"next","id":"1","payload":{"data":{"messages":{"id":"x","text":"bench 1000000"}}}}"#;
        assert_eq!(latency_of(frame, 3_500_000), Some((1_000_000, 2500)));
        assert_eq!(latency_of(r#"{"type":"next","payload":{"data":{"messages":{"text":"hi"}}}}"#, 1), None);
    }

    #[test]
    fn source_ips_are_a_loopback_range() {
        assert_eq!(source_ips(Some("127.0.0.2-127.0.0.4")).unwrap().len(), 3);
        assert!(source_ips(Some("10.0.0.1-10.0.0.2")).is_err());
        assert_eq!(source_ips(None).unwrap(), vec![Ipv4Addr::LOCALHOST]);
    }
}
