//! Pacing to a server's announced request limit, shared by every caller of one client.
//!
//! OpenAI answers with `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests` and
//! `x-ratelimit-reset-requests` (`250ms`, `1s`, `6m0s`), and a 429 with `Retry-After`.
//! Without pacing, each concurrent rotation finds the limit by hitting it and waits out its
//! own `Retry-After`; with many targets that is a storm of 429s. The [`Pacer`] keeps one
//! estimate per client instead:
//! - while the server says requests remain, they go at once (each send takes one), but
//!   never more than the limit within one window of our own sends (the window: the longest
//!   announced reset, rounded up to whole seconds), so answers that lag behind requests in
//!   flight cannot overfill it;
//! - when none remain, nothing is sent until the announced reset, then one request per
//!   `window / limit` (the longest reset seen, divided by the limit: the server's own
//!   sustainable rate) until an answer says more remain;
//! - a 429 holds every caller, not only the one that got it, until the announced reset
//!   (or `Retry-After` when no reset is announced).
//!
//! Until the first answer, one request at a time finds out the limit. Requests still in
//! flight are subtracted from the server's `remaining` (it has not
//! counted them yet, or has: either way the estimate errs low). Every wait is bounded by
//! [`MAX_WAIT`]; without headers (a server that announces nothing) nothing is paced.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// No announced wait is believed beyond this (a garbled header must not stall the daemon).
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Most sends remembered for the local window (a larger limit is only paced by answers).
const MAX_LOG: u64 = 10_000;
/// Added to our own window: a request reaches the server a little after we send it, and
/// not always equally late.
const LOG_MARGIN: Duration = Duration::from_millis(20);
/// Added to an announced reset: the header is rounded down to milliseconds.
const MARGIN: Duration = Duration::from_millis(5);

/// What one answer said about the limit (each header optional).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub reset: Option<Duration>,
    /// From a 429: `Retry-After` (or `Retry-After-Ms`).
    pub retry_after: Option<Duration>,
    pub rejected: bool,
}

impl Limits {
    /// The `x-ratelimit-*-requests` headers of an answer; `rejected` and `retry_after` are
    /// the caller's (it knows the status).
    pub fn from_headers(headers: &http::HeaderMap) -> Limits {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let num = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        Limits {
            limit: num("x-ratelimit-limit-requests"),
            remaining: num("x-ratelimit-remaining-requests"),
            reset: text("x-ratelimit-reset-requests").and_then(parse_reset),
            retry_after: None,
            rejected: false,
        }
    }

    fn announces(&self) -> bool {
        self.remaining.is_some() || self.rejected
    }
}

/// `x-ratelimit-reset-*` as OpenAI writes it: number-unit pairs, units `h`, `m`, `s`,
/// `ms` (`120ms`, `1s`, `1.5s`, `6m0s`, `1h2m3.5s`). `None` for anything else.
pub fn parse_reset(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let (scale, unit_len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else {
            return None;
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(86_400.0)))
}

#[derive(Debug, Default)]
struct State {
    /// Requests the server still takes before its reset (our estimate); `None` = unknown.
    remaining: Option<u64>,
    /// When the server said a request frees up again (its last announced reset).
    reset_at: Option<Instant>,
    /// While none remain: the next paced request, one gap after the last.
    next_slot: Option<Instant>,
    /// No request before this (a 429's `Retry-After`).
    hold_until: Option<Instant>,
    /// The longest reset announced: the server's window.
    window: Duration,
    limit: u64,
    /// Our own sends within the last window (at most `limit`, at most [`MAX_LOG`]): never
    /// more than the limit in any window, whatever the answers said.
    sent: VecDeque<Instant>,
    in_flight: u64,
    /// Some answer (or failure) came back: until then one request finds out the limit.
    seen: bool,
}

impl State {
    /// The pause between two requests while none remain.
    fn gap(&self) -> Duration {
        let per = u32::try_from(self.limit.max(1)).unwrap_or(u32::MAX);
        (self.window / per).min(MAX_WAIT)
    }

