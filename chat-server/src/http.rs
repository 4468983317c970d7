//! HTTP and WebSocket transport of the gateway: axum wiring around the schema, apart from its meaning.
//!
//! `/graphql` serves queries and mutations over `POST` and `GET`, and subscriptions over WebSocket
//! with `graphql-transport-ws`, legacy `graphql-ws`, or — when the client names no subprotocol —
//! the seed's plain frames (`{"query","variables"}` in, `{"data":...}` out).

use std::{sync::Arc, time::Duration};

use async_graphql::http::{GraphiQLSource, WebSocket as GraphQLWebSocket, WebSocketProtocols, WsMessage};
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
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::Bus,
    graphql::{ChatSchema, SubscriptionBudget},
};

/// Close code for a server going away (RFC 6455).
const GOING_AWAY: u16 = 1001;
/// graphql-ws: the client did not send `connection_init` in time.
const INIT_TIMEOUT: u16 = 4408;
/// Bytes read from a socket at a time (tungstenite's default, 128 KiB, dominated an idle subscription's memory).
const SOCKET_READ_BUFFER: usize = 4 * 1024;

/// Limits of the WebSocket transport.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    pub max_subscriptions_per_connection: usize,
    pub connection_init_timeout: Duration,
    pub max_message_bytes: usize,
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub schema: ChatSchema,
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
        // tungstenite preallocates a 128 KiB read buffer per socket; client frames here are small.
        .read_buffer_size(SOCKET_READ_BUFFER);
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

/// graphql-transport-ws and legacy graphql-ws, driven by async-graphql's protocol state machine.
async fn serve_graphql_ws(socket: WebSocket, protocol: WebSocketProtocols, state: AppState) {
    let (mut sink, source) = socket.split();
    let input = source
        .take_while(|frame| futures_util::future::ready(!matches!(frame, Ok(Message::Close(_)) | Err(_))))
        .filter_map(|frame| {
            futures_util::future::ready(match frame {
                Ok(Message::Text(text)) => Some(text.as_bytes().to_vec()),
                Ok(Message::Binary(bytes)) => Some(bytes.to_vec()),
                _ => None,
            })
        });
    let mut data = async_graphql::Data::default();
    data.insert(SubscriptionBudget::new(state.limits.max_subscriptions_per_connection));
    let mut protocol_stream = GraphQLWebSocket::new(state.schema.clone(), input, protocol).connection_data(data);
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
            }
        }
    }
    let _ = sink.close().await;
}

/// The seed's plain frames: every text frame is one GraphQL request, answered by `{"data":...}` frames.
async fn serve_plain(socket: WebSocket, state: AppState) {
    let (mut sink, mut source) = socket.split();
    let budget = SubscriptionBudget::new(state.limits.max_subscriptions_per_connection);
    // Subscriptions are capped by the budget; this caps queries and mutations in flight too.
    let max_operations = state.limits.max_subscriptions_per_connection * 2;
    let (out_tx, mut out_rx) = mpsc::channel::<String>(256);
    let mut operations = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                let _ = sink.send(close(GOING_AWAY, "server shutting down")).await;
                break;
            }
            Some(text) = out_rx.recv() => {
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            Some(_) = operations.join_next(), if !operations.is_empty() => {}
            frame = source.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let request = serde_json::from_str::<async_graphql::Request>(text.as_str())
                        .map_err(|err| format!("invalid request frame: {err}"))
                        .and_then(|request| {
                            if operations.len() >= max_operations {
                                Err(format!("too many operations in flight on this connection (at most {max_operations})"))
                            } else {
                                Ok(request)
                            }
                        });
                    match request {
                        Ok(request) => {
                            let stream = state.schema.execute_stream(request.data(budget.clone()));
                            let out = out_tx.clone();
                            operations.spawn(async move {
                                futures_util::pin_mut!(stream);
                                while let Some(response) = stream.next().await {
                                    let Ok(json) = serde_json::to_string(&response) else { continue };
                                    if out.send(json).await.is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                        Err(message) => {
                            let error = serde_json::json!({"errors": [{"message": message}]});
                            if sink.send(Message::Text(error.to_string().into())).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    }
    operations.abort_all();
    let _ = sink.close().await;
}
