//! Workload traces for the simulator: who asks for an RStudio workspace, when,
//! when they are active in it, and when they leave.
//!
//! # Trace format
//!
//! A trace is text with one session per line, as JSON lines. Blank lines and
//! lines starting with `#` are ignored. Example:
//!
//! ```text
//! # Monday morning
//! {"user": "alice", "purpose": "rstudio", "at": "2026-11-30T09:02:00Z", "active": [[0, 3600], [4200, 5400]], "end": 5400}
//! {"user": "bob", "at": 1796029920, "end": 1800}
//! {"user": "carol", "at": "2026-11-30T10:15:00.250+01:00", "active": [[60, 900.5]]}
//! ```
//!
//! Fields of a session line (any other field is an error):
//!
//! - `user` (required): 1 to 128 characters of ASCII letters, digits and `._@-`.
//! - `purpose` (optional string): absent or `null` means the pool's default purpose.
//! - `at` (required): when the user asks for a workspace, either an RFC 3339
//!   timestamp `YYYY-MM-DDTHH:MM:SS[.fff]Z` (a numeric offset like `+01:00`
//!   is converted to UTC) or seconds since the Unix epoch (integer or
//!   fractional). It must lie between 1970 and the end of year 9999.
//! - `active` (optional): periods of user activity as `[from, to]` seconds
//!   after `at` (fractions allowed, kept to the millisecond), in time order,
//!   not overlapping (touching is fine), `from < to`, all within `[0, end]`.
//!   Default: `[[0, end]]` (no period when `end` is 0).
//! - `end` (optional when `active` is given): seconds after `at` when the user
//!   leaves (closes the tab), `>= 0`. Default: the end of the last active period.
//!
//! At least one of `active` and `end` is required. [`to_line`] writes this
//! format back, always with `active` and `end`.
//!
//! Sessions can also be rebuilt from the server's JSON audit log
//! ([`from_audit`]) or drawn from a model of an analytics team ([`synthetic`]).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;

/// Latest time a trace may hold: 9999-12-31T23:59:59.999Z, in ms since the epoch.
const MAX_MS: u64 = 253_402_300_799_999;
const DAY_MS: u64 = 86_400_000;
const FIELDS: [&str; 5] = ["user", "purpose", "at", "active", "end"];
const EXAMPLE: &str = r#"{"user": "alice", "at": "2026-11-30T09:00:00Z", "end": 3600}"#;
const ADD_END: &str = "add \"end\": SECONDS after `at` when the user leaves";
const AT_FORMS: &str = "a time like \"2026-11-30T09:00:00Z\" or seconds since the epoch";
const TIME_HINT: &str = "write RFC 3339 like 2026-11-30T09:00:00Z";

/// One user's visit: asks for a workspace, is active in some periods, leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// Who asks.
    pub user: String,
    /// Purpose asked for; `None` for the pool's default purpose.
    pub purpose: Option<String>,
    /// When the user asks, ms since the Unix epoch.
    pub at_ms: u64,
    /// Active periods, ms after `at_ms`.
    pub active: Vec<(u64, u64)>,
    /// When the user leaves, ms after `at_ms`.
    pub end_ms: u64,
}

/// A line of input that could not be used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// Line number, counted from 1.
    pub line: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for LineError {}

/// Parses a trace. A bad line is reported with its number and skipped; every other line is kept. Sessions are returned sorted by at_ms (stable for equal times).
pub fn parse(text: &str) -> (Vec<Session>, Vec<LineError>) {
    let (mut sessions, mut errors) = (Vec::new(), Vec::new());
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Ok(s) => sessions.push(s),
            Err(message) => errors.push(LineError {
                line: i + 1,
                message,
            }),
        }
    }
    sessions.sort_by_key(|s| s.at_ms);
    (sessions, errors)
}

/// What a JSON value is, in words ("nothing" when absent).
fn kind(v: Option<&Value>) -> &'static str {
    match v {
        None | Some(Value::Null) => "nothing",
        Some(Value::Bool(_)) => "a boolean",
        Some(Value::Number(_)) => "a number",
        Some(Value::String(_)) => "a string",
        Some(Value::Array(_)) => "a list",
        Some(Value::Object(_)) => "an object",
    }
}

fn check_user(u: &str) -> Result<(), String> {
    let n = u.chars().count();
    let odd = u
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !"._@-".contains(*c));
    match (n, odd) {
        (0, _) => Err("is empty: write the user's name".into()),
        (129.., _) => Err(format!("is {n} characters long: use at most 128")),
        (_, Some(c)) => Err(format!(
            "`{u}` contains {c:?}: use only ASCII letters, digits and ._@-"
        )),
        _ => Ok(()),
    }
}

/// Seconds (a JSON integer or fraction) as ms, rounded, within [0, MAX_MS].
fn seconds(v: &Value) -> Result<u64, String> {
    let Value::Number(n) = v else {
        return Err(format!("expected seconds, found {}", kind(Some(v))));
    };
    let too_big = || format!("{n} seconds is after year 9999: write a smaller number");
    match (n.as_u64(), n.as_f64()) {
        (Some(s), _) => s
            .checked_mul(1000)
            .filter(|ms| *ms <= MAX_MS)
            .ok_or_else(too_big),
        (_, Some(f)) if f < 0.0 => Err(format!("{n} is negative: write seconds >= 0")),
        (_, Some(f)) if f * 1000.0 <= MAX_MS as f64 => Ok((f * 1000.0).round() as u64),
        _ => Err(too_big()),
    }
}

