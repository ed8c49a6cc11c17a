//! The CLI's client of a running daemon's API (`rotate`, `status`).

use crate::secret::Secret;
use serde_json::Value;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error("the daemon answered {status}: {message}")]
    Api {
        status: u16,
        message: String,
        body: Value,
    },
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Worth asking again: the daemon (or the leader behind a follower) is restarting or
    /// changing hands. 502 from a follower means the leader's answer was lost; for a read
    /// that is safe to repeat.
    fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Api { status, .. } => matches!(status, 502..=504),
            ClientError::Protocol(_) => false,
        }
    }
}

pub struct ApiClient {
    base: String,
    token: Option<Secret>,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(addr: &str, token: Option<Secret>) -> ApiClient {
        ApiClient {
            base: addr.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("reqwest client"),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t.expose()),
            None => req,
        };
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            addr: self.base.clone(),
            message: if e.is_timeout() {
                "timed out".into()
            } else if e.is_connect() {
                "connection refused (is the daemon running? set --addr or OKR_ADDR)".into()
            } else {
                "request failed".into()
            },
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            addr: self.base.clone(),
            message: format!("reading the answer: {e}"),
        })?;
        // An error from something in between (a proxy's HTML 502) is still an error status.
        let body: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) if status >= 400 => Value::Null,
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
        if status >= 400 {
            let mut message = body["error"].as_str().unwrap_or("error").to_string();
            if let Some(leader) = body["leader"].as_str() {
                message.push_str(&format!(" (leader: {leader})"));
            }
            return Err(ClientError::Api {
                status,
                message,
                body,
            });
        }
        Ok(body)
    }

    /// `POST /v1/targets/{target}/rotations`; returns the answer (`rotation_id`, `status`).
    pub async fn trigger(
        &self,
        target: &str,
        reason: &str,
        emergency: bool,
        revoke_first: bool,
    ) -> Result<Value, ClientError> {
        let url = format!("{}/v1/targets/{}/rotations", self.base, urlencode(target));
        self.send(self.http.post(url).json(&serde_json::json!({
            "reason": reason,
            "emergency": emergency,
            "revoke_first": revoke_first,
        })))
        .await
    }

    pub async fn rotation(&self, id: &str) -> Result<Value, ClientError> {
        self.send(
            self.http
                .get(format!("{}/v1/rotations/{}", self.base, urlencode(id))),
        )
        .await
    }

    pub async fn targets(&self) -> Result<Value, ClientError> {
        self.send(self.http.get(format!("{}/v1/targets", self.base)))
            .await
    }

    /// Print a line per step as the rotation progresses (with elapsed time since the
    /// rotation started); returns its final status (`completed`, `rolled_back`, `failed`).
    pub async fn follow(
        &self,
        id: &str,
        out: &mut (dyn Write + Send),
        poll: Duration,
        timeout: Duration,
    ) -> Result<String, ClientError> {
        let start = Instant::now();
        let mut printed = 0usize;
        let mut started_printed = false;
        let mut waves_printed = 0usize;
        loop {
            let j = match self.rotation(id).await {
                Ok(j) => j,
                Err(e) if e.is_transient() && start.elapsed() <= timeout => {
                    tracing::debug!(error = %e, "waiting for the daemon");
                    tokio::time::sleep(poll).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let steps = j["steps"].as_array().cloned().unwrap_or_default();
            let t0 = j["started_at"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
            let since = |t: &Value| -> String {
                match (
                    t0,
                    t.as_str()
                        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()),
                ) {
                    (Some(a), Some(b)) => {
                        format!("{:>7.1}s", (b - a).num_milliseconds() as f64 / 1000.0)
                    }
                    _ => "       ?".into(),
                }
            };
            // A step line when it finishes; the running step once as "started".
            while printed < steps.len() {
                let s = &steps[printed];
                if s["finished_at"].is_null() {
                    if !started_printed {
                        let _ = writeln!(
                            out,
                            "{} {:<8} started",
                            since(&s["started_at"]),
                            s["step"].as_str().unwrap_or("?")
                        );
                        started_printed = true;
                    }
                    break;
                }
                let _ = writeln!(
                    out,
                    "{} {:<8} {}",
                    since(&s["finished_at"]),
                    s["step"].as_str().unwrap_or("?"),
                    s["outcome"].as_str().unwrap_or("")
                );
                printed += 1;
                started_printed = false;
            }
            // A staged rollout: a line per wave once it is verified.
            let waves = j["waves"].as_array().cloned().unwrap_or_default();
            while waves_printed < waves.len() && !waves[waves_printed]["verified_at"].is_null() {
                let w = &waves[waves_printed];
                let names: Vec<&str> = w["workloads"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{}   wave {}/{} verified: {}",
                    since(&w["verified_at"]),
                    waves_printed + 1,
                    waves.len(),
                    names.join(", ")
                );
                waves_printed += 1;
            }
            let status = j["status"].as_str().unwrap_or("").to_string();
            if matches!(status.as_str(), "completed" | "rolled_back" | "failed") {
                if let Some(e) = j["error"].as_str() {
                    let _ = writeln!(out, "error: {e}");
                }
                let _ = writeln!(out, "rotation {id}: {status}");
                return Ok(status);
            }
            if start.elapsed() > timeout {
                return Err(ClientError::Protocol(format!(
                    "rotation {id} still {status} after {timeout:?}"
                )));
            }
            tokio::time::sleep(poll).await;
        }
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// One line per target, for `status`.
pub fn format_targets(v: &Value) -> String {
    let mut out = format!(
        "{:<20} {:<12} {:<22} {:<12} {:<10} {}\n",
        "TARGET", "STATE", "LAST ROTATION", "OUTCOME", "KEY AGE", "NEXT ROTATION"
    );
    let mut pending = Vec::new();
    for t in v["targets"].as_array().cloned().unwrap_or_default() {
        for id in t["pending_deletions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            pending.push(format!(
                "{}: service account {} still to be deleted (its key still works)",
                t["name"].as_str().unwrap_or("?"),
                id.as_str().unwrap_or("?")
            ));
        }
        let age = t["key_age_seconds"]
            .as_i64()
            .map(|s| humantime::format_duration(Duration::from_secs(s.max(0) as u64)).to_string())
            .map(|s| s.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20} {:<12} {:<22} {:<12} {:<10} {}\n",
            t["name"].as_str().unwrap_or("?"),
            t["state"].as_str().unwrap_or("?"),
            t["running_rotation"]
                .as_str()
                .or(t["last_rotation"].as_str())
                .unwrap_or("-"),
            t["last_outcome"].as_str().unwrap_or("-"),
            age,
            match (t["next_rotation_at"].as_str(), t["next_trigger"].as_str()) {
                (Some(at), Some(why)) => format!("{at} ({why})"),
                _ => "-".into(),
            }
        ));
    }
    for p in pending {
        out.push_str(&format!("pending: {p}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A daemon whose first `fails` answers to `GET /v1/rotations/{id}` are `status` (a
    /// leader hand-over seen through the chart's Service), then the finished rotation.
    async fn flaky_daemon(fails: usize, status: StatusCode) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let app = axum::Router::new().route(
            "/v1/rotations/{id}",
            axum::routing::get(move || {
                let seen = seen.clone();
                async move {
                    if seen.fetch_add(1, Ordering::SeqCst) < fails {
                        (
                            status,
                            axum::Json(serde_json::json!({"error": "no leader"})),
                        )
                            .into_response()
                    } else {
                        axum::Json(serde_json::json!({
                            "status": "completed",
                            "started_at": "2026-12-02T00:00:00Z",
                            "steps": [],
                        }))
                        .into_response()
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), calls)
    }

    /// `rotate --wait` on rotation r1 of the daemon at `addr`.
    async fn follow(addr: &str, timeout: Duration) -> Result<String, ClientError> {
        let client = ApiClient::new(addr, None);
        let mut out = Vec::new();
        client
            .follow("r1", &mut out, Duration::from_millis(5), timeout)
            .await
    }

    /// `rotate --wait` outlives a leader hand-over: a 502/503 while the Lease moves is
    /// retried until the wait timeout.
    #[tokio::test]
    async fn follow_retries_while_the_leader_changes() {
        for status in [StatusCode::SERVICE_UNAVAILABLE, StatusCode::BAD_GATEWAY] {
            let (addr, calls) = flaky_daemon(3, status).await;
            let got = follow(&addr, Duration::from_secs(10)).await;
            assert_eq!(got.ok().as_deref(), Some("completed"), "{status}");
            assert_eq!(calls.load(Ordering::SeqCst), 4);
        }
    }

    /// Negative control: what is not transient (404, 401) fails at once, and a daemon that
    /// stays unavailable fails at the timeout, naming the last answer.
    #[tokio::test]
    async fn follow_gives_up_on_lasting_or_final_errors() {
        let (addr, calls) = flaky_daemon(usize::MAX, StatusCode::NOT_FOUND).await;
        let got = follow(&addr, Duration::from_secs(10)).await;
        assert!(
            matches!(got, Err(ClientError::Api { status: 404, .. })),
            "{got:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let (addr, _) = flaky_daemon(usize::MAX, StatusCode::SERVICE_UNAVAILABLE).await;
        let got = follow(&addr, Duration::from_millis(200)).await;
        let e = got.unwrap_err().to_string();
        assert!(e.contains("503"), "{e}");
    }
}
