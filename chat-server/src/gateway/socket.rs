//! The gateway's WebSocket transport: one connection loop for graphql-transport-ws, legacy graphql-ws
//! and — when the client names no subprotocol — the seed's plain frames (`{"query","variables"}` in,
//! `{"data":...}` out).
//!
//! The loop owns its socket and wakes for three things: a frame from the client, its [`Signal`]
//! (new results in a group's ring, or frames in its [`Outbox`]), and shutdown. Each wake-up writes
//! everything waiting in one flush. Plain subscriptions join a shared group (see
//! [`groups`](super::groups)); everything else (queries, mutations, subscriptions with extensions) is
//! executed for the connection alone, its results queued in the outbox. The connection counts its
//! subscriptions against `--max-subscriptions-per-connection` itself, so the schema knows nothing of
//! sockets; it speaks the two GraphQL protocols itself, with their close codes.

use std::{
    collections::HashMap,
    future::{poll_fn, Future},
    ops::ControlFlow,
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::Poll,
    time::Duration,
};

use async_graphql::{http::ClientMessage, ErrorExtensions, Request};
use axum::{
    extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade},
    response::Response,
};
use futures_util::{SinkExt, StreamExt};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{
        limits::{ConnectionGuard, Limits, SubscribeLimiter, RATE_LIMITED_CLOSE},
        token_of_payload, Auth, AuthError, Caller, Identity,
    },
    metrics::{metrics, Counted, Protocol},
};

use super::{
    framing::{Framing, OperationId},
    groups::{refusal, Membership, Read, Shareable, SharedSubscriptions, Sharing},
    outbox::{Outbox, Outgoing, Signal},
    schema::{ChatSchema, GroupFeed, ReplayOnly},
};

/// Close code for a server going away (RFC 6455).
const GOING_AWAY: u16 = 1001;
/// Protocol error (RFC 6455): the legacy protocol's answer to a message it cannot read.
const PROTOCOL_ERROR: u16 = 1002;
/// graphql-transport-ws: a message that is not one of the protocol's.
const BAD_REQUEST: u16 = 4400;
/// graphql-transport-ws: an operation before the connection was acknowledged.
const UNAUTHORIZED: u16 = 4401;
/// graphql-ws: the client did not send `connection_init` in time.
const INIT_TIMEOUT: u16 = 4408;
/// graphql-transport-ws: a subscribe reused the id of a running operation.
const DUPLICATE_ID: u16 = 4409;
/// graphql-transport-ws: a second `connection_init`.
const TOO_MANY_INITIALISATIONS: u16 = 4429;
/// Policy violation (RFC 6455): the client read its frames too slowly.
const SLOW_CONSUMER: u16 = 1008;
/// How long a close frame may wait behind the frames already written.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Bytes read from a socket at a time. tungstenite's default, 128 KiB, dominated an idle
/// subscription's memory; client frames here are a few hundred bytes, and larger ones still fit.
const SOCKET_READ_BUFFER: usize = 2 * 1024;
/// Bytes of frames gathered before a write (tungstenite's default is 128 KiB, kept per socket after a burst).
const SOCKET_WRITE_BUFFER: usize = 16 * 1024;

/// Limits of the WebSocket transport.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    pub max_subscriptions_per_connection: usize,
    pub connection_init_timeout: Duration,
    pub max_message_bytes: usize,
    /// Frames that may wait for one connection (in its outbox, or behind in a group's ring) before it
    /// is closed as a slow consumer.
    pub send_queue_frames: usize,
}

/// What every socket of the gateway shares.
#[derive(Clone)]
pub struct Sockets {
    pub schema: ChatSchema,
    /// Subscriptions executed once per distinct operation.
    pub shared: Arc<SharedSubscriptions>,
    pub limits: SocketLimits,
    /// Who may connect; signed in with the first message (see [`SignIn`]).
    pub auth: Arc<Auth>,
    pub abuse: Arc<Limits>,
    pub shutdown: CancellationToken,
    /// Upgraded sockets outlive axum's graceful shutdown; this lets the server wait for their close frames.
    pub tracker: TaskTracker,
    /// Set once `shutdown` fires: a connection checks this on each wake-up instead of polling the token.
    pub closing: Arc<AtomicBool>,
}

