//! Parley operator: reconciles `ChatDeployment`s into running multilingual chats.

#![forbid(unsafe_code)]

pub mod controller;
pub mod crd;
pub mod events;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod keda;
pub mod leader;
pub mod metrics;
pub mod monitoring;
pub mod names;
pub mod rbac;
pub mod reconcile;
pub mod run;

use kube::CustomResourceExt;

/// The CRD as YAML, exactly as checked in under `crds/`.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crd::ChatDeployment::crd()).expect("the CRD always serializes")
}
