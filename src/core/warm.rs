//! Warm policy: how many FREE (unassigned, warm) instances a pool keeps at a given moment.
//!
//! Everything here is a pure function of its arguments: time comes in as milliseconds since
//! the Unix epoch, and nothing reads a clock, does I/O or draws random numbers.

use serde::{Deserialize, Serialize};

/// Hours in a week: the number of hour-of-week bins.
pub const HOURS_PER_WEEK: usize = 168;

/// Longest gap, in whole missing hours, that [`History`] still counts as hours with zero
/// arrivals. A restart of the pool manager leaves a short gap while the pool was most likely
/// just quiet; a host down for a day says nothing about arrivals, so longer gaps are skipped.
pub const MAX_GAP_HOURS: u64 = 6;

const HOUR_MS: u64 = 3_600_000;
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const USE_DAYS: &str = "use mon, tue, wed, thu, fri, sat or sun";
const HH_MM: &str = "write HH:00 or HH, e.g. `08:00` or `8`";
const EXAMPLE: &str = "write it like `mon-fri 08:00-18:00`";
const DAYS_FIRST: &str = "write them before the hours, e.g. `mon-fri 08:00-18:00`";
const ONE_OR_RANGE: &str = "write one day like `mon` or a range like `mon-fri`";
const END_AFTER_START: &str = "the end must be after the start, e.g. `08:00-18:00`; \
    across midnight, write two ranges, e.g. `mon 22:00-24:00` and `tue 00:00-06:00`";

/// Hour of the week, 0 = Monday 00:00-01:00, 167 = Sunday 23:00, of `at_ms` shifted by
/// `utc_offset_minutes` (the Unix epoch, 1970-01-01, was a Thursday).
pub fn hour_of_week(at_ms: u64, utc_offset_minutes: i32) -> usize {
    let local = at_ms as i128 + utc_offset_minutes as i128 * 60_000;
    how_of_hour(local.div_euclid(HOUR_MS as i128))
}

/// Hour of week of an hour index counted from the epoch.
fn how_of_hour(hour: i128) -> usize {
    let day = (hour.div_euclid(24) + 3).rem_euclid(7); // day 0 was a Thursday; Monday = 0
    (day * 24 + hour.rem_euclid(24)) as usize
}

/// Hour-of-week bins of the hours overlapping `[from_ms, from_ms + span_ms]` (both ends
/// included) shifted by `offset_minutes`, at most one whole week of them.
fn bins(from_ms: u64, span_ms: u64, offset_minutes: i32) -> impl Iterator<Item = usize> {
    let start = from_ms as i128 + offset_minutes as i128 * 60_000;
    let first = start.div_euclid(HOUR_MS as i128);
    let last = (start + span_ms as i128).div_euclid(HOUR_MS as i128);
    (first..=last.min(first + HOURS_PER_WEEK as i128 - 1)).map(how_of_hour)
}

/// How a pool decides how many free instances to keep.
#[derive(Debug, Clone, PartialEq)]
pub enum WarmPolicy {
    /// The original: `min_free` around the clock.
    Fixed {
        /// Free instances to keep at all times.
        min_free: usize,
    },
    /// Minimum free per hour-of-week ranges; `otherwise` outside them. Where ranges overlap,
    /// the largest min_free wins.
    Schedule(Schedule),
    /// Learns arrivals per hour of week from [`History`].
    Forecast(Forecast),
}

/// Minimum free instances by hour of the week, in local time.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The ranges; where they overlap, the largest `min_free` wins.
    pub ranges: Vec<ScheduleRange>,
    /// Minimum free outside every range.
    pub otherwise: usize,
    /// Local time minus UTC, in minutes (e.g. 60 for UTC+01:00).
    pub utc_offset_minutes: i32,
}

impl Schedule {
    /// Minimum free at local hour-of-week `how`, without look-ahead.
    pub fn min_free_at(&self, how: usize) -> usize {
        let mins = self.ranges.iter().filter(|r| r.contains(how));
        mins.map(|r| r.min_free).max().unwrap_or(self.otherwise)
    }
}

/// Some days of the week, each from one whole hour to a later one, with a minimum of free.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRange {
    /// Days in the range, Monday first.
    pub days: [bool; 7],
    /// First hour of the day in the range (0 to 23).
    pub start_hour: u8,
    /// Hour of the day at which the range ends, not included (1 to 24).
    pub end_hour: u8,
    /// Minimum free instances during the range.
    pub min_free: usize,
}

