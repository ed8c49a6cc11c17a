//! Critical background tasks restart when they panic: a loop that died would stop polling,
//! delivering or rotating without anyone noticing, while the daemon still looks healthy.

use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Run the task `make` builds until it returns or `cancel`; when it panics, log it and run a
/// new one after `backoff`.
pub async fn supervised<F, Fut>(
    name: &'static str,
    backoff: Duration,
    cancel: CancellationToken,
    make: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(make()).await {
            Ok(()) => return,
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                tracing::error!(task = name, error = %e, "background task died; restarting it");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_a_finished_one_is_not() {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        supervised(
            "test",
            Duration::from_secs(1),
            CancellationToken::new(),
            move || {
                let r = r.clone();
                async move {
                    // Panics twice, then ends.
                    if r.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("planted");
                    }
                }
            },
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_restarts() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        supervised("test", Duration::from_secs(1), cancel, move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                panic!("planted");
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
