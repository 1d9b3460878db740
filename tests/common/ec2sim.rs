//! An EC2 that behaves like EC2, between the pool and moto: an HTTP proxy that speaks the EC2
//! query API and adds what moto, an ideal EC2, leaves out and the real one documents.
//!
//! - **Eventual consistency.** A new instance is missing from `DescribeInstances` (listings
//!   and lookups by id alike), and `CreateTags` and `TerminateInstances` answer
//!   `InvalidInstanceID.NotFound` for it, until `lag` after its launch.
//! - **Throttling.** `RequestLimitExceeded` from a token bucket per action, sized after
//!   AWS's default buckets as recalled from the Amazon EC2 developer guide ("Request
//!   throttling for the Amazon EC2 API"; its table could not be read when this was written,
//!   so check the figures against it): mutating actions 200 tokens and 5 a second,
//!   non-mutating ones 100 and 20, unfiltered unpaginated ones 50 and 10; the resource
//!   buckets of `RunInstances`, 1,000 instances and 2 a second, and of `TerminateInstances`,
//!   1,000 and 20. `throttle_scale` shrinks them for an account whose other tools use most
//!   of them.
//! - **Idempotency.** A `RunInstances` with a `ClientToken` seen before answers with the
//!   instance it made then (moto makes another).
//! - **Faults.** At `fault_rate`, a call is answered with a server error or its connection is
//!   dropped, half the time before moto carried it out and half the time after: the caller
//!   cannot tell which, as with the real thing.
//!
//! It also keeps the history of ownership: every `userId` tag that landed, per instance, so
//! that a test can check that no instance ever had two owners, not only at the end.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use rstudio_pool::core::bucket::TokenBucket;

/// How far from ideal the EC2 is.
#[derive(Debug, Clone, Copy)]
pub struct Realism {
    pub lag: Duration,
    pub throttle: bool,
    /// 1.0: AWS's default buckets; smaller: an account that shares them with other tools.
    pub throttle_scale: f64,
    /// The share of calls (0 to 1) that fail with a server error or a dropped connection.
    pub fault_rate: f64,
    /// Every call of this action is refused with this error code (an outage: no capacity,
    /// the listing down), and not carried out.
    pub refuse: Option<(&'static str, &'static str)>,
    /// Every call of this action takes this long before it is carried out.
    pub delay: Option<(&'static str, Duration)>,
}

impl Realism {
    /// What every ec2 test runs against unless it says otherwise: a listing lag of a second
    /// and a half (enough to have swapped users' instances before), AWS's throttling, no
    /// injected faults.
    pub fn default_lag() -> Self {
        Self {
            lag: Duration::from_millis(1500),
            throttle: true,
            throttle_scale: 1.0,
            fault_rate: 0.0,
            refuse: None,
            delay: None,
        }
    }
}

/// What happened at the EC2, for assertions.
#[derive(Debug, Default)]
pub struct History {
    /// Every owner tag that landed, per instance, in order, with when.
    pub owners: BTreeMap<String, Vec<String>>,
    pub owned_at: BTreeMap<String, Instant>,
    /// Calls by action and outcome (`ok`, `error`, `throttled`, `not-found`, `fault`,
    /// `refused`).
    pub calls: BTreeMap<(String, &'static str), u64>,
    /// Calls under way by action (a caller that hangs up ends its call here too).
    pub in_progress: BTreeMap<String, u64>,
    /// The parameters of every call carried out that starts or stops instances, in order.
    pub lifecycle: Vec<(String, Vec<(String, String)>)>,
}

impl History {
    /// Instances that have had two different owners.
    pub fn owned_twice(&self) -> Vec<(String, Vec<String>)> {
        self.owners
            .iter()
            .filter(|(_, users)| users.iter().any(|u| u != &users[0]))
            .map(|(id, users)| (id.clone(), users.clone()))
            .collect()
    }

