//! The gateway's WebSocket transport: one connection loop for graphql-transport-ws, legacy graphql-ws
//! and — when the client names no subprotocol — the seed's plain frames (`{"query","variables"}` in,
//! `{"data":...}` out).
//!
//! Plain subscriptions are executed once per distinct operation in a shared group (see
//! [`groups`](super::groups)); everything else on a GraphQL protocol goes to async-graphql's protocol
//! state machine, and on plain frames to its own execution. The connection counts its subscriptions
//! against `--max-subscriptions-per-connection` itself, so the schema knows nothing of sockets.

use std::{
    collections::HashMap,
    ops::ControlFlow,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use async_graphql::{
    http::{ClientMessage, WebSocket as ProtocolMachine, WebSocketProtocols, WsMessage},
    ErrorExtensions,
};
use axum::{
    extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade},
    response::Response,
};
use futures_util::{
    stream::{BoxStream, SplitSink},
    SinkExt, StreamExt,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    framing::{Framing, OperationId},
    groups::{refused, Membership, Shareable, SharedSubscriptions, Sharing},
    outbox::{Outbox, Outgoing},
    schema::ChatSchema,
};

/// What every socket of the gateway shares.
#[derive(Clone)]
pub struct Sockets {
    pub schema: ChatSchema,
    /// Subscriptions executed once per distinct operation.
    pub shared: Arc<SharedSubscriptions>,
    pub limits: SocketLimits,
    pub shutdown: CancellationToken,
    /// Upgraded sockets outlive axum's graceful shutdown; this lets the server wait for their close frames.
    pub tracker: TaskTracker,
}

/// Close code for a server going away (RFC 6455).
const GOING_AWAY: u16 = 1001;
/// graphql-ws: the client did not send `connection_init` in time.
const INIT_TIMEOUT: u16 = 4408;
/// graphql-transport-ws: a subscribe reused the id of a running operation.
const DUPLICATE_ID: u16 = 4409;
/// Policy violation (RFC 6455): the client read its frames too slowly and its send queue overflowed.
const SLOW_CONSUMER: u16 = 1008;
/// How long a slow consumer's close frame may wait behind the frames already written.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(10);
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
    /// Frames that may wait for one connection before it is closed as a slow consumer.
    pub send_queue_frames: usize,
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
    GraphQL(WebSocketProtocols),
    Plain,
}

/// Upgrades a `GET /graphql` to a WebSocket speaking the subprotocol the client asked for.
pub fn upgrade(state: Sockets, upgrade: WebSocketUpgrade) -> Response {
    let upgrade = upgrade
        .protocols(["graphql-transport-ws", "graphql-ws"])
        .max_message_size(state.limits.max_message_bytes)
        .max_frame_size(state.limits.max_message_bytes)
        .read_buffer_size(SOCKET_READ_BUFFER)
        // Frames are written once this much is buffered (and on every flush); the buffer keeps its size.
        .write_buffer_size(SOCKET_WRITE_BUFFER);
    let wire = match upgrade.selected_protocol().and_then(|p| p.to_str().ok()) {
        Some("graphql-transport-ws") => Wire::GraphQL(WebSocketProtocols::GraphQLWS),
        Some("graphql-ws") => Wire::GraphQL(WebSocketProtocols::SubscriptionsTransportWS),
        _ => Wire::Plain,
    };
    upgrade.on_upgrade(move |socket| {
        let tracker = state.tracker.clone();
        tracker.track_future(serve(socket, wire, state))
    })
}

fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

/// What runs under one client operation id.
enum Running {
    /// A member of a shared group; it leaves the group when dropped.
    Shared { _membership: Membership, _permit: BudgetPermit },
    /// Executed on its own; a subscription holds a unit of the budget until it ends.
    Alone { _permit: Option<BudgetPermit> },
}

/// One client connection: its socket, its outbox, and the operations it runs.
struct Connection {
    sink: SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    running: HashMap<Box<str>, Running>,
    budget: SubscriptionBudget,
    state: Sockets,
}

