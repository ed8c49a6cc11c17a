//! The metrics exposition as a real scraper library reads it: Python `prometheus_client`'s
//! text parser (installed into `.tools/venv` by the test command). After a synthetic
//! completed rotation, a rolled-back one, an event for an unconfigured target and some
//! backend calls, the parsed series must be exactly the expected set with the expected
//! values, and every label value must come from its bounded set. Negative controls show the
//! parser and the label check reject bad input.

use crate::support;
use chrono::{DateTime, TimeZone, Utc};
use openai_key_rotator::metrics::Metrics;
use openai_key_rotator::rotation::journal::{PendingDeletion, PendingReason};
use openai_key_rotator::rotation::ports::{AccountRef, Backend, CallObserver, StatusClass};
use openai_key_rotator::rotation::{
    Journal, Observer, RotationEvent, RotationRequest, Status, Step, Trigger,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const P: &str = "openai_key_rotator_";
const TARGETS: [&str; 2] = ["chat", "search"];
const TRIGGERS: [&str; 6] = [
    "schedule",
    "max_age",
    "signal",
    "api",
    "cli",
    "usage_anomaly",
];
const EVENTS: [&str; 6] = [
    "completed",
    "rolled_back",
    "failed",
    "emergency",
    "anomaly",
    "overdue",
];
const OUTCOMES: [&str; 3] = ["completed", "rolled_back", "failed"];
const BACKENDS: [&str; 3] = ["openai", "vault", "kubernetes"];
const STATUS_CLASSES: [&str; 5] = ["2xx", "429", "4xx", "5xx", "transport"];
/// Every operation name a client may report: the clients' own fixed sets.
fn operations() -> Vec<&'static str> {
    [
        openai_key_rotator::openai::OPERATIONS,
        openai_key_rotator::vault::OPERATIONS,
        openai_key_rotator::kube::OPERATIONS,
    ]
    .concat()
}
const ROTATION_LE: [&str; 12] = [
    "1", "5", "15", "30", "60", "120", "300", "600", "1200", "1800", "3600", "+Inf",
];
const API_LE: [&str; 13] = [
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "+Inf",
];

/// A sample: its name and sorted labels.
type Series = (String, BTreeMap<String, String>);
/// Every sample's value, and every family's type.
type Parsed = (BTreeMap<Series, f64>, BTreeMap<String, String>);

/// Parse with `prometheus_client.parser.text_string_to_metric_families`; `Err` carries the
/// parser's complaint. Also returns each family's type.
fn parse_with_prometheus_client(text: &str) -> Result<Parsed, String> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {"samples": [], "types": {}}
for fam in text_string_to_metric_families(sys.stdin.read()):
    out["types"][fam.name] = fam.type
    for s in fam.samples:
        out["samples"].append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new(support::tool("python"))
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("script prints JSON");
    let mut samples = BTreeMap::new();
    for s in v["samples"].as_array().unwrap() {
        let name = s[0].as_str().unwrap().to_string();
        let labels: BTreeMap<String, String> = s[1]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let value = s[2].as_f64().unwrap();
        let key = (name, labels);
        assert!(
            samples.insert(key.clone(), value).is_none(),
            "duplicate {key:?}"
        );
    }
    let types = v["types"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    Ok((samples, types))
}

/// Label values outside their bounded sets.
fn unbounded_labels(samples: &BTreeMap<Series, f64>) -> Vec<String> {
    let steps: Vec<&str> = Step::ALL.iter().map(|s| s.as_str()).collect();
    let mut bad = Vec::new();
    for (name, labels) in samples.keys() {
        for (k, v) in labels {
            let ok = match k.as_str() {
                "target" => TARGETS.contains(&v.as_str()),
                "trigger" => TRIGGERS.contains(&v.as_str()),
                "outcome" => match name.as_str() {
                    "openai_key_rotator_notifications_total" => {
                        openai_key_rotator::metrics::NOTIFY_OUTCOMES.contains(&v.as_str())
                    }
                    "openai_key_rotator_usage_anomaly_checks_total" => {
                        openai_key_rotator::metrics::ANOMALY_OUTCOMES.contains(&v.as_str())
                    }
                    _ => OUTCOMES.contains(&v.as_str()),
                },
                "event" => EVENTS.contains(&v.as_str()),
                "step" => steps.contains(&v.as_str()),
                "backend" => BACKENDS.contains(&v.as_str()),
                "status_class" => STATUS_CLASSES.contains(&v.as_str()),
                "operation" => operations().contains(&v.as_str()),
                "le" => ROTATION_LE.contains(&v.as_str()) || API_LE.contains(&v.as_str()),
                "version" => v == env!("CARGO_PKG_VERSION"),
                _ => false,
            };
            if !ok {
                bad.push(format!("{name}: {k}={v:?}"));
            }
        }
    }
    bad
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_790_000_000 + secs, 0).unwrap()
}

