//! Leader election on a Kubernetes Lease (coordination.k8s.io/v1), so that of several
//! replicas exactly one rotates.
//!
//! The algorithm is client-go's `leaderelection`: a candidate takes the Lease when it does
//! not exist (create), is unheld, has expired (`renewTime + leaseDurationSeconds < now`) or
//! already names it; every write carries the resourceVersion that was read, so of two
//! racing candidates one gets `409 Conflict` and re-reads. The leader renews every
//! `retry_period`. If no renewal has succeeded for `renew_deadline` it publishes "not
//! leader" at once; because the deadline counts from the moment the last successful renewal
//! was *sent* (before its `renewTime` was stamped) and `renew_deadline < lease_duration`,
//! that happens before any other replica may consider the Lease expired: never two leaders.
//!
//! Expiry is judged on the Lease's `renewTime` against the local clock (client-go judges it
//! on when the record was last seen to change). That takes over one retry period sooner
//! after a crash and is equally safe while replica clocks differ by less than
//! `lease_duration - renew_deadline` (5 s with the defaults; NTP keeps nodes within
//! milliseconds).
//!
//! The holder also writes where its API answers ([`API_URL_ANNOTATION`], with
//! [`API_URL_HOLDER_ANNOTATION`] naming whose URL it is) so that followers can forward API
//! calls to it without RBAC to read pods. A holder without a URL removes both, so a previous
//! holder's URL is never taken for the current one's.
//!
//! ```no_run
//! # async fn demo(client: kube::Client) {
//! use openai_key_rotator::leader::{LeaderConfig, LeaderElector};
//! let cfg = LeaderConfig::new("okr", "openai-key-rotator", "okr-0");
//! let cancel = tokio_util::sync::CancellationToken::new();
//! let (is_leader, holder, task) = LeaderElector::new(client, cfg).spawn(cancel.clone());
//! // hand (is_leader, holder) to `Daemon::new`; on shutdown: cancel, then await `task`
//! // (it releases the Lease so the other replica takes over at once).
//! # let _ = (is_leader, holder, task);
//! # }
//! ```

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Election settings. The defaults (15 s / 10 s / 2 s) are client-go's and kube-controller-
/// manager's.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's name in `holderIdentity` (the pod name, typically).
    pub identity: String,
    /// How long a Lease stays valid after its last renewal. Written to the Lease in whole
    /// seconds, rounded up (a shorter value would let another replica in early).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down. Must be below
    /// `lease_duration`.
    pub renew_deadline: Duration,
    /// Interval between renewals, and between a candidate's attempts.
    pub retry_period: Duration,
    /// Where this replica's API answers (`http://POD_IP:PORT`), written to the Lease while
    /// it leads so followers can forward API calls to it; `None`: followers cannot.
    pub api_url: Option<String>,
}

/// The Lease annotation holding the leader's API URL.
pub const API_URL_ANNOTATION: &str = "openai-key-rotator/api-url";
/// The identity that wrote [`API_URL_ANNOTATION`]: a holder that does not write the
/// annotations (an older version) leaves them behind, and this tells them apart.
pub const API_URL_HOLDER_ANNOTATION: &str = "openai-key-rotator/api-url-holder";

/// Who holds the Lease, and where its API answers (when it says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub identity: String,
    pub api_url: Option<String>,
}

impl Holder {
    /// A holder that advertises no API URL.
    pub fn new(identity: impl Into<String>) -> Holder {
        Holder {
            identity: identity.into(),
            api_url: None,
        }
    }
}

impl LeaderConfig {
    /// Settings with client-go's default durations.
    pub fn new(
        namespace: impl Into<String>,
        lease_name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        LeaderConfig {
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            api_url: None,
        }
    }

