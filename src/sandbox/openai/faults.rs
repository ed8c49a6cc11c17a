//! Fault injection: latency, rate limiting (429, with or without `Retry-After`, and
//! OpenAI's `x-ratelimit-*` headers), 5xx on the Nth call or the next N calls, hangs, and
//! holding named operations until released, scoped to the Admin API (default), the data
//! plane, or both, and optionally to named operations. Set per test through [`super::OpenAiSim::set_faults`] or
//! `PUT /_sim/faults` (this struct as JSON).

use super::error::ApiError;
use crate::sandbox::control::Block;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Which calls a fault applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultScope {
    #[default]
    Admin,
    DataPlane,
    Both,
}

/// The fault settings. All kinds may be combined; an empty value means no fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub scope: FaultScope,
    /// Restrict to these operations (names as in [`super::OPERATIONS`]); empty = all in scope.
    pub operations: Vec<String>,
    /// Added before every call in scope.
    pub latency_ms: u64,
    pub rate_limit: Option<RateLimit>,
    pub fail_nth: Option<FailNth>,
    pub fail_next: Option<FailNext>,
    /// Calls in scope never answer while this is set (they resume when it is cleared).
    pub hang: bool,
    /// Hold the named operations (its own list, regardless of `scope`/`operations`) until
    /// `POST /_sim/release` or until the faults change; see [`crate::sandbox::Block`].
    pub block: Option<Block>,
}

/// At most `requests_per_second` calls in any sliding second; the rest get 429.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: u32,
    /// `Retry-After` value; default: seconds until the window frees a slot (at least 1).
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
    /// Leave `Retry-After` out (upstream may omit it).
    #[serde(default)]
    pub omit_retry_after: bool,
}

/// The `n`th call in scope (1-based, counted from when the faults were set) fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailNth {
    pub n: u64,
    #[serde(default = "default_status")]
    pub status: u16,
    /// The call takes effect first (an account is created or deleted) and only the answer
    /// is replaced by the 5xx: a lost response, the case where a blind retry of a create
    /// makes a duplicate.
    #[serde(default)]
    pub after_effect: bool,
}

/// The next `count` calls in scope fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailNext {
    pub count: u64,
    #[serde(default = "default_status")]
    pub status: u16,
    /// As [`FailNth::after_effect`].
    #[serde(default)]
    pub after_effect: bool,
}

fn default_status() -> u16 {
    500
}

impl Faults {
    pub fn latency(d: Duration) -> Self {
        Faults {
            latency_ms: d.as_millis() as u64,
            ..Faults::default()
        }
    }

    pub fn rate_limit(requests_per_second: u32) -> Self {
        Faults {
            rate_limit: Some(RateLimit {
                requests_per_second,
                ..RateLimit::default()
            }),
            ..Faults::default()
        }
    }

    pub fn fail_nth(n: u64, status: u16) -> Self {
        Faults {
            fail_nth: Some(FailNth {
                n,
                status,
                after_effect: false,
            }),
            ..Faults::default()
        }
    }

    pub fn fail_next(count: u64, status: u16) -> Self {
        Faults {
            fail_next: Some(FailNext {
                count,
                status,
                after_effect: false,
            }),
            ..Faults::default()
        }
    }

    pub fn hang() -> Self {
        Faults {
            hang: true,
            ..Faults::default()
        }
    }

    pub fn in_scope(mut self, scope: FaultScope) -> Self {
        self.scope = scope;
        self
    }

    /// Make the 5xx faults lose the response of a call that took effect.
    pub fn after_effect(mut self) -> Self {
        if let Some(f) = &mut self.fail_nth {
            f.after_effect = true;
        }
        if let Some(f) = &mut self.fail_next {
            f.after_effect = true;
        }
        self
    }

    /// Restrict to one more operation (e.g. `"service_accounts.create"`).
    pub fn only(mut self, operation: &str) -> Self {
        self.operations.push(operation.to_string());
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let statuses = self
            .fail_nth
            .iter()
            .map(|f| f.status)
            .chain(self.fail_next.iter().map(|f| f.status));
        for s in statuses {
            if !(500..=599).contains(&s) {
                return Err(format!("status {s} is not a 5xx status"));
            }
        }
        if self.fail_nth.as_ref().is_some_and(|f| f.n == 0) {
            return Err("fail_nth.n counts from 1".into());
        }
        let block_ops = self.block.iter().flat_map(|b| b.operations.iter());
        if let Some(op) = self
            .operations
            .iter()
            .chain(block_ops)
            .find(|op| !super::OPERATIONS.contains(&op.as_str()))
        {
            return Err(format!("unknown operation {op:?}"));
        }
        Ok(())
    }
}

/// The faults plus their counters since they were set.
#[derive(Default)]
pub(crate) struct FaultState {
    pub faults: Faults,
    /// Calls in scope since the faults were set.
    matched: u64,
    fail_next_left: u64,
    /// Admission times of calls the rate limit let through in the last second.
    window: VecDeque<Instant>,
}