fn epoch(t: DateTime<Utc>) -> f64 {
    t.timestamp() as f64
}

fn journal(target: &str, trigger: Trigger) -> Journal {
    let mut req = RotationRequest::new(target, trigger, "test", "test", at(0));
    req.rotation_id = "20261123215000-abc123".into();
    let mut j = Journal::queued(&req, "okr");
    j.old_vault_version = 1;
    j
}

/// Each step takes 10 s of journal time and `secs` measured.
fn drive(m: &Metrics, j: &mut Journal, steps: &[(Step, u64)], status: Status) {
    m.on_event(j, &RotationEvent::Started);
    let mut clock = 0;
    for &(step, secs) in steps {
        j.begin(step, at(clock));
        m.on_event(j, &RotationEvent::StepStarted(step));
        clock += 10;
        j.finish("ok", at(clock));
        m.on_event(
            j,
            &RotationEvent::StepFinished {
                step,
                outcome: "ok".into(),
                duration: Duration::from_secs(secs),
            },
        );
    }
    j.status = status;
    m.on_event(j, &RotationEvent::Finished);
}

fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    (
        format!("{P}{name}"),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The expected samples of one histogram series, all zero.
fn histogram(want: &mut BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)], le: &[&str]) {
    for b in le {
        let mut l = labels.to_vec();
        l.push(("le", b));
        want.insert(series(&format!("{name}_bucket"), &l), 0.0);
    }
    want.insert(series(&format!("{name}_sum"), labels), 0.0);
    want.insert(series(&format!("{name}_count"), labels), 0.0);
}

/// Add one observation of `x` to an expected histogram.
fn observe(want: &mut BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)], x: f64) {
    for (key, v) in want.iter_mut() {
        let (n, l) = key;
        let same = labels
            .iter()
            .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v));
        if !same {
            continue;
        }
        if *n == format!("{P}{name}_bucket") {
            let le = &l["le"];
            if le == "+Inf" || le.parse::<f64>().unwrap() >= x {
                *v += 1.0;
            }
        } else if *n == format!("{P}{name}_count") {
            *v += 1.0;
        } else if *n == format!("{P}{name}_sum") {
            *v += x;
        }
    }
}

fn set(want: &mut BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)], v: f64) {
    let key = series(name, labels);
    assert!(want.contains_key(&key), "not an expected series: {key:?}");
    want.insert(key, v);
}

const FORWARD: [(Step, u64); 7] = [
    (Step::Mint, 1),
    (Step::Publish, 1),
    (Step::Sync, 4),
    (Step::Roll, 1),
    (Step::Verify, 90),
    (Step::Drain, 700),
    (Step::Retire, 2),
];

const ROLLED_BACK: [(Step, u64); 5] = [
    (Step::Mint, 1),
    (Step::Publish, 1),
    (Step::Sync, 1),
    (Step::Roll, 1),
    (Step::Rollback, 40),
];

