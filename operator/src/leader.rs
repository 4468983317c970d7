//! Leader election on a `coordination.k8s.io` Lease, so several operator replicas are safe: one reconciles, the rest wait.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    api::{ObjectMeta, PostParams},
    Api, Client,
};

use crate::reconcile::{Clock, SystemClock};

/// How long a lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// A leader that could not renew for this long stops leading: shorter than the lease, so two never lead at once.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// How soon a leader whose renewal failed tries again (within what is left of `RENEW_DEADLINE`).
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    clock: Arc<dyn Clock>,
    /// The holder's record as last seen, and when this process saw it change. Expiry is timed from
    /// this local observation (as client-go does), never from the holder's `renewTime`, which comes
    /// from another machine's clock.
    observed: Mutex<Option<(Record, Timestamp)>>,
}

/// What a renewal changes in a Lease.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renewed: Option<Timestamp>,
    duration: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone(),
            renewed: spec.renew_time.as_ref().map(|t| t.0),
            duration: spec.lease_duration_seconds,
        }
    }
}

/// The default identity of a replica in the Lease: its hostname (the pod name in Kubernetes) and a
/// random suffix, so two containers without `POD_NAME` never share one.
pub fn default_identity() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "operator".into());
    // Each RandomState carries fresh random keys: the hash of nothing is a random number.
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    format!("{host}-{:08x}", random as u32)
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            clock: Arc::new(SystemClock),
            observed: Mutex::new(None),
        }
    }

    /// Reads the time from `clock` (a test's) instead of the system's.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn spec(&self, now: Timestamp, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Notes the record seen now; says whether it has stayed unchanged, by this process's clock, for
    /// longer than its duration.
    fn expired(&self, record: &Record, now: Timestamp) -> bool {
        let mut observed = self.observed.lock().expect("observed lock");
        let since = match observed.as_ref() {
            Some((seen, at)) if seen == record => *at,
            _ => {
                *observed = Some((record.clone(), now));
                now
            }
        };
        let duration = record.duration.unwrap_or(LEASE_DURATION.as_secs() as i32).max(0);
        record.holder.is_none() || since + SignedDuration::from_secs(duration.into()) < now
    }

    /// Takes or renews the lease; `Ok(true)` while this process holds it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = self.clock.now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(now, 0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !mine && !self.expired(&Record::of(&spec), now) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let renewed = self.spec(now, transitions, if mine { spec.acquire_time } else { None });
        lease.spec = Some(renewed.clone());
        // The resourceVersion in `lease` makes this a compare-and-swap: a racing candidate gets 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                *self.observed.lock().expect("observed lock") = Some((Record::of(&renewed), now));
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the lease up on shutdown so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            if let Some(spec) = lease.spec.as_mut() {
                if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                    let _ = self.api.replace(&self.name, &PostParams::default(), &lease).await;
                }
            }
        }
    }
}