impl Sockets {
    /// Raises [`Sockets::closing`] when `shutdown` fires.
    pub fn watch_shutdown(&self) {
        let (shutdown, closing) = (self.shutdown.clone(), self.closing.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            closing.store(true, Ordering::Release);
        });
    }
}

/// How many subscriptions one WebSocket connection may hold at once.
#[derive(Debug, Clone)]
pub struct SubscriptionBudget {
    active: Arc<AtomicUsize>,
    max: usize,
}

/// Returns one unit of a [`SubscriptionBudget`] when dropped.
pub struct BudgetPermit(Arc<AtomicUsize>);

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SubscriptionBudget {
    pub fn new(max: usize) -> Self {
        Self { active: Arc::default(), max }
    }

    pub fn acquire(&self) -> async_graphql::Result<BudgetPermit> {
        let taken = self.active.fetch_add(1, Ordering::AcqRel);
        if taken >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return Err(async_graphql::Error::new(format!(
                "too many subscriptions on this connection (at most {}); complete one first",
                self.max
            ))
            .extend_with(|_, e| e.set("code", "LIMIT_EXCEEDED")));
        }
        Ok(BudgetPermit(self.active.clone()))
    }
}

/// The wire protocol a socket speaks, from its negotiated subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// graphql-transport-ws (graphql-ws, Apollo Client's `GraphQLWsLink`).
    TransportWs,
    /// Legacy graphql-ws (subscriptions-transport-ws).
    LegacyWs,
    /// No subprotocol: the seed's plain frames.
    Plain,
}

impl Wire {
    fn framing(self) -> Framing {
        match self {
            Self::TransportWs => Framing::Next,
            Self::LegacyWs => Framing::Data,
            Self::Plain => Framing::Plain,
        }
    }
}

/// Upgrades a `GET /graphql` from `ip` to a WebSocket speaking the subprotocol the client asked for;
/// `token` is the upgrade request's bearer token, if it sent one.
pub fn upgrade(state: Sockets, upgrade: WebSocketUpgrade, ip: std::net::IpAddr, token: Option<String>) -> Response {
    let upgrade = upgrade
        .protocols(["graphql-transport-ws", "graphql-ws"])
        .max_message_size(state.limits.max_message_bytes)
        .max_frame_size(state.limits.max_message_bytes)
        .read_buffer_size(SOCKET_READ_BUFFER)
        // Frames are written once this much is buffered (and on every flush); the buffer keeps its size.
        .write_buffer_size(SOCKET_WRITE_BUFFER);
    let wire = match upgrade.selected_protocol().and_then(|p| p.to_str().ok()) {
        Some("graphql-transport-ws") => Wire::TransportWs,
        Some("graphql-ws") => Wire::LegacyWs,
        _ => Wire::Plain,
    };
    let protocol = match wire {
        Wire::TransportWs => "graphql-transport-ws",
        Wire::LegacyWs => "graphql-ws",
        Wire::Plain => "plain",
    };
    let place = state.abuse.connect(ip);
    upgrade.on_upgrade(move |mut socket| {
        let tracker = state.tracker.clone();
        let open = Counted::new(&metrics().connections.get_or_create(&Protocol { protocol }));
        tracker.track_future(async move {
            match place {
                Some(place) => serve(socket, wire, state, SignIn { ip, token, _place: place }).await,
                None => {
                    let reason = format!(
                        "too many connections from your address (at most {})",
                        state.abuse.settings.max_connections_per_ip
                    );
                    let _ =
                        tokio::time::timeout(CLOSE_GRACE, socket.send(close_frame(RATE_LIMITED_CLOSE, &reason))).await;
                }
            }
            drop(open);
        })
    })
}

fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

type Flow = ControlFlow<()>;

/// Stops its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An operation running on a connection.
enum Running {
    /// A member of a shared group (and, while it resumes, the replay of its history).
    Shared { membership: Membership, _permit: BudgetPermit, _replay: Option<AbortOnDrop> },
    /// Executed for this connection alone; its task queues the results.
    Alone { _task: AbortOnDrop },
}

struct Operation {
    id: OperationId,
    /// Tells this operation's outbox items from those of an earlier operation with the same id.
    serial: u64,
    running: Running,
    _counted: Counted,
}

/// What a socket signs in with: its address, its upgrade request's token, and its place under the
/// per-address limit (held while it is open).
struct SignIn {
    ip: std::net::IpAddr,
    token: Option<String>,
    _place: ConnectionGuard,
}

/// One client connection.
struct Connection {
    wire: Wire,
    state: Sockets,
    signal: Arc<Signal>,
    outbox: Arc<Outbox>,
    operations: HashMap<Box<str>, Operation>,
    budget: SubscriptionBudget,
    initialised: bool,
    /// Who is connected: set at once without sign-in, else once the first message's token verifies.
    caller: Option<Caller>,
    /// How fast this connection may subscribe (signed-in connections only).
    subscribing: Option<SubscribeLimiter>,
    next_serial: u64,
    /// Frames gathered for the next write, kept to reuse its memory.
    pending: Vec<Utf8Bytes>,
}

impl Connection {
    fn new(wire: Wire, state: Sockets) -> Self {
        Self {
            wire,
            signal: Arc::default(),
            outbox: Arc::new(Outbox::new(state.limits.send_queue_frames)),
            operations: HashMap::new(),
            budget: SubscriptionBudget::new(state.limits.max_subscriptions_per_connection),
            // Plain frames have no handshake.
            initialised: wire == Wire::Plain,
            caller: None,
            subscribing: state.auth.enabled().then(|| state.abuse.subscriptions()),
            next_serial: 0,
            pending: Vec::new(),
            state,
        }
    }

    fn control(&self, frame: Utf8Bytes) {
        self.outbox.push_control(Outgoing::Frame(frame), &self.signal);
    }

    /// Queues the frames that refuse operation `id` before it ran: its error, then its end.
    fn refuse(&self, id: &OperationId, error: async_graphql::Error) {
        let framing = self.wire.framing();
        self.control(framing.result(id, &refusal(error)));
        if let Some(end) = framing.complete(id) {
            self.control(end);
        }
    }

    fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    /// Starts `request` as operation `id`: in its group when it can be shared, else on its own.
    fn start(&mut self, id: OperationId, request: Request) {
        let sharing = self.state.shared.check(request);
        if matches!(sharing, Sharing::Shared(_) | Sharing::Alone { subscription: true, .. }) {
            if let Some(Err(error)) = self.subscribing.as_ref().map(SubscribeLimiter::check) {
                return self.refuse(&id, error);
            }
        }
        match sharing {
            Sharing::Shared(operation) => self.start_shared(id, operation),
            Sharing::Alone { request, subscription } => {
                let request = match &self.caller {
                    Some(caller) => request.data(caller.clone()),
                    None => request,
                };
                self.start_alone(id, request, subscription)
            }
        }
    }

    /// Whether the client must still sign in before anything else.
    fn awaits_sign_in(&self) -> bool {
        self.caller.is_none()
    }

    fn signed_in(&mut self, ip: std::net::IpAddr, identity: Option<Arc<Identity>>) {
        self.caller = Some(Caller { identity, ip });
    }

