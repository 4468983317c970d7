//! chat-server's integration tests, as one test binary: real chat-server processes on a real RabbitMQ
//! with real Apertium APYs. `cargo test -p chat-server --test chat <module>::` runs one part.

mod auth;
mod broker;
mod browser;
mod chaos;
mod configuration;
mod disruptive;
mod end_to_end;
mod failures;
mod history;
mod history_api;
mod idempotency;
mod metrics;
mod protocol;
mod proxy;
mod resume;
mod standalone;
mod support;
mod traces;
mod translation;
