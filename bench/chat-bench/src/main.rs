//! chat-bench: opens N graphql-transport-ws subscribers over K chats (and several gateways, source
//! addresses and worker processes), sends R messages per second per chat with `sendMessage`, and
//! measures every delivery's end-to-end latency, from just before the mutation is sent to the moment
//! the subscriber reads the frame.
//!
//! - Deliveries are counted in the sending window only; what arrives after it is the drain, reported
//!   apart, so a server that builds a backlog cannot score as if it kept up.
//! - `--search` finds the *sustained rate*: the highest rate at which every delivery arrives (reach
//!   1.0) and p99 stays under `--p99-limit-ms`, by doubling, then bisecting, with the subscribers
//!   connected throughout.
//! - The subscribers live in worker processes (by default at least two) that read raw bytes and scan
//!   for the benchmark's marks; `--probe N` adds N subscribers in a separate process, each on its own
//!   thread with blocking reads, whose latencies show whether the workers add any of their own.
//! - Messages go out over `--sender-connections` kept-alive connections opened before each window,
//!   so no delivery's latency includes a handshake made for its message; each send's round trip
//!   (request to response) is reported apart as `send_ms`.

mod tally;
mod wire;
mod worker;

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tally::PhaseReport;
use worker::Target;

/// A process may hold at most 20,000 open files here; leave room for the rest.
const SUBSCRIBERS_PER_WORKER: usize = 18_000;
const SEND: &str = "mutation($chatId: ID!, $text: String!) { sendMessage(chatId: $chatId, text: $text) { id } }";

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
    /// Messages per second per chat (with --search, the first rate tried).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of sending (per step, with --search).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Worker processes; by default two, or more to stay under the per-process file limit.
    #[arg(long)]
    workers: Option<usize>,
    /// Loopback source addresses to connect from, e.g. 127.0.0.2-127.0.0.20.
    #[arg(long)]
    source_ips: Option<String>,
    /// Server process ids whose RSS and CPU time are reported.
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
    /// Extra subscribers in an independent probe process, one thread each.
    #[arg(long, default_value_t = 0)]
    probe: usize,
    /// Find the sustained rate instead of measuring one rate.
    #[arg(long)]
    search: bool,
    /// Most steps of the search.
    #[arg(long, default_value_t = 8)]
    search_steps: usize,
    /// The p99 a sustained rate must stay under, in ms.
    #[arg(long, default_value_t = 250.0)]
    p99_limit_ms: f64,
    /// Sending connections opened before each window and kept alive, as many users' browsers keep
    /// theirs: a message then never waits for a connection set up for it, whose handshake would be
    /// timed as its deliveries' latency. More are opened only while more messages are in flight (on
    /// RabbitMQ at 1,000 messages/s, each waiting ~200 ms for its confirm, about 200 are).
    #[arg(long, default_value_t = 256)]
    sender_connections: usize,
    #[arg(long, hide = true)]
    worker: Option<String>,
    #[arg(long, hide = true)]
    probe_worker: bool,
}

pub fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64
}

