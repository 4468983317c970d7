//! The gateway's HTTP surface: axum routes around the schema, apart from its meaning.
//!
//! `/graphql` serves queries and mutations over `POST` and `GET`, and upgrades to WebSocket for
//! subscriptions (see [`socket`](super::socket)); `/` serves the chat page (see [`page`](super::page))
//! and `/graphiql` GraphiQL; `/healthz` and `/readyz` the
//! health of the process.

use std::{net::SocketAddr, sync::Arc};

use super::{
    schema::ChatSchema,
    socket::{self, Sockets},
};
use crate::{
    auth::{token_of_header, Auth, AuthError, Caller},
    bus::{Bus, TraceHeaders},
};
use async_graphql::http::GraphiQLSource;
use async_graphql_axum::GraphQLResponse;
use axum::{
    body::Bytes,
    extract::{
        rejection::BytesRejection, ws::rejection::WebSocketUpgradeRejection, ws::WebSocketUpgrade, ConnectInfo,
        RawQuery, State,
    },
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Router,
};

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub schema: ChatSchema,
    pub bus: Arc<dyn Bus>,
    pub auth: Arc<Auth>,
    pub page: super::page::PageConfig,
    pub sockets: Sockets,
    /// How long the bus may have work and make no progress before `/healthz` fails.
    pub stall_timeout: std::time::Duration,
}

/// The gateway's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(super::page::routes(state.page.clone()))
        .route("/graphiql", get(graphiql))
        .route("/graphql", get(graphql_get).post(graphql_post))
        .merge(crate::health::routes(
            {
                let bus = state.bus.clone();
                move || bus.is_ready()
            },
            {
                let (bus, timeout) = (state.bus.clone(), state.stall_timeout);
                move || bus.stalled(timeout)
            },
        ))
        .layer(axum::extract::DefaultBodyLimit::max(state.sockets.limits.max_message_bytes))
        .with_state(state)
}

async fn graphiql() -> Html<String> {
    // Relative, so that GraphiQL works behind a path prefix too.
    Html(GraphiQLSource::build().endpoint("graphql").subscription_endpoint("graphql").finish())
}

/// A GraphQL error response for a request that never reached the schema.
fn request_error(status: StatusCode, code: &str, message: String) -> Response {
    let error = serde_json::json!({"errors": [{"message": message, "extensions": {"code": code}}]});
    (status, axum::Json(error)).into_response()
}

/// The refusal of a request whose caller could not be signed in (401) or may not read (403).
fn auth_error(err: AuthError) -> Response {
    let status = match err {
        AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
    };
    let mut response = request_error(status, err.code(), err.to_string());
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    response
}

/// The caller of a request: signed in with its `Authorization: Bearer` token when the gateway signs
/// clients in.
async fn caller(auth: &Auth, headers: &HeaderMap, peer: SocketAddr) -> Result<Caller, Response> {
    let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(token_of_header);
    let identity = auth.authenticate(token).await.map_err(auth_error)?;
    Ok(Caller { identity, ip: peer.ip() })
}

/// The answer to an executed request, with the HTTP status its refusal calls for: 403 for an action
/// the caller's groups do not allow, 429 for a limit, 401 for a sign-in needed; else 200.
fn answer(response: async_graphql::BatchResponse) -> Response {
    let code_of = |e: &async_graphql::ServerError| {
        e.extensions.as_ref().and_then(|x| x.get("code")).and_then(|c| match c {
            async_graphql::Value::String(code) => Some(code.clone()),
            _ => None,
        })
    };
    // A batch whose other operations ran answers 200: its refused items say so in their errors, and a
    // client retrying a 429 must not send again what was accepted.
    let errors: Vec<&async_graphql::ServerError> = match &response {
        async_graphql::BatchResponse::Single(r) => r.errors.iter().collect(),
        async_graphql::BatchResponse::Batch(rs) if rs.iter().all(|r| !r.errors.is_empty()) => {
            rs.iter().flat_map(|r| &r.errors).collect()
        }
        async_graphql::BatchResponse::Batch(_) => Vec::new(),
    };
    let status = errors.iter().find_map(|e| match code_of(e).as_deref() {
        Some("FORBIDDEN") => Some(StatusCode::FORBIDDEN),
        Some("RATE_LIMITED") => Some(StatusCode::TOO_MANY_REQUESTS),
        Some("UNAUTHENTICATED") => Some(StatusCode::UNAUTHORIZED),
        _ => None,
    });
    let mut http = GraphQLResponse::from(response).into_response();
    if let Some(status) = status {
        *http.status_mut() = status;
        if status == StatusCode::TOO_MANY_REQUESTS {
            let seconds = crate::auth::limits::RETRY_AFTER.as_secs().to_string();
            http.headers_mut().insert(header::RETRY_AFTER, seconds.parse().expect("digits are a header value"));
        }
    }
    http
}

/// JSON bodies only, read under the router's body limit; one over it is refused with 413 and a
/// GraphQL error, as every other refusal is.
async fn graphql_post(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let caller = match caller(&state.auth, &headers, peer).await {
        Ok(caller) => caller,
        Err(refused) => return refused,
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = state.sockets.limits.max_message_bytes;
            let message = format!("the request body is larger than the limit of {limit} bytes");
            return request_error(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", message);
        }
        Err(rejection) => {
            let message = format!("the request body cannot be read: {}", rejection.body_text());
            return request_error(rejection.status(), "BAD_REQUEST", message);
        }
    };
    match serde_json::from_slice::<async_graphql::BatchRequest>(&body) {
        Ok(batch) => answer(state.schema.execute_batch(batch.data(caller_trace(&headers)).data(caller)).await),
        Err(err) => {
            request_error(StatusCode::BAD_REQUEST, "BAD_REQUEST", format!("invalid GraphQL request body: {err}"))
        }
    }
}

/// The caller's W3C trace context, if its request carried one: a message it sends joins that trace.
fn caller_trace(headers: &HeaderMap) -> TraceHeaders {
    TraceHeaders::from_pairs(headers.iter().filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))))
}

async fn graphql_get(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Ok(upgrade) = upgrade {
        // A socket signs in with its first message (or this header) and closes with its code.
        let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(token_of_header);
        return socket::upgrade(state.sockets, upgrade, peer.ip(), token.map(str::to_owned));
    }
    let caller = match caller(&state.auth, &headers, peer).await {
        Ok(caller) => caller,
        Err(refused) => return refused,
    };
    match async_graphql::http::parse_query_string(query.as_deref().unwrap_or_default()) {
        Ok(request) => answer(state.schema.execute(request.data(caller_trace(&headers)).data(caller)).await.into()),
        Err(err) => {
            request_error(StatusCode::BAD_REQUEST, "BAD_REQUEST", format!("invalid GraphQL GET request: {err}"))
        }
    }
}
