//! Configuration in layers, as River does it: the YAML file's sections (serde structs), then
//! the environment overrides with the original deployment's names, then one validated
//! [`Config`] that the rest of the program uses. Pingora's own server keys share the file and
//! are parsed by Pingora; a key that neither knows is an error that names it.
//!
//! Validation never panics: every problem comes back as a [`ConfigError`] that names the key,
//! the environment variable where there is one, and what to write instead.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::core::breaker::BreakerSettings;
use crate::core::ledger::Rates;
use crate::core::pool::Limits;
use crate::core::route::Keepalive;
use crate::core::warm::{Forecast, Schedule, ScheduleRange, WarmPolicy};

/// The embedded default, also shipped as `conf/local.yaml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../conf/local.yaml");

/// The purpose a request without `purpose` is for: the original callers asked for RStudio.
pub const DEFAULT_PURPOSE: &str = "rstudio";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Yaml(String),
    #[error("`{key}`{env}: {problem}")]
    Invalid {
        key: &'static str,
        env: String,
        problem: String,
    },
    #[error("unknown top-level key `{0}`: it is neither one of ours (pool, provider, api, proxy, auth, purposes, log, simulate) nor one of Pingora's server keys; fix the spelling or remove it")]
    UnknownKey(String),
}

fn invalid(key: &'static str, env: Option<&str>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        env: env.map(|e| format!(" (env {e})")).unwrap_or_default(),
        problem: problem.into(),
    }
}

// ---- The file, as written ----

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileConfig {
    pool: PoolSection,
    provider: ProviderSection,
    api: ApiSection,
    proxy: ProxySection,
    auth: AuthSection,
    purposes: BTreeMap<String, PurposeSection>,
    log: LogSection,
    simulate: SimulateSection,
}

/// `pool.warm_policy` (and `purposes.<name>.warm_policy`), as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WarmPolicySection {
    kind: Option<String>,
    // schedule
    ranges: Option<Vec<ScheduleRangeSection>>,
    otherwise: Option<usize>,
    utc_offset_minutes: Option<i32>,
    // forecast
    floor: Option<usize>,
    max_free: Option<usize>,
    miss_probability: Option<f64>,
    learning_rate: Option<f64>,
    lead_minutes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleRangeSection {
    when: String,
    min_free: usize,
}

/// `simulate`: what `rstudio-pool simulate` assumes of the provider.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SimulateSection {
    ready_median_seconds: Option<f64>,
    ready_p95_seconds: Option<f64>,
    resume_median_seconds: Option<f64>,
    resume_p95_seconds: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LogSection {
    format: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: "text".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AuthSection {
    mode: String,
    secrets: Vec<String>,
    link_ttl_seconds: u64,
    session_ttl_seconds: u64,
    user_header: String,
    trusted_networks: Vec<String>,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            mode: "token".into(),
            secrets: Vec::new(),
            link_ttl_seconds: 300,
            session_ttl_seconds: 12 * 3600,
            user_header: "X-Forwarded-User".into(),
            trusted_networks: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PoolSection {
    name: String,
    min_free_instances: usize,
    max_instances: usize,
    ready_timeout_seconds: u64,
    reconcile_interval_ms: u64,
    launch_failures_to_pause: u32,
    launch_pause_seconds: u64,
    warm_policy: WarmPolicySection,
    currency: String,
    scale_down_after_seconds: u64,
}

impl Default for PoolSection {
    fn default() -> Self {
        Self {
            name: "rstudio-pool".into(),
            min_free_instances: 1,
            max_instances: 10,
            ready_timeout_seconds: 600,
            reconcile_interval_ms: 1000,
            launch_failures_to_pause: 3,
            launch_pause_seconds: 60,
            warm_policy: WarmPolicySection::default(),
            currency: "USD".into(),
            scale_down_after_seconds: 600,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ProviderSection {
    kind: String,
    state_dir: PathBuf,
    ec2: Ec2Section,
}

impl Default for ProviderSection {
    fn default() -> Self {
        Self {
            kind: "process".into(),
            state_dir: PathBuf::from(".rstudio-pool/state"),
            ec2: Ec2Section::default(),
        }
    }
}

/// The original deployment's EC2 settings, kept under their names.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ec2Section {
    pub image_id: Option<String>,
    pub image_type: Option<String>,
    pub region: Option<String>,
    pub account: Option<String>,
    pub security_group: Option<String>,
    pub instance_profile: Option<String>,
    pub key_name: Option<String>,
    pub subnet_id: Option<String>,
    pub address_template: Option<String>,
    pub launch_rate_per_second: Option<f64>,
    pub launch_burst: Option<u32>,
    pub user_data_template: Option<PathBuf>,
    pub listing_lag_seconds: Option<u64>,
    pub missing_grace_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ApiSection {
    listen: String,
    token: Option<String>,
    max_body_bytes: usize,
    threads: usize,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:3001".into(),
            token: None,
            max_body_bytes: 64 * 1024,
            // Commands are few and light; one thread answered a burst of 200 assignments
            // faster than two, which met the callers on the same cores (BENCHMARKS.md).
            threads: 1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ProxySection {
    listen: String,
    public_url: Option<String>,
    default_url: Option<String>,
    service_url: Option<String>,
    route_to_replace: Option<String>,
    string_to_replace: Option<String>,
    timeout_instance_ms: u64,
    downstream_read_timeout_ms: u64,
    request_head_timeout_ms: u64,
    max_connections: usize,
    own_forwarding: bool,
    websocket_idle_timeout_ms: u64,
    upstream_connect_timeout_ms: u64,
    host_domain: Option<String>,
    tls: Option<TlsSection>,
    redirect_http: Option<String>,
}

/// `proxy.tls`: the certificate the proxy presents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: PathBuf,
    key: PathBuf,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8081".into(),
            public_url: None,
            default_url: None,
            service_url: None,
            route_to_replace: None,
            string_to_replace: None,
            timeout_instance_ms: 3_600_000,
            downstream_read_timeout_ms: 60_000,
            request_head_timeout_ms: 15_000,
            max_connections: 16_384,
            own_forwarding: true,
            websocket_idle_timeout_ms: 86_400_000,
            upstream_connect_timeout_ms: 5_000,
            host_domain: None,
            tls: None,
            redirect_http: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PurposeSection {
    command: Option<Vec<String>>,
    port: Option<u16>,
    strip_prefix: Option<bool>,
    readiness_path: Option<String>,
    keepalive_paths: Option<Vec<String>>,
    min_free_instances: Option<usize>,
    max_instances: Option<usize>,
    timeout_instance_ms: Option<u64>,
    image: Option<String>,
    docker_args: Option<Vec<String>>,
    container_command: Option<Vec<String>>,
    readiness_status: Option<u16>,
    readiness_user_agent: Option<String>,
    root_path_header: Option<String>,
    image_id: Option<String>,
    instance_type: Option<String>,
    on_idle: Option<String>,
    max_paused_instances: Option<usize>,
    paused_ttl_hours: Option<u64>,
    root_volume_gb: Option<u32>,
    root_volume_encrypted: Option<bool>,
    root_device_name: Option<String>,
    warm_policy: Option<WarmPolicySection>,
    hourly_cost: Option<f64>,
    paused_hourly_cost: Option<f64>,
}

// ---- The validated configuration ----

#[derive(Debug, Clone)]
pub struct Config {
    pub pool_name: String,
    /// Where this process keeps what it must not forget across a restart: the spent links
    /// (both providers) and the process provider's records, journal and folders.
    pub state_dir: PathBuf,
    pub provider: ProviderConfig,
    pub api: ApiConfig,
    pub proxy: ProxyConfig,
    pub auth: AuthConfig,
    pub purposes: BTreeMap<String, Purpose>,
    pub ready_timeout: Duration,
    pub reconcile_interval: Duration,
    /// When launches of a purpose stop after failures, and for how long.
    pub breaker: BreakerSettings,
    /// `log.format` (`LOG_FORMAT`): lines of text, or JSON objects for log shippers.
    pub log_format: crate::audit::LogFormat,
    /// Things worth a line in the log once it is set up.
    pub notes: Vec<String>,
    /// The currency of `hourly_cost` (`pool.currency`), for reports.
    pub currency: String,
    pub simulate: SimulateConfig,
}

#[derive(Debug, Clone)]
pub enum ProviderConfig {
    /// Its records, journal and folders are under [`Config::state_dir`].
    Process,
    Ec2(Box<Ec2Config>),
}

/// The default user data template: install docker, pull the purpose's image, run it.
pub const USER_DATA_TEMPLATE: &str = include_str!("../rstudio/user-data.sh");
/// EC2 refuses user data over 16 KB.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// The validated settings of the ec2 provider.
#[derive(Debug, Clone)]
pub struct Ec2Config {
    pub region: Option<String>,
    pub image_id: String,
    pub instance_type: String,
    pub key_name: Option<String>,
    pub security_group_ids: Vec<String>,
    /// A name, or an ARN.
    pub instance_profile: Option<String>,
    pub subnet_id: Option<String>,
    /// `host:port` the proxy connects to, from `{private_ip}`, `{private_dns}`, `{public_ip}`,
    /// `{public_dns}` and `{port}`.
    pub address_template: String,
    /// The original proxy's rewrite of the address: every `route_to_replace` in the host
    /// becomes `string_to_replace`.
    pub route_to_replace: Option<String>,
    pub string_to_replace: Option<String>,
    pub launch_rate_per_second: f64,
    pub launch_burst: u32,
    /// How far EC2's listings may lag behind a launch.
    pub listing_lag: Duration,
    /// How long a known instance may be missing from listings before it is taken for gone.
    pub missing_grace: Duration,
    /// Rendered user data per purpose (plain text; the provider base64-encodes it).
    pub user_data: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// Worker threads of the command API's service (Pingora's `threads` sizes the others).
    pub threads: usize,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// The base URL users reach the proxy at, for the `url` of `REQUEST_RSTUDIO`.
    pub public_url: String,
    /// Where paths that name no instance go, as the original proxy sent them.
    pub default_url: Option<DefaultUrl>,
    pub route_to_replace: Option<String>,
    pub string_to_replace: Option<String>,
    /// How long a client may stay silent while sending a request; `None` waits forever.
    pub downstream_read_timeout: Option<Duration>,
    /// How long a client may take over a whole request head; `None` waits forever.
    pub request_head_timeout: Option<Duration>,
    /// Client connections the edge holds at once; more are answered 503.
    pub max_connections: usize,
    /// Whether the edge carries plain requests and WebSocket tunnels itself; `false` hands
    /// every request to Pingora.
    pub own_forwarding: bool,
    /// How long an upgraded (WebSocket) connection may stay silent; `None` waits forever.
    pub websocket_idle_timeout: Option<Duration>,
    pub upstream_connect_timeout: Duration,
    /// Host routing: `i-<id>.<host_domain>` reaches instance `i-<id>` at its root, each
    /// workspace in its own browser origin.
    pub host_domain: Option<String>,
    /// TLS on the proxy's listener: the certificate chain and key files (PEM).
    pub tls: Option<TlsFiles>,
    /// Where plain HTTP is answered with a redirect to the HTTPS proxy (with TLS only).
    pub redirect_http: Option<SocketAddr>,
}

/// The certificate chain and private key the proxy presents (PEM files).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Who may reach an instance through the proxy.
#[derive(Debug, Clone)]
pub enum AuthConfig {
    /// Anyone who knows the URL: only allowed when the proxy listens on loopback.
    None,
    /// Signed single-use links exchanged for session cookies.
    Token {
        secrets: Vec<Vec<u8>>,
        /// True when no secret was configured and one was made up at start.
        generated: bool,
        link_ttl: Duration,
        session_ttl: Duration,
    },
    /// The user named by a header set by an authenticating proxy in front of us, believed
    /// only from the trusted networks.
    Header {
        header: String,
        trusted_networks: Vec<crate::core::access::Network>,
    },
}

/// `DEFAULT_URL`, taken apart. An `http://` URL is proxied, as the original did; an
/// `https://` one is redirected to, since the proxy speaks plain HTTP to its upstreams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultUrl {
    pub url: String,
    pub https: bool,
    /// `host:port`, the port filled in from the scheme.
    pub authority: String,
    /// The host as the `Host` header names it.
    pub host_header: String,
}

impl DefaultUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(format!("`{url}` must start with http:// or https://"));
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "`{url}` has no host (write it like http://intranet.example:8080)"
            ));
        }
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let full = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:{}", if https { 443 } else { 80 })
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            https,
            authority: full,
            host_header: authority.to_owned(),
        })
    }
}

