//! The `shiny` purpose with the real program: R's shiny (scripts/install-shiny.sh installs it)
//! running the example app (`rstudio-pool example shiny`), opened through the proxy in token
//! mode by a real browser (headless Chromium). The page and its assets load under the
//! instance's prefix, Shiny's WebSocket connects through the proxy, a slider moved with the
//! keyboard comes back as a new output; a tab left open and untouched has its instance paused
//! (Shiny's client sends nothing on its own), a tab whose input changes keeps it.
//!
//! `UPDATE_SCREENSHOTS=1` keeps the app's screenshot as `docs/shiny.png`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::browser::{keys, Browser};
use common::{is_running, state_of, Options, Server};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "shiny-test-secret-0123456789abcdef";

/// Panics with what to run when R or its shiny package is missing.
fn require_shiny() {
    let found = Command::new("R")
        .args(["--no-save", "--quiet", "--slave", "-e", "library(shiny)"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "no R with the shiny package: run scripts/install-shiny.sh"
    );
}

/// A pool in token mode with the shiny purpose, its idle timeout `timeout_ms`; nothing warm.
async fn start(timeout_ms: u64) -> Server {
    require_shiny();
    Server::start(Options {
        min_free: 0,
        max: 2,
        auth_yaml: Some(format!("auth:\n  mode: token\n  secrets: [\"{SECRET}\"]\n")),
        extra_yaml: format!("purposes:\n  shiny:\n    timeout_instance_ms: {timeout_ms}\n"),
        ..Options::default()
    })
    .await
}

/// `REQUEST_RSTUDIO` for a Shiny app, waiting until it is ready: the instance and its link.
async fn ask(server: &Server, user: &str) -> (String, String) {
    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": user, "purpose": "shiny", "wait": 60}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], json!(true), "{body}");
    (
        body["instanceId"].as_str().unwrap().to_owned(),
        body["url"].as_str().unwrap().to_owned(),
    )
}

/// Records, in every page this browser opens, what the page sends on its WebSockets
/// (`window.__wsSent`: time in ms since the page started, and the message), before the page's
/// own scripts run. Pings and pongs are the browser's own and never pass through here.
async fn record_websocket_sends(browser: &Browser) {
    let source = r#"
        window.__wsSent = [];
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) {
            window.__wsSent.push({
                at: Math.round(performance.now()),
                data: typeof data === 'string' ? data : '<binary ' + (data.byteLength ?? data.size) + ' bytes>',
            });
            return send.call(this, data);
        };
    "#;
    browser.add_init_script(source).await;
}

/// What the page sent on its WebSockets so far.
async fn sent(browser: &Browser) -> Value {
    browser
        .execute("return window.__wsSent || null;", &[])
        .await
}

fn sum_text(n: u64) -> String {
    format!("The sum of 1 to {n} is {}", n * (n + 1) / 2)
}

/// Opens the link in `browser` (exchanged for the session cookie, then the app without the
/// token), and waits for the app's first output, which only comes over its WebSocket.
async fn open(browser: &Browser, id: &str, link: &str) {
    record_websocket_sends(browser).await;
    browser.goto(link).await;
    let url = browser.wait_for_url(&format!("/{id}/"), WAIT).await;
    assert!(url.ends_with(&format!("/{id}/")), "the token stays: {url}");
    browser.wait_for_text("#summary", &sum_text(10), WAIT).await;
}

/// The slider's value as it shows it.
async fn slider(browser: &Browser) -> u64 {
    let text = browser.text(".irs-single").await;
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("the slider shows {text:?}"))
}

/// Moves the slider `steps` to the right as a user does: takes its handle (a click, which
/// gives it the keyboard and may itself move the slider by a step) and presses the right
/// arrow. Then waits for the output to say the sum for the value the slider shows: the new
/// value went to R and its answer came back over the WebSocket. Returns that value.
async fn move_slider(browser: &Browser, steps: usize) -> u64 {
    let before = slider(browser).await;
    browser.click(".irs-handle").await;
    browser.keys(&keys::RIGHT.repeat(steps)).await;
    let script = format!(
        "const v = parseInt(document.querySelector('.irs-single').innerText, 10); \
         const want = 'The sum of 1 to ' + v + ' is ' + v * (v + 1) / 2; \
         return v > {before} && document.querySelector('#summary').innerText.trim() === want ? v : null;"
    );
    let shown = browser
        .wait_js(
            &format!("the output to follow the slider moved from {before}"),
            WAIT,
            &script,
        )
        .await;
    shown.as_u64().unwrap()
}

