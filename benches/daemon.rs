//! The daemon measured as its own release process, with the simulators in another
//! (`openai-key-rotator sandbox`), so every figure is the daemon's own; and the shell recipe
//! users script today (curl, bao, kubectl) on the same scenarios.
//!
//! ```sh
//! cargo build --release                       # the measured binary
//! cargo bench --bench daemon                  # everything (about 25 minutes on 2 cores)
//! cargo bench --bench daemon -- p1 p3         # some parts: p1 p2 p3 p4 recipe
//! ```
//!
//! Each part rewrites its own section of BENCHMARKS.md (between `<!-- begin:NAME -->` and
//! `<!-- end:NAME -->`). `OKR_BIN` overrides the binary, `OKR_DAEMON_BIN` the measured daemon's alone; the recipe needs `curl`, `jq`,
//! `kubectl` and `bao` on PATH (`scripts/recipe.sh`).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const CLK_TCK: f64 = 100.0;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> PathBuf {
    std::env::var_os("OKR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/openai-key-rotator"))
}

/// The measured daemon: `OKR_DAEMON_BIN` (e.g. a `--no-default-features` build, as the
/// image ships), else the same binary as the sandbox.
fn daemon_bin() -> PathBuf {
    std::env::var_os("OKR_DAEMON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(bin)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status();
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let n = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    n(14) + n(15)
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`).
fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// (VmRSS, VmHWM) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    (status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18080)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

// ---------------------------------------------------------------------------------------
// The sandbox process.

struct Sandbox {
    child: Child,
    dir: PathBuf,
    openai: String,
    vault: String,
    kube: String,
    out: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
}

impl Sandbox {
    fn start(dir: &Path, args: &[String]) -> Res<Sandbox> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let mut child = Command::new(bin())
            .arg("sandbox")
            .arg("--dir")
            .arg(dir)
            .args([
                "--openai-port",
                "0",
                "--vault-port",
                "0",
                "--kube-port",
                "0",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("sandbox.log"))?)
            .spawn()?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let t = Instant::now();
        loop {
            if out
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with("Stop with"))
            {
                break;
            }
            if let Some(status) = child.try_wait()? {
                return Err(format!("sandbox exited: {status}").into());
            }
            if t.elapsed() > Duration::from_secs(600) {
                return Err("sandbox did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = |what: &str| -> Res<String> {
            let lines = out.lock().unwrap();
            let l = lines
                .iter()
                .find(|l| l.contains(what))
                .ok_or(format!("no {what} line"))?;
            Ok(l.split_whitespace()
                .find(|w| w.starts_with("http"))
                .ok_or("no url")?
                .to_string())
        };
        let openai = url("OpenAI API simulator")?;
        Ok(Sandbox {
            openai: openai.trim_end_matches("/v1").to_string(),
            vault: url("Vault simulator")?,
            kube: url("Kubernetes simulator")?,
            child,
            dir: dir.to_path_buf(),
            out,
            http: http(),
        })
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Every Deployment rolled out (kubectl's rule).
    async fn wait_ready(&self, timeout: Duration) -> Res<()> {
        let t = Instant::now();
        loop {
            let v: Value = self
                .http
                .get(format!("{}/apis/apps/v1/deployments", self.kube))
                .send()
                .await?
                .json()
                .await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if !items.is_empty() && items.iter().all(rolled_out) {
                return Ok(());
            }
            if t.elapsed() > timeout {
                return Err("pods not ready in time".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn openai_faults(&self, faults: Value) -> Res<()> {
        let r = self
            .http
            .put(format!("{}/_sim/faults", self.openai))
            .json(&faults)
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("faults: {}", r.text().await?).into());
        }
        Ok(())
    }

    /// OpenAI simulator calls per operation (every answer, 429s included).
    async fn openai_calls(&self) -> Res<BTreeMap<String, u64>> {
        let v: Value = self
            .http
            .get(format!("{}/_sim/stats", self.openai))
            .send()
            .await?
            .json()
            .await?;
        Ok(v["calls"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The key Vault serves at `path`.
    async fn vault_key(&self, path: &str) -> Res<String> {
        let v: Value = self
            .http
            .get(format!("{}/v1/secret/data/{path}", self.vault))
            .header("X-Vault-Token", self.file("vault-token"))
            .send()
            .await?
            .json()
            .await?;
        Ok(v["data"]["data"]["api_key"]
            .as_str()
            .ok_or("no key")?
            .to_string())
    }

    /// Stop; the consumers' (successful, failed) calls.
    fn stop(mut self) -> (u64, u64) {
        signal(self.child.id(), "TERM");
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        let lines = self.out.lock().unwrap();
        let Some(l) = lines.iter().find(|l| l.starts_with("stopping:")) else {
            return (0, u64::MAX);
        };
        let nums: Vec<u64> = l
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (
            nums.first().copied().unwrap_or(0),
            nums.get(1).copied().unwrap_or(u64::MAX),
        )
    }
}

/// A part that fails early must not leave its simulators running.
impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rolled_out(d: &Value) -> bool {
    let st = &d["status"];
    let want = d["spec"]["replicas"].as_i64().unwrap_or(1);
    let n = |k: &str| st[k].as_i64().unwrap_or(0);
    n("observedGeneration") >= d["metadata"]["generation"].as_i64().unwrap_or(0)
        && n("updatedReplicas") == want
        && n("replicas") == want
        && n("availableReplicas") == want
}

// ---------------------------------------------------------------------------------------
// The daemon process.

struct Daemon {
    child: Child,
    pid: u32,
    url: String,
    token: String,
    audit: PathBuf,
    /// From spawn to the first `/readyz` 200.
    ready_after: Duration,
    http: reqwest::Client,
}

#[derive(Clone)]
struct DaemonSettings {
    poll_interval: &'static str,
    max_concurrent: usize,
    /// Zero the targets' grace period (the recipe has none).
    no_grace: bool,
    name: &'static str,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings {
            poll_interval: "",
            max_concurrent: 0,
            no_grace: true,
            name: "daemon",
        }
    }
}

#[derive(Clone, Debug)]
struct Rec {
    time: f64,
    event: String,
    rotation_id: String,
    step: String,
}

impl Daemon {
    async fn start(sb: &Sandbox, s: &DaemonSettings) -> Res<Daemon> {
        let text = std::fs::read_to_string(sb.dir.join("config.toml"))?;
        let mut cfg: toml::Value = toml::from_str(&text)?;
        let port = free_port();
        let audit = sb.dir.join(format!("audit-{}-{port}.jsonl", s.name));
        {
            let d = cfg["daemon"].as_table_mut().ok_or("no [daemon]")?;
            d.insert("listen".into(), format!("127.0.0.1:{port}").into());
            if !s.poll_interval.is_empty() {
                d.insert("poll_interval".into(), s.poll_interval.into());
            }
            if s.max_concurrent > 0 {
                d.insert(
                    "max_concurrent_rotations".into(),
                    (s.max_concurrent as i64).into(),
                );
            }
            let mut a = toml::map::Map::new();
            a.insert("file".into(), audit.display().to_string().into());
            a.insert("stdout".into(), false.into());
            d.insert("audit".into(), a.into());
        }
        for t in cfg["targets"].as_array_mut().ok_or("no targets")? {
            let t = t.as_table_mut().ok_or("target")?;
            // Scheduled, but not during a measurement.
            t.insert("schedule".into(), "0 0 0 1 1 *".into());
            t.insert("jitter".into(), "0s".into());
            if s.no_grace {
                t.insert("grace_period".into(), "0s".into());
            }
        }
        let cfg_path = sb.dir.join(format!("config-{}-{port}.toml", s.name));
        std::fs::write(&cfg_path, toml::to_string(&cfg)?)?;
        let token = format!("bench-token-{port}-0123456789abcdef");
        let tokens = sb.dir.join("api-tokens");
        std::fs::write(&tokens, format!("bench:{token}\n"))?;
        let started = Instant::now();
        let child = Command::new(daemon_bin())
            .args(["run", "--config"])
            .arg(&cfg_path)
            .arg("--api-tokens-file")
            .arg(&tokens)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                sb.dir.join(format!("{}-{port}.log", s.name)),
            )?)
            .spawn()?;
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        loop {
            if let Ok(r) = client.get(format!("{url}/readyz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err("daemon not ready".into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ready_after = started.elapsed();
        Ok(Daemon {
            pid: child.id(),
            child,
            url,
            token,
            audit,
            ready_after,
            http: client,
        })
    }

    /// Start a rotation; the wall-clock time (seconds) the accepted request was sent, and
    /// its id. A 409 right after the previous rotation's last audit line (the target is
    /// released just after it) is retried.
    async fn trigger(
        &self,
        target: &str,
        emergency: bool,
        revoke_first: bool,
    ) -> Res<(f64, String)> {
        let mut body = json!({"reason": "bench", "emergency": emergency});
        if revoke_first {
            body["revoke_first"] = true.into();
        }
        let t = Instant::now();
        loop {
            let sent = now_secs();
            let r = self
                .http
                .post(format!("{}/v1/targets/{target}/rotations", self.url))
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await?;
            let status = r.status();
            let v: Value = r.json().await?;
            if status.as_u16() == 409 && t.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            if status.as_u16() != 202 {
                return Err(format!("trigger {target}: {status} {v}").into());
            }
            let id = v["rotation_id"].as_str().ok_or("no rotation_id")?;
            return Ok((sent, id.to_string()));
        }
    }

    fn records(&self) -> Vec<Rec> {
        let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                Rec {
                    time: chrono::DateTime::parse_from_rfc3339(&s("time"))
                        .map(|t| t.timestamp_micros() as f64 / 1e6)
                        .unwrap_or(0.0),
                    event: s("event"),
                    rotation_id: s("rotation_id"),
                    step: s("step"),
                }
            })
            .collect()
    }

    /// Wait until `n` rotations ended (completed, rolled back or failed); their records.
    async fn wait_ended(&self, n: usize, timeout: Duration) -> Res<Vec<Rec>> {
        let t = Instant::now();
        loop {
            let recs = self.records();
            if recs.iter().filter(|r| ended(r)).count() >= n {
                return Ok(recs);
            }
            if t.elapsed() > timeout {
                return Err(format!("{n} rotations did not end in {timeout:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn metrics(&self) -> Res<BTreeMap<String, f64>> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    fn stop(mut self) {
        signal(self.pid, "TERM");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ended(r: &Rec) -> bool {
    matches!(
        r.event.as_str(),
        "rotation_completed" | "rotation_rolled_back" | "rotation_failed"
    )
}

fn now_secs() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// Sum of `api_requests_total` samples matching every `parts`.
fn calls(m: &BTreeMap<String, f64>, parts: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            k.starts_with("openai_key_rotator_api_requests_total{")
                && parts.iter().all(|p| k.contains(p))
        })
        .map(|(_, v)| v)
        .sum()
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, parts: &[&str]) -> f64 {
    calls(b, parts) - calls(a, parts)
}

// ---------------------------------------------------------------------------------------
// Report sections.

fn machine_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "Machine: {} cores shared with other engineers' builds (load average at the end of \
         this part: {}); figures are noisy, so they are medians and ratios. {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        load.join(" "),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
}

fn write_section(name: &str, body: &str) -> Res<()> {
    let path = root().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let (begin, end) = (
        format!("<!-- begin:{name} -->"),
        format!("<!-- end:{name} -->"),
    );
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{block}{}", &text[..b], &text[e + end.len()..])
        }
        _ => format!("{}\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(&path, new)?;
    println!("{body}");
    Ok(())
}

fn work_dir(name: &str) -> PathBuf {
    root().join("target/bench-daemon").join(name)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// P1: engine overhead.

/// Rollout length as the sandbox makes it: restart the Deployment, poll every 5 ms.
async fn measure_rollout(sb: &Sandbox, ns: &str, name: &str) -> Res<f64> {
    let url = format!(
        "{}/apis/apps/v1/namespaces/{ns}/deployments/{name}",
        sb.kube
    );
    let mut times = Vec::new();
    for i in 0..3 {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            "bench/restart": format!("{i}-{}", now_secs())}}}}});
        let t = Instant::now();
        let r = sb
            .http
            .patch(&url)
            .header("Content-Type", "application/strategic-merge-patch+json")
            .body(patch.to_string())
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("patch: {}", r.status()).into());
        }
        loop {
            let d: Value = sb.http.get(&url).send().await?.json().await?;
            if rolled_out(&d) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

async fn p1(quick: bool) -> Res<()> {
    let runs = if quick { 3 } else { 8 };
    let ready_ms = 500;
    let mut rows = Vec::new();
    let mut rollout = f64::NAN;
    let mut failures = Vec::new();
    for latency in [0u64, 20, 100] {
        let sb = Sandbox::start(
            &work_dir(&format!("p1-{latency}")),
            &s(&[
                "--targets",
                "1",
                "--pod-ready-delay-ms",
                &ready_ms.to_string(),
                "--consumer-interval-ms",
                "200",
            ]),
        )?;
        sb.wait_ready(Duration::from_secs(60)).await?;
        if latency == 0 {
            rollout = measure_rollout(&sb, "app-00001", "app-00001-api").await?;
        }
        // The latency is set after the rollout measurement (the sandbox flag would slow it).
        if latency > 0 {
            sb.openai_faults(json!({"scope": "both", "latency_ms": latency}))
                .await?;
            for url in [&sb.vault, &sb.kube] {
                sb.http
                    .put(format!("{url}/_sim/faults"))
                    .json(&json!({"latency_ms": latency}))
                    .send()
                    .await?;
            }
        }
        for poll in ["1s", "100ms", "20ms"] {
            let d = Daemon::start(
                &sb,
                &DaemonSettings {
                    poll_interval: poll,
                    name: "p1",
                    ..Default::default()
                },
            )
            .await?;
            // One warm-up rotation (connections, first journal).
            d.trigger("app-00001", false, false).await?;
            d.wait_ended(1, Duration::from_secs(120)).await?;
            let m0 = d.metrics().await?;
            let c0 = cpu_ticks(d.pid);
            let mut walls = Vec::new();
            for i in 0..runs {
                // The target is released just after its last audit line.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (t0, id) = d.trigger("app-00001", false, false).await?;
                let recs = d.wait_ended(i + 2, Duration::from_secs(120)).await?;
                let done = recs
                    .iter()
                    .find(|r| r.rotation_id == id && ended(r))
                    .ok_or("no end")?;
                if done.event != "rotation_completed" {
                    return Err(format!("rotation {id}: {}", done.event).into());
                }
                walls.push(done.time - t0);
            }
            let c1 = cpu_ticks(d.pid);
            let m1 = d.metrics().await?;
            let n = runs as f64;
            let total = delta(&m0, &m1, &[]) / n;
            // Each poll round is one `workload.get` (plus `pods.list` once complete); the
            // roll step makes one more. One round sees the rollout done; the rest are the
            // engine waiting.
            let gets = delta(&m0, &m1, &["operation=\"workload.get\""]) / n;
            let polls = (gets - 1.0).max(1.0);
            let sequential = total - (polls - 1.0);
            let critical = sequential * latency as f64 / 1000.0 + rollout;
            let wall = median(walls);
            let cpu_ms = (c1 - c0) as f64 / CLK_TCK * 1000.0 / n;
            rows.push(format!(
                "| {latency} ms | {poll} | {runs} | {:.0} ms | {total:.1} ({polls:.1} poll rounds) | {:.0} ms | **{:.3}×** {} | {cpu_ms:.1} ms {} |",
                wall * 1000.0,
                critical * 1000.0,
                wall / critical,
                if wall / critical <= 1.05 { "met" } else { "missed" },
                if cpu_ms <= 5.0 { "met" } else { "missed" },
            ));
            d.stop();
        }
        let (ok, failed) = sb.stop();
        failures.push(format!("L={latency} ms: {ok} ok / {failed} failed"));
    }
    let body = format!(
        "## P1: engine overhead (one target, one Deployment of 1 replica)\n\n\
         Reproduce: `cargo build --release && cargo bench --bench daemon -- p1`. The daemon \
         (`target/release/openai-key-rotator run`) and `openai-key-rotator sandbox --targets 1 \
         --pod-ready-delay-ms {ready_ms}` run as separate processes; latency L is added to every \
         request of all three simulators through their `/_sim/faults`. Each row: one warm-up \
         rotation, then {runs} sequential rotations triggered over HTTP (grace 0, no drain); \
         wall = trigger sent to `rotation_completed` in the audit file (median). Critical path = \
         (calls per rotation − the extra poll rounds, each a `workload.get`) × L + \
         the rollout ({:.0} ms: the sandbox's rollout measured by patching and polling every 5 ms). \
         CPU = utime+stime delta of the daemon from `/proc/PID/stat` over the rotations ÷ \
         rotations (10 ms ticks, so averaged). The model counts every other call as sequential \
         and the rollout as overlapping none; at L > 0 the calls made while pods start (Events, \
         status reads) do overlap it, so the ratio there can fall below 1: the L = 0 rows are the \
         engine's own overhead.\n\n\
         | L | poll_interval | rotations | wall (median) | calls per rotation | critical path | wall ÷ critical (≤1.05) | daemon CPU per rotation (≤5 ms) |\n\
         |---|---|---|---|---|---|---|---|\n{}\n\n\
         - Consumer pods (every 200 ms): {}.\n\
         - {}\n",
        rollout * 1000.0,
        rows.join("\n"),
        failures.join("; "),
        machine_note()
    );
    write_section("p1", &body)
}

// ---------------------------------------------------------------------------------------
// P2: fleet under an Admin API rate limit.

async fn p2(quick: bool) -> Res<()> {
    let mut rows = Vec::new();
    let sizes: &[(usize, u32)] = if quick {
        &[(100, 20)]
    } else {
        &[(100, 20), (1000, 20)]
    };
    let concurrency = 64;
    for &(n, rps) in sizes {
        let sb = Sandbox::start(
            &work_dir(&format!("p2-{n}")),
            &s(&["--targets", &n.to_string(), "--pod-ready-delay-ms", "100"]),
        )?;
        sb.wait_ready(Duration::from_secs(300)).await?;
        sb.openai_faults(json!({"scope": "admin", "rate_limit": {"requests_per_second": rps}}))
            .await?;
        let d = Daemon::start(
            &sb,
            &DaemonSettings {
                poll_interval: "100ms",
                max_concurrent: concurrency,
                name: "p2",
                ..Default::default()
            },
        )
        .await?;
        // Let the start-up calls (sweep, readiness) pass.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let s0 = sb.openai_calls().await?;
        let m0 = d.metrics().await?;
        let t0 = Instant::now();
        // SIGUSR1: rotate every target now (emergency: no grace, no drain).
        signal(d.pid, "USR1");
        let recs = d
            .wait_ended(n, Duration::from_secs(60 + 30 * n as u64 / rps as u64))
            .await?;
        let wall = t0.elapsed().as_secs_f64();
        let m1 = d.metrics().await?;
        let s1 = sb.openai_calls().await?;
        let (_, hwm) = rss_kib(d.pid);
        let completed = recs
            .iter()
            .filter(|r| r.event == "rotation_completed")
            .count();
        let admin_ops = |m: &BTreeMap<String, u64>| -> u64 {
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "models.list" | "chat.completions.create"))
                .map(|(_, v)| v)
                .sum()
        };
        // Every admin request the simulator answered counts against the limit but 429s.
        let answered = admin_ops(&s1) - admin_ops(&s0);
        let limited = delta(&m0, &m1, &["backend=\"openai\"", "status_class=\"429\""]);
        let admin_ok = answered as f64 - limited;
        let bound = admin_ok / rps as f64;
        rows.push(format!(
            "| {n} | {rps} req/s | {concurrency} | {:.1} s | {admin_ok:.0} | {bound:.1} s | **{:.3}×** {} | {limited:.0} | {} | {} of {n} | {:.1} MiB |",
            wall,
            wall / bound,
            if wall / bound <= 1.1 { "met" } else { "missed" },
            n - completed,
            completed,
            hwm as f64 / 1024.0,
        ));
        d.stop();
        let _ = sb.stop();
    }
    let body = format!(
        "## P2: fleet under an Admin API rate limit\n\n\
         Reproduce: `cargo build --release && cargo bench --bench daemon -- p2`. `sandbox --targets N \
         --pod-ready-delay-ms 100` in its own process, all pods ready, then the OpenAI simulator's \
         Admin API limited to R requests per second (`PUT /_sim/faults` \
         `{{\"scope\":\"admin\",\"rate_limit\":{{\"requests_per_second\":R}}}}`: a one-second \
         sliding window, `x-ratelimit-*` headers on every answer, 429 + `Retry-After` past it). \
         The daemon (`poll_interval = \"100ms\"`, `max_concurrent_rotations` as shown) gets \
         SIGUSR1 (rotate every target now); wall = signal to the N-th rotation's end in the \
         audit file. Lower bound = admin requests the simulator accepted during the run ÷ R \
         (429s excluded). 429s from the daemon's `api_requests_total{{status_class=\"429\"}}`; \
         unhandled = rotations that did not complete. Peak RSS = the daemon's VmHWM.\n\n\
         | N | R | concurrency | wall | admin calls | lower bound calls/R | wall ÷ bound (≤1.1) | 429s seen | unhandled | completed | daemon peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n{}\n\n- {}\n",
        rows.join("\n"),
        machine_note()
    );
    write_section("p2", &body)
}

// ---------------------------------------------------------------------------------------
// P3: footprint.

async fn p3(quick: bool) -> Res<()> {
    let sizes: &[usize] = if quick {
        &[1, 100, 1000]
    } else {
        &[1, 100, 1000, 10_000]
    };
    let mut rows = Vec::new();
    let mut per_target = Vec::new();
    let mut base = None;
    for &n in sizes {
        let sb = Sandbox::start(
            &work_dir(&format!("p3-{n}")),
            &s(&["--targets", &n.to_string()]),
        )?;
        let mut readys = Vec::new();
        let (mut rss, mut anon, mut file, mut scraped) = (vec![], vec![], vec![], vec![]);
        let mut cpu = String::from("–");
        for i in 0..3 {
            let d = Daemon::start(
                &sb,
                &DaemonSettings {
                    no_grace: false,
                    name: "p3",
                    ..Default::default()
                },
            )
            .await?;
            readys.push(d.ready_after.as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mib = |k: &str| status_kib(d.pid, k) as f64 / 1024.0;
            rss.push(mib("VmRSS"));
            anon.push(mib("RssAnon"));
            file.push(mib("RssFile"));
            if i == 0 && (n == 1000 || n == 1) {
                let secs = if quick { 20 } else { 60 };
                let c0 = cpu_ticks(d.pid);
                tokio::time::sleep(Duration::from_secs(secs)).await;
                let c1 = cpu_ticks(d.pid);
                let pct = (c1 - c0) as f64 / CLK_TCK / secs as f64 * 100.0;
                cpu = format!(
                    "{pct:.3}% over {secs} s {}",
                    if pct < 0.1 { "met" } else { "missed" }
                );
            }
            // What a Prometheus scrape leaves behind.
            d.metrics().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            scraped.push(mib("VmRSS"));
            d.stop();
        }
        let (r, ready) = (median(rss), median(readys));
        let (a, f, sc) = (median(anon), median(file), median(scraped));
        if let Some((n0, r0, a0)) = base {
            per_target.push(format!(
                "{n0}→{n}: {:.1} KiB RSS ({:.1} KiB anonymous) per target",
                (r - r0) * 1024.0 / (n - n0) as f64,
                (a - a0) * 1024.0 / (n - n0) as f64
            ));
        }
        base = Some((n, r, a));
        rows.push(format!(
            "| {n} | {r:.1} MiB {} | {a:.1} MiB | {f:.1} MiB | {sc:.1} MiB | {ready:.0} ms {} | {cpu} |",
            if n == 1000 {
                if r <= 15.0 {
                    "met"
                } else {
                    "missed"
                }
            } else {
                ""
            },
            if ready < 200.0 { "met" } else { "missed" },
        ));
        let _ = sb.stop();
    }
    let body = format!(
        "## P3: footprint at rest\n\n\
         Reproduce: `cargo build --release && cargo bench --bench daemon -- p3`. For each N, \
         `sandbox --targets N` in its own process, then the daemon started 3 times (medians): \
         start = spawn to the first `/readyz` 200 (polled every 2 ms); idle RSS = VmRSS 5 s after \
         ready, targets scheduled (cron yearly, so nothing runs); idle CPU = utime+stime delta \
         over the stated time ÷ wall.\n\n\
         | scheduled targets | idle RSS (≤15 MiB at 1,000) | of it anonymous | of it file-backed (the binary) | RSS after one /metrics scrape | start to /readyz 200 (<200 ms) | idle CPU (<0.1%) |\n\
         |---|---|---|---|---|---|---|\n{}\n\n- Growth: {}.\n- {}\n",
        rows.join("\n"),
        per_target.join("; "),
        machine_note()
    );
    write_section("p3", &body)
}

// ---------------------------------------------------------------------------------------
// P4: emergency window.

async fn p4(quick: bool) -> Res<()> {
    let runs = if quick { 3 } else { 7 };
    let sb = Sandbox::start(
        &work_dir("p4"),
        &s(&["--targets", "1", "--pod-ready-delay-ms", "500"]),
    )?;
    sb.wait_ready(Duration::from_secs(60)).await?;
    let mut rows = Vec::new();
    for poll in ["1s", "100ms"] {
        let d = Daemon::start(
            &sb,
            &DaemonSettings {
                poll_interval: poll,
                no_grace: false,
                name: "p4",
                ..Default::default()
            },
        )
        .await?;
        let mut windows = Vec::new();
        let mut rollouts = Vec::new();
        let mut ended_n = 0;
        for _ in 0..runs {
            // An emergency trigger on a finishing rotation would upgrade it, not start one.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (t0, id) = d.trigger("app-00001", true, false).await?;
            ended_n += 1;
            let recs = d.wait_ended(ended_n, Duration::from_secs(120)).await?;
            let mine: Vec<&Rec> = recs.iter().filter(|r| r.rotation_id == id).collect();
            let at = |event: &str, step: &str| {
                mine.iter()
                    .find(|r| r.event == event && (step.is_empty() || r.step == step))
                    .map(|r| r.time)
            };
            let deleted = at("account_deleted", "").ok_or("no account_deleted")?;
            let roll = at("step_started", "roll").ok_or("no roll")?;
            let verified = at("step_finished", "verify").ok_or("no verify")?;
            rollouts.push((verified - roll) * 1000.0);
            windows.push((deleted - t0 - (verified - roll)) * 1000.0);
        }
        let w = median(windows);
        rows.push(format!(
            "| emergency | {poll} | {runs} | {:.0} ms | **{w:.0} ms** {} |",
            median(rollouts),
            if w <= 1000.0 { "met" } else { "missed" }
        ));
        // revoke_first: trigger to the old key answering 401.
        let mut dead = Vec::new();
        for _ in 0..runs {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let old = sb.vault_key("apps/app-00001/openai").await?;
            let (sent, _) = d.trigger("app-00001", true, true).await?;
            let t0 = Instant::now();
            ended_n += 1;
            loop {
                let r = sb
                    .http
                    .get(format!("{}/v1/models", sb.openai))
                    .bearer_auth(&old)
                    .send()
                    .await?;
                if r.status().as_u16() == 401 {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    return Err("old key never died".into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            dead.push((now_secs() - sent) * 1000.0);
            d.wait_ended(ended_n, Duration::from_secs(120)).await?;
        }
        let k = median(dead);
        rows.push(format!(
            "| emergency + revoke_first | {poll} | {runs} | – | **{k:.0} ms** (trigger to old key 401) {} |",
            if k <= 1000.0 { "met" } else { "missed" }
        ));
        d.stop();
    }
    let (ok, failed) = sb.stop();
    let body = format!(
        "## P4: emergency window\n\n\
         Reproduce: `cargo build --release && cargo bench --bench daemon -- p4`. `sandbox --targets 1 \
         --pod-ready-delay-ms 500`, the daemon in its own process (grace period 2 s as the \
         sandbox writes it: an emergency skips it). Trigger: `POST /v1/targets/app-00001/rotations` \
         `{{\"emergency\":true}}`. Window = trigger sent to `account_deleted` in the audit file, \
         minus the rollout (`roll` started to `verify` finished). With `revoke_first`: trigger sent \
         to the old key answering 401 on `GET /v1/models` (polled every 2 ms by the bench).\n\n\
         | trigger | poll_interval | runs | rollout (median) | window (≤1 s) |\n|---|---|---|---|---|\n{}\n\n\
         - Consumer pods: {ok} ok / {failed} failed (revoke_first is a chosen outage: failures \
         are expected there).\n- {}\n",
        rows.join("\n"),
        machine_note()
    );
    write_section("p4", &body)
}

// ---------------------------------------------------------------------------------------
// The recipe baseline.

async fn recipe(quick: bool) -> Res<()> {
    let mut rows = Vec::new();
    let sizes: &[usize] = if quick { &[10] } else { &[10, 100] };
    for &n in sizes {
        for latency in [0u64, 50] {
            let sandbox_args = |_: ()| {
                s(&[
                    "--targets",
                    &n.to_string(),
                    "--latency-ms",
                    &latency.to_string(),
                    "--pod-ready-delay-ms",
                    "200",
                    "--consumer-interval-ms",
                    "200",
                ])
            };
            // The recipe.
            let sb = Sandbox::start(
                &work_dir(&format!("recipe-{n}-{latency}")),
                &sandbox_args(()),
            )?;
            sb.wait_ready(Duration::from_secs(300)).await?;
            let cfg: toml::Value =
                toml::from_str(&std::fs::read_to_string(sb.dir.join("config.toml"))?)?;
            // One line per target: name project path namespace deployment old-account.
            let mut lines = Vec::new();
            for t in cfg["targets"].as_array().ok_or("targets")? {
                let field = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("");
                let path = field("vault_path");
                let meta: Value = sb
                    .http
                    .get(format!("{}/v1/secret/metadata/{path}", sb.vault))
                    .header("X-Vault-Token", sb.file("vault-token"))
                    .send()
                    .await?
                    .json()
                    .await?;
                let old = meta["data"]["custom_metadata"]["okr_service_account_id"]
                    .as_str()
                    .ok_or("no old account id")?;
                // Workloads are written `namespace/Kind/name`.
                let w = t
                    .get("workloads")
                    .and_then(|w| w.as_array()?.first()?.as_str())
                    .ok_or("no workload")?;
                let parts: Vec<&str> = w.split('/').collect();
                let (ns, deploy) = match parts.as_slice() {
                    [ns, _, name] => (*ns, *name),
                    _ => return Err(format!("workload {w}").into()),
                };
                lines.push(format!(
                    "{} {} {path} {ns} {deploy} {old}",
                    field("name"),
                    field("project_id")
                ));
            }
            let targets = sb.dir.join("recipe-targets");
            std::fs::write(&targets, lines.join("\n") + "\n")?;
            let t0 = Instant::now();
            let st = Command::new(root().join("scripts/recipe.sh"))
                .arg(&targets)
                .env("OPENAI_URL", format!("{}/v1", sb.openai))
                .env("OPENAI_ADMIN_KEY_FILE", sb.dir.join("openai-admin-key"))
                .env("VAULT_ADDR", &sb.vault)
                .env("VAULT_TOKEN", sb.file("vault-token"))
                .env("KUBECONFIG", sb.dir.join("kubeconfig"))
                .stdout(std::fs::File::create(sb.dir.join("recipe.log"))?)
                .stderr(std::fs::File::create(sb.dir.join("recipe.err"))?)
                .status()?;
            let recipe_wall = t0.elapsed().as_secs_f64();
            if !st.success() {
                return Err(format!("recipe failed: {st}, see {}", sb.dir.display()).into());
            }
            // Let pods that read a deleted key fail visibly before counting.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (rok, rfail) = sb.stop();

            // The daemon on a fresh copy of the same scenario.
            let sb = Sandbox::start(
                &work_dir(&format!("daemon-{n}-{latency}")),
                &sandbox_args(()),
            )?;
            sb.wait_ready(Duration::from_secs(300)).await?;
            let d = Daemon::start(
                &sb,
                &DaemonSettings {
                    name: "recipe-daemon",
                    ..Default::default()
                },
            )
            .await?;
            let t0 = Instant::now();
            signal(d.pid, "USR1");
            let recs = d.wait_ended(n, Duration::from_secs(1800)).await?;
            let daemon_wall = t0.elapsed().as_secs_f64();
            let completed = recs
                .iter()
                .filter(|r| r.event == "rotation_completed")
                .count();
            tokio::time::sleep(Duration::from_secs(2)).await;
            d.stop();
            let (dok, dfail) = sb.stop();
            rows.push(format!(
                "| {n} | {latency} ms | {recipe_wall:.1} s | {daemon_wall:.1} s ({completed}/{n} completed) | **{:.2}×** | {rfail} of {} | {dfail} of {} |",
                recipe_wall / daemon_wall,
                rok + rfail,
                dok + dfail
            ));
        }
    }
    let body = format!(
        "## Recipe baseline, side by side\n\n\
         Reproduce: `cargo build --release && cargo bench --bench daemon -- recipe`. Per row, two \
         fresh `sandbox --targets N --latency-ms L --pod-ready-delay-ms 200 --consumer-interval-ms 200` \
         processes (same scenario): on one, `scripts/recipe.sh` — per target in sequence `curl` \
         create a service account, `bao kv put` the key, `kubectl rollout restart` + `kubectl \
         rollout status`, `curl` delete the old account; on the other, the daemon with its \
         defaults (`max_concurrent_rotations = 2`, default `poll_interval`, grace period 0 like the \
         recipe) rotating every target on SIGUSR1. Consumer failures are counted by the sandbox's \
         consumer pods for the whole run (the recipe verifies nothing).\n\n\
         | N | L | recipe wall | daemon wall | recipe ÷ daemon | recipe consumer failures | daemon consumer failures |\n\
         |---|---|---|---|---|---|---|\n{}\n\n- {}\n",
        rows.join("\n"),
        machine_note()
    );
    write_section("recipe", &body)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let quick = args.iter().any(|a| a == "--quick");
    let parts: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !bin().exists() {
        eprintln!(
            "{} is missing: run `cargo build --release` first (or set OKR_BIN)",
            bin().display()
        );
        std::process::exit(2);
    }
    let all = ["p1", "p2", "p3", "p4", "recipe"];
    let parts: Vec<&str> = if parts.is_empty() {
        all.to_vec()
    } else {
        parts
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut failed = false;
    for p in parts {
        let r = rt.block_on(async {
            match p {
                "p1" => p1(quick).await,
                "p2" => p2(quick).await,
                "p3" => p3(quick).await,
                "p4" => p4(quick).await,
                "recipe" => recipe(quick).await,
                other => Err(format!("unknown part {other}; one of {all:?}").into()),
            }
        });
        if let Err(e) = r {
            eprintln!("{p}: {e}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
}
