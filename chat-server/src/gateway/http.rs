//! The gateway's HTTP surface: axum routes around the schema, apart from its meaning.
//!
//! `/graphql` serves queries and mutations over `POST` and `GET`, and upgrades to WebSocket for
//! subscriptions (see [`socket`](super::socket)); `/` serves GraphiQL; `/healthz` and `/readyz` the
//! health of the process.

use std::sync::Arc;

use super::{
    schema::ChatSchema,
    socket::{self, Sockets},
};
use crate::bus::{Bus, TraceHeaders};
use async_graphql::http::GraphiQLSource;
use async_graphql_axum::GraphQLResponse;
use axum::{
    body::Bytes,
    extract::{
        rejection::BytesRejection, ws::rejection::WebSocketUpgradeRejection, ws::WebSocketUpgrade, RawQuery, State,
    },
    http::{HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Router,
};

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub schema: ChatSchema,
    pub bus: Arc<dyn Bus>,
    pub sockets: Sockets,
    /// How long the bus may have work and make no progress before `/healthz` fails.
    pub stall_timeout: std::time::Duration,
}

/// The gateway's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(graphiql))
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
    Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql").finish())
}

/// A GraphQL error response for a request that never reached the schema.
fn request_error(status: StatusCode, code: &str, message: String) -> Response {
    let error = serde_json::json!({"errors": [{"message": message, "extensions": {"code": code}}]});
    (status, axum::Json(error)).into_response()
}

/// JSON bodies only, read under the router's body limit; one over it is refused with 413 and a
/// GraphQL error, as every other refusal is.
async fn graphql_post(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
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
        Ok(batch) => {
            GraphQLResponse::from(state.schema.execute_batch(batch.data(caller_trace(&headers))).await).into_response()
        }
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
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Ok(upgrade) = upgrade {
        return socket::upgrade(state.sockets, upgrade);
    }
    match async_graphql::http::parse_query_string(query.as_deref().unwrap_or_default()) {
        Ok(request) => {
            GraphQLResponse::from(state.schema.execute(request.data(caller_trace(&headers))).await).into_response()
        }
        Err(err) => {
            request_error(StatusCode::BAD_REQUEST, "BAD_REQUEST", format!("invalid GraphQL GET request: {err}"))
        }
    }
}
