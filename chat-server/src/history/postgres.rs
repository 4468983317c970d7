//! History on PostgreSQL: durable across restarts and fanout failover.
//!
//! Each batch is one transaction: the chats' rows are locked (in a fixed order, so two writers never
//! deadlock), redeliveries are looked up by (message id, language), and the new deliveries get the
//! next numbers after each chat's stored `last_seq`, in one multi-row insert. A writer that is not
//! the active fanout any more waits on the locks and then sees the numbers the active one gave.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use sqlx::{
    error::BoxDynError,
    migrate::{Migration, MigrationSource, MigrationType, Migrator},
    postgres::{PgConnection, PgPool, PgPoolOptions, PgRow},
    Connection as _, Row,
};
use uuid::Uuid;

use super::{
    keys::{Claim, Claimed, IdempotencyKeys},
    Appended, ChatSummary, History, HistoryError, Languages, Stored,
};
use crate::wire::{Delivery, WIRE_VERSION};

/// The migrations, embedded in the binary, as a source sqlx's migrator reads; the fanout applies them
/// at start, under sqlx's lock.
#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async {
            let migration = |version, name, sql| {
                Migration::new(version, Cow::Borrowed(name), MigrationType::Simple, Cow::Borrowed(sql), false)
            };
            Ok(vec![
                migration(1, "history", include_str!("../../migrations/0001_history.sql")),
                migration(2, "idempotency keys", include_str!("../../migrations/0002_idempotency_keys.sql")),
                migration(3, "sender id", include_str!("../../migrations/0003_sender_id.sql")),
            ])
        })
    }
}

/// The columns of a delivery, in the order [`delivery`] reads them, with its reply count.
macro_rules! columns {
    () => {
        "d.chat_id, d.seq, d.message_id, d.language, d.source_language, d.original, d.text, d.sender, d.sent_at, \
         d.reply_to, (SELECT count(*) FROM parley_deliveries r WHERE r.reply_to = d.message_id AND r.original), \
         d.sender_id"
    };
}

fn delivery(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        v: WIRE_VERSION,
        chat_id: row.try_get(0)?,
        seq: row.try_get::<i64, _>(1)? as u64,
        id: row.try_get(2)?,
        language: row.try_get(3)?,
        source_language: row.try_get(4)?,
        original: row.try_get(5)?,
        text: row.try_get(6)?,
        sender: row.try_get(7)?,
        sent_at: row.try_get(8)?,
        reply_to: row.try_get(9)?,
        sender_id: row.try_get(11)?,
    })
}

fn stored(row: &PgRow) -> Result<Stored, sqlx::Error> {
    Ok(Stored { delivery: delivery(row)?.into(), reply_count: row.try_get(10)? })
}

/// The language filter as a query parameter: `NULL` keeps every language.
fn language_list(languages: Languages<'_>) -> Option<Vec<String>> {
    languages.0.map(<[String]>::to_vec)
}

/// Inserts numbered deliveries, skipping any stored already; returns how many it inserted.
async fn insert(tx: &mut sqlx::PgTransaction<'_>, rows: &[Delivery]) -> Result<u64, sqlx::Error> {
    let column = |f: fn(&Delivery) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let inserted = sqlx::query(
        "INSERT INTO parley_deliveries \
         (chat_id, seq, message_id, language, source_language, original, text, sender, sent_at, reply_to, sender_id) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::bool[], \
         $7::text[], $8::text[], $9::text[], $10::uuid[], $11::text[]) \
         ON CONFLICT (message_id, language) DO NOTHING",
    )
    .bind(column(|d| d.chat_id.clone()))
    .bind(rows.iter().map(|d| d.seq as i64).collect::<Vec<i64>>())
    .bind(rows.iter().map(|d| d.id).collect::<Vec<Uuid>>())
    .bind(column(|d| d.language.clone()))
    .bind(column(|d| d.source_language.clone()))
    .bind(rows.iter().map(|d| d.original).collect::<Vec<bool>>())
    .bind(column(|d| d.text.clone()))
    .bind(rows.iter().map(|d| d.sender.clone()).collect::<Vec<Option<String>>>())
    .bind(column(|d| d.sent_at.clone()))
    .bind(rows.iter().map(|d| d.reply_to).collect::<Vec<Option<Uuid>>>())
    .bind(rows.iter().map(|d| d.sender_id.clone()).collect::<Vec<Option<String>>>())
    .execute(&mut **tx)
    .await?;
    Ok(inserted.rows_affected())
}

