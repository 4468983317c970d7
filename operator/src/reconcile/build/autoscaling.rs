//! KEDA objects for languages in `keda` autoscaling mode: a ScaledObject each, one TriggerAuthentication.

use std::collections::BTreeMap;

use super::{metadata, Inputs};
use crate::{
    keda::{
        AuthenticationRef, ScaleTargetRef, ScaledObject, ScaledObjectSpec, SecretTargetRef, Trigger,
        TriggerAuthentication, TriggerAuthenticationSpec,
    },
    names::Component,
    reconcile::validate::{Bounds, ValidatedChat},
};

pub fn trigger_authentication(chat: &ValidatedChat, inputs: &Inputs) -> TriggerAuthentication {
    let names = &chat.names;
    TriggerAuthentication {
        metadata: metadata(names, names.broker_auth(), Component::Translator, None, inputs),
        spec: TriggerAuthenticationSpec {
            secret_target_ref: vec![SecretTargetRef {
                parameter: "host".into(),
                name: chat.broker.name.clone(),
                key: chat.broker.key.clone(),
            }],
        },
    }
}

pub fn scaled_object(chat: &ValidatedChat, code: &str, bounds: &Bounds, inputs: &Inputs) -> ScaledObject {
    let names = &chat.names;
    let queue = chat.topology.translate_queue(code);
    let behavior = serde_json::json!({"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": {
        "stabilizationWindowSeconds": bounds.scale_down_window.as_secs()
    }}}});
    ScaledObject {
        metadata: metadata(names, names.translator(code), Component::Translator, Some(code), inputs),
        spec: ScaledObjectSpec {
            scale_target_ref: ScaleTargetRef { name: names.translator(code) },
            min_replica_count: bounds.min,
            max_replica_count: bounds.max,
            advanced: Some(behavior),
            triggers: vec![Trigger {
                type_: "rabbitmq".into(),
                metadata: BTreeMap::from([
                    ("protocol".to_owned(), "amqp".to_owned()),
                    ("queueName".to_owned(), queue),
                    ("mode".to_owned(), "QueueLength".to_owned()),
                    ("value".to_owned(), bounds.target_backlog.to_string()),
                ]),
                authentication_ref: Some(AuthenticationRef { name: names.broker_auth() }),
            }],
        },
    }
}
