//! The headless browser of the tests works: chromium, driven through chromedriver, loads a
//! page from a local server, types, clicks, presses keys, runs scripts, keeps cookies per
//! profile, takes screenshots, and leaves no process behind.
mod common;

use std::time::{Duration, Instant};

use common::browser::{keys, Browser};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAGE: &str = r#"<!doctype html>
<html><head><title>Browser smoke</title></head>
<body>
  <input id="name" type="text">
  <button id="greet" onclick="setTimeout(function () {
      document.getElementById('out').textContent =
        'Hello, ' + document.getElementById('name').value + '!';
    }, 300)">Greet</button>
  <div id="out">nobody greeted yet</div>
  <textarea id="editor"></textarea>
  <ul id="log"></ul>
  <button id="warn" onclick="alert('careful')">Warn</button>
  <script>
    document.getElementById('editor').addEventListener('keydown', function (e) {
      if (e.key !== 'Enter') return;
      e.preventDefault();
      var li = document.createElement('li');
      li.textContent = (e.shiftKey ? 'shift+enter: ' : 'enter: ') + this.value;
      document.getElementById('log').appendChild(li);
      this.value = '';
    });
  </script>
</body></html>"#;

/// Serves `PAGE` with a cookie on `/`, and a page without one on `/plain`.
async fn serve() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, extra, body) = match path.as_str() {
                    "/" => (
                        "200 OK",
                        "Set-Cookie: smoke=cookie-42; Path=/; HttpOnly\r\n",
                        PAGE.to_owned(),
                    ),
                    "/plain" => (
                        "200 OK",
                        "",
                        "<!doctype html><title>plain</title><p id=plain>no cookie here</p>".into(),
                    ),
                    _ => ("404 Not Found", "", "not found".into()),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n{extra}\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    format!("http://{address}")
}

/// The processes of group `pgid` that still run (not zombies waiting to be reaped).
fn alive_in_group(pgid: u32) -> Vec<u32> {
    let mut alive = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name in parentheses: state, ppid, pgrp.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            alive.push(pid);
        }
    }
    alive
}

#[tokio::test]
async fn headless_chromium_drives_a_page() {
    let t0 = Instant::now();
    let site = serve().await;
    let browser = Browser::start().await;
    let started = t0.elapsed();
    let wait = Duration::from_secs(10);

    browser.goto(&format!("{site}/")).await;
    assert_eq!(browser.title().await, "Browser smoke");
    assert_eq!(browser.url().await, format!("{site}/"));
    assert_eq!(browser.text("#out").await, "nobody greeted yet");
    assert!(browser.find("#no-such-thing").await.is_none());

    // Type, click, and wait for what the click changes (300 ms later).
    browser.type_into("#name", "Ada").await;
    assert_eq!(browser.value("#name").await, "Ada");
    browser.click("#greet").await;
    let greeting = browser.wait_for_text("#out", "Hello", wait).await;
    assert_eq!(greeting, "Hello, Ada!");

    // Keys to the focused element: Enter and Shift+Enter reach the page's key handler.
    browser.click("#editor").await;
    browser.keys("one").await;
    browser.keys(keys::ENTER).await;
    browser.keys("two").await;
    browser.shift_enter().await;
    browser
        .wait_for("the second log line", wait, "#log li:nth-child(2)")
        .await;
    assert_eq!(
        browser.texts("#log li").await,
        ["enter: one", "shift+enter: two"]
    );

    // Scripts see the page, with arguments.
    let sum = browser
        .execute(
            "return arguments[0] + document.querySelectorAll('li').length;",
            &[json!(40)],
        )
        .await;
    assert_eq!(sum, json!(42));
    let later = browser
        .execute_async(
            "const done = arguments[arguments.length - 1]; setTimeout(() => done('later'), 50);",
            &[],
        )
        .await;
    assert_eq!(later, json!("later"));

    // The Set-Cookie of the page, HttpOnly or not, is in the browser's jar.
    let cookies = browser.cookies().await;
    let cookie = cookies
        .iter()
        .find(|c| c["name"] == json!("smoke"))
        .unwrap_or_else(|| panic!("no cookie smoke in {cookies:?}"));
    assert_eq!(cookie["value"], json!("cookie-42"));
    assert_eq!(cookie["httpOnly"], json!(true));

    // Alerts.
    browser.click("#warn").await;
    assert_eq!(browser.alert_text().await.as_deref(), Some("careful"));
    assert!(browser.accept_alert().await);
    assert!(!browser.accept_alert().await);

    // A screenshot is a PNG.
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("page.png");
    browser.screenshot(&shot).await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.len() > 1000, "a {} byte screenshot", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Refresh reloads the page as it was served.
    browser.refresh().await;
    browser
        .wait_for_text("#out", "nobody greeted yet", wait)
        .await;

    // A second browser has a profile of its own: no cookie from the first.
    let other = Browser::start().await;
    other.goto(&format!("{site}/plain")).await;
    other.wait_for("the plain page", wait, "#plain").await;
    assert!(
        other.cookies().await.is_empty(),
        "{:?}",
        other.cookies().await
    );
    assert!(browser.cookie("smoke").await.is_some());

    // Dropping a browser leaves none of its processes behind.
    for b in [browser, other] {
        let group = b.driver_pid();
        assert!(!alive_in_group(group).is_empty());
        drop(b);
        // SIGKILL is delivered asynchronously: allow the kernel a moment.
        common::eventually(
            &format!("no process left in group {group}"),
            Duration::from_secs(5),
            || async { alive_in_group(group).is_empty().then_some(()) },
        )
        .await;
    }
    eprintln!(
        "browser smoke: first browser ready in {started:?}, whole test {:?}",
        t0.elapsed()
    );
}