/// ms as seconds, with as few decimals as needed.
fn secs(ms: u64) -> String {
    let s = format!("{}.{:03}", ms / 1000, ms % 1000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn parse_line(line: &str) -> Result<Session, String> {
    let obj = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(m)) => m,
        other => {
            let found =
                other.map_or_else(|e| e.to_string(), |v| format!("found {}", kind(Some(&v))));
            return Err(format!(
                "not a JSON object: expected one session like {EXAMPLE} ({found})"
            ));
        }
    };
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        let known = FIELDS.join(", ");
        return Err(format!("unknown field `{k}`: known fields are {known}"));
    }
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let expected =
        |k: &str, what: &str| Err(format!("`{k}`: expected {what}, found {}", kind(get(k))));
    let user = match get("user") {
        Some(Value::String(u)) => u.clone(),
        _ => return expected("user", "a name like \"alice\""),
    };
    check_user(&user).map_err(|e| format!("`user` {e}"))?;
    let purpose = match get("purpose") {
        None => None,
        Some(Value::String(p)) => Some(p.clone()),
        _ => return expected("purpose", "a string or nothing"),
    };
    let at_ms = match get("at") {
        Some(Value::String(s)) => {
            parse_time(s).map_err(|e| format!("`at`: {e} or seconds since the epoch"))?
        }
        Some(v @ Value::Number(_)) => seconds(v).map_err(|e| format!("`at`: {e}"))?,
        _ => return expected("at", AT_FORMS),
    };
    let items: &[Value] = match get("active") {
        None => &[],
        Some(Value::Array(items)) => items,
        _ => return expected("active", "a list of [from, to] periods"),
    };
    let mut active: Vec<(u64, u64)> = Vec::new();
    for item in items {
        let Some([a, b]) = item.as_array().map(Vec::as_slice) else {
            return Err(format!(
                "`active`: {item} is not a period: write [from, to] in seconds after `at`"
            ));
        };
        let shown = format!("[{a}, {b}]");
        let sec = |v| seconds(v).map_err(|e| format!("`active`: period {shown}: {e}"));
        let (from, to) = (sec(a)?, sec(b)?);
        if to <= from {
            let what = ["is empty", "ends before it starts"][usize::from(to < from)];
            return Err(format!(
                "`active`: period {shown} {what}: write [from, to] with from < to"
            ));
        }
        if active.last().is_some_and(|p| from < p.1) {
            return Err(format!("`active`: period {shown} starts before the one before it ends: list periods in time order, without overlaps"));
        }
        active.push((from, to));
    }
    let end_ms = match (get("end"), active.last()) {
        (Some(v), _) => seconds(v).map_err(|e| format!("`end`: {e}"))?,
        (None, Some(p)) => p.1,
        (None, None) if get("active").is_some() => {
            return Err(format!("`active` is empty and `end` is missing: {ADD_END}"))
        }
        (None, None) => return Err(format!("neither `active` nor `end` is given: {ADD_END}")),
    };
    if let Some(p) = active.iter().find(|p| p.1 > end_ms) {
        let (a, b, e) = (secs(p.0), secs(p.1), secs(end_ms));
        return Err(format!("`active`: period [{a}, {b}] ends after `end` ({e}): end periods by the time the user leaves"));
    }
    if at_ms + end_ms > MAX_MS {
        return Err("`end`: the session would end after year 9999: write a smaller `end`".into());
    }
    if get("active").is_none() && end_ms > 0 {
        active.push((0, end_ms));
    }
    Ok(Session {
        user,
        purpose,
        at_ms,
        active,
        end_ms,
    })
}

