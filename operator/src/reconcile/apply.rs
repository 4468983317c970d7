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
    for monitor in &desired.pod_monitors {
        apply_one(client, namespace, monitor).await?;
    }
    let mut deployments = Vec::new();
    for deployment in &desired.deployments {
        deployments.push(apply_one(client, namespace, deployment).await?);
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