    fn start_shared(&mut self, id: OperationId, operation: Shareable) {
        let permit = match self.budget.acquire() {
            Ok(permit) => permit,
            Err(error) => return self.refuse(&id, error),
        };
        let serial = self.serial();
        let framing = self.wire.framing();
        let (membership, replay) = self.state.shared.join(operation, id.clone(), framing, self.signal.clone());
        let replay = replay.map(|request| {
            let watching = membership.watching();
            let (schema, outbox, signal, id) =
                (self.state.schema.clone(), self.outbox.clone(), self.signal.clone(), id.clone());
            AbortOnDrop(tokio::spawn(async move {
                // Read the history only once the group's execution watches the chat: whatever the
                // history then lacks reaches the ring.
                watching.watching().await;
                let feed = Arc::new(GroupFeed::default());
                let stream = schema.execute_stream(request.data(ReplayOnly(feed.clone())));
                futures_util::pin_mut!(stream);
                while let Some(response) = stream.next().await {
                    let failed = response.is_err();
                    let payload: Utf8Bytes = serde_json::to_string(&response).expect("a response encodes").into();
                    let frame = framing.result(&id, &payload);
                    if !outbox.push_when_room(Outgoing::OpFrame { op: serial, frame }, &signal).await {
                        return;
                    }
                    if failed {
                        if let Some(end) = framing.complete(&id) {
                            outbox.push_control(Outgoing::OpFrame { op: serial, frame: end }, &signal);
                        }
                        outbox.push_control(Outgoing::Ended { op: serial }, &signal);
                        return;
                    }
                }
                outbox.push_control(Outgoing::Live { op: serial, seq: feed.seq() }, &signal);
            }))
        });
        let running = Running::Shared { membership, _permit: permit, _replay: replay };
        let counted = Counted::new(&metrics().subscriptions);
        self.operations.insert(id.raw.clone(), Operation { id, serial, running, _counted: counted });
    }

    fn start_alone(&mut self, id: OperationId, request: Request, subscription: bool) {
        let permit = match subscription {
            true => match self.budget.acquire() {
                Ok(permit) => Some(permit),
                Err(error) => return self.refuse(&id, error),
            },
            false => None,
        };
        let serial = self.serial();
        let framing = self.wire.framing();
        let stream = self.state.schema.execute_stream(request);
        let (outbox, signal, task_id) = (self.outbox.clone(), self.signal.clone(), id.clone());
        let task = AbortOnDrop(tokio::spawn(async move {
            let _permit = permit;
            futures_util::pin_mut!(stream);
            while let Some(response) = stream.next().await {
                let Ok(payload) = serde_json::to_string(&response) else { continue };
                let frame = framing.result(&task_id, &payload.into());
                if !outbox.push(Outgoing::OpFrame { op: serial, frame }, &signal) {
                    return;
                }
            }
            if let Some(end) = framing.complete(&task_id) {
                outbox.push_control(Outgoing::OpFrame { op: serial, frame: end }, &signal);
            }
            outbox.push_control(Outgoing::Ended { op: serial }, &signal);
        }));
        let (running, counted) = (Running::Alone { _task: task }, Counted::new(&metrics().subscriptions));
        self.operations.insert(id.raw.clone(), Operation { id, serial, running, _counted: counted });
    }

    /// The operation a queued item belongs to, if it still runs.
    fn operation_mut(&mut self, serial: u64) -> Option<&mut Operation> {
        self.operations.values_mut().find(|o| o.serial == serial)
    }

