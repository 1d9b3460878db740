//! What the pool costs: instance-seconds and money per purpose and state, since the books
//! were opened, for the current UTC day, and per user for the current UTC month.
//!
//! Pure: the manager (and the simulator) say which instances were in which state over which
//! span of milliseconds; the ledger adds it up. Money is added when time is, at the rate of
//! that moment, so a changed price applies from then on and never rewrites the past.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

const DAY_MS: u64 = 86_400_000;

/// What an instance was doing, for the books.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Use {
    /// Starting (a launch or a resume): paid, not usable yet.
    Launching,
    /// Warm and unassigned.
    Free,
    /// Assigned, and its user acted in the last few minutes.
    AssignedActive,
    /// Assigned, and its user has not acted for a while.
    AssignedIdle,
    /// Stopped with its user's work: only its volume is paid.
    Paused,
}

impl Use {
    pub const ALL: [Use; 5] = [
        Use::Launching,
        Use::Free,
        Use::AssignedActive,
        Use::AssignedIdle,
        Use::Paused,
    ];

    /// The name in metrics, GET_STATUS and the admin page.
    pub fn label(self) -> &'static str {
        match self {
            Use::Launching => "launching",
            Use::Free => "free",
            Use::AssignedActive => "assigned_active",
            Use::AssignedIdle => "assigned_idle",
            Use::Paused => "paused",
        }
    }

    /// Whether the instance is running (paid at the running rate) rather than stored.
    pub fn running(self) -> bool {
        self != Use::Paused
    }
}

/// What a purpose's instances cost per hour, in the configured currency.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rates {
    pub hourly: f64,
    pub paused_hourly: f64,
}

impl Rates {
    /// What one instance in `state` costs a millisecond.
    pub fn per_ms(self, state: Use) -> f64 {
        let hourly = if state.running() {
            self.hourly
        } else {
            self.paused_hourly
        };
        hourly / 3_600_000.0
    }
}

/// Seconds and money.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Amount {
    pub seconds: f64,
    pub cost: f64,
}

impl Amount {
    fn add(&mut self, ms: u64, rate_per_ms: f64) {
        self.seconds += ms as f64 / 1000.0;
        self.cost += ms as f64 * rate_per_ms;
    }

    /// Hours, for reports.
    pub fn hours(&self) -> f64 {
        self.seconds / 3600.0
    }
}

/// Amounts per purpose and state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Tally(pub BTreeMap<String, BTreeMap<Use, Amount>>);

impl Tally {
    fn add(&mut self, purpose: &str, state: Use, ms: u64, rate_per_ms: f64) {
        self.0
            .entry(purpose.to_owned())
            .or_default()
            .entry(state)
            .or_default()
            .add(ms, rate_per_ms);
    }

    /// One purpose's amounts by state.
    pub fn purpose(&self, purpose: &str) -> Option<&BTreeMap<Use, Amount>> {
        self.0.get(purpose)
    }

    /// The sum over states of one purpose (all purposes with `None`).
    pub fn sum(&self, purpose: Option<&str>) -> Amount {
        let mut out = Amount::default();
        for (p, states) in &self.0 {
            if purpose.is_some_and(|want| want != p) {
                continue;
            }
            for a in states.values() {
                out.seconds += a.seconds;
                out.cost += a.cost;
            }
        }
        out
    }

    /// The amount of one purpose in one state.
    pub fn get(&self, purpose: &str, state: Use) -> Amount {
        self.0
            .get(purpose)
            .and_then(|s| s.get(&state))
            .copied()
            .unwrap_or_default()
    }
}

/// One instance's state over a span, as the books take it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub purpose: String,
    pub state: Use,
    /// The owner, for an assigned or paused instance.
    pub user: Option<String>,
}

/// The books of one pool.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// When the books were opened (ms since the epoch).
    pub since_ms: u64,
    /// Everything since then.
    pub total: Tally,
    /// The UTC day `today` is for (days since the epoch).
    pub day: u64,
    pub today: Tally,
    /// The UTC month `users` is for, as `YYYY-MM`.
    pub period: String,
    /// Per user, this month: what their instances cost, by purpose and state.
    pub users: BTreeMap<String, Tally>,
    /// Up to when everything is counted (ms since the epoch).
    pub counted_to_ms: u64,
}

impl Ledger {
    /// Empty books opened at `now_ms`.
    pub fn open(now_ms: u64) -> Self {
        Ledger {
            since_ms: now_ms,
            day: now_ms / DAY_MS,
            period: month_of(now_ms),
            counted_to_ms: now_ms,
            ..Ledger::default()
        }
    }