#[tokio::test]
async fn a_shiny_app_runs_through_the_proxy_in_a_browser() {
    let server = start(3_600_000).await;
    let (id, link) = ask(&server, "ana").await;
    assert!(link.contains("rsp_token="), "a token-mode link: {link}");
    let browser = Browser::start().await;
    open(&browser, &id, &link).await;
    let cookie = browser
        .cookie("rstudio-pool-session")
        .await
        .expect("the session cookie");
    assert_eq!(
        cookie["path"],
        json!(format!("/{id}/")),
        "scoped to the instance: {cookie}"
    );

    // The page and its assets came through the proxy, under the instance's prefix: Shiny's
    // JavaScript and CSS, jQuery, Bootstrap (its JavaScript and its CSS applied), the slider.
    let page = browser
        .execute(
            r#"
            const rs = performance.getEntriesByType('resource');
            const socket = window.Shiny && Shiny.shinyapp && Shiny.shinyapp.$socket;
            return {
                shiny: typeof window.Shiny === 'object' && typeof Shiny.setInputValue === 'function',
                jquery: window.jQuery ? jQuery.fn.jquery : null,
                bootstrapJs: !!(window.jQuery && jQuery.fn.modal && jQuery.fn.tooltip),
                bootstrapCss: getComputedStyle(document.querySelector('.container-fluid')).paddingLeft,
                slider: !!(window.jQuery && jQuery('#n').data('ionRangeSlider')),
                connected: !!(window.Shiny && Shiny.shinyapp && Shiny.shinyapp.isConnected()),
                socketUrl: socket ? socket.url : null,
                socketState: socket ? socket.readyState : null,
                assets: [...document.querySelectorAll('script[src], link[rel=stylesheet]')]
                    .map(e => e.src || e.href),
                loaded: rs.map(e => ({url: e.name, status: e.responseStatus})),
            };
            "#,
            &[],
        )
        .await;
    assert_eq!(page["shiny"], json!(true), "shiny.js did not run: {page}");
    assert!(page["jquery"].is_string(), "no jQuery: {page}");
    assert_eq!(
        page["bootstrapJs"],
        json!(true),
        "no Bootstrap JavaScript: {page}"
    );
    assert_eq!(
        page["bootstrapCss"],
        json!("15px"),
        "Bootstrap's CSS is not applied: {page}"
    );
    assert_eq!(page["slider"], json!(true), "no slider: {page}");
    let prefix = format!("http://{}/{id}/", server.proxy);
    let assets: Vec<&str> = page["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for needle in ["jquery", "shiny", "bootstrap", "rangeSlider"] {
        assert!(
            assets.iter().any(|a| a.contains(needle)),
            "the page names no {needle} asset: {assets:?}"
        );
    }
    let loaded = page["loaded"].as_array().unwrap();
    let workspace = server.upstream(&id).await;
    for asset in &assets {
        let rest = asset
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{asset} is not under {prefix}"));
        let status = loaded
            .iter()
            .find(|l| l["url"] == json!(asset))
            .unwrap_or_else(|| panic!("{asset} was never loaded: {page}"))["status"]
            .as_u64()
            .unwrap();
        if status == 200 {
            continue;
        }
        // Debian's r-cran-shiny 1.7.4 names `strftime-min.js` but ships `strftime.min.js`:
        // what the workspace itself does not serve is not the proxy's failure.
        let direct: u64 = server
            .client()
            .get(format!("http://{workspace}/{rest}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
            .into();
        assert_eq!(
            status, direct,
            "{asset} got {status} through the proxy, {direct} from the workspace itself"
        );
        assert!(
            !["jquery", "shiny", "bootstrap", "rangeSlider"]
                .iter()
                .any(|n| rest.contains(n)),
            "{asset}: {status}"
        );
        eprintln!("note: the workspace itself answers {direct} for {rest}");
    }

    // Shiny's WebSocket is connected through the proxy (the output above came over it).
    assert_eq!(page["connected"], json!(true), "{page}");
    assert_eq!(
        page["socketUrl"],
        json!(format!("ws://{}/{id}/websocket/", server.proxy)),
        "{page}"
    );
    assert_eq!(
        page["socketState"],
        json!(1),
        "the socket is not open: {page}"
    );

    // A changed input comes back as a changed output.
    let n = move_slider(&browser, 10).await;
    let frames = sent(&browser).await;
    assert!(
        frames
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["data"].as_str().unwrap().contains(&format!("\"n\":{n}"))),
        "the new value went over the WebSocket: {frames}"
    );
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        browser.screenshot(docs.join("shiny.png")).await;
    } else {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        browser.screenshot(dir.join("shiny.png")).await;
    }
}