/// A process's CPU time (user + system) from /proc.
pub fn cpu_seconds(pid: &str) -> f64 {
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

fn chat_name(chat: usize) -> String {
    format!("bench-{chat}")
}

/// The subscribers of worker `index` of `count`.
fn worker_targets(args: &Args, index: usize, count: usize) -> anyhow::Result<Vec<Target>> {
    let ips = source_ips(args.source_ips.as_deref())?;
    (0..args.subscribers)
        .filter(|i| i % count == index)
        .map(|i| Target::parse(&args.url[i % args.url.len()], ips[i % ips.len()], chat_name(i % args.chats)))
        .collect()
}

fn probe_targets(args: &Args) -> anyhow::Result<Vec<Target>> {
    (0..args.probe)
        .map(|i| Target::parse(&args.url[i % args.url.len()], Ipv4Addr::LOCALHOST, chat_name(i % args.chats)))
        .collect()
}

/// A worker or probe process, spoken to over its stdin and stdout.
struct Child {
    process: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    /// Ready subscribers by chat.
    ready: BTreeMap<String, u64>,
    cpu_before: f64,
}

impl Child {
    fn spawn(extra: &[String]) -> anyhow::Result<Self> {
        // Children get the same arguments, without `--workers N`, plus their role.
        let mut inherited = Vec::new();
        let mut given = std::env::args().skip(1);
        while let Some(arg) = given.next() {
            if arg == "--workers" {
                given.next();
            } else if !arg.starts_with("--workers=") {
                inherited.push(arg);
            }
        }
        let mut process = Command::new(std::env::current_exe()?)
            .args(&inherited)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to spawn a worker")?;
        let lines = BufReader::new(process.stdout.take().expect("piped")).lines();
        let mut child = Self { process, lines, ready: BTreeMap::new(), cpu_before: 0.0 };
        let hello = child.next_json()?;
        child.ready = serde_json::from_value(hello["ready"].clone())?;
        Ok(child)
    }

    fn next_json(&mut self) -> anyhow::Result<serde_json::Value> {
        let line = self.lines.next().context("worker exited early")??;
        serde_json::from_str(&line).with_context(|| format!("worker said: {line}"))
    }

    fn report(&mut self, phase: u32, window_end: u64) -> anyhow::Result<PhaseReport> {
        writeln!(self.process.stdin.as_mut().expect("piped"), "report {phase} {window_end}")?;
        let mut report: PhaseReport = serde_json::from_value(self.next_json()?)?;
        let total = report.cpu_seconds;
        report.cpu_seconds -= self.cpu_before;
        self.cpu_before = total;
        Ok(report)
    }

    fn stop(mut self) {
        let _ = writeln!(self.process.stdin.as_mut().expect("piped"), "stop");
        let _ = self.process.wait();
    }
}

/// Opens `count` sending connections at once, each with one `{ __typename }` query (a query, so
/// that opening them sends no message through the server), so they wait in `client`'s pool for the
/// window.
async fn open_senders(client: &reqwest::Client, url: &str, count: usize) -> usize {
    let body = json!({"query": "{ __typename }"});
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
        opening.spawn(async move {
            let response = client.post(&url).json(&body).send().await.ok()?;
            response.json::<serde_json::Value>().await.ok()
        });
    }
    opening.join_all().await.iter().filter(|answer| answer.is_some()).count()
}

/// Sends `rate` messages per second to every chat for `duration`; returns the confirmed sends per
/// chat, the wall-clock end of the sending window (ns), and how long each confirmed send took, from
/// the request to its response (µs).
async fn send_messages(
    args: &Args,
    client: &reqwest::Client,
    phase: u32,
    rate: f64,
) -> anyhow::Result<(Vec<u64>, u64, Histogram<u64>)> {
    let period = Duration::from_secs_f64(1.0 / rate);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    for chat in 0..args.chats {
        let (client, url) = (client.clone(), args.url[0].clone());
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // One value per confirmed send.
            let mut took = tally::histogram();
            let mut in_flight = tokio::task::JoinSet::new();
            let settle = |done: Result<Option<u64>, tokio::task::JoinError>, took: &mut Histogram<u64>| {
                if let Ok(Some(micros)) = done {
                    took.saturating_record(micros.max(1));
                }
            };
            while tokio::time::Instant::now() < deadline {
                ticks.tick().await;
                let body =
                    json!({"query": SEND, "variables": {"chatId": chat_name(chat), "text": wire::text(phase, now_nanos())}});
                let (client, url) = (client.clone(), url.clone());
                in_flight.spawn(async move {
                    let started = Instant::now();
                    let response = client.post(&url).json(&body).send().await.ok()?;
                    let value: serde_json::Value = response.json().await.ok()?;
                    value["data"]["sendMessage"]["id"].is_string().then(|| started.elapsed().as_micros() as u64)
                });
                while let Some(done) = in_flight.try_join_next() {
                    settle(done, &mut took);
                }
            }
            let window_end = now_nanos();
            while let Some(done) = in_flight.join_next().await {
                settle(done, &mut took);
            }
            (took.len(), window_end, took)
        }));
    }
    let mut sent = Vec::new();
    let mut window_end = 0;
    let mut took = tally::histogram();
    for task in tasks {
        let (n, end, chat_took) = task.await?;
        sent.push(n);
        window_end = window_end.max(end);
        took.add(&chat_took)?;
    }
    Ok((sent, window_end, took))
}

#[derive(Serialize, Debug, Clone)]
struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let at = |q| if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 };
        Self { p50: at(0.50), p95: at(0.95), p99: at(0.99), max: h.max() as f64 / 1000.0 }
    }
}

/// Deliveries and latencies of a group of subscribers.
#[derive(Serialize, Debug, Clone)]
struct Observed {
    connected: u64,
    expected: u64,
    received: u64,
    reach: f64,
    latency_ms: Percentiles,
}