    /// Take a place now, or say how long to wait (`Duration::ZERO` = for the first answer).
    fn take(&mut self, now: Instant) -> Option<Duration> {
        if let Some(h) = self.hold_until.filter(|h| *h > now) {
            return Some(h - now);
        }
        if !self.seen && self.in_flight > 0 {
            return Some(Duration::ZERO);
        }
        // Our own sliding window: the limit's worth of sends in the last window.
        let logged = self.limit > 0 && self.limit <= MAX_LOG && !self.window.is_zero();
        if logged {
            while self
                .sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.window)
            {
                self.sent.pop_front();
            }
            if self.sent.len() as u64 >= self.limit {
                if let Some(oldest) = self.sent.front() {
                    return Some(
                        (*oldest + self.window + LOG_MARGIN).saturating_duration_since(now),
                    );
                }
            }
        }
        match self.remaining {
            None => {}
            Some(r) if r > 0 => self.remaining = Some(r - 1),
            Some(_) => {
                if let Some(at) = self.next_slot.max(self.reset_at).filter(|t| *t > now) {
                    return Some(at - now);
                }
                self.next_slot = Some(now + self.gap());
            }
        }
        self.sent.push_back(now);
        if self.sent.len() as u64 > self.limit.clamp(1, MAX_LOG) {
            self.sent.pop_front();
        }
        self.in_flight += 1;
        None
    }
}

/// One shared pacer per client (see the module docs).
#[derive(Debug, Default)]
pub struct Pacer {
    state: Mutex<State>,
    first_answer: Notify,
}

/// A request on its way: hold it until the answer was [`Pacer::observe`]d; dropping it
/// ends the request.
pub struct Permit<'a> {
    pacer: &'a Pacer,
}