fn exercised() -> Metrics {
    let targets: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    let m = Metrics::new(&targets);
    drive(
        &m,
        &mut journal("chat", Trigger::Schedule),
        &FORWARD,
        Status::Completed,
    );
    let mut rb = journal("search", Trigger::Api);
    rb.pending_deletions.push(PendingDeletion::new(
        AccountRef {
            id: "svc_acct_new".into(),
            key_id: "key_new".into(),
        },
        PendingReason::Rollback,
        None,
        "proj_test",
        at(0),
    ));
    drive(&m, &mut rb, &ROLLED_BACK, Status::RolledBack);
    // Not a configured target: must leave no trace at all.
    drive(
        &m,
        &mut journal("intruder", Trigger::Cli),
        &FORWARD,
        Status::Completed,
    );
    m.set_next_rotation("intruder", Some(at(1)));
    m.set_key_created("intruder", Some(at(1)));
    m.set_next_rotation("search", Some(at(3600)));
    m.call(
        Backend::OpenAi,
        "service_accounts.create",
        StatusClass::Success,
        Duration::from_millis(40),
    );
    m.call(
        Backend::OpenAi,
        "service_accounts.create",
        StatusClass::RateLimited,
        Duration::from_millis(4),
    );
    m.retry(Backend::OpenAi, "service_accounts.create");
    m.call(
        Backend::Vault,
        "kv.write",
        StatusClass::ServerError,
        Duration::from_secs(3),
    );
    m.set_leader(true);
    m.orphans_swept(3);
    m
}