type Flow = ControlFlow<()>;

impl Connection {
    fn new(sink: SplitSink<WebSocket, Message>, state: Sockets) -> Self {
        Self {
            sink,
            outbox: Arc::new(Outbox::new(state.limits.send_queue_frames)),
            running: HashMap::new(),
            budget: SubscriptionBudget::new(state.limits.max_subscriptions_per_connection),
            state,
        }
    }

    async fn send(&mut self, message: Message) -> Flow {
        match self.sink.send(message).await {
            Ok(()) => Flow::Continue(()),
            Err(_) => Flow::Break(()),
        }
    }

    async fn close(&mut self, code: u16, reason: &str) -> Flow {
        let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, self.sink.send(close_frame(code, reason))).await;
        Flow::Break(())
    }

    /// Sends everything queued in the outbox, in one flush.
    async fn flush(&mut self) -> Flow {
        let Self { sink, outbox, running, .. } = self;
        if let Some(items) = outbox.take() {
            let send_all = async {
                for item in items {
                    if let Some(id) = item.ended {
                        running.remove(&id);
                    }
                    if let Some(frame) = item.frame {
                        sink.feed(Message::Text(frame)).await?;
                    }
                }
                sink.flush().await
            };
            // A client that stops reading blocks the writes; its outbox overflowing ends the wait.
            tokio::select! {
                sent = send_all => return if sent.is_ok() { Flow::Continue(()) } else { Flow::Break(()) },
                _ = outbox.overflowed() => {}
            }
        }
        let reason = format!("slow consumer: more than {} frames waited to be sent", self.outbox.capacity());
        self.close(SLOW_CONSUMER, &reason).await
    }

    /// Queues frames that need no budget: errors and completions.
    fn push_control(&self, items: impl IntoIterator<Item = Outgoing>) {
        items.into_iter().for_each(|item| self.outbox.push_control(item));
    }

    /// A unit of the subscription budget, or the frames refusing operation `id`.
    fn permit(&self, id: &OperationId, framing: Framing) -> Option<BudgetPermit> {
        match self.budget.acquire() {
            Ok(permit) => Some(permit),
            Err(error) => {
                self.push_control(refused(framing, id, error));
                None
            }
        }
    }

    /// Joins a shareable subscription to its group, or refuses it when the budget is spent.
    fn start_shared(&mut self, operation: Shareable, id: OperationId, framing: Framing) {
        if let Some(permit) = self.permit(&id, framing) {
            let raw = id.raw.clone();
            let membership = self.state.shared.join(operation, id, framing, self.outbox.clone());
            self.running.insert(raw, Running::Shared { _membership: membership, _permit: permit });
        }
    }
}

/// The protocol-specific half of a connection.
enum Protocol {
    /// graphql-transport-ws or legacy graphql-ws: async-graphql's state machine runs the handshake
    /// and every operation that is not shared.
    GraphQL {
        protocol: WebSocketProtocols,
        framing: Framing,
        machine: BoxStream<'static, WsMessage>,
        to_machine: mpsc::UnboundedSender<serde_json::Result<ClientMessage>>,
        initialised: bool,
    },
    /// The seed's plain frames: every text frame is one request, with no ids and no handshake.
    Plain { operations: tokio::task::JoinSet<()>, next_id: u64, max_operations: usize },
}

/// What the protocol half produced by itself.
enum Output {
    /// A message of async-graphql's state machine for the client.
    Machine(Option<WsMessage>),
    /// A plain operation finished.
    Finished,
}