    /// Gathers every frame waiting (outbox first, then the groups' rings) into `pending`.
    fn gather(&mut self) -> Flow {
        for item in self.outbox.take() {
            match item {
                Outgoing::Frame(frame) => self.pending.push(frame),
                Outgoing::OpFrame { op, frame } => {
                    if self.operation_mut(op).is_some() {
                        self.pending.push(frame);
                    }
                }
                Outgoing::Live { op, seq } => {
                    if let Some(Operation { running: Running::Shared { membership, .. }, .. }) = self.operation_mut(op)
                    {
                        membership.go_live(seq);
                    }
                }
                Outgoing::Ended { op } => self.operations.retain(|_, o| o.serial != op),
            }
        }
        let mut ended = Vec::new();
        for operation in self.operations.values_mut() {
            let Running::Shared { membership, .. } = &mut operation.running else { continue };
            let pending = &mut self.pending;
            match membership.read(|frame| pending.push(frame)) {
                Read::UpToDate => {}
                Read::Lagged => return Flow::Break(()),
                Read::Ended => {
                    pending.extend(membership.framing.complete(&membership.id));
                    ended.push(operation.id.raw.clone());
                }
            }
        }
        for id in ended {
            self.operations.remove(&id);
        }
        if self.signal.has_overflowed() {
            return Flow::Break(());
        }
        Flow::Continue(())
    }

    fn slow_consumer_reason(&self) -> String {
        format!("slow consumer: more than {} frames waited to be sent", self.state.limits.send_queue_frames)
    }

    /// Handles one message of a GraphQL protocol.
    fn receive_graphql(&mut self, bytes: &[u8]) -> Result<(), (u16, String)> {
        let message = match ClientMessage::from_bytes(bytes) {
            Ok(message) => message,
            Err(err) => {
                let code = if self.wire == Wire::TransportWs { BAD_REQUEST } else { PROTOCOL_ERROR };
                return Err((code, format!("Invalid message received: {err}")));
            }
        };
        match message {
            ClientMessage::ConnectionInit { .. } if self.initialised => {
                return Err((TOO_MANY_INITIALISATIONS, "Too many initialisation requests".into()));
            }
            ClientMessage::ConnectionInit { .. } => {
                self.initialised = true;
                self.control(r#"{"type":"connection_ack"}"#.into());
            }
            ClientMessage::Start { .. } if !self.initialised => return Err((UNAUTHORIZED, "Unauthorized".into())),
            ClientMessage::Start { id, payload } => {
                if self.operations.contains_key(id.as_str()) {
                    if self.wire == Wire::TransportWs {
                        return Err((DUPLICATE_ID, format!("Subscriber for {id} already exists")));
                    }
                    // The legacy protocol lets a start replace the operation of the same id.
                    self.operations.remove(id.as_str());
                }
                self.start(OperationId::new(&id), payload);
            }
            ClientMessage::Stop { id } => {
                if let Some(operation) = self.operations.remove(id.as_str()) {
                    // Queued after every result already waiting, so the end comes last.
                    self.outbox.push_control(
                        Outgoing::Frame(
                            self.wire.framing().complete(&operation.id).expect("GraphQL protocols end operations"),
                        ),
                        &self.signal,
                    );
                }
            }
            ClientMessage::Ping { .. } => self.control(r#"{"type":"pong"}"#.into()),
            ClientMessage::Pong { .. } => {}
            ClientMessage::ConnectionTerminate => return Err((1000, String::new())),
        }
        Ok(())
    }

    /// Handles one plain frame: one GraphQL request.
    fn receive_plain(&mut self, bytes: &[u8]) {
        let error = |message: String| {
            let error = serde_json::json!({"errors": [{"message": message}]});
            Utf8Bytes::from(error.to_string())
        };
        let request = match serde_json::from_slice::<Request>(bytes) {
            Ok(request) => request,
            Err(err) => return self.control(error(format!("invalid request frame: {err}"))),
        };
        // Subscriptions are capped by the budget; this caps queries and mutations in flight too.
        let max_operations = self.state.limits.max_subscriptions_per_connection * 2;
        if self.operations.len() >= max_operations {
            return self.control(error(format!(
                "too many operations in flight on this connection (at most {max_operations})"
            )));
        }
        let serial = self.serial();
        self.start(OperationId::new(&format!("plain-{serial}")), request);
    }
}

/// What woke the connection.
enum Wake {
    Shutdown,
    InitTimeout,
    /// The token the connection signed in with expired.
    Expired,
    Work {
        write: bool,
        read: Option<Option<Result<Message, axum::Error>>>,
    },
}

/// How long from now until `identity`'s token expires (zero once it has).
fn until_expiry(identity: &Identity) -> Duration {
    identity.expires_at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO)
}

/// The token a socket's first message signs in with: a graphql protocol's `connection_init` payload
/// or a plain socket's `{"authorization": …}` frame, else the upgrade request's header. `Err` for a
/// first message that is not a sign-in at all (only plain sockets have no other first message).
fn first_token(wire: Wire, bytes: &[u8], header: Option<&str>) -> Result<Option<String>, ()> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| ())?;
    match wire {
        Wire::Plain => match token_of_payload(&value) {
            Some(token) => Ok(Some(token.to_owned())),
            // A plain socket signed in by its upgrade request sends requests from the first frame on.
            None if header.is_some() => Ok(header.map(str::to_owned)),
            None => Err(()),
        },
        _ => {
            let payload = value.get("payload").unwrap_or(&serde_json::Value::Null);
            Ok(token_of_payload(payload).map(str::to_owned).or(header.map(str::to_owned)))
        }
    }
}