    /// The checks client-go's `NewLeaderElector` makes, with the duration as it will be
    /// written (whole seconds) so that the no-overlap guarantee holds for what others read.
    pub fn validate(&self) -> Result<(), LeaderConfigError> {
        use LeaderConfigError as E;
        for (field, value) in [
            ("namespace", &self.namespace),
            ("lease_name", &self.lease_name),
            ("identity", &self.identity),
        ] {
            if value.is_empty() {
                return Err(E::Empty(field));
            }
        }
        if self.retry_period.is_zero() {
            return Err(E::ZeroRetryPeriod);
        }
        if self.lease_duration.as_secs() > i32::MAX as u64 / 2 {
            return Err(E::LeaseTooLong);
        }
        if self.renew_deadline >= Duration::from_secs(self.lease_duration_seconds() as u64) {
            return Err(E::RenewDeadlineNotBelowLease);
        }
        // client-go: renewDeadline > JitterFactor (1.2) * retryPeriod, so a leader gets more
        // than one try before it gives up.
        if self.renew_deadline <= self.retry_period.mul_f64(1.2) {
            return Err(E::RetryPeriodTooLong);
        }
        if let Some(url) = &self.api_url {
            crate::forward::check_api_url(url).map_err(E::ApiUrl)?;
        }
        Ok(())
    }

    /// `leaseDurationSeconds` as written: `lease_duration` rounded up to whole seconds.
    pub fn lease_duration_seconds(&self) -> i32 {
        let d = self.lease_duration;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaderConfigError {
    #[error("leader election: {0} must not be empty")]
    Empty(&'static str),
    #[error("leader election: retry_period must be above zero")]
    ZeroRetryPeriod,
    #[error("leader election: lease_duration is too long")]
    LeaseTooLong,
    #[error("leader election: renew_deadline must be shorter than lease_duration (in whole seconds, rounded up)")]
    RenewDeadlineNotBelowLease,
    #[error("leader election: renew_deadline must exceed 1.2 x retry_period")]
    RetryPeriodTooLong,
    #[error("leader election: api_url {0}")]
    ApiUrl(String),
}

/// Why one attempt to acquire or renew did not succeed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("the Kubernetes API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("another replica wrote the Lease first (409 Conflict)")]
    Conflict,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// What an attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Holding,
    /// A valid Lease names someone else.
    HeldBy(String),
}

/// Runs the election for one replica. See the module docs.
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaderConfig,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl LeaderElector {
    /// # Panics
    /// If `cfg` fails [`LeaderConfig::validate`] (use [`LeaderElector::try_new`] for
    /// configuration that comes from outside).
    pub fn new(client: kube::Client, cfg: LeaderConfig) -> Self {
        match Self::try_new(client, cfg) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        }
    }

    pub fn try_new(client: kube::Client, cfg: LeaderConfig) -> Result<Self, LeaderConfigError> {
        cfg.validate()?;
        Ok(LeaderElector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        })
    }

    /// Run the election until `cancel`; on cancel, if leader, publish `false` and release
    /// the Lease (no holder) so the other replica takes over at once. Returns (am I leader,
    /// who leads and at which API URL: `None` when nobody validly holds the Lease or it
    /// cannot be read) and the task. If the task ends in any other way (aborted, panicked)
    /// its receivers read `false`; they never see a closed channel.
    pub fn spawn(
        self,
        cancel: CancellationToken,
    ) -> (
        watch::Receiver<bool>,
        watch::Receiver<Option<Holder>>,
        JoinHandle<()>,
    ) {
        let (publisher, is_leader, leader_name) = Publisher::new();
        let task = tokio::spawn(self.run(cancel, publisher));
        (is_leader, leader_name, task)
    }

