//! A TCP proxy the test controls, between a role and the broker or its translation provider: it
//! forwards, goes quiet (holds the connections and passes nothing, as a network that drops packets,
//! or a provider that hangs), cuts every connection and refuses new ones (as a network that resets
//! them), or answers every new connection with an HTTP 500 (a provider that fails).

use std::sync::Arc;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Quiet,
    Cut,
    /// New connections get `500 Internal Server Error`; open ones are cut.
    Http500,
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    /// Connections forwarded right now.
    open: Arc<std::sync::atomic::AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.mode.send_replace(Mode::Cut);
    }
}

/// Waits while the network is quiet; false once it cuts.
async fn forwarding(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Forward => return true,
            Mode::Cut | Mode::Http500 => return false,
            Mode::Quiet => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Copies `from` to `to` while the mode allows; ends when either side closes or the mode cuts.
/// Nothing is read while the network is quiet, so nothing is acknowledged either.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if !forwarding(&mut mode).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = mode.changed() => {
                if changed.is_err() { return; }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !forwarding(&mut mode).await || to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    /// Listens on a free port and forwards to `upstream` (host:port).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(watch::channel(Mode::Forward).0);
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accept = tokio::spawn({
            let (mode, open) = (mode.clone(), open.clone());
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else { return };
                    if *mode.borrow() == Mode::Http500 {
                        tokio::spawn(async move {
                            let mut request = [0u8; 4096];
                            let _ = client.read(&mut request).await;
                            let answer = "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\nconnection: close\r\n\r\nfault";
                            let _ = client.write_all(answer.as_bytes()).await;
                        });
                        continue;
                    }
                    if *mode.borrow() != Mode::Forward {
                        // Cut refuses at once; quiet holds it unanswered.
                        if *mode.borrow() == Mode::Quiet {
                            let mut held = mode.subscribe();
                            tokio::spawn(async move {
                                let _client = client;
                                while held.changed().await.is_ok() && *held.borrow() == Mode::Quiet {}
                            });
                        }
                        continue;
                    }
                    let upstream = upstream.clone();
                    let (a, b) = (mode.subscribe(), mode.subscribe());
                    let open = open.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&upstream).await else { return };
                        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = (client.set_nodelay(true), server.set_nodelay(true));
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        // When one direction ends, so does the other (dropping both halves closes both sockets).
                        tokio::select! {
                            _ = pump(client_read, server_write, a) => {}
                            _ = pump(server_read, client_write, b) => {}
                        }
                        open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    });
                }
            }
        });
        Self { port, mode, open, accept }
    }

    /// How many connections pass through the proxy right now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// A proxy in front of the server `url` names (`scheme://[user:pass@]host:port[/…]`), and `url`
    /// through it.
    pub async fn in_front_of(url: &str) -> (Self, String) {
        let address = host_and_port(url);
        let proxy = Self::start(address.to_owned()).await;
        let through = url.replacen(address, &format!("127.0.0.1:{}", proxy.port), 1);
        (proxy, through)
    }
}

/// The `host:port` of a URL that names both.
fn host_and_port(url: &str) -> &str {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = authority.split(['/', '?']).next().unwrap_or(authority);
    let address = authority.rsplit_once('@').map_or(authority, |(_, address)| address);
    assert!(address.contains(':'), "{url} names no port");
    address
}