impl Protocol {
    fn new(wire: Wire, state: &Sockets) -> Self {
        match wire {
            Wire::GraphQL(protocol) => {
                let (to_machine, mut input) = mpsc::unbounded_channel::<serde_json::Result<ClientMessage>>();
                let input = futures_util::stream::poll_fn(move |cx| input.poll_recv(cx));
                let machine = ProtocolMachine::from_message_stream(state.schema.clone(), input, protocol).boxed();
                let framing = match protocol {
                    WebSocketProtocols::GraphQLWS => Framing::Next,
                    WebSocketProtocols::SubscriptionsTransportWS => Framing::Data,
                };
                Self::GraphQL { protocol, framing, machine, to_machine, initialised: false }
            }
            // Subscriptions are capped by the budget; this caps queries and mutations in flight too.
            Wire::Plain => Self::Plain {
                operations: tokio::task::JoinSet::new(),
                next_id: 0,
                max_operations: state.limits.max_subscriptions_per_connection * 2,
            },
        }
    }

    /// Whether the client still owes its `connection_init`.
    fn awaits_init(&self) -> bool {
        matches!(self, Self::GraphQL { initialised: false, .. })
    }

    /// The next thing this protocol produced by itself; pending while there is nothing.
    async fn output(&mut self) -> Output {
        match self {
            Self::GraphQL { machine, .. } => Output::Machine(machine.next().await),
            Self::Plain { operations, .. } if !operations.is_empty() => {
                operations.join_next().await;
                Output::Finished
            }
            Self::Plain { .. } => std::future::pending().await,
        }
    }