/// One session as a trace line (what `parse` reads back to the same session; `at` written as RFC 3339 with milliseconds only when non-zero).
pub fn to_line(s: &Session) -> String {
    let json = |t: &str| serde_json::to_string(t).unwrap_or_default();
    let purpose = s
        .purpose
        .as_ref()
        .map(|p| format!(", \"purpose\": {}", json(p)));
    let active: Vec<String> = s
        .active
        .iter()
        .map(|p| format!("[{}, {}]", secs(p.0), secs(p.1)))
        .collect();
    format!(
        "{{\"user\": {}{}, \"at\": \"{}\", \"active\": [{}], \"end\": {}}}",
        json(&s.user),
        purpose.unwrap_or_default(),
        format_time(s.at_ms),
        active.join(", "),
        secs(s.end_ms)
    )
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The calendar date of a day number, as the parser's numbers.
fn civil(days: i64) -> (i64, i64, i64) {
    let (y, m, d) = crate::core::ledger::civil_from_days(days);
    (y, i64::from(m), i64::from(d))
}

pub use crate::core::ledger::format_time;

/// Whether `b` has the shape of `template`: `0` a digit, `+` a sign, `T` a `T` or `t`, others themselves.
fn fits(b: &[u8], template: &str) -> bool {
    b.len() == template.len()
        && template.bytes().zip(b).all(|(t, c)| match t {
            b'0' => c.is_ascii_digit(),
            b'+' => *c == b'+' || *c == b'-',
            _ => c.eq_ignore_ascii_case(&t),
        })
}

/// The number written by the ASCII digits `b[i..i + n]`, which the caller has checked.
fn num(b: &[u8], i: usize, n: usize) -> i64 {
    b[i..i + n]
        .iter()
        .fold(0, |acc, c| acc * 10 + i64::from(c - b'0'))
}

/// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.fff]` then `Z` or an offset like `+01:00`) into ms since the epoch; digits past milliseconds are dropped. Times before 1970 or after year 9999 are errors.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = |why: &str| Err(format!("`{s}` is not a date ({why}): {TIME_HINT}"));
    let b = s.as_bytes();
    if !fits(&b[..b.len().min(19)], "0000-00-00T00:00:00") {
        return bad("expected YYYY-MM-DDTHH:MM:SS");
    }
    let (frac, zone) = match s[19..].strip_prefix('.') {
        Some(r) => r.split_at(r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len())),
        None => ("", &s[19..]),
    };
    if frac.is_empty() && zone.len() + 19 < s.len() {
        return bad("expected digits after the `.`");
    }
    let z = zone.as_bytes();
    let offset = match zone {
        "Z" | "z" => 0,
        _ if fits(z, "+00:00") && num(z, 1, 2) < 24 && num(z, 4, 2) < 60 => {
            (num(z, 1, 2) * 60 + num(z, 4, 2)) * if z[0] == b'-' { -1 } else { 1 }
        }
        _ => return bad("expected Z or an offset like +01:00 at the end"),
    };
    let (y, mo, d) = (num(b, 0, 4), num(b, 5, 2), num(b, 8, 2));
    let (h, mi, sec) = (num(b, 11, 2), num(b, 14, 2), num(b, 17, 2));
    let days = days_from_civil(y, mo, d);
    if !(1..=12).contains(&mo) || civil(days) != (y, mo, d) {
        return bad(&format!("{y:04}-{mo:02}-{d:02} does not exist"));
    }
    if h > 23 || mi > 59 || sec > 59 {
        return bad(&format!("{h:02}:{mi:02}:{sec:02} is not a time of day"));
    }
    let ms = num(format!("{frac:0<3}").as_bytes(), 0, 3);
    let total = days * DAY_MS as i64 + ((h * 60 + mi - offset) * 60 + sec) * 1000 + ms;
    match u64::try_from(total) {
        Err(_) => Err(format!(
            "`{s}` is before 1970-01-01T00:00:00Z: write a later time"
        )),
        Ok(t) if t > MAX_MS => Err(format!("`{s}` is after year 9999: write an earlier time")),
        Ok(t) => Ok(t),
    }
}

