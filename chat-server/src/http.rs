//! HTTP and WebSocket transport of the gateway: axum wiring around the schema, apart from its meaning.
//!
//! `/graphql` serves queries and mutations over `POST` and `GET`, and subscriptions over WebSocket
//! with `graphql-transport-ws`, legacy `graphql-ws`, or — when the client names no subprotocol —
//! the seed's plain frames (`{"query","variables"}` in, `{"data":...}` out).

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_graphql::http::{
    ClientMessage, GraphiQLSource, WebSocket as GraphQLWebSocket, WebSocketProtocols, WsMessage,
};
use async_graphql_axum::GraphQLResponse;
use axum::{
    body::Bytes,
    extract::{
        ws::rejection::WebSocketUpgradeRejection,
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade},
        RawQuery, State,
    },
    http::StatusCode,
    response::{Html, IntoResponse, Response},
    routing::get,
    Router,
};
use futures_util::{stream::SplitSink, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::Bus,
    graphql::{ChatSchema, SubscriptionBudget},
    shared::{refused, Framing, Membership, OperationId, Outbox, Outgoing, Shareable, SharedSubscriptions, Sharing},
};

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

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub schema: ChatSchema,
    /// Subscriptions executed once per distinct operation.
    pub shared: Arc<SharedSubscriptions>,
    pub bus: Arc<dyn Bus>,
    pub limits: SocketLimits,
    pub shutdown: CancellationToken,
    /// Upgraded sockets outlive axum's graceful shutdown; this lets the server wait for their close frames.
    pub sockets: TaskTracker,
}

/// The gateway's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(graphiql))
        .route("/graphql", get(graphql_get).post(graphql_post))
        .merge(health_routes({
            let bus = state.bus.clone();
            move || bus.is_ready()
        }))
        .layer(axum::extract::DefaultBodyLimit::max(state.limits.max_message_bytes))
        .with_state(state)
}

/// `/healthz` (the process is alive) and `/readyz` (the broker connection is up), for every role.
pub fn health_routes<S: Clone + Send + Sync + 'static>(
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
) -> Router<S> {
    Router::new().route("/healthz", get(|| async { "ok" })).route(
        "/readyz",
        get(move || {
            let ready = ready();
            async move {
                if ready {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "broker connection is down")
                }
            }
        }),
    )
}

async fn graphiql() -> Html<String> {
    Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql").finish())
}

/// JSON bodies only, read under the router's body limit.
async fn graphql_post(State(state): State<AppState>, body: Bytes) -> Response {
    match serde_json::from_slice::<async_graphql::BatchRequest>(&body) {
        Ok(batch) => GraphQLResponse::from(state.schema.execute_batch(batch).await).into_response(),
        Err(err) => {
            let error = serde_json::json!({"errors": [{"message": format!("invalid GraphQL request body: {err}")}]});
            (StatusCode::BAD_REQUEST, axum::Json(error)).into_response()
        }
    }
}

async fn graphql_get(
    State(state): State<AppState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Ok(upgrade) = upgrade {
        return upgrade_socket(state, upgrade);
    }
    match async_graphql::http::parse_query_string(query.as_deref().unwrap_or_default()) {
        Ok(request) => GraphQLResponse::from(state.schema.execute(request).await).into_response(),
        Err(err) => (StatusCode::BAD_REQUEST, format!("invalid GraphQL GET request: {err}")).into_response(),
    }
}

/// The wire protocol a socket speaks, from its negotiated subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    GraphQL(WebSocketProtocols),
    Plain,
}

fn upgrade_socket(state: AppState, upgrade: WebSocketUpgrade) -> Response {
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
        let tracker = state.sockets.clone();
        tracker.track_future(async move {
            match wire {
                Wire::GraphQL(protocol) => serve_graphql_ws(socket, protocol, state).await,
                Wire::Plain => serve_plain(socket, state).await,
            }
        })
    })
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

