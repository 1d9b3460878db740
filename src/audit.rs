//! Audit events: what happened to whose workspace, and why. Each event is one log line
//! (target `audit`; a JSON object under `log.format: json`) with the user, the instance, the
//! purpose and the cause, and the last [`KEPT`] are kept for the admin page.
//!
//! Also the process's log format: `text` (env_logger's, one line per record) or `json` (one
//! object per line, for log shippers).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::core::ids::{InstanceId, UserId};
use crate::core::ledger::civil_from_days;

/// How many events the admin page can show.
pub const KEPT: usize = 200;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An instance was recorded as a user's.
    Assign,
    /// A user exchanged a link for a session.
    LinkExchange,
    Pause,
    Resume,
    /// An idle instance was terminated (or, with `on_idle`, paused: then `Pause`).
    Cull,
    /// An instance was terminated on request (`DELETE`, the admin page).
    Delete,
    /// An instance was terminated for another reason (a failed start, an old pause).
    Terminate,
    /// A start failed: the provider refused, the workspace exited or never answered.
    LaunchFailure,
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    pub event: Kind,
    pub user: Option<String>,
    pub instance: Option<String>,
    pub purpose: Option<String>,
    pub cause: String,
}

static JSON: AtomicBool = AtomicBool::new(false);
static RECENT: Mutex<VecDeque<Event>> = Mutex::new(VecDeque::new());

/// Records an event: one log line, and kept for the admin page.
pub fn record(
    event: Kind,
    user: Option<&UserId>,
    instance: Option<&InstanceId>,
    purpose: Option<&str>,
    cause: impl Into<String>,
) {
    let event = Event {
        at_ms: crate::provider::process::now_ms(),
        event,
        user: user.map(|u| u.as_str().to_owned()),
        instance: instance.map(|i| i.as_str().to_owned()),
        purpose: purpose.map(str::to_owned),
        cause: cause.into(),
    };
    if JSON.load(Ordering::Relaxed) {
        // The formatter puts this object's fields beside its own (see `init`).
        let fields = serde_json::to_string(&event).unwrap_or_default();
        log::info!(target: "audit", "{fields}");
    } else {
        log::info!(target: "audit", "{}", text(&event));
    }
    let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    if recent.len() == KEPT {
        recent.pop_front();
    }
    recent.push_back(event);
}

/// The event as `key=value` pairs, values quoted when they hold a blank or a quote.
fn text(e: &Event) -> String {
    let quote = |v: &str| {
        if v.is_empty() || v.contains([' ', '"', '=']) {
            format!("{v:?}")
        } else {
            v.to_owned()
        }
    };
    let kind = serde_json::to_value(e.event)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "event={kind} user={} instance={} purpose={} cause={}",
        quote(e.user.as_deref().unwrap_or("-")),
        quote(e.instance.as_deref().unwrap_or("-")),
        quote(e.purpose.as_deref().unwrap_or("-")),
        quote(&e.cause)
    )
}

/// The last events, newest first.
pub fn recent(limit: usize) -> Vec<Event> {
    let recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    recent.iter().rev().take(limit).cloned().collect()
}

/// The log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Sets up the process's logger (`RUST_LOG` filters, `info` by default) in `format`.
pub fn init(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        JSON.store(true, Ordering::Relaxed);
        builder.format(|out, record| {
            let message = record.args().to_string();
            let head = serde_json::json!({
                "time": rfc3339_now(),
                "level": record.level().as_str(),
                "target": record.target(),
            })
            .to_string();
            let head = head.strip_suffix('}').unwrap_or(&head);
            // An audit event's fields go beside ours; any other message is one field.
            match message
                .strip_prefix('{')
                .filter(|_| record.target() == "audit")
            {
                Some(fields) => writeln!(out, "{head},{fields}"),
                None => writeln!(
                    out,
                    "{head},\"message\":{}}}",
                    serde_json::Value::String(message)
                ),
            }
        });
    }
    // A second call (tests) keeps the first logger.
    let _ = builder.try_init();
}

/// Now as RFC 3339 in UTC, to the millisecond.
fn rfc3339_now() -> String {
    let ms = crate::provider::process::now_ms();
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_787), (2026, 11, 30));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn events_are_kept_newest_first_and_bounded() {
        let id = InstanceId::parse("i-0123456789abcdef0").unwrap();
        let user = UserId::parse("ana").unwrap();
        for n in 0..KEPT + 5 {
            record(
                Kind::Assign,
                Some(&user),
                Some(&id),
                Some("rstudio"),
                format!("n {n}"),
            );
        }
        let recent = recent(KEPT * 2);
        assert_eq!(recent.len(), KEPT);
        assert_eq!(recent[0].cause, format!("n {}", KEPT + 4));
        let line = text(&recent[0]);
        assert_eq!(
            line,
            format!(
                "event=assign user=ana instance=i-0123456789abcdef0 purpose=rstudio cause=\"n {}\"",
                KEPT + 4
            )
        );
    }
}
