//! Apply: server-side apply of the desired objects with one field manager, then prune what is owned but no longer desired.

use std::{
    collections::{HashMap, HashSet},
    fmt::Debug,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        networking::v1::NetworkPolicy,
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
    applies_replicas_of(live.meta())
}

/// [`applies_replicas`] for any object with a `spec.replicas`, from its managed fields.
pub fn applies_replicas_of(meta: &kube::api::ObjectMeta) -> bool {
    meta.managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry.operation.as_deref() == Some("Apply")
            && entry.subresource.as_deref().unwrap_or_default().is_empty()
            && entry.fields_v1.as_ref().is_some_and(|fields| fields.0.pointer("/f:spec/f:replicas").is_some())
    })
}

/// Before the operator stops setting a Deployment's replicas (a language switched to KEDA or left
/// to `kubectl scale`), another manager takes the field over at its current value, so that the apply
/// that omits it leaves it as it is: the documented way to hand a field over under server-side apply.
/// It must be an apply: an update that writes the value the field already has changes nothing, and
/// so takes no ownership (a real API server then removes the field all the same). Generic over the
/// kind so that a real API server, which here serves custom resources only, can check it on a
/// stand-in with a defaulted `spec.replicas`.
pub async fn hand_over_replicas<K>(
    api: &Api<K>,
    kind: &K::DynamicType,
    meta: &kube::api::ObjectMeta,
    replicas: Option<i32>,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(replicas) = replicas else { return Ok(()) };
    if !applies_replicas_of(meta) {
        return Ok(());
    }
    let name = meta.name.clone().unwrap_or_default();
    tracing::info!(object = %name, replicas, "handing replicas over before no longer setting them");
    let patch = serde_json::json!({
        "apiVersion": K::api_version(kind),
        "kind": K::kind(kind),
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    // Forced: the value is the one the operator set, so on a real API server the two managers simply
    // share the field; an API that calls even an equal value a conflict gets it taken over.
    api.patch(&name, &PatchParams::apply(REPLICAS_HANDOFF_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// What the operator last applied, per object: a digest of the desired object and what the API server
/// then had (its generation where it keeps one, else its resourceVersion). An object whose desired
/// state and live marker are both unchanged is not applied again, so a reconcile that changes nothing
/// writes nothing.
#[derive(Default)]
pub struct Applied(std::sync::Mutex<HashMap<String, (u64, String)>>);

impl Applied {
    fn key<K: Resource<DynamicType = ()>>(object: &K) -> String {
        format!("{}/{}/{}", K::kind(&()), object.namespace().unwrap_or_default(), object.name_any())
    }

    /// What changes on the live object when its spec (or, without a generation, anything) changes:
    /// a Deployment's status updates move its resourceVersion, not its generation.
    fn marker<K: Resource>(live: &K) -> String {
        match live.meta().generation {
            Some(generation) if generation > 0 => format!("g{generation}"),
            _ => format!("r{}", live.meta().resource_version.clone().unwrap_or_default()),
        }
    }

    fn digest<K: Serialize>(desired: &K) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_vec(desired).expect("objects serialize").hash(&mut hasher);
        hasher.finish()
    }

    fn unchanged<K: Resource<DynamicType = ()> + Serialize>(&self, desired: &K, live: &K) -> bool {
        let seen = self.0.lock().expect("applied lock");
        seen.get(&Self::key(desired)) == Some(&(Self::digest(desired), Self::marker(live)))
    }

    fn record<K: Resource<DynamicType = ()> + Serialize>(&self, desired: &K, live: &K) {
        let value = (Self::digest(desired), Self::marker(live));
        self.0.lock().expect("applied lock").insert(Self::key(desired), value);
    }

    /// Forgets the objects of a ChatDeployment in `namespace` named `instance…` (once it is deleted).
    pub fn forget(&self, namespace: &str, instance: &str) {
        let owned = |key: &String| {
            let mut parts = key.split('/').skip(1);
            parts.next() == Some(namespace)
                && parts.next().is_some_and(|n| n == instance || n.starts_with(&format!("{instance}-")))
        };
        self.0.lock().expect("applied lock").retain(|key, _| !owned(key));
    }
}

/// Applies each of `desired` of kind `K` unless it and its live copy are as last applied; returns
/// every one as the API server has it.
async fn apply_kind<K>(
    client: &Client,
    names: &Names,
    applied: &Applied,
    desired: &[K],
    before_apply: impl BeforeApply<K>,
) -> Result<Vec<K>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    if desired.is_empty() {
        return Ok(Vec::new());
    }
    let api: Api<K> = Api::namespaced(client.clone(), &names.namespace);
    let live: HashMap<String, K> = api
        .list(&ListParams::default().labels(&names.owned_selector()))
        .await?
        .items
        .into_iter()
        .map(|o| (o.name_any(), o))
        .collect();
    let mut result = Vec::with_capacity(desired.len());
    for object in desired {
        let current = live.get(&object.name_any());
        if let Some(current) = current.filter(|current| applied.unchanged(object, current)) {
            result.push(current.clone());
            continue;
        }
        let adjusted = before_apply.run(&api, object, current).await?;
        let now = apply_one(client, &names.namespace, adjusted.as_ref().unwrap_or(object)).await?;
        applied.record(object, &now);
        result.push(now);
    }
    Ok(result)
}

/// Work done just before an object is applied, and the object to apply instead of the desired one,
/// if any (nothing, but for Deployments).
pub trait BeforeApply<K> {
    fn run(
        &self,
        api: &Api<K>,
        desired: &K,
        live: Option<&K>,
    ) -> impl std::future::Future<Output = Result<Option<K>, kube::Error>>;
}

struct Nothing;

impl<K> BeforeApply<K> for Nothing {
    async fn run(&self, _: &Api<K>, _: &K, _: Option<&K>) -> Result<Option<K>, kube::Error> {
        Ok(None)
    }
}

/// For Deployments: the replicas handover, and the selector a live Deployment already has, which is
/// immutable: one created before the selector gained Parley's deployment label keeps the old one
/// (its pods carry both), where applying the new one would be refused.
struct Deployments;

impl BeforeApply<Deployment> for Deployments {
    async fn run(
        &self,
        api: &Api<Deployment>,
        desired: &Deployment,
        live: Option<&Deployment>,
    ) -> Result<Option<Deployment>, kube::Error> {
        let Some(live) = live else { return Ok(None) };
        if desired.spec.as_ref().is_some_and(|s| s.replicas.is_none()) {
            hand_over_replicas(api, &(), live.meta(), live.spec.as_ref().and_then(|s| s.replicas)).await?;
        }
        let live_selector = live.spec.as_ref().map(|s| &s.selector);
        if live_selector.is_some_and(|l| Some(l) != desired.spec.as_ref().map(|s| &s.selector)) {
            let mut kept = desired.clone();
            if let (Some(spec), Some(selector)) = (kept.spec.as_mut(), live_selector) {
                spec.selector = selector.clone();
            }
            return Ok(Some(kept));
        }
        Ok(None)
    }
}

/// Applies everything in `desired` that is not as last applied, and returns the Deployments as the
/// API server now has them.
pub async fn apply(
    client: &Client,
    names: &Names,
    applied: &Applied,
    desired: &Desired,
) -> Result<Vec<Deployment>, kube::Error> {
    apply_kind(client, names, applied, std::slice::from_ref(&desired.config_map), Nothing).await?;
    apply_kind(client, names, applied, &desired.services, Nothing).await?;
    apply_kind(client, names, applied, &desired.disruption_budgets, Nothing).await?;
    // Before the pods they cover: a new pod never runs unrestricted.
    apply_kind(client, names, applied, &desired.network_policies, Nothing).await?;
    apply_kind(client, names, applied, &desired.scaled_objects, Nothing).await?;
    apply_kind(client, names, applied, &desired.trigger_authentications, Nothing).await?;
    let deployments = apply_kind(client, names, applied, &desired.deployments, Deployments).await?;
    // After the workloads: a monitor refused never holds the chat itself back.
    apply_kind(client, names, applied, &desired.pod_monitors, Nothing).await?;
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
    // Built in, so always pruned: `spec.networkPolicy.enabled: false` deletes those made before.
    let policies = keep(desired.network_policies.iter().map(|o| &o.metadata.name));
    deleted.extend(prune_kind::<NetworkPolicy>(client, names, &policies).await?);
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