/// One measured rate.
#[derive(Serialize, Debug, Clone)]
struct Row {
    /// Messages per second per chat.
    rate: f64,
    connected: u64,
    sent: u64,
    /// Deliveries received within the sending window, per second of it.
    deliveries_per_sec: f64,
    /// Deliveries that arrived after the window closed.
    drained: u64,
    reach: f64,
    latency_ms: Percentiles,
    /// From each `sendMessage` request to its response, for the confirmed sends.
    send_ms: Percentiles,
    last_subscriber_ms_p99: f64,
    client_cpu_seconds: f64,
    server_cpu_seconds: f64,
    server_rss_bytes: u64,
    /// What the probe's subscribers saw, when there is a probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    probe: Option<Observed>,
}

impl Row {
    fn passes(&self, args: &Args) -> bool {
        self.reach >= 1.0 && self.latency_ms.p99 < args.p99_limit_ms
    }
}

fn merge(reports: &[PhaseReport]) -> anyhow::Result<(Histogram<u64>, HashMap<u64, u64>)> {
    let mut latencies = tally::histogram();
    let mut slowest: HashMap<u64, u64> = HashMap::new();
    for report in reports {
        for (value, count) in &report.latencies {
            latencies.record_n(*value, *count)?;
        }
        for (sent, micros) in &report.slowest {
            let entry = slowest.entry(*sent).or_default();
            *entry = (*entry).max(*micros);
        }
        for error in &report.errors {
            eprintln!("chat-bench worker: {error}");
        }
    }
    Ok((latencies, slowest))
}

fn expected(sent: &[u64], ready: &BTreeMap<String, u64>) -> u64 {
    sent.iter().enumerate().map(|(chat, n)| n * ready.get(&chat_name(chat)).copied().unwrap_or(0)).sum()
}

fn server_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|pid| cpu_seconds(&pid.to_string())).sum()
}

/// Sends one phase at `rate` and gathers what every process saw.
fn measure(
    args: &Args,
    runtime: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    workers: &mut [Child],
    probe: Option<&mut Child>,
    phase: u32,
    rate: f64,
) -> anyhow::Result<Row> {
    // Before the clocks start: opening the connections is neither sending nor the server's work for it.
    let opened = runtime.block_on(open_senders(client, &args.url[0], args.sender_connections));
    if opened < args.sender_connections {
        eprintln!("chat-bench: only {opened} of {} sending connections answered", args.sender_connections);
    }
    let server_before = server_cpu(&args.server_pid);
    let started = Instant::now();
    let (sent, window_end, took) = runtime.block_on(send_messages(args, client, phase, rate))?;
    let window = started.elapsed().min(Duration::from_secs(args.duration)).max(Duration::from_millis(1));
    std::thread::sleep(Duration::from_secs(args.drain));
    let server_cpu_seconds = server_cpu(&args.server_pid) - server_before;
    let mut ready = BTreeMap::<String, u64>::new();
    let mut reports = Vec::new();
    for worker in workers.iter_mut() {
        for (chat, n) in &worker.ready {
            *ready.entry(chat.clone()).or_default() += n;
        }
        reports.push(worker.report(phase, window_end)?);
    }
    let (latencies, slowest) = merge(&reports)?;
    let mut last = tally::histogram();
    for micros in slowest.values() {
        last.record((*micros).max(1))?;
    }
    let received: u64 = reports.iter().map(|r| r.received).sum();
    let in_window: u64 = reports.iter().map(|r| r.in_window).sum();
    let expected_total = expected(&sent, &ready);
    let probe = match probe {
        Some(probe) => {
            let report = probe.report(phase, window_end)?;
            let (latencies, _) = merge(std::slice::from_ref(&report))?;
            let expected = expected(&sent, &probe.ready);
            Some(Observed {
                connected: probe.ready.values().sum(),
                expected,
                received: report.received,
                reach: if expected == 0 { 0.0 } else { report.received as f64 / expected as f64 },
                latency_ms: Percentiles::of(&latencies),
            })
        }
        None => None,
    };
    Ok(Row {
        rate,
        connected: ready.values().sum(),
        sent: sent.iter().sum(),
        deliveries_per_sec: in_window as f64 / window.as_secs_f64(),
        drained: received - in_window,
        reach: if expected_total == 0 { 0.0 } else { received as f64 / expected_total as f64 },
        latency_ms: Percentiles::of(&latencies),
        send_ms: Percentiles::of(&took),
        last_subscriber_ms_p99: Percentiles::of(&last).p99,
        client_cpu_seconds: reports.iter().map(|r| r.cpu_seconds).sum(),
        server_cpu_seconds,
        server_rss_bytes: args.server_pid.iter().map(|pid| rss_bytes(*pid)).sum(),
        probe,
    })
}

