//! The user's path in a real browser (headless Chromium through chromedriver), in token
//! mode through the proxy: the link from `REQUEST_RSTUDIO` opens the workspace, the session
//! it hands out keeps the user signed in, and nobody else's browser gets in.
//!
//! - JupyterLab (the `jupyter` preset as shipped): a new notebook runs `6*7` from the
//!   keyboard and shows `42`; a reload keeps the lab; another user's browser is refused.
//! - The demo workspace (the `rstudio` preset): its page, and a WebSocket opened by the page
//!   itself that echoes, while the same socket from a browser without a session fails.
//! - The progress page: shown while the workspace starts, it reloads itself into the
//!   workspace without a click.
//!
//! `UPDATE_SCREENSHOTS=1` keeps the screenshots as `docs/jupyter.png`, `docs/rstudio.png` and
//! `docs/progress.png`; otherwise they go to the target's tmp folder.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::{eventually, path_with_venv, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

const SECRET: &str = "browser-secret-0123456789abcdef";
/// The name of the proxy's session cookie.
const SESSION_COOKIE: &str = "rstudio-pool-session";
/// The title of the proxy's 401 page for a browser without a session for the instance.
const REFUSED_TITLE: &str = "Open your workspace from the application";
const WAIT: Duration = Duration::from_secs(30);
/// JupyterLab's start, its page's scripts and its kernel's, on a loaded 2-core machine.
const LAB_WAIT: Duration = Duration::from_secs(120);

fn token_auth() -> Option<String> {
    Some(format!("auth:\n  mode: token\n  secrets: [\"{SECRET}\"]\n"))
}

/// `REQUEST_RSTUDIO` for `user` (and `purpose`, waiting at most `wait` seconds for the
/// instance to be ready when given): the link it answers with and the instance id.
async fn request(
    server: &Server,
    user: &str,
    purpose: &str,
    wait: Option<u64>,
) -> (String, String, Value) {
    let mut payload = json!({"userId": user, "purpose": purpose});
    if let Some(wait) = wait {
        payload["wait"] = json!(wait);
    }
    let (status, body) = server.command("REQUEST_RSTUDIO", payload).await;
    assert_eq!(status, 200, "{body}");
    let url = body["url"].as_str().unwrap().to_owned();
    let id = body["instanceId"].as_str().unwrap().to_owned();
    assert!(url.contains("rsp_token="), "a one-time link: {url}");
    (url, id, body)
}

/// Saves the browser's viewport as `docs/<name>` when `UPDATE_SCREENSHOTS` is set, else in the
/// target's tmp folder.
async fn keep_screenshot(browser: &Browser, name: &str) {
    let dir = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
    } else {
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    };
    std::fs::create_dir_all(&dir).unwrap();
    browser.screenshot(dir.join(name)).await;
}

/// Waits until the page is the proxy's 401 page and returns its visible text.
async fn wait_refused(browser: &Browser) -> String {
    browser
        .wait_js(
            "the proxy's 401 page",
            WAIT,
            &format!("return document.title === {REFUSED_TITLE:?};"),
        )
        .await;
    browser.text("body").await
}

/// Opens a WebSocket from the page's own context (the browser's `WebSocket`, with whatever
/// cookies the browser sends to that address), sends `message` and reports what happened:
/// `{"opened": bool, "echo": <the first message back> | null, "closeCode": <code> | null}`.
async fn websocket_from_page(browser: &Browser, path: &str, message: &str) -> Value {
    const SCRIPT: &str = r#"
        const [path, message, done] = arguments;
        const scheme = location.protocol === "https:" ? "wss:" : "ws:";
        const result = { opened: false, echo: null, closeCode: null, error: false };
        let finished = false;
        const finish = () => { if (!finished) { finished = true; done(result); } };
        let socket;
        try {
            socket = new WebSocket(scheme + "//" + location.host + path);
        } catch (e) {
            result.error = String(e);
            finish();
            return;
        }
        socket.onopen = () => { result.opened = true; socket.send(message); };
        socket.onmessage = (event) => {
            result.echo = String(event.data);
            socket.close(1000);
            finish();
        };
        socket.onerror = () => { result.error = true; };
        socket.onclose = (event) => { result.closeCode = event.code; finish(); };
        setTimeout(finish, 20000);
    "#;
    browser
        .execute_async(SCRIPT, &[json!(path), json!(message)])
        .await
}

