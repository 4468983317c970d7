//! The history step: whether the chat's history database answers, as the chat server will ask it.

use std::time::Duration;

use sqlx::{postgres::PgConnectOptions, ConnectOptions, Connection};

use super::{
    observe::{Observed, SecretError},
    status::{HistoryReport, HISTORY_READY},
};
use crate::{
    crd::ChatDeploymentStatus,
    events::{Note, Reason},
};

/// How long the database may take to answer.
pub const DATABASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the history database cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DatabaseError {
    #[error("history database {0}")]
    Secret(#[from] SecretError),
    #[error("the history database at {url} does not answer: {detail}")]
    Unreachable { url: String, detail: String },
}

impl DatabaseError {
    /// The HistoryReady condition's reason.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Secret(SecretError::NotFound(_)) => Reason::HistorySecretNotFound,
            Self::Secret(SecretError::KeyMissing { .. }) => Reason::HistorySecretKeyMissing,
            Self::Unreachable { .. } => Reason::DatabaseUnreachable,
        }
    }
}

/// `url` with the password left out, for messages.
fn redacted(url: &str) -> String {
    match url.parse::<PgConnectOptions>() {
        Ok(options) => {
            format!("{}:{}/{}", options.get_host(), options.get_port(), options.get_database().unwrap_or_default())
        }
        Err(_) => "(an unreadable URI)".into(),
    }
}

/// Connects and runs `SELECT 1`.
pub async fn probe(url: &str) -> Result<(), DatabaseError> {
    let scrub = |text: &str| super::observe::scrub(text, url);
    let unreachable =
        |detail: String| DatabaseError::Unreachable { url: scrub(&redacted(url)), detail: scrub(&detail) };
    let options = url.parse::<PgConnectOptions>().map_err(|e| unreachable(format!("invalid URI: {e}")))?;
    let attempt = async {
        let mut connection = options.connect().await?;
        sqlx::query("SELECT 1").execute(&mut connection).await?;
        connection.close().await
    };
    match tokio::time::timeout(DATABASE_TIMEOUT, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(unreachable(err.to_string())),
        Err(_) => Err(unreachable(format!("no answer within {DATABASE_TIMEOUT:?}"))),
    }
}

/// What the history step found: `None` when the spec keeps no history.
#[derive(Debug)]
pub struct HistoryStep(pub Option<Result<(), DatabaseError>>);

impl HistoryStep {
    pub fn report(&self) -> Option<HistoryReport> {
        self.0.as_ref().map(|probed| match probed {
            Ok(()) => HistoryReport::Ready,
            Err(err) => HistoryReport::Failed { reason: err.reason().as_str().into(), message: err.to_string() },
        })
    }

    /// A Warning when the database stops answering: once, not on every reconcile while it stays down.
    pub fn note(&self, previous: Option<&ChatDeploymentStatus>) -> Option<Note> {
        let Some(Err(err)) = &self.0 else { return None };
        let was_failing =
            previous.iter().flat_map(|s| &s.conditions).any(|c| c.type_ == HISTORY_READY && c.status == "False");
        (!was_failing).then(|| Note::warning(err.reason(), err.to_string()))
    }
}

/// The history step of one reconcile: probes the database the observed Secret names, if any.
pub async fn step(observed: &Observed) -> HistoryStep {
    HistoryStep(match observed.history_url() {
        None => None,
        Some(Ok(url)) => Some(probe(&url).await),
        Some(Err(err)) => Some(Err(err.into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broken_database_uri_never_shows_its_password() {
        for uri in [
            "postgres:s3cret@127.0.0.1:1/db",
            "postgress://u:s3cret@127.0.0.1:1/db",
            "postgres://u:s3cret@127.0.0.1:1/db",
        ] {
            let Err(err) = probe(uri).await else { panic!("nothing listens there") };
            let text = err.to_string();
            assert!(!text.contains("s3cret"), "{uri}: {text}");
        }
    }
}
