//! Lease leader election against the Kubernetes simulator: one leader at a time, hand-over
//! on release, take-over only after expiry when the leader dies, and step-down when renewals
//! fail. A background monitor samples every replica's "am I leader" every 5 ms throughout and
//! each test asserts it never saw two at once.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::{Client, Config};
use openai_key_rotator::leader::{
    Holder, LeaderConfig, LeaderElector, API_URL_ANNOTATION, API_URL_HOLDER_ANNOTATION,
};
use openai_key_rotator::sandbox::kube::{KubeSim, KubeSimOptions};
use openai_key_rotator::sandbox::{loopback, Server};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NS: &str = "okr";
const LEASE: &str = "okr-leader";
const RETRY: Duration = Duration::from_millis(200);

async fn start() -> (KubeSim, Server) {
    let sim = KubeSim::new(KubeSimOptions::default());
    let server = sim
        .serve(loopback(0), Default::default())
        .await
        .expect("serve the simulator");
    (sim, server)
}

fn client(server: &Server) -> Client {
    let mut config = Config::new(server.url().parse().unwrap());
    config.default_namespace = NS.into();
    Client::try_from(config).unwrap()
}

fn cfg(identity: &str, lease_secs: u64, renew_deadline: Duration) -> LeaderConfig {
    LeaderConfig {
        lease_duration: Duration::from_secs(lease_secs),
        renew_deadline,
        retry_period: RETRY,
        ..LeaderConfig::new(NS, LEASE, identity)
    }
}

