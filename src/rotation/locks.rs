//! Workload locks: two rotations never roll (or verify, or roll back) one workload at once,
//! when targets share a workload. A rotation takes all of its workloads in one step (no
//! partial holds, so no deadlock) and may take them again while it holds them (a rollback
//! inside a verify).

use crate::config::WorkloadRef;
use crate::sync::LockExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Default)]
pub(super) struct WorkloadLocks {
    /// Workload → the rotation holding it.
    held: Mutex<BTreeMap<WorkloadRef, String>>,
    freed: Notify,
}

/// Releases, when dropped, the workloads its acquisition took.
pub(super) struct WorkloadGuard {
    locks: Arc<WorkloadLocks>,
    taken: Vec<WorkloadRef>,
}

impl WorkloadLocks {
    /// Wait until every workload is free or already held by `owner`, then hold them all.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        workloads: &[WorkloadRef],
        owner: &str,
    ) -> WorkloadGuard {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut held = self.held.locked();
                let free = workloads
                    .iter()
                    .all(|w| held.get(w).is_none_or(|o| o == owner));
                if free {
                    let taken = workloads
                        .iter()
                        .filter(|w| !held.contains_key(*w))
                        .cloned()
                        .collect::<Vec<_>>();
                    for w in &taken {
                        held.insert(w.clone(), owner.to_string());
                    }
                    return WorkloadGuard {
                        locks: self.clone(),
                        taken,
                    };
                }
            }
            tracing::info!(
                owner,
                "waiting for another rotation to finish rolling a shared workload"
            );
            freed.await;
        }
    }
}

impl Drop for WorkloadGuard {
    fn drop(&mut self) {
        if self.taken.is_empty() {
            return;
        }
        let mut held = self.locks.held.locked();
        for w in &self.taken {
            held.remove(w);
        }
        drop(held);
        self.locks.freed.notify_waiters();
    }
}