    pub fn count(&self, action: &str, outcome: &str) -> u64 {
        self.calls
            .iter()
            .filter(|((a, o), _)| a == action && *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }
}

struct Shared {
    moto: String,
    realism: Mutex<Realism>,
    /// Instances launched through this layer, with when.
    launched: Mutex<HashMap<String, Instant>>,
    /// `RunInstances` answers by client token.
    tokens: tokio::sync::Mutex<HashMap<String, Bytes>>,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    history: Mutex<History>,
    client: reqwest::Client,
    started: Instant,
}

pub struct Ec2Sim {
    pub endpoint: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ec2Sim {
    /// Listens on a free loopback port and forwards to the moto at `moto`.
    pub fn start(moto: &str, realism: Realism) -> Ec2Sim {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            moto: moto.to_owned(),
            realism: Mutex::new(realism),
            launched: Mutex::new(HashMap::new()),
            tokens: tokio::sync::Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            history: Mutex::new(History::default()),
            client: reqwest::Client::new(),
            started: Instant::now(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let serving = Arc::clone(&shared);
        // A runtime of its own, so that it serves whatever the test's runtime is doing.
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(serve(listener, serving, stopped));
        });
        Ec2Sim {
            endpoint: format!("http://{address}"),
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn set(&self, change: impl FnOnce(&mut Realism)) {
        change(&mut self.shared.realism.lock().unwrap());
    }

    pub fn history<T>(&self, read: impl FnOnce(&History) -> T) -> T {
        read(&self.shared.history.lock().unwrap())
    }
}

impl Drop for Ec2Sim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = &mut stopped => return,
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(Arc::clone(&shared), request));
            let _ = http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Counts a call as under way until it ends, answered or abandoned.
struct Underway<'a> {
    shared: &'a Shared,
    action: String,
}

impl<'a> Underway<'a> {
    fn new(shared: &'a Shared, action: &str) -> Self {
        *shared
            .history
            .lock()
            .unwrap()
            .in_progress
            .entry(action.to_owned())
            .or_default() += 1;
        Self {
            shared,
            action: action.to_owned(),
        }
    }
}

impl Drop for Underway<'_> {
    fn drop(&mut self) {
        if let Some(n) = self
            .shared
            .history
            .lock()
            .unwrap()
            .in_progress
            .get_mut(&self.action)
        {
            *n -= 1;
        }
    }
}

/// A dropped connection: hyper closes it without an answer when the service fails.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

type Answer = Result<Response<Full<Bytes>>, Dropped>;

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn ok(body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(body))
        .unwrap()
}

/// The values of numbered parameters `Prefix.1`, `Prefix.2` ... in order.
pub fn numbered<'a>(params: &'a [(String, String)], prefix: &str) -> Vec<&'a str> {
    let mut found: Vec<(u32, &str)> = params
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix(prefix)?.strip_prefix('.')?.parse().ok()?;
            Some((n, v.as_str()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, v)| v).collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The `userId` values among tags given as `<prefix>.N.Key` / `<prefix>.N.Value`.
pub fn owner_tags(params: &[(String, String)], prefix: &str) -> Vec<String> {
    let mut keys = HashMap::new();
    let mut values = HashMap::new();
    for (k, v) in params {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        if let Some(n) = rest.strip_suffix(".Key") {
            keys.insert(n.to_owned(), v.clone());
        } else if let Some(n) = rest.strip_suffix(".Value") {
            values.insert(n.to_owned(), v.clone());
        }
    }
    keys.iter()
        .filter(|(_, k)| k.as_str() == "userId")
        .filter_map(|(n, _)| values.get(n).cloned())
        .collect()
}

/// Instance ids in an EC2 answer, in order.
fn instance_ids(xml: &str) -> Vec<String> {
    xml.match_indices("<instanceId>")
        .filter_map(|(at, tag)| {
            let rest = &xml[at + tag.len()..];
            Some(rest[..rest.find("</instanceId>")?].to_owned())
        })
        .collect()
}

/// Removes the reservations of `reservationSet` whose instances `hidden` says to hide: an
/// answer as EC2 gives it while they have not propagated. Lists are `<item>` elements in the
/// EC2 protocol, and text never holds a raw `<`, so counting `<item>` tags finds their ends.
pub fn hide_reservations(xml: &str, hidden: impl Fn(&str) -> bool) -> String {
    let Some(set) = xml.find("<reservationSet>") else {
        return xml.to_owned();
    };
    let mut out = String::with_capacity(xml.len());
    let body_start = set + "<reservationSet>".len();
    out.push_str(&xml[..body_start]);
    let mut at = body_start;
    loop {
        let rest = &xml[at..];
        if !rest.trim_start().starts_with("<item>") {
            out.push_str(rest);
            return out;
        }
        let start = at + rest.find("<item>").unwrap();
        // Find the matching </item>.
        let mut depth = 0;
        let mut cursor = start;
        let end = loop {
            let open = xml[cursor..].find("<item>").map(|i| cursor + i);
            let close = xml[cursor..].find("</item>").map(|i| cursor + i).unwrap();
            match open {
                Some(o) if o < close => {
                    depth += 1;
                    cursor = o + "<item>".len();
                }
                _ => {
                    depth -= 1;
                    cursor = close + "</item>".len();
                    if depth == 0 {
                        break cursor;
                    }
                }
            }
        };
        let reservation = &xml[start..end];
        let ids = instance_ids(reservation);
        if ids.is_empty() || !ids.iter().all(|id| hidden(id)) {
            out.push_str(&xml[at..end]);
        }
        at = end;
    }
}