/// Sends everything queued in `outbox`, in one flush; false when the connection must end.
async fn flush_outbox(
    outbox: &Outbox,
    sink: &mut SplitSink<WebSocket, Message>,
    shared: &mut HashMap<Box<str>, Membership>,
) -> bool {
    if let Some(items) = outbox.take() {
        let send_all = async {
            for item in items {
                if let Some(id) = item.ended {
                    shared.remove(&id);
                }
                if let Some(frame) = item.frame {
                    sink.feed(Message::Text(frame)).await?;
                }
            }
            sink.flush().await
        };
        // A client that stops reading blocks the writes; its outbox overflowing ends the wait.
        tokio::select! {
            sent = send_all => return sent.is_ok(),
            _ = outbox.overflowed() => {}
        }
    }
    let reason = format!("slow consumer: more than {} frames waited to be sent", outbox.capacity());
    let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, sink.send(close(SLOW_CONSUMER, &reason))).await;
    false
}

/// Joins a shareable subscription to its group, or refuses it when the connection's budget is spent.
fn start_shared(
    state: &AppState,
    operation: Shareable,
    id: OperationId,
    framing: Framing,
    outbox: &Arc<Outbox>,
    budget: &SubscriptionBudget,
    shared: &mut HashMap<Box<str>, Membership>,
) {
    match budget.acquire() {
        Ok(permit) => {
            let raw = id.raw.clone();
            shared.insert(raw, state.shared.join(operation, id, framing, outbox.clone(), Some(permit)));
        }
        Err(error) => refused(framing, &id, error).into_iter().for_each(|item| outbox.push_control(item)),
    }
}

/// graphql-transport-ws and legacy graphql-ws. Subscriptions that can be shared run in their group;
/// everything else goes to async-graphql's protocol state machine.
async fn serve_graphql_ws(socket: WebSocket, protocol: WebSocketProtocols, state: AppState) {
    let (mut sink, mut source) = socket.split();
    let (to_protocol, mut protocol_input) = mpsc::unbounded_channel::<serde_json::Result<Box<ClientMessage>>>();
    let input = futures_util::stream::poll_fn(move |cx| protocol_input.poll_recv(cx)).map(|m| m.map(|m| *m));
    let budget = SubscriptionBudget::new(state.limits.max_subscriptions_per_connection);
    let mut data = async_graphql::Data::default();
    data.insert(budget.clone());
    let mut protocol_stream =
        GraphQLWebSocket::from_message_stream(state.schema.clone(), input, protocol).connection_data(data);
    let framing = match protocol {
        WebSocketProtocols::GraphQLWS => Framing::Next,
        WebSocketProtocols::SubscriptionsTransportWS => Framing::Data,
    };
    let outbox = Arc::new(Outbox::new(state.limits.send_queue_frames));
    let mut shared: HashMap<Box<str>, Membership> = HashMap::new();
    let init_deadline = tokio::time::sleep(state.limits.connection_init_timeout);
    tokio::pin!(init_deadline);
    let mut initialised = false;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                let _ = sink.send(close(GOING_AWAY, "server shutting down")).await;
                break;
            }
            _ = &mut init_deadline, if !initialised => {
                let _ = sink.send(close(INIT_TIMEOUT, "Connection initialisation timeout")).await;
                break;
            }
            _ = outbox.ready() => {
                if !flush_outbox(&outbox, &mut sink, &mut shared).await {
                    break;
                }
            }
            message = protocol_stream.next() => match message {
                Some(WsMessage::Text(text)) => {
                    // Only the acknowledgement ends the handshake; a pong before it does not.
                    initialised |= text.contains(r#""type":"connection_ack""#);
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(WsMessage::Close(code, reason)) => {
                    let _ = sink.send(close(code, &reason)).await;
                    break;
                }
                None => break,
            },
            frame = source.next() => {
                let message = match frame {
                    Some(Ok(Message::Text(text))) => ClientMessage::from_bytes(text.as_bytes()),
                    Some(Ok(Message::Binary(bytes))) => ClientMessage::from_bytes(&bytes),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                match message {
                    // Before the acknowledgement, async-graphql refuses operations itself.
                    Ok(ClientMessage::Start { id, payload }) if initialised => {
                        if shared.contains_key(id.as_str()) {
                            if protocol == WebSocketProtocols::GraphQLWS {
                                let _ = sink.send(close(DUPLICATE_ID, &format!("Subscriber for {id} already exists"))).await;
                                break;
                            }
                            // The legacy protocol lets a start replace the operation of the same id.
                            shared.remove(id.as_str());
                        }
                        match state.shared.check(payload) {
                            Sharing::Shared(operation) => {
                                start_shared(&state, operation, OperationId::new(&id), framing, &outbox, &budget, &mut shared)
                            }
                            Sharing::Alone(payload) => {
                                let _ = to_protocol.send(Ok(Box::new(ClientMessage::Start { id, payload })));
                            }
                        }
                    }
                    Ok(ClientMessage::Stop { id }) if shared.contains_key(id.as_str()) => {
                        shared.remove(id.as_str());
                        // Through the outbox, so the end follows every result already queued.
                        let end = framing.complete(&OperationId::new(&id));
                        outbox.push_control(Outgoing { frame: end, ended: None });
                    }
                    other => {
                        let _ = to_protocol.send(other.map(Box::new));
                    }
                }
            }
        }
    }
    drop(shared);
    // A client that stopped reading never completes the close handshake; do not wait on it forever.
    let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, sink.close()).await;
}

