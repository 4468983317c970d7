//! `/healthz` (the process is alive) and `/readyz` (it can serve: the broker connection is up), for every role.

use axum::{http::StatusCode, routing::get, Router};

/// The health routes; `ready` answers `/readyz`.
pub fn routes<S: Clone + Send + Sync + 'static>(ready: impl Fn() -> bool + Clone + Send + Sync + 'static) -> Router<S> {
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
