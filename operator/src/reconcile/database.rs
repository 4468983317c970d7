//! The history step: whether the chat's history database answers, as the chat server will ask it.

use std::time::Duration;

use sqlx::{postgres::PgConnectOptions, ConnectOptions, Connection};

use super::observe::SecretError;
use crate::events::Reason;

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
    let unreachable = |detail: String| DatabaseError::Unreachable { url: redacted(url), detail };
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
