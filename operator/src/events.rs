//! The reasons of the Events the operator writes, in one enum (condition reasons of the broker and
//! history steps come from it too).

use kube::runtime::events::EventType;

/// A PascalCase Event reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The spec cannot be reconciled (Warning).
    InvalidSpec,
    /// An owned object no longer in the spec was deleted.
    Pruned,
    /// The builtin autoscaler changed a language's replicas.
    TranslatorScaled,
    /// A removed language's queue was deleted: drained (Normal) or after the drain timeout (Warning).
    LanguageQueueDeleted,
    /// The finalizer deleted the broker topology.
    TopologyRemoved,
    /// The finalizer let go without deleting the broker topology (Warning).
    TopologyLeftBehind,
    /// The broker did not answer (Warning).
    BrokerUnreachable,
    /// The broker Secret does not exist (Warning).
    BrokerSecretNotFound,
    /// The broker Secret lacks the referenced key (Warning).
    BrokerSecretKeyMissing,
    /// The Secret of the broker's CA bundle does not exist (Warning).
    BrokerCaSecretNotFound,
    /// The Secret of the broker's CA bundle lacks the referenced key (Warning).
    BrokerCaSecretKeyMissing,
    /// The broker refused to declare the topology (Warning).
    TopologyFailed,
    /// The broker's management API (`broker.managementUrl`) did not answer as asked (Warning).
    ManagementApiFailed,
    /// The Secret of the gateway's JWT secret does not exist (Warning).
    JwtSecretNotFound,
    /// The Secret of the gateway's JWT secret lacks the referenced key (Warning).
    JwtSecretKeyMissing,
    /// The gateway's JWT secret is shorter than the 32 bytes the chat server accepts (Warning).
    JwtSecretTooShort,
    /// The history database's Secret does not exist (Warning).
    HistorySecretNotFound,
    /// The history database's Secret lacks the referenced key (Warning).
    HistorySecretKeyMissing,
    /// The history database did not answer (Warning).
    DatabaseUnreachable,
    /// The API server refused an object the chat needs (Warning).
    ApplyFailed,
    /// Reading what the chat references (its Secrets, its Deployments) failed.
    ReadFailed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidSpec => "InvalidSpec",
            Self::Pruned => "Pruned",
            Self::TranslatorScaled => "TranslatorScaled",
            Self::LanguageQueueDeleted => "LanguageQueueDeleted",
            Self::TopologyRemoved => "TopologyRemoved",
            Self::TopologyLeftBehind => "TopologyLeftBehind",
            Self::BrokerUnreachable => "BrokerUnreachable",
            Self::ManagementApiFailed => "ManagementApiFailed",
            Self::BrokerSecretNotFound => "BrokerSecretNotFound",
            Self::BrokerSecretKeyMissing => "BrokerSecretKeyMissing",
            Self::BrokerCaSecretNotFound => "BrokerCaSecretNotFound",
            Self::BrokerCaSecretKeyMissing => "BrokerCaSecretKeyMissing",
            Self::TopologyFailed => "TopologyFailed",
            Self::JwtSecretNotFound => "JwtSecretNotFound",
            Self::JwtSecretKeyMissing => "JwtSecretKeyMissing",
            Self::JwtSecretTooShort => "JwtSecretTooShort",
            Self::HistorySecretNotFound => "HistorySecretNotFound",
            Self::HistorySecretKeyMissing => "HistorySecretKeyMissing",
            Self::DatabaseUnreachable => "DatabaseUnreachable",
            Self::ApplyFailed => "ApplyFailed",
            Self::ReadFailed => "ReadFailed",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Event to publish on the ChatDeployment being reconciled.
#[derive(Debug, Clone)]
pub struct Note {
    pub kind: EventType,
    pub reason: Reason,
    pub text: String,
}

impl Note {
    pub fn normal(reason: Reason, text: impl Into<String>) -> Self {
        Self { kind: EventType::Normal, reason, text: text.into() }
    }

    pub fn warning(reason: Reason, text: impl Into<String>) -> Self {
        Self { kind: EventType::Warning, reason, text: text.into() }
    }
}