    async fn forward(&mut self, output: Output, conn: &mut Connection) -> Flow {
        let Self::GraphQL { initialised, .. } = self else {
            return Flow::Continue(());
        };
        match output {
            Output::Machine(Some(WsMessage::Text(text))) => {
                // Only the acknowledgement ends the handshake; a pong before it does not.
                *initialised |= text.contains(r#""type":"connection_ack""#);
                if let Some(id) = ended_operation(&text) {
                    if matches!(conn.running.get(id.as_str()), Some(Running::Alone { .. })) {
                        conn.running.remove(id.as_str());
                    }
                }
                conn.send(Message::Text(text.into())).await
            }
            Output::Machine(Some(WsMessage::Close(code, reason))) => conn.close(code, &reason).await,
            Output::Machine(None) => Flow::Break(()),
            Output::Finished => Flow::Continue(()),
        }
    }

    async fn receive(&mut self, frame: Option<Result<Message, axum::Error>>, conn: &mut Connection) -> Flow {
        let bytes = match frame {
            Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
            Some(Ok(Message::Binary(bytes))) if matches!(self, Self::GraphQL { .. }) => bytes.to_vec(),
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Flow::Break(()),
            Some(Ok(_)) => return Flow::Continue(()),
        };
        match self {
            Self::GraphQL { protocol, framing, to_machine, initialised, .. } => {
                let message = ClientMessage::from_bytes(&bytes);
                match message {
                    // Before the acknowledgement, async-graphql refuses operations itself.
                    Ok(ClientMessage::Start { id, payload }) if *initialised => {
                        if conn.running.contains_key(id.as_str()) {
                            if *protocol == WebSocketProtocols::GraphQLWS {
                                let reason = format!("Subscriber for {id} already exists");
                                return conn.close(DUPLICATE_ID, &reason).await;
                            }
                            // The legacy protocol lets a start replace the operation of the same id.
                            conn.running.remove(id.as_str());
                        }
                        match conn.state.shared.check(payload) {
                            Sharing::Shared(operation) => conn.start_shared(operation, OperationId::new(&id), *framing),
                            Sharing::Alone { request, subscription } => {
                                let permit = match subscription {
                                    true => match conn.permit(&OperationId::new(&id), *framing) {
                                        Some(permit) => Some(permit),
                                        None => return Flow::Continue(()),
                                    },
                                    false => None,
                                };
                                conn.running.insert(id.as_str().into(), Running::Alone { _permit: permit });
                                let _ = to_machine.send(Ok(ClientMessage::Start { id, payload: request }));
                            }
                        }
                    }
                    Ok(ClientMessage::Stop { id }) => match conn.running.remove(id.as_str()) {
                        Some(Running::Shared { .. }) => {
                            // Through the outbox, so the end follows every result already queued.
                            let end = framing.complete(&OperationId::new(&id));
                            conn.push_control([Outgoing { frame: end, ended: None }]);
                        }
                        Some(Running::Alone { .. }) | None => {
                            let _ = to_machine.send(Ok(ClientMessage::Stop { id }));
                        }
                    },
                    other => {
                        let _ = to_machine.send(other);
                    }
                }
                Flow::Continue(())
            }
            Self::Plain { operations, next_id, max_operations } => {
                let error = |message: String| {
                    let error = serde_json::json!({"errors": [{"message": message}]});
                    conn.push_control([Outgoing::frame(error.to_string().into())]);
                };
                let request = match serde_json::from_slice::<async_graphql::Request>(&bytes) {
                    Ok(request) => request,
                    Err(err) => {
                        error(format!("invalid request frame: {err}"));
                        return Flow::Continue(());
                    }
                };
                *next_id += 1;
                let id = OperationId::new(&next_id.to_string());
                match conn.state.shared.check(request) {
                    Sharing::Shared(operation) => conn.start_shared(operation, id, Framing::Plain),
                    Sharing::Alone { .. } if operations.len() >= *max_operations => {
                        error(format!("too many operations in flight on this connection (at most {max_operations})"))
                    }
                    Sharing::Alone { request, subscription } => {
                        let permit = match subscription {
                            true => match conn.permit(&id, Framing::Plain) {
                                Some(permit) => Some(permit),
                                None => return Flow::Continue(()),
                            },
                            false => None,
                        };
                        let stream = conn.state.schema.execute_stream(request);
                        let outbox = conn.outbox.clone();
                        operations.spawn(async move {
                            let _permit = permit;
                            futures_util::pin_mut!(stream);
                            while let Some(response) = stream.next().await {
                                let Ok(json) = serde_json::to_string(&response) else { continue };
                                if !outbox.push(Outgoing::frame(json.into())) {
                                    break;
                                }
                            }
                        });
                    }
                }
                Flow::Continue(())
            }
        }
    }
}

/// The id of the operation a graphql-ws message from the state machine ends (`complete` or `error`).
fn ended_operation(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ending {
        #[serde(rename = "type")]
        kind: String,
        id: Option<String>,
    }
    if !(text.contains(r#""type":"complete""#) || text.contains(r#""type":"error""#)) {
        return None;
    }
    let ending: Ending = serde_json::from_str(text).ok()?;
    matches!(ending.kind.as_str(), "complete" | "error").then_some(ending.id).flatten()
}

/// Serves one upgraded socket until either side ends it or the gateway shuts down.
async fn serve(socket: WebSocket, wire: Wire, state: Sockets) {
    let (sink, mut source) = socket.split();
    let shutdown = state.shutdown.clone();
    let init_timeout = state.limits.connection_init_timeout;
    let mut protocol = Protocol::new(wire, &state);
    let mut conn = Connection::new(sink, state);
    let init_deadline = tokio::time::sleep(init_timeout);
    tokio::pin!(init_deadline);
    loop {
        let flow = tokio::select! {
            _ = shutdown.cancelled() => conn.close(GOING_AWAY, "server shutting down").await,
            _ = &mut init_deadline, if protocol.awaits_init() => {
                conn.close(INIT_TIMEOUT, "Connection initialisation timeout").await
            }
            _ = conn.outbox.ready() => conn.flush().await,
            output = protocol.output() => protocol.forward(output, &mut conn).await,
            frame = source.next() => protocol.receive(frame, &mut conn).await,
        };
        if flow.is_break() {
            break;
        }
    }
    if let Protocol::Plain { operations, .. } = &mut protocol {
        operations.abort_all();
    }
    conn.running.clear();
    // A client that stopped reading never completes the close handshake; do not wait on it forever.
    let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, conn.sink.close()).await;
}