    async fn run(self, cancel: CancellationToken, mut out: Publisher) {
        let cfg = &self.cfg;
        let mut st = State::default();
        tracing::info!(identity = %cfg.identity, namespace = %cfg.namespace, lease = %cfg.lease_name, "leader election started");
        while !cancel.is_cancelled() {
            // The step-down deadline while leading: the attempt, and the wait after it, end
            // there at the latest.
            let deadline = st.deadline(cfg);
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    self.step_down(
                        &mut st,
                        &mut out,
                        "no successful renewal within renew_deadline",
                    );
                    continue;
                }
            }
            let sent = Instant::now();
            let outcome = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sleep_until_opt(deadline) => continue,
                r = self.try_acquire_or_renew(&mut st) => r,
            };
            match outcome {
                Ok(Attempt::Holding) => {
                    st.renewed_at = Some(sent);
                    if !st.leading {
                        st.leading = true;
                        out.set(true, Some(self.me()));
                        tracing::info!(identity = %cfg.identity, lease = %cfg.lease_name, "became leader");
                    }
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if st.leading {
                        self.step_down(&mut st, &mut out, "the Lease names another holder");
                    }
                    // A new leader, or the same one with another API URL.
                    let seen = st.valid_holder(cfg, Timestamp::now(), Instant::now());
                    if st.last_holder != seen {
                        let url = seen.as_ref().and_then(|h| h.api_url.as_deref());
                        tracing::info!(identity = %cfg.identity, leader = %holder, leader_api_url = url.unwrap_or("none"), "following leader");
                    }
                }
                Err(e) if st.leading => {
                    tracing::warn!(identity = %cfg.identity, error = %e, "lease renewal failed");
                }
                Err(e) => {
                    tracing::debug!(identity = %cfg.identity, error = %e, "lease acquisition failed");
                }
            }
            let holder = if st.leading {
                Some(self.me())
            } else {
                st.valid_holder(cfg, Timestamp::now(), Instant::now())
            };
            if holder.is_none() && st.last_holder.is_some() && !st.leading {
                tracing::info!(identity = %cfg.identity, "no valid leader");
            }
            st.last_holder.clone_from(&holder);
            out.set(st.leading, holder);

            // A leader renews on the beat; candidates poll a little early at random so that
            // replicas started together do not collide on every attempt.
            let next = if st.leading {
                sent + cfg.retry_period
            } else {
                Instant::now() + cfg.retry_period.mul_f64(rand::random_range(0.8..=1.0))
            };
            let wake = deadline_min(Some(next), st.deadline(cfg));
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sleep_until_opt(wake) => {}
            }
        }
        if st.leading {
            out.set(false, None);
            st.leading = false;
            self.release(&mut st).await;
        }
        tracing::info!(identity = %cfg.identity, "leader election stopped");
    }

    /// This replica as the holder it publishes while leading.
    fn me(&self) -> Holder {
        Holder {
            identity: self.cfg.identity.clone(),
            api_url: self.cfg.api_url.clone(),
        }
    }

    fn step_down(&self, st: &mut State, out: &mut Publisher, why: &str) {
        // Publish first: this is what keeps two leaders from overlapping.
        out.set(false, None);
        st.leading = false;
        st.renewed_at = None;
        st.last_holder = None;
        tracing::warn!(identity = %self.cfg.identity, reason = why, "stepped down as leader");
    }

    /// One API call, bounded by the renew deadline (client-go's per-round budget).
    async fn call<T>(&self, fut: impl Future<Output = kube::Result<T>>) -> Result<T, AttemptError> {
        let limit = self.cfg.renew_deadline;
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_conflict(&e) => Err(AttemptError::Conflict),
            Ok(Err(e)) => Err(AttemptError::Api(e)),
            Err(_) => Err(AttemptError::Timeout(limit)),
        }
    }

    /// client-go's `tryAcquireOrRenew`: a leader first renews on the Lease it last wrote
    /// (one call); otherwise, or if that fails, read, decide, write with the version read.
    /// A 409 means someone else wrote in between: read again, once.
    async fn try_acquire_or_renew(&self, st: &mut State) -> Result<Attempt, AttemptError> {
        let cfg = &self.cfg;
        let pp = PostParams::default();
        if st.leading {
            if let Some(mine) = st
                .observed
                .as_ref()
                .filter(|l| holder(l) == Some(&cfg.identity))
            {
                let next = renewed(mine, cfg, Timestamp::now());
                match self
                    .call(self.api.replace(&cfg.lease_name, &pp, &next))
                    .await
                {
                    Ok(l) => {
                        st.observe(l);
                        return Ok(Attempt::Holding);
                    }
                    Err(e) => {
                        tracing::debug!(identity = %cfg.identity, error = %e, "optimistic renewal failed; re-reading the Lease")
                    }
                }
            }
        }
        for _ in 0..2 {
            let Some(current) = self.call(self.api.get_opt(&cfg.lease_name)).await? else {
                let fresh = new_lease(cfg, Timestamp::now());
                match self.call(self.api.create(&pp, &fresh)).await {
                    Ok(l) => {
                        st.observe(l);
                        return Ok(Attempt::Holding);
                    }
                    // AlreadyExists: another replica created it first.
                    Err(AttemptError::Conflict) => continue,
                    Err(e) => return Err(e),
                }
            };
            st.observe(current);
            let now = Timestamp::now();
            let Some(lease) = st.observed.as_ref() else {
                break;
            };
            if let Some(h) = holder(lease).filter(|h| **h != cfg.identity) {
                if !st.expired(cfg, now, Instant::now()) {
                    return Ok(Attempt::HeldBy(h.clone()));
                }
            }
            let next = renewed(lease, cfg, now);
            match self
                .call(self.api.replace(&cfg.lease_name, &pp, &next))
                .await
            {
                Ok(l) => {
                    st.observe(l);
                    return Ok(Attempt::Holding);
                }
                Err(AttemptError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(AttemptError::Conflict)
    }

    /// client-go's release: keep the transitions count, clear the holder, mark it renewed
    /// now with a 1 s duration. Only if the Lease still is the one we wrote (version check).
    async fn release(&self, st: &mut State) {
        let cfg = &self.cfg;
        let Some(mut lease) = st.observed.take() else {
            return;
        };
        if holder(&lease) != Some(&cfg.identity) {
            return;
        }
        let now = MicroTime(Timestamp::now());
        set_api_url(&mut lease.metadata, &cfg.identity, None);
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        match self
            .call(
                self.api
                    .replace(&cfg.lease_name, &PostParams::default(), &lease),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(identity = %cfg.identity, lease = %cfg.lease_name, "released the Lease")
            }
            Err(e) => {
                tracing::warn!(identity = %cfg.identity, error = %e, "could not release the Lease; the other replica takes over when it expires")
            }
        }
    }
}

/// What the election loop knows between attempts.
#[derive(Default)]
struct State {
    leading: bool,
    /// When the last successful acquire/renew request was sent (before its `renewTime` was
    /// stamped): the step-down deadline counts from here.
    renewed_at: Option<Instant>,
    /// The Lease as last read or written; its resourceVersion goes with the next write.
    observed: Option<Lease>,
    /// When `observed`'s content last changed, on the local clock (expiry of a Lease
    /// without `renewTime`).
    observed_at: Option<Instant>,
    /// The holder last published.
    last_holder: Option<Holder>,
}

impl State {
    fn deadline(&self, cfg: &LeaderConfig) -> Option<Instant> {
        self.renewed_at
            .filter(|_| self.leading)
            .map(|t| t + cfg.renew_deadline)
    }

    fn observe(&mut self, lease: Lease) {
        let changed = self.observed.as_ref().map(|l| &l.spec) != Some(&lease.spec);
        if changed || self.observed_at.is_none() {
            self.observed_at = Some(Instant::now());
        }
        self.observed = Some(lease);
    }

    fn expired(&self, cfg: &LeaderConfig, now: Timestamp, now_mono: Instant) -> bool {
        match &self.observed {
            Some(l) => lease_expired(l, cfg, now, self.observed_at, now_mono),
            None => true,
        }
    }

    /// The holder of the last-seen Lease if it is still valid, with its API URL.
    fn valid_holder(
        &self,
        cfg: &LeaderConfig,
        now: Timestamp,
        now_mono: Instant,
    ) -> Option<Holder> {
        let lease = self.observed.as_ref()?;
        let h = holder(lease)?;
        (!self.expired(cfg, now, now_mono)).then(|| Holder {
            identity: h.clone(),
            api_url: api_url(lease, h),
        })
    }
}

/// `holderIdentity`, with the empty string (client-go's release) read as "none".
fn holder(lease: &Lease) -> Option<&String> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_ref())
        .filter(|h| !h.is_empty())
}