#[tokio::test]
async fn jupyterlab_runs_a_cell_in_the_browser_and_only_for_its_owner() {
    // A HOME of its own, to check that no lab keeps its layout there: the preset puts each
    // lab's layout and settings in its own working folder (a shared `~/.jupyter/lab` made
    // every lab reopen another's notebooks).
    let home_dir = tempfile::tempdir().unwrap();
    let server = Server::start(Options {
        min_free: 0,
        env: vec![
            path_with_venv(),
            ("HOME".into(), home_dir.path().display().to_string()),
        ],
        auth_yaml: token_auth(),
        extra_yaml: "purposes:\n  jupyter: {}\n".into(),
        ..Options::default()
    })
    .await;
    // Both users' labs start side by side; each answer comes once its lab is ready.
    let ((link, id, _), (ben_link, ben_id, _)) = tokio::join!(
        request(&server, "ana", "jupyter", Some(120)),
        request(&server, "ben", "jupyter", Some(120)),
    );
    assert_ne!(id, ben_id);
    let home = server.proxy_url(&format!("/{id}/"));

    let browser = Browser::start().await;
    browser.goto(&link).await;
    // The lab, with its launcher (a new lab opens on it) and its file browser.
    browser
        .wait_for("JupyterLab's launcher", LAB_WAIT, ".jp-Launcher")
        .await;
    browser
        .wait_for("JupyterLab's file browser", WAIT, ".jp-DirListing")
        .await;
    let url = browser.url().await;
    assert!(
        url.starts_with(&home) && !url.contains("rsp_token"),
        "the lab under the instance's address, without the link token: {url}"
    );
    let cookie = browser
        .cookie(SESSION_COOKIE)
        .await
        .expect("the proxy's session cookie");
    assert_eq!(cookie["path"], json!(format!("/{id}/")), "{cookie}");
    assert_eq!(cookie["httpOnly"], json!(true), "{cookie}");

    // A new notebook from the launcher's Python 3 tile.
    browser
        .wait_and_click(".jp-LauncherCard[data-category=\"Notebook\"]", WAIT)
        .await;
    let editor = ".jp-NotebookPanel .jp-Notebook .jp-Cell .jp-InputArea-editor .cm-content";
    browser
        .wait_for("the notebook's first cell", LAB_WAIT, editor)
        .await;
    // The kernel is connected (its socket runs through the proxy) and idle, as the status
    // bar says ("Python 3 (ipykernel) | Idle", after "Connecting"). Not the notebook's
    // execution indicator, whose `data-status` reads `idle` before any kernel exists: a cell
    // run then is dropped without a word (the lab clears it while the session has no kernel).
    browser
        .wait_js(
            "the notebook's kernel to be connected and idle",
            LAB_WAIT,
            "const s = document.querySelector('.jp-StatusBar-TextItem[title^=\"Change kernel\"]');\
             return s && s.textContent.trim().endsWith('| Idle');",
        )
        .await;
    browser.click(editor).await;
    browser.keys("6*7").await;
    browser.wait_for_text(editor, "6*7", WAIT).await;
    browser.shift_enter().await;
    let output = browser
        .wait_for_text(
            ".jp-NotebookPanel .jp-Cell .jp-OutputArea-output",
            "42",
            LAB_WAIT,
        )
        .await;
    assert_eq!(output.trim(), "42");
    let prompt = browser
        .text(".jp-NotebookPanel .jp-Cell .jp-OutputArea-prompt")
        .await;
    assert_eq!(prompt.trim(), "[1]:", "the cell's result, run once");
    // The lab asks once whether to fetch Jupyter's news (a toast); no, for a clean picture.
    browser
        .execute(
            "for (const b of document.querySelectorAll('.jp-toast-button')) {\
               if (b.textContent.trim() === 'No') b.click();\
             } return null;",
            &[],
        )
        .await;
    browser
        .wait_gone("the news toast", WAIT, ".Toastify__toast")
        .await;
    keep_screenshot(&browser, "jupyter.png").await;

    // A reload keeps ana signed in: the lab again, not the proxy's 401 page.
    browser.refresh().await;
    browser
        .wait_for("the lab after a reload", LAB_WAIT, ".jp-LabShell")
        .await;
    browser
        .wait_for(
            "the lab's file browser after a reload",
            LAB_WAIT,
            ".jp-DirListing",
        )
        .await;
    // Its requests carry the session as before: the file browser lists the new notebook.
    browser
        .wait_for_text(".jp-DirListing-content", "Untitled.ipynb", LAB_WAIT)
        .await;
    let title = browser.title().await;
    assert_ne!(title, REFUSED_TITLE);
    assert!(browser.url().await.starts_with(&home));

    // Ben, signed in to his own lab in his own browser, cannot open ana's.
    let other = Browser::start().await;
    other.goto(&ben_link).await;
    other.wait_for_url(&format!("/{ben_id}/"), WAIT).await;
    other
        .wait_for("ben's own lab", LAB_WAIT, ".jp-LabShell")
        .await;
    let ben_cookie = other
        .cookie(SESSION_COOKIE)
        .await
        .expect("ben's session cookie");
    other.goto(&home).await;
    let text = wait_refused(&other).await;
    assert!(
        text.contains("Open your workspace from the application"),
        "{text}"
    );
    assert!(other.find(".jp-LabShell").await.is_none());
    // Not even with his valid session cookie planted on her address: a session opens its own
    // instance only.
    let planted = json!({"cookie": {
        "name": SESSION_COOKIE,
        "value": ben_cookie["value"],
        "path": format!("/{id}/"),
        "httpOnly": true,
    }});
    if let Err(e) = other
        .try_command(Method::POST, "/cookie", Some(planted))
        .await
    {
        other.fail(&format!("plant ben's cookie: {e}")).await;
    }
    other.goto(&format!("{home}lab")).await;
    wait_refused(&other).await;
    assert!(other.find(".jp-LabShell").await.is_none());
    // Ana's own browser is still in.
    browser.refresh().await;
    browser
        .wait_for("ana's lab, still", LAB_WAIT, ".jp-LabShell")
        .await;
    // Her layout was saved with her files, and nothing in the shared HOME.
    let layouts = server
        .state_dir()
        .join("work")
        .join(&id)
        .join(".jupyter/lab/workspaces");
    eventually("ana's lab layout in her working folder", WAIT, || async {
        std::fs::read_dir(&layouts)
            .ok()
            .and_then(|mut d| d.next())
            .map(|_| ())
    })
    .await;
    assert!(
        !home_dir.path().join(".jupyter/lab/workspaces").exists(),
        "a lab wrote its layout into the shared HOME"
    );
}

