//! Whether a role's bus still makes progress while it has work: what `/healthz` answers.
//!
//! Progress is anything the broker finished for the role: a message delivered, an ack or a publish
//! confirmed. Work is an operation in flight, or messages waiting in a queue the role consumes. A
//! role that has work and no progress for the stall timeout is stuck (a confirm that never comes on a
//! connection whose socket went quiet, a consumer the broker no longer serves), and only a restart
//! helps: `/healthz` fails, and Kubernetes restarts the pod.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[derive(Debug)]
struct State {
    /// The last progress (or the start).
    last: Instant,
    /// Broker operations in flight, and since when there has been at least one.
    pending: usize,
    pending_since: Option<Instant>,
    /// Since when the connection is seen down.
    disconnected_since: Option<Instant>,
    /// Since when messages wait in a consumed queue, and which.
    backlog_since: Option<(Instant, String)>,
    /// Messages delivered and not settled yet: a consumer holding some is busy (a translator waiting
    /// out its provider), not stuck.
    unsettled: usize,
    /// Consumers on this bus. The backlog rule holds for one alone (a worker role); where several
    /// share a bus (`standalone`) their messages in hand cannot be told apart.
    consumers: usize,
    /// Whether any consumer of this bus got a message: a standby of a single-active-consumer queue
    /// gets none, and is not stuck for it.
    delivered: bool,
}

/// The progress of one bus.
#[derive(Debug)]
pub struct Progress {
    state: Mutex<State>,
}

impl Default for Progress {
    fn default() -> Self {
        let state = State {
            last: Instant::now(),
            pending: 0,
            pending_since: None,
            disconnected_since: None,
            backlog_since: None,
            unsettled: 0,
            consumers: 0,
            delivered: false,
        };
        Self { state: Mutex::new(state) }
    }
}

/// One broker operation in flight; finishing it is progress, dropping it unfinished is not.
pub struct Pending {
    progress: Arc<Progress>,
    finished: bool,
}

impl Pending {
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut state = self.progress.lock();
        state.pending -= 1;
        if state.pending == 0 {
            state.pending_since = None;
        }
        if self.finished {
            state.last = Instant::now();
        }
    }
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("progress lock")
    }

    /// Something finished.
    pub fn advanced(&self) {
        self.lock().last = Instant::now();
    }

    /// A consumer started on this bus.
    pub fn consuming(&self) {
        self.lock().consumers += 1;
    }

    /// A message arrived from a consumer.
    pub fn delivered(&self) {
        let mut state = self.lock();
        state.last = Instant::now();
        state.delivered = true;
        state.unsettled += 1;
    }

    /// A delivered message was settled (`all`: with every earlier one).
    pub fn settled(&self, all: bool) {
        let mut state = self.lock();
        state.unsettled = if all { 0 } else { state.unsettled.saturating_sub(1) };
    }

    /// An operation starts. Dropping what this returns without [`Pending::finish`] ends it without
    /// counting as progress (it failed, or it is a look that changes nothing).
    pub fn begin(self: &Arc<Self>) -> Pending {
        let mut state = self.lock();
        state.pending += 1;
        state.pending_since.get_or_insert_with(Instant::now);
        drop(state);
        Pending { progress: self.clone(), finished: false }
    }

    /// What a look at `queue` found: whether messages wait in it. `single_active` queues count only
    /// once this bus's consumer got a message (it is the active one).
    pub fn backlog(&self, queue: &str, waiting: bool, single_active: bool) {
        let mut state = self.lock();
        let counts = waiting && (!single_active || state.delivered);
        match (&state.backlog_since, counts) {
            (None, true) => state.backlog_since = Some((Instant::now(), queue.to_owned())),
            (Some(_), false) => state.backlog_since = None,
            _ => {}
        }
    }

    /// Why the role is stuck, if it is: work and no progress for `timeout`, or a connection down as
    /// long. `connected` is the connection's state now.
    pub fn stalled(&self, connected: bool, timeout: Duration) -> Option<String> {
        let mut state = self.lock();
        let now = Instant::now();
        if connected {
            state.disconnected_since = None;
        } else {
            let since = *state.disconnected_since.get_or_insert(now);
            if now - since >= timeout {
                return Some(format!("the broker connection has been down for {:?}", now - since));
            }
        }
        let quiet = now - state.last;
        if quiet < timeout {
            return None;
        }
        if let Some(since) = state.pending_since.filter(|since| now - *since >= timeout) {
            return Some(format!(
                "{} broker operations have waited for {:?} with no progress",
                state.pending,
                now - since
            ));
        }
        match &state.backlog_since {
            Some((since, queue)) if now - *since >= timeout && state.unsettled == 0 && state.consumers == 1 => {
                Some(format!("messages have waited in {queue} for {:?} and none arrived here", now - *since))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(50);

    #[test]
    fn work_without_progress_is_a_stall_and_idleness_is_not() {
        let progress = Arc::new(Progress::default());
        progress.consuming();
        std::thread::sleep(T * 2);
        assert_eq!(progress.stalled(true, T), None, "idle is not stuck");

        let pending = progress.begin();
        assert_eq!(progress.stalled(true, T), None, "an operation just begun, after a quiet time");
        std::thread::sleep(T * 2);
        assert!(progress.stalled(true, T).unwrap().contains("1 broker operations"));
        drop(progress.begin());
        assert!(progress.stalled(true, T).is_some(), "an operation ended unfinished is no progress");
        pending.finish();
        assert_eq!(progress.stalled(true, T), None, "a finished operation is progress");

        progress.backlog("q", true, true);
        std::thread::sleep(T * 2);
        assert_eq!(progress.stalled(true, T), None, "a standby of a single-active queue waits");
        progress.delivered();
        progress.backlog("q", true, true);
        std::thread::sleep(T * 2);
        assert_eq!(progress.stalled(true, T), None, "a message in hand is work going on");
        progress.settled(true);
        assert!(progress.stalled(true, T).unwrap().contains("waited in q"));
        progress.backlog("q", false, true);
        assert_eq!(progress.stalled(true, T), None, "an emptied queue");

        assert_eq!(progress.stalled(false, T), None, "a connection just lost");
        std::thread::sleep(T * 2);
        assert!(progress.stalled(false, T).unwrap().contains("down for"));
        assert_eq!(progress.stalled(true, T), None, "and back");
    }
}