/// The advisory lock of the fanout that enforces retention (advisory locks are per database).
const RETENTION_LOCK: i64 = 0x7061_726c_6579_0001;

pub struct PostgresHistory {
    pool: PgPool,
    /// The session holding [`RETENTION_LOCK`], when this process enforces retention: one fanout at a
    /// time does, and another takes over when its session ends.
    retention: tokio::sync::Mutex<Option<PgConnection>>,
}

impl PostgresHistory {
    /// Connects a pool; the database must answer within a few seconds.
    pub async fn connect(url: &str) -> Result<Self, HistoryError> {
        // Connections are opened ahead of need: opening one costs the batch that waits for it ~100 ms.
        let pool = PgPoolOptions::new()
            .min_connections(2)
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Self { pool, retention: tokio::sync::Mutex::default() })
    }

    /// Appends a batch that may hold redeliveries: the chats' rows locked, every delivery looked up first.
    async fn append_checking(&self, batch: Vec<Delivery>) -> Result<Vec<Appended>, HistoryError> {
        let mut chats: Vec<String> = batch.iter().map(|d| d.chat_id.clone()).collect();
        chats.sort();
        chats.dedup();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO parley_chats (chat_id, last_seq, last_message_at) \
             SELECT unnest($1::text[]), 0, now() ON CONFLICT (chat_id) DO NOTHING",
        )
        .bind(&chats)
        .execute(&mut *tx)
        .await?;
        // Locked in one order, byte order as the fast path's, so two writers never wait on each other
        // in a circle.
        let rows = sqlx::query(
            "SELECT chat_id, last_seq FROM parley_chats WHERE chat_id = ANY($1) ORDER BY chat_id COLLATE \"C\" FOR UPDATE",
        )
        .bind(&chats)
        .fetch_all(&mut *tx)
        .await?;
        let mut last_seq: HashMap<String, u64> = HashMap::new();
        for row in rows {
            last_seq.insert(row.try_get(0)?, row.try_get::<i64, _>(1)? as u64);
        }
        let ids: Vec<Uuid> = batch.iter().map(|d| d.id).collect();
        let languages: Vec<String> = batch.iter().map(|d| d.language.clone()).collect();
        let query = concat!(
            "SELECT ",
            columns!(),
            " FROM parley_deliveries d \
             JOIN UNNEST($1::uuid[], $2::text[]) AS k(message_id, language) USING (message_id, language)"
        );
        let mut duplicates: HashMap<(Uuid, String), Delivery> = HashMap::new();
        for row in sqlx::query(query).bind(&ids).bind(&languages).fetch_all(&mut *tx).await? {
            let found = delivery(&row)?;
            duplicates.insert((found.id, found.language.clone()), found);
        }
        let mut appended = Vec::with_capacity(batch.len());
        let mut fresh: Vec<Delivery> = Vec::new();
        for delivery in batch {
            if let Some(stored) = duplicates.get(&(delivery.id, delivery.language.clone())) {
                appended.push(Appended::Duplicate(stored.clone()));
                continue;
            }
            let seq = last_seq.entry(delivery.chat_id.clone()).or_default();
            *seq += 1;
            let mut delivery = delivery;
            delivery.seq = *seq;
            fresh.push(delivery.clone());
            appended.push(Appended::New(delivery));
        }
        if !fresh.is_empty() {
            // Under the chats' locks nothing else can have stored these: a row skipped here would be
            // a number published but never stored, a gap in the history.
            let inserted = insert(&mut tx, &fresh).await?;
            if inserted != fresh.len() as u64 {
                return Err(HistoryError::Conflict { expected: fresh.len() as u64, inserted });
            }
        }
        let (chats, seqs): (Vec<String>, Vec<i64>) = last_seq.into_iter().map(|(chat, seq)| (chat, seq as i64)).unzip();
        sqlx::query(
            "UPDATE parley_chats c SET last_seq = v.seq, last_message_at = now() \
             FROM UNNEST($1::text[], $2::bigint[]) AS v(chat_id, seq) WHERE c.chat_id = v.chat_id AND v.seq > c.last_seq",
        )
        .bind(&chats)
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(appended)
    }

    /// Applies the embedded migrations that have not run yet (a no-op when all have).
    pub async fn migrate(&self) -> Result<(), HistoryError> {
        Migrator::new(Embedded).await?.run(&self.pool).await?;
        Ok(())
    }
}

