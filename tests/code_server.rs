//! code-server, the `code-server` purpose, as a real third-party workload: a headless Chromium
//! opens the link of `REQUEST_RSTUDIO` (token mode), the VS Code workbench loads under
//! `/i-<id>/` with the prefix stripped, its WebSockets connect through the proxy, a file
//! created and typed in the browser lands in the instance's working folder, and a search of
//! the folder finds text in it.
//!
//! code-server is installed outside the clone by `scripts/install-code-server.sh` (which
//! `scripts/test.sh` runs); without it this test says so and passes without running.
//! `UPDATE_SCREENSHOTS=1` keeps the workbench's screenshot as `docs/code-server.png`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::browser::{element_ref, keys, Browser};
use common::{eventually, free_port, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789abcdef";
/// How long a start or a step of the workbench may take on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(90);

/// The executable `scripts/install-code-server.sh` leaves in its cache folder.
fn installed_code_server() -> PathBuf {
    let dir = std::env::var_os("RSTUDIO_POOL_CODE_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/rstudio-pool-code-server")
        });
    dir.join("bin/code-server")
}

/// The preset as shipped, with the cached code-server first on PATH (as it would be on a
/// laptop that installed it), so that the test proves the preset's own flags.
fn path_with_code_server(exe: &std::path::Path) -> (String, String) {
    let bin = exe.parent().expect("a bin folder").display().to_string();
    (
        "PATH".into(),
        format!("{bin}:{}", std::env::var("PATH").unwrap_or_default()),
    )
}

/// Records every WebSocket the page opens (`window.__sockets`), in every document of the
/// session, before the page's own scripts run; and lifts the resource-timing buffer's limit.
const SOCKET_HOOK: &str = r#"
  performance.setResourceTimingBufferSize(100000);
  window.__sockets = [];
  window.WebSocket = new Proxy(window.WebSocket, {
    construct(target, args) {
      const socket = Reflect.construct(target, args);
      window.__sockets.push(socket);
      return socket;
    }
  });
"#;

