//! Reconnect delays: capped exponential backoff with full jitter (1 s doubling to 5 min), a
//! long floor for rejections (bad credentials, throttling), and a reset once a session has
//! stayed healthy for a while.

use std::time::Duration;

use rand::Rng;

use crate::error::ErrorClass;

/// The schedule's constants, validated once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The first cap; each further failure doubles it.
    pub base: Duration,
    /// The cap never grows beyond this.
    pub max: Duration,
    /// After a rejection (`ErrorClass::RetryLater`), never retry sooner than this.
    pub rejected_floor: Duration,
    /// A session healthy for this long resets the schedule.
    pub healthy_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            rejected_floor: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            policy,
            failures: 0,
        }
    }

    /// The current cap: `base * 2^failures`, at most `max`.
    fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(30)).unwrap_or(u32::MAX);
        self.policy.base.saturating_mul(factor).min(self.policy.max)
    }

    /// The delay before the next attempt after a failure of `class`, drawn uniformly from
    /// `[cap/10, cap]` (full jitter, with a small floor so that no retry is immediate).
    pub fn next_delay(&mut self, class: ErrorClass, rng: &mut impl Rng) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        let low = cap / 10;
        let jittered = if cap > low {
            rng.gen_range(low..=cap)
        } else {
            cap
        };
        match class {
            ErrorClass::RetryLater => jittered.max(self.policy.rejected_floor),
            _ => jittered,
        }
    }

    /// Called when a session ends: one that had been healthy for `healthy_after` starts the
    /// schedule over.
    pub fn session_ended(&mut self, healthy_for: Duration) {
        if healthy_for >= self.policy.healthy_after {
            self.failures = 0;
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn delays_grow_exponentially_within_their_cap_and_stop_at_five_minutes() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let mut r = rng();
        for n in 0..20u32 {
            let cap = Duration::from_secs(1u64 << n.min(20)).min(Duration::from_secs(300));
            let d = b.next_delay(ErrorClass::Retry, &mut r);
            assert!(
                d <= cap && d >= cap / 10,
                "failure {n}: {d:?} outside [{:?}, {cap:?}]",
                cap / 10
            );
        }
        assert_eq!(b.cap(), Duration::from_secs(300));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut r = rng();
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                let mut b = Backoff::new(BackoffPolicy::default());
                for _ in 0..5 {
                    b.next_delay(ErrorClass::Retry, &mut r);
                }
                b.next_delay(ErrorClass::Retry, &mut r)
            })
            .collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn rejections_wait_at_least_the_floor() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let mut r = rng();
        for _ in 0..5 {
            assert!(b.next_delay(ErrorClass::RetryLater, &mut r) >= Duration::from_secs(60));
        }
    }

    #[test]
    fn a_healthy_session_resets_the_schedule_and_a_short_one_does_not() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let mut r = rng();
        for _ in 0..6 {
            b.next_delay(ErrorClass::Retry, &mut r);
        }
        b.session_ended(Duration::from_secs(5));
        assert_eq!(b.failures(), 6);
        b.session_ended(Duration::from_secs(61));
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay(ErrorClass::Retry, &mut r) <= Duration::from_secs(1));
    }
}
