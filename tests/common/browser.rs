//! A real headless browser for the integration tests: Debian's chromium driven by its
//! chromedriver over the W3C WebDriver protocol, with a small client on `reqwest`.
//!
//! Every `Browser` is its own chromedriver and chromium with a fresh profile (its own
//! cookies). Dropping it ends the session and kills the chromedriver's process group, which
//! holds every chromium process it started. Element lookups take CSS selectors; the `wait_*`
//! methods poll with a deadline, and every failure panics naming what failed, with the page's
//! URL, title, visible text and source, and a screenshot saved under the target's tmp folder.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How a WebDriver reference to an element is spelled in JSON.
pub const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How often the `wait_*` methods look again.
const POLL: Duration = Duration::from_millis(100);

/// W3C WebDriver key codes, for `keys` and `chord`.
pub mod keys {
    pub const BACKSPACE: &str = "\u{E003}";
    pub const TAB: &str = "\u{E004}";
    pub const ENTER: &str = "\u{E007}";
    pub const SHIFT: &str = "\u{E008}";
    pub const CONTROL: &str = "\u{E009}";
    pub const ALT: &str = "\u{E00A}";
    pub const ESCAPE: &str = "\u{E00C}";
    pub const SPACE: &str = "\u{E00D}";
    pub const PAGE_UP: &str = "\u{E00E}";
    pub const PAGE_DOWN: &str = "\u{E00F}";
    pub const END: &str = "\u{E010}";
    pub const HOME: &str = "\u{E011}";
    pub const LEFT: &str = "\u{E012}";
    pub const UP: &str = "\u{E013}";
    pub const RIGHT: &str = "\u{E014}";
    pub const DOWN: &str = "\u{E015}";
    pub const DELETE: &str = "\u{E017}";
    pub const META: &str = "\u{E03D}";
}

/// The JSON a script argument must be to reach the script as the element `id`.
pub fn element_ref(id: &str) -> Value {
    json!({ ELEMENT_KEY: id })
}

/// An error answer of the WebDriver (or a failure to reach it).
#[derive(Debug, Clone)]
pub struct WdError {
    /// The HTTP status; 0 when chromedriver could not be reached.
    pub status: u16,
    /// The W3C error code, such as `no such element` or `stale element reference`.
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message: String = self
            .message
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(600)
            .collect();
        write!(f, "{} (HTTP {}): {}", self.error, self.status, message)
    }
}

/// The chromedriver process: its own process group, so that killing the group kills every
/// chromium it started. Separate from `Browser` so that a failed start cleans up too.
struct Driver {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Driver {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("chromedriver.log")
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The chromedriver is the leader of its group (process_group(0)): its pid is the pgid.
        let pgid = self.child.id() as i32;
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// One headless chromium with its own profile, driven through its own chromedriver.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`
    base: String,
    session: String,
    /// The pid of the chromium main process, as chromedriver reports it.
    pub chromium_pid: Option<u32>,
    driver: Driver,
}

impl Browser {
    /// Starts chromedriver and a headless chromium with a fresh profile.
    pub async fn start() -> Browser {
        Self::start_with_args(&[]).await
    }