/// The next rate of the search: doubling while every step passes, then bisecting.
fn next_rate(rate: f64, passed: bool, best: Option<f64>, failed: Option<f64>) -> Option<f64> {
    let next = match (passed, best, failed) {
        (true, _, None) => rate * 2.0,
        (true, _, Some(failed)) => (rate + failed) / 2.0,
        (false, Some(best), _) => (best + rate) / 2.0,
        (false, None, _) => rate / 2.0,
    };
    // Within 10% of the bound, or below one message a second, the search has said what it can.
    let settled = match (best, failed) {
        (Some(best), Some(failed)) => failed / best < 1.1,
        (None, Some(_)) => next < 1.0,
        _ => false,
    };
    (!settled).then_some(next)
}

fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
    if args.subscribers == 0 || args.chats == 0 || args.rate <= 0.0 {
        bail!("--subscribers, --chats and --rate must be positive");
    }
    let count = args.workers.unwrap_or(2).max(args.subscribers.div_ceil(SUBSCRIBERS_PER_WORKER)).max(1);
    let mut workers = Vec::new();
    for i in 0..count {
        workers.push(Child::spawn(&["--worker".into(), format!("{i}/{count}")])?);
    }
    let mut probe = if args.probe > 0 { Some(Child::spawn(&["--probe-worker".into()])?) } else { None };
    let connected: u64 = workers.iter().map(|w| w.ready.values().sum::<u64>()).sum();
    eprintln!("chat-bench: {connected} of {} subscribers connected over {count} worker(s)", args.subscribers);
    // Let the servers finish binding the chats before the clock starts.
    std::thread::sleep(Duration::from_secs(1));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    // One pool of sending connections for every step, keeping as many idle as are opened.
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.sender_connections).build()?;
    let result = if args.search {
        let (mut rate, mut best, mut failed) = (args.rate, None, None);
        let mut steps = Vec::new();
        for phase in 0..args.search_steps as u32 {
            let row = measure(args, &runtime, &client, &mut workers, probe.as_mut(), phase, rate)?;
            let passed = row.passes(args);
            eprintln!(
                "chat-bench: {rate:.1}/s per chat: reach {:.4}, p99 {:.1} ms: {}",
                row.reach,
                row.latency_ms.p99,
                if passed { "sustained" } else { "not sustained" }
            );
            steps.push(row);
            if passed {
                best = Some(best.map_or(rate, |b: f64| b.max(rate)));
            } else {
                failed = Some(failed.map_or(rate, |f: f64| f.min(rate)));
                // A backlog left by a failed step must not count against the next one.
                std::thread::sleep(Duration::from_secs(args.drain * 2));
            }
            match next_rate(rate, passed, best, failed) {
                Some(next) => rate = next,
                None => break,
            }
        }
        json!({"sustained_rate": best.unwrap_or(0.0), "p99_limit_ms": args.p99_limit_ms, "steps": steps})
    } else {
        serde_json::to_value(measure(args, &runtime, &client, &mut workers, probe.as_mut(), 0, args.rate)?)?
    };
    for worker in workers {
        worker.stop();
    }
    if let Some(probe) = probe {
        probe.stop();
    }
    Ok(result)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(worker) = args.worker.clone() {
        let (index, count) = worker.split_once('/').context("--worker i/n")?;
        return worker::run_worker(worker_targets(&args, index.parse()?, count.parse()?)?, args.connect_concurrency);
    }
    if args.probe_worker {
        return worker::run_probe(probe_targets(&args)?);
    }
    let summary = run(&args)?;
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
    fn source_ips_are_a_loopback_range() {
        assert_eq!(source_ips(Some("127.0.0.2-127.0.0.4")).unwrap().len(), 3);
        assert!(source_ips(Some("10.0.0.1-10.0.0.2")).is_err());
        assert_eq!(source_ips(None).unwrap(), vec![Ipv4Addr::LOCALHOST]);
    }

    #[test]
    fn the_search_doubles_while_it_passes_then_bisects() {
        assert_eq!(next_rate(100.0, true, Some(100.0), None), Some(200.0));
        assert_eq!(next_rate(200.0, false, Some(100.0), Some(200.0)), Some(150.0));
        assert_eq!(next_rate(150.0, true, Some(150.0), Some(200.0)), Some(175.0));
        assert_eq!(next_rate(190.0, false, Some(180.0), Some(190.0)), None, "within 10%");
        assert_eq!(next_rate(100.0, false, None, Some(100.0)), Some(50.0));
    }
}