/// Shiny's client sends nothing on its own (no heartbeat, no polling): a tab left open and
/// untouched is idle, its instance paused with the tab still connected until then; a tab
/// whose slider moves every 2 s keeps its instance. The paused user resumes from the paused
/// page and gets the app back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_shiny_tab_is_paused_a_used_one_is_not() {
    const TIMEOUT_MS: u64 = 6000;
    let server = start(TIMEOUT_MS).await;
    let (idle_id, idle_link) = ask(&server, "leaves-it-open").await;
    let (busy_id, busy_link) = ask(&server, "moves-the-slider").await;
    let idle = Browser::start().await;
    let busy = Browser::start().await;
    open(&idle, &idle_id, &idle_link).await;
    let opened = Instant::now();
    open(&busy, &busy_id, &busy_link).await;

    // The busy user moves the slider every 2 s for more than two timeouts; meanwhile the idle
    // tab stays open, its socket connected, until its instance is paused.
    let mut idle_connected_at = None;
    let mut paused_after = None;
    let mut before_pause = Value::Null;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(TIMEOUT_MS * 2 + 3000) || paused_after.is_none()
    {
        assert!(
            started.elapsed() < WAIT,
            "the untouched tab's instance was not paused within {WAIT:?}; it sent {}",
            sent(&idle).await
        );
        // Two steps: taking the handle may move it one step back.
        move_slider(&busy, 2).await;
        if paused_after.is_none() {
            // The socket first, then the state: the pool says `paused` before it ends the
            // workspace, so a tab seen connected before a state other than `paused` was
            // connected while its instance ran.
            let connected = idle
                .execute("return Shiny.shinyapp.isConnected();", &[])
                .await;
            let frames = sent(&idle).await;
            if state_of(&server, &idle_id).await.as_deref() == Some("paused") {
                paused_after = Some(opened.elapsed());
            } else {
                assert_eq!(connected, json!(true), "the idle tab lost its socket");
                idle_connected_at = Some(opened.elapsed());
                before_pause = frames;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        is_running(&server, &busy_id).await,
        "a user moving the slider every 2 s was paused"
    );
    let paused_after = paused_after.unwrap();
    let idle_connected_at = idle_connected_at.expect("the idle tab was seen connected");
    eprintln!(
        "the untouched tab sent {before_pause}; still connected {idle_connected_at:?} after it \
         opened; paused after {paused_after:?}"
    );
    assert!(
        paused_after >= Duration::from_millis(TIMEOUT_MS / 2),
        "paused too early: {paused_after:?}"
    );
    assert!(
        idle_connected_at >= Duration::from_millis(TIMEOUT_MS / 2),
        "the idle tab was last seen connected {idle_connected_at:?} after it opened"
    );
    // All it sent is Shiny's `init` with the first inputs.
    let frames = before_pause.as_array().unwrap();
    assert_eq!(frames.len(), 1, "{before_pause}");
    assert!(
        frames[0]["data"]
            .as_str()
            .unwrap()
            .starts_with("{\"method\":\"init\""),
        "{before_pause}"
    );

    // The idle tab sees its app go away; a reload shows the paused page, Resume brings the
    // app back from the same working folder.
    idle.wait_for(
        "Shiny's disconnected overlay",
        WAIT,
        "#shiny-disconnected-overlay",
    )
    .await;
    idle.refresh().await;
    idle.wait_for_text("body", "paused", WAIT).await;
    idle.click("form[action$=\"/.rstudio-pool/resume\"] button")
        .await;
    idle.wait_for_text("#summary", &sum_text(10), WAIT).await;
    assert_eq!(
        state_of(&server, &idle_id).await.as_deref(),
        Some("ready"),
        "resumed"
    );
    move_slider(&idle, 2).await;
}

/// `rstudio-pool` killed and started again: the R process keeps running and is adopted again,
/// and the user's session cookie still opens it. The open tab's WebSocket went down with the
/// old process (Shiny run by `runApp` does not reconnect by itself), so the user reloads and
/// gets the app back.
#[tokio::test]
async fn after_a_restart_of_the_pool_a_reload_gets_the_shiny_app_back() {
    let mut server = start(3_600_000).await;
    let (id, link) = ask(&server, "ana").await;
    let browser = Browser::start().await;
    open(&browser, &id, &link).await;
    let pids = server.workspaces();
    server.restart().await;
    assert_eq!(server.workspaces(), pids, "the R process keeps running");
    browser.refresh().await;
    browser.wait_for_text("#summary", &sum_text(10), WAIT).await;
    move_slider(&browser, 2).await;
    assert_eq!(state_of(&server, &id).await.as_deref(), Some("ready"));
}