    /// Counts `entries` as they were from `counted_to_ms` to `to_ms`, at `rates` of each
    /// purpose (a purpose without rates costs nothing). A span crossing UTC midnight is split
    /// so that the new day (and the new month) starts empty. Nothing happens when `to_ms` is
    /// not after what is counted already.
    pub fn accrue(&mut self, to_ms: u64, entries: &[Entry], rates: &dyn Fn(&str) -> Rates) {
        while self.counted_to_ms < to_ms {
            let from = self.counted_to_ms;
            let day_end = (from / DAY_MS + 1) * DAY_MS;
            let until = to_ms.min(day_end);
            self.roll(from);
            let ms = until - from;
            for e in entries {
                let rate = rates(&e.purpose).per_ms(e.state);
                self.total.add(&e.purpose, e.state, ms, rate);
                self.today.add(&e.purpose, e.state, ms, rate);
                if let Some(user) = &e.user {
                    self.users
                        .entry(user.clone())
                        .or_default()
                        .add(&e.purpose, e.state, ms, rate);
                }
            }
            self.counted_to_ms = until;
        }
        self.roll(self.counted_to_ms);
    }

    /// Starts a new day (and month) when `at_ms` is past the current ones.
    fn roll(&mut self, at_ms: u64) {
        let day = at_ms / DAY_MS;
        if day != self.day {
            self.day = day;
            self.today = Tally::default();
        }
        let period = month_of(at_ms);
        if period != self.period {
            self.period = period;
            self.users.clear();
        }
    }
}

/// The UTC calendar date (year, month, day) of a number of days since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil, for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// RFC 3339 UTC ("2026-11-30T09:02:00Z") of ms since the epoch, with ".fff" only when the
/// milliseconds are non-zero (the trace format's, and how the books say when they opened).
pub fn format_time(ms: u64) -> String {
    let (y, m, d) = civil_from_days((ms / DAY_MS) as i64);
    let r = ms % DAY_MS;
    let (h, min, s) = (r / 3_600_000, r / 60_000 % 60, r / 1000 % 60);
    let frac = format!(".{:03}", r % 1000);
    let frac = if r.is_multiple_of(1000) { "" } else { &frac };
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}{frac}Z")
}

/// `YYYY-MM` of a time in ms since the epoch (UTC).
pub fn month_of(ms: u64) -> String {
    let (y, m, _) = civil_from_days((ms / DAY_MS) as i64);
    format!("{y:04}-{m:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-30T00:00:00Z
    const MON: u64 = 1_795_996_800_000;

    fn rates(p: &str) -> Rates {
        match p {
            "rstudio" => Rates {
                hourly: 0.0832,
                paused_hourly: 0.0027,
            },
            _ => Rates::default(),
        }
    }

    fn entry(state: Use, user: Option<&str>) -> Entry {
        Entry {
            purpose: "rstudio".into(),
            state,
            user: user.map(str::to_owned),
        }
    }

    #[test]
    fn the_calendar_is_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(month_of(MON), "2026-11");
        assert_eq!(civil_from_days((MON / DAY_MS) as i64), (2026, 11, 30));
        assert_eq!(month_of(MON + DAY_MS), "2026-12");
        // 2024-02-29 exists.
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn an_hour_of_two_instances_costs_two_hours() {
        let mut l = Ledger::open(MON + 9 * 3_600_000);
        let entries = [
            entry(Use::Free, None),
            entry(Use::AssignedActive, Some("alice")),
        ];
        l.accrue(MON + 10 * 3_600_000, &entries, &rates);
        assert_eq!(l.total.get("rstudio", Use::Free).seconds, 3600.0);
        let all = l.total.sum(None);
        assert_eq!(all.seconds, 7200.0);
        assert!((all.cost - 2.0 * 0.0832).abs() < 1e-9);
        assert_eq!(l.users["alice"].sum(None).seconds, 3600.0);
        assert_eq!(l.today, l.total);
    }

    #[test]
    fn paused_instances_cost_their_volume() {
        let mut l = Ledger::open(MON);
        l.accrue(MON + 3_600_000, &[entry(Use::Paused, Some("bob"))], &rates);
        let a = l.total.get("rstudio", Use::Paused);
        assert!((a.cost - 0.0027).abs() < 1e-12);
        assert!((l.users["bob"].sum(None).cost - 0.0027).abs() < 1e-12);
    }

    #[test]
    fn midnight_starts_a_new_day_and_a_month_a_new_period() {
        // Two hours from 23:00 on the last day of November.
        let mut l = Ledger::open(MON + 23 * 3_600_000);
        l.accrue(
            MON + 25 * 3_600_000,
            &[entry(Use::AssignedIdle, Some("carol"))],
            &rates,
        );
        assert_eq!(l.total.sum(None).seconds, 7200.0);
        assert_eq!(l.today.sum(None).seconds, 3600.0, "only after midnight");
        assert_eq!(l.period, "2026-12");
        assert_eq!(l.users["carol"].sum(None).seconds, 3600.0);
        // Nothing counted twice, nothing when time does not move on.
        l.accrue(MON + 25 * 3_600_000, &[entry(Use::Free, None)], &rates);
        l.accrue(MON, &[entry(Use::Free, None)], &rates);
        assert_eq!(l.total.sum(None).seconds, 7200.0);
    }

    #[test]
    fn the_books_round_trip_through_json() {
        let mut l = Ledger::open(MON);
        l.accrue(MON + 1000, &[entry(Use::Launching, None)], &rates);
        let back: Ledger = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }
}