#[tokio::test]
async fn the_demo_workspace_page_and_its_websocket_are_its_owners_only() {
    let server = Server::start(Options {
        min_free: 1,
        auth_yaml: token_auth(),
        ..Options::default()
    })
    .await;
    let (link, id, _) = request(&server, "ana", "rstudio", Some(60)).await;
    let home = server.proxy_url(&format!("/{id}/"));

    let browser = Browser::start().await;
    browser.goto(&link).await;
    let shown = browser.wait_for_text("#instance", &id, WAIT).await;
    assert_eq!(shown, id);
    assert_eq!(browser.url().await, home, "the link token is gone");
    assert_eq!(browser.title().await, format!("Demo workspace {id}"));

    // The page's own WebSocket, with the session cookie the browser sends along, echoes.
    let message = format!("hello from {id}'s page");
    let result = websocket_from_page(&browser, &format!("/{id}/ws"), &message).await;
    assert_eq!(result["opened"], json!(true), "{result}");
    assert_eq!(result["echo"], json!(message), "{result}");
    // The workspace got the handshake without the proxy's session cookie.
    let result = websocket_from_page(&browser, &format!("/{id}/ws"), "?headers").await;
    let seen = result["echo"]
        .as_str()
        .unwrap_or_else(|| panic!("{result}"));
    assert!(
        seen.contains(&format!("/{id}")) && !seen.contains(SESSION_COOKIE),
        "the handshake as the workspace saw it: root path, no session cookie: {seen}"
    );
    keep_screenshot(&browser, "rstudio.png").await;

    // A browser without a session: the page is the 401 page, and its socket does not open.
    let other = Browser::start().await;
    other.goto(&home).await;
    let text = wait_refused(&other).await;
    assert!(!text.contains("Demo workspace"), "{text}");
    assert!(other.find("#instance").await.is_none(), "{text}");
    let result = websocket_from_page(&other, &format!("/{id}/ws"), "let me in").await;
    assert_eq!(result["opened"], json!(false), "{result}");
    assert_eq!(result["echo"], Value::Null, "{result}");
    assert_eq!(result["closeCode"], json!(1006), "{result}");

    // Ana's socket still opens (the refusal was not a broken tunnel).
    let result = websocket_from_page(&browser, &format!("/{id}/ws"), "again").await;
    assert_eq!(result["echo"], json!("again"), "{result}");
}

