//! `rstudio-pool simulate` and `rstudio-pool trace`: reading their arguments and printing
//! their tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use super::trace::{self, Session, Synthetic};
use super::{Options, Report};
use crate::config::{parse_warm_policy, Config};
use crate::core::ledger::Use;
use crate::core::warm::WarmPolicy;

/// `rstudio-pool simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The trace to replay (JSON lines, one session each; COSTS.md has the format).
    #[arg(long)]
    pub trace: PathBuf,
    /// A policy to compare, applied to every purpose; repeat for several rows. `config`
    /// (as configured, the default), `fixed:N`, or a `warm_policy` written as YAML, e.g.
    /// `{kind: forecast, floor: 0}` or
    /// `{kind: schedule, ranges: [{when: "mon-fri 08:00-18:00", min_free: 3}]}`.
    #[arg(long = "policy")]
    pub policies: Vec<String>,
    /// Days at the start of the trace that warm the pool up (and teach `forecast`),
    /// left out of the figures.
    #[arg(long, default_value_t = 0)]
    pub skip_days: u32,
    /// Seed of the drawn times to ready: the same seed, the same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Writes every launch and assignment of the (first) policy's run here, as JSON lines.
    #[arg(long)]
    pub decisions: Option<PathBuf>,
}

/// `rstudio-pool trace ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TraceArgs {
    /// Prints a synthetic trace of an analytics team (weekday peaks, a lunch dip, quiet
    /// nights and weekends).
    Synthetic {
        /// The generator's parameters as YAML (COSTS.md lists them); flags below win.
        #[arg(long)]
        params: Option<PathBuf>,
        #[arg(long)]
        users: Option<usize>,
        #[arg(long)]
        days: Option<u32>,
        /// The first day, a Monday (`2026-11-02`).
        #[arg(long)]
        start: Option<String>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Turns the pool's audit log (`log.format: json`) into a trace of its sessions.
    FromAudit {
        /// The log; `-` reads standard input.
        log: PathBuf,
        /// The idle timeout the pool ran with (TIMEOUT_INSTANCE): an idle session ended
        /// this long after its user's last action.
        #[arg(long)]
        idle_timeout_ms: u64,
    },
}