    /// `start` with more chromium command-line arguments, such as
    /// `--host-resolver-rules=MAP *.test 127.0.0.1`.
    pub async fn start_with_args(extra_args: &[&str]) -> Browser {
        let dir = tempfile::Builder::new()
            .prefix("browser-")
            .tempdir()
            .expect("browser: cannot create a temporary folder");
        let profile = dir.path().join("profile");
        std::fs::create_dir(&profile).expect("browser: cannot create the profile folder");
        let log = std::fs::File::create(dir.path().join("chromedriver.log"))
            .expect("browser: cannot create chromedriver.log");
        let port = super::free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("browser: cannot start {CHROMEDRIVER} ({e}); install chromium-driver")
            });
        let mut driver = Driver { child, port, dir };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(90))
            .build()
            .unwrap();

        // chromedriver answers /status with ready:true once it listens.
        let status_url = format!("http://127.0.0.1:{port}/status");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(&status_url).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    if v["value"]["ready"] == json!(true) {
                        break;
                    }
                }
            }
            if let Some(status) = driver.child.try_wait().unwrap() {
                panic!(
                    "browser: chromedriver exited with {status} before it was ready:\n{}",
                    driver.log_tail(40)
                );
            }
            if Instant::now() > until {
                panic!(
                    "browser: chromedriver on port {port} not ready after 20 s:\n{}",
                    driver.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }

        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,860",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
                    "pageLoadStrategy": "normal",
                    // A prompt left open is accepted by the next command (so that a
                    // beforeunload prompt does not cancel a navigation); `accept_alert` and
                    // `alert_text` still see a prompt when they are the next command.
                    "unhandledPromptBehavior": "accept",
                    "timeouts": { "implicit": 0, "pageLoad": 60_000, "script": 30_000 },
                }
            }
        });
        // Chromium may fail to start on a loaded machine: try twice.
        let mut attempt = 0;
        let answer = loop {
            attempt += 1;
            let r = wd_request(
                &http,
                Method::POST,
                &format!("http://127.0.0.1:{port}/session"),
                Some(&capabilities),
            )
            .await;
            match r {
                Ok(v) => break v,
                Err(e) if attempt < 2 && e.status != 0 => {
                    eprintln!("browser: creating the session failed, trying again: {e}");
                }
                Err(e) => panic!(
                    "browser: cannot create a chromium session: {e}\n---- chromedriver log ----\n{}",
                    driver.log_tail(60)
                ),
            }
        };
        let session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("browser: no sessionId in {answer}"))
            .to_owned();
        let chromium_pid = answer["capabilities"]["goog:processID"]
            .as_u64()
            .map(|p| p as u32);
        Browser {
            http,
            base: format!("http://127.0.0.1:{port}/session/{session}"),
            session,
            chromium_pid,
            driver,
        }
    }

    /// The chromedriver's pid, which is also the process group of every chromium it started.
    pub fn driver_pid(&self) -> u32 {
        self.driver.child.id()
    }

    /// The chromedriver's output, with chromium's log.
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(self.driver.log_path()).unwrap_or_default()
    }

    // ---- the protocol ----

    /// One command of the session (`path` is relative to the session), as a `Result`.
    pub async fn try_command(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WdError> {
        wd_request(
            &self.http,
            method,
            &format!("{}{path}", self.base),
            body.as_ref(),
        )
        .await
    }

    /// One command that must succeed; panics naming `what`, with the page's state.
    async fn must(&self, what: &str, method: Method, path: &str, body: Option<Value>) -> Value {
        match self.try_command(method, path, body).await {
            Ok(v) => v,
            Err(e) => self.fail(&format!("{what}: {e}")).await,
        }
    }

    /// Panics with `message` and what the page looks like now.
    pub async fn fail(&self, message: &str) -> ! {
        let context = self.context().await;
        panic!("browser: {message}\n{context}");
    }

    /// The current URL, title, visible text and source of the page, and a screenshot, for a
    /// failure message. Never panics.
    pub async fn context(&self) -> String {
        static SHOTS: AtomicUsize = AtomicUsize::new(0);
        let url = match self.try_command(Method::GET, "/url", None).await {
            Ok(v) => v.as_str().unwrap_or_default().to_owned(),
            Err(e) => format!("<unavailable: {e}>"),
        };
        let title = match self.try_command(Method::GET, "/title", None).await {
            Ok(v) => v.as_str().unwrap_or_default().to_owned(),
            Err(e) => format!("<unavailable: {e}>"),
        };
        let text = match self
            .try_command(
                Method::POST,
                "/execute/sync",
                Some(json!({"script": "return document.body ? document.body.innerText : '';", "args": []})),
            )
            .await
        {
            Ok(v) => excerpt(v.as_str().unwrap_or_default(), 1_500),
            Err(e) => format!("<unavailable: {e}>"),
        };
        let source = match self.try_command(Method::GET, "/source", None).await {
            Ok(v) => excerpt(v.as_str().unwrap_or_default(), 2_500),
            Err(e) => format!("<unavailable: {e}>"),
        };
        let shot = match self.try_command(Method::GET, "/screenshot", None).await {
            Ok(v) => {
                let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-failures");
                let path = dir.join(format!(
                    "{}-{}.png",
                    std::process::id(),
                    SHOTS.fetch_add(1, Ordering::Relaxed)
                ));
                let png = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap_or_default())
                    .unwrap_or_default();
                match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, png)) {
                    Ok(()) => path.display().to_string(),
                    Err(e) => format!("<not saved: {e}>"),
                }
            }
            Err(e) => format!("<unavailable: {e}>"),
        };
        format!(
            "  url: {url}\n  title: {title}\n  screenshot: {shot}\n\
             ---- visible text ----\n{text}\n---- page source ----\n{source}\n----"
        )
    }

    // ---- navigation and page ----

    pub async fn goto(&self, url: &str) {
        self.must(
            &format!("goto {url}"),
            Method::POST,
            "/url",
            Some(json!({ "url": url })),
        )
        .await;
    }

    pub async fn url(&self) -> String {
        let v = self
            .must("get the current URL", Method::GET, "/url", None)
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    pub async fn title(&self) -> String {
        let v = self
            .must("get the title", Method::GET, "/title", None)
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    pub async fn source(&self) -> String {
        let v = self
            .must("get the page source", Method::GET, "/source", None)
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    pub async fn refresh(&self) {
        self.must("refresh", Method::POST, "/refresh", Some(json!({})))
            .await;
    }

    pub async fn back(&self) {
        self.must("go back", Method::POST, "/back", Some(json!({})))
            .await;
    }

    // ---- elements ----

    /// The first element matching `css`, if any, as a WebDriver element id.
    pub async fn find(&self, css: &str) -> Option<String> {
        match self.try_find(css).await {
            Ok(found) => found,
            Err(e) => self.fail(&format!("find {css:?}: {e}")).await,
        }
    }

    async fn try_find(&self, css: &str) -> Result<Option<String>, WdError> {
        let body = json!({"using": "css selector", "value": css});
        match self.try_command(Method::POST, "/element", Some(body)).await {
            Ok(v) => Ok(Some(element_id(&v))),
            Err(e) if e.error == "no such element" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every element matching `css`, in document order.
    pub async fn find_all(&self, css: &str) -> Vec<String> {
        match self.try_find_all(css).await {
            Ok(all) => all,
            Err(e) => self.fail(&format!("find all {css:?}: {e}")).await,
        }
    }

    async fn try_find_all(&self, css: &str) -> Result<Vec<String>, WdError> {
        let body = json!({"using": "css selector", "value": css});
        let v = self
            .try_command(Method::POST, "/elements", Some(body))
            .await?;
        Ok(v.as_array()
            .map(|a| a.iter().map(element_id).collect())
            .unwrap_or_default())
    }

    /// The first element matching `css`; panics if there is none.
    async fn must_find(&self, what: &str, css: &str) -> String {
        match self.find(css).await {
            Some(id) => id,
            None => {
                self.fail(&format!("{what}: no element matches {css:?}"))
                    .await
            }
        }
    }

    async fn try_text(&self, css: &str) -> Result<Option<String>, WdError> {
        let Some(id) = self.try_find(css).await? else {
            return Ok(None);
        };
        let v = self
            .try_command(Method::GET, &format!("/element/{id}/text"), None)
            .await?;
        Ok(Some(v.as_str().unwrap_or_default().to_owned()))
    }

    async fn try_texts(&self, css: &str) -> Result<Vec<String>, WdError> {
        let mut texts = Vec::new();
        for id in self.try_find_all(css).await? {
            let v = self
                .try_command(Method::GET, &format!("/element/{id}/text"), None)
                .await?;
            texts.push(v.as_str().unwrap_or_default().to_owned());
        }
        Ok(texts)
    }

    /// The visible text of the first element matching `css`; panics if there is none.
    pub async fn text(&self, css: &str) -> String {
        match self.try_text(css).await {
            Ok(Some(text)) => text,
            Ok(None) => {
                self.fail(&format!("text of {css:?}: no element matches"))
                    .await
            }
            Err(e) => self.fail(&format!("text of {css:?}: {e}")).await,
        }
    }

    /// The visible texts of every element matching `css`. Retries a few times if the page
    /// replaces the elements while they are read.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let mut last = None;
        for _ in 0..5 {
            match self.try_texts(css).await {
                Ok(texts) => return texts,
                Err(e) if e.error == "stale element reference" => last = Some(e),
                Err(e) => self.fail(&format!("texts of {css:?}: {e}")).await,
            }
        }
        self.fail(&format!("texts of {css:?}: {}", last.unwrap()))
            .await
    }

    /// An attribute of the first element matching `css` (`None` if it has none).
    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let what = format!("attribute {name:?} of {css:?}");
        let id = self.must_find(&what, css).await;
        let v = self
            .must(
                &what,
                Method::GET,
                &format!("/element/{id}/attribute/{name}"),
                None,
            )
            .await;
        v.as_str().map(str::to_owned)
    }

    /// The `value` property of the first element matching `css` (what an input holds).
    pub async fn value(&self, css: &str) -> String {
        let what = format!("value of {css:?}");
        let id = self.must_find(&what, css).await;
        let v = self
            .must(
                &what,
                Method::GET,
                &format!("/element/{id}/property/value"),
                None,
            )
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Clicks the first element matching `css` (which must be there and clickable now).
    pub async fn click(&self, css: &str) {
        let what = format!("click {css:?}");
        let id = self.must_find(&what, css).await;
        self.must(
            &what,
            Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Waits until the first element matching `css` is there and accepts a click, and clicks it.
    pub async fn wait_and_click(&self, css: &str, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            let last = match self.try_find(css).await {
                Ok(Some(id)) => {
                    let path = format!("/element/{id}/click");
                    match self.try_command(Method::POST, &path, Some(json!({}))).await {
                        Ok(_) => return,
                        Err(e) => e.to_string(),
                    }
                }
                Ok(None) => "no element matches".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > until {
                self.fail(&format!(
                    "timed out after {deadline:?} clicking {css:?}; last: {last}"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Types `text` into the first element matching `css` (WebDriver "element send keys":
    /// focuses it first; `keys::ENTER` and the other key codes work inside `text`).
    pub async fn type_into(&self, css: &str, text: &str) {
        let what = format!("type {text:?} into {css:?}");
        let id = self.must_find(&what, css).await;
        let body = json!({ "text": text });
        self.must(
            &what,
            Method::POST,
            &format!("/element/{id}/value"),
            Some(body),
        )
        .await;
    }

    /// Empties the input or editable element matching `css`.
    pub async fn clear(&self, css: &str) {
        let what = format!("clear {css:?}");
        let id = self.must_find(&what, css).await;
        self.must(
            &what,
            Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await;
    }

    // ---- keyboard (W3C actions, to whatever has the focus) ----

    /// Presses and releases every character of `text` in turn, to the focused element (or
    /// the page). Key codes such as `keys::ENTER` ("\u{E007}") are keys too.
    pub async fn keys(&self, text: &str) {
        let mut actions = Vec::new();
        for c in text.chars() {
            actions.push(json!({"type": "keyDown", "value": c.to_string()}));
            actions.push(json!({"type": "keyUp", "value": c.to_string()}));
        }
        self.key_actions(&format!("press keys {text:?}"), actions)
            .await;
    }

    /// Holds `modifiers` (such as `keys::SHIFT`, `keys::CONTROL`) down while pressing `key`.
    pub async fn chord(&self, modifiers: &[&str], key: &str) {
        let mut actions = Vec::new();
        for m in modifiers {
            actions.push(json!({"type": "keyDown", "value": m}));
        }
        actions.push(json!({"type": "keyDown", "value": key}));
        actions.push(json!({"type": "keyUp", "value": key}));
        for m in modifiers.iter().rev() {
            actions.push(json!({"type": "keyUp", "value": m}));
        }
        self.key_actions(&format!("press {modifiers:?} + {key:?}"), actions)
            .await;
    }

    /// Shift+Enter (for instance, run a cell in JupyterLab).
    pub async fn shift_enter(&self) {
        self.chord(&[keys::SHIFT], keys::ENTER).await;
    }

    /// Ctrl+Enter (for instance, run the current line in RStudio).
    pub async fn ctrl_enter(&self) {
        self.chord(&[keys::CONTROL], keys::ENTER).await;
    }

    async fn key_actions(&self, what: &str, actions: Vec<Value>) {
        let body = json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]});
        self.must(what, Method::POST, "/actions", Some(body)).await;
    }

    // ---- scripts ----

    /// Runs `script` (a function body: `return ...;`) in the page with `args` (`arguments[0]`
    /// ...; use `element_ref` to pass an element) and returns its result.
    pub async fn execute(&self, script: &str, args: &[Value]) -> Value {
        let body = json!({"script": script, "args": args});
        self.must(
            &format!("execute {}", excerpt(script, 200)),
            Method::POST,
            "/execute/sync",
            Some(body),
        )
        .await
    }

    /// Runs `script` with a callback as its last argument (`arguments[arguments.length - 1]`)
    /// and returns what it passes to the callback (30 s at most).
    /// Runs `source` in every document this browser loads from now on, before the page's
    /// own scripts (Chromium's `Page.addScriptToEvaluateOnNewDocument`).
    pub async fn add_init_script(&self, source: &str) {
        let command = json!({
            "cmd": "Page.addScriptToEvaluateOnNewDocument",
            "params": {"source": source},
        });
        if let Err(e) = self
            .try_command(Method::POST, "/goog/cdp/execute", Some(command))
            .await
        {
            self.fail(&format!("cannot add the script: {e}")).await;
        }
    }

    pub async fn execute_async(&self, script: &str, args: &[Value]) -> Value {
        let body = json!({"script": script, "args": args});
        self.must(
            &format!("execute async {}", excerpt(script, 200)),
            Method::POST,
            "/execute/async",
            Some(body),
        )
        .await
    }

    // ---- waiting ----

    /// Waits until an element matches `css` and returns its id; panics naming `what` when
    /// `deadline` passes first.
    pub async fn wait_for(&self, what: &str, deadline: Duration, css: &str) -> String {
        let until = Instant::now() + deadline;
        loop {
            let last = match self.try_find(css).await {
                Ok(Some(id)) => return id,
                Ok(None) => "no element matches".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > until {
                self.fail(&format!(
                    "timed out after {deadline:?} waiting for {what} ({css:?}); last: {last}"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until no element matches `css` any more.
    pub async fn wait_gone(&self, what: &str, deadline: Duration, css: &str) {
        let until = Instant::now() + deadline;
        loop {
            if let Ok(None) = self.try_find(css).await {
                return;
            }
            if Instant::now() > until {
                self.fail(&format!(
                    "timed out after {deadline:?} waiting for {what} ({css:?}) to go away"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the visible text of the first element matching `css` contains `needle`,
    /// and returns that text.
    pub async fn wait_for_text(&self, css: &str, needle: &str, deadline: Duration) -> String {
        let until = Instant::now() + deadline;
        loop {
            let last = match self.try_text(css).await {
                Ok(Some(text)) if text.contains(needle) => return text,
                Ok(Some(text)) => format!("the text is {:?}", excerpt(&text, 1_000)),
                Ok(None) => "no element matches".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > until {
                self.fail(&format!(
                    "timed out after {deadline:?} waiting for {css:?} to show {needle:?}; {last}"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `script` (a function body) returns something other than null, false,
    /// 0 or "", and returns that.
    pub async fn wait_js(&self, what: &str, deadline: Duration, script: &str) -> Value {
        let until = Instant::now() + deadline;
        loop {
            let body = json!({"script": script, "args": []});
            let last = match self
                .try_command(Method::POST, "/execute/sync", Some(body))
                .await
            {
                Ok(v) if truthy(&v) => return v,
                Ok(v) => format!("returned {v}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() > until {
                self.fail(&format!(
                    "timed out after {deadline:?} waiting for {what}; last: {last}"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the current URL contains `needle`, and returns the URL.
    pub async fn wait_for_url(&self, needle: &str, deadline: Duration) -> String {
        let until = Instant::now() + deadline;
        loop {
            let last = match self.try_command(Method::GET, "/url", None).await {
                Ok(v) if v.as_str().unwrap_or_default().contains(needle) => {
                    return v.as_str().unwrap_or_default().to_owned()
                }
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > until {
                self.fail(&format!(
                    "timed out after {deadline:?} waiting for the URL to contain {needle:?}; last: {last}"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    // ---- the rest ----

    /// Saves a PNG screenshot of the viewport to `path`.
    pub async fn screenshot(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        let v = self
            .must("take a screenshot", Method::GET, "/screenshot", None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("browser: the screenshot is not base64: {e}"));
        std::fs::write(path, png).unwrap_or_else(|e| {
            panic!(
                "browser: cannot write the screenshot {}: {e}",
                path.display()
            )
        });
    }

    /// The cookies the browser holds for the current page (W3C cookie objects:
    /// name, value, path, domain, secure, httpOnly, expiry, sameSite).
    pub async fn cookies(&self) -> Vec<Value> {
        let v = self
            .must("get the cookies", Method::GET, "/cookie", None)
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// The cookie `name` of the current page, if the browser holds one.
    pub async fn cookie(&self, name: &str) -> Option<Value> {
        self.cookies()
            .await
            .into_iter()
            .find(|c| c["name"] == json!(name))
    }

    pub async fn delete_cookies(&self) {
        self.must("delete the cookies", Method::DELETE, "/cookie", None)
            .await;
    }

    /// The text of the open alert, confirm or prompt, if one is open.
    pub async fn alert_text(&self) -> Option<String> {
        match self.try_command(Method::GET, "/alert/text", None).await {
            Ok(v) => Some(v.as_str().unwrap_or_default().to_owned()),
            Err(e) if e.error == "no such alert" => None,
            Err(e) => self.fail(&format!("get the alert text: {e}")).await,
        }
    }

    /// Accepts the open alert, confirm or prompt; false if none is open. Call it right after
    /// what opened the prompt: any other command accepts it first.
    pub async fn accept_alert(&self) -> bool {
        match self
            .try_command(Method::POST, "/alert/accept", Some(json!({})))
            .await
        {
            Ok(_) => true,
            Err(e) if e.error == "no such alert" => false,
            Err(e) => self.fail(&format!("accept the alert: {e}")).await,
        }
    }

    /// Dismisses the open confirm or prompt; false if none is open.
    pub async fn dismiss_alert(&self) -> bool {
        match self
            .try_command(Method::POST, "/alert/dismiss", Some(json!({})))
            .await
        {
            Ok(_) => true,
            Err(e) if e.error == "no such alert" => false,
            Err(e) => self.fail(&format!("dismiss the alert: {e}")).await,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session makes chromedriver quit chromium cleanly (about 0.1 s). A plain
        // blocking request: Drop cannot await. The Driver's Drop then kills the group anyway.
        let _ = delete_session(self.driver.port, &self.session);
        if std::thread::panicking() {
            eprintln!(
                "---- chromedriver and chromium log (last 30 lines) ----\n{}\n----",
                self.driver.log_tail(30)
            );
        }
    }
}

fn delete_session(port: u16, session: &str) -> std::io::Result<()> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    // chromedriver answers "Connection: close" but keeps the connection open: read the head
    // and Content-Length bytes of body, not to the end.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                return Ok(());
            }
        }
        match stream.read(&mut buf)? {
            0 => return Ok(()),
            n => answer.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends one WebDriver request and unwraps the W3C `{"value": ...}` envelope.
async fn wd_request(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<&Value>,
) -> Result<Value, WdError> {
    let mut request = http.request(method.clone(), url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let transport = |e: reqwest::Error| WdError {
        status: 0,
        error: "transport".into(),
        message: format!("{method} {url}: {e}"),
    };
    let response = request.send().await.map_err(transport)?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(transport)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| WdError {
        status,
        error: "not JSON".into(),
        message: format!("{method} {url}: {e}: {}", excerpt(&text, 500)),
    })?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if status >= 400 || value.get("error").is_some_and(|e| e.is_string()) {
        return Err(WdError {
            status,
            error: value["error"]
                .as_str()
                .unwrap_or("unknown error")
                .to_owned(),
            message: value["message"].as_str().unwrap_or(&text).to_owned(),
        });
    }
    Ok(value)
}

fn element_id(v: &Value) -> String {
    v[ELEMENT_KEY]
        .as_str()
        .unwrap_or_else(|| panic!("browser: not an element reference: {v}"))
        .to_owned()
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// The first `max` characters of `s`, saying how much was left out.
fn excerpt(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        return s.to_owned();
    }
    let head: String = s.chars().take(max).collect();
    format!("{head}… ({} more characters)", count - max)
}
