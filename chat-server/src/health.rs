//! `/healthz` (liveness: the process makes progress), `/readyz` (it can serve: the broker
//! connection is up) and `/metrics` (OpenMetrics), for every role.

use axum::{http::StatusCode, routing::get, Router};

/// The health routes; `ready` answers `/readyz`, `stalled` (why the role is stuck, if it is) `/healthz`.
pub fn routes<S: Clone + Send + Sync + 'static>(
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    stalled: impl Fn() -> Option<String> + Clone + Send + Sync + 'static,
) -> Router<S> {
    let scraped_ready = ready.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = crate::metrics::metrics();
                metrics.ready.set(i64::from(scraped_ready()));
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let stalled = stalled();
                async move {
                    match stalled {
                        None => (StatusCode::OK, "ok".to_owned()),
                        Some(reason) => {
                            tracing::error!(reason, "stuck: /healthz fails so that the process is restarted");
                            (StatusCode::SERVICE_UNAVAILABLE, format!("stuck: {reason}"))
                        }
                    }
                }
            }),
        )
        .route(
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