/// The seed's plain frames: every text frame is one GraphQL request, answered by `{"data":...}` frames.
async fn serve_plain(socket: WebSocket, state: AppState) {
    let (mut sink, mut source) = socket.split();
    let budget = SubscriptionBudget::new(state.limits.max_subscriptions_per_connection);
    // Subscriptions are capped by the budget; this caps queries and mutations in flight too.
    let max_operations = state.limits.max_subscriptions_per_connection * 2;
    let outbox = Arc::new(Outbox::new(state.limits.send_queue_frames));
    let mut shared: HashMap<Box<str>, Membership> = HashMap::new();
    let mut next_id = 0u64;
    let mut operations = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                let _ = sink.send(close(GOING_AWAY, "server shutting down")).await;
                break;
            }
            _ = outbox.ready() => {
                if !flush_outbox(&outbox, &mut sink, &mut shared).await {
                    break;
                }
            }
            Some(_) = operations.join_next(), if !operations.is_empty() => {}
            frame = source.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let error = |message: String| {
                        let error = serde_json::json!({"errors": [{"message": message}]});
                        outbox.push_control(Outgoing::frame(error.to_string().into()));
                    };
                    let request = match serde_json::from_str::<async_graphql::Request>(text.as_str()) {
                        Ok(request) => request,
                        Err(err) => {
                            error(format!("invalid request frame: {err}"));
                            continue;
                        }
                    };
                    let request = match state.shared.check(request) {
                        Sharing::Shared(operation) => {
                            next_id += 1;
                            let id = OperationId::new(&next_id.to_string());
                            start_shared(&state, operation, id, Framing::Plain, &outbox, &budget, &mut shared);
                            continue;
                        }
                        Sharing::Alone(_) if operations.len() >= max_operations => {
                            error(format!("too many operations in flight on this connection (at most {max_operations})"));
                            continue;
                        }
                        Sharing::Alone(request) => request,
                    };
                    let stream = state.schema.execute_stream(request.data(budget.clone()));
                    let outbox = outbox.clone();
                    operations.spawn(async move {
                        futures_util::pin_mut!(stream);
                        while let Some(response) = stream.next().await {
                            let Ok(json) = serde_json::to_string(&response) else { continue };
                            if !outbox.push(Outgoing::frame(json.into())) {
                                break;
                            }
                        }
                    });
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    }
    operations.abort_all();
    drop(shared);
    // A client that stopped reading never completes the close handshake; do not wait on it forever.
    let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, sink.close()).await;
}