#[tokio::test]
async fn code_server_loads_under_its_prefix_and_saves_a_file_typed_in_the_browser() {
    let exe = installed_code_server();
    if !exe.exists() {
        eprintln!(
            "SKIPPED: no code-server at {}: run scripts/install-code-server.sh (scripts/test.sh does)",
            exe.display()
        );
        return;
    }
    // The workspaces' HOME: code-server keeps its user data, extensions and logs under it.
    let home = tempfile::tempdir().unwrap();
    // PORT is the proxy's port, for the pool alone: code-server reads $PORT before
    // --bind-addr, so if it leaked, code-server would try the proxy's port and never be
    // ready. VSCODE_IPC_HOOK_CLI (set in code-server's own terminal) would make it hand the
    // folder to that other code-server and exit.
    let proxy_port = free_port();
    let mut server = Server::start(Options {
        min_free: 0,
        ready_timeout_seconds: WAIT.as_secs(),
        auth_yaml: Some(format!("auth:\n  mode: token\n  secrets: [\"{SECRET}\"]\n")),
        extra_yaml: "purposes:\n  code-server: {}\n".into(),
        env: vec![
            path_with_code_server(&exe),
            ("PORT".into(), proxy_port.to_string()),
            ("HOME".into(), home.path().display().to_string()),
            (
                "VSCODE_IPC_HOOK_CLI".into(),
                "/nonexistent/vscode-ipc.sock".into(),
            ),
        ],
        ..Options::default()
    })
    .await;
    server.proxy = SocketAddr::from(([127, 0, 0, 1], proxy_port));

    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "ana", "purpose": "code-server", "wait": WAIT.as_secs()}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["ready"],
        json!(true),
        "code-server never got ready: {body}"
    );
    let id = body["instanceId"].as_str().unwrap().to_owned();
    let link = body["url"].as_str().unwrap().to_owned();
    assert!(
        link.starts_with(&server.proxy_url(&format!("/{id}/?"))),
        "{link}"
    );
    // A file only the workspace's folder holds: the explorer can list it only through the
    // workbench's remote connection.
    let work = server.state_dir().join("work").join(&id);
    std::fs::write(work.join("notes.txt"), "written by the test\n").unwrap();

    let browser = Browser::start().await;
    browser.add_init_script(SOCKET_HOOK).await;
    browser.goto(&link).await;

    // The link is exchanged for the session cookie and the browser stays under the prefix:
    // code-server's own redirect to `./?folder=...` is relative.
    let prefix = server.proxy_url(&format!("/{id}/"));
    let at = browser.wait_for_url(&format!("/{id}/?folder="), WAIT).await;
    assert!(at.starts_with(&prefix) && !at.contains("rsp_token"), "{at}");

    // What a person sees: the workbench with its activity bar and status bar, and the
    // explorer listing the working folder.
    browser
        .wait_for(
            "the activity bar's Explorer",
            WAIT,
            ".activitybar .codicon-explorer-view-icon",
        )
        .await;
    browser
        .wait_for(
            "the status bar",
            WAIT,
            "footer.part.statusbar, .part.statusbar",
        )
        .await;
    browser
        .wait_for_text(".explorer-folders-view", "notes.txt", WAIT)
        .await;

    // Its WebSockets (the management connection and the extension host's) are open, through
    // the proxy, under the prefix.
    let ws_prefix = format!("ws://{}/{id}/", server.proxy);
    let sockets = browser
        .wait_js(
            "the workbench's two WebSockets to be open under the prefix",
            WAIT,
            &format!(
                "const open = window.__sockets.filter(s => s.readyState === WebSocket.OPEN \
                 && s.url.startsWith({ws_prefix:?})); \
                 return open.length >= 2 ? open.map(s => [s.url, s.extensions]) : null;"
            ),
        )
        .await;
    eprintln!("open WebSockets (url, extensions): {sockets}");

    // Every static file the page fetched came from under the prefix, and none was missing.
    // code-server itself answers 404 for vsda (VS Code's closed-source signing module, not
    // in its build): that one is not the proxy's.
    let resources = browser
        .execute(
            "return performance.getEntriesByType('resource')\
             .map(e => [e.name, e.responseStatus]);",
            &[],
        )
        .await;
    let resources = resources.as_array().unwrap();
    let origin = server.proxy_url("/");
    let mut loaded = Vec::new();
    for entry in resources {
        let (url, status) = (entry[0].as_str().unwrap(), entry[1].as_u64().unwrap_or(0));
        if !url.starts_with(&origin) {
            continue;
        }
        assert!(url.starts_with(&prefix), "{url} escaped the prefix");
        if url.contains("/node_modules/vsda/") {
            continue;
        }
        assert!(status < 400, "{url} answered {status}");
        loaded.push(url);
    }
    for asset in ["/workbench.js", "/workbench.css", "/codicon.ttf"] {
        assert!(
            loaded.iter().any(|url| url.contains(asset)),
            "no {asset} among {loaded:#?}"
        );
    }

    // A new file from the explorer's title bar (its actions show while the pointer is over
    // the explorer), named, typed and saved as a person would.
    let explorer = browser.find(".explorer-folders-view").await.unwrap();
    hover(&browser, &explorer).await;
    browser
        .wait_and_click(".pane-header .codicon-new-file", WAIT)
        .await;
    browser
        .wait_for(
            "the new file's name box",
            WAIT,
            ".explorer-folders-view .monaco-inputbox input",
        )
        .await;
    let name = "hello-from-the-browser.txt";
    browser.keys(&format!("{name}{}", keys::ENTER)).await;
    browser
        .wait_for_text(".tabs-container .tab.active", name, WAIT)
        .await;
    browser
        .wait_and_click(".editor-instance .monaco-editor .view-lines", WAIT)
        .await;
    let lines = ["Typed in code-server", "behind rstudio-pool's proxy"];
    browser
        .keys(&format!("{}{}{}", lines[0], keys::ENTER, lines[1]))
        .await;
    browser.chord(&[keys::CONTROL], "s").await;

    let saved = work.join(name);
    let expected = lines.join("\n");
    let content = eventually(
        &format!("{} to hold the typed text", saved.display()),
        WAIT,
        || async {
            std::fs::read_to_string(&saved)
                .ok()
                .filter(|text| *text == expected)
        },
    )
    .await;
    assert_eq!(content, expected);
    // Saved, so the editor's tab is no longer marked dirty, and the explorer lists the file.
    browser
        .wait_gone(
            "the unsaved mark",
            WAIT,
            ".tabs-container .tab.active.dirty",
        )
        .await;
    browser
        .wait_for_text(".explorer-folders-view", name, WAIT)
        .await;

    if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        browser.screenshot(docs.join("code-server.png")).await;
    } else {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        browser.screenshot(dir.join("code-server.png")).await;
    }

    // Searching the folder runs ripgrep on the workspace's machine (Debian's rg, which the
    // install script links in place of the one @vscode/ripgrep would download).
    browser.chord(&[keys::CONTROL, keys::SHIFT], "f").await;
    browser
        .wait_for(
            "the search box",
            WAIT,
            ".search-view .search-widget textarea",
        )
        .await;
    browser.keys("written by the").await;
    let found = browser
        .wait_for_text(".search-view .results", "notes.txt", WAIT)
        .await;
    assert!(found.contains("written by the test"), "{found}");
}

/// Moves the mouse pointer over an element, as a person pointing at it.
async fn hover(browser: &Browser, element: &str) {
    let actions = json!({"actions": [{
        "type": "pointer",
        "id": "mouse",
        "parameters": {"pointerType": "mouse"},
        "actions": [{"type": "pointerMove", "duration": 0, "origin": element_ref(element), "x": 0, "y": 0}]
    }]});
    let answer: Result<Value, _> = browser
        .try_command(Method::POST, "/actions", Some(actions))
        .await;
    if let Err(e) = answer {
        browser.fail(&format!("hover over the explorer: {e}")).await;
    }
}