/// Turns audit events into sessions: a session starts at a user's `assign` or `resume`, and ends at the next `pause`, `cull`, `delete` or `terminate` of the same instance (or of that user, when instance is missing). A session ended by `pause` or `cull` (idle) is taken as active from its start until `idle_timeout_ms` before its end (at least 0 long); one ended by `delete`/`terminate` is active until its end. Sessions still open at the end of the log end at the last event's time. Returns sessions sorted by start, and errors for bad audit lines.
///
/// Only JSON lines with `"target": "audit"` are read; other lines are skipped
/// silently, and so are event kinds other than those above. An `assign` or
/// `resume` while a session of the same instance (or user) is open continues
/// that session. An `assign` or `resume` without `user` or `purpose` takes them
/// from the instance's last `assign`/`resume`.
pub fn from_audit(text: &str, idle_timeout_ms: u64) -> (Vec<Session>, Vec<LineError>) {
    let close = |(_, mut s): (Option<String>, Session), end: u64, idle: bool| {
        s.end_ms = end.saturating_sub(s.at_ms);
        let len = s
            .end_ms
            .saturating_sub(if idle { idle_timeout_ms } else { 0 });
        s.active = if len > 0 { vec![(0, len)] } else { vec![] };
        s
    };
    let (mut open, mut done, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let mut known = BTreeMap::<String, (Option<String>, Option<String>)>::new();
    let mut last = 0;
    for (i, raw) in text.lines().enumerate() {
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(raw.trim()) else {
            continue;
        };
        if obj.get("target").and_then(Value::as_str) != Some("audit") {
            continue;
        }
        let mut step = || -> Result<(), String> {
            let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
            let at = obj.get("at_ms").and_then(Value::as_u64);
            let at = (at.filter(|t| *t <= MAX_MS))
                .ok_or("audit event without `at_ms`: expected ms since the epoch")?;
            let event = text("event").ok_or("audit event without `event`: expected assign, resume, pause, cull, delete, terminate, ...")?;
            let (user, instance) = (text("user"), text("instance"));
            let matches = |(inst, s): &(Option<String>, Session)| match (&instance, inst) {
                (Some(a), Some(b)) => a == b,
                _ => user.as_ref() == Some(&s.user),
            };
            last = last.max(at);
            match event.as_str() {
                "assign" | "resume" => {
                    let inst = instance.as_ref().and_then(|i| known.get(i));
                    let (prev_user, prev_purpose) = inst.cloned().unwrap_or_default();
                    let why = format!("`{event}` without `user`: cannot tell whose session starts");
                    let user = user.clone().or(prev_user).ok_or(why)?;
                    check_user(&user).map_err(|e| format!("`user` {e}"))?;
                    let purpose = text("purpose").or(prev_purpose);
                    if let Some(inst) = &instance {
                        known.insert(inst.clone(), (Some(user.clone()), purpose.clone()));
                    }
                    if !open.iter().any(matches) {
                        let s = Session {
                            user,
                            purpose,
                            at_ms: at,
                            active: vec![],
                            end_ms: 0,
                        };
                        open.push((instance.clone(), s));
                    }
                }
                "pause" | "cull" | "delete" | "terminate" => {
                    if user.is_none() && instance.is_none() {
                        return Err(format!("`{event}` without `instance` or `user`: cannot tell which session ends"));
                    }
                    let idle = event == "pause" || event == "cull";
                    let (ended, kept): (Vec<_>, Vec<_>) = open.drain(..).partition(matches);
                    open = kept;
                    done.extend(ended.into_iter().map(|o| close(o, at, idle)));
                }
                _ => {}
            }
            Ok(())
        };
        if let Err(message) = step() {
            errors.push(LineError {
                line: i + 1,
                message,
            });
        }
    }
    done.extend(open.into_iter().map(|o| close(o, last, false)));
    done.sort_by_key(|s| s.at_ms);
    (done, errors)
}

/// Parameters of a synthetic week of an analytics team. Hours are the team's
/// local time. [`synthetic`] clamps values outside their ranges ([`Synthetic::validate`] lists them).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Synthetic {
    /// Number of users, named `analyst01`, `analyst02`, ...; default 40 (0 to 100000).
    pub users: usize,
    /// Start of the simulated span, ms since the epoch; default 2026-11-02T00:00:00Z (a Monday), at most 2.5e14. Weekdays come from the calendar, so any start works.
    pub start_ms: u64,
    /// Length of the span in days of 24 h from `start_ms`; default 7 (0 to 3660).
    pub days: u32,
    /// The team's local time minus UTC, in minutes; default 0 (-1080 to 1080).
    pub utc_offset_minutes: i32,
    /// Mean number of sessions a user starts on a weekday; default 1.6 (0 to 100).
    pub sessions_per_weekday: f64,
    /// Rate on Saturday and Sunday as a share of the weekday rate; default 0.05 (0 to 10).
    pub weekend_factor: f64,
    /// Hourly rate between 20:00 and 07:00 as a share of the day's mean hourly rate; default 0.02 (0 to 24/11).
    pub night_factor: f64,
    /// Local hour of the morning arrival peak; default 9.0 (7 to 20).
    pub morning_peak_hour: f64,
    /// Local hour of the after-lunch arrival peak; default 13.75 (7 to 20).
    pub afternoon_peak_hour: f64,
    /// Standard deviation of each peak, in hours; default 0.75 (0.05 to 12).
    pub peak_width_hours: f64,
    /// Share of daytime (07:00-20:00) arrivals spread evenly over it rather than in the two peaks; default 0.6 (0 to 1).
    pub steady_share: f64,
    /// Share of arrivals removed between 12:00 and 13:00 (they move to the rest of the day); default 0.6 (0 to 1).
    pub lunch_dip: f64,
    /// Median session length (from asking to leaving) in minutes, lognormal, each kept within 1 min to 24 h; default 75 (1 to 1440).
    pub session_median_minutes: f64,
    /// Sigma of the lognormal session length; default 0.8 (0 to 3).
    pub session_sigma: f64,
    /// Share of a session's time the user is active; default 0.7 (0 to 1).
    pub active_share: f64,
    /// Mean length of an active period in minutes (exponential); default 20 (1 to 1440).
    pub mean_active_minutes: f64,
}

impl Default for Synthetic {
    fn default() -> Self {
        Synthetic {
            users: 40,
            start_ms: 1_793_577_600_000,
            days: 7,
            utc_offset_minutes: 0,
            sessions_per_weekday: 1.6,
            weekend_factor: 0.05,
            night_factor: 0.02,
            morning_peak_hour: 9.0,
            afternoon_peak_hour: 13.75,
            peak_width_hours: 0.75,
            steady_share: 0.6,
            lunch_dip: 0.6,
            session_median_minutes: 75.0,
            session_sigma: 0.8,
            active_share: 0.7,
            mean_active_minutes: 20.0,
        }
    }
}

/// Range of each field of [`Synthetic`], as written in its doc comment.
const RANGES: [(&str, f64, f64); 16] = [
    ("users", 0.0, 1e5),
    ("start_ms", 0.0, 2.5e14),
    ("days", 0.0, 3660.0),
    ("utc_offset_minutes", -1080.0, 1080.0),
    ("sessions_per_weekday", 0.0, 100.0),
    ("weekend_factor", 0.0, 10.0),
    ("night_factor", 0.0, 24.0 / 11.0),
    ("morning_peak_hour", 7.0, 20.0),
    ("afternoon_peak_hour", 7.0, 20.0),
    ("peak_width_hours", 0.05, 12.0),
    ("steady_share", 0.0, 1.0),
    ("lunch_dip", 0.0, 1.0),
    ("session_median_minutes", 1.0, 1440.0),
    ("session_sigma", 0.0, 3.0),
    ("active_share", 0.0, 1.0),
    ("mean_active_minutes", 1.0, 1440.0),
];