#[tokio::test]
async fn the_progress_page_reloads_itself_into_the_workspace() {
    let server = Server::start(Options {
        min_free: 0,
        auth_yaml: token_auth(),
        extra_yaml: "purposes:\n  rstudio:\n    command: [\"sh\", \"-c\", \"sleep 3; exec {exe} demo-workspace --port {port} --instance-id {instance_id}\"]\n".into(),
        ..Options::default()
    })
    .await;
    // The browser is up before the request, so that the link is opened right after it.
    let browser = Browser::start().await;
    let (link, id, body) = request(&server, "ana", "rstudio", None).await;
    assert_eq!(body["ready"], json!(false), "no warm instance: {body}");
    let home = server.proxy_url(&format!("/{id}/"));

    browser.goto(&link).await;
    // The progress page, for this purpose and instance, at the workspace's address.
    assert_eq!(
        browser.title().await,
        "Your workspace is starting",
        "{}",
        browser.context().await
    );
    assert_eq!(browser.text("h1").await, "Your workspace is starting");
    assert_eq!(browser.text(".purpose").await, "rstudio");
    assert_eq!(browser.text(".instance").await, id);
    assert_eq!(browser.url().await, home);
    assert!(browser.find("#instance").await.is_none());
    keep_screenshot(&browser, "progress.png").await;
    // A mark on this browsing context: it stays through the page's own reloads (same
    // origin), so the workspace's page shows that it was reached from here.
    let mark = format!("progress-{id}");
    browser
        .execute("window.name = arguments[0]; return null;", &[json!(mark)])
        .await;

    // No click: the page's reloads land in the workspace.
    let shown = browser.wait_for_text("#instance", &id, WAIT).await;
    assert_eq!(shown, id);
    assert_eq!(browser.url().await, home);
    assert_eq!(browser.title().await, format!("Demo workspace {id}"));
    let (name, navigation) = {
        let v = browser
            .execute(
                "const n = performance.getEntriesByType('navigation')[0];\
                 return [window.name, n ? n.type : null];",
                &[],
            )
            .await;
        (v[0].clone(), v[1].clone())
    };
    assert_eq!(name, json!(mark), "the same tab navigated by itself");
    // The meta refresh reloads the same address: the workspace's page came by a reload.
    assert_eq!(navigation, json!("reload"));
}
