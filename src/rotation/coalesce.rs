//! Restart coalescing: rotations that need the same workload at about the same time (an
//! emergency of every target, keys on one schedule) share one roll of it. Each rotation
//! registers the workloads it will roll when it starts; at its roll step it joins a batch.
//! The batch closes when every running rotation interested in its workloads has joined,
//! or `window` after it opened, whichever is first; its members then roll with one rollout
//! id (the first member's rotation id), so the first patch restarts the workload and the
//! others find it already carrying the id. A rotation alone keeps its own id: nothing
//! changes without company.
//!
//! Each member still verifies (the shared rollout, its own key, its probes), drains and
//! retires on its own. Coalescing only decides the id, so a crash or a failover needs
//! nothing from here: the journal records the id before the patches.

use crate::config::WorkloadRef;
use crate::sync::LockExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Default)]
struct State {
    /// Workload → rotations that will roll it (registered at start, until they finish).
    interest: BTreeMap<WorkloadRef, BTreeSet<String>>,
    /// Open batches.
    batches: Vec<Batch>,
    /// Rollout ids of closed batches for members that have not picked theirs up yet.
    closed: BTreeMap<String, String>,
}

struct Batch {
    rollout_id: String,
    workloads: BTreeSet<WorkloadRef>,
    members: BTreeSet<String>,
    opened: Instant,
}

pub(super) struct Coalescer {
    /// Zero: coalescing off (every rotation rolls with its own id).
    window: Duration,
    state: Mutex<State>,
    changed: Notify,
}

/// Drops a rotation's interest when it ends (or stops); joining a batch drops it earlier.
pub struct Interest {
    coalescer: Arc<Coalescer>,
    rotation_id: String,
    workloads: Vec<WorkloadRef>,
}

impl Coalescer {
    pub(super) fn new(window: Duration) -> Self {
        Coalescer {
            window,
            state: Mutex::default(),
            changed: Notify::new(),
        }
    }

    /// `rotation_id` will roll `workloads`: batches forming on them wait for it.
    pub(super) fn register(
        self: &Arc<Self>,
        rotation_id: &str,
        workloads: &[WorkloadRef],
    ) -> Interest {
        let mut s = self.state.locked();
        for w in workloads {
            s.interest
                .entry(w.clone())
                .or_default()
                .insert(rotation_id.to_string());
        }
        Interest {
            coalescer: self.clone(),
            rotation_id: rotation_id.to_string(),
            workloads: workloads.to_vec(),
        }
    }

    /// The rollout id to roll `workloads` with: a batch's, shared with every rotation that
    /// joined it within the window.
    pub(super) async fn join(&self, rotation_id: &str, workloads: &[WorkloadRef]) -> String {
        if self.window.is_zero() {
            return rotation_id.to_string();
        }
        {
            let mut s = self.state.locked();
            // A member no longer holds back batches: it has its id (or will, from this one).
            for who in s.interest.values_mut() {
                who.remove(rotation_id);
            }
            s.interest.retain(|_, who| !who.is_empty());
            match s
                .batches
                .iter_mut()
                .find(|b| workloads.iter().any(|w| b.workloads.contains(w)))
            {
                Some(b) => {
                    b.members.insert(rotation_id.to_string());
                    b.workloads.extend(workloads.iter().cloned());
                }
                None => s.batches.push(Batch {
                    rollout_id: rotation_id.to_string(),
                    workloads: workloads.iter().cloned().collect(),
                    members: [rotation_id.to_string()].into(),
                    opened: Instant::now(),
                }),
            }
        }
        self.changed.notify_waiters();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wake_at = {
                let mut s = self.state.locked();
                if let Some(id) = s.closed.remove(rotation_id) {
                    return id; // another member closed our batch
                }
                let Some(i) = s
                    .batches
                    .iter()
                    .position(|b| b.members.contains(rotation_id))
                else {
                    return rotation_id.to_string(); // not reachable: joined above
                };
                let b = &s.batches[i];
                let everyone_here = b.workloads.iter().all(|w| {
                    s.interest
                        .get(w)
                        .is_none_or(|who| who.iter().all(|r| b.members.contains(r)))
                });
                let deadline = b.opened + self.window;
                if everyone_here || Instant::now() >= deadline {
                    let b = s.batches.remove(i);
                    if b.members.len() > 1 {
                        tracing::info!(
                            rollout_id = %b.rollout_id,
                            rotations = b.members.len(),
                            workloads = b.workloads.len(),
                            "rotations share one roll of their workloads"
                        );
                    }
                    for m in b.members.iter().filter(|m| *m != rotation_id) {
                        s.closed.insert(m.clone(), b.rollout_id.clone());
                    }
                    drop(s);
                    self.changed.notify_waiters();
                    return b.rollout_id;
                }
                deadline
            };
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        {
            let mut s = self.coalescer.state.locked();
            for w in &self.workloads {
                if let Some(who) = s.interest.get_mut(w) {
                    who.remove(&self.rotation_id);
                    if who.is_empty() {
                        s.interest.remove(w);
                    }
                }
            }
        }
        self.coalescer.changed.notify_waiters();
    }
}
