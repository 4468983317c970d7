//! Parley operator: reconciles `ChatDeployment`s into running multilingual chats.

#![forbid(unsafe_code)]

pub mod build;
pub mod crd;
pub mod names;
pub mod validate;