#[async_trait]
impl History for PostgresHistory {
    async fn append(&self, batch: Vec<Delivery>) -> Result<Vec<Appended>, HistoryError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Most batches hold no redelivery: number them from each chat's count, raised in the same
        // statement that locks its row, and insert. Should any delivery turn out to be stored already,
        // the transaction is dropped and the batch goes the careful way.
        // Sorted, so that two writers lock the chats' rows in one order and never deadlock.
        let mut per_chat: BTreeMap<String, i64> = BTreeMap::new();
        for d in &batch {
            *per_chat.entry(d.chat_id.clone()).or_default() += 1;
        }
        let mut tx = self.pool.begin().await?;
        let (chats, counts): (Vec<String>, Vec<i64>) = per_chat.iter().map(|(chat, n)| (chat.clone(), *n)).unzip();
        let rows = sqlx::query(
            "INSERT INTO parley_chats AS c (chat_id, last_seq, last_message_at) \
             SELECT chat_id, n, now() FROM UNNEST($1::text[], $2::bigint[]) AS v(chat_id, n) \
             ON CONFLICT (chat_id) DO UPDATE SET last_seq = c.last_seq + EXCLUDED.last_seq, last_message_at = now() \
             RETURNING chat_id, last_seq",
        )
        .bind(&chats)
        .bind(&counts)
        .fetch_all(&mut *tx)
        .await?;
        let mut next: HashMap<String, u64> = HashMap::new();
        for row in rows {
            let chat: String = row.try_get(0)?;
            let last = row.try_get::<i64, _>(1)? as u64;
            let count = per_chat.get(&chat).copied().unwrap_or(0) as u64;
            next.insert(chat, last - count);
        }
        let mut numbered = batch.clone();
        for delivery in &mut numbered {
            let seq = next.entry(delivery.chat_id.clone()).or_default();
            *seq += 1;
            delivery.seq = *seq;
        }
        // One multi-row insert for the whole batch.
        if insert(&mut tx, &numbered).await? < numbered.len() as u64 {
            drop(tx);
            return self.append_checking(batch).await;
        }
        tx.commit().await?;
        Ok(numbered.into_iter().map(Appended::New).collect())
    }

    async fn latest(
        &self,
        chat_id: &str,
        languages: Languages<'_>,
        last: u32,
        before: Option<u64>,
    ) -> Result<Vec<Stored>, HistoryError> {
        let query = concat!(
            "SELECT ",
            columns!(),
            " FROM parley_deliveries d WHERE d.chat_id = $1 AND d.seq < $2 \
             AND (d.original OR $3::text[] IS NULL OR d.language = ANY($3)) ORDER BY d.seq DESC LIMIT $4"
        );
        let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        let rows = sqlx::query(query)
            .bind(chat_id)
            .bind(before)
            .bind(language_list(languages))
            .bind(i64::from(last))
            .fetch_all(&self.pool)
            .await?;
        let mut found = rows.iter().map(stored).collect::<Result<Vec<_>, _>>()?;
        found.reverse();
        Ok(found)
    }

    async fn range(
        &self,
        chat_id: &str,
        languages: Languages<'_>,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<Stored>, HistoryError> {
        let query = concat!(
            "SELECT ",
            columns!(),
            " FROM parley_deliveries d WHERE d.chat_id = $1 AND d.seq > $2 AND d.seq <= $3 \
             AND (d.original OR $4::text[] IS NULL OR d.language = ANY($4)) ORDER BY d.seq LIMIT $5"
        );
        let clamp = |n: u64| n.min(i64::MAX as u64) as i64;
        let rows = sqlx::query(query)
            .bind(chat_id)
            .bind(clamp(after))
            .bind(clamp(up_to))
            .bind(language_list(languages))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(stored).collect::<Result<_, _>>()?)
    }

    async fn last_seq(&self, chat_id: &str) -> Result<u64, HistoryError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM parley_chats WHERE chat_id = $1")
            .bind(chat_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(seq.unwrap_or(0) as u64)
    }

    async fn thread(&self, message_id: Uuid, languages: Languages<'_>) -> Result<Vec<Stored>, HistoryError> {
        let query = concat!(
            "SELECT ",
            columns!(),
            " FROM parley_deliveries d WHERE (d.message_id = $1 OR d.reply_to = $1) \
             AND (d.original OR $2::text[] IS NULL OR d.language = ANY($2)) ORDER BY d.seq"
        );
        let rows = sqlx::query(query).bind(message_id).bind(language_list(languages)).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(stored).collect::<Result<_, _>>()?)
    }

    async fn chat_of(&self, message_id: Uuid) -> Result<Option<String>, HistoryError> {
        Ok(sqlx::query_scalar("SELECT chat_id FROM parley_deliveries WHERE message_id = $1 AND original LIMIT 1")
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn chats(&self, first: u32) -> Result<Vec<ChatSummary>, HistoryError> {
        let rows = sqlx::query(
            "SELECT chat_id, last_seq, to_char(last_message_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
             FROM parley_chats WHERE last_seq > 0 ORDER BY last_message_at DESC, chat_id LIMIT $1",
        )
        .bind(i64::from(first))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ChatSummary {
                    chat_id: row.try_get(0)?,
                    last_seq: row.try_get::<i64, _>(1)? as u64,
                    last_message_at: row.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(HistoryError::from)
    }

    /// Deletes only in the process that holds the retention lock (taking it when it is free): the
    /// other fanouts delete nothing, so two never delete at once.
    async fn expire(&self, cutoff: SystemTime, limit: u32) -> Result<u64, HistoryError> {
        let mut owner = self.retention.lock().await;
        if owner.is_none() {
            // A session of its own, out of the pool: the lock lasts as long as it does.
            let mut session = self.pool.acquire().await?.detach();
            let granted: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RETENTION_LOCK)
                .fetch_one(&mut session)
                .await?;
            if !granted {
                let _ = session.close().await;
                return Ok(0);
            }
            tracing::info!("this fanout enforces the history's retention");
            *owner = Some(session);
        }
        let session = owner.as_mut().expect("the retention session was just set");
        let cutoff = cutoff.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let deleted = sqlx::query(
            "DELETE FROM parley_deliveries WHERE ctid IN \
             (SELECT ctid FROM parley_deliveries WHERE stored_at < to_timestamp($1) LIMIT $2)",
        )
        .bind(cutoff)
        .bind(i64::from(limit))
        .execute(&mut *session)
        .await;
        // Idempotency keys go with the history they name (a retry then sends anew).
        let deleted = match deleted {
            Ok(deliveries) => sqlx::query(
                "DELETE FROM parley_idempotency_keys WHERE ctid IN \
                 (SELECT ctid FROM parley_idempotency_keys WHERE claimed_at < to_timestamp($1) LIMIT $2)",
            )
            .bind(cutoff)
            .bind(i64::from(limit))
            .execute(&mut *session)
            .await
            .map(|keys| deliveries.rows_affected().max(keys.rows_affected())),
            Err(err) => Err(err),
        };
        match deleted {
            Ok(deleted) => Ok(deleted),
            Err(err) => {
                // The session (and with it the lock) may be gone: start over next time.
                *owner = None;
                Err(err.into())
            }
        }
    }

    fn keys(self: std::sync::Arc<Self>) -> std::sync::Arc<dyn IdempotencyKeys> {
        self
    }

    async fn ready(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

#[async_trait]
impl IdempotencyKeys for PostgresHistory {
    async fn claim(&self, claim: Claim<'_>) -> Result<Claimed, HistoryError> {
        let sender = claim.sender.unwrap_or_default();
        // Twice at most: retention may delete the claim between the two statements.
        for _ in 0..2 {
            // A claim older than the window gives way to this one; a live one stays and is answered.
            let row = sqlx::query(
                "INSERT INTO parley_idempotency_keys AS k (chat_id, sender, key, message_id, sent_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (chat_id, sender, key) DO UPDATE \
                 SET message_id = EXCLUDED.message_id, sent_at = EXCLUDED.sent_at, claimed_at = now() \
                 WHERE k.claimed_at < now() - make_interval(secs => $6) \
                 RETURNING message_id",
            )
            .bind(claim.chat_id)
            .bind(sender)
            .bind(claim.key)
            .bind(claim.id)
            .bind(claim.sent_at)
            .bind(claim.window.as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
            if row.is_some() {
                return Ok(Claimed { id: claim.id, sent_at: claim.sent_at.to_owned(), first: true });
            }
            let row = sqlx::query(
                "SELECT message_id, sent_at FROM parley_idempotency_keys \
                 WHERE chat_id = $1 AND sender = $2 AND key = $3",
            )
            .bind(claim.chat_id)
            .bind(sender)
            .bind(claim.key)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row {
                return Ok(Claimed { id: row.try_get(0)?, sent_at: row.try_get(1)?, first: false });
            }
        }
        Err(HistoryError::Database(sqlx::Error::RowNotFound))
    }
}