impl Synthetic {
    /// Checks every field against its range; the error names each field out of range and the value [`synthetic`] uses instead.
    pub fn validate(&self) -> Result<(), String> {
        let notes = self.clamped().1;
        notes.is_empty().then_some(()).ok_or(notes.join("; "))
    }

    /// A copy with each field clamped into its range (NaN becomes the default), and a note per change.
    fn clamped(&self) -> (Synthetic, Vec<String>) {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        let d = serde_json::to_value(Synthetic::default()).unwrap_or_default();
        let mut notes = Vec::new();
        for (k, lo, hi) in RANGES {
            let x = v[k].as_f64().unwrap_or(f64::NAN);
            let (def, int) = (d[k].as_f64().unwrap_or(0.0), !d[k].is_f64());
            let y = if x.is_nan() { def } else { x.clamp(lo, hi) };
            if x != y {
                notes.push(format!(
                    "`{k}` = {} is outside {lo} to {hi}: {y} is used",
                    v[k]
                ));
                v[k] = if int { (y as i64).into() } else { y.into() };
            }
        }
        (serde_json::from_value(v).unwrap_or_default(), notes)
    }

    /// Share of a day's arrivals in each local minute of the day (sums to 1).
    fn day_profile(&self) -> Vec<f64> {
        let peak = |mu: f64| {
            let z = |m: usize| ((m as f64 + 0.5) / 60.0 - mu) / self.peak_width_hours;
            let w: Vec<f64> = (420..1200).map(|m| (-0.5 * z(m) * z(m)).exp()).collect();
            let sum: f64 = w.iter().sum();
            w.into_iter().map(move |x| x / sum)
        };
        let (steady, half) = (self.steady_share / 780.0, (1.0 - self.steady_share) / 2.0);
        let (am, pm) = (peak(self.morning_peak_hour), peak(self.afternoon_peak_hour));
        let mut day: Vec<f64> = am.zip(pm).map(|(a, b)| steady + half * (a + b)).collect();
        day[300..360]
            .iter_mut()
            .for_each(|x| *x *= 1.0 - self.lunch_dip); // 12:00-13:00
        let total = day.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let night = self.night_factor * 11.0 / 24.0;
        let mut out = vec![night / 660.0; 1440];
        for (o, x) in out[420..1200].iter_mut().zip(day) {
            *o = x / total * (1.0 - night);
        }
        out
    }
}

/// Lognormal draw with the given median and sigma, from a Box-Muller normal.
pub fn sample_lognormal<R: Rng>(rng: &mut R, median: f64, sigma: f64) -> f64 {
    let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (sigma * z).exp()
}

