//! Parley chat server: GraphQL gateway, translators and fanout wired through a message bus.

#![forbid(unsafe_code)]

pub mod bus;
pub mod config;
pub mod fanout;
pub mod graphql;
pub mod http;
pub mod hub;
pub mod roles;
pub mod shared;
pub mod translator;
pub mod wire;
