//! Culling keeps users' work (issue 14): an idle workspace is paused (its processes end, its
//! folder stays), its owner's next request resumes the same instance with their files, a
//! paused instance uses no room in the pool and is never anyone else's, and a restart keeps
//! it paused. The process provider with the demo workspace, whose notes file is the work.

mod common;

use std::time::Duration;

use common::{eventually, state_of, wait_ready, Options, Server};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const NOTES: &str = "a model that took all morning\nresult: 0.42\n";

fn idle_pool(max: usize, timeout_ms: u64) -> Options {
    Options {
        min_free: 0,
        max,
        timeout_instance_ms: timeout_ms,
        ..Options::default()
    }
}

async fn save_notes(server: &Server, id: &str) {
    let r = server
        .client()
        .put(server.proxy_url(&format!("/{id}/notes")))
        .body(NOTES)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn notes(server: &Server, id: &str) -> String {
    let r = server
        .client()
        .get(server.proxy_url(&format!("/{id}/notes")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

async fn wait_paused(server: &Server, id: &str) {
    eventually(&format!("{id} paused"), WAIT, || async {
        (state_of(server, id).await.as_deref() == Some("paused")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_idle_workspace_is_paused_and_resumed_with_its_work() {
    let server = Server::start(idle_pool(2, 2000)).await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    save_notes(&server, &id).await;

    wait_paused(&server, &id).await;
    // Paused means no compute: the workspace's processes are gone, its folder is not.
    eventually("the workspace's processes end", WAIT, || async {
        (!server.workspaces().iter().any(|(_, w)| *w == id)).then_some(())
    })
    .await;
    let folder = server.state_dir().join("work").join(&id);
    assert_eq!(
        std::fs::read_to_string(folder.join("notes.txt")).unwrap(),
        NOTES
    );
    // Still the user's, in every answer.
    let (_, status) = server.command("GET_STATUS", json!({})).await;
    assert_eq!(status["instances"], json!([id]), "{status}");
    assert_eq!(status["pools"]["rstudio"]["paused"], json!(1), "{status}");
    let page = server
        .client()
        .get(server.proxy_url(&format!("/{id}/")))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 503);
    assert!(page.text().await.unwrap().contains("paused to save cost"));

    // The owner comes back: the same instance, resuming, then their notes as they left them.
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instanceId"], json!(id));
    assert_eq!(body["status"], json!("resuming"), "{body}");
    wait_ready(&server, &id).await;
    assert_eq!(notes(&server, &id).await, NOTES);
    assert_eq!(state_of(&server, &id).await.as_deref(), Some("ready"));
}

#[tokio::test]
async fn a_paused_instance_leaves_room_and_is_never_anyone_elses() {
    let server = Server::start(idle_pool(1, 2000)).await;
    let ana = server.request("ana").await;
    wait_ready(&server, &ana).await;
    wait_paused(&server, &ana).await;

    // Paused uses no compute: there is room for bo, on a new instance.
    let bo = server.request("bo").await;
    assert_ne!(bo, ana);
    // Now ana's comes back into a full pool: she is told so, and given nothing else.
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 429, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains(&ana) && message.contains("paused"),
        "{message}"
    );
    assert_eq!(state_of(&server, &ana).await.as_deref(), Some("paused"));

    let (status, _) = server.command("DELETE", json!({"instanceId": bo})).await;
    assert_eq!(status, 200);
    let resumed = eventually("room for ana again", WAIT, || async {
        let (status, body) = server
            .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
            .await;
        (status == 200).then(|| body["instanceId"].as_str().unwrap().to_owned())
    })
    .await;
    assert_eq!(resumed, ana);
}

#[tokio::test]
async fn a_restart_keeps_a_paused_instance_paused_and_its_owners() {
    let mut server = Server::start(idle_pool(2, 2000)).await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    save_notes(&server, &id).await;
    wait_paused(&server, &id).await;
    server.kill9();
    server.restart().await;
    assert_eq!(state_of(&server, &id).await.as_deref(), Some("paused"));
    // Nobody else gets it.
    let other = server.request("bo").await;
    assert_ne!(other, id);
    assert_eq!(server.request("ana").await, id);
    wait_ready(&server, &id).await;
    assert_eq!(notes(&server, &id).await, NOTES);
}

#[tokio::test]
async fn delete_terminates_a_paused_instance() {
    let server = Server::start(idle_pool(2, 2000)).await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    wait_paused(&server, &id).await;
    let (status, body) = server.command("DELETE", json!({"instanceId": id})).await;
    assert_eq!(status, 200, "{body}");
    eventually("the paused instance is gone", WAIT, || async {
        state_of(&server, &id).await.is_none().then_some(())
    })
    .await;
    assert!(!server.state_dir().join("work").join(&id).exists());
    // Ana's next request is a fresh workspace.
    assert_ne!(server.request("ana").await, id);
}

#[tokio::test]
async fn on_idle_terminate_keeps_the_original_behaviour() {
    let server = Server::start(Options {
        extra_yaml: "purposes:\n  rstudio:\n    on_idle: terminate\n".into(),
        ..idle_pool(2, 2000)
    })
    .await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    eventually("the idle instance is terminated", WAIT, || async {
        state_of(&server, &id).await.is_none().then_some(())
    })
    .await;
}
