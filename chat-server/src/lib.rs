//! Parley chat server: one binary, one role per process (or all of them in `standalone`).
//!
//! - [`gateway`]: GraphQL over HTTP and WebSocket for clients;
//! - [`auth`]: sign-in, group authorization and abuse limits at the gateway;
//! - [`translator`]: one language's translations, from a provider;
//! - [`fanout`]: sequencing, de-duplication and routing of every delivery to the gateways;
//! - [`bus`]: RabbitMQ, or an in-process stand-in, below all three; [`history`]: the chat history
//!   the fanout writes and the gateways read;
//! - [`roles`]: starting each role; [`config`], [`health`], [`metrics`], [`telemetry`] and [`wire`]
//!   are shared by all of them.

#![forbid(unsafe_code)]

pub mod auth;
pub mod bus;
pub mod config;
pub mod fanout;
pub mod gateway;
pub mod health;
pub mod history;
pub mod metrics;
pub mod roles;
pub mod telemetry;
pub mod translator;
pub mod wire;
