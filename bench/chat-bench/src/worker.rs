//! The subscribers' side, in two forms that share the wire code:
//!
//! - a *worker* holds its share of the subscribers on one single-threaded runtime, reading raw bytes
//!   and scanning them for marks, so that a worker costs little more than the kernel's reads;
//! - the *probe* holds a few subscribers, each on its own thread with blocking reads: an independent
//!   observer whose latencies show whether the workers add any of their own.
//!
//! Both report per phase on a `report <phase> <window end ns>` line on stdin; `stop` ends them.

use std::{
    cell::RefCell,
    io::{BufRead, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    rc::Rc,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    now_nanos,
    tally::Tallies,
    wire::{self, Found, Scanner},
};

const SUBSCRIBE: &str = "subscription($chatId: ID!) { messages(chatId: $chatId) { id text } }";

/// Where one subscriber connects.
#[derive(Clone, Debug)]
pub struct Target {
    pub server: SocketAddr,
    pub host: String,
    pub path: String,
    pub source: Ipv4Addr,
    pub chat: String,
}

impl Target {
    pub fn parse(url: &str, source: Ipv4Addr, chat: String) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("http://").context("only http:// URLs")?;
        let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
        let server = std::net::ToSocketAddrs::to_socket_addrs(host)?.next().context("no address")?;
        Ok(Self { server, host: host.to_owned(), path, source, chat })
    }
}

/// A line from the parent.
enum Command {
    Report { phase: u32, window_end: u64 },
    Stop,
}

fn parse_command(line: &str) -> Option<Command> {
    let mut words = line.split_whitespace();
    match words.next()? {
        "report" => {
            Some(Command::Report { phase: words.next()?.parse().ok()?, window_end: words.next()?.parse().ok()? })
        }
        "stop" => Some(Command::Stop),
        _ => None,
    }
}

fn say(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(value)?)?;
    out.flush()?;
    Ok(())
}

/// Opens one subscription on `stream`: handshake, `connection_init`, the ack, `subscribe`.
async fn open(stream: &mut tokio::net::TcpStream, target: &Target) -> anyhow::Result<()> {
    stream.write_all(wire::upgrade_request(&target.host, &target.path).as_bytes()).await?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    let rest = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("closed during the handshake");
        }
        response.extend_from_slice(&buf[..n]);
        if let Some(end) = wire::handshake_done(&response).map_err(|answer| anyhow::anyhow!("refused: {answer}"))? {
            break response.split_off(end);
        }
    };
    stream.write_all(&wire::init_frame()).await?;
    let mut scanner = Scanner::default();
    let mut found = Found::default();
    scanner.scan(&rest, &mut found);
    while !found.acked {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("closed before connection_ack");
        }
        scanner.scan(&buf[..n], &mut found);
    }
    stream.write_all(&wire::subscribe_frame(SUBSCRIBE, &target.chat)).await?;
    Ok(())
}

async fn connect(target: &Target) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(target.source), 0))?;
    let mut stream = socket.connect(target.server).await?;
    stream.set_nodelay(true)?;
    open(&mut stream, target).await?;
    Ok(stream)
}

/// Reads marks until the connection ends, recording each.
async fn receive(mut stream: tokio::net::TcpStream, tallies: Rc<RefCell<Tallies>>) {
    let mut buf = vec![0u8; 4096];
    let mut scanner = Scanner::default();
    let mut found = Found::default();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = now_nanos();
        scanner.scan(&buf[..n], &mut found);
        let mut tallies = tallies.borrow_mut();
        for (phase, sent) in found.marks.drain(..) {
            tallies.record(phase, sent, now);
        }
        if found.ended {
            tallies.errors.push("the server ended a subscription".into());
            break;
        }
    }
}

/// A worker process: subscribes `targets` (at most `concurrency` connecting at once), says how many
/// are ready, then tallies and reports until `stop`.
pub fn run_worker(targets: Vec<Target>, concurrency: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let tallies = Rc::new(RefCell::new(Tallies::default()));
        let limit = Rc::new(tokio::sync::Semaphore::new(concurrency));
        let mut pending = Vec::new();
        for target in targets {
            let limit = limit.clone();
            pending.push(tokio::task::spawn_local(async move {
                let _permit = limit.acquire().await;
                let connected = tokio::time::timeout(Duration::from_secs(30), connect(&target)).await;
                (target.chat, connected.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out connecting"))))
            }));
        }
        let mut ready: std::collections::BTreeMap<String, u64> = Default::default();
        for task in pending {
            match task.await? {
                (chat, Ok(stream)) => {
                    *ready.entry(chat).or_default() += 1;
                    tokio::task::spawn_local(receive(stream, tallies.clone()));
                }
                (_, Err(err)) => tallies.borrow_mut().errors.push(format!("subscribe: {err:#}")),
            }
        }
        say(&serde_json::json!({ "ready": ready }))?;
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(line) = lines.recv().await {
            match parse_command(&line) {
                Some(Command::Report { phase, window_end }) => {
                    say(&tallies.borrow_mut().take_report(phase, window_end))?;
                }
                Some(Command::Stop) | None => break,
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    // The subscribers' sockets close with the process.
    std::process::exit(0)
}

/// One probe subscriber on its own thread, with blocking reads.
fn probe_subscriber(target: &Target) -> anyhow::Result<std::net::TcpStream> {
    let mut stream = std::net::TcpStream::connect_timeout(&target.server, Duration::from_secs(30))?;
    stream.set_nodelay(true)?;
    stream.write_all(wire::upgrade_request(&target.host, &target.path).as_bytes())?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let rest = loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("closed during the handshake");
        }
        response.extend_from_slice(&buf[..n]);
        if let Some(end) = wire::handshake_done(&response).map_err(|answer| anyhow::anyhow!("refused: {answer}"))? {
            break response.split_off(end);
        }
    };
    stream.write_all(&wire::init_frame())?;
    let mut scanner = Scanner::default();
    let mut found = Found::default();
    scanner.scan(&rest, &mut found);
    while !found.acked {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("closed before connection_ack");
        }
        scanner.scan(&buf[..n], &mut found);
    }
    stream.write_all(&wire::subscribe_frame(SUBSCRIBE, &target.chat))?;
    Ok(stream)
}

/// The probe process: every subscriber on its own thread.
pub fn run_probe(targets: Vec<Target>) -> anyhow::Result<()> {
    let tallies = Arc::new(Mutex::new(Tallies::default()));
    let mut ready: std::collections::BTreeMap<String, u64> = Default::default();
    for target in targets {
        match probe_subscriber(&target) {
            Ok(mut stream) => {
                *ready.entry(target.chat.clone()).or_default() += 1;
                let tallies = tallies.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut scanner = Scanner::default();
                    let mut found = Found::default();
                    while let Ok(n @ 1..) = stream.read(&mut buf) {
                        let now = now_nanos();
                        scanner.scan(&buf[..n], &mut found);
                        let mut tallies = tallies.lock().expect("tallies");
                        for (phase, sent) in found.marks.drain(..) {
                            tallies.record(phase, sent, now);
                        }
                    }
                });
            }
            Err(err) => tallies.lock().expect("tallies").errors.push(format!("probe: {err:#}")),
        }
    }
    say(&serde_json::json!({ "ready": ready }))?;
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        match parse_command(&line) {
            Some(Command::Report { phase, window_end }) => {
                say(&tallies.lock().expect("tallies").take_report(phase, window_end))?;
            }
            Some(Command::Stop) | None => break,
        }
    }
    std::process::exit(0)
}