/// One kind of workspace: how to start it, reach it, and tell its users' activity apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Purpose {
    pub name: String,
    pub limits: Limits,
    /// The process provider's command line.
    pub command: Vec<String>,
    /// The port the workspace listens on inside an EC2 instance.
    pub port: u16,
    /// Whether the proxy strips `/i-<id>` before forwarding (RStudio) or keeps it (JupyterLab).
    pub strip_prefix: bool,
    /// The readiness probe's path, relative to the workspace root.
    pub readiness_path: String,
    /// Requests (a method and a path after the prefix) that are keepalives, not user
    /// activity.
    pub keepalive_paths: Vec<Keepalive>,
    pub idle_timeout: Duration,
    /// The docker image EC2 instances of this purpose run.
    pub image: Option<String>,
    /// Extra `docker run` arguments (environment, volumes).
    pub docker_args: Vec<String>,
    /// Arguments after the image in `docker run` (the container's command); `{base_path}`
    /// becomes `/<instance id>/` on the instance.
    pub container_command: Vec<String>,
    /// The status the readiness probe expects; any 2xx or 3xx when `None`.
    pub readiness_status: Option<u16>,
    /// The probe's `User-Agent`: RStudio redirects `/` for agents that are not browsers.
    pub readiness_user_agent: String,
    /// The header that tells a prefix-stripped workspace its root (`X-RStudio-Root-Path`).
    pub root_path_header: Option<String>,
    /// This purpose's AMI and instance type on EC2, over the provider's.
    pub image_id: Option<String>,
    pub instance_type: Option<String>,
    /// What happens to an instance whose user has been idle past the timeout.
    pub on_idle: OnIdle,
    /// Paused instances of this purpose at most (the oldest are terminated past it).
    pub max_paused: Option<usize>,
    /// How long an instance stays paused before it is terminated.
    pub paused_ttl: Duration,
    /// The EC2 root volume: its size in GiB (the AMI's when `None`), whether it is encrypted,
    /// and the device name the AMI gives it.
    pub root_volume_gb: Option<u32>,
    pub root_volume_encrypted: bool,
    pub root_device_name: String,
    /// How many free instances to keep warm, and when (`warm_policy`).
    pub warm: WarmPolicy,
    /// What its instances cost (`hourly_cost`, `paused_hourly_cost`).
    pub rates: Rates,
    /// How long a free instance beyond the warm policy's target is kept before it is let go
    /// (`pool.scale_down_after_seconds`).
    pub scale_down_after: Duration,
}

/// What `rstudio-pool simulate` assumes of the provider (`simulate`): how long a start takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulateConfig {
    /// From a launch to a workspace that answers.
    pub ready: ReadyDist,
    /// From a resume (a start of a paused instance) to a workspace that answers.
    pub resume: ReadyDist,
    /// Whether these are the defaults for the provider, and which ones.
    pub source: &'static str,
}

/// A time to ready, log-normal, given by its median and 95th percentile in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadyDist {
    pub median_s: f64,
    pub p95_s: f64,
}

/// EC2 defaults (**public** figures and estimates, rstudio/README.md "What each path costs in
/// time to ready"): a stock AMI is ready in about 1 to 2.5 min; a start from stopped is a
/// boot (about 23 s, public) plus the container's start (about 3 s) and the probe.
pub const EC2_READY: ReadyDist = ReadyDist {
    median_s: 90.0,
    p95_s: 150.0,
};
pub const EC2_RESUME: ReadyDist = ReadyDist {
    median_s: 30.0,
    p95_s: 60.0,
};
/// Process provider defaults, measured (COSTS.md): the demo workspace's launch to ready
/// (`rstudio_pool_launch_to_ready_seconds`: 20 launches of conf/local.yaml, mean 0.10 s,
/// every one within 0.5 s).
pub const PROCESS_READY: ReadyDist = ReadyDist {
    median_s: 0.1,
    p95_s: 0.5,
};

