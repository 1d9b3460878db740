//! The launch breaker of one purpose: after several launches in a row fail (the provider
//! refuses, or the workspace never answers), launching stops for a pause that grows with each
//! failed probe, so that a broken image or user data script does not burn money in a loop.
//! Once the pause is over, one probe launch is let through; when an instance of the purpose
//! becomes ready the breaker closes again. Pure: time comes in as milliseconds.

/// How the breaker reacts to failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failures in a row that open the breaker.
    pub failures_to_open: u32,
    /// The first pause; each failed probe doubles it, up to `max_pause_ms`.
    pub first_pause_ms: u64,
    pub max_pause_ms: u64,
    /// How long a probe may take (launch and readiness) before another is let through.
    pub probe_window_ms: u64,
}

/// Why a launch may not be made now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A failure or two in a row: warm-up launches wait until `until_ms` (a user's own launch
    /// does not).
    Backoff { until_ms: u64 },
    /// The breaker is open: no launch until `until_ms`, or until the probe under way ends.
    Paused {
        until_ms: u64,
        failures: u32,
        reason: String,
        probing: bool,
    },
}

/// What a launch that may go ahead is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Launch,
    /// The one launch let through after a pause: its outcome closes or reopens the breaker.
    Probe,
}

/// What a failure did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Warm-ups back off until then.
    Backoff { until_ms: u64 },
    /// The breaker opened (or stayed open after a failed probe) until then.
    Opened { until_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { backoff_until_ms: u64 },
    Open { until_ms: u64 },
    Probing { until_ms: u64 },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
    /// Failures since the last success.
    failures: u32,
    /// Times the breaker opened since the last success: the pause doubles with each.
    openings: u32,
    reason: String,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            state: State::Closed {
                backoff_until_ms: 0,
            },
            failures: 0,
            openings: 0,
            reason: String::new(),
        }
    }

    /// Whether a launch may go ahead now. A user's own launch ignores the short backoff of
    /// warm-ups, never an open breaker. Letting a probe through changes the state: call it
    /// only for a launch that will be made.
    pub fn permit(&mut self, now_ms: u64, for_user: bool) -> Result<Permit, Refusal> {
        match self.state {
            State::Closed { backoff_until_ms } if !for_user && now_ms < backoff_until_ms => {
                Err(Refusal::Backoff {
                    until_ms: backoff_until_ms,
                })
            }
            State::Closed { .. } => Ok(Permit::Launch),
            State::Open { until_ms } | State::Probing { until_ms } if now_ms < until_ms => {
                Err(Refusal::Paused {
                    until_ms,
                    failures: self.failures,
                    reason: self.reason.clone(),
                    probing: matches!(self.state, State::Probing { .. }),
                })
            }
            State::Open { .. } | State::Probing { .. } => {
                self.state = State::Probing {
                    until_ms: now_ms + self.settings.probe_window_ms,
                };
                Ok(Permit::Probe)
            }
        }
    }

    /// What [`Self::permit`] would answer, without letting a probe through.
    pub fn refusal(&self, now_ms: u64) -> Option<Refusal> {
        self.clone().permit(now_ms, true).err()
    }

    /// A launch failed or its workspace never became ready.
    pub fn failed(&mut self, now_ms: u64, reason: &str) -> AfterFailure {
        self.failures = self.failures.saturating_add(1);
        self.reason = reason.chars().take(500).collect();
        let probing = matches!(self.state, State::Probing { .. });
        let open = matches!(self.state, State::Open { .. });
        if probing || (!open && self.failures >= self.settings.failures_to_open.max(1)) {
            self.openings = self.openings.saturating_add(1);
            let pause = self
                .settings
                .first_pause_ms
                .saturating_mul(1 << (self.openings - 1).min(20))
                .min(self.settings.max_pause_ms);
            let until_ms = now_ms + pause;
            self.state = State::Open { until_ms };
            return AfterFailure::Opened { until_ms };
        }
        if let State::Open { until_ms } = self.state {
            // A launch from before the breaker opened failed too: the pause stands.
            return AfterFailure::Opened { until_ms };
        }
        // 1 s, 2 s, 4 s ... for the failures before the breaker opens.
        let until_ms = now_ms + 1000u64.saturating_mul(1 << (self.failures - 1).min(8));
        self.state = State::Closed {
            backoff_until_ms: until_ms,
        };
        AfterFailure::Backoff { until_ms }
    }

    /// An instance of the purpose became ready: launching works.
    pub fn succeeded(&mut self) {
        self.state = State::Closed {
            backoff_until_ms: 0,
        };
        self.failures = 0;
        self.openings = 0;
        self.reason.clear();
    }

    /// Whether the breaker is open (or probing): for status answers.
    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            failures_to_open: 3,
            first_pause_ms: 10_000,
            max_pause_ms: 35_000,
            probe_window_ms: 60_000,
        })
    }

    #[test]
    fn failures_back_off_warm_ups_then_open_the_breaker() {
        let mut b = breaker();
        assert_eq!(b.permit(0, false), Ok(Permit::Launch));
        assert_eq!(
            b.failed(0, "boom"),
            AfterFailure::Backoff { until_ms: 1000 }
        );
        assert_eq!(
            b.permit(500, false),
            Err(Refusal::Backoff { until_ms: 1000 })
        );
        // A user's own launch is not held back by the short backoff.
        assert_eq!(b.permit(500, true), Ok(Permit::Launch));
        assert_eq!(
            b.failed(1000, "boom"),
            AfterFailure::Backoff { until_ms: 3000 }
        );
        assert_eq!(
            b.failed(3000, "the image is broken"),
            AfterFailure::Opened { until_ms: 13_000 }
        );
        assert!(b.is_open());
        let refused = b.permit(5000, true);
        assert_eq!(
            refused,
            Err(Refusal::Paused {
                until_ms: 13_000,
                failures: 3,
                reason: "the image is broken".into(),
                probing: false,
            })
        );
        assert_eq!(b.refusal(5000), refused.err());
    }

    #[test]
    fn one_probe_after_the_pause_and_the_pause_grows_until_one_succeeds() {
        let mut b = breaker();
        for t in 0..3 {
            b.failed(t, "x");
        }
        // The pause is over: one probe, and nobody else while it runs.
        assert_eq!(b.refusal(10_002), None);
        assert_eq!(b.permit(10_002, false), Ok(Permit::Probe));
        assert!(matches!(
            b.permit(10_003, true),
            Err(Refusal::Paused { probing: true, .. })
        ));
        // The probe fails: twice the pause, then capped.
        assert_eq!(
            b.failed(20_000, "x"),
            AfterFailure::Opened { until_ms: 40_000 }
        );
        assert_eq!(b.permit(40_000, false), Ok(Permit::Probe));
        assert_eq!(
            b.failed(50_000, "x"),
            AfterFailure::Opened { until_ms: 85_000 }
        );
        // A probe that never reports back does not hold the breaker forever.
        assert_eq!(b.permit(85_000, false), Ok(Permit::Probe));
        assert_eq!(b.permit(145_000, false), Ok(Permit::Probe));
        b.succeeded();
        assert!(!b.is_open());
        assert_eq!(b.permit(145_001, false), Ok(Permit::Launch));
        // After a success it takes three failures again to open.
        b.failed(146_000, "x");
        assert!(!b.is_open());
    }

    #[test]
    fn a_late_failure_from_before_the_pause_does_not_lengthen_it() {
        let mut b = breaker();
        for t in 0..3 {
            b.failed(t, "x");
        }
        assert_eq!(
            b.failed(5000, "x"),
            AfterFailure::Opened { until_ms: 10_002 }
        );
    }
}