impl Pacer {
    pub fn new() -> Pacer {
        Pacer::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain numbers: a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until a request may go, and take its place; also how long it waited.
    pub async fn acquire(&self) -> (Permit<'_>, Duration) {
        let t0 = Instant::now();
        let mut held = false;
        loop {
            let (wait, first) = {
                let mut s = self.lock();
                // Registered before the lock is released: no wake-up is missed.
                let first = self.first_answer.notified();
                (s.take(Instant::now()), first)
            };
            match wait {
                None => {
                    let waited = if held { t0.elapsed() } else { Duration::ZERO };
                    return (Permit { pacer: self }, waited);
                }
                Some(Duration::ZERO) => {
                    held = true;
                    first.await
                }
                Some(w) => {
                    held = true;
                    tokio::time::sleep(w.min(MAX_WAIT)).await
                }
            }
        }
    }

    /// Feed what an answer said about the limit; call it while the request's [`Permit`]
    /// is held.
    pub fn observe(&self, l: &Limits) {
        let mut s = self.lock();
        self.saw_answer(&mut s);
        if !l.announces() {
            return;
        }
        let now = Instant::now();
        if let Some(limit) = l.limit {
            s.limit = limit;
        }
        // Others in flight: the server may not have counted them yet.
        let others = s.in_flight.saturating_sub(1);
        let left = if l.rejected {
            Some(0)
        } else {
            l.remaining.map(|r| r.saturating_sub(others))
        };
        if let Some(reset) = l.reset {
            let reset = reset.min(MAX_WAIT);
            // The window is whole seconds (per second, per minute); an exhausted answer's
            // reset is a little under it.
            let whole = Duration::from_secs(reset.as_secs() + u64::from(reset.subsec_nanos() > 0));
            s.window = s.window.max(whole);
            // With requests left the reset says when the window is whole again, not when
            // the next one may go: only an exhausted answer sets the next slot.
            if left == Some(0) {
                s.reset_at = Some(now + reset + MARGIN);
            }
        }
        if l.rejected {
            // Everyone waits for the announced reset when there is one (to the millisecond);
            // `Retry-After` is whole seconds and stays the refused call's own wait.
            if let Some(after) = l.reset.map(|r| r + MARGIN).or(l.retry_after) {
                let until = now + after.min(MAX_WAIT);
                s.hold_until = Some(s.hold_until.map_or(until, |h| h.max(until)));
            }
        }
        if left.is_some() {
            s.remaining = left;
        }
    }

    fn saw_answer(&self, s: &mut State) {
        if !s.seen {
            s.seen = true;
            self.first_answer.notify_waiters();
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut s = self.pacer.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        // No answer at all (a connect failure): the others need not wait for one.
        self.pacer.saw_answer(&mut s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(limit: u64, remaining: u64, reset_ms: u64) -> Limits {
        Limits {
            limit: Some(limit),
            remaining: Some(remaining),
            reset: Some(Duration::from_millis(reset_ms)),
            ..Limits::default()
        }
    }

    #[test]
    fn reset_headers_parse_like_openai_writes_them() {
        let ms = Duration::from_millis;
        assert_eq!(parse_reset("120ms"), Some(ms(120)));
        assert_eq!(parse_reset("1s"), Some(ms(1000)));
        assert_eq!(parse_reset("1.5s"), Some(ms(1500)));
        assert_eq!(parse_reset("6m0s"), Some(ms(360_000)));
        assert_eq!(parse_reset("1h2m3.5s"), Some(ms(3_723_500)));
        for junk in ["", "s", "1", "1x", "-1s", "1.2.3s", "NaNs"] {
            assert_eq!(parse_reset(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn headers_are_read() {
        let mut h = http::HeaderMap::new();
        h.insert("x-ratelimit-limit-requests", "10".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "3".parse().unwrap());
        h.insert("x-ratelimit-reset-requests", "250ms".parse().unwrap());
        assert_eq!(Limits::from_headers(&h), answer(10, 3, 250));
        assert_eq!(
            Limits::from_headers(&http::HeaderMap::new()),
            Limits::default()
        );
    }

    /// Ordering under paused time, not wall-clock figures: the Nth request goes only after
    /// the instants the announced limit allows.
    /// Ordering under paused time, not wall-clock figures: the Nth request goes only after
    /// the instants the announced limit allows.
    #[tokio::test(start_paused = true)]
    async fn exhausted_limit_waits_for_the_reset_then_paces_at_the_limit() {
        let p = Pacer::new();
        let t0 = Instant::now();
        // Unknown: no wait.
        p.acquire().await;
        p.observe(&answer(4, 0, 1000));
        // None remain: the next one waits for the reset...
        p.acquire().await;
        assert!(Instant::now() - t0 >= Duration::from_millis(1000));
        // ...and the ones after it go one per window / limit (250 ms).
        let t1 = Instant::now();
        p.acquire().await;
        p.acquire().await;
        assert!(Instant::now() - t1 >= Duration::from_millis(500));
        // An answer saying more remain lets them go at once, up to the limit per window
        // (the limit grew to 10).
        {
            let _a = p.acquire().await;
            p.observe(&answer(10, 3, 1000));
        }
        let t2 = Instant::now();
        for _ in 0..3 {
            p.acquire().await;
        }
        assert_eq!(Instant::now(), t2);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_count_against_what_remains() {
        let p = Pacer::new();
        let t0 = Instant::now();
        {
            let _a = p.acquire().await;
            p.observe(&answer(10, 9, 1000));
            let _b = p.acquire().await;
            let _c = p.acquire().await;
            // Two others in flight that the server may not have counted yet.
            p.observe(&answer(10, 2, 1000));
        }
        p.acquire().await;
        assert!(Instant::now() - t0 >= Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn until_the_first_answer_one_request_finds_out_the_limit() {
        let p = std::sync::Arc::new(Pacer::new());
        let first = p.acquire().await;
        let p2 = p.clone();
        let second = tokio::spawn(async move {
            let _permit = p2.acquire().await;
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!second.is_finished());
        p.observe(&answer(10, 9, 1000));
        drop(first);
        second.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_holds_every_caller() {
        let p = Pacer::new();
        let t0 = Instant::now();
        {
            let _a = p.acquire().await;
            p.observe(&Limits {
                rejected: true,
                retry_after: Some(Duration::from_secs(7)),
                ..Limits::default()
            });
        }
        p.acquire().await;
        assert!(Instant::now() - t0 >= Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_with_an_announced_reset_holds_until_that_reset() {
        let p = Pacer::new();
        let t0 = Instant::now();
        {
            let _a = p.acquire().await;
            p.observe(&Limits {
                rejected: true,
                retry_after: Some(Duration::from_secs(7)),
                ..answer(10, 0, 300)
            });
        }
        p.acquire().await;
        let waited = Instant::now() - t0;
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_announced_while_requests_remain_does_not_delay() {
        let p = Pacer::new();
        let t0 = Instant::now();
        {
            let _a = p.acquire().await;
            p.observe(&answer(10, 5, 60_000));
        }
        for _ in 0..5 {
            p.acquire().await;
        }
        assert_eq!(Instant::now(), t0);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_are_bounded() {
        let p = Pacer::new();
        let t0 = Instant::now();
        {
            let _a = p.acquire().await;
            p.observe(&Limits {
                rejected: true,
                retry_after: Some(Duration::from_secs(86_400)),
                reset: Some(Duration::from_secs(86_400)),
                ..Limits::default()
            });
        }
        p.acquire().await;
        assert!(Instant::now() - t0 <= MAX_WAIT + Duration::from_secs(1));
    }
}
