//! Smoke probes after a rollout: each probe must answer its expected status a number of
//! times in a row before the deadline. One attempt is the [`SmokeProber`] port's job.
//!
//! [`SmokeProber`]: super::ports::SmokeProber

use super::engine::Engine;
use crate::config::SmokeProbe;
use tokio::time::Instant;

impl Engine {
    /// Run `probe` until its streak of successes is reached or `deadline` passes (at least
    /// long enough for the streak, even near the rollout deadline). The error never carries
    /// the URL: it may hold credentials.
    pub(super) async fn probe(&self, probe: &SmokeProbe, deadline: Instant) -> Result<(), String> {
        let mut streak = 0;
        let mut last = String::from("no attempt");
        let min_window = probe.interval.get() * (probe.consecutive_successes + 2);
        let deadline = deadline.max(Instant::now() + min_window);
        loop {
            match self
                .prober
                .get_status(&probe.url, probe.timeout.get())
                .await
            {
                Ok(status) if status == probe.expect_status => {
                    streak += 1;
                    if streak >= probe.consecutive_successes {
                        return Ok(());
                    }
                }
                Ok(status) => {
                    streak = 0;
                    last = format!("HTTP {status} (want {})", probe.expect_status);
                }
                Err(e) => {
                    streak = 0;
                    last = e.to_string();
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{streak}/{} consecutive successes; last: {last}",
                    probe.consecutive_successes
                ));
            }
            tokio::time::sleep(probe.interval.get()).await;
        }
    }
}