/// Runs `simulate`: the table to print, and the bad lines of the trace to report.
pub fn simulate(config: &Config, args: &SimulateArgs) -> Result<(String, Vec<String>), String> {
    let text = std::fs::read_to_string(&args.trace)
        .map_err(|e| format!("cannot read the trace {}: {e}", args.trace.display()))?;
    let (sessions, errors) = trace::parse(&text);
    let skipped: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {e}", args.trace.display()))
        .collect();
    if sessions.is_empty() {
        return Err(format!(
            "{} holds no session{}",
            args.trace.display(),
            if skipped.is_empty() {
                String::new()
            } else {
                format!(": {}", skipped.join("; "))
            }
        ));
    }
    for s in &sessions {
        if let Some(p) = s
            .purpose
            .as_deref()
            .filter(|p| !config.purposes.contains_key(*p))
        {
            return Err(format!(
                "the trace asks for purpose `{p}` (user {}), which the configuration does not have: add it under `purposes` or change the trace",
                s.user
            ));
        }
    }
    let specs = if args.policies.is_empty() {
        vec!["config".to_owned()]
    } else {
        args.policies.clone()
    };
    let mut reports = Vec::new();
    for spec in &specs {
        let policy = policy(config, spec)?;
        let options = Options {
            policy,
            skip_days: args.skip_days,
            seed: args.seed,
            ready: config.simulate.ready,
            resume: config.simulate.resume,
        };
        reports.push(super::run(config, &sessions, &options));
    }
    if let (Some(path), Some(first)) = (&args.decisions, reports.first()) {
        let mut out = String::new();
        for d in &first.decisions {
            out.push_str(&serde_json::to_string(d).unwrap_or_default());
            out.push('\n');
        }
        std::fs::write(path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let mut head = format!(
        "{} sessions of {} users; time to ready {} (median {} s, p95 {} s), resume median {} s, p95 {} s; reconcile every {} ms; times to ready drawn with seed {}\n",
        sessions.len(),
        users(&sessions),
        config.simulate.source,
        config.simulate.ready.median_s,
        config.simulate.ready.p95_s,
        config.simulate.resume.median_s,
        config.simulate.resume.p95_s,
        config.reconcile_interval.as_millis(),
        args.seed,
    );
    if let Some(r) = reports.first() {
        let _ = writeln!(
            head,
            "measured from {} to {}{}",
            trace::format_time(r.from_ms),
            trace::format_time(r.to_ms),
            if args.skip_days > 0 {
                format!(" (the first {} days warm the pool up)", args.skip_days)
            } else {
                String::new()
            }
        );
    }
    let mut out = head + &table(&reports, &config.currency);
    for r in &reports {
        let paused = r
            .ledger
            .total
            .0
            .keys()
            .map(|p| r.ledger.total.get(p, Use::Paused))
            .fold((0.0, 0.0), |(h, c), a| (h + a.hours(), c + a.cost));
        if paused.0 > 0.0 {
            // A month of 30.44 days over the measured span, per user of the trace.
            let months = (r.to_ms - r.from_ms) as f64 / (30.44 * 86_400_000.0);
            let _ = writeln!(
                out,
                "{}: paused volumes {:.1} instance-hours, {:.2} {} per user-month",
                r.policy,
                paused.0,
                paused.1 / users(&sessions) as f64 / months,
                config.currency
            );
        }
    }
    Ok((out, skipped))
}

fn users(sessions: &[Session]) -> usize {
    let mut u: Vec<&str> = sessions.iter().map(|s| s.user.as_str()).collect();
    u.sort_unstable();
    u.dedup();
    u.len()
}

/// The policy of each purpose for `spec`.
fn policy(config: &Config, spec: &str) -> Result<(String, BTreeMap<String, WarmPolicy>), String> {
    let mut out = BTreeMap::new();
    if spec == "config" {
        let name = config
            .purposes
            .values()
            .map(|p| crate::manager::policy_label(&p.warm))
            .collect::<Vec<_>>()
            .join("/");
        return Ok((format!("config ({name})"), out));
    }
    for (name, purpose) in &config.purposes {
        let policy = match spec.strip_prefix("fixed:") {
            Some(n) => WarmPolicy::Fixed {
                min_free: n
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| {
                        format!("--policy `{spec}`: write fixed:N with N the instances kept free, e.g. fixed:2")
                    })?
                    .min(purpose.limits.max),
            },
            None => parse_warm_policy(spec, purpose.limits, name)
                .map_err(|e| format!("--policy `{spec}`: {e}"))?,
        };
        out.insert(name.clone(), policy);
    }
    Ok((spec.to_owned(), out))
}

/// One row per policy.
pub fn table(reports: &[Report], currency: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| policy | requests | p50 wait s | p95 wait s | p99 wait s | served warm | free h | starting h | active h | idle h | paused h | cost {currency} |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1}% | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            r.policy,
            r.waits_ms.len() + r.refused,
            r.wait_quantile(0.50),
            r.wait_quantile(0.95),
            r.wait_quantile(0.99),
            100.0 * r.warm_share(),
            r.hours(Use::Free),
            r.hours(Use::Launching),
            r.hours(Use::AssignedActive),
            r.hours(Use::AssignedIdle),
            r.hours(Use::Paused),
            r.cost(),
        );
    }
    out
}

/// Runs `trace ...`: the trace (or sessions) to print, and the bad lines to report.
pub fn trace_command(args: &TraceArgs) -> Result<(String, Vec<String>), String> {
    match args {
        TraceArgs::Synthetic {
            params,
            users,
            days,
            start,
            seed,
        } => {
            let mut p: Synthetic = match params {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
                }
                None => Synthetic::default(),
            };
            if let Some(u) = users {
                p.users = *u;
            }
            if let Some(d) = days {
                p.days = *d;
            }
            if let Some(s) = start {
                let at = if s.contains('T') {
                    s.clone()
                } else {
                    format!("{s}T00:00:00Z")
                };
                p.start_ms = trace::parse_time(&at).map_err(|e| format!("--start: {e}"))?;
            }
            p.validate()?;
            let mut out = format!(
                "# synthetic trace: {}\n",
                serde_json::to_string(&p).unwrap_or_default()
            );
            out.push_str(&format!("# seed {seed}\n"));
            for s in trace::synthetic(&p, *seed) {
                out.push_str(&trace::to_line(&s));
                out.push('\n');
            }
            Ok((out, Vec::new()))
        }
        TraceArgs::FromAudit {
            log,
            idle_timeout_ms,
        } => {
            let text = if log.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| format!("cannot read standard input: {e}"))?
            } else {
                std::fs::read_to_string(log)
                    .map_err(|e| format!("cannot read {}: {e}", log.display()))?
            };
            let (sessions, errors) = trace::from_audit(&text, *idle_timeout_ms);
            let mut out = String::new();
            for s in &sessions {
                out.push_str(&trace::to_line(s));
                out.push('\n');
            }
            Ok((
                out,
                errors
                    .iter()
                    .map(|e| format!("{}: {e}", log.display()))
                    .collect(),
            ))
        }
    }
}
