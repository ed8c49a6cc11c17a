//! The one path every backend call takes: per-attempt timeout, timing, one
//! [`CallObserver::call`] per attempt, bounded retry with exponential backoff and full
//! jitter, and the server's `Retry-After` honoured up to a cap. Each client supplies only a
//! classify function ("what does this error of mine mean": a [`Verdict`]).
//!
//! - [`Call`] is the observed path the clients use (OpenAI, Vault, Kubernetes).
//! - [`RetryPolicy::run`] is the same loop without observer or timeout, for callers whose
//!   attempts are already observed client calls (the rotation engine's own retries).
//!
//! Rules:
//! - Backoff before retry `n` (0-based) is *full jitter*: uniform in `[0, ceiling]` with
//!   `ceiling = min(base * 2^n, max_backoff)`, so retries of many callers spread out.
//! - A server's wait (`Retry-After`, Kubernetes' `retryAfterSeconds`) is waited exactly,
//!   unjittered, when it is at most `max_retry_after`. When it is longer, the call is not
//!   retried at all: sleeping a truncated time would only hit the limit again and burn a
//!   retry. It gives up at once with [`Stop::WaitTooLong`] carrying the server's hint (the
//!   error stays transient), so the caller backs off at its own level.
//! - `api_requests_total` counts attempts and `retries_total` counts re-sent attempts, so for
//!   every logical call `attempts = 1 + retries`.

use crate::rotation::ports::{Backend, CallObserver, StatusClass};
use std::fmt;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How one logical call is retried. Every client's policy comes from its config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub max_retries: u32,
    /// Backoff ceiling before the first retry; doubles each time.
    pub base: Duration,
    /// Cap on one backoff ceiling.
    pub max_backoff: Duration,
    /// Longest server-asked wait that is honoured; a longer one ends the call at once.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            base: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

/// Whether (and when) a failed attempt may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Final: retrying cannot help (4xx, bad input) or is not safe.
    No,
    /// Transient: retry after the policy's backoff.
    Yes,
    /// Transient, and the server said how long to wait.
    After(Duration),
}

/// What a client's classify function says about one failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Reported to the observer for this attempt.
    pub class: StatusClass,
    pub retry: Retry,
}

impl Verdict {
    pub fn new(class: StatusClass, retry: Retry) -> Self {
        Verdict { class, retry }
    }
}

/// An attempt ran past [`Call::timeout`]; each client turns it into its own error (a
/// timeout is ambiguous: the server may have acted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout {
    pub after: Duration,
}

/// Why a call ended without success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The classify function (or a before-retry hook) said final.
    Final,
    /// `max_retries` retries were spent.
    Exhausted,
    /// The server asked to wait this long, more than `max_retry_after`: not retried.
    WaitTooLong(Duration),
}

/// The end of a failed call: the last error, how many attempts ran and why it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp<E> {
    pub error: E,
    /// Attempts sent (at least 1).
    pub attempts: u32,
    pub stop: Stop,
}

impl<E> GaveUp<E> {
    /// Text to append to the client's message: attempts, or the server's hint. Empty for a
    /// final error on the first attempt.
    pub fn suffix(&self, policy: &RetryPolicy) -> String {
        match self.stop {
            Stop::WaitTooLong(d) => format!(
                " (the server asked to retry after {}, more than max_retry_after {}: not retried)",
                humantime::format_duration(d),
                humantime::format_duration(policy.max_retry_after)
            ),
            _ if self.attempts > 1 => format!(" (gave up after {} attempts)", self.attempts),
            _ => String::new(),
        }
    }

    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> GaveUp<F> {
        GaveUp {
            error: f(self.error),
            attempts: self.attempts,
            stop: self.stop,
        }
    }
}

/// What a before-retry hook decides, after the backoff and before the next attempt.
pub enum Resume<T, E> {
    /// Send the next attempt.
    Retry,
    /// End the call with this outcome (e.g. a read-back found that the write landed).
    Finish(Result<T, E>),
}

