//! Shared helpers of the integration tests: start the real `rstudio-pool` binary on free
//! loopback ports with a configuration of the test's own, speak to it over HTTP, find the
//! workspace processes it started, and wait for conditions with a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Waits until `check` returns `Some`, polling every 50 ms, and fails the test with `what`
/// when `deadline` passes first.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PATH with the test virtualenv (where scripts/test.sh installs JupyterLab) first, so that
/// the jupyter preset's `jupyter-lab` is found as it would be on a laptop.
pub fn path_with_venv() -> (String, String) {
    let venv = std::env::var("RSTUDIO_POOL_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/rstudio-pool-venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let bin = format!("{venv}/bin");
    assert!(
        std::path::Path::new(&format!("{bin}/jupyter-lab")).exists(),
        "no JupyterLab in {bin}: run scripts/test.sh, which installs it"
    );
    (
        "PATH".into(),
        format!("{bin}:{}", std::env::var("PATH").unwrap_or_default()),
    )
}

pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` different loopback ports that nobody listens on: each is held until all are chosen,
/// so that the kernel cannot hand out one of them twice.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// The settings a test varies; the rest is a small local pool.
#[derive(Clone)]
pub struct Options {
    pub min_free: usize,
    pub max: usize,
    pub timeout_instance_ms: u64,
    /// YAML appended to the generated configuration (extra sections or purposes).
    pub extra_yaml: String,
    /// The `provider:` section; the process provider over the test's state folder if `None`.
    pub provider_yaml: Option<String>,
    pub pool_name: String,
    pub ready_timeout_seconds: u64,
    /// The `auth:` section; open access (`mode: none`, loopback only) if `None`.
    pub auth_yaml: Option<String>,
    /// The host the command API listens on (`0.0.0.0` makes it non-loopback); requests go
    /// to 127.0.0.1 either way.
    pub api_host: String,
    /// The bearer token of the command API; sent with every command when set.
    pub api_token: Option<String>,
    pub env: Vec<(String, String)>,
    /// More keys of the `pool:` section, each line indented by two spaces.
    pub pool_yaml: String,
    /// Whether `start` waits until the pool was rebuilt from the provider.
    pub wait_recovered: bool,
    /// A whole configuration file of the caller's instead of the generated one; the test's
    /// ports are given to it as `API_LISTEN` (on all addresses) and `PORT`.
    pub config_yaml: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            min_free: 1,
            max: 5,
            timeout_instance_ms: 3_600_000,
            extra_yaml: String::new(),
            provider_yaml: None,
            pool_name: "test-pool".into(),
            ready_timeout_seconds: 30,
            auth_yaml: None,
            api_host: "127.0.0.1".into(),
            api_token: None,
            env: Vec::new(),
            pool_yaml: String::new(),
            wait_recovered: true,
            config_yaml: None,
        }
    }
}

/// A running rstudio-pool with its own state directory. Dropping it kills the server and every
/// workspace it started.
pub struct Server {
    child: Option<Child>,
    pub api: SocketAddr,
    pub proxy: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    options: Options,
    _tmp: Option<tempfile::TempDir>,
    client: reqwest::Client,
}

impl Server {
    pub async fn start(options: Options) -> Server {
        Self::start_edited(options, |_, text| text).await
    }

    fn write_config(&self) {
        let o = &self.options;
        if let Some(yaml) = &o.config_yaml {
            std::fs::write(&self.config, yaml).unwrap();
            return;
        }
        let yaml = format!(
            "version: 1\nthreads: 2\ngrace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n\
             pool:\n  name: {pool}\n  min_free_instances: {min}\n  max_instances: {max}\n  ready_timeout_seconds: {ready}\n  reconcile_interval_ms: 200\n{pool_extra}\
             {provider}\
             {auth}\
             api:\n  listen: {api_host}:{api_port}\n{token}\
             proxy:\n  listen: {proxy}\n  timeout_instance_ms: {timeout}\n{extra}",
            pool = o.pool_name,
            ready = o.ready_timeout_seconds,
            pool_extra = o.pool_yaml,
            provider = o.provider_yaml.clone().unwrap_or_else(|| format!(
                "provider:\n  kind: process\n  state_dir: {}\n",
                self.state_dir().display()
            )),
            min = o.min_free,
            max = o.max,
            auth = o.auth_yaml.clone().unwrap_or_else(|| "auth:\n  mode: none\n".into()),
            api_host = o.api_host,
            api_port = self.api.port(),
            token = o
                .api_token
                .as_ref()
                .map(|t| format!("  token: {t}\n"))
                .unwrap_or_default(),
            proxy = self.proxy,
            timeout = o.timeout_instance_ms,
            extra = o.extra_yaml,
        );
        std::fs::write(&self.config, yaml).unwrap();
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The binary with this server's configuration, the ambient variables that would
    /// override it removed and the test's own environment set.
    fn binary(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rstudio-pool"));
        command.arg("-c").arg(&self.config);
        for name in [
            "MIN_FREE_INSTANCES",
            "MAX_INSTANCES",
            "PORT",
            "API_LISTEN",
            "STATE_DIR",
            "PROVIDER",
            "TIMEOUT_INSTANCE",
            "API_TOKEN",
            "IMAGE_ID",
            "IMAGE_TYPE",
            "REGION",
            "ACCOUNT",
            "SECURITY_GROUP",
            "INSTANCE_PROFILE",
            "KEY_NAME",
            "DEFAULT_URL",
            "LOG_FORMAT",
        ] {
            command.env_remove(name);
        }
        // Each server its own state folder, whatever its provider (the ec2 one's journal and
        // lock live there too); a test's own STATE_DIR below wins.
        command.env("STATE_DIR", self.state_dir());
        if self.options.config_yaml.is_some() {
            command
                .env("API_LISTEN", format!("0.0.0.0:{}", self.api.port()))
                .env("PORT", self.proxy.port().to_string());
        }
        for (k, v) in &self.options.env {
            command.env(k, v);
        }
        command
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let mut command = self.binary();
        command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(command.spawn().unwrap());
        let url = format!("http://{}/healthz", self.api);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(&url).send().await {
                let v: Value = r.json().await.unwrap_or_default();
                if v["recovered"] == json!(true) || !self.options.wait_recovered {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("the server exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < until,
                "the server did not start in 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server with SIGKILL, as a crash would. Its workspaces keep running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server's process still runs.
    pub fn is_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Stops the server with SIGINT, as Ctrl-C in its terminal does, and waits (at most 30 s)
    /// for it to exit; its workspaces keep running.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the server runs");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > until {
                let _ = child.kill();
                panic!(
                    "the server did not exit within 30 s of SIGINT:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the binary with this server's configuration and `args` (e.g. `down`): its exit
    /// status and everything it printed.
    pub fn run_cli(&self, args: &[&str]) -> (std::process::ExitStatus, String) {
        let out = self.binary().args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    /// Starts the server again over the same state directory and ports.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends one command and returns the status and the JSON answer.
    pub async fn command(&self, command: &str, payload: Value) -> (u16, Value) {
        self.post_raw(json!({"command": command, "payload": payload}).to_string())
            .await
    }

    pub async fn post_raw(&self, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let mut request = self.client.post(format!("http://{}/", self.api)).body(body);
        if let Some(token) = &self.options.api_token {
            request = request.bearer_auth(token);
        }
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
        (status, value)
    }

    /// `GET /metrics` of the command API, as text.
    pub async fn metrics(&self) -> String {
        let mut request = self.client.get(format!("http://{}/metrics", self.api));
        if let Some(token) = &self.options.api_token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap().text().await.unwrap()
    }

    /// `REQUEST_RSTUDIO` that must succeed; returns the instance id.
    pub async fn request(&self, user: &str) -> String {
        let (status, body) = self
            .command("REQUEST_RSTUDIO", json!({"userId": user}))
            .await;
        assert_eq!(status, 200, "{body}");
        body["instanceId"].as_str().unwrap().to_owned()
    }

    pub async fn census(&self, purpose: &str) -> Value {
        let (status, body) = self.command("GET_STATUS", json!({})).await;
        assert_eq!(status, 200, "{body}");
        body["pools"][purpose].clone()
    }

    pub async fn free(&self, purpose: &str) -> u64 {
        let c = self.census(purpose).await;
        c["freeReady"].as_u64().unwrap()
            + c["freeLaunching"].as_u64().unwrap()
            + c["pendingLaunches"].as_u64().unwrap()
    }

    /// The workspace processes this server started that still run: (pid, instance id).
    pub fn workspaces(&self) -> Vec<(u32, String)> {
        workspace_processes(&self.state_dir().join("work"))
    }

    /// The upstream address of an instance, from `GET_STATUS`.
    pub async fn upstream(&self, id: &str) -> String {
        let (status, body) = self.command("GET_STATUS", json!({"instanceId": id})).await;
        assert_eq!(status, 200, "{body}");
        body["instance"]["url"]
            .as_str()
            .unwrap()
            .trim_start_matches("http://")
            .to_owned()
    }

    /// `GET path` through the proxy, without credentials: the status and the body.
    pub async fn page(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.proxy_url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(300)..].join("\n");
            eprintln!("---- the server's log (last 300 lines) ----\n{tail}\n----");
            if let Ok(logs) = std::fs::read_dir(self.state_dir().join("logs")) {
                for log in logs.flatten() {
                    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                    eprintln!("---- {} ----\n{tail}", log.path().display());
                }
            }
        }
        for (pid, _) in self.workspaces() {
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
    }
}

/// Process-group leaders whose working directory lies under `work`, with the instance id that
/// names their folder. Counted from /proc, so it sees real processes, not the pool's opinion.
pub fn workspace_processes(work: &Path) -> Vec<(u32, String)> {
    let Ok(work) = work.canonicalize() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
            continue;
        };
        let Ok(rest) = cwd.strip_prefix(&work) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields[0] == "Z" || fields[2] != pid.to_string() {
            continue;
        }
        if let Some(id) = rest.iter().next() {
            found.push((pid, id.to_string_lossy().into_owned()));
        }
    }
    found
}

/// A demo workspace run by the test itself (a default upstream, or the stand-in for every
/// EC2 instance's RStudio), killed on drop.
pub struct DemoProcess {
    child: Child,
    pub port: u16,
}

impl DemoProcess {
    pub fn start() -> DemoProcess {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_rstudio-pool"))
            .args([
                "demo-workspace",
                "--port",
                &port.to_string(),
                "--instance-id",
                "i-00000000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        DemoProcess { child, port }
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when something accepts connections on `address`.
pub async fn answers(address: &str) -> bool {
    tokio::net::TcpStream::connect(address).await.is_ok()
}

/// Waits until the instance's workspace answers through the proxy.
pub async fn wait_ready(server: &Server, id: &str) {
    let url = server.proxy_url(&format!("/{id}/"));
    eventually(
        &format!("{id} answers through the proxy"),
        Duration::from_secs(30),
        || {
            let url = url.clone();
            async move {
                let r = server.client().get(&url).send().await.ok()?;
                (r.status().as_u16() == 200).then_some(())
            }
        },
    )
    .await;
}

/// Whether the pool still knows the instance.
pub async fn is_known(server: &Server, id: &str) -> bool {
    server
        .command("GET_STATUS", json!({"instanceId": id}))
        .await
        .0
        == 200
}

/// The pool's state of an instance (`launching`, `ready`, `paused`, `resuming`,
/// `terminating`), or `None` when it does not know it.
pub async fn state_of(server: &Server, id: &str) -> Option<String> {
    let (status, body) = server
        .command("GET_STATUS", json!({"instanceId": id}))
        .await;
    (status == 200).then(|| {
        body["instance"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    })
}

/// Whether an instance runs for its user: known, and neither paused nor ending. Idleness
/// pauses an instance (or, with `on_idle: terminate`, ends it): either way it stops running.
pub async fn is_running(server: &Server, id: &str) -> bool {
    state_of(server, id)
        .await
        .is_some_and(|s| s != "paused" && s != "terminating")
}
/// A bare HTTP/1.1 client on one connection: it sees exactly what the server writes, request
/// after request, on a connection kept alive.
pub struct Raw {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// A response as read off the wire: status, headers (names in lower case), decoded body.
pub type RawResponse = (u16, Vec<(String, String)>, Vec<u8>);

impl Raw {
    pub async fn connect(address: SocketAddr) -> Raw {
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Reads more; `false` at the end of the connection.
    pub async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .expect("the server answers within 10 s")
            .expect("the connection is open");
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Whether the server ends the connection (closed or reset) without sending more.
    pub async fn closed(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .expect("the server answers or closes within 10 s");
        matches!(read, Ok(0) | Err(_))
    }

    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "the connection ended {n} bytes short");
        }
        self.buf.drain(..n).collect()
    }

    pub async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf.drain(..i + 2).collect()).unwrap();
                return line.trim_end().to_owned();
            }
            assert!(self.fill().await, "the connection ended within a line");
        }
    }

    /// The next response; `head_only` for the answer to a `HEAD`.
    pub async fn response(&mut self, head_only: bool) -> RawResponse {
        let status_line = self.line().await;
        let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if head_only || status == 204 || status == 304 {
        } else if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            loop {
                let size = usize::from_str_radix(self.line().await.split(';').next().unwrap(), 16)
                    .unwrap();
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                body.extend(self.bytes(size).await);
                assert_eq!(self.bytes(2).await, b"\r\n");
            }
        } else if let Some(length) = header("content-length") {
            body = self.bytes(length.parse().unwrap()).await;
        } else {
            while self.fill().await {}
            body = std::mem::take(&mut self.buf);
        }
        (status, headers, body)
    }
}

pub mod browser;
pub mod ec2sim;
pub mod moto;

// ---- A second process over the same configuration (tests/upgrade.rs) ----

impl Server {
    /// `start`, with the generated configuration passed through `edit` (given the server's
    /// folder) before the server starts: for keys the generated file sets already, such as
    /// Pingora's `grace_period_seconds`.
    pub async fn start_edited(
        options: Options,
        edit: impl FnOnce(&Path, String) -> String,
    ) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let [api_port, proxy_port] = free_ports();
        let mut server = Server {
            child: None,
            api: SocketAddr::from(([127, 0, 0, 1], api_port)),
            proxy: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
            config: dir.join("rstudio-pool.yaml"),
            dir,
            options,
            _tmp: Some(tmp),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        };
        server.write_config();
        let text = std::fs::read_to_string(&server.config).unwrap();
        std::fs::write(&server.config, edit(&server.dir, text)).unwrap();
        server.spawn().await;
        server
    }

    /// The id of the server's process, while it has one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts another process of the binary with this server's configuration and environment
    /// and `args` added (`-u`), its output appended to `log` in the server's folder. It is not
    /// waited for: with `-u` it waits for the running process's listening sockets.
    pub fn spawn_another(&self, args: &[&str], log: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))
            .unwrap();
        let mut command = self.binary();
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        command.spawn().unwrap()
    }

    /// Makes `child` this server's process (the one `kill9` and dropping end) and hands back
    /// the one it had.
    pub fn swap_child(&mut self, child: Option<Child>) -> Option<Child> {
        std::mem::replace(&mut self.child, child)
    }
}

/// Runs `bash -n` and shellcheck (at style severity) on a script: `what` names it in a failure.
pub fn lint_shell(what: &str, path: &Path) {
    let syntax = Command::new("bash").arg("-n").arg(path).output().unwrap();
    assert!(
        syntax.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let lint = Command::new("shellcheck")
        .args(["--shell=bash", "--severity=style"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run shellcheck ({e}): scripts/test.sh installs it"));
    assert!(
        lint.status.success(),
        "{what}: shellcheck says\n{}",
        String::from_utf8_lossy(&lint.stdout)
    );
}