impl Shared {
    fn realism(&self) -> Realism {
        *self.realism.lock().unwrap()
    }

    fn note(&self, action: &str, outcome: &'static str) {
        *self
            .history
            .lock()
            .unwrap()
            .calls
            .entry((action.to_owned(), outcome))
            .or_default() += 1;
    }

    /// An injected fault: half the time a dropped connection, else a server error (one that
    /// says it failed before doing anything, or, `carried_out`, one that says nothing).
    fn fault(&self, action: &str, carried_out: bool) -> Answer {
        self.note(action, "fault");
        if rand::random::<bool>() {
            Err(Dropped)
        } else if carried_out {
            Ok(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "An internal error has occurred.",
            ))
        } else {
            Ok(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "The server is overloaded and can't handle the request.",
            ))
        }
    }

    fn is_hidden(&self, id: &str) -> bool {
        let lag = self.realism().lag;
        self.launched
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|at| at.elapsed() < lag)
    }

    /// Takes `cost` tokens of the bucket `name` (size and rate AWS's, scaled); false when
    /// throttled.
    fn take(&self, name: &str, size: u32, rate: f64, cost: u32) -> bool {
        let realism = self.realism();
        if !realism.throttle {
            return true;
        }
        let now = self.started.elapsed().as_millis() as u64;
        let mut buckets = self.buckets.lock().unwrap();
        let bucket = buckets.entry(name.to_owned()).or_insert_with(|| {
            let size = ((f64::from(size) * realism.throttle_scale).ceil() as u32).max(1);
            TokenBucket::new(size, rate * realism.throttle_scale, now)
        });
        (0..cost).all(|_| bucket.take(now).is_ok())
    }

    /// Whether AWS would throttle this call now.
    fn throttled(&self, action: &str, params: &[(String, String)]) -> bool {
        let filtered = params.iter().any(|(k, _)| k.starts_with("Filter."))
            || param(params, "MaxResults").is_some();
        let request = match action {
            "DescribeInstances" if filtered => self.take(action, 100, 20.0, 1),
            "DescribeInstances" => self.take(action, 50, 10.0, 1),
            a if a.starts_with("Describe") => self.take(action, 100, 20.0, 1),
            _ => self.take(action, 200, 5.0, 1),
        };
        let instances = numbered(params, "InstanceId").len().max(1) as u32;
        let resource = match action {
            "RunInstances" => self.take(
                "RunInstances instances",
                1000,
                2.0,
                param(params, "MaxCount")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1),
            ),
            "TerminateInstances" => {
                self.take("TerminateInstances instances", 1000, 20.0, instances)
            }
            _ => true,
        };
        !(request && resource)
    }

    async fn forward(&self, headers: &http::HeaderMap, body: Bytes) -> Result<Bytes, Answer> {
        let mut request = self.client.post(&self.moto).body(body);
        for (name, value) in headers {
            if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
                request = request.header(name, value);
            }
        }
        let response = request.send().await.map_err(|_| Err(Dropped))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|_| Err(Dropped))?;
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(Ok(Response::builder()
                .status(status.as_u16())
                .header("content-type", "text/xml;charset=UTF-8")
                .body(Full::new(bytes))
                .unwrap()))
        }
    }
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Answer {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(Dropped),
    };
    let params: Vec<(String, String)> = form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let action = param(&params, "Action").unwrap_or_default().to_owned();
    if action.is_empty() {
        // Not an EC2 query call (moto's own API, IAM for the tests' set-up): pass it on.
        return match shared.forward(&parts.headers, body).await {
            Ok(bytes) => Ok(ok(bytes)),
            Err(answer) => answer,
        };
    }
    if let Some((_, code)) = shared.realism().refuse.filter(|(a, _)| *a == action) {
        shared.note(&action, "refused");
        return Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "Refused by the test's EC2.",
        ));
    }
    if shared.throttled(&action, &params) {
        shared.note(&action, "throttled");
        return Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        ));
    }
    let _underway = Underway::new(&shared, &action);
    let realism = shared.realism();
    if let Some((_, pause)) = realism.delay.filter(|(a, _)| *a == action) {
        tokio::time::sleep(pause).await;
    }
    // A fault before the call reaches EC2, or after EC2 carried it out.
    let fault = rand::random::<f64>() < realism.fault_rate;
    let fault_after = rand::random::<bool>();
    if fault && !fault_after {
        return shared.fault(&action, false);
    }
    let answer = match action.as_str() {
        "RunInstances" => run_instances(&shared, &parts.headers, body, &params).await,
        "CreateTags" | "TerminateInstances" => {
            let ids = numbered(
                &params,
                if action == "CreateTags" {
                    "ResourceId"
                } else {
                    "InstanceId"
                },
            );
            if let Some(id) = ids.iter().find(|id| shared.is_hidden(id)) {
                shared.note(&action, "not-found");
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "InvalidInstanceID.NotFound",
                    &format!("The instance ID '{id}' does not exist"),
                ));
            }
            let answer = shared.forward(&parts.headers, body).await;
            if answer.is_ok() && action == "CreateTags" {
                let owners = owner_tags(&params, "Tag.");
                let mut history = shared.history.lock().unwrap();
                for id in &ids {
                    for user in &owners {
                        history
                            .owners
                            .entry((*id).to_owned())
                            .or_default()
                            .push(user.clone());
                        history.owned_at.insert((*id).to_owned(), Instant::now());
                    }
                }
            }
            answer
        }
        "DescribeInstances" => {
            let asked = numbered(&params, "InstanceId");
            if let Some(id) = asked.iter().find(|id| shared.is_hidden(id)) {
                shared.note(&action, "not-found");
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "InvalidInstanceID.NotFound",
                    &format!("The instance ID '{id}' does not exist"),
                ));
            }
            shared.forward(&parts.headers, body).await.map(|xml| {
                let text = String::from_utf8_lossy(&xml);
                Bytes::from(hide_reservations(&text, |id| shared.is_hidden(id)))
            })
        }
        _ => shared.forward(&parts.headers, body).await,
    };
    let answer = match answer {
        Ok(bytes) => {
            shared.note(&action, "ok");
            if matches!(
                action.as_str(),
                "RunInstances" | "StopInstances" | "StartInstances" | "TerminateInstances"
            ) {
                shared
                    .history
                    .lock()
                    .unwrap()
                    .lifecycle
                    .push((action.clone(), params.clone()));
            }
            Ok(ok(bytes))
        }
        Err(other) => {
            shared.note(&action, "error");
            other
        }
    };
    if fault && fault_after {
        return shared.fault(&action, true);
    }
    answer
}

/// `RunInstances`, idempotent by client token as EC2 is.
async fn run_instances(
    shared: &Shared,
    headers: &http::HeaderMap,
    body: Bytes,
    params: &[(String, String)],
) -> Result<Bytes, Answer> {
    let token = param(params, "ClientToken").map(str::to_owned);
    // One launch at a time, so that two tries of one token cannot both reach moto.
    let mut tokens = shared.tokens.lock().await;
    if let Some(earlier) = token.as_ref().and_then(|t| tokens.get(t)) {
        return Ok(earlier.clone());
    }
    let answer = shared.forward(headers, body).await?;
    let text = String::from_utf8_lossy(&answer);
    let ids = instance_ids(&text);
    let owners = owner_tags(params, "TagSpecification.1.Tag.");
    {
        let mut launched = shared.launched.lock().unwrap();
        let mut history = shared.history.lock().unwrap();
        for id in &ids {
            launched.insert(id.clone(), Instant::now());
            for user in &owners {
                history
                    .owners
                    .entry(id.clone())
                    .or_default()
                    .push(user.clone());
                history.owned_at.insert(id.clone(), Instant::now());
            }
        }
    }
    if let Some(token) = token {
        tokens.insert(token, answer.clone());
    }
    Ok(answer)
}