impl RetryPolicy {
    /// Ceiling of the backoff before retry `n` (0-based): `base * 2^n`, capped.
    pub fn ceiling(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(2u32.saturating_pow(n))
            .min(self.max_backoff)
    }

    /// Backoff before retry `n`: full jitter, uniform in `[0, ceiling(n)]`.
    pub fn backoff(&self, n: u32) -> Duration {
        let nanos = self.ceiling(n).as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(crate::rng::range_u64(0..=nanos))
    }

    /// Run `attempt` until it succeeds, `classify` says final, or the policy says stop. No
    /// observer and no timeout: for callers whose attempts are client calls that are
    /// already observed and bounded (the engine's own retries).
    pub async fn run<T, E, F, Fut>(
        &self,
        classify: impl Fn(&E) -> Retry,
        attempt: F,
    ) -> Result<T, GaveUp<E>>
    where
        E: fmt::Display,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        drive(
            self,
            None,
            |e: &E| Verdict::new(StatusClass::Success, classify(e)),
            |_: &E, _| async { Resume::Retry },
            attempt,
        )
        .await
    }
}

/// The observed path: one logical backend call.
///
/// ```ignore
/// Call::new(Backend::Vault, "kv.read", &policy, &*observer)
///     .timeout(request_timeout)
///     .what(&path)
///     .run(|e: &Fail| e.verdict(), |_| read_once())
///     .await
/// ```
pub struct Call<'a> {
    backend: Backend,
    operation: &'static str,
    policy: &'a RetryPolicy,
    observer: &'a dyn CallObserver,
    timeout: Option<Duration>,
    what: &'a str,
    pacer: Option<&'a crate::pacer::Pacer>,
}

impl<'a> Call<'a> {
    /// `operation` is one of the client's fixed names (a metric label).
    pub fn new(
        backend: Backend,
        operation: &'static str,
        policy: &'a RetryPolicy,
        observer: &'a dyn CallObserver,
    ) -> Self {
        Call {
            backend,
            operation,
            policy,
            observer,
            timeout: None,
            what: "",
            pacer: None,
        }
    }

    /// Bound each attempt; past it the attempt fails with `E::from(Timeout)`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Wait for `pacer` before each attempt (outside its timeout; the attempt feeds the
    /// answer's limits to it). The reported latency includes that wait.
    pub fn paced(mut self, pacer: &'a crate::pacer::Pacer) -> Self {
        self.pacer = Some(pacer);
        self
    }

    /// What the call is about, for logs only (ids and paths, never key values).
    pub fn what(mut self, what: &'a str) -> Self {
        self.what = what;
        self
    }

    /// Run with the policy: each attempt timed, bounded and reported; `classify` decides
    /// each failure's status class and retry.
    pub async fn run<T, E, F, Fut>(
        &self,
        classify: impl Fn(&E) -> Verdict,
        attempt: F,
    ) -> Result<T, GaveUp<E>>
    where
        E: fmt::Display + From<Timeout>,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_with(classify, |_: &E, _| async { Resume::Retry }, attempt)
            .await
    }

    /// [`Call::run`] with a hook that runs after each backoff, before the retry, and may
    /// end the call instead: for requests that must not be re-sent blindly after an
    /// ambiguous failure (look first whether it took effect, or clean up).
    pub async fn run_with<T, E, F, Fut, H, HFut>(
        &self,
        classify: impl Fn(&E) -> Verdict,
        before_retry: H,
        mut attempt: F,
    ) -> Result<T, GaveUp<E>>
    where
        E: fmt::Display + From<Timeout>,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        H: FnMut(&E, u32) -> HFut,
        HFut: Future<Output = Resume<T, E>>,
    {
        let timeout = self.timeout;
        let pacer = self.pacer;
        let (backend, operation, observer) = (self.backend, self.operation, self.observer);
        drive(self.policy, Some(self), classify, before_retry, move |n| {
            let fut = attempt(n);
            async move {
                let _permit = match pacer {
                    Some(p) => {
                        let (permit, waited) = p.acquire().await;
                        if !waited.is_zero() {
                            observer.paced(backend, operation, waited);
                        }
                        Some(permit)
                    }
                    None => None,
                };
                match timeout {
                    None => fut.await,
                    Some(after) => match tokio::time::timeout(after, fut).await {
                        Ok(r) => r,
                        Err(_) => Err(E::from(Timeout { after })),
                    },
                }
            }
        })
        .await
    }
}