struct Replica {
    id: String,
    leader: watch::Receiver<bool>,
    name: watch::Receiver<Option<Holder>>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Replica {
    fn start(server: &Server, cfg: LeaderConfig) -> Self {
        let id = cfg.identity.clone();
        let cancel = CancellationToken::new();
        let (leader, name, task) = LeaderElector::new(client(server), cfg).spawn(cancel.clone());
        Replica {
            id,
            leader,
            name,
            cancel,
            task,
        }
    }

    fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    fn names(&self) -> Option<String> {
        self.name.borrow().as_ref().map(|h| h.identity.clone())
    }

    fn holder(&self) -> Option<Holder> {
        self.name.borrow().clone()
    }
}

/// Samples every replica's leader flag every 5 ms; remembers the most seen at once.
struct Monitor {
    max: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Monitor {
    fn start(replicas: &[&Replica]) -> Self {
        let rxs: Vec<_> = replicas.iter().map(|r| r.leader.clone()).collect();
        let max = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (m, s) = (max.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.is_cancelled() {
                let n = rxs.iter().filter(|r| *r.borrow()).count();
                m.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Monitor { max, stop }
    }

    fn assert_never_two(&self) {
        self.stop.cancel();
        let max = self.max.load(Ordering::SeqCst);
        assert!(max <= 1, "{max} replicas were leader at the same moment");
    }
}

/// Poll `cond` every 5 ms until true; the instant it was first seen true, or None on timeout.
async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Instant> {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return Some(Instant::now());
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait for a leader among `rs` that every replica names; returns (leader, follower) indices.
async fn settled(rs: &[&Replica]) -> (usize, usize) {
    wait_until(Duration::from_secs(5), || {
        rs.iter().filter(|r| r.is_leader()).count() == 1
    })
    .await
    .expect("a leader is elected");
    let l = rs.iter().position(|r| r.is_leader()).unwrap();
    let want = Some(rs[l].id.clone());
    wait_until(Duration::from_secs(2), || {
        rs.iter().all(|r| r.names() == want)
    })
    .await
    .expect("every replica names the leader");
    (l, 1 - l)
}

fn spec(sim: &KubeSim) -> LeaseSpec {
    sim.lease(NS, LEASE)
        .expect("the Lease exists")
        .spec
        .expect("the Lease has a spec")
}

fn renew_time(s: &LeaseSpec) -> Timestamp {
    s.renew_time.as_ref().expect("renewTime is set").0
}

async fn stop(r: Replica) {
    r.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(3), r.task)
        .await
        .expect("the elector stops on cancel")
        .expect("the elector task did not panic");
}

#[tokio::test]
async fn exactly_one_leader_and_both_name_it() {
    let (sim, server) = start().await;
    let a = Replica::start(&server, cfg("okr-a", 2, Duration::from_secs(1)));
    let b = Replica::start(&server, cfg("okr-b", 2, Duration::from_secs(1)));
    let mon = Monitor::start(&[&a, &b]);
    let (l, _) = settled(&[&a, &b]).await;
    let leader_id = [&a, &b][l].id.clone();
    let before = spec(&sim);

    // Every 20 ms for 3 s: exactly one leader, always the same, named by both.
    for i in 0..150 {
        let leaders: Vec<_> = [&a, &b]
            .iter()
            .filter(|r| r.is_leader())
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(leaders, [leader_id.as_str()], "sample {i}");
        assert_eq!(a.names().as_ref(), Some(&leader_id), "sample {i}");
        assert_eq!(b.names().as_ref(), Some(&leader_id), "sample {i}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The Lease as the leader keeps it: renewed all along, acquired once.
    let after = spec(&sim);
    assert_eq!(after.holder_identity.as_ref(), Some(&leader_id));
    assert_eq!(after.lease_duration_seconds, Some(2));
    assert_eq!(after.lease_transitions, Some(0));
    assert_eq!(after.acquire_time, before.acquire_time);
    let renewed_for = renew_time(&after).duration_since(renew_time(&before));
    assert!(
        renewed_for >= SignedDuration::from_millis(2700),
        "renewTime advanced only {renewed_for:?} in 3 s"
    );
    mon.assert_never_two();
    stop(a).await;
    stop(b).await;
}

#[tokio::test]
async fn a_cancelled_leader_releases_and_the_other_takes_over_at_once() {
    let (sim, server) = start().await;
    // A long lease, so a take-over by expiry (5 s) is told apart from one by release.
    let a = Replica::start(&server, cfg("okr-a", 5, Duration::from_secs(3)));
    let b = Replica::start(&server, cfg("okr-b", 5, Duration::from_secs(3)));
    let mon = Monitor::start(&[&a, &b]);
    let (l, _) = settled(&[&a, &b]).await;
    let (leader, follower) = if l == 0 { (a, b) } else { (b, a) };
    assert_eq!(spec(&sim).lease_transitions, Some(0));

    let t0 = Instant::now();
    let leader_rx = leader.leader.clone();
    stop(leader).await;
    assert!(!*leader_rx.borrow(), "a stopped elector still says leader");
    let took = wait_until(Duration::from_secs(8), || follower.is_leader())
        .await
        .expect("the follower takes over");
    let after = took - t0;
    assert!(
        after < Duration::from_secs(1),
        "take-over after release took {after:?} (lease 5 s)"
    );
    let s = spec(&sim);
    assert_eq!(s.holder_identity.as_ref(), Some(&follower.id));
    assert_eq!(s.lease_transitions, Some(1));
    assert_eq!(s.lease_duration_seconds, Some(5));
    wait_until(Duration::from_secs(1), || {
        follower.names() == Some(follower.id.clone())
    })
    .await
    .expect("the new leader names itself");
    mon.assert_never_two();
    stop(follower).await;
}

#[tokio::test]
async fn a_killed_leader_is_replaced_only_after_its_lease_expires() {
    let (sim, server) = start().await;
    let lease = Duration::from_secs(2);
    let a = Replica::start(&server, cfg("okr-a", 2, Duration::from_secs(1)));
    let b = Replica::start(&server, cfg("okr-b", 2, Duration::from_secs(1)));
    let mon = Monitor::start(&[&a, &b]);
    let (l, _) = settled(&[&a, &b]).await;
    let (leader, follower) = if l == 0 { (a, b) } else { (b, a) };

    // Crash: the task is gone without releasing.
    leader.task.abort();
    let killed = Instant::now();
    assert!(leader.task.await.unwrap_err().is_cancelled());
    assert!(
        !*leader.leader.borrow(),
        "an aborted elector still says leader"
    );
    // Let a renewal already on the wire land, then read when the Lease really expires.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = spec(&sim);
    assert_eq!(last.holder_identity.as_ref(), Some(&leader.id));
    let expires = renew_time(&last)
        .checked_add(SignedDuration::try_from(lease).unwrap())
        .unwrap();

    // Negative control: 250 ms before expiry nobody has renewed and the follower waits.
    let until_check = Timestamp::now().duration_until(expires) - SignedDuration::from_millis(250);
    tokio::time::sleep(Duration::try_from(until_check).unwrap_or_default()).await;
    assert!(!follower.is_leader(), "took over before the Lease expired");
    assert_eq!(spec(&sim), last, "the killed leader still renewed");
    assert_eq!(follower.names(), Some(leader.id.clone()));

    let took = wait_until(Duration::from_secs(5), || follower.is_leader())
        .await
        .expect("the follower takes over after expiry");
    let took_wall = Timestamp::now();
    assert!(
        took_wall >= expires,
        "took over at {took_wall}, before expiry at {expires}"
    );
    let bound = lease + 2 * RETRY;
    assert!(
        took - killed <= bound,
        "take-over {:?} after the kill (bound {bound:?})",
        took - killed
    );
    let s = spec(&sim);
    assert_eq!(s.holder_identity.as_ref(), Some(&follower.id));
    assert_eq!(s.lease_transitions, Some(1));
    mon.assert_never_two();
    stop(follower).await;
}

#[tokio::test]
async fn contenders_for_an_expired_lease_elect_exactly_one() {
    let (sim, server) = start().await;
    // A Lease left by a replica that died long ago.
    let stale = Timestamp::now() - SignedDuration::from_secs(60);
    let ghost = Lease {
        metadata: ObjectMeta {
            name: Some(LEASE.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("okr-ghost".into()),
            lease_duration_seconds: Some(2),
            acquire_time: Some(MicroTime(stale)),
            renew_time: Some(MicroTime(stale)),
            lease_transitions: Some(4),
            ..Default::default()
        }),
    };
    Api::<Lease>::namespaced(client(&server), NS)
        .create(&PostParams::default(), &ghost)
        .await
        .unwrap();

    // Three candidates all read it expired and race to replace it: the version check lets
    // one through and sends the others back to re-read.
    let rs: Vec<_> = ["okr-a", "okr-b", "okr-c"]
        .into_iter()
        .map(|id| Replica::start(&server, cfg(id, 2, Duration::from_secs(1))))
        .collect();
    let refs: Vec<&Replica> = rs.iter().collect();
    let mon = Monitor::start(&refs);
    wait_until(Duration::from_secs(5), || {
        refs.iter().any(|r| r.is_leader())
    })
    .await
    .expect("a leader is elected");
    let l = refs.iter().position(|r| r.is_leader()).unwrap();
    let want = Some(refs[l].id.clone());
    wait_until(Duration::from_secs(2), || {
        refs.iter().all(|r| r.names() == want)
    })
    .await
    .expect("every replica names the leader");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = spec(&sim);
    assert_eq!(s.holder_identity, want);
    assert_eq!(s.lease_transitions, Some(5));
    mon.assert_never_two();
    for r in rs {
        stop(r).await;
    }
}

/// Every write fails (`status`) from some moment: the leader keeps trying until the renew
/// deadline, then steps down on its own (nobody else holds the Lease yet).
async fn renewals_fail(status: u16) {
    let (sim, server) = start().await;
    let deadline = Duration::from_secs(1);
    let a = Replica::start(&server, cfg("okr-a", 2, deadline));
    let b = Replica::start(&server, cfg("okr-b", 2, deadline));
    let mon = Monitor::start(&[&a, &b]);
    let (l, _) = settled(&[&a, &b]).await;
    let (leader, follower) = if l == 0 { (&a, &b) } else { (&b, &a) };

    let writes = sim.write_count();
    for n in 1..=30 {
        sim.fail_nth_write(n, status);
    }
    let injected = Instant::now();
    let down = wait_until(Duration::from_secs(3), || !leader.is_leader())
        .await
        .expect("the leader steps down");
    let held = down - injected;
    // The lease still names it: it stepped down because its renewals failed.
    assert_eq!(spec(&sim).holder_identity.as_ref(), Some(&leader.id));
    assert!(!follower.is_leader());
    let failed = sim.write_count() - writes;
    assert!(
        failed >= 4,
        "only {failed} renewal writes were attempted (and failed)"
    );
    assert!(
        held <= deadline + Duration::from_millis(100),
        "stepped down {held:?} after renewals began failing (renew deadline {deadline:?})"
    );
    assert!(
        held >= deadline - RETRY - Duration::from_millis(150),
        "stepped down after {held:?}: before the renew deadline ran out"
    );

    // Once the API answers again, a leader is elected again.
    wait_until(Duration::from_secs(15), || a.is_leader() || b.is_leader())
        .await
        .expect("a leader again once writes succeed");
    mon.assert_never_two();
    stop(a).await;
    stop(b).await;
}

#[tokio::test]
async fn a_leader_whose_renewals_fail_with_500_steps_down_within_the_renew_deadline() {
    renewals_fail(500).await;
}

#[tokio::test]
async fn a_leader_whose_renewals_conflict_steps_down_within_the_renew_deadline() {
    renewals_fail(409).await;
}

fn url_annotations(sim: &KubeSim) -> (Option<String>, Option<String>) {
    let a = sim
        .lease(NS, LEASE)
        .expect("the Lease exists")
        .metadata
        .annotations
        .unwrap_or_default();
    (
        a.get(API_URL_ANNOTATION).cloned(),
        a.get(API_URL_HOLDER_ANNOTATION).cloned(),
    )
}

/// The leader's API URL reaches followers through the Lease (what forwarding needs), a new
/// leader replaces it, and a released Lease advertises none.
#[tokio::test]
async fn followers_learn_the_leaders_api_url_from_the_lease() {
    let (sim, server) = start().await;
    let with_url = |id: &str, url: Option<&str>| LeaderConfig {
        api_url: url.map(Into::into),
        ..cfg(id, 2, Duration::from_secs(1))
    };
    let a = Replica::start(&server, with_url("okr-a", Some("http://10.0.0.1:8080")));
    wait_until(Duration::from_secs(5), || a.is_leader())
        .await
        .expect("okr-a leads");
    assert_eq!(
        url_annotations(&sim),
        (Some("http://10.0.0.1:8080".into()), Some("okr-a".into()))
    );
    // okr-b advertises nothing, okr-c does.
    let b = Replica::start(&server, with_url("okr-b", None));
    let c = Replica::start(&server, with_url("okr-c", Some("http://10.0.0.3:8080")));
    let a_holder = Holder {
        identity: "okr-a".into(),
        api_url: Some("http://10.0.0.1:8080".into()),
    };
    for r in [&a, &b, &c] {
        wait_until(Duration::from_secs(2), || {
            r.holder().as_ref() == Some(&a_holder)
        })
        .await
        .unwrap_or_else(|| panic!("{} sees {:?}", r.id, r.holder()));
    }
    let mon = Monitor::start(&[&b, &c]);
    stop(a).await;
    assert_eq!(
        url_annotations(&sim),
        (None, None),
        "a released Lease advertises no URL"
    );
    wait_until(Duration::from_secs(3), || b.is_leader() || c.is_leader())
        .await
        .expect("a new leader");
    let (leader, follower, url) = if b.is_leader() {
        (&b, &c, None)
    } else {
        (&c, &b, Some("http://10.0.0.3:8080".to_string()))
    };
    let want = Holder {
        identity: leader.id.clone(),
        api_url: url.clone(),
    };
    // The follower follows the new leader's URL (or its lack of one), never okr-a's.
    wait_until(Duration::from_secs(2), || {
        follower.holder().as_ref() == Some(&want)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{} sees {:?}, want {want:?}",
            follower.id,
            follower.holder()
        )
    });
    assert_eq!(leader.holder(), Some(want));
    let holder_ann = url.as_ref().map(|_| leader.id.clone());
    assert_eq!(url_annotations(&sim), (url, holder_ann));
    mon.assert_never_two();
    stop(b).await;
    stop(c).await;
}