impl ScheduleRange {
    /// Parses days and hours such as "mon-fri 08:00-18:00" (hours 8 to 17 included), plus the
    /// `min_free` given separately. Days: mon, tue, wed, thu, fri, sat, sun (any case), one day,
    /// a range that may wrap around the week ("fri-mon"), or a comma list ("mon,wed,fri" or
    /// "mon-wed,sat"). Hours: `HH` or `HH:00`, end up to 24:00 and after the start. Days alone
    /// ("sat-sun") mean the whole day. The error says what is wrong and how to write it.
    pub fn parse(days_and_hours: &str, min_free: usize) -> Result<ScheduleRange, String> {
        let text = days_and_hours.trim();
        let (days, hours) = match text.split_whitespace().collect::<Vec<_>>()[..] {
            [days, hours] => (days, hours),
            [days] if !days.starts_with(|c: char| c.is_ascii_digit()) => (days, "0-24"),
            [hours] => return Err(format!("`{hours}`: the days are missing: {DAYS_FIRST}")),
            _ => return Err(format!("`{text}`: expected days and hours: {EXAMPLE}")),
        };
        let (days, (start_hour, end_hour)) = (parse_days(days)?, parse_hours(hours)?);
        Ok(ScheduleRange {
            days,
            start_hour,
            end_hour,
            min_free,
        })
    }

    /// Whether hour-of-week `how` is in the range.
    pub fn contains(&self, how: usize) -> bool {
        let hour = (how % 24) as u8;
        how < HOURS_PER_WEEK
            && self.days[how / 24]
            && self.start_hour <= hour
            && hour < self.end_hour
    }
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let day = |name: &str| match DAYS.iter().position(|d| d.eq_ignore_ascii_case(name)) {
        Some(d) => Ok(d),
        None if name.is_empty() => Err(format!("`{text}`: a day is missing: {USE_DAYS}")),
        None => Err(format!("`{text}`: `{name}` is not a day: {USE_DAYS}")),
    };
    let mut days = [false; 7];
    for item in text.split(',') {
        let (mut d, last) = match item.split('-').collect::<Vec<_>>()[..] {
            [one] => (day(one)?, day(one)?),
            [first, last] => (day(first)?, day(last)?),
            _ => {
                return Err(format!(
                    "`{text}`: `{item}` is not a day or a range: {ONE_OR_RANGE}"
                ))
            }
        };
        days[d] = true;
        while d != last {
            d = (d + 1) % 7;
            days[d] = true;
        }
    }
    Ok(days)
}

fn parse_hours(text: &str) -> Result<(u8, u8), String> {
    let hours = text
        .split_once('-')
        .map(|(s, e)| (parse_hour(s), parse_hour(e)));
    let why = match hours {
        None => "hours need a start and an end: write them like `08:00-18:00`".to_string(),
        Some((Err(why), _)) | Some((_, Err(why))) => why,
        Some((Ok(24), _)) => "a range cannot start at 24:00: start from 00:00 to 23:00".into(),
        Some((Ok(start), Ok(end))) if end > start => return Ok((start, end)),
        Some(_) => END_AFTER_START.into(),
    };
    Err(format!("`{text}`: {why}"))
}

fn parse_hour(time: &str) -> Result<u8, String> {
    let (hour, minutes) = time.split_once(':').unwrap_or((time, "00"));
    let digits = !hour.is_empty() && hour.len() <= 2 && hour.bytes().all(|b| b.is_ascii_digit());
    let why = match hour.parse::<u8>() {
        Ok(h) if digits && h <= 24 && minutes == "00" => return Ok(h),
        Ok(h) if digits && h <= 24 => {
            format!("minutes must be 00, as ranges are whole hours: write `{h:02}:00`")
        }
        Ok(_) if digits => "hours go from 00 to 24: write e.g. `18:00`".into(),
        _ if time.is_empty() => return Err(format!("a time is missing: {HH_MM}")),
        _ => format!("not a time: {HH_MM}"),
    };
    Err(format!("`{time}`: {why}"))
}

