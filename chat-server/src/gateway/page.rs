//! The participants' chat page, served by the gateway itself at `/`: plain HTML, CSS and JavaScript
//! embedded in the binary (no CDN, nothing fetched at run time), addressing everything relative to
//! its own URL so that a gateway behind a path prefix serves it as well. `chat-config.json` tells
//! the page how to sign in and which languages the chat speaks.

use axum::{
    http::header,
    response::{Html, IntoResponse, Response},
    routing::get,
    Router,
};

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// What the page needs to know about the deployment.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PageConfig {
    /// `none`, `jwt` or `oidc`.
    pub auth: &'static str,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub source_language: String,
    pub languages: Vec<String>,
    /// Whether `chats` and `messages` answer (a gateway with a history).
    pub history: bool,
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// `/` (the page), its script and style, and its configuration.
pub fn routes<S: Clone + Send + Sync + 'static>(config: PageConfig) -> Router<S> {
    let config = serde_json::to_string(&config).expect("the page configuration encodes");
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route(
            "/chat-config.json",
            get(move || {
                let config = config.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], config) }
            }),
        )
}