/// Signs `conn` in with the first message `bytes`, when it is the message that must do so; `Err`
/// holds the close code and reason of a refusal. Returns whether `bytes` still needs handling as a
/// message of its protocol (a plain sign-in frame does not).
async fn sign_in(conn: &mut Connection, bytes: &[u8], sign: &SignIn) -> Result<bool, (u16, String)> {
    let refuse = |err: AuthError| (err.close_code(), err.to_string());
    if !conn.state.auth.enabled() {
        conn.signed_in(sign.ip, None);
        return Ok(true);
    }
    let is_init = |bytes: &[u8]| matches!(ClientMessage::from_bytes(bytes), Ok(ClientMessage::ConnectionInit { .. }));
    if conn.wire != Wire::Plain && !is_init(bytes) {
        // Not yet: the protocol itself answers an operation before connection_init (4401).
        return Ok(true);
    }
    let header = sign.token.as_deref();
    let token = first_token(conn.wire, bytes, header).map_err(|()| {
        refuse(AuthError::Unauthenticated(
            "sign-in required: send {\"authorization\": \"Bearer …\"} first, or the Authorization header".into(),
        ))
    })?;
    let identity = conn.state.auth.authenticate(token.as_deref()).await.map_err(refuse)?;
    // A token inside the clock-skew allowance verifies, but a socket lives by its expiry.
    if identity.as_deref().is_some_and(|i| until_expiry(i).is_zero()) {
        return Err(refuse(AuthError::Unauthenticated("the token has expired".into())));
    }
    let plain_sign_in = conn.wire == Wire::Plain
        && serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| token_of_payload(&v).is_some());
    conn.signed_in(sign.ip, identity);
    Ok(!plain_sign_in)
}

