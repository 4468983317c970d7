//! Apply: server-side apply of the desired objects with one field manager, then prune what is owned but no longer desired.

use std::{collections::HashSet, fmt::Debug};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        policy::v1::PodDisruptionBudget,
    },
    NamespaceResourceScope,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams},
    Api, Client, Resource, ResourceExt,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    keda::{ScaledObject, TriggerAuthentication},
    monitoring::PodMonitor,
    names::{Names, FIELD_MANAGER},
    reconcile::build::Desired,
};

async fn apply_one<K>(client: &Client, namespace: &str, object: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&object.name_any(), &params, &Patch::Apply(object)).await
}

/// Deletes the objects of kind `K` that carry this ChatDeployment's ownership labels but are not in `keep`.
async fn prune_kind<K>(client: &Client, names: &Names, keep: &HashSet<String>) -> Result<Vec<String>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &names.namespace);
    let owned = api.list(&ListParams::default().labels(&names.owned_selector())).await?;
    let mut deleted = Vec::new();
    for object in owned.items {
        let name = object.name_any();
        if !keep.contains(&name) {
            api.delete(&name, &DeleteParams::background()).await?;
            deleted.push(format!("{}/{name}", K::kind(&())));
        }
    }
    Ok(deleted)
}

/// The field manager that keeps a Deployment's `replicas` once the operator stops setting it.
pub const REPLICAS_HANDOFF_MANAGER: &str = "parley-operator-handoff";

/// Whether the operator's own apply is what owns `spec.replicas` of `live`: omitting the field from
/// the next apply would then make the API server remove it, and the default of 1 would apply.
pub fn applies_replicas(live: &Deployment) -> bool {
    live.metadata.managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry.operation.as_deref() == Some("Apply")
            && entry.subresource.as_deref().unwrap_or_default().is_empty()
            && entry.fields_v1.as_ref().is_some_and(|fields| fields.0.pointer("/f:spec/f:replicas").is_some())
    })
}

/// Before the operator stops setting a Deployment's replicas (a language switched to KEDA or left
/// to `kubectl scale`), another manager takes the field over at its current value, so that the apply
/// that omits it leaves it as it is: the documented way to hand a field over under server-side apply.
async fn hand_over_replicas(api: &Api<Deployment>, desired: &Deployment) -> Result<(), kube::Error> {
    let Some(live) = api.get_opt(&desired.name_any()).await? else { return Ok(()) };
    let Some(replicas) = live.spec.as_ref().and_then(|s| s.replicas) else { return Ok(()) };
    if !applies_replicas(&live) {
        return Ok(());
    }
    tracing::info!(deployment = desired.name_any(), replicas, "handing replicas over before no longer setting them");
    let patch = serde_json::json!({"spec": {"replicas": replicas}});
    let params = PatchParams { field_manager: Some(REPLICAS_HANDOFF_MANAGER.into()), ..Default::default() };
    api.patch(&desired.name_any(), &params, &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Applies everything in `desired` and returns the Deployments as the API server now has them.
pub async fn apply(client: &Client, namespace: &str, desired: &Desired) -> Result<Vec<Deployment>, kube::Error> {
    apply_one(client, namespace, &desired.config_map).await?;
    for service in &desired.services {
        apply_one(client, namespace, service).await?;
    }
    for budget in &desired.disruption_budgets {
        apply_one(client, namespace, budget).await?;
    }
    for scaled in &desired.scaled_objects {
        apply_one(client, namespace, scaled).await?;
    }
    for auth in &desired.trigger_authentications {
        apply_one(client, namespace, auth).await?;
    }
    let mut deployments = Vec::new();
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    for deployment in &desired.deployments {
        if deployment.spec.as_ref().is_some_and(|s| s.replicas.is_none()) {
            hand_over_replicas(&api, deployment).await?;
        }
        deployments.push(apply_one(client, namespace, deployment).await?);
    }
    // After the workloads: a monitor refused never holds the chat itself back.
    for monitor in &desired.pod_monitors {
        apply_one(client, namespace, monitor).await?;
    }
    Ok(deployments)
}

/// Which optional CRDs the cluster has.
#[derive(Debug, Clone, Copy, Default)]
pub struct Installed {
    pub keda: bool,
    pub pod_monitor: bool,
}

/// Deletes owned objects that are no longer desired (a removed language's Deployment); returns `Kind/name` of each.
/// KEDA and Prometheus Operator objects are pruned only where their CRDs are installed.
pub async fn prune(
    client: &Client,
    names: &Names,
    desired: &Desired,
    installed: Installed,
) -> Result<Vec<String>, kube::Error> {
    fn keep<'a>(names: impl Iterator<Item = &'a Option<String>>) -> HashSet<String> {
        names.flatten().cloned().collect()
    }
    let mut deleted =
        prune_kind::<Deployment>(client, names, &keep(desired.deployments.iter().map(|o| &o.metadata.name))).await?;
    deleted
        .extend(prune_kind::<Service>(client, names, &keep(desired.services.iter().map(|o| &o.metadata.name))).await?);
    let budgets = keep(desired.disruption_budgets.iter().map(|o| &o.metadata.name));
    deleted.extend(prune_kind::<PodDisruptionBudget>(client, names, &budgets).await?);
    let config_maps = keep(std::iter::once(&desired.config_map.metadata.name));
    deleted.extend(prune_kind::<ConfigMap>(client, names, &config_maps).await?);
    if installed.keda {
        let scaled = keep(desired.scaled_objects.iter().map(|o| &o.metadata.name));
        deleted.extend(prune_kind::<ScaledObject>(client, names, &scaled).await?);
        let auths = keep(desired.trigger_authentications.iter().map(|o| &o.metadata.name));
        deleted.extend(prune_kind::<TriggerAuthentication>(client, names, &auths).await?);
    }
    if installed.pod_monitor {
        let monitors = keep(desired.pod_monitors.iter().map(|o| &o.metadata.name));
        deleted.extend(prune_kind::<PodMonitor>(client, names, &monitors).await?);
    }
    Ok(deleted)
}
