//! Workload locks: two rotations never roll (or verify, or roll back) one workload at once,
//! when targets share a workload. A holder takes all of its workloads in one step (no
//! partial holds, so no deadlock) and may take them again while it holds them (a rollback
//! inside a verify). The holder is a rollout id: the rotations of one coalesced roll share
//! it, so they verify together; each acquisition is counted and the last release frees.

use crate::config::WorkloadRef;
use crate::sync::LockExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Default)]
pub(super) struct WorkloadLocks {
    /// Workload → the rollout holding it, and how many guards hold it.
    held: Mutex<BTreeMap<WorkloadRef, (String, usize)>>,
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
                    .all(|w| held.get(w).is_none_or(|(o, _)| o == owner));
                if free {
                    let mut taken: Vec<WorkloadRef> = workloads.to_vec();
                    taken.sort();
                    taken.dedup();
                    for w in &taken {
                        held.entry(w.clone())
                            .or_insert_with(|| (owner.to_string(), 0))
                            .1 += 1;
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
        let mut freed = false;
        for w in &self.taken {
            if let Some((_, n)) = held.get_mut(w) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.remove(w);
                    freed = true;
                }
            }
        }
        drop(held);
        if freed {
            self.locks.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn w(s: &str) -> WorkloadRef {
        s.parse().unwrap()
    }

    /// A re-entrant hold (a rollback inside a verify) must not free the workload when the
    /// inner guard drops: the outer holder still rolls it.
    #[tokio::test]
    async fn the_last_release_frees_not_the_first() {
        let locks = Arc::new(WorkloadLocks::default());
        let shared = [w("ns/Deployment/shared")];
        let outer = locks.acquire(&shared, "r1").await;
        let inner = locks.acquire(&shared, "r1").await;
        drop(inner);
        let other = tokio::time::timeout(Duration::from_millis(50), locks.acquire(&shared, "r2"));
        assert!(other.await.is_err(), "r2 took a workload r1 still holds");
        drop(outer);
        let other = tokio::time::timeout(Duration::from_millis(50), locks.acquire(&shared, "r2"));
        assert!(other.await.is_ok(), "freed after the last release");
    }
}