/// What the fault layer does with a call after latency, hang and block.
pub(crate) enum Verdict {
    Proceed,
    Fail(ApiError),
    /// Let the handler run, then answer this instead (a lost response).
    FailAfter(ApiError),
}

impl FaultState {
    pub fn new(faults: Faults) -> Self {
        FaultState {
            fail_next_left: faults.fail_next.as_ref().map_or(0, |f| f.count),
            faults,
            matched: 0,
            window: VecDeque::new(),
        }
    }

    fn in_scope(&self, data_plane: bool) -> bool {
        match self.faults.scope {
            FaultScope::Admin => !data_plane,
            FaultScope::DataPlane => data_plane,
            FaultScope::Both => true,
        }
    }

    fn applies(&self, op: &str, data_plane: bool) -> bool {
        self.in_scope(data_plane)
            && (self.faults.operations.is_empty() || self.faults.operations.iter().any(|o| o == op))
    }

    pub fn latency(&self, op: &str, data_plane: bool) -> Option<Duration> {
        (self.faults.latency_ms > 0 && self.applies(op, data_plane))
            .then(|| Duration::from_millis(self.faults.latency_ms))
    }

    pub fn hangs(&self, op: &str, data_plane: bool) -> bool {
        self.faults.hang && self.applies(op, data_plane)
    }

    /// Count the call and decide: 429 (rate limit), then 5xx (fail-next, then Nth call).
    /// The headers go on whatever answer the call gets: while a rate limit is set, every
    /// call in its scope (also ones `operations` leaves out, and ones a 5xx fault answers)
    /// carries OpenAI's `x-ratelimit-*-requests` headers, so a client can pace itself.
    pub fn decide(&mut self, op: &str, data_plane: bool) -> (Verdict, HeaderMap) {
        let mut headers = HeaderMap::new();
        let counted = self.applies(op, data_plane);
        if counted {
            self.matched += 1;
        }
        if let Some(rl) = self
            .faults
            .rate_limit
            .clone()
            .filter(|_| self.in_scope(data_plane))
        {
            let now = Instant::now();
            let second = Duration::from_secs(1);
            while self
                .window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= second)
            {
                self.window.pop_front();
            }
            let limit = rl.requests_per_second;
            let used = self.window.len() as u64;
            let reset_of = |window: &VecDeque<Instant>| {
                window
                    .front()
                    .map_or(second, |t| second.saturating_sub(now.duration_since(*t)))
            };
            if counted && used >= u64::from(limit) {
                let reset = reset_of(&self.window);
                let mut err = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "Rate limit reached for requests per second (RPS): Limit {limit}, \
                         Used {used}, Requested 1. Please try again in {}.",
                        fmt_reset(reset)
                    ),
                )
                .kind("requests")
                .code("rate_limit_exceeded");
                if !rl.omit_retry_after {
                    let secs = rl
                        .retry_after_secs
                        .unwrap_or_else(|| reset.as_secs_f64().ceil().max(1.0) as u64);
                    err = err.header("retry-after", secs);
                }
                err = err
                    .header("x-ratelimit-limit-requests", limit)
                    .header("x-ratelimit-remaining-requests", 0)
                    .header("x-ratelimit-reset-requests", fmt_reset(reset));
                return (Verdict::Fail(err), headers);
            }
            if counted {
                self.window.push_back(now);
            }
            let left = u64::from(limit).saturating_sub(self.window.len() as u64);
            insert(
                &mut headers,
                "x-ratelimit-limit-requests",
                limit.to_string(),
            );
            insert(
                &mut headers,
                "x-ratelimit-remaining-requests",
                left.to_string(),
            );
            insert(
                &mut headers,
                "x-ratelimit-reset-requests",
                fmt_reset(reset_of(&self.window)),
            );
        }
        if !counted {
            return (Verdict::Proceed, headers);
        }
        let fail = |status: u16, after_effect: bool| {
            if after_effect {
                Verdict::FailAfter(server_error(status))
            } else {
                Verdict::Fail(server_error(status))
            }
        };
        if self.fail_next_left > 0 {
            self.fail_next_left -= 1;
            if let Some(f) = &self.faults.fail_next {
                return (fail(f.status, f.after_effect), headers);
            }
        }
        if let Some(f) = &self.faults.fail_nth {
            if f.n == self.matched {
                return (fail(f.status, f.after_effect), headers);
            }
        }
        (Verdict::Proceed, headers)
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// Upstream's duration style for `x-ratelimit-reset-*`: `120ms`, `1s`, `1.5s`.
fn fmt_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.3}s", d.as_secs_f64())
            .trim_end_matches('0')
            .to_string()
    }
}

/// A 5xx in OpenAI's shape (`server_error`), worded like upstream's.
fn server_error(status: u16) -> ApiError {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match status.as_u16() {
        502 => "Bad gateway.",
        503 => "The server is overloaded or not ready yet.",
        _ => "The server had an error while processing your request. Sorry about that!",
    };
    ApiError::new(status, message).kind("server_error")
}
