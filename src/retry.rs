//! Bounded retry with exponential backoff and full jitter, shared by the backend clients.

use std::future::Future;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub max_retries: u32,
    /// Backoff before the first retry; doubles each time.
    pub base: Duration,
    /// Cap on one backoff (and on a server's `Retry-After`).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            base: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What one attempt says about retrying.
pub enum Attempt<T, E> {
    Done(Result<T, E>),
    /// Retry; `Some(d)` when the server said how long to wait (`Retry-After`).
    Retry(E, Option<Duration>),
}

impl RetryPolicy {
    /// Backoff before retry number `n` (0-based): full jitter over `base * 2^n`, capped.
    pub fn backoff(&self, n: u32) -> Duration {
        use rand::Rng;
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(n))
            .min(self.max_backoff);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rand::rng().random_range(nanos / 2..=nanos.max(1)))
    }

    /// Run `attempt` until it is done or the retries are spent; `on_retry` hears each retry
    /// (for metrics and logs). Returns the last error when retries run out.
    pub async fn run<T, E, F, Fut>(
        &self,
        mut attempt: F,
        mut on_retry: impl FnMut(&E, u32),
    ) -> Result<T, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Attempt<T, E>>,
    {
        let mut n = 0;
        loop {
            match attempt(n).await {
                Attempt::Done(r) => return r,
                Attempt::Retry(e, after) => {
                    if n >= self.max_retries {
                        return Err(e);
                    }
                    on_retry(&e, n);
                    let wait = match after {
                        Some(d) => d.min(self.max_backoff),
                        None => self.backoff(n),
                    };
                    tokio::time::sleep(wait).await;
                    n += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_and_honour_retry_after() {
        let p = RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        };
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let r: Result<(), &str> = p
            .run(
                |_| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Attempt::Retry("busy", Some(Duration::from_secs(2)))
                },
                |_, _| {},
            )
            .await;
        assert_eq!(r, Err("busy"));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(6),
            "3 waits of Retry-After"
        );

        let r: Result<u32, &str> = p
            .run(
                |n| async move {
                    if n < 2 {
                        Attempt::Retry("flaky", None)
                    } else {
                        Attempt::Done(Ok(n))
                    }
                },
                |_, _| {},
            )
            .await;
        assert_eq!(r, Ok(2));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_retries: 10,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for n in 0..10 {
            let b = p.backoff(n);
            assert!(b <= Duration::from_secs(1), "{b:?}");
        }
        assert!(p.backoff(0) <= Duration::from_millis(100));
        assert!(p.backoff(8) >= Duration::from_millis(500));
    }
}
