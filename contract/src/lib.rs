//! What Parley's operator and chat server agree on, defined once for both.
//!
//! - [`topology`]: the RabbitMQ exchanges and queues of one chat deployment, declared idempotently;
//! - [`config`]: the chat server's configuration, as flags, environment variables and the TOML file the
//!   operator renders into each ChatDeployment's ConfigMap;
//! - [`provider`]: the translation providers.

#![forbid(unsafe_code)]

pub mod config;
pub mod provider;
pub mod topology;
