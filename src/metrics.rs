//! The server's Prometheus metrics: one registry per process, names with the `rstudio_pool_`
//! prefix in base units, labels bounded (purpose, state, outcome, path; never a user or an
//! instance id).
//!
//! Counters on the proxy's hot path are `IntCounter` handles resolved once, at start, into
//! fixed arrays: a request costs one relaxed atomic add, no lock, no hash, no allocation.
//! Gauges that describe the pool (instances by state, users, limits) are read from the
//! manager when `/metrics` is scraped ([`crate::manager::PoolManager::observe`]), so they
//! cannot drift from what the pool holds.

use once_cell::sync::Lazy;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The way a proxied request took through the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyPath {
    /// The edge's own HTTP/1.1 forwarding.
    Edge = 0,
    /// The edge's own WebSocket tunnel.
    Tunnel = 1,
    /// Pingora's HTTP proxy.
    Pingora = 2,
    /// A page the proxy answered itself (progress, sign-in, not found, redirects).
    Page = 3,
}

const PATHS: [&str; 4] = ["edge", "tunnel", "pingora", "page"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The states an instance is counted in.
pub const INSTANCE_STATES: [&str; 6] = [
    "launching",
    "free",
    "assigned",
    "resuming",
    "paused",
    "terminating",
];

/// The states instance-seconds are accrued in: the raw material of cost.
pub const SECONDS_STATES: [&str; 5] = [
    "launching",
    "free",
    "assigned_active",
    "assigned_idle",
    "paused",
];

/// The spans of the pool's books in the metrics.
pub const LEDGER_SPANS: [&str; 2] = ["total", "today"];

/// How `REQUEST_RSTUDIO` was served.
pub const ASSIGNMENT_OUTCOMES: [&str; 6] = [
    "warm",
    "launched",
    "existing",
    "resumed",
    "pool_full",
    "failed",
];

/// Why a start failed.
pub const LAUNCH_FAILURE_CAUSES: [&str; 3] = ["refused", "exited", "timeout"];

/// Why an instance was terminated.
pub const TERMINATION_REASONS: [&str; 8] = [
    "idle",
    "deleted",
    "admin",
    "failed_start",
    "paused_expired",
    "orphan",
    "unrecordable",
    "surplus",
];

/// Why an instance was paused.
pub const PAUSE_REASONS: [&str; 2] = ["idle", "admin"];

pub const LINK_OUTCOMES: [&str; 3] = ["ok", "spent", "invalid"];

/// Why the proxy refused a request for an instance.
pub const AUTH_REFUSALS: [&str; 3] = ["no_session", "not_owner", "untrusted"];

pub const PROVIDER_OPERATIONS: [&str; 7] = [
    "launch",
    "list",
    "lookup",
    "set_tags",
    "stop",
    "start",
    "terminate",
];

pub const PROVIDER_ERRORS: [&str; 4] = ["not_found", "unavailable", "throttled", "other"];

pub struct Metrics {
    registry: Registry,
    pub instances: IntGaugeVec,
    pub users: IntGaugeVec,
    pub min_free: IntGaugeVec,
    pub max: IntGaugeVec,
    pub launches_paused: IntGaugeVec,
    pub recovered: IntGauge,
    pub open_websockets: IntGauge,
    pub assignments: IntCounterVec,
    pub assignment_seconds: HistogramVec,
    pub launch_to_ready_seconds: HistogramVec,
    pub launch_failures: IntCounterVec,
    pub pauses: IntCounterVec,
    pub resumes: IntCounterVec,
    pub terminations: IntCounterVec,
    proxy_requests: [[IntCounter; 5]; 4],
    pub upstream_connect_errors: IntCounter,
    link_exchanges: [IntCounter; 3],
    auth_refusals: [IntCounter; 3],
    pub provider_calls: IntCounterVec,
    pub provider_errors: IntCounterVec,
    pub provider_throttles: IntCounterVec,
    pub instance_seconds: CounterVec,
    /// Money accrued by this process, by purpose and state (`hourly_cost` per purpose).
    pub cost: CounterVec,
    /// The pool's books, kept across restarts: money by purpose and span (`total` since the
    /// books were opened, `today` since UTC midnight).
    pub ledger_cost: GaugeVec,
    /// The pool's books: instance-seconds by purpose, state and span.
    pub ledger_seconds: GaugeVec,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: Lazy<Metrics> = Lazy::new(Metrics::new);
    &METRICS
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("rstudio_pool_{name}"), help)
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(opts(name, help), labels).expect("a valid metric");
            registry.register(Box::new(g.clone())).expect("one name");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(opts(name, help)).expect("a valid metric");
            registry.register(Box::new(g.clone())).expect("one name");
            g
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(name, help), labels).expect("a valid metric");
            registry.register(Box::new(c.clone())).expect("one name");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(
                HistogramOpts::new(format!("rstudio_pool_{name}"), help).buckets(buckets),
                &["purpose"],
            )
            .expect("a valid metric");
            registry.register(Box::new(h.clone())).expect("one name");
            h
        };
        let proxy = counters(
            "proxy_requests_total",
            "Requests answered by the proxy, by the path they took and status class",
            &["path", "class"],
        );
        let links = counters(
            "link_exchanges_total",
            "Workspace links presented, by outcome (ok: a session was handed out)",
            &["outcome"],
        );
        let refusals = counters(
            "auth_refusals_total",
            "Requests for a workspace refused for want of access, by reason",
            &["reason"],
        );
        let instance_seconds = CounterVec::new(
            opts(
                "instance_seconds_total",
                "Seconds instances spent in each state (assigned_active: a user action in the last 5 minutes)",
            ),
            &["purpose", "state"],
        )
        .expect("a valid metric");
        registry
            .register(Box::new(instance_seconds.clone()))
            .expect("one name");
        let cost = CounterVec::new(
            opts(
                "cost_total",
                "Money accrued by this process, by purpose and state (purposes.<name>.hourly_cost, paused_hourly_cost)",
            ),
            &["purpose", "state"],
        )
        .expect("a valid metric");
        registry.register(Box::new(cost.clone())).expect("one name");
        let float_gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(opts(name, help), labels).expect("a valid metric");
            registry.register(Box::new(g.clone())).expect("one name");
            g
        };
        let ledger_cost = float_gauges(
            "ledger_cost",
            "The pool's books, kept across restarts: money by purpose and span (total: since the books were opened; today: since UTC midnight)",
            &["purpose", "span"],
        );
        let ledger_seconds = float_gauges(
            "ledger_instance_seconds",
            "The pool's books, kept across restarts: instance-seconds by purpose, state and span",
            &["purpose", "state", "span"],
        );
        Self {
            instances: gauges(
                "instances",
                "Instances the pool holds, by purpose and state",
                &["purpose", "state"],
            ),
            users: gauges(
                "users",
                "Users holding an instance, by purpose",
                &["purpose"],
            ),
            min_free: gauges(
                "min_free_instances",
                "Free instances the pool keeps warm (MIN_FREE_INSTANCES)",
                &["purpose"],
            ),
            max: gauges(
                "max_instances",
                "Instances the pool never exceeds (MAX_INSTANCES)",
                &["purpose"],
            ),
            launches_paused: gauges(
                "launches_paused",
                "1 while launches of a purpose are paused after failed starts",
                &["purpose"],
            ),
            recovered: gauge(
                "recovered",
                "1 once the pool was rebuilt from the provider after the start",
            ),
            open_websockets: gauge(
                "open_websockets",
                "WebSockets open through the proxy",
            ),
            assignments: counters(
                "assignments_total",
                "REQUEST_RSTUDIO answers by outcome (warm: a free instance; launched: one started for the user; existing: the user's own; resumed: their paused one)",
                &["purpose", "outcome"],
            ),
            assignment_seconds: histogram(
                "assignment_duration_seconds",
                "Time to answer REQUEST_RSTUDIO",
                vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            launch_to_ready_seconds: histogram(
                "launch_to_ready_seconds",
                "Time from a launch (or resume) to a workspace that answers",
                vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0],
            ),
            launch_failures: counters(
                "launch_failures_total",
                "Starts that failed, by cause (refused by the provider, exited while starting, not ready in time)",
                &["purpose", "cause"],
            ),
            pauses: counters(
                "pauses_total",
                "Instances paused with their owner's work, by reason",
                &["purpose", "reason"],
            ),
            resumes: counters(
                "resumes_total",
                "Paused instances started again for their owner",
                &["purpose"],
            ),
            terminations: counters(
                "terminations_total",
                "Instances terminated, by reason",
                &["purpose", "reason"],
            ),
            proxy_requests: std::array::from_fn(|p| {
                std::array::from_fn(|c| proxy.with_label_values(&[PATHS[p], CLASSES[c]]))
            }),
            upstream_connect_errors: {
                let c = IntCounter::with_opts(opts(
                    "upstream_connect_errors_total",
                    "Connections to workspaces that failed or timed out",
                ))
                .expect("a valid metric");
                registry.register(Box::new(c.clone())).expect("one name");
                c
            },
            link_exchanges: std::array::from_fn(|i| links.with_label_values(&[LINK_OUTCOMES[i]])),
            auth_refusals: std::array::from_fn(|i| {
                refusals.with_label_values(&[AUTH_REFUSALS[i]])
            }),
            provider_calls: counters(
                "provider_calls_total",
                "Calls to the provider (EC2 or local processes), by operation",
                &["operation"],
            ),
            provider_errors: counters(
                "provider_errors_total",
                "Provider calls that failed (after the SDK's retries), by operation and kind",
                &["operation", "kind"],
            ),
            provider_throttles: counters(
                "provider_throttled_attempts_total",
                "Attempts the provider throttled (EC2's RequestLimitExceeded), each retried by the SDK or failed, by operation (DescribeInstances counts as list)",
                &["operation"],
            ),
            instance_seconds,
            cost,
            ledger_cost,
            ledger_seconds,
            registry,
        }
    }

    /// Makes every series of these purposes exist from the start (at zero), so that a
    /// dashboard and `rate()` see them before the first event.
    pub fn init_purposes<'a>(&self, purposes: impl IntoIterator<Item = &'a str>) {
        for purpose in purposes {
            for outcome in ASSIGNMENT_OUTCOMES {
                self.assignments.with_label_values(&[purpose, outcome]);
            }
            for cause in LAUNCH_FAILURE_CAUSES {
                self.launch_failures.with_label_values(&[purpose, cause]);
            }
            for reason in PAUSE_REASONS {
                self.pauses.with_label_values(&[purpose, reason]);
            }
            for reason in TERMINATION_REASONS {
                self.terminations.with_label_values(&[purpose, reason]);
            }
            for state in SECONDS_STATES {
                self.instance_seconds.with_label_values(&[purpose, state]);
                self.cost.with_label_values(&[purpose, state]);
                for span in LEDGER_SPANS {
                    self.ledger_seconds
                        .with_label_values(&[purpose, state, span]);
                }
            }
            for span in LEDGER_SPANS {
                self.ledger_cost.with_label_values(&[purpose, span]);
            }
            self.resumes.with_label_values(&[purpose]);
            self.assignment_seconds.with_label_values(&[purpose]);
            self.launch_to_ready_seconds.with_label_values(&[purpose]);
        }
        for operation in PROVIDER_OPERATIONS {
            self.provider_calls.with_label_values(&[operation]);
            for kind in PROVIDER_ERRORS {
                self.provider_errors.with_label_values(&[operation, kind]);
            }
            self.provider_throttles.with_label_values(&[operation]);
        }
    }

    /// Counts one request answered through `path` with `status`.
    #[inline]
    pub fn proxied(&self, path: ProxyPath, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.proxy_requests[path as usize][class].inc();
    }

    /// Counts a link presented to the proxy.
    pub fn link_exchange(&self, outcome: LinkOutcome) {
        self.link_exchanges[outcome as usize].inc();
    }

    /// Counts a request refused for want of access.
    pub fn auth_refusal(&self, reason: Refusal) {
        self.auth_refusals[reason as usize].inc();
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding our own registry's families cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[derive(Debug, Clone, Copy)]
pub enum LinkOutcome {
    Ok = 0,
    Spent = 1,
    Invalid = 2,
}

#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    NoSession = 0,
    NotOwner = 1,
    Untrusted = 2,
}

/// An open WebSocket, counted in `rstudio_pool_open_websockets` for as long as it lives.
pub struct OpenSocket(());

impl OpenSocket {
    pub fn open() -> Self {
        metrics().open_websockets.inc();
        Self(())
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        metrics().open_websockets.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_named_in_base_units_with_the_prefix() {
        let m = metrics();
        m.init_purposes(["rstudio"]);
        m.proxied(ProxyPath::Edge, 200);
        m.proxied(ProxyPath::Page, 599);
        m.proxied(ProxyPath::Tunnel, 101);
        let text = String::from_utf8(m.render()).unwrap();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("rstudio_pool_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        assert!(text.contains("rstudio_pool_proxy_requests_total{class=\"2xx\",path=\"edge\"} 1"));
        assert!(text.contains("rstudio_pool_proxy_requests_total{class=\"5xx\",path=\"page\"} 1"));
        assert!(text.contains("rstudio_pool_proxy_requests_total{class=\"1xx\",path=\"tunnel\"} 1"));
        assert!(text.contains(
            "rstudio_pool_assignments_total{outcome=\"pool_full\",purpose=\"rstudio\"} 0"
        ));
    }
}