fn expected() -> BTreeMap<Series, f64> {
    let mut w = BTreeMap::new();
    w.insert(
        series("build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0,
    );
    w.insert(series("leader", &[]), 1.0);
    w.insert(series("orphans_swept_total", &[]), 3.0);
    for e in EVENTS {
        for o in openai_key_rotator::metrics::NOTIFY_OUTCOMES {
            w.insert(
                series("notifications_total", &[("event", e), ("outcome", o)]),
                0.0,
            );
        }
    }
    for b in BACKENDS {
        w.insert(series("retries_total", &[("backend", b)]), 0.0);
        w.insert(series("rate_limit_waits_total", &[("backend", b)]), 0.0);
    }
    for s in Step::ALL {
        histogram(
            &mut w,
            "step_duration_seconds",
            &[("step", s.as_str())],
            &ROTATION_LE,
        );
    }
    for t in TARGETS {
        for tr in TRIGGERS {
            for o in OUTCOMES {
                w.insert(
                    series(
                        "rotations_total",
                        &[("target", t), ("trigger", tr), ("outcome", o)],
                    ),
                    0.0,
                );
            }
        }
        histogram(
            &mut w,
            "rotation_duration_seconds",
            &[("target", t)],
            &ROTATION_LE,
        );
        for g in [
            "last_success_timestamp_seconds",
            "next_rotation_timestamp_seconds",
            "key_created_timestamp_seconds",
            "rotation_in_progress",
            "old_account_pending_deletion",
            "leaked_key_pending_revocation",
            "unlisted_consumers",
            "usage_anomaly",
            "usage_anomaly_ratio",
        ] {
            w.insert(series(g, &[("target", t)]), 0.0);
        }
        for o in openai_key_rotator::metrics::ANOMALY_OUTCOMES {
            w.insert(
                series(
                    "usage_anomaly_checks_total",
                    &[("target", t), ("outcome", o)],
                ),
                0.0,
            );
        }
        for s in Step::ALL {
            w.insert(
                series("rotation_step", &[("target", t), ("step", s.as_str())]),
                0.0,
            );
        }
    }
    // The completed rotation of chat.
    set(
        &mut w,
        "rotations_total",
        &[
            ("target", "chat"),
            ("trigger", "schedule"),
            ("outcome", "completed"),
        ],
        1.0,
    );
    observe(
        &mut w,
        "rotation_duration_seconds",
        &[("target", "chat")],
        70.0,
    );
    set(
        &mut w,
        "last_success_timestamp_seconds",
        &[("target", "chat")],
        epoch(at(70)),
    );
    set(
        &mut w,
        "key_created_timestamp_seconds",
        &[("target", "chat")],
        epoch(at(10)),
    );
    for (s, secs) in FORWARD {
        observe(
            &mut w,
            "step_duration_seconds",
            &[("step", s.as_str())],
            secs as f64,
        );
    }
    // The rolled-back rotation of search.
    set(
        &mut w,
        "rotations_total",
        &[
            ("target", "search"),
            ("trigger", "api"),
            ("outcome", "rolled_back"),
        ],
        1.0,
    );
    observe(
        &mut w,
        "rotation_duration_seconds",
        &[("target", "search")],
        50.0,
    );
    set(
        &mut w,
        "old_account_pending_deletion",
        &[("target", "search")],
        1.0,
    );
    set(
        &mut w,
        "next_rotation_timestamp_seconds",
        &[("target", "search")],
        epoch(at(3600)),
    );
    for (s, secs) in ROLLED_BACK {
        observe(
            &mut w,
            "step_duration_seconds",
            &[("step", s.as_str())],
            secs as f64,
        );
    }
    // Backend calls.
    let create = [
        ("backend", "openai"),
        ("operation", "service_accounts.create"),
    ];
    for class in ["2xx", "429"] {
        let mut l = create.to_vec();
        l.push(("status_class", class));
        w.insert(series("api_requests_total", &l), 1.0);
    }
    let write = [("backend", "vault"), ("operation", "kv.write")];
    let mut l = write.to_vec();
    l.push(("status_class", "5xx"));
    w.insert(series("api_requests_total", &l), 1.0);
    histogram(&mut w, "api_request_duration_seconds", &create, &API_LE);
    histogram(&mut w, "api_request_duration_seconds", &write, &API_LE);
    observe(&mut w, "api_request_duration_seconds", &create, 0.04);
    observe(&mut w, "api_request_duration_seconds", &create, 0.004);
    observe(&mut w, "api_request_duration_seconds", &write, 3.0);
    set(&mut w, "retries_total", &[("backend", "openai")], 1.0);
    w
}

#[test]
fn prometheus_client_reads_exactly_the_expected_series() {
    let m = exercised();
    let text = m.render();
    assert!(!text.contains("intruder"), "unknown target leaked:\n{text}");
    let (samples, types) =
        parse_with_prometheus_client(&text).unwrap_or_else(|e| panic!("parser: {e}\n{text}"));
    assert_eq!(unbounded_labels(&samples), Vec::<String>::new());

    let want = expected();
    let missing: Vec<_> = want.keys().filter(|k| !samples.contains_key(*k)).collect();
    let extra: Vec<_> = samples.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(missing.is_empty(), "missing series: {missing:#?}");
    assert!(extra.is_empty(), "unexpected series: {extra:#?}");
    for (k, v) in &want {
        let got = samples[k];
        assert!((got - v).abs() < 1e-9, "{k:?}: got {got}, want {v}");
    }

    // Families and their types as the parser sees them (counters lose `_total`).
    let p = |n: &str| format!("{P}{n}");
    let want_types: BTreeMap<String, String> = [
        ("rotations", "counter"),
        ("rotation_duration_seconds", "histogram"),
        ("step_duration_seconds", "histogram"),
        ("last_success_timestamp_seconds", "gauge"),
        ("next_rotation_timestamp_seconds", "gauge"),
        ("key_created_timestamp_seconds", "gauge"),
        ("rotation_in_progress", "gauge"),
        ("rotation_step", "gauge"),
        ("api_requests", "counter"),
        ("api_request_duration_seconds", "histogram"),
        ("retries", "counter"),
        ("rate_limit_waits", "counter"),
        ("orphans_swept", "counter"),
        ("old_account_pending_deletion", "gauge"),
        ("leaked_key_pending_revocation", "gauge"),
        ("unlisted_consumers", "gauge"),
        ("leader", "gauge"),
        ("build_info", "gauge"),
        ("notifications", "counter"),
        ("usage_anomaly", "gauge"),
        ("usage_anomaly_ratio", "gauge"),
        ("usage_anomaly_checks", "counter"),
    ]
    .into_iter()
    .map(|(n, t)| (p(n), t.to_string()))
    .collect();
    assert_eq!(types, want_types);
}

#[test]
fn mid_rotation_exactly_one_step_is_current() {
    let m = Metrics::new(&["chat".into()]);
    let mut j = journal("chat", Trigger::Signal);
    m.on_event(&j, &RotationEvent::Started);
    j.begin(Step::Verify, at(0));
    m.on_event(&j, &RotationEvent::StepStarted(Step::Verify));
    let (samples, _) = parse_with_prometheus_client(&m.render()).unwrap();
    let current: BTreeSet<&str> = samples
        .iter()
        .filter(|((n, _), v)| *n == format!("{P}rotation_step") && **v == 1.0)
        .map(|((_, l), _)| l["step"].as_str())
        .collect();
    assert_eq!(current, BTreeSet::from(["verify"]));
    assert_eq!(
        samples[&series("rotation_in_progress", &[("target", "chat")])],
        1.0
    );
}

/// The checks above can fail: the parser rejects a malformed exposition, and the label
/// check flags values outside the bounded sets.
#[test]
fn negative_controls() {
    let bad = format!("# TYPE {P}leader gauge\n{P}leader{{x=\"unterminated}} 1\n");
    assert!(parse_with_prometheus_client(&bad).is_err());
    let bad = format!("# TYPE {P}leader gauge\n{P}leader not-a-number\n");
    assert!(parse_with_prometheus_client(&bad).is_err());

    let mut text = exercised().render();
    text.push_str(&format!(
        "# HELP {P}x x\n# TYPE {P}x gauge\n{P}x{{target=\"intruder\",step=\"mint\"}} 1\n"
    ));
    let (samples, _) = parse_with_prometheus_client(&text).unwrap();
    assert_eq!(
        unbounded_labels(&samples),
        vec![format!("{P}x: target=\"intruder\"")]
    );
    assert!(!expected().contains_key(&series("x", &[("target", "intruder"), ("step", "mint")])));
}

/// The real Vault store reports into the real metrics: before it connects there is no Vault
/// call series (and the Vault retry counter is 0); after a login, a write and a read, the
/// series exist with exactly those counts, every label from a bounded set, as
/// `prometheus_client` parses them.
#[tokio::test]
async fn vault_store_calls_show_in_the_exposition() {
    use openai_key_rotator::config::{VaultAuth, VaultConfig};
    use openai_key_rotator::rotation::ports::{KeyMeta, SecretStore};
    use openai_key_rotator::secret::Secret;
    use openai_key_rotator::vault::VaultStore;
    use std::sync::Arc;

    let m = Arc::new(Metrics::new(&["chat".into()]));
    let vault_requests = |samples: &BTreeMap<Series, f64>| -> BTreeMap<(String, String), f64> {
        samples
            .iter()
            .filter(|((n, l), _)| {
                *n == format!("{P}api_requests_total")
                    && l.get("backend").map(String::as_str) == Some("vault")
            })
            .map(|((_, l), v)| ((l["operation"].clone(), l["status_class"].clone()), *v))
            .collect()
    };
    let (before, _) = parse_with_prometheus_client(&m.render()).unwrap();
    assert!(vault_requests(&before).is_empty(), "no Vault call yet");
    assert_eq!(
        before[&series("retries_total", &[("backend", "vault")])],
        0.0
    );

    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &bao.token).unwrap();
    let cfg = VaultConfig {
        address: bao.addr.clone(),
        auth: VaultAuth::Token {
            token_env: "OKR_UNSET_METRICS_TEST_TOKEN".into(),
            token_file: Some(token_file),
        },
        ..VaultConfig::default()
    };
    let store = VaultStore::connect(&cfg, m.clone()).await.unwrap();
    let path = format!("okr-metrics-{}/openai", uuid::Uuid::new_v4().simple());
    let key = Secret::new("sk-svcacct-METRICS-CANARY");
    let meta = KeyMeta {
        rotation_id: Some("rot-metrics".into()),
        ..KeyMeta::default()
    };
    store
        .write_key(&path, "api_key", &key, &meta, 0)
        .await
        .unwrap();
    store.read_key(&path, "api_key").await.unwrap().unwrap();

    let text = m.render();
    assert!(!text.contains(key.expose()) && !text.contains(&path));
    let (after, _) = parse_with_prometheus_client(&text).unwrap();
    assert_eq!(unbounded_labels(&after), Vec::<String>::new());
    let ok = |op: &str| (op.to_string(), "2xx".to_string());
    assert_eq!(
        vault_requests(&after),
        BTreeMap::from([
            (ok("token.lookup_self"), 1.0),
            // The write reads metadata (a 404 for a new path), writes, then merges the
            // metadata (read + write).
            (ok("kv.metadata.read"), 2.0),
            (ok("kv.write"), 1.0),
            (ok("kv.metadata.write"), 1.0),
            (ok("kv.read"), 1.0),
        ])
    );
    assert_eq!(
        after[&series(
            "api_request_duration_seconds_count",
            &[("backend", "vault"), ("operation", "kv.write")]
        )],
        1.0
    );
    assert_eq!(
        after[&series("retries_total", &[("backend", "vault")])],
        0.0
    );
}
