//! When each target rotates next: cron (UTC, seconds field) anchored on the current key's
//! creation time, an earlier rotation when the key passes `max_key_age`, deterministic jitter,
//! and capped exponential back-off after failures.
//!
//! Anchoring on the key's creation time (from Vault metadata) is what makes restarts safe: a
//! key rotated within its period is left alone, and fire times missed while the daemon was
//! down collapse into one catch-up rotation instead of one per missed tick.

use crate::config::Target;
use crate::rotation::Trigger;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Back-off after failed rotations (cert-manager style): `base * 2^(failures-1)`, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(300),
            cap: Duration::from_secs(6 * 3600),
        }
    }
}

impl Backoff {
    pub fn delay(&self, consecutive_failures: u32) -> Duration {
        if consecutive_failures == 0 {
            return Duration::ZERO;
        }
        let factor = 2u32.saturating_pow(consecutive_failures.saturating_sub(1).min(30));
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// What the scheduler knows about a target's history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetHistory {
    /// Creation time of the key Vault serves now (None: unknown or no key yet).
    pub key_created_at: Option<DateTime<Utc>>,
    /// Failed scheduled rotations since the last success or manual trigger.
    pub consecutive_failures: u32,
    pub last_failure_at: Option<DateTime<Utc>>,
}

/// The next rotation of a target: when, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub at: DateTime<Utc>,
    pub trigger: Trigger,
}

/// Deterministic jitter in `[0, max)` for a target and fire time: stable across restarts (a
/// restart does not re-roll the dice) yet spread across targets.
pub fn jitter(target: &str, fire: DateTime<Utc>, max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let digest = Sha256::digest(format!("{target}@{}", fire.timestamp()).as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    Duration::from_millis(n % (max.as_millis().min(u64::MAX as u128) as u64).max(1))
}

fn chrono(d: Duration) -> ChronoDuration {
    ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX)
}