/// What idleness does to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIdle {
    /// Stop it with its disk (the user's files) kept; the owner's next request resumes it.
    Stop,
    /// Stop it with its memory too (EC2 hibernation: the R session comes back as it was).
    Hibernate,
    /// Terminate it (the original service's behaviour): its work is gone.
    Terminate,
}

impl Purpose {
    /// The probe's path on the workspace: under the instance's prefix when the workspace
    /// keeps it (JupyterLab serves from its base URL).
    pub fn probe_path(&self, id: &str) -> String {
        if self.strip_prefix {
            self.readiness_path.clone()
        } else {
            format!("/{id}{}", self.readiness_path)
        }
    }
}

impl Config {
    /// Reads a YAML file (or the embedded default when `path` is `None`), applies the
    /// environment and validates. Returns the text too, for Pingora's own parse.
    pub fn load(
        path: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Config, String), ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?,
            None => EMBEDDED_DEFAULT.to_owned(),
        };
        let config = Self::from_yaml(&text, env)?;
        Ok((config, text))
    }

    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        check_top_level_keys(text)?;
        let file: FileConfig =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
        build(file, env)
    }
}

/// Our sections plus whatever Pingora's `ServerConf` knows; anything else is a typo.
fn check_top_level_keys(text: &str) -> Result<(), ConfigError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
    let Some(map) = value.as_mapping() else {
        return match value {
            serde_yaml::Value::Null => Ok(()),
            _ => Err(ConfigError::Yaml(
                "the configuration must be a YAML mapping of keys to values".into(),
            )),
        };
    };
    let pingora_keys =
        serde_yaml::to_value(pingora_core::server::configuration::ServerConf::default())
            .ok()
            .and_then(|v| v.as_mapping().cloned())
            .unwrap_or_default();
    for key in map.keys() {
        let name = key.as_str().unwrap_or_default();
        let ours = matches!(
            name,
            "pool" | "provider" | "api" | "proxy" | "auth" | "purposes" | "log" | "simulate"
        );
        if !ours && !pingora_keys.contains_key(key) {
            return Err(ConfigError::UnknownKey(name.to_owned()));
        }
    }
    Ok(())
}

fn parse_env<T: std::str::FromStr>(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    key: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env(name) {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| invalid(key, Some(name), format!("`{text}` is not valid here: {e}"))),
    }
}