/// Serves one upgraded socket until either side ends it or the gateway shuts down.
async fn serve(mut socket: WebSocket, wire: Wire, state: Sockets, sign: SignIn) {
    let mut shutdown = pin!(state.shutdown.clone().cancelled_owned());
    let closing = state.closing.clone();
    let mut init_deadline = pin!(tokio::time::sleep(state.limits.connection_init_timeout));
    // Far off until the connection signs in with a token that expires.
    let mut expiry = pin!(tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)));
    // Whether `expiry` is a token's: only then does a busy connection read the clock on each wake-up.
    let mut expires = false;
    let mut conn = Connection::new(wire, state);
    if !conn.state.auth.enabled() {
        conn.signed_in(sign.ip, None);
    }
    let close = loop {
        let awaits_init = !conn.initialised || conn.awaits_sign_in();
        let wake = poll_fn(|cx| {
            let write = conn.signal.poll(cx).is_ready();
            if let Poll::Ready(message) = socket.poll_next_unpin(cx) {
                return Poll::Ready(Wake::Work { write, read: Some(message) });
            }
            // The shutdown future takes the token's lock whenever it is polled, so a busy connection
            // polls it only once the gateway is closing; an idle one, whenever nothing else woke it.
            if (!write || closing.load(Ordering::Acquire)) && shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Shutdown);
            }
            if write {
                return Poll::Ready(Wake::Work { write, read: None });
            }
            if awaits_init && init_deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::InitTimeout);
            }
            if expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Expired);
            }
            Poll::Pending
        })
        .await;
        // A busy connection wakes for frames before its deadlines are polled: they are checked here too.
        let wake = match wake {
            Wake::Work { .. } if expires && tokio::time::Instant::now() >= expiry.deadline() => Wake::Expired,
            Wake::Work { .. } if awaits_init && tokio::time::Instant::now() >= init_deadline.deadline() => {
                Wake::InitTimeout
            }
            wake => wake,
        };
        let (write, read) = match wake {
            Wake::Shutdown => break Some((GOING_AWAY, "server shutting down".to_owned())),
            Wake::InitTimeout if wire == Wire::Plain => {
                break Some((UNAUTHORIZED, "sign-in required: no authorization frame in time".to_owned()))
            }
            Wake::InitTimeout => break Some((INIT_TIMEOUT, "Connection initialisation timeout".to_owned())),
            Wake::Expired => break Some((UNAUTHORIZED, "the token expired: connect again with a new one".to_owned())),
            Wake::Work { write, read } => (write, read),
        };
        if let Some(message) = read {
            let bytes = match message {
                Some(Ok(Message::Text(text))) => Some(text.as_bytes().to_vec()),
                Some(Ok(Message::Binary(bytes))) if wire != Wire::Plain => Some(bytes.to_vec()),
                Some(Ok(Message::Close(_)) | Err(_)) | None => break None,
                Some(Ok(_)) => None,
            };
            let bytes = match bytes {
                Some(bytes) if conn.awaits_sign_in() => match sign_in(&mut conn, &bytes, &sign).await {
                    Ok(handle) => {
                        if let Some(identity) = conn.caller.as_ref().and_then(|c| c.identity.as_deref()) {
                            expiry.as_mut().reset(tokio::time::Instant::now() + until_expiry(identity));
                            expires = true;
                        }
                        handle.then_some(bytes)
                    }
                    Err(close) => break Some(close),
                },
                bytes => bytes,
            };
            if let Some(bytes) = bytes {
                match wire {
                    Wire::Plain => conn.receive_plain(&bytes),
                    _ => {
                        if let Err(close) = conn.receive_graphql(&bytes) {
                            break Some(close);
                        }
                    }
                }
            }
        }
        if write || conn.signal.has_overflowed() {
            let gathered = conn.gather();
            let Connection { pending, signal, .. } = &mut conn;
            let send_all = async {
                for frame in pending.drain(..) {
                    socket.feed(Message::Text(frame)).await?;
                }
                socket.flush().await
            };
            // A client that stops reading blocks the writes; falling a whole buffer behind ends the wait.
            let sent = tokio::select! {
                sent = send_all => sent.is_ok(),
                _ = signal.overflowed() => false,
            };
            if gathered.is_break() || conn.signal.has_overflowed() {
                let reason = conn.slow_consumer_reason();
                tracing::info!(reason, "closing a slow consumer");
                metrics().slow_consumer_closes.inc();
                break Some((SLOW_CONSUMER, reason));
            }
            if !sent {
                break None;
            }
        }
    };
    conn.outbox.close();
    conn.operations.clear();
    if let Some((code, reason)) = close {
        // A client that stopped reading never takes the close frame; do not wait on it forever.
        let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(close_frame(code, &reason))).await;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, socket.close()).await;
}