/// Learns arrivals per hour of week and keeps enough free that, over a week, at most a given
/// share of users meet a cold start.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    /// Never keep fewer free than this (unless `max_free` or the pool's max is lower).
    pub floor: usize,
    /// Never keep more free than this (besides the pool's max).
    pub max_free: usize,
    /// The accepted share of a week's arrivals that find no free instance (e.g. 0.02).
    pub miss_probability: f64,
    /// How fast old weeks are forgotten: weight of the newest week in the average
    /// (0 < alpha <= 1), e.g. 0.3. Pass it to [`History::record_arrival`] and [`History::advance`].
    pub alpha: f64,
    /// Used for an hour of the week never observed yet (clamped to floor..=max_free).
    pub fallback: usize,
    /// How far ahead to look for rises, beyond the time to ready (ms), e.g. 15 min.
    pub lead_ms: u64,
}

/// What the pool has seen: arrivals (new assignments) per UTC hour of the week, averaged over
/// weeks.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct History {
    /// Average arrivals per hour-of-week bin; empty until the first hour is folded.
    avg: Vec<f64>,
    /// Weeks observed per hour-of-week bin.
    weeks: Vec<u32>,
    /// The hour being counted, as hours since the epoch.
    hour: Option<u64>,
    /// Arrivals so far in `hour`.
    count: u32,
}

impl History {
    /// Counts an arrival at `at_ms`, first moving the clock there as [`History::advance`] does.
    /// Arrivals are counted in absolute UTC hours; one in an hour before the current one counts
    /// into the current hour.
    pub fn record_arrival(&mut self, at_ms: u64, alpha: f64) {
        self.advance(at_ms, alpha);
        self.count = self.count.saturating_add(1);
    }

    /// Moves the clock to `now_ms` without an arrival (called every round). When this moves
    /// into a later hour, the finished hour's count is folded into its hour-of-week average
    /// (first observation: the count; later: avg += alpha * (count - avg)), and so is every
    /// whole hour in between, with zero arrivals, if there are at most [`MAX_GAP_HOURS`] of
    /// them (otherwise they are not observed at all). Never goes backwards. `alpha` is clamped
    /// to 0..=1 (NaN counts as 1).
    pub fn advance(&mut self, now_ms: u64, alpha: f64) {
        let hour = now_ms / HOUR_MS;
        let Some(current) = self.hour else {
            self.hour = Some(hour);
            return;
        };
        if hour <= current {
            return;
        }
        self.fold(current, self.count as f64, alpha);
        if hour - current - 1 <= MAX_GAP_HOURS {
            (current + 1..hour).for_each(|h| self.fold(h, 0.0, alpha));
        }
        self.hour = Some(hour);
        self.count = 0;
    }

    fn fold(&mut self, hour: u64, count: f64, alpha: f64) {
        let alpha = alpha.clamp(0.0, 1.0);
        let alpha = if alpha.is_nan() { 1.0 } else { alpha };
        self.avg.resize(HOURS_PER_WEEK, 0.0);
        self.weeks.resize(HOURS_PER_WEEK, 0);
        let how = how_of_hour(hour as i128);
        match self.weeks[how] {
            0 => self.avg[how] = count,
            _ => self.avg[how] += alpha * (count - self.avg[how]),
        }
        self.weeks[how] = self.weeks[how].saturating_add(1);
    }

    /// The average arrivals in UTC hour-of-week `how`, or None if never observed.
    pub fn rate(&self, how: usize) -> Option<f64> {
        let avg = self.avg.get(how).copied().unwrap_or(0.0);
        (self.observed(how) > 0).then_some(if avg.is_finite() { avg.max(0.0) } else { 0.0 })
    }

    /// Weeks observed for UTC hour-of-week `how`.
    pub fn observed(&self, how: usize) -> u32 {
        self.weeks.get(how).copied().unwrap_or(0)
    }
}

/// What the pool knows now, besides its history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Inputs {
    /// The time now, in ms since the Unix epoch.
    pub now_ms: u64,
    /// How long a new instance takes to be ready (the pool's usual time to ready).
    pub time_to_ready_ms: u64,
    /// The pool's maximum of instances.
    pub max: usize,
}