/// The loop behind both entry points.
async fn drive<T, E, F, Fut, C, H, HFut>(
    policy: &RetryPolicy,
    observed: Option<&Call<'_>>,
    classify: C,
    mut before_retry: H,
    mut attempt: F,
) -> Result<T, GaveUp<E>>
where
    E: fmt::Display,
    C: Fn(&E) -> Verdict,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    H: FnMut(&E, u32) -> HFut,
    HFut: Future<Output = Resume<T, E>>,
{
    let mut n: u32 = 0;
    loop {
        let started = Instant::now();
        let result = attempt(n).await;
        let elapsed = started.elapsed();
        let (error, verdict) = match result {
            Ok(v) => {
                if let Some(c) = observed {
                    c.observer
                        .call(c.backend, c.operation, StatusClass::Success, elapsed);
                    tracing::debug!(
                        backend = c.backend.as_str(),
                        operation = c.operation,
                        what = c.what,
                        attempt = n + 1,
                        status = StatusClass::Success.as_str(),
                        elapsed_ms = elapsed.as_millis() as u64,
                        "backend call"
                    );
                }
                return Ok(v);
            }
            Err(e) => {
                let v = classify(&e);
                (e, v)
            }
        };
        if let Some(c) = observed {
            c.observer
                .call(c.backend, c.operation, verdict.class, elapsed);
            tracing::debug!(
                backend = c.backend.as_str(),
                operation = c.operation,
                what = c.what,
                attempt = n + 1,
                status = verdict.class.as_str(),
                elapsed_ms = elapsed.as_millis() as u64,
                error = %error,
                "backend call failed"
            );
        }
        let attempts = n + 1;
        let gave_up = |error, stop| {
            Err(GaveUp {
                error,
                attempts,
                stop,
            })
        };
        let wait = match verdict.retry {
            Retry::No => return gave_up(error, Stop::Final),
            Retry::After(d) if d > policy.max_retry_after => {
                return gave_up(error, Stop::WaitTooLong(d))
            }
            _ if n >= policy.max_retries => return gave_up(error, Stop::Exhausted),
            Retry::After(d) => d,
            Retry::Yes => policy.backoff(n),
        };
        let (backend, operation, what) =
            observed.map_or(("", "", ""), |c| (c.backend.as_str(), c.operation, c.what));
        tracing::warn!(
            backend,
            operation,
            what,
            retry = n + 1,
            wait_ms = wait.as_millis() as u64,
            error = %error,
            "backend call failed; retrying"
        );
        tokio::time::sleep(wait).await;
        match before_retry(&error, n).await {
            Resume::Retry => {}
            Resume::Finish(Ok(v)) => return Ok(v),
            Resume::Finish(Err(e)) => return gave_up(e, Stop::Final),
        }
        if let Some(c) = observed {
            c.observer.retry(c.backend, c.operation);
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    #[derive(Debug, PartialEq)]
    enum E {
        Busy(Option<Duration>),
        Bad,
        TimedOut,
    }

    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{self:?}")
        }
    }

    impl From<Timeout> for E {
        fn from(_: Timeout) -> Self {
            E::TimedOut
        }
    }

    fn verdict(e: &E) -> Verdict {
        match e {
            E::Busy(Some(d)) => Verdict::new(StatusClass::RateLimited, Retry::After(*d)),
            E::Busy(None) => Verdict::new(StatusClass::ServerError, Retry::Yes),
            E::Bad => Verdict::new(StatusClass::ClientError, Retry::No),
            E::TimedOut => Verdict::new(StatusClass::Transport, Retry::Yes),
        }
    }

    #[derive(Default)]
    struct Seen {
        calls: Mutex<Vec<(&'static str, StatusClass, Duration)>>,
        retries: AtomicU32,
    }

    impl CallObserver for Seen {
        fn call(&self, b: Backend, op: &'static str, s: StatusClass, elapsed: Duration) {
            assert_eq!(b, Backend::Vault);
            self.calls.lock().unwrap().push((op, s, elapsed));
        }
        fn retry(&self, b: Backend, _: &'static str) {
            assert_eq!(b, Backend::Vault);
            self.retries.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn policy(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_and_honour_retry_after_exactly() {
        let p = policy(3);
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let r: Result<(), _> = p
            .run(
                |_| Retry::After(Duration::from_secs(2)),
                |_| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("busy")
                },
            )
            .await;
        let g = r.unwrap_err();
        assert_eq!((g.error, g.attempts, g.stop), ("busy", 4, Stop::Exhausted));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(6),
            "3 waits of Retry-After"
        );
        assert!(g.suffix(&p).contains("after 4 attempts"));

        let r: Result<u32, GaveUp<&str>> = p
            .run(
                |_| Retry::Yes,
                |n| async move {
                    if n < 2 {
                        Err("flaky")
                    } else {
                        Ok(n)
                    }
                },
            )
            .await;
        assert_eq!(r, Ok(2));
    }

    /// Both sides of the cap: a wait up to `max_retry_after` is slept in full and the call
    /// retried; a longer one ends the call at once, without sleeping, with the hint.
    #[tokio::test(start_paused = true)]
    async fn retry_after_above_the_cap_gives_up_at_once_with_the_hint() {
        let p = policy(5);
        let seen = Seen::default();
        let call = Call::new(Backend::Vault, "kv.read", &p, &seen);

        // At the cap: waited exactly, then retried and through.
        let start = tokio::time::Instant::now();
        let r = call
            .run(verdict, |n| async move {
                if n == 0 {
                    Err(E::Busy(Some(Duration::from_secs(30))))
                } else {
                    Ok(n)
                }
            })
            .await;
        assert_eq!(r, Ok(1));
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(seen.retries.load(Ordering::SeqCst), 1);

        // Above it: no sleep, no retry, the server's hint in the result.
        let start = tokio::time::Instant::now();
        let sent = AtomicU32::new(0);
        let g = call
            .run(verdict, |_| async {
                sent.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(E::Busy(Some(Duration::from_secs(31))))
            })
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO, "no truncated sleep");
        assert_eq!(sent.load(Ordering::SeqCst), 1, "no retry burnt");
        assert_eq!(g.stop, Stop::WaitTooLong(Duration::from_secs(31)));
        assert_eq!(g.attempts, 1);
        let s = g.suffix(&p);
        assert!(
            s.contains("31s") && s.contains("max_retry_after 30s"),
            "{s}"
        );
        assert_eq!(seen.retries.load(Ordering::SeqCst), 1);
        let calls = seen.calls.lock().unwrap();
        let classes: Vec<StatusClass> = calls.iter().map(|c| c.1).collect();
        assert_eq!(
            classes,
            [
                StatusClass::RateLimited,
                StatusClass::Success,
                StatusClass::RateLimited
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_is_timed_bounded_and_reported() {
        let p = policy(2);
        let seen = Seen::default();
        let call = Call::new(Backend::Vault, "kv.write", &p, &seen).timeout(Duration::from_secs(1));
        let g = call
            .run(verdict, |_| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<(), E>(())
            })
            .await
            .unwrap_err();
        assert_eq!((g.error, g.attempts), (E::TimedOut, 3));
        assert_eq!(seen.retries.load(Ordering::SeqCst), 2);
        for (op, class, elapsed) in seen.calls.lock().unwrap().iter() {
            assert_eq!((*op, *class), ("kv.write", StatusClass::Transport));
            assert_eq!(*elapsed, Duration::from_secs(1));
        }
        assert_eq!(seen.calls.lock().unwrap().len(), 3);

        // A final error: one attempt, no retry.
        let g = call
            .run(verdict, |_| async { Err::<(), _>(E::Bad) })
            .await
            .unwrap_err();
        assert_eq!((g.attempts, g.stop), (1, Stop::Final));
        assert_eq!(g.suffix(&p), "");
        assert_eq!(seen.calls.lock().unwrap().len(), 4);
        assert_eq!(seen.retries.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_hook_runs_after_the_backoff_and_may_finish_the_call() {
        let p = policy(5);
        let seen = Seen::default();
        let call = Call::new(Backend::Vault, "kv.write", &p, &seen);
        let hooked = Mutex::new(Vec::new());
        let start = tokio::time::Instant::now();
        let r = call
            .run_with(
                verdict,
                |e: &E, n| {
                    hooked
                        .lock()
                        .unwrap()
                        .push((format!("{e}"), n, start.elapsed()));
                    async move {
                        if n == 0 {
                            Resume::Retry
                        } else {
                            Resume::Finish(Ok(99))
                        }
                    }
                },
                |_| async { Err::<u32, _>(E::Busy(Some(Duration::from_secs(3)))) },
            )
            .await;
        assert_eq!(r, Ok(99), "the hook's read-back found it landed");
        let hooked = hooked.lock().unwrap();
        assert_eq!(hooked.len(), 2);
        assert_eq!(hooked[0].2, Duration::from_secs(3), "after the wait");
        // One re-send (after the first hook), none after the finishing one.
        assert_eq!(seen.retries.load(Ordering::SeqCst), 1);
        assert_eq!(seen.calls.lock().unwrap().len(), 2);
    }

    /// The engine's use (its own retries over client calls, which are observed already):
    /// a transient error retried with backoff, a final one not, no observer involved.
    #[tokio::test(start_paused = true)]
    async fn plain_run_serves_callers_without_an_observer() {
        use crate::rotation::ports::BackendError;
        let p = RetryPolicy {
            max_retries: 2,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            ..RetryPolicy::default()
        };
        let classify = |e: &BackendError| match e {
            BackendError::Failed {
                transient: false, ..
            } => Retry::No,
            _ => Retry::Yes,
        };
        let failed = |transient| BackendError::Failed {
            backend: Backend::OpenAi,
            message: "HTTP 503".into(),
            transient,
        };
        let sent = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let g = p
            .run(classify, |_| async {
                sent.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(failed(true))
            })
            .await
            .unwrap_err();
        assert_eq!((g.attempts, g.stop), (3, Stop::Exhausted));
        assert_eq!(sent.load(Ordering::SeqCst), 3);
        assert!(
            start.elapsed() <= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(g.error, failed(true));

        let g = p
            .run(classify, |_| async { Err::<(), _>(failed(false)) })
            .await
            .unwrap_err();
        assert_eq!((g.attempts, g.stop), (1, Stop::Final));
    }

    #[test]
    fn backoff_is_full_jitter_over_a_capped_doubling_ceiling() {
        let p = RetryPolicy {
            max_retries: 10,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        assert_eq!(p.ceiling(0), Duration::from_millis(100));
        assert_eq!(p.ceiling(3), Duration::from_millis(800));
        assert_eq!(p.ceiling(4), Duration::from_secs(1));
        assert_eq!(p.ceiling(40), Duration::from_secs(1), "no overflow");
        for n in [0, 3, 8] {
            let ceiling = p.ceiling(n);
            let draws: Vec<Duration> = (0..4000).map(|_| p.backoff(n)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "above {ceiling:?}");
            // Uniform over [0, ceiling]: draws in the bottom and the top tenth (equal
            // jitter, [ceiling/2, ceiling], never goes below half), and a mean near half.
            assert!(draws.iter().any(|d| *d < ceiling / 10), "{n}: no low draw");
            assert!(
                draws.iter().any(|d| *d > ceiling * 9 / 10),
                "{n}: no high draw"
            );
            let mean = draws.iter().sum::<Duration>() / draws.len() as u32;
            assert!(
                mean > ceiling * 4 / 10 && mean < ceiling * 6 / 10,
                "{n}: mean {mean:?} of ceiling {ceiling:?}"
            );
        }
        let zero = RetryPolicy {
            base: Duration::ZERO,
            ..p
        };
        assert_eq!(zero.backoff(3), Duration::ZERO);
    }
}
