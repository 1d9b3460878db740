//! The admin page in a real browser (headless Chromium through chromedriver): an operator
//! signs in with the API token, sees the pools and the instances, watches the table follow an
//! assignment made elsewhere, and terminates an instance from the page.
//!
//! `UPDATE_SCREENSHOTS=1` keeps the page's screenshot as `docs/admin.png`.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::{eventually, is_known, wait_ready, Options, Server};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_operator_signs_in_watches_the_pool_and_terminates_from_the_page() {
    let token = "admin-t0ken-for-the-browser";
    let server = Server::start(Options {
        min_free: 1,
        api_token: Some(token.into()),
        extra_yaml: "purposes:\n  rstudio:\n    hourly_cost: 0.0912\n".into(),
        ..Options::default()
    })
    .await;
    let first = server.request("ana").await;
    wait_ready(&server, &first).await;

    let browser = Browser::start().await;
    let admin = format!("http://{}/admin", server.api);
    browser.goto(&admin).await;
    // The login form: a wrong token is refused and said so.
    browser.type_into("#token", "not-the-token").await;
    browser.click("#sign-in").await;
    browser
        .wait_for_text(".error", "not the API token", WAIT)
        .await;
    browser.type_into("#token", token).await;
    browser.click("#sign-in").await;

    // Signed in: the pool and ana's instance, with her name, in the table.
    let row = format!("#instances tr[data-id=\"{first}\"]");
    let text = browser.wait_for_text(&row, "ana", WAIT).await;
    assert!(
        text.contains("rstudio") && text.contains("assigned"),
        "{text}"
    );
    let pools = browser.wait_for_text("#pools tbody", "rstudio", WAIT).await;
    assert!(pools.contains("running"), "{pools}");
    // What the pool costs: its policy and money, and ana's share this month.
    let costs = browser.wait_for_text("#costs tbody", "fixed", WAIT).await;
    assert!(costs.contains("USD"), "{costs}");
    browser
        .wait_for_text("#user-costs tbody", "ana", WAIT)
        .await;
    let cookie = browser
        .cookie("rstudio_pool_admin")
        .await
        .expect("the session cookie");
    assert_eq!(cookie["httpOnly"], serde_json::json!(true));
    assert_eq!(cookie["sameSite"], serde_json::json!("Strict"));

    // An assignment made through the command API shows up without a reload.
    let second = server.request("ben").await;
    let row2 = format!("#instances tr[data-id=\"{second}\"]");
    browser.wait_for_text(&row2, "ben", WAIT).await;
    browser.wait_for_text("#events tbody", &second, WAIT).await;
    wait_ready(&server, &second).await;
    browser.wait_for_text(&row2, "assigned", WAIT).await;
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        browser.screenshot(docs.join("admin.png")).await;
    } else {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        browser.screenshot(dir.join("admin.png")).await;
    }

    // Terminate ana's instance from the page: it leaves the table and the pool.
    browser.click(&format!("{row} button.terminate")).await;
    browser.wait_for_text("#message", "done", WAIT).await;
    eventually("the terminated row leaves the table", WAIT, || async {
        browser.find(&row).await.is_none().then_some(())
    })
    .await;
    assert!(!is_known(&server, &first).await);
    browser.wait_for_text("#events tbody", "delete", WAIT).await;
    assert!(browser.find(&row2).await.is_some(), "ben's instance stays");

    // Signing out ends the session: the page is the login form again.
    browser.click("#sign-out").await;
    browser.wait_for("the login form", WAIT, "#token").await;
    let r = server
        .client()
        .get(format!("{admin}/state"))
        .header(
            "cookie",
            format!("rstudio_pool_admin={}", cookie["value"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the old session is over");
}