/// How many free instances to keep now. Always <= `inputs.max`.
///
/// - Fixed: `min_free`.
/// - Schedule: the largest `min_free` of the ranges containing any local hour that overlaps
///   the next `time_to_ready_ms`, else `otherwise`: a range starting within one time to ready
///   already counts, so instances are warm when it begins.
/// - Forecast: the [`plan`] of the week for W = max(time to ready, 60 s), its largest value
///   over the UTC hours overlapping `[now, now + W + lead_ms]` (or `fallback` for an hour
///   never observed, if that is more), clamped to `floor..=max_free` (where they conflict,
///   `max_free` wins).
pub fn target(policy: &WarmPolicy, history: &History, inputs: Inputs) -> usize {
    let wanted = match policy {
        WarmPolicy::Fixed { min_free } => *min_free,
        WarmPolicy::Schedule(s) => {
            bins(inputs.now_ms, inputs.time_to_ready_ms, s.utc_offset_minutes)
                .map(|how| s.min_free_at(how))
                .max()
                .unwrap_or(s.otherwise)
        }
        WarmPolicy::Forecast(f) => {
            let window = inputs.time_to_ready_ms.max(60_000);
            let plan = plan(history, window, f.miss_probability);
            let mut wanted = 0;
            for how in bins(inputs.now_ms, window.saturating_add(f.lead_ms), 0) {
                wanted = wanted.max(plan[how].unwrap_or(f.fallback));
            }
            let high = f.max_free.min(inputs.max);
            wanted.clamp(f.floor.min(high), high)
        }
    };
    wanted.min(inputs.max)
}

