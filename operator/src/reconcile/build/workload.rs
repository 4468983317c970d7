//! The Deployment every role runs in: one skeleton, and the pod template all three share (restricted
//! security, probes on the health endpoints, the configuration file and the secrets).

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
            HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
            SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use super::{metadata, Inputs};
use crate::{
    crd::{RoleOverrides, SecretKeyRef},
    names::{
        Component, BROKER_CA_DIR, BROKER_CA_FILE, CONFIG_DIR, CONFIG_FILE, CONFIG_HASH_ANNOTATION, GATEWAY_CONFIG_FILE,
        HTTP_PORT,
    },
    reconcile::validate::ValidatedChat,
};

/// One role's Deployment, as the build step wants it.
pub struct Workload<'a> {
    pub role: Component,
    /// The target language, for translators.
    pub language: Option<&'a str>,
    pub name: String,
    /// `None` leaves the field to whoever else scales the Deployment.
    pub replicas: Option<i32>,
    /// The `chat-server` subcommand and its arguments.
    pub args: Vec<String>,
    pub overrides: &'a RoleOverrides,
}

/// The Deployment of one role (and language, for translators).
pub fn deployment(chat: &ValidatedChat, inputs: &Inputs, workload: Workload<'_>, config_hash: &str) -> Deployment {
    let names = &chat.names;
    let Workload { role, language, name, replicas, args, overrides } = workload;
    Deployment {
        metadata: metadata(names, name, role, language, inputs),
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector { match_labels: Some(names.selector(role, language)), ..Default::default() },
            template: template(chat, role, language, args, overrides, config_hash),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// UID and GID of the chat-server image's non-root user.
const RUN_AS: i64 = 65532;

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

fn env_from_secret(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn runtime_default() -> Option<SeccompProfile> {
    Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() })
}

/// The pod template of one role (and language, for translators) running `chat-server <args>`.
fn template(
    chat: &ValidatedChat,
    role: Component,
    language: Option<&str>,
    args: Vec<String>,
    overrides: &RoleOverrides,
    config_hash: &str,
) -> PodTemplateSpec {
    let mut labels = chat.names.labels(role, language);
    if let Some(extra) = &overrides.labels {
        // Extra labels never replace the ones selectors and pruning rely on.
        for (key, value) in extra {
            labels.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    let mut annotations = overrides.annotations.clone().unwrap_or_default();
    annotations.insert(CONFIG_HASH_ANNOTATION.into(), config_hash.into());

    // The gateway reads its own file: the shared settings plus sign-in, which no other role may be given.
    let file = if role == Component::Gateway { GATEWAY_CONFIG_FILE } else { CONFIG_FILE };
    let mut env_vars = vec![
        env("PARLEY_CONFIG", &format!("{CONFIG_DIR}/{file}")),
        env("PARLEY_LISTEN", &format!("0.0.0.0:{HTTP_PORT}")),
        env_from_secret("PARLEY_AMQP_URL", &chat.broker),
    ];
    if let (Component::Gateway, Some(secret)) = (role, &chat.auth.jwt_secret) {
        env_vars.push(env_from_secret("PARLEY_JWT_SECRET", secret));
    }
    if role == Component::Translator {
        if let Some(key) = &chat.api_key {
            env_vars.push(env_from_secret("PARLEY_TRANSLATOR_API_KEY", key));
        }
    }
    // The fanout writes the history and the gateways read it; translators never touch it.
    if let (Component::Gateway | Component::Fanout, Some(history)) = (role, &chat.history) {
        env_vars.push(env_from_secret("PARLEY_HISTORY_URL", &history.database));
    }
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() },
    ];
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource { name: chat.names.config_map(), ..Default::default() }),
            ..Default::default()
        },
        Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
    ];
    // The broker's CA bundle, for every role: each connects to the broker. `amqp-ca-file` names it.
    if let Some(ca) = &chat.broker_ca {
        mounts.push(VolumeMount {
            name: "broker-ca".into(),
            mount_path: BROKER_CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "broker-ca".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ca.name.clone()),
                items: Some(vec![KeyToPath { key: ca.key.clone(), path: BROKER_CA_FILE.into(), mode: None }]),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let container = Container {
        name: "chat-server".into(),
        image: Some(chat.image.clone()),
        args: Some(args),
        ports: Some(vec![ContainerPort { name: Some("http".into()), container_port: HTTP_PORT, ..Default::default() }]),
        env: Some(env_vars),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        resources: overrides.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            seccomp_profile: runtime_default(),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels), annotations: Some(annotations), ..Default::default() }),
        spec: Some(PodSpec {
            containers: vec![container],
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: runtime_default(),
                ..Default::default()
            }),
            termination_grace_period_seconds: Some(30),
            node_selector: overrides.node_selector.clone(),
            tolerations: overrides.tolerations.clone(),
            affinity: overrides.affinity.clone(),
            volumes: Some(volumes),
            ..Default::default()
        }),
    }
}