/// When `target` should rotate next, given its history and the time now; `None` when it has
/// neither a schedule nor a maximum key age (manual rotations only).
pub fn next_due(
    target: &Target,
    history: &TargetHistory,
    now: DateTime<Utc>,
    backoff: &Backoff,
) -> Option<Due> {
    // Without a known creation time, anchor at "now": an unknown key is scheduled normally,
    // not rotated the moment the daemon starts.
    let anchor = history.key_created_at.unwrap_or(now);
    let scheduled = target.schedule.as_ref().and_then(|s| {
        let fire = s.schedule.after(&anchor).next()?;
        Some(Due {
            at: fire + chrono(jitter(&target.name, fire, target.jitter.get())),
            trigger: Trigger::Schedule,
        })
    });
    let aged = target.max_key_age.and_then(|age| {
        let created = history.key_created_at?;
        Some(Due {
            at: created + chrono(age.get()),
            trigger: Trigger::MaxAge,
        })
    });
    let mut due = match (scheduled, aged) {
        (Some(s), Some(a)) => Some(if a.at < s.at { a } else { s }),
        (s, a) => s.or(a),
    }?;
    if let Some(failed) = history.last_failure_at {
        let retry_at = failed + chrono(backoff.delay(history.consecutive_failures));
        if history.consecutive_failures > 0 && due.at < retry_at {
            due.at = retry_at;
        }
    }
    // Fire times missed while the daemon was down collapse into one rotation, now.
    due.at = due.at.max(now);
    Some(due)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CronSchedule, DurationStr};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn target(schedule: Option<&str>, max_age: Option<u64>, jitter_s: u64) -> Target {
        Target {
            name: "chat".into(),
            project_id: "p".into(),
            vault_path: "x".into(),
            vault_field: "api_key".into(),
            workloads: vec!["ns/Deployment/a".parse().unwrap()],
            waves: vec![],
            synced_secret: None,
            schedule: schedule.map(|s| s.parse::<CronSchedule>().unwrap()),
            max_key_age: max_age.map(DurationStr::from_secs),
            jitter: DurationStr::from_secs(jitter_s),
            grace_period: DurationStr::from_secs(1),
            drain: None,
            adoption: None,
            unlisted_consumers: Default::default(),
            smoke_probes: vec![],
            rollout_timeout: DurationStr::from_secs(10),
            key_expiry: None,
            anomaly: None,
        }
    }

    fn hist(created: &str) -> TargetHistory {
        TargetHistory {
            key_created_at: Some(t(created)),
            ..Default::default()
        }
    }

    const DAILY_3AM: &str = "0 0 3 * * *";

    #[test]
    fn next_fire_after_the_key_was_created() {
        let tg = target(Some(DAILY_3AM), None, 0);
        let d = next_due(
            &tg,
            &hist("2026-11-23T05:00:00Z"),
            t("2026-11-23T06:00:00Z"),
            &Backoff::default(),
        )
        .unwrap();
        assert_eq!(d.at, t("2026-11-24T03:00:00Z"));
        assert_eq!(d.trigger, Trigger::Schedule);
    }

    #[test]
    fn a_restart_does_not_rotate_a_key_rotated_within_its_period() {
        // Key made at 03:00:05 today by the 03:00 run; daemon restarts at 10:00.
        let tg = target(Some(DAILY_3AM), None, 0);
        let d = next_due(
            &tg,
            &hist("2026-11-23T03:00:05Z"),
            t("2026-11-23T10:00:00Z"),
            &Backoff::default(),
        )
        .unwrap();
        assert_eq!(d.at, t("2026-11-24T03:00:00Z"));
    }

    #[test]
    fn missed_fire_times_are_caught_up_once() {
        // Key from 5 days ago; the daemon was down for all the 3 AM runs since.
        let tg = target(Some(DAILY_3AM), None, 0);
        let now = t("2026-11-23T10:00:00Z");
        let d = next_due(&tg, &hist("2026-11-18T03:00:00Z"), now, &Backoff::default()).unwrap();
        assert_eq!(d.at, now, "due right away, once");
        // After that catch-up rotation the key is new: next is tomorrow, not the other 4 missed ticks.
        let d = next_due(&tg, &hist("2026-11-23T10:00:01Z"), now, &Backoff::default()).unwrap();
        assert_eq!(d.at, t("2026-11-24T03:00:00Z"));
    }

    #[test]
    fn max_key_age_brings_the_rotation_forward() {
        // Weekly schedule, but keys may not be older than 2 days.
        let tg = target(Some("0 0 3 * * Sun"), Some(2 * 86400), 0);
        let d = next_due(
            &tg,
            &hist("2026-11-23T12:00:00Z"),
            t("2026-11-23T13:00:00Z"),
            &Backoff::default(),
        )
        .unwrap();
        assert_eq!(d.at, t("2026-11-25T12:00:00Z"));
        assert_eq!(d.trigger, Trigger::MaxAge);
        // Max age alone, already exceeded: due in the past = now-ish.
        let tg = target(None, Some(3600), 0);
        let d = next_due(
            &tg,
            &hist("2026-11-20T00:00:00Z"),
            t("2026-11-23T13:00:00Z"),
            &Backoff::default(),
        )
        .unwrap();
        assert!(d.at <= t("2026-11-23T13:00:00Z"));
    }

    #[test]
    fn no_schedule_and_no_max_age_means_manual_only() {
        let tg = target(None, None, 0);
        assert_eq!(
            next_due(
                &tg,
                &hist("2026-11-23T12:00:00Z"),
                Utc::now(),
                &Backoff::default()
            ),
            None
        );
        // Max age without a known key creation time cannot be computed either.
        let tg = target(None, Some(3600), 0);
        assert_eq!(
            next_due(
                &tg,
                &TargetHistory::default(),
                Utc::now(),
                &Backoff::default()
            ),
            None
        );
    }

    #[test]
    fn unknown_key_age_is_scheduled_from_now_not_rotated_at_start() {
        let tg = target(Some(DAILY_3AM), None, 0);
        let now = t("2026-11-23T10:00:00Z");
        let d = next_due(&tg, &TargetHistory::default(), now, &Backoff::default()).unwrap();
        assert_eq!(d.at, t("2026-11-24T03:00:00Z"));
    }

    #[test]
    fn jitter_is_bounded_stable_and_spread() {
        let fire = t("2026-11-24T03:00:00Z");
        let max = Duration::from_secs(600);
        let a = jitter("chat", fire, max);
        assert!(a < max);
        assert_eq!(
            a,
            jitter("chat", fire, max),
            "stable across calls and restarts"
        );
        let distinct: std::collections::BTreeSet<_> = (0..20)
            .map(|i| jitter(&format!("t{i}"), fire, max))
            .collect();
        assert!(distinct.len() > 15, "spread across targets");
        let tg = target(Some(DAILY_3AM), None, 600);
        let d = next_due(
            &tg,
            &hist("2026-11-23T05:00:00Z"),
            t("2026-11-23T06:00:00Z"),
            &Backoff::default(),
        )
        .unwrap();
        assert!(d.at >= fire && d.at < fire + ChronoDuration::seconds(600));
        assert_eq!(d.at, fire + chrono(jitter("chat", fire, max)));
    }

    #[test]
    fn failures_back_off_exponentially_with_a_cap() {
        let b = Backoff {
            base: Duration::from_secs(60),
            cap: Duration::from_secs(600),
        };
        assert_eq!(b.delay(0), Duration::ZERO);
        assert_eq!(b.delay(1), Duration::from_secs(60));
        assert_eq!(b.delay(2), Duration::from_secs(120));
        assert_eq!(b.delay(4), Duration::from_secs(480));
        assert_eq!(b.delay(5), Duration::from_secs(600));
        assert_eq!(b.delay(500), Duration::from_secs(600));

        // An overdue target that just failed twice waits 2 minutes, not 0.
        let tg = target(None, Some(3600), 0);
        let failed = t("2026-11-23T13:00:00Z");
        let h = TargetHistory {
            key_created_at: Some(t("2026-11-20T00:00:00Z")),
            consecutive_failures: 2,
            last_failure_at: Some(failed),
        };
        let d = next_due(&tg, &h, failed, &b).unwrap();
        assert_eq!(d.at, failed + ChronoDuration::seconds(120));
    }
}