/// How many free instances to keep in each UTC hour of the week (`None`: never observed) so
/// that at most `miss_probability` of the week's expected arrivals find none free, at the
/// least cost in idle instance-hours.
///
/// An arrival in hour `b` (rate `r` an hour) finds none of `k` free instances when `k` others
/// arrived in the `window_ms` before it (each takes one; a replacement is ready a window
/// later): with Poisson arrivals, the others are Poisson with mean `mu = r * window / 1 h`,
/// so the hour's expected misses are `r * P(N >= k)`. Each instance kept free in an hour
/// costs one idle instance-hour and saves `r * P(N = k)` misses; the plan adds them where
/// they save the most, until the week's misses are within `miss_probability` of its
/// arrivals.
pub fn plan(history: &History, window_ms: u64, miss_probability: f64) -> Vec<Option<usize>> {
    let mut keep: Vec<Option<usize>> = (0..HOURS_PER_WEEK)
        .map(|how| history.rate(how).map(|_| 0))
        .collect();
    let share = window_ms as f64 / HOUR_MS as f64;
    let rates: Vec<f64> = (0..HOURS_PER_WEEK)
        .map(|how| history.rate(how).unwrap_or(0.0))
        .collect();
    let arrivals: f64 = rates.iter().sum();
    if arrivals.is_nan() || arrivals <= 0.0 || miss_probability.is_nan() {
        return keep;
    }
    let budget = arrivals * miss_probability.clamp(0.0, 1.0);
    // Per hour: the chance that exactly `keep` others arrived within the window, P(N = k).
    let mut pmf: Vec<f64> = rates.iter().map(|r| (-r * share).exp()).collect();
    let mut misses = arrivals;
    // A handful of hundreds of steps for a team's week; bounded for any history.
    for _ in 0..HOURS_PER_WEEK * 64 {
        if misses <= budget {
            break;
        }
        let best = (0..HOURS_PER_WEEK)
            .filter(|&how| keep[how].is_some())
            .map(|how| (how, rates[how] * pmf[how]))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let Some((how, saved)) = best.filter(|(_, saved)| *saved > 1e-12) else {
            break;
        };
        let k = keep[how].map_or(0, |k| k + 1);
        keep[how] = Some(k);
        misses -= saved;
        pmf[how] *= rates[how] * share / (k as f64);
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MON: u64 = 1_795_996_800_000; // 2026-11-30T00:00:00Z, a Monday
    const MIN: u64 = 60_000;
    const H: u64 = HOUR_MS;
    const WEEK: u64 = 168 * H;

    fn range(text: &str, min_free: usize) -> ScheduleRange {
        ScheduleRange::parse(text, min_free).unwrap()
    }

    /// The days of a parsed range, Monday first: `x` in, `.` out.
    fn days(text: &str) -> String {
        String::from_iter(range(text, 1).days.map(|d| if d { 'x' } else { '.' }))
    }

    fn err(text: &str) -> String {
        ScheduleRange::parse(text, 1).unwrap_err()
    }

    fn history_from(rates: &[Option<f64>]) -> History {
        let avg = rates.iter().map(|r| r.unwrap_or(0.0)).collect();
        let weeks = rates.iter().map(|r| r.is_some() as u32).collect();
        History {
            avg,
            weeks,
            hour: None,
            count: 0,
        }
    }

    fn inputs(now_ms: u64, time_to_ready_ms: u64, max: usize) -> Inputs {
        Inputs {
            now_ms,
            time_to_ready_ms,
            max,
        }
    }

    fn schedule(ranges: Vec<ScheduleRange>, otherwise: usize, offset: i32) -> WarmPolicy {
        let utc_offset_minutes = offset;
        WarmPolicy::Schedule(Schedule {
            ranges,
            otherwise,
            utc_offset_minutes,
        })
    }

    fn forecast(floor: usize, max_free: usize, p: f64, fallback: usize, lead_ms: u64) -> Forecast {
        let (miss_probability, alpha) = (p, 0.3);
        Forecast {
            floor,
            max_free,
            miss_probability,
            alpha,
            fallback,
            lead_ms,
        }
    }

    #[test]
    fn hour_of_week_of_known_dates() {
        assert_eq!(hour_of_week(MON + 9 * H + 30 * MIN, 0), 9);
        assert_eq!(hour_of_week(MON - MIN, 0), 167); // Sunday 23:59
        assert_eq!(hour_of_week(MON + 3 * WEEK + 134 * H, 0), 134); // Saturday 14:00
        assert_eq!(hour_of_week(0, 0), 3 * 24); // Thursday 00:00
        assert_eq!(hour_of_week(MON - 30 * MIN, 60), 0); // Monday 00:30 at UTC+1
        assert_eq!(hour_of_week(MON + 30 * MIN, -60), 167); // Sunday 23:30 at UTC-1
        assert_eq!(hour_of_week(0, -60), 2 * 24 + 23); // before the epoch: Wednesday 23:00
        assert_eq!(hour_of_week(MON, 5 * 60 + 30), 5);
    }

    #[test]
    fn parses_good_ranges() {
        let r = range("mon-fri 08:00-18:00", 4);
        assert_eq!((r.start_hour, r.end_hour, r.min_free), (8, 18, 4));
        assert_eq!(days("mon-fri 08:00-18:00"), "xxxxx..");
        assert!(r.contains(8) && r.contains(17) && r.contains(4 * 24 + 12));
        assert!(!r.contains(7) && !r.contains(18) && !r.contains(5 * 24 + 10));
        assert!(!r.contains(168));
        assert_eq!(days("Mon,WED,fri 9-17"), "x.x.x..");
        assert_eq!(days("mon-tue,sat 0:00-24:00"), "xx...x.");
        assert_eq!(range("  sat-sun ", 2), range("sat-sun 00:00-24:00", 2));
        assert_eq!(range("thu 23-24", 1), range("thu 23:00-24:00", 1));
    }

    #[test]
    fn rejects_bad_ranges_and_says_how_to_write_them() {
        let fry = "`mon-fry`: `fry` is not a day: use mon, tue, wed, thu, fri, sat or sun";
        assert_eq!(err("mon-fry 08:00-18:00"), fry);
        let cases = [
            " => ``: expected days and hours: write it like `mon-fri 08:00-18:00`",
            "mon fri 08-10 => write it like `mon-fri 08:00-18:00`",
            "08:00-18:00 => `08:00-18:00`: the days are missing: write them before the hours, e.g.",
            "mon-tue-wed 8-9 => `mon-tue-wed` is not a day or a range: write one day like `mon` or",
            "mon,,fri 8-9 => `mon,,fri`: a day is missing: use mon, tue, wed, thu, fri, sat or sun",
            "monday 8-9 => `monday` is not a day: use mon, tue, wed, thu, fri, sat or sun",
            "mon 08:00 => `08:00`: hours need a start and an end: write them like `08:00-18:00`",
            "mon 8-18:30 => `18:30`: minutes must be 00, as ranges are whole hours: write `18:00`",
            "mon 8h-18 => `8h-18`: `8h`: not a time: write HH:00 or HH, e.g. `08:00` or `8`",
            "mon 08:00- => `08:00-`: a time is missing: write HH:00 or HH",
            "mon 08:00-25:00 => `25:00`: hours go from 00 to 24: write e.g. `18:00`",
            "mon 24:00-24:00 => a range cannot start at 24:00: start from 00:00 to 23:00",
            "mon 18:00-08:00 => `18:00-08:00`: the end must be after the start, e.g. `08:00-18:00`",
            "mon 08:00-08:00 => the end must be after the start",
        ];
        for case in cases {
            let (text, message) = case.split_once(" => ").unwrap();
            assert!(err(text).contains(message), "{text:?} gave {:?}", err(text));
        }
    }

    #[test]
    fn day_ranges_wrap_around_the_week() {
        let r = range("fri-mon 10:00-12:00", 1);
        assert_eq!(days("fri-mon 10:00-12:00"), "x...xxx");
        let has = |d: usize, hours: [usize; 4]| hours.map(|h| r.contains(d * 24 + h));
        for d in [4, 5, 6, 0] {
            assert_eq!(has(d, [9, 10, 11, 12]), [false, true, true, false]);
        }
        assert!((1..4).all(|d| !r.contains(d * 24 + 10)));
        assert_eq!(days("sun-mon 0-1"), "x.....x");
        assert_eq!(days("wed-wed 0-1"), "..x....");
        assert_eq!(days("tue-mon 0-1"), "xxxxxxx");
    }

    #[test]
    fn schedule_takes_the_largest_and_looks_ahead() {
        let ranges = vec![range("mon-fri 08:00-18:00", 5), range("mon 12:00-14:00", 8)];
        let policy = schedule(ranges, 1, 0);
        let at = |now: u64, ttr: u64| target(&policy, &History::default(), inputs(now, ttr, 6));
        assert_eq!(at(MON + 7 * H + 50 * MIN, 5 * MIN), 1);
        assert_eq!(at(MON + 7 * H + 50 * MIN, 10 * MIN), 5); // starts in 10 min: warm now
        assert_eq!(at(MON + 7 * H + 50 * MIN, 15 * MIN), 5);
        assert_eq!(at(MON + 17 * H + 59 * MIN, MIN / 2), 5);
        assert_eq!(at(MON + 18 * H, 5 * MIN), 1);
        assert_eq!(at(MON + 12 * H, 5 * MIN), 6); // 8 wins, clamped to max 6
        assert_eq!(at(MON + 5 * 24 * H + 10 * H, 5 * MIN), 1); // Saturday
        let local = schedule(vec![range("mon 8-9", 3)], 0, 60);
        let at = |now: u64| target(&local, &History::default(), inputs(now, 0, 9));
        assert_eq!((at(MON + 7 * H), at(MON + 8 * H)), (3, 0));
        let fixed = WarmPolicy::Fixed { min_free: 3 };
        let at = |max: usize| target(&fixed, &History::default(), inputs(MON, 0, max));
        assert_eq!((at(10), at(2)), (3, 2));
    }

    #[test]
    fn history_folds_hours_fills_short_gaps_and_averages() {
        let (t0, mut h) = (MON + 9 * H, History::default());
        (0..3).for_each(|_| h.record_arrival(t0 + 10 * MIN, 0.5));
        h.advance(t0 + 30 * MIN, 0.5);
        assert_eq!((h.rate(9), h.observed(9)), (None, 0)); // the hour is not finished
        h.advance(t0 + H + 1, 0.5);
        assert_eq!((h.rate(9), h.observed(9), h.rate(10)), (Some(3.0), 1, None));
        h.advance(t0 + 4 * H, 0.5); // 10 ends with no arrival, 11 and 12 are zero-filled
        assert_eq!([10, 11, 12].map(|how| h.rate(how)), [Some(0.0); 3]);
        assert_eq!(h.rate(13), None);
        h.advance(t0 + 12 * H, 0.5); // from 13 to 21: 7 missing hours, not observed
        assert_eq!([13, 14, 20].map(|how| h.rate(how)), [Some(0.0), None, None]);
        h.advance(t0 + 19 * H, 0.5); // from 21 to 28: 6 missing hours, zero-filled
        assert_eq!([22, 27].map(|how| h.rate(how)), [Some(0.0); 2]);
        assert_eq!(h.rate(28), None);
        h.record_arrival(t0 + WEEK + 5 * MIN, 0.5); // a week later, after a long gap
        h.record_arrival(t0, 0.5); // out of order: counts into the current hour
        h.advance(t0, 0.5); // backwards: nothing happens
        h.advance(t0 + WEEK + H, 0.5);
        assert_eq!(h.rate(9), Some(3.0 + 0.5 * (2.0 - 3.0))); // alpha 0.5
        assert_eq!(h.observed(9), 2);
        assert_eq!((h.rate(8), h.rate(168), h.observed(168)), (None, None, 0));
    }

    #[test]
    fn history_round_trips_through_json() {
        let mut h = History::default();
        let rt = |h: &History| serde_json::from_str::<History>(&serde_json::to_string(h).unwrap());
        assert_eq!(rt(&h).unwrap(), h);
        (0..5).for_each(|i| h.record_arrival(MON + i * 40 * MIN, 0.5));
        h.advance(MON + WEEK + 30 * MIN, 0.5);
        h.record_arrival(MON + WEEK + 31 * MIN, 0.5);
        assert_eq!(rt(&h).unwrap(), h);
        assert!(serde_json::to_string(&h).unwrap().len() < 2_000);
    }

    #[test]
    fn forecast_without_history_keeps_the_fallback_clamped() {
        let at = |floor: usize, fallback: usize, max: usize| {
            let policy = WarmPolicy::Forecast(forecast(floor, 10, 0.05, fallback, 15 * MIN));
            target(&policy, &History::default(), inputs(MON, 5 * MIN, max))
        };
        assert_eq!((at(0, 3, 20), at(0, 30, 20)), (3, 10));
        assert_eq!((at(2, 0, 20), at(2, 3, 1)), (2, 1));
    }

    #[test]
    fn forecast_warms_up_before_a_learned_peak() {
        let mut rates = [Some(0.0); HOURS_PER_WEEK];
        rates[9] = Some(30.0); // Monday 09:00 UTC: 30 arrivals an hour
        let h = history_from(&rates);
        let policy = WarmPolicy::Forecast(forecast(1, 20, 0.05, 0, 15 * MIN));
        let at = |now: u64| target(&policy, &h, inputs(now, 5 * MIN, 50));
        let (before_peak, sunday_night) = (at(MON + 8 * H + 55 * MIN), at(MON - 21 * H));
        // mu = 30 * 5 / 60 = 2.5: 30 P(N >= 6) = 1.26 is the first within 5 % of 30.
        assert_eq!((before_peak, sunday_night), (6, 1));
        assert!(before_peak > sunday_night);
        assert_eq!(at(MON + 8 * H), 1); // 08:00 + 20 min does not reach 09:00 yet
    }

    /// Expected misses of a week under a plan.
    fn misses(h: &History, plan: &[Option<usize>], window_ms: u64) -> f64 {
        (0..HOURS_PER_WEEK)
            .map(|how| {
                let r = h.rate(how).unwrap_or(0.0);
                let mu = r * window_ms as f64 / H as f64;
                let k = plan[how].unwrap_or(0);
                let (mut p, mut below) = ((-mu).exp(), 0.0);
                for i in 0..k {
                    below += p;
                    p *= mu / (i + 1) as f64;
                }
                r * (1.0 - below).max(0.0)
            })
            .sum()
    }

    #[test]
    fn the_plan_keeps_misses_within_budget_and_spends_where_arrivals_are() {
        let mut rates = [Some(0.0); HOURS_PER_WEEK];
        for day in 0..5 {
            for hour in 8..18 {
                rates[day * 24 + hour] = Some(if hour == 9 { 12.0 } else { 3.0 });
            }
            rates[day * 24 + 2] = Some(0.05); // a rare night owl
        }
        rates[167] = None; // never seen
        let h = history_from(&rates);
        let arrivals: f64 = (0..HOURS_PER_WEEK).filter_map(|b| h.rate(b)).sum();
        let plan = plan(&h, 90_000, 0.02);
        assert!(misses(&h, &plan, 90_000) <= 0.02 * arrivals + 1e-9);
        assert_eq!(plan[167], None);
        // More at the peak than in the afternoon, none at night or on the weekend.
        assert!(plan[9] > plan[14] && plan[14] >= Some(1), "{plan:?}");
        assert_eq!((plan[2], plan[5 * 24 + 10]), (Some(0), Some(0)));
        // Without one instance anywhere it keeps, the week misses more than allowed.
        for how in (0..HOURS_PER_WEEK).filter(|&b| plan[b].unwrap_or(0) > 0) {
            let mut fewer = plan.clone();
            fewer[how] = fewer[how].map(|k| k - 1);
            let over = misses(&h, &fewer, 90_000) - 0.02 * arrivals;
            assert!(over > -0.5, "hour {how} was not needed ({over})");
        }
    }

    fn arb_history() -> impl Strategy<Value = History> {
        let rates = prop::collection::vec(prop::option::of(0.0f64..200.0), HOURS_PER_WEEK);
        rates.prop_map(|r| history_from(&r))
    }

    fn arb_forecast() -> impl Strategy<Value = Forecast> {
        let fields = (0usize..20, 0usize..60, 0.0f64..1.0, 0usize..80, 0u64..2 * H);
        fields.prop_map(|(floor, max, p, fallback, lead)| forecast(floor, max, p, fallback, lead))
    }

    fn arb_inputs() -> impl Strategy<Value = Inputs> {
        let ttr = prop_oneof![4 => 0u64..2 * H, 1 => any::<u64>()];
        (0u64..4_000_000_000_000, ttr, 0usize..100).prop_map(|(now, t, max)| inputs(now, t, max))
    }

    fn arb_policy() -> impl Strategy<Value = WarmPolicy> {
        let hours = (0u8..24).prop_flat_map(|s| (Just(s), s + 1..=24));
        let range = (0..7usize, 0..7usize, hours, 0usize..50).prop_map(|(a, b, (s, e), min)| {
            ScheduleRange::parse(&format!("{}-{} {s}-{e}", DAYS[a], DAYS[b]), min).unwrap()
        });
        let ranges = prop::collection::vec(range, 0..4);
        let schedules = (ranges, 0usize..50, -720i32..=840).prop_map(|(r, o, t)| schedule(r, o, t));
        let fixed = (0usize..200).prop_map(|min_free| WarmPolicy::Fixed { min_free });
        let forecasts = arb_forecast().prop_map(WarmPolicy::Forecast);
        prop_oneof![fixed, schedules, forecasts]
    }

    proptest! {
        #[test]
        fn target_never_exceeds_max(policy in arb_policy(), h in arb_history(), i in arb_inputs()) {
            prop_assert!(target(&policy, &h, i) <= i.max);
        }

        #[test]
        fn forecast_stays_within_floor_and_max_free(
            f in arb_forecast(), h in arb_history(), i in arb_inputs(),
        ) {
            let t = target(&WarmPolicy::Forecast(f.clone()), &h, i);
            prop_assert!(f.floor.min(f.max_free).min(i.max) <= t && t <= f.max_free.min(i.max));
        }

        #[test]
        fn fixed_is_constant_in_time(
            min_free in 0usize..200, h in arb_history(), i in arb_inputs(), later in any::<u64>(),
        ) {
            let (policy, other) = (WarmPolicy::Fixed { min_free }, Inputs { now_ms: later, ..i });
            prop_assert_eq!(target(&policy, &h, i), target(&policy, &h, other));
        }

        #[test]
        fn the_plan_meets_its_budget(
            rates in prop::collection::vec(prop::option::of(0.0f64..40.0), HOURS_PER_WEEK),
            window in 60_000u64..600_000,
            p in 0.001f64..1.0,
        ) {
            let h = history_from(&rates);
            let plan = plan(&h, window, p);
            let arrivals: f64 = (0..HOURS_PER_WEEK).filter_map(|b| h.rate(b)).sum();
            prop_assert!(misses(&h, &plan, window) <= p * arrivals + 1e-6);
            for how in 0..HOURS_PER_WEEK {
                // Unseen hours are the fallback's; hours without arrivals keep nothing.
                prop_assert_eq!(plan[how].is_some(), rates[how].is_some());
                if rates[how] == Some(0.0) {
                    prop_assert_eq!(plan[how], Some(0));
                }
            }
        }

        #[test]
        fn forecast_rises_as_miss_probability_falls(
            f in arb_forecast(), h in arb_history(), i in arb_inputs(), lower in 0.0f64..1.0,
        ) {
            let stricter = Forecast { miss_probability: f.miss_probability * lower, ..f.clone() };
            let (strict, loose) = (WarmPolicy::Forecast(stricter), WarmPolicy::Forecast(f));
            prop_assert!(target(&strict, &h, i) >= target(&loose, &h, i));
        }

        #[test]
        fn history_never_panics_and_rates_stay_sane(
            ops in prop::collection::vec(
                (any::<bool>(), prop_oneof![9 => 0u64..5 * WEEK, 1 => any::<u64>()]), 0..200,
            ),
            alpha in prop_oneof![0.0f64..=1.0, Just(f64::NAN), Just(-1.0), Just(7.0)],
        ) {
            let mut h = History::default();
            for (arrival, at) in ops {
                if arrival { h.record_arrival(at, alpha) } else { h.advance(at, alpha) }
            }
            for how in 0..=HOURS_PER_WEEK {
                prop_assert!(h.rate(how).is_none_or(|r| r.is_finite() && r >= 0.0));
                prop_assert_eq!(h.rate(how).is_some(), h.observed(how) > 0);
            }
        }
    }
}