/// The API URL the Lease advertises for `holder`: only if written by that holder and well
/// formed (anything else is not forwarded to).
fn api_url(lease: &Lease, holder: &str) -> Option<String> {
    let a = lease.metadata.annotations.as_ref()?;
    if a.get(API_URL_HOLDER_ANNOTATION).map(String::as_str) != Some(holder) {
        return None;
    }
    let url = a.get(API_URL_ANNOTATION)?;
    match crate::forward::check_api_url(url) {
        Ok(()) => Some(url.clone()),
        Err(e) => {
            tracing::warn!(leader = %holder, error = %e, "the Lease's API URL is not usable; not forwarding to it");
            None
        }
    }
}

/// Advertise `url` as `identity`'s, or remove any advertised URL when `None`.
fn set_api_url(meta: &mut ObjectMeta, identity: &str, url: Option<&str>) {
    match url {
        Some(url) => {
            let a = meta.annotations.get_or_insert_with(BTreeMap::new);
            a.insert(API_URL_ANNOTATION.into(), url.into());
            a.insert(API_URL_HOLDER_ANNOTATION.into(), identity.into());
        }
        None => {
            if let Some(a) = meta.annotations.as_mut() {
                a.remove(API_URL_ANNOTATION);
                a.remove(API_URL_HOLDER_ANNOTATION);
            }
        }
    }
}