/// A trace drawn from `params` with a seeded RNG (rand::rngs::StdRng::seed_from_u64(seed)): the same seed gives the same sessions. A user never has two sessions overlapping: an arrival while the user's session is open is dropped.
///
/// Each user's arrivals are an inhomogeneous Poisson process drawn as one
/// Bernoulli trial per minute (so the cost grows with users times days).
/// Sessions start on whole seconds and alternate active periods and idle gaps
/// (both exponential, whole seconds), starting active, with idle gaps sized so
/// that about `active_share` of the time is active.
pub fn synthetic(params: &Synthetic, seed: u64) -> Vec<Session> {
    let p = params.clamped().0;
    let profile = p.day_profile();
    let mut rng = StdRng::seed_from_u64(seed);
    let width = p.users.to_string().len().max(2);
    let mean_active = p.mean_active_minutes * 60.0;
    let mean_idle = mean_active * (1.0 - p.active_share) / p.active_share.max(1e-9);
    let mut out = Vec::new();
    for u in 0..p.users {
        let user = format!("analyst{:0width$}", u + 1);
        let mut busy_until = 0;
        for k in 0..u64::from(p.days) * 1440 {
            let t = p.start_ms + k * 60_000;
            let local = t as i64 + i64::from(p.utc_offset_minutes) * 60_000;
            let weekday = (local.div_euclid(DAY_MS as i64) + 3).rem_euclid(7);
            let minute = (local.rem_euclid(DAY_MS as i64) / 60_000) as usize;
            let rate = p.sessions_per_weekday * if weekday < 5 { 1.0 } else { p.weekend_factor };
            if t < busy_until || rng.random::<f64>() >= rate * profile[minute] {
                continue;
            }
            let at_ms = t - t % 1000 + rng.random_range(0..60) * 1000;
            let minutes = sample_lognormal(&mut rng, p.session_median_minutes, p.session_sigma);
            let end_ms = (minutes.clamp(1.0, 1440.0) * 60.0).round() as u64 * 1000;
            let (mut active, mut s, mut on) = (Vec::new(), 0, true);
            while p.active_share > 0.0 && s < end_ms {
                let mean = if on { mean_active } else { mean_idle };
                let len = (-mean * (1.0 - rng.random::<f64>()).ln()).round().max(1.0) as u64;
                let stop = if p.active_share >= 1.0 {
                    end_ms
                } else {
                    (s + len * 1000).min(end_ms)
                };
                if on {
                    active.push((s, stop));
                }
                (s, on) = (stop, !on);
            }
            busy_until = at_ms + end_ms;
            out.push(Session {
                user: user.clone(),
                purpose: None,
                at_ms,
                active,
                end_ms,
            });
        }
    }
    out.sort_by_key(|s| s.at_ms);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(line: &str) -> Result<Session, String> {
        match parse(line) {
            (s, e) if e.is_empty() && s.len() == 1 => Ok(s[0].clone()),
            (_, e) => Err(e.first().map(|e| e.to_string()).unwrap_or_default()),
        }
    }

    fn lines(sessions: &[Session]) -> String {
        sessions.iter().map(to_line).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn bad_third_line_is_reported_and_skipped() {
        let text = r#"{"user": "a", "at": 100, "end": 10}
{"user": "b", "at": 50, "end": 10}
{"user": "c", "at": 60, "end": 10, "colour": "red"}
{"user": "d", "at": 70, "end": 10}
{"user": "e", "at": 50, "end": 20}"#;
        let (s, e) = parse(text);
        let users: Vec<&str> = s.iter().map(|s| s.user.as_str()).collect();
        assert_eq!(users, ["b", "e", "d", "a"]); // sorted by `at`, stable
        let known =
            "line 3: unknown field `colour`: known fields are user, purpose, at, active, end";
        assert_eq!(e.iter().map(|e| e.to_string()).collect::<Vec<_>>(), [known]);
    }

    #[test]
    fn each_error_kind_names_its_line() {
        let cases = r#"not json => not a JSON object: expected one session like {"user": "alice", "at"
[1, 2] => not a JSON object: expected one session like {"user": "alice", "at": "2026-11-30T09:00:00Z", "end": 3600} (found a list)
{"at": 0, "end": 1} => `user`: expected a name like "alice", found nothing
{"user": 7, "at": 0, "end": 1} => `user`: expected a name like "alice", found a number
{"user": "", "at": 0, "end": 1} => `user` is empty
{"user": "a b", "at": 0, "end": 1} => `user` `a b` contains ' ': use only ASCII letters, digits and ._@-
{"user": "a", "purpose": 3, "at": 0, "end": 1} => `purpose`: expected a string or nothing, found a number
{"user": "a", "end": 1} => `at`: expected a time like "2026-11-30T09:00:00Z" or seconds since the epoch, found nothing
{"user": "a", "at": "2026-13-01T00:00:00Z", "end": 1} => `at`: `2026-13-01T00:00:00Z` is not a date (2026-13-01 does not exist): write RFC 3339 like 2026-11-30T09:00:00Z or seconds since the epoch
{"user": "a", "at": -5, "end": 1} => `at`: -5 is negative: write seconds >= 0
{"user": "a", "at": 1e15, "end": 1} => seconds is after year 9999
{"user": "a", "at": 0} => neither `active` nor `end` is given: add "end"
{"user": "a", "at": 0, "active": []} => `active` is empty and `end` is missing
{"user": "a", "at": 0, "active": 5} => `active`: expected a list of [from, to] periods, found a number
{"user": "a", "at": 0, "active": [[1, 2, 3]]} => `active`: [1,2,3] is not a period
{"user": "a", "at": 0, "active": [[1, "x"]]} => `active`: period [1, "x"]: expected seconds, found a string
{"user": "a", "at": 0, "active": [[5, 5]]} => `active`: period [5, 5] is empty
{"user": "a", "at": 0, "active": [[0, 10], [5, 20]]} => period [5, 20] starts before the one before it ends
{"user": "a", "at": 0, "active": [[0, 10.5]], "end": 10} => period [0, 10.5] ends after `end` (10)
{"user": "a", "at": 0, "end": -1} => `end`: -1 is negative
{"user": "a", "at": "9999-12-31T23:00:00Z", "end": 7200} => `end`: the session would end after year 9999"#;
        let long = format!(
            r#"{{"user": "{}", "at": 0, "end": 1}} => is 129 characters long"#,
            "x".repeat(129)
        );
        for case in cases.lines().chain([long.as_str()]) {
            let (bad, want) = case.split_once(" => ").unwrap();
            let (s, e) = parse(&format!(
                "{{\"user\": \"ok\", \"at\": 1, \"end\": 1}}\n# note\n\n{bad}\n"
            ));
            assert_eq!((s.len(), e.len(), e[0].line), (1, 1, 4), "{bad}");
            assert!(e[0].message.contains(want), "{bad}: {}", e[0].message);
        }
        let (_, e) = parse("\n\n\n\n\n\n{\"user\": \"a\", \"at\": 0, \"active\": [[300, 200]]}");
        let want = "line 7: `active`: period [300, 200] ends before it starts: write [from, to] with from < to";
        assert_eq!(e[0].to_string(), want);
    }

    #[test]
    fn module_doc_example_parses() {
        let text = r#"# Monday morning
{"user": "alice", "purpose": "rstudio", "at": "2026-11-30T09:02:00Z", "active": [[0, 3600], [4200, 5400]], "end": 5400}
{"user": "bob", "at": 1796029920, "end": 1800}
{"user": "carol", "at": "2026-11-30T10:15:00.250+01:00", "active": [[60, 900.5]]}"#;
        let (s, e) = parse(text);
        assert_eq!((s.len(), e.len(), s[2].end_ms), (3, 0, 900_500));
    }

    #[test]
    fn defaults_of_active_and_end() {
        let text = r#"{"user": "a", "at": 10, "end": 60}
{"user": "b", "at": 10.25, "active": [[0, 1.5], [2, 3]], "purpose": "gpu"}
{"user": "c", "at": "2026-11-30T09:02:00.000Z", "end": 0, "purpose": null}
{"user": "d@x.org", "at": 20, "active": [], "end": 5}"#;
        let want = r#"{"user": "a", "at": "1970-01-01T00:00:10Z", "active": [[0, 60]], "end": 60}
{"user": "b", "purpose": "gpu", "at": "1970-01-01T00:00:10.250Z", "active": [[0, 1.5], [2, 3]], "end": 3}
{"user": "d@x.org", "at": "1970-01-01T00:00:20Z", "active": [], "end": 5}
{"user": "c", "at": "2026-11-30T09:02:00Z", "active": [], "end": 0}"#;
        assert_eq!(lines(&parse(text).0), want);
    }

    #[test]
    fn times_parse_and_format() {
        let t = 1_796_029_323_123;
        for s in [
            "2026-11-30T09:02:03.123Z",
            "2026-11-30t10:02:03.1239+01:00",
            "2026-11-30T04:02:03.123-05:00",
        ] {
            assert_eq!(parse_time(s), Ok(t), "{s}");
        }
        assert_eq!(format_time(t), "2026-11-30T09:02:03.123Z");
        assert_eq!(format_time(t - 3123), "2026-11-30T09:02:00Z");
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time("2024-02-29T12:00:00Z"), Ok(1_709_208_000_000));
        assert_eq!(parse_time("2026-11-30T09:02:03.5Z"), Ok(t + 377));
        assert_eq!(parse_time("9999-12-31T23:59:59.999Z"), Ok(MAX_MS));
        assert_eq!(
            format_time(parse_time("2000-02-29T23:59:59Z").unwrap()),
            "2000-02-29T23:59:59Z"
        );
        let bad = "2023-02-29T00:00:00Z 2100-02-29T00:00:00Z 2026-04-31T00:00:00Z 2026-11-30T24:00:00Z \
            2026-11-30T09:00:60Z 2026-11-30T09:00:00 2026-11-30T09:00:00+1:00 2026-11-30_09:00:00Z \
            2026-11-30T09:00:00.Z 1969-12-31T23:59:59Z 1970-01-01T00:30:00+01:00 2026-11-30T09:00:00+24:00 \
            9999-12-31T23:00:00-05:00 2026-11-30T09:00:00Zé 2026-11-30T09:00:0é 2026-00-10T00:00:00Z";
        for s in bad.split(' ').chain([""]) {
            assert!(parse_time(s).is_err(), "{s}");
        }
    }

    #[test]
    fn audit_log_becomes_sessions() {
        let log = r#"2026-11-30T09:00:00Z INFO server started
{"time":"x","level":"INFO","target":"pool","message":"hello","event":"assign"}
{"target":"audit","at_ms":1000000,"event":"assign","user":"alice","instance":"i-1","purpose":"rstudio"}
{"target":"audit","at_ms":1005000,"event":"link_exchange","user":"alice","instance":"i-1"}
{"target":"audit","at_ms":2000000,"event":"assign","user":"bob"}
{"target":"audit","event":"pause","instance":"i-1"}
{"target":"audit","at_ms":4600000,"event":"pause","user":"alice","instance":"i-1"}
{"target":"audit","at_ms":5000000,"event":"resume","instance":"i-1"}
{"target":"audit","at_ms":5000001,"event":"assign","user":"alice","instance":"i-1"}
{"target":"audit","at_ms":6000000,"event":"delete","user":"alice","instance":"i-1"}
{"target":"audit","at_ms":6500000,"event":"cull","user":"bob"}
{"target":"audit","at_ms":7000000,"event":"assign","user":"carol"}
{"target":"audit","at_ms":7200000}
{"target":"audit","at_ms":7300000,"event":"pause"}
{"target":"audit","at_ms":7500000,"event":"launch_failure","user":"dave"}"#;
        let (s, e) = from_audit(log, 1_800_000);
        assert_eq!(e.iter().map(|e| e.line).collect::<Vec<_>>(), [6, 13, 14]);
        let want = r#"{"user": "alice", "purpose": "rstudio", "at": "1970-01-01T00:16:40Z", "active": [[0, 1800]], "end": 3600}
{"user": "bob", "at": "1970-01-01T00:33:20Z", "active": [[0, 2700]], "end": 4500}
{"user": "alice", "purpose": "rstudio", "at": "1970-01-01T01:23:20Z", "active": [[0, 1000]], "end": 1000}
{"user": "carol", "at": "1970-01-01T01:56:40Z", "active": [[0, 500]], "end": 500}"#;
        assert_eq!(lines(&s), want);
        let short = "{\"target\":\"audit\",\"at_ms\":0,\"event\":\"assign\",\"user\":\"a\"}\n\
            {\"target\":\"audit\",\"at_ms\":60000,\"event\":\"pause\",\"user\":\"a\"}";
        let s = &from_audit(short, 1_800_000).0[0];
        assert_eq!((s.active.len(), s.end_ms), (0, 60_000));
    }

    #[test]
    fn synthetic_weeks_have_the_expected_shape() {
        let p = Synthetic {
            days: 28,
            ..Synthetic::default()
        };
        assert_eq!(p.validate(), Ok(()));
        let trace = synthetic(&p, 7);
        assert_eq!(trace, synthetic(&p, 7));
        assert_ne!(trace, synthetic(&p, 8));
        let (mut weekday, mut saturday_9) = ([0; 24], 0);
        let mut last_end = BTreeMap::new();
        let (mut active, mut total) = (0, 0);
        for s in &trace {
            let day = (s.at_ms / DAY_MS + 3) % 7;
            let hour = (s.at_ms % DAY_MS / 3_600_000) as usize;
            weekday[hour] += usize::from(day < 5);
            saturday_9 += usize::from(day == 5 && hour == 9);
            let prev = last_end.insert(&s.user, s.at_ms + s.end_ms).unwrap_or(0);
            assert!(prev <= s.at_ms, "{} overlaps", s.user);
            assert_eq!(one(&to_line(s)), Ok(s.clone()));
            active += s.active.iter().map(|p| p.1 - p.0).sum::<u64>();
            total += s.end_ms;
        }
        assert!(weekday[9] > 10 * weekday[3].max(saturday_9).max(1));
        assert!(weekday[12] < weekday[11] && weekday[12] < weekday[13]);
        let per_weekday = weekday.iter().sum::<usize>() as f64 / (40.0 * 20.0);
        assert!((1.0..1.6).contains(&per_weekday), "{per_weekday}");
        assert!((0.6..0.8).contains(&(active as f64 / total as f64)));
    }

    #[test]
    fn synthetic_parameters_are_checked_and_clamped() {
        let json = r#"{"users": 2, "lunch_dip": 1.5, "days": 1}"#;
        let mut p: Synthetic = serde_json::from_str(json).unwrap();
        let note = "`lunch_dip` = 1.5 is outside 0 to 1: 1 is used";
        assert_eq!(p.validate(), Err(note.into()));
        assert!(serde_json::from_str::<Synthetic>(r#"{"user": 2}"#).is_err());
        (p.active_share, p.night_factor, p.start_ms) = (0.0, f64::NAN, u64::MAX);
        let notes = p.validate().unwrap_err();
        assert!(
            notes.contains("`night_factor` = null is outside"),
            "{notes}"
        );
        let trace = synthetic(&p, 1);
        assert!(trace
            .iter()
            .all(|s| s.active.is_empty() && one(&to_line(s)).is_ok()));
        (p.active_share, p.morning_peak_hour) = (1.0, -3.0);
        let trace = synthetic(&p, 1);
        assert!(trace.iter().all(|s| s.active == [(0, s.end_ms)]));
    }

    #[test]
    fn lognormal_has_its_median() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut v: Vec<f64> = (0..20_001)
            .map(|_| sample_lognormal(&mut rng, 75.0, 0.8))
            .collect();
        v.sort_by(f64::total_cmp);
        assert!((70.0..80.0).contains(&v[10_000]), "{}", v[10_000]);
    }

    fn session() -> impl Strategy<Value = Session> {
        let periods = prop::collection::vec((0u64..1_000_000_000, 1u64..1_000_000_000), 0..5);
        let purpose = prop::option::of(".{0,12}");
        (
            "[A-Za-z0-9._@-]{1,128}",
            purpose,
            0..MAX_MS / 2,
            periods,
            0u64..1_000_000,
        )
            .prop_map(|(user, purpose, at_ms, gaps, extra)| {
                let mut t = 0;
                let active = gaps
                    .iter()
                    .map(|&(gap, len)| (t + gap, (t += gap + len, t).1))
                    .collect();
                Session {
                    user,
                    purpose,
                    at_ms,
                    active,
                    end_ms: t + extra,
                }
            })
    }

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            ".*",
            "[ \t#{}\\[\\]\",:.0-9a-zT-]*",
            session().prop_map(|s| to_line(&s)),
            (session(), "[a-z]{1,6}")
                .prop_map(|(s, k)| to_line(&s).replace("\"end\"", &format!("\"{k}\": 1, \"end\""))),
            (session(), 0usize..200).prop_map(|(s, n)| to_line(&s).chars().take(n).collect()),
        ]
    }

    proptest! {
        #[test]
        fn times_round_trip(ms in 0..=MAX_MS, junk in "[0-9tTzZ:+.é-]{0,30}") {
            prop_assert_eq!(parse_time(&format_time(ms)), Ok(ms));
            let _ = parse_time(&junk);
        }

        #[test]
        fn lines_round_trip(s in session()) {
            prop_assert_eq!(one(&to_line(&s)), Ok(s));
        }

        #[test]
        fn parse_reports_each_bad_line_once(lines in prop::collection::vec(line(), 0..8)) {
            let text = lines.join("\n");
            let used: Vec<usize> = text.lines().enumerate()
                .filter(|(_, l)| !l.trim().is_empty() && !l.trim().starts_with('#'))
                .map(|(i, _)| i + 1).collect();
            let (s, e) = parse(&text);
            prop_assert_eq!(s.len() + e.len(), used.len());
            prop_assert!(e.windows(2).all(|w| w[0].line < w[1].line));
            prop_assert!(e.iter().all(|e| used.contains(&e.line)));
            let _ = from_audit(&text, 1000);
        }
    }
}
