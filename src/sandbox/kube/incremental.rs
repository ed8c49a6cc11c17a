//! Incremental reconciling for large simulated clusters ([`KubeSimOptions::incremental`]).
//!
//! A full controller pass costs time for every object, settled or not; with thousands of
//! workloads that is most of a core on every tick. Instead, each tick covers only the
//! namespaces that changed since the last pass (store writes, handle settings such as an
//! opened readiness gate) and the ones still waiting on time (a pod not yet ready or still
//! terminating, a rollout not yet complete, which is where ready delays, `minReadySeconds`
//! and progress deadlines live). A namespace where nothing changed and nothing waits would
//! come out of a pass unchanged, so skipping it changes nothing. A full pass every
//! [`KubeSimOptions::full_resync`] is the safety net.

use super::controller::{self, is_terminating, pod_is_ready, typed, RolloutStatus, Scope};
use super::discovery::Res;
use super::{daemonset, statefulset, Inner, KubeSimOptions};
use std::collections::BTreeSet;
use std::time::Instant;

/// What the incremental controller remembers between ticks.
#[derive(Default)]
pub(crate) struct Tracker {
    /// The store's resourceVersion when the last pass started: later changes are news.
    synced_rv: u64,
    /// Namespaces the last pass left waiting on time.
    busy: BTreeSet<String>,
    last_full: Option<Instant>,
    /// Where the next capped pass starts (see [`KubeSimOptions::max_namespaces_per_tick`]).
    cursor: String,
    #[cfg(test)]
    last_pass: Option<usize>,
}

impl Tracker {
    /// Namespaces the last tick reconciled (`None` for a full pass).
    #[cfg(test)]
    pub fn last_pass(&self) -> Option<usize> {
        self.last_pass
    }
}

/// One controller tick in incremental mode.
pub(crate) fn tick(inner: &mut Inner, opts: &KubeSimOptions, now: Instant) {
    let full_due = inner
        .tracker
        .last_full
        .is_none_or(|t| now.duration_since(t) >= opts.full_resync);
    let changed = inner
        .store
        .namespaces_changed_since(inner.tracker.synced_rv);
    let touched = std::mem::take(&mut inner.touched);
    inner.tracker.synced_rv = inner.store.rv();
    let mut due: BTreeSet<String> = match changed {
        // `None`: part of the history is gone (compacted), so what changed is unknown.
        Some(changed) if !full_due => changed
            .into_iter()
            .chain(touched)
            .chain(std::mem::take(&mut inner.tracker.busy))
            .filter(|ns| !ns.is_empty())
            .collect(),
        _ => {
            inner.tracker.last_full = Some(now);
            #[cfg(test)]
            {
                inner.tracker.last_pass = None;
            }
            controller::reconcile_in(inner, opts, now, Scope::All);
            let all: BTreeSet<String> = inner.store.used_namespaces().into_iter().collect();
            inner.tracker.busy = all.into_iter().filter(|ns| !settled(inner, ns)).collect();
            return;
        }
    };
    #[cfg(test)]
    {
        inner.tracker.last_pass = Some(due.len().min(match opts.max_namespaces_per_tick {
            0 => usize::MAX,
            cap => cap,
        }));
    }
    if due.is_empty() {
        return;
    }
    // Bound the time the store lock is held: past the cap, the rest waits for the next
    // tick, round-robin from where this one stopped so no namespace starves.
    let cap = opts.max_namespaces_per_tick;
    let mut later = BTreeSet::new();
    if cap > 0 && due.len() > cap {
        let cursor = std::mem::take(&mut inner.tracker.cursor);
        let mut order: Vec<String> = due.range(cursor.clone()..).cloned().collect();
        order.extend(due.range(..cursor).cloned());
        let rest = order.split_off(cap);
        inner.tracker.cursor = rest.first().cloned().unwrap_or_default();
        later = rest.into_iter().collect();
        due = order.into_iter().collect();
    }
    controller::reconcile_in(inner, opts, now, Scope::Namespaces(&due));
    let mut busy: BTreeSet<String> = due.into_iter().filter(|ns| !settled(inner, ns)).collect();
    busy.extend(later);
    inner.tracker.busy = busy;
}

/// Nothing in `ns` waits on time: every pod is ready and not terminating, every workload's
/// rollout is complete by kubectl's rule. (A never-ready pod or a failed rollout keeps its
/// namespace busy: cheap, and always right.)
fn settled(inner: &Inner, ns: &str) -> bool {
    let store = &inner.store;
    store
        .list(Res::Pod, Some(ns))
        .into_iter()
        .all(|p| pod_is_ready(p) && !is_terminating(p))
        && store.list(Res::Deployment, Some(ns)).into_iter().all(|d| {
            typed(d).is_some_and(|d| controller::rollout_status(&d) == RolloutStatus::Complete)
        })
        && store.list(Res::StatefulSet, Some(ns)).into_iter().all(|s| {
            typed(s).is_some_and(|s| statefulset::rollout_status(&s) == RolloutStatus::Complete)
        })
        && store.list(Res::DaemonSet, Some(ns)).into_iter().all(|d| {
            typed(d).is_some_and(|d| daemonset::rollout_status(&d) == RolloutStatus::Complete)
        })
        && store
            .list(Res::Rollout, Some(ns))
            .into_iter()
            .all(super::rollout::settled)
}