fn build(
    mut file: FileConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    // Environment overrides, with the original deployment's names.
    if let Some(v) = parse_env(env, "MIN_FREE_INSTANCES", "pool.min_free_instances")? {
        file.pool.min_free_instances = v;
    }
    if let Some(v) = parse_env(env, "MAX_INSTANCES", "pool.max_instances")? {
        file.pool.max_instances = v;
    }
    if let Some(v) = env("PROVIDER") {
        file.provider.kind = v;
    }
    if let Some(v) = env("STATE_DIR") {
        file.provider.state_dir = PathBuf::from(v);
    }
    let ec2 = &mut file.provider.ec2;
    for (name, slot) in [
        ("IMAGE_ID", &mut ec2.image_id),
        ("IMAGE_TYPE", &mut ec2.image_type),
        ("REGION", &mut ec2.region),
        ("ACCOUNT", &mut ec2.account),
        ("SECURITY_GROUP", &mut ec2.security_group),
        ("INSTANCE_PROFILE", &mut ec2.instance_profile),
        ("KEY_NAME", &mut ec2.key_name),
        ("SUBNET_ID", &mut ec2.subnet_id),
    ] {
        if let Some(v) = env(name) {
            *slot = Some(v);
        }
    }
    if ec2.region.is_none() {
        ec2.region = env("AWS_REGION");
    }
    if let Some(v) = env("API_LISTEN") {
        file.api.listen = v;
    }
    if let Some(v) = env("API_TOKEN") {
        file.api.token = Some(v);
    }
    if let Some(port) = parse_env::<u16>(env, "PORT", "proxy.listen")? {
        // The original proxy took only a port; keep the host of the file.
        let host = file
            .proxy
            .listen
            .rsplit_once(':')
            .map(|(h, _)| h.to_owned())
            .unwrap_or_else(|| "127.0.0.1".into());
        file.proxy.listen = format!("{host}:{port}");
    }
    for (name, slot) in [
        ("PUBLIC_URL", &mut file.proxy.public_url),
        ("DEFAULT_URL", &mut file.proxy.default_url),
        ("SERVICE_URL", &mut file.proxy.service_url),
        ("ROUTE_TO_REPLACE", &mut file.proxy.route_to_replace),
        ("STRING_TO_REPLACE", &mut file.proxy.string_to_replace),
    ] {
        if let Some(v) = env(name) {
            *slot = Some(v);
        }
    }
    if let Some(v) = env("AUTH_MODE") {
        file.auth.mode = v;
    }
    if let Some(v) = env("AUTH_SECRETS") {
        file.auth.secrets = v
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
    }
    if let Some(v) = parse_env(env, "TIMEOUT_INSTANCE", "proxy.timeout_instance_ms")? {
        file.proxy.timeout_instance_ms = v;
    }

    // Validation.
    let pool_limits = Limits {
        min_free: file.pool.min_free_instances,
        max: file.pool.max_instances,
    };
    check_limits(pool_limits, "pool.max_instances", Some("MAX_INSTANCES"))?;
    if file.pool.name.is_empty()
        || !file
            .pool
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            "pool.name",
            None,
            "use letters, digits, `-` and `_` only (it becomes a tag value and a file name)",
        ));
    }
    if file.proxy.timeout_instance_ms == 0 {
        return Err(invalid(
            "proxy.timeout_instance_ms",
            Some("TIMEOUT_INSTANCE"),
            "must be more than 0 milliseconds",
        ));
    }
    if file.pool.reconcile_interval_ms == 0 {
        return Err(invalid(
            "pool.reconcile_interval_ms",
            None,
            "must be more than 0 milliseconds",
        ));
    }
    if file.pool.launch_failures_to_pause == 0 {
        return Err(invalid(
            "pool.launch_failures_to_pause",
            None,
            "must be at least 1 (failed starts in a row that pause launching)",
        ));
    }
    if file.pool.launch_pause_seconds == 0 {
        return Err(invalid(
            "pool.launch_pause_seconds",
            None,
            "must be more than 0 seconds",
        ));
    }

    let api_listen: SocketAddr = file.api.listen.parse().map_err(|_| {
        invalid(
            "api.listen",
            Some("API_LISTEN"),
            format!(
                "`{}` is not host:port with an IP address, like 127.0.0.1:3001",
                file.api.listen
            ),
        )
    })?;
    if file.api.threads == 0 {
        return Err(invalid(
            "api.threads",
            None,
            "must be at least 1 (the command API needs a thread; 1 is plenty)",
        ));
    }
    let api_token = file.api.token.filter(|t| !t.is_empty());
    if !api_listen.ip().is_loopback() && api_token.is_none() {
        return Err(invalid(
            "api.token",
            Some("API_TOKEN"),
            format!("the command API listens on {api_listen}, which is not loopback: set a bearer token so that only your application can assign and delete workspaces"),
        ));
    }
    let proxy_listen: SocketAddr = file.proxy.listen.parse().map_err(|_| {
        invalid(
            "proxy.listen",
            Some("PORT"),
            format!(
                "`{}` is not host:port with an IP address, like 127.0.0.1:8081",
                file.proxy.listen
            ),
        )
    })?;
    // Pingora binds with SO_REUSEPORT: two services on one address would share its
    // connections at random, each answering the other's requests with 404s.
    let overlap = |a: IpAddr, b: IpAddr| a == b || a.is_unspecified() || b.is_unspecified();
    if api_listen.port() == proxy_listen.port() && overlap(api_listen.ip(), proxy_listen.ip()) {
        return Err(invalid(
            "api.listen",
            Some("API_LISTEN"),
            format!("the command API and the proxy ({proxy_listen}) cannot share {api_listen}: give the API another port"),
        ));
    }
    let public_url = match file.proxy.public_url {
        Some(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "proxy.public_url",
                    Some("PUBLIC_URL"),
                    format!("`{url}` must start with http:// or https://"),
                ));
            }
            url.trim_end_matches('/').to_owned()
        }
        None if file.proxy.tls.is_some() => format!("https://{proxy_listen}"),
        None => format!("http://{proxy_listen}"),
    };
    let tls = match file.proxy.tls {
        Some(section) => {
            // Checked now, so that `-t` and a start say what is wrong with the files.
            crate::tls::read(&section.cert, &section.key)
                .map_err(|problem| invalid("proxy.tls", None, problem))?;
            Some(TlsFiles {
                cert: section.cert,
                key: section.key,
            })
        }
        None => None,
    };
    let redirect_http = match file.proxy.redirect_http.filter(|r| !r.is_empty()) {
        None => None,
        Some(_) if tls.is_none() => {
            return Err(invalid(
                "proxy.redirect_http",
                None,
                "redirects to HTTPS need `proxy.tls` (the proxy's certificate)",
            ))
        }
        Some(addr) => {
            let parsed: SocketAddr = addr.parse().map_err(|_| {
                invalid(
                    "proxy.redirect_http",
                    None,
                    format!("`{addr}` is not host:port with an IP address, like 0.0.0.0:80"),
                )
            })?;
            if parsed.port() == proxy_listen.port() && overlap(parsed.ip(), proxy_listen.ip()) {
                return Err(invalid(
                    "proxy.redirect_http",
                    None,
                    format!("the redirect and the proxy ({proxy_listen}) cannot share {parsed}"),
                ));
            }
            Some(parsed)
        }
    };
    let default_url = match &file.proxy.default_url {
        Some(url) if !url.is_empty() => Some(
            DefaultUrl::parse(url)
                .map_err(|problem| invalid("proxy.default_url", Some("DEFAULT_URL"), problem))?,
        ),
        _ => None,
    };
    if let Some(v) = env("LOG_FORMAT") {
        file.log.format = v;
    }
    let log_format = match file.log.format.as_str() {
        "text" => crate::audit::LogFormat::Text,
        "json" => crate::audit::LogFormat::Json,
        other => {
            return Err(invalid(
                "log.format",
                Some("LOG_FORMAT"),
                format!("`{other}` is not a log format: use `text` or `json`"),
            ))
        }
    };
    let mut notes = Vec::new();
    if let Some(url) = &file.proxy.service_url {
        notes.push(format!("SERVICE_URL={url} is accepted for compatibility and not needed: the pool and the proxy are one process now"));
    }

    let provider = match file.provider.kind.as_str() {
        "process" => ProviderKind::Process,
        "ec2" => ProviderKind::Ec2,
        other => {
            return Err(invalid(
                "provider.kind",
                Some("PROVIDER"),
                format!("`{other}` is not a provider: use `process` or `ec2`"),
            ))
        }
    };

    let mut purposes = BTreeMap::new();
    let mut sections = file.purposes;
    sections.entry(DEFAULT_PURPOSE.to_owned()).or_default();
    for (name, section) in sections {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(invalid(
                "purposes",
                None,
                format!("`{name}` is not a purpose name: use letters, digits and `-`"),
            ));
        }
        let preset = preset(&name);
        let limits = Limits {
            min_free: section.min_free_instances.unwrap_or(pool_limits.min_free),
            max: section.max_instances.unwrap_or(pool_limits.max),
        };
        check_limits(limits, "purposes.<name>.max_instances", None)?;
        let command = section.command.or(preset.command).unwrap_or_default();
        if provider == ProviderKind::Process && command.is_empty() {
            return Err(invalid(
                "purposes.<name>.command",
                None,
                format!("purpose `{name}` has no command for the process provider: give the program and its arguments, with {{port}} where its port goes"),
            ));
        }
        let readiness_path = section
            .readiness_path
            .or(preset.readiness_path)
            .unwrap_or_else(|| "/".into());
        if !readiness_path.starts_with('/') {
            return Err(invalid(
                "purposes.<name>.readiness_path",
                None,
                format!("`{readiness_path}` must start with /"),
            ));
        }
        if let Some(header) = section
            .root_path_header
            .as_deref()
            .filter(|h| !h.is_empty())
        {
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                return Err(invalid(
                    "purposes.<name>.root_path_header",
                    None,
                    format!("`{header}` is not a header name (purpose `{name}`)"),
                ));
            }
        }
        let timeout_ms = section
            .timeout_instance_ms
            .unwrap_or(file.proxy.timeout_instance_ms);
        let on_idle = match section.on_idle.as_deref().unwrap_or("stop") {
            "stop" => OnIdle::Stop,
            "hibernate" => OnIdle::Hibernate,
            "terminate" => OnIdle::Terminate,
            other => {
                return Err(invalid(
                    "purposes.<name>.on_idle",
                    None,
                    format!("`{other}` (purpose `{name}`): use `stop` (keep the user's files), `hibernate` (EC2: their memory too) or `terminate`"),
                ))
            }
        };
        if on_idle == OnIdle::Hibernate
            && provider == ProviderKind::Ec2
            && !(section.root_volume_encrypted == Some(true) && section.root_volume_gb.is_some())
        {
            return Err(invalid(
                "purposes.<name>.root_volume_gb",
                None,
                format!("purpose `{name}` hibernates on EC2, which needs an encrypted root volume large enough for the instance's memory and the system: set root_volume_gb (memory plus the AMI's size) and root_volume_encrypted: true"),
            ));
        }
        let warm = warm_policy(
            section
                .warm_policy
                .as_ref()
                .unwrap_or(&file.pool.warm_policy),
            limits,
            &name,
        )?;
        let rates = Rates {
            hourly: cost(section.hourly_cost, "purposes.<name>.hourly_cost", &name)?,
            paused_hourly: cost(
                section.paused_hourly_cost,
                "purposes.<name>.paused_hourly_cost",
                &name,
            )?,
        };
        let paused_ttl_hours = section.paused_ttl_hours.unwrap_or(336);
        if paused_ttl_hours == 0 {
            return Err(invalid(
                "purposes.<name>.paused_ttl_hours",
                None,
                format!("purpose `{name}`: must be at least 1 hour (use on_idle: terminate to keep nothing)"),
            ));
        }
        purposes.insert(
            name.clone(),
            Purpose {
                name: name.clone(),
                limits,
                command,
                port: section.port.or(preset.port).unwrap_or(8787),
                strip_prefix: section.strip_prefix.or(preset.strip_prefix).unwrap_or(true),
                readiness_path,
                keepalive_paths: section
                    .keepalive_paths
                    .or(preset.keepalive_paths)
                    .unwrap_or_default()
                    .iter()
                    .map(|rule| Keepalive::parse(rule))
                    .collect::<Result<_, _>>()
                    .map_err(|e| {
                        invalid(
                            "purposes.<name>.keepalive_paths",
                            None,
                            format!("purpose `{name}`: {e}"),
                        )
                    })?,
                idle_timeout: Duration::from_millis(timeout_ms.max(1)),
                image: section.image.or(preset.image),
                docker_args: section
                    .docker_args
                    .or(preset.docker_args)
                    .unwrap_or_default(),
                container_command: section
                    .container_command
                    .or(preset.container_command)
                    .unwrap_or_default(),
                readiness_status: section.readiness_status.or(preset.readiness_status),
                readiness_user_agent: section
                    .readiness_user_agent
                    .or(preset.readiness_user_agent)
                    .unwrap_or_else(|| "rstudio-pool readiness probe".into()),
                root_path_header: section
                    .root_path_header
                    .or(preset.root_path_header)
                    .filter(|h| !h.is_empty()),
                image_id: section.image_id.or(preset.image_id),
                instance_type: section.instance_type.or(preset.instance_type),
                on_idle,
                max_paused: section.max_paused_instances,
                paused_ttl: Duration::from_secs(paused_ttl_hours.saturating_mul(3600)),
                root_volume_gb: section.root_volume_gb,
                root_volume_encrypted: section.root_volume_encrypted.unwrap_or(false),
                root_device_name: section
                    .root_device_name
                    .unwrap_or_else(|| "/dev/xvda".into()),
                warm,
                rates,
                scale_down_after: Duration::from_secs(file.pool.scale_down_after_seconds),
            },
        );
    }

    let simulate = simulate_config(&file.simulate, provider)?;
    let provider = match provider {
        ProviderKind::Process => ProviderConfig::Process,
        ProviderKind::Ec2 => ProviderConfig::Ec2(Box::new(ec2_config(
            file.provider.ec2,
            &file.proxy.route_to_replace,
            &file.proxy.string_to_replace,
            &mut purposes,
        )?)),
    };

    let auth = match file.auth.mode.as_str() {
        "none" => {
            if !proxy_listen.ip().is_loopback() {
                return Err(invalid(
                    "auth.mode",
                    Some("AUTH_MODE"),
                    format!("`none` lets anyone who knows a workspace's URL into it; the proxy listens on {proxy_listen}, which is not loopback: use `token` or `header`"),
                ));
            }
            AuthConfig::None
        }
        "token" => {
            let generated = file.auth.secrets.is_empty();
            let secrets = if generated {
                vec![rand::random::<[u8; 32]>().to_vec()]
            } else {
                if let Some(short) = file.auth.secrets.iter().find(|s| s.len() < 16) {
                    return Err(invalid(
                        "auth.secrets",
                        Some("AUTH_SECRETS"),
                        format!("a secret of {} characters is too short to sign with: use at least 16 random characters", short.len()),
                    ));
                }
                file.auth
                    .secrets
                    .iter()
                    .map(|s| s.as_bytes().to_vec())
                    .collect()
            };
            AuthConfig::Token {
                secrets,
                generated,
                link_ttl: Duration::from_secs(file.auth.link_ttl_seconds.max(1)),
                session_ttl: Duration::from_secs(file.auth.session_ttl_seconds.max(1)),
            }
        }
        "header" => {
            if file.auth.trusted_networks.is_empty() {
                return Err(invalid(
                    "auth.trusted_networks",
                    None,
                    "header mode needs the networks of the authenticating proxy (like 10.0.0.0/8): a user header from anywhere else is ignored",
                ));
            }
            let trusted_networks = file
                .auth
                .trusted_networks
                .iter()
                .map(|n| {
                    n.parse()
                        .map_err(|e: String| invalid("auth.trusted_networks", None, e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if http::HeaderName::from_bytes(file.auth.user_header.as_bytes()).is_err() {
                return Err(invalid(
                    "auth.user_header",
                    None,
                    format!("`{}` is not a header name", file.auth.user_header),
                ));
            }
            AuthConfig::Header {
                header: file.auth.user_header.to_ascii_lowercase(),
                trusted_networks,
            }
        }
        other => {
            return Err(invalid(
                "auth.mode",
                Some("AUTH_MODE"),
                format!("`{other}` is not an access mode: use `token`, `header` or `none`"),
            ))
        }
    };
    let host_domain = match file.proxy.host_domain.filter(|d| !d.is_empty()) {
        Some(d) if d.starts_with('.') || d.contains('/') || d.contains(':') => {
            return Err(invalid(
                "proxy.host_domain",
                None,
                format!("`{d}` must be a bare domain like workspaces.example.com"),
            ))
        }
        other => other.map(|d| d.to_ascii_lowercase()),
    };

    Ok(Config {
        pool_name: file.pool.name,
        state_dir: file.provider.state_dir,
        auth,
        provider,
        api: ApiConfig {
            listen: api_listen,
            token: api_token,
            max_body_bytes: file.api.max_body_bytes.max(1024),
            threads: file.api.threads,
        },
        proxy: ProxyConfig {
            listen: proxy_listen,
            public_url,
            default_url,
            route_to_replace: file.proxy.route_to_replace,
            string_to_replace: file.proxy.string_to_replace,
            downstream_read_timeout: optional_ms(file.proxy.downstream_read_timeout_ms),
            request_head_timeout: optional_ms(file.proxy.request_head_timeout_ms),
            max_connections: file.proxy.max_connections.max(1),
            own_forwarding: file.proxy.own_forwarding,
            websocket_idle_timeout: optional_ms(file.proxy.websocket_idle_timeout_ms),
            upstream_connect_timeout: Duration::from_millis(
                file.proxy.upstream_connect_timeout_ms.max(1),
            ),
            host_domain,
            tls,
            redirect_http,
        },
        purposes,
        currency: file.pool.currency,
        simulate,
        ready_timeout: Duration::from_secs(file.pool.ready_timeout_seconds.max(1)),
        reconcile_interval: Duration::from_millis(file.pool.reconcile_interval_ms),
        log_format,
        notes,
        breaker: BreakerSettings {
            failures_to_open: file.pool.launch_failures_to_pause,
            first_pause_ms: file.pool.launch_pause_seconds.saturating_mul(1000),
            max_pause_ms: MAX_LAUNCH_PAUSE_MS
                .max(file.pool.launch_pause_seconds.saturating_mul(1000)),
            // A probe launch has its readiness timeout and a minute for the launch itself.
            probe_window_ms: file
                .pool
                .ready_timeout_seconds
                .max(1)
                .saturating_add(60)
                .saturating_mul(1000),
        },
    })
}

/// A price per hour: absent is 0; negative or not a number is refused.
fn cost(value: Option<f64>, key: &'static str, purpose: &str) -> Result<f64, ConfigError> {
    match value {
        None => Ok(0.0),
        Some(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Some(v) => Err(invalid(
            key,
            None,
            format!("`{v}` (purpose `{purpose}`) is not a price: give the cost of one instance for one hour, 0 or more (e.g. 0.0832 for a t3.large in us-east-1)"),
        )),
    }
}

/// A warm policy written as YAML (`{kind: forecast, miss_probability: 0.02}`), for a purpose
/// with `limits`: what `rstudio-pool simulate --policy` reads.
pub fn parse_warm_policy(
    yaml: &str,
    limits: Limits,
    purpose: &str,
) -> Result<WarmPolicy, ConfigError> {
    let section: WarmPolicySection = serde_yaml::from_str(yaml).map_err(|e| {
        invalid(
            "pool.warm_policy",
            None,
            format!("`{yaml}`: {e}: write it as in the configuration, e.g. `{{kind: forecast, floor: 0}}`"),
        )
    })?;
    warm_policy(&section, limits, purpose)
}

/// The warm policy of a purpose from `warm_policy` (its own, or the pool's).
fn warm_policy(
    section: &WarmPolicySection,
    limits: Limits,
    purpose: &str,
) -> Result<WarmPolicy, ConfigError> {
    const KEY: &str = "pool.warm_policy";
    let kind = section.kind.as_deref().unwrap_or("fixed");
    let stray = |fields: &[(&str, bool)], kind: &str| -> Result<(), ConfigError> {
        match fields.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(invalid(
                KEY,
                None,
                format!("`{name}` (purpose `{purpose}`) is not a setting of the `{kind}` policy: remove it, or set `kind` to the policy it belongs to"),
            )),
            None => Ok(()),
        }
    };
    let schedule_fields = [
        ("ranges", section.ranges.is_some()),
        ("otherwise", section.otherwise.is_some()),
        ("utc_offset_minutes", section.utc_offset_minutes.is_some()),
    ];
    let forecast_fields = [
        ("floor", section.floor.is_some()),
        ("max_free", section.max_free.is_some()),
        ("miss_probability", section.miss_probability.is_some()),
        ("learning_rate", section.learning_rate.is_some()),
        ("lead_minutes", section.lead_minutes.is_some()),
    ];
    match kind {
        "fixed" => {
            stray(&schedule_fields, kind)?;
            stray(&forecast_fields, kind)?;
            Ok(WarmPolicy::Fixed {
                min_free: limits.min_free,
            })
        }
        "schedule" => {
            stray(&forecast_fields, kind)?;
            let offset = section.utc_offset_minutes.unwrap_or(0);
            if !(-14 * 60..=14 * 60).contains(&offset) {
                return Err(invalid(
                    KEY,
                    None,
                    format!("`utc_offset_minutes: {offset}` (purpose `{purpose}`) is not an offset: give the team's offset from UTC in minutes, -840 to 840 (60 for CET)"),
                ));
            }
            let mut ranges = Vec::new();
            for r in section.ranges.iter().flatten() {
                if r.min_free > limits.max {
                    return Err(invalid(
                        KEY,
                        None,
                        format!("`{}` keeps {} free (purpose `{purpose}`), above the maximum of {} instances: lower it or raise MAX_INSTANCES", r.when, r.min_free, limits.max),
                    ));
                }
                ranges.push(ScheduleRange::parse(&r.when, r.min_free).map_err(|e| {
                    invalid(KEY, None, format!("ranges (purpose `{purpose}`): {e}"))
                })?);
            }
            if ranges.is_empty() {
                return Err(invalid(
                    KEY,
                    None,
                    format!("the `schedule` policy of purpose `{purpose}` has no ranges: add e.g. `ranges: [{{when: \"mon-fri 08:00-18:00\", min_free: 3}}]`"),
                ));
            }
            Ok(WarmPolicy::Schedule(Schedule {
                ranges,
                otherwise: section.otherwise.unwrap_or(0).min(limits.max),
                utc_offset_minutes: offset,
            }))
        }
        "forecast" => {
            stray(&schedule_fields, kind)?;
            let miss = section.miss_probability.unwrap_or(0.02);
            if !(miss > 0.0 && miss < 1.0) {
                return Err(invalid(
                    KEY,
                    None,
                    format!("`miss_probability: {miss}` (purpose `{purpose}`) must be between 0 and 1 (exclusive): the accepted share of arrivals that find no warm instance, e.g. 0.02"),
                ));
            }
            let alpha = section.learning_rate.unwrap_or(0.3);
            if !(alpha > 0.0 && alpha <= 1.0) {
                return Err(invalid(
                    KEY,
                    None,
                    format!("`learning_rate: {alpha}` (purpose `{purpose}`) must be above 0 and at most 1: the weight of the newest week, e.g. 0.3"),
                ));
            }
            let floor = section.floor.unwrap_or(0);
            let max_free = section.max_free.unwrap_or(limits.max);
            if floor > max_free || floor > limits.max {
                return Err(invalid(
                    KEY,
                    None,
                    format!("`floor: {floor}` (purpose `{purpose}`) is above `max_free` ({max_free}) or the maximum of instances ({}): lower it", limits.max),
                ));
            }
            Ok(WarmPolicy::Forecast(Forecast {
                floor,
                max_free,
                miss_probability: miss,
                alpha,
                fallback: limits.min_free,
                lead_ms: section.lead_minutes.unwrap_or(15).saturating_mul(60_000),
            }))
        }
        other => Err(invalid(
            KEY,
            None,
            format!("`kind: {other}` (purpose `{purpose}`): use `fixed` (MIN_FREE_INSTANCES around the clock), `schedule` (minimum free per hour-of-week ranges) or `forecast` (learned from the pool's arrivals)"),
        )),
    }
}

/// What the simulator assumes of starts: the `simulate` section over the provider's defaults.
fn simulate_config(
    section: &SimulateSection,
    provider: ProviderKind,
) -> Result<SimulateConfig, ConfigError> {
    let (ready, resume, source) = match provider {
        ProviderKind::Ec2 => (
            EC2_READY,
            EC2_RESUME,
            "EC2 defaults (public figures and estimates)",
        ),
        ProviderKind::Process => (PROCESS_READY, PROCESS_READY, "process defaults (measured)"),
    };
    let pick = |median: Option<f64>, p95: Option<f64>, default: ReadyDist, key: &'static str| {
        let d = ReadyDist {
            median_s: median.unwrap_or(default.median_s),
            p95_s: p95.unwrap_or(default.p95_s),
        };
        if d.median_s > 0.0
            && d.median_s.is_finite()
            && d.p95_s >= d.median_s
            && d.p95_s.is_finite()
        {
            Ok(d)
        } else {
            Err(invalid(
                key,
                None,
                format!("median {} s, 95th percentile {} s: give a median above 0 and a 95th percentile at least as large", d.median_s, d.p95_s),
            ))
        }
    };
    let custom = section.ready_median_seconds.is_some()
        || section.ready_p95_seconds.is_some()
        || section.resume_median_seconds.is_some()
        || section.resume_p95_seconds.is_some();
    Ok(SimulateConfig {
        ready: pick(
            section.ready_median_seconds,
            section.ready_p95_seconds,
            ready,
            "simulate.ready_median_seconds",
        )?,
        resume: pick(
            section.resume_median_seconds,
            section.resume_p95_seconds,
            resume,
            "simulate.resume_median_seconds",
        )?,
        source: if custom { "configured" } else { source },
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProviderKind {
    Process,
    Ec2,
}

fn ec2_config(
    section: Ec2Section,
    route_to_replace: &Option<String>,
    string_to_replace: &Option<String>,
    purposes: &mut BTreeMap<String, Purpose>,
) -> Result<Ec2Config, ConfigError> {
    let image_id = section.image_id.filter(|s| !s.is_empty()).ok_or_else(|| {
        invalid(
            "provider.ec2.image_id",
            Some("IMAGE_ID"),
            "the ec2 provider needs the AMI to launch, like ami-0123456789abcdef0",
        )
    })?;
    let region = section.region.filter(|s| !s.is_empty());
    let registry = match (&section.account, &region) {
        (Some(account), Some(region)) if !account.is_empty() => {
            Some(format!("{account}.dkr.ecr.{region}.amazonaws.com"))
        }
        _ => None,
    };
    let template = match &section.user_data_template {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            invalid(
                "provider.ec2.user_data_template",
                None,
                format!("cannot read {}: {e}", path.display()),
            )
        })?,
        None => USER_DATA_TEMPLATE.to_owned(),
    };
    let mut user_data = BTreeMap::new();
    for (name, purpose) in purposes.iter_mut() {
        let image = match (&purpose.image, &registry) {
            (Some(image), _) => image.replace("{registry}", registry.as_deref().unwrap_or_default()),
            (None, Some(registry)) => format!("{registry}/{name}:latest"),
            (None, None) => {
                return Err(invalid(
                    "purposes.<name>.image",
                    None,
                    format!("purpose `{name}` has no docker image: set its `image`, or ACCOUNT and REGION so that `<account>.dkr.ecr.<region>.amazonaws.com/{name}:latest` is used"),
                ))
            }
        };
        purpose.image = Some(image.clone());
        let rendered = template
            .replace("{{image}}", &image)
            .replace("{{port}}", &purpose.port.to_string())
            .replace("{{container_port}}", &purpose.port.to_string())
            .replace("{{registry}}", registry.as_deref().unwrap_or_default())
            .replace("{{region}}", region.as_deref().unwrap_or_default())
            .replace("{{docker_args}}", &purpose.docker_args.join(" "))
            .replace(
                "{{container_command}}",
                &purpose
                    .container_command
                    .iter()
                    .map(|a| shell_quote(&a.replace("{base_path}", "/${INSTANCE_ID}/")))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        if rendered.len() > MAX_USER_DATA_BYTES {
            return Err(invalid(
                "provider.ec2.user_data_template",
                None,
                format!("the user data of purpose `{name}` is {} bytes once rendered; EC2 takes at most {MAX_USER_DATA_BYTES}: shorten the template or the docker arguments", rendered.len()),
            ));
        }
        user_data.insert(name.clone(), rendered);
    }
    let listing_lag = section.listing_lag_seconds.unwrap_or(15);
    let missing_grace = section.missing_grace_seconds.unwrap_or(120);
    if missing_grace <= listing_lag {
        return Err(invalid(
            "provider.ec2.missing_grace_seconds",
            None,
            format!("must be longer than provider.ec2.listing_lag_seconds ({listing_lag}), or the pool forgets instances EC2 has not listed yet; several times longer is safe"),
        ));
    }
    let address_template = section
        .address_template
        .unwrap_or_else(|| "{private_ip}:{port}".into());
    if !address_template.contains('{') && !address_template.contains(':') {
        return Err(invalid(
            "provider.ec2.address_template",
            None,
            format!("`{address_template}` names no host and port: use placeholders like {{private_ip}}:{{port}}"),
        ));
    }
    Ok(Ec2Config {
        region,
        image_id,
        instance_type: section
            .image_type
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "t3.medium".into()),
        key_name: section.key_name.filter(|s| !s.is_empty()),
        security_group_ids: section
            .security_group
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        instance_profile: section.instance_profile.filter(|s| !s.is_empty()),
        subnet_id: section.subnet_id.filter(|s| !s.is_empty()),
        address_template,
        route_to_replace: route_to_replace.clone().filter(|s| !s.is_empty()),
        string_to_replace: string_to_replace.clone(),
        launch_rate_per_second: section.launch_rate_per_second.unwrap_or(1.0).max(0.01),
        launch_burst: section.launch_burst.unwrap_or(5).max(1),
        listing_lag: Duration::from_secs(listing_lag),
        missing_grace: Duration::from_secs(missing_grace),
        user_data,
    })
}

/// The longest pause of launches after failures: an hour.
const MAX_LAUNCH_PAUSE_MS: u64 = 3_600_000;

/// Double-quotes a word for the user data script, keeping `${INSTANCE_ID}` expandable.
fn shell_quote(word: &str) -> String {
    let escaped = word
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('`', "\\`");
    format!("\"{escaped}\"")
}

/// 0 means "no timeout".
fn optional_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn check_limits(limits: Limits, key: &'static str, env: Option<&str>) -> Result<(), ConfigError> {
    if limits.max == 0 {
        return Err(invalid(key, env, "must be at least 1"));
    }
    if limits.min_free > limits.max {
        return Err(invalid(
            key,
            env,
            format!(
                "the minimum of free instances ({}) is above the maximum ({}): lower MIN_FREE_INSTANCES or raise MAX_INSTANCES",
                limits.min_free, limits.max
            ),
        ));
    }
    Ok(())
}

/// The built-in facts of a known purpose (DESIGN.md section 5); every key can be overridden.
fn preset(name: &str) -> PurposeSection {
    let args = |list: &[&str]| Some(list.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    match name {
        "rstudio" => PurposeSection {
            command: args(&[
                "{exe}",
                "demo-workspace",
                "--port",
                "{port}",
                "--instance-id",
                "{instance_id}",
            ]),
            port: Some(8787),
            strip_prefix: Some(true),
            readiness_path: Some("/images/favicon.ico".into()),
            // RStudio sends non-browser agents from / to a sign-in redirect.
            readiness_user_agent: Some("Mozilla/5.0 (rstudio-pool readiness probe)".into()),
            keepalive_paths: args(&["POST /events/get_events"]),
            root_path_header: Some("X-RStudio-Root-Path".into()),
            ..PurposeSection::default()
        },
        // JupyterLab knows its base URL, so the prefix is kept; the proxy does access control,
        // so its own token, password and origin checks are off.
        "jupyter" => PurposeSection {
            command: args(&[
                "jupyter-lab",
                "--no-browser",
                "--ip=127.0.0.1",
                "--port={port}",
                "--ServerApp.base_url={base_path}",
                "--IdentityProvider.token=",
                "--ServerApp.password=",
                "--ServerApp.allow_origin=*",
                "--ServerApp.disable_check_xsrf=True",
                "--ServerApp.root_dir=.",
                // The lab's layout and settings live with the instance's files, not in the
                // pool user's HOME, where every lab of every user would share one layout.
                "--LabApp.workspaces_dir=.jupyter/lab/workspaces",
                "--LabApp.user_settings_dir=.jupyter/lab/user-settings",
                // Harmless for a normal user; needed where the pool runs as root (CI).
                "--allow-root",
            ]),
            port: Some(8888),
            strip_prefix: Some(false),
            readiness_path: Some("/api".into()),
            // The lab polls its REST API in the background for as long as a tab is open; its
            // saves, renames, uploads and kernel starts (not GETs) are the user's.
            keepalive_paths: args(&["GET /api/*", "GET /lab/api/*"]),
            image: Some("quay.io/jupyter/base-notebook:latest".into()),
            container_command: args(&[
                "start-notebook.py",
                "--ServerApp.base_url={base_path}",
                "--IdentityProvider.token=",
                "--ServerApp.password=",
                "--ServerApp.allow_origin=*",
                "--ServerApp.disable_check_xsrf=True",
            ]),
            ..PurposeSection::default()
        },
        // No update checks or nags users cannot act on, no trust prompt in each new folder,
        // and not the pool user's own config file (`--config /dev/null`).
        "code-server" => PurposeSection {
            command: args(&[
                "code-server",
                "--bind-addr",
                "127.0.0.1:{port}",
                "--auth",
                "none",
                "--disable-telemetry",
                "--disable-update-check",
                "--disable-workspace-trust",
                "--disable-getting-started-override",
                "--config",
                "/dev/null",
                ".",
            ]),
            port: Some(8080),
            strip_prefix: Some(true),
            readiness_path: Some("/healthz".into()),
            image: Some("codercom/code-server:latest".into()),
            container_command: args(&[
                "--bind-addr",
                "0.0.0.0:8080",
                "--auth",
                "none",
                "--disable-telemetry",
                "--disable-update-check",
                "--disable-workspace-trust",
            ]),
            ..PurposeSection::default()
        },
        // The working folder's own app (app.R, or ui.R and server.R), else the example app
        // shipped in the binary, so that a new workspace runs something.
        "shiny" => PurposeSection {
            command: args(&[
                "sh",
                "-c",
                "[ -e app.R ] || [ -e server.R ] || {exe} example shiny > app.R; exec R --no-save --quiet -e \"shiny::runApp('.', host = '127.0.0.1', port = {port}, launch.browser = FALSE)\"",
            ]),
            port: Some(3838),
            strip_prefix: Some(true),
            readiness_path: Some("/".into()),
            image: Some("rocker/shiny:latest".into()),
            ..PurposeSection::default()
        },
        _ => PurposeSection::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_embedded_default_is_valid_and_local() {
        let c = Config::from_yaml(EMBEDDED_DEFAULT, &env_of(&[])).unwrap();
        assert!(c.api.listen.ip().is_loopback());
        assert!(c.proxy.listen.ip().is_loopback());
        assert_eq!(c.proxy.listen.port(), 8081);
        assert_eq!(c.api.listen.port(), 3001);
        assert!(matches!(c.provider, ProviderConfig::Process));
        assert!(c.purposes.contains_key("rstudio"));
    }

    #[test]
    fn the_shipped_local_yaml_is_the_embedded_default() {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/local.yaml"))
                .unwrap();
        assert_eq!(shipped, EMBEDDED_DEFAULT);
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::from_yaml(
            EMBEDDED_DEFAULT,
            &env_of(&[
                ("MIN_FREE_INSTANCES", "5"),
                ("MAX_INSTANCES", "60"),
                ("PORT", "9000"),
                ("API_LISTEN", "127.0.0.1:4000"),
                ("TIMEOUT_INSTANCE", "1500"),
                ("STATE_DIR", "/tmp/x"),
            ]),
        )
        .unwrap();
        let rstudio = &c.purposes["rstudio"];
        assert_eq!(
            rstudio.limits,
            Limits {
                min_free: 5,
                max: 60
            }
        );
        assert_eq!(rstudio.idle_timeout, Duration::from_millis(1500));
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:4000");
        assert!(
            matches!(&c.provider, ProviderConfig::Process)
                && c.state_dir == std::path::Path::new("/tmp/x")
        );
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("", &[("MAX_INSTANCES", "many")], "MAX_INSTANCES"),
            (
                "",
                &[("MIN_FREE_INSTANCES", "9"), ("MAX_INSTANCES", "3")],
                "lower MIN_FREE_INSTANCES",
            ),
            ("", &[("MAX_INSTANCES", "0")], "at least 1"),
            ("", &[("PROVIDER", "docker")], "use `process` or `ec2`"),
            ("", &[("API_LISTEN", "0.0.0.0:3001")], "bearer token"),
            ("", &[("API_LISTEN", "localhost")], "api.listen"),
            (
                "",
                &[("API_LISTEN", "127.0.0.1:8081")],
                "give the API another port",
            ),
            (
                "",
                &[("API_LISTEN", "127.0.0.1:4000"), ("PORT", "4000")],
                "cannot share",
            ),
            ("pool:\n  min_fre_instances: 3\n", &[], "min_fre_instances"),
            (
                "pol:\n  max_instances: 3\n",
                &[],
                "unknown top-level key `pol`",
            ),
            ("pool: [1, 2]\n", &[], "pool"),
            ("api:\n  threads: 0\n", &[], "api.threads"),
            (
                "purposes:\n  rstudio:\n    root_path_header: \"bad header\"\n",
                &[],
                "not a header name",
            ),
            (
                "pool:\n  warm_policy:\n    kind: elastic\n",
                &[],
                "use `fixed`",
            ),
            (
                "pool:\n  warm_policy:\n    kind: fixed\n    floor: 1\n",
                &[],
                "`floor` (purpose `rstudio`) is not a setting of the `fixed` policy",
            ),
            (
                "pool:\n  warm_policy:\n    kind: schedule\n",
                &[],
                "has no ranges: add e.g.",
            ),
            (
                "pool:\n  warm_policy:\n    kind: schedule\n    ranges: [{when: \"mon-fry 08:00-18:00\", min_free: 1}]\n",
                &[],
                "`fry` is not a day",
            ),
            (
                "pool:\n  warm_policy:\n    kind: schedule\n    ranges: [{when: \"mon-fri 08:00-18:00\", min_free: 99}]\n",
                &[],
                "above the maximum",
            ),
            (
                "pool:\n  warm_policy:\n    kind: forecast\n    miss_probability: 5\n",
                &[],
                "must be between 0 and 1",
            ),
            (
                "pool:\n  warm_policy:\n    kind: forecast\n    floor: 4\n    max_free: 2\n",
                &[],
                "`floor: 4`",
            ),
            (
                "purposes:\n  rstudio:\n    hourly_cost: -1\n",
                &[],
                "purposes.<name>.hourly_cost",
            ),
            (
                "simulate:\n  ready_median_seconds: 100\n  ready_p95_seconds: 50\n",
                &[],
                "simulate.ready_median_seconds",
            ),
        ];
        for (yaml, env, expected) in cases {
            let err = Config::from_yaml(yaml, &env_of(env))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected),
                "{yaml:?} {env:?}: `{err}` lacks `{expected}`"
            );
        }
    }

    #[test]
    fn warm_policies_are_read_per_purpose() {
        let yaml = "pool:\n  min_free_instances: 2\n  warm_policy:\n    kind: forecast\n    floor: 1\n\
                    purposes:\n  rstudio: {}\n  night:\n    command: [x]\n    warm_policy:\n      kind: schedule\n      utc_offset_minutes: 60\n      ranges: [{when: \"sat-sun 10-12\", min_free: 1}]\n";
        let config = Config::from_yaml(yaml, &env_of(&[])).unwrap();
        match &config.purposes["rstudio"].warm {
            WarmPolicy::Forecast(f) => {
                assert_eq!((f.floor, f.fallback, f.miss_probability), (1, 2, 0.02));
                assert_eq!(f.lead_ms, 15 * 60_000);
            }
            other => panic!("{other:?}"),
        }
        match &config.purposes["night"].warm {
            WarmPolicy::Schedule(s) => {
                assert_eq!(
                    (s.ranges.len(), s.otherwise, s.utc_offset_minutes),
                    (1, 0, 60)
                )
            }
            other => panic!("{other:?}"),
        }
        // The original: MIN_FREE_INSTANCES around the clock, nothing to pay unless priced.
        let config = Config::from_yaml("", &env_of(&[("MIN_FREE_INSTANCES", "3")])).unwrap();
        assert_eq!(
            config.purposes["rstudio"].warm,
            WarmPolicy::Fixed { min_free: 3 }
        );
        assert_eq!(config.purposes["rstudio"].rates, Rates::default());
        assert_eq!(config.simulate.ready, PROCESS_READY);
    }

    #[test]
    fn default_urls_are_taken_apart() {
        let d = DefaultUrl::parse("http://intranet.example/portal/").unwrap();
        assert_eq!(
            (d.https, d.authority.as_str(), d.host_header.as_str()),
            (false, "intranet.example:80", "intranet.example")
        );
        assert_eq!(d.url, "http://intranet.example/portal");
        let d = DefaultUrl::parse("https://10.0.0.1:8443").unwrap();
        assert_eq!((d.https, d.authority.as_str()), (true, "10.0.0.1:8443"));
        assert!(DefaultUrl::parse("ftp://x").is_err());
        assert!(DefaultUrl::parse("http://").is_err());
        let err = Config::from_yaml("", &env_of(&[("DEFAULT_URL", "intranet")])).unwrap_err();
        assert!(err.to_string().contains("DEFAULT_URL"), "{err}");
    }

    #[test]
    fn tls_files_are_checked_at_start_and_a_redirect_needs_them() {
        let none = env_of(&[]);
        let err = Config::from_yaml(
            "proxy:\n  tls:\n    cert: /nonexistent/cert.pem\n    key: /nonexistent/key.pem\n",
            &none,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("proxy.tls") && err.contains("/nonexistent/cert.pem"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let yaml = format!(
            "proxy:\n  tls:\n    cert: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
        let err = Config::from_yaml(&yaml, &none).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = Config::from_yaml("proxy:\n  redirect_http: 0.0.0.0:80\n", &none)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.redirect_http") && err.contains("proxy.tls"),
            "{err}"
        );
        let err = Config::from_yaml("proxy:\n  tls:\n    cert: a\n", &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("key"), "{err}");
    }

    #[test]
    fn the_ec2_provider_checks_what_it_needs() {
        let base = [
            ("PROVIDER", "ec2"),
            ("ACCOUNT", "123456789012"),
            ("REGION", "eu-west-1"),
        ];
        let err = Config::from_yaml("", &env_of(&base))
            .unwrap_err()
            .to_string();
        assert!(err.contains("IMAGE_ID"), "{err}");

        let mut env = base.to_vec();
        env.push(("IMAGE_ID", "ami-1"));
        env.push(("SECURITY_GROUP", "sg-1, sg-2"));
        let c = Config::from_yaml("", &env_of(&env)).unwrap();
        let ProviderConfig::Ec2(ec2) = &c.provider else {
            panic!("not ec2")
        };
        assert_eq!(ec2.security_group_ids, vec!["sg-1", "sg-2"]);
        let user_data = &ec2.user_data["rstudio"];
        assert!(user_data.contains("123456789012.dkr.ecr.eu-west-1.amazonaws.com/rstudio:latest"));
        assert!(user_data.contains("-p 8787:8787"));
        assert!(
            !user_data.contains("{{"),
            "unrendered placeholder in {user_data}"
        );

        // Without a registry, a purpose must name its image.
        let err = Config::from_yaml("", &env_of(&[("PROVIDER", "ec2"), ("IMAGE_ID", "ami-1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no docker image"), "{err}");

        // Rendered user data over 16 KB is refused at load time.
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.sh");
        std::fs::write(&big, format!("#!/bin/sh\n# {}\n", "x".repeat(17 * 1024))).unwrap();
        let yaml = format!(
            "provider:\n  ec2:\n    user_data_template: {}\n",
            big.display()
        );
        let err = Config::from_yaml(&yaml, &env_of(&env))
            .unwrap_err()
            .to_string();
        assert!(err.contains("16384"), "{err}");
    }

    #[test]
    fn open_access_is_for_loopback_only() {
        let err = Config::from_yaml("", &env_of(&[("AUTH_MODE", "none"), ("PORT", "8081")]));
        assert!(err.is_ok(), "loopback with auth none is fine: {err:?}");
        let yaml = "proxy:\n  listen: 0.0.0.0:8081\n";
        let err = Config::from_yaml(yaml, &env_of(&[("AUTH_MODE", "none")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not loopback"), "{err}");
        let err = Config::from_yaml("", &env_of(&[("AUTH_SECRETS", "short")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("too short"), "{err}");
        let err = Config::from_yaml("auth:\n  mode: header\n", &env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("trusted_networks"), "{err}");
        assert!(Config::from_yaml("", &env_of(&[])).is_ok_and(|c| matches!(
            c.auth,
            AuthConfig::Token {
                generated: true,
                ..
            }
        )));
    }

    #[test]
    fn pingora_keys_are_allowed_beside_ours() {
        let c = Config::from_yaml(
            "version: 1\nthreads: 4\ngrace_period_seconds: 1\n",
            &env_of(&[]),
        );
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn a_public_api_with_a_token_is_accepted() {
        let c = Config::from_yaml(
            "",
            &env_of(&[("API_LISTEN", "0.0.0.0:3001"), ("API_TOKEN", "s3cret")]),
        )
        .unwrap();
        assert_eq!(c.api.token.as_deref(), Some("s3cret"));
    }
}
