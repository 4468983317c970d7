//! What Parley's operator and chat server agree on, defined once for both.
//!
//! - [`topology`]: the RabbitMQ exchanges and queues of one chat deployment, declared idempotently;
//! - [`config`]: the chat server's configuration, as flags, environment variables and the TOML file the
//!   operator renders into each ChatDeployment's ConfigMap;
//! - [`provider`]: the translation providers;
//! - `chart_check` (feature `chart-check`, for tests): the chart's dashboard and alert queries against
//!   the metrics a process exports.

#![forbid(unsafe_code)]

#[cfg(feature = "chart-check")]
pub mod chart_check;
pub mod config;
pub mod provider;
pub mod topology;