/// `renewTime + leaseDurationSeconds <= now`. A Lease without `renewTime` counts from when
/// it was observed; a missing or non-positive duration is taken as ours.
fn lease_expired(
    lease: &Lease,
    cfg: &LeaderConfig,
    now: Timestamp,
    observed_at: Option<Instant>,
    now_mono: Instant,
) -> bool {
    let spec = lease.spec.as_ref();
    let secs = spec
        .and_then(|s| s.lease_duration_seconds)
        .filter(|s| *s > 0)
        .unwrap_or_else(|| cfg.lease_duration_seconds());
    match spec.and_then(|s| s.renew_time.as_ref()) {
        Some(MicroTime(t)) => {
            t.as_microsecond()
                .saturating_add(i64::from(secs) * 1_000_000)
                <= now.as_microsecond()
        }
        None => observed_at.is_none_or(|at| now_mono >= at + Duration::from_secs(secs as u64)),
    }
}

/// The Lease a first holder creates.
fn new_lease(cfg: &LeaderConfig, now: Timestamp) -> Lease {
    let mut metadata = ObjectMeta {
        name: Some(cfg.lease_name.clone()),
        namespace: Some(cfg.namespace.clone()),
        ..Default::default()
    };
    set_api_url(&mut metadata, &cfg.identity, cfg.api_url.as_deref());
    Lease {
        metadata,
        spec: Some(LeaseSpec {
            holder_identity: Some(cfg.identity.clone()),
            lease_duration_seconds: Some(cfg.lease_duration_seconds()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

/// `current` taken or renewed by us (its metadata, resourceVersion included, kept for the
/// version check): a change of holder sets `acquireTime` and counts a transition; our API
/// URL replaces (or, without one, removes) whatever URL was advertised.
fn renewed(current: &Lease, cfg: &LeaderConfig, now: Timestamp) -> Lease {
    let mut next = current.clone();
    set_api_url(&mut next.metadata, &cfg.identity, cfg.api_url.as_deref());
    let same_holder = holder(current) == Some(&cfg.identity);
    let spec = next.spec.get_or_insert_with(Default::default);
    if !same_holder || spec.acquire_time.is_none() {
        spec.acquire_time = Some(MicroTime(now));
    }
    if !same_holder {
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.holder_identity = Some(cfg.identity.clone());
    spec.lease_duration_seconds = Some(cfg.lease_duration_seconds());
    spec.renew_time = Some(MicroTime(now));
    next
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn deadline_min(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The sending side of the two channels. Publishes only changes (the daemon wakes on every
/// change). When dropped (task ended, aborted or panicked) it publishes "not leader", then
/// keeps the channels open until the last receiver goes: a receiver of a closed channel
/// returns from `changed()` at once, every time, and a loop waiting for leadership would spin.
struct Publisher {
    leader: Option<watch::Sender<bool>>,
    holder: Option<watch::Sender<Option<Holder>>>,
}

impl Publisher {
    fn new() -> (Self, watch::Receiver<bool>, watch::Receiver<Option<Holder>>) {
        let (ltx, lrx) = watch::channel(false);
        let (htx, hrx) = watch::channel(None);
        (
            Publisher {
                leader: Some(ltx),
                holder: Some(htx),
            },
            lrx,
            hrx,
        )
    }

    /// Leadership first: a replica stepping down must say so before anything else.
    fn set(&mut self, leading: bool, holder: Option<Holder>) {
        if let Some(tx) = &self.leader {
            tx.send_if_modified(|v| std::mem::replace(v, leading) != leading);
        }
        if let Some(tx) = &self.holder {
            tx.send_if_modified(|v| {
                let changed = *v != holder;
                *v = holder;
                changed
            });
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.set(false, None);
        let (Some(l), Some(h)) = (self.leader.take(), self.holder.take()) else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::join!(l.closed(), h.closed());
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaderConfig {
        LeaderConfig::new("ns", "lease", "me")
    }

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn lease(holder: Option<&str>, renew: Option<i64>, dur: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("lease".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: renew.map(|s| MicroTime(ts(s))),
                acquire_time: Some(MicroTime(ts(-100))),
                lease_duration_seconds: dur,
                lease_transitions: Some(3),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn defaults_validate_and_bad_configs_do_not() {
        assert_eq!(cfg().validate(), Ok(()));
        let mut c = cfg();
        c.renew_deadline = c.lease_duration;
        assert_eq!(
            c.validate(),
            Err(LeaderConfigError::RenewDeadlineNotBelowLease)
        );
        let mut c = cfg();
        c.retry_period = Duration::from_secs(9);
        assert_eq!(c.validate(), Err(LeaderConfigError::RetryPeriodTooLong));
        let mut c = cfg();
        c.retry_period = Duration::ZERO;
        assert_eq!(c.validate(), Err(LeaderConfigError::ZeroRetryPeriod));
        let mut c = cfg();
        c.identity.clear();
        assert_eq!(c.validate(), Err(LeaderConfigError::Empty("identity")));
        // 1.5 s is written as 2 s, so a 1.9 s deadline is still below it.
        let mut c = cfg();
        c.lease_duration = Duration::from_millis(1500);
        c.renew_deadline = Duration::from_millis(1900);
        c.retry_period = Duration::from_millis(200);
        assert_eq!(c.lease_duration_seconds(), 2);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn expiry_is_renew_time_plus_duration() {
        let c = cfg();
        let l = lease(Some("other"), Some(0), Some(10));
        let mono = Instant::now();
        assert!(!lease_expired(&l, &c, ts(9), None, mono));
        assert!(lease_expired(&l, &c, ts(10), None, mono));
        // No duration: ours (15 s).
        let l = lease(Some("other"), Some(0), None);
        assert!(!lease_expired(&l, &c, ts(14), None, mono));
        assert!(lease_expired(&l, &c, ts(15), None, mono));
        // No renewTime: counted from when it was seen.
        let l = lease(Some("other"), None, Some(10));
        assert!(!lease_expired(
            &l,
            &c,
            ts(1000),
            Some(mono),
            mono + Duration::from_secs(9)
        ));
        assert!(lease_expired(
            &l,
            &c,
            ts(1000),
            Some(mono),
            mono + Duration::from_secs(10)
        ));
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let c = cfg();
        let theirs = lease(Some("other"), Some(0), Some(15));
        let taken = renewed(&theirs, &c, ts(50));
        let s = taken.spec.as_ref().unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("me"));
        assert_eq!(s.lease_transitions, Some(4));
        assert_eq!(s.acquire_time, Some(MicroTime(ts(50))));
        assert_eq!(s.renew_time, Some(MicroTime(ts(50))));
        assert_eq!(s.lease_duration_seconds, Some(15));
        // The version read goes with the write.
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("7"));

        let again = renewed(&taken, &c, ts(52));
        let s = again.spec.as_ref().unwrap();
        assert_eq!(s.lease_transitions, Some(4));
        assert_eq!(s.acquire_time, Some(MicroTime(ts(50))));
        assert_eq!(s.renew_time, Some(MicroTime(ts(52))));

        // A released Lease (empty holder) changes hands when taken.
        let released = lease(Some(""), Some(0), Some(1));
        assert_eq!(holder(&released), None);
        let s = renewed(&released, &c, ts(1)).spec.unwrap();
        assert_eq!(s.lease_transitions, Some(4));
    }

    #[test]
    fn valid_holder_hides_expired_and_released_leases() {
        let c = cfg();
        let mut st = State::default();
        st.observe(lease(Some("other"), Some(0), Some(10)));
        let mono = Instant::now();
        assert_eq!(st.valid_holder(&c, ts(5), mono), Some(Holder::new("other")));
        assert_eq!(st.valid_holder(&c, ts(11), mono), None);
        st.observe(lease(None, Some(0), Some(10)));
        assert_eq!(st.valid_holder(&c, ts(5), mono), None);
    }

    #[tokio::test]
    async fn receivers_read_false_and_stay_open_after_the_publisher_goes() {
        let (mut p, mut leader, mut name) = Publisher::new();
        p.set(true, Some(Holder::new("me")));
        assert!(*leader.borrow_and_update());
        assert_eq!(*name.borrow_and_update(), Some(Holder::new("me")));
        // Unchanged values do not wake receivers.
        p.set(true, Some(Holder::new("me")));
        assert!(!leader.has_changed().unwrap());
        drop(p);
        assert!(leader.has_changed().unwrap());
        assert!(!*leader.borrow_and_update());
        assert_eq!(*name.borrow_and_update(), None);
        // Still open: `changed()` waits instead of failing at once.
        let waited = tokio::time::timeout(Duration::from_millis(50), leader.changed()).await;
        assert!(waited.is_err(), "the channel closed: {waited:?}");
    }

    fn with_url(mut c: LeaderConfig, url: &str) -> LeaderConfig {
        c.api_url = Some(url.into());
        c
    }

    fn annotations(l: &Lease) -> BTreeMap<String, String> {
        l.metadata.annotations.clone().unwrap_or_default()
    }

    #[test]
    fn the_holder_writes_its_api_url_and_one_without_removes_the_last() {
        let mine = with_url(cfg(), "http://10.0.0.7:8080");
        let created = new_lease(&mine, ts(0));
        let a = annotations(&created);
        assert_eq!(a[API_URL_ANNOTATION], "http://10.0.0.7:8080");
        assert_eq!(a[API_URL_HOLDER_ANNOTATION], "me");
        // Taking over someone else's Lease replaces their URL; others' annotations stay.
        let mut theirs = lease(Some("other"), Some(0), Some(15));
        theirs.metadata.annotations = Some(BTreeMap::from([
            (
                API_URL_ANNOTATION.to_string(),
                "http://10.0.0.9:8080".to_string(),
            ),
            (API_URL_HOLDER_ANNOTATION.to_string(), "other".to_string()),
            ("unrelated".to_string(), "kept".to_string()),
        ]));
        let a = annotations(&renewed(&theirs, &mine, ts(20)));
        assert_eq!(a[API_URL_ANNOTATION], "http://10.0.0.7:8080");
        assert_eq!(a[API_URL_HOLDER_ANNOTATION], "me");
        assert_eq!(a["unrelated"], "kept");
        // A holder without a URL must not leave the previous holder's behind.
        let a = annotations(&renewed(&theirs, &cfg(), ts(20)));
        assert!(!a.contains_key(API_URL_ANNOTATION), "{a:?}");
        assert!(!a.contains_key(API_URL_HOLDER_ANNOTATION), "{a:?}");
        assert_eq!(a["unrelated"], "kept");
        assert!(!annotations(&new_lease(&cfg(), ts(0))).contains_key(API_URL_ANNOTATION));
    }

    #[test]
    fn a_follower_reads_the_url_only_when_the_holder_wrote_it() {
        let c = cfg();
        let mono = Instant::now();
        let writer = with_url(
            LeaderConfig::new("ns", "lease", "other"),
            "http://10.0.0.9:8080",
        );
        let mut l = renewed(&lease(Some("x"), Some(0), Some(10)), &writer, ts(0));
        let mut st = State::default();
        st.observe(l.clone());
        assert_eq!(
            st.valid_holder(&c, ts(5), mono),
            Some(Holder {
                identity: "other".into(),
                api_url: Some("http://10.0.0.9:8080".into())
            })
        );
        // A holder that does not write the annotations (an older version) took over: the
        // URL left behind is not its URL.
        l.spec.as_mut().unwrap().holder_identity = Some("old-version".into());
        st.observe(l.clone());
        assert_eq!(
            st.valid_holder(&c, ts(5), mono),
            Some(Holder::new("old-version"))
        );
        // A malformed URL is not forwarded to.
        l.spec.as_mut().unwrap().holder_identity = Some("other".into());
        l.metadata.annotations.as_mut().unwrap().insert(
            API_URL_ANNOTATION.into(),
            "http://10.0.0.9:8080/elsewhere?x".into(),
        );
        st.observe(l);
        assert_eq!(st.valid_holder(&c, ts(5), mono), Some(Holder::new("other")));
    }

    #[test]
    fn a_bad_api_url_fails_validation() {
        let c = with_url(cfg(), "10.0.0.7:8080");
        assert!(matches!(c.validate(), Err(LeaderConfigError::ApiUrl(_))));
        assert_eq!(with_url(cfg(), "http://10.0.0.7:8080").validate(), Ok(()));
    }
}
