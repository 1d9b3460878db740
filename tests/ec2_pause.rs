//! Pausing on EC2 (issue 14) against moto behind the realistic EC2: an idle instance is
//! stopped (hibernated when its purpose says so, launched ready for it) and tagged
//! `stoppedAt`; its owner's request starts it again; a failed start leaves it paused; the
//! paused lifetime and cap end the oldest; a SIGKILL while paused or while resuming loses
//! nothing.

mod common;

use std::time::Duration;

use common::ec2sim::Realism;
use common::moto::{options, setup, setup_with, tag, Setup};
use common::{eventually, state_of, Options, Server};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn idle_options(s: &Setup, pool: &str, purpose_yaml: &str) -> Options {
    let mut o = options(s, pool, 0, 3);
    o.timeout_instance_ms = 2000;
    o.extra_yaml = format!(
        "purposes:\n  rstudio:\n    port: {}\n{purpose_yaml}",
        s.stand.port
    );
    o
}

async fn wait_state(server: &Server, id: &str, state: &str) {
    eventually(&format!("{id} {state}"), WAIT, || async {
        (state_of(server, id).await.as_deref() == Some(state)).then_some(())
    })
    .await;
}

async fn ec2_state(s: &Setup, id: &str) -> String {
    s.moto.state_of(id).await
}

/// The parameters of the lifecycle calls the pool made on `action`.
fn calls(s: &Setup, action: &str) -> Vec<Vec<(String, String)>> {
    s.moto.ec2.history(|h| {
        h.lifecycle
            .iter()
            .filter(|(a, _)| a == action)
            .map(|(_, p)| p.clone())
            .collect()
    })
}

fn has(params: &[(String, String)], key: &str, value: &str) -> bool {
    params.iter().any(|(k, v)| k == key && v == value)
}

#[tokio::test]
async fn an_idle_instance_hibernates_and_its_owner_resumes_it() {
    let s = setup().await;
    let server = Server::start(idle_options(
        &s,
        "pool-h",
        "    on_idle: hibernate\n    root_volume_gb: 40\n    root_volume_encrypted: true\n",
    ))
    .await;
    let id = server.request("ana").await;
    // Launched ready to hibernate: the option on, an encrypted root volume large enough.
    let run = calls(&s, "RunInstances");
    assert!(
        run.iter()
            .any(|p| has(p, "HibernationOptions.Configured", "true")
                && has(p, "BlockDeviceMapping.1.Ebs.Encrypted", "true")
                && has(p, "BlockDeviceMapping.1.Ebs.VolumeSize", "40")),
        "{run:?}"
    );
    wait_state(&server, &id, "paused").await;
    eventually("stopped at EC2", WAIT, || async {
        (ec2_state(&s, &id).await == "stopped").then_some(())
    })
    .await;
    let stop = calls(&s, "StopInstances");
    assert!(
        stop.iter()
            .any(|p| has(p, "InstanceId.1", &id) && has(p, "Hibernate", "true")),
        "{stop:?}"
    );
    let stopped = s
        .moto
        .instances("pool-h", &["stopped"])
        .await
        .into_iter()
        .find(|i| i.instance_id() == Some(&id))
        .unwrap();
    assert!(tag(&stopped, "stoppedAt").is_some());
    assert_eq!(tag(&stopped, "userId"), Some("ana"));
    // Paused uses no room: GET_STATUS still lists it as ana's.
    let (_, status) = server.command("GET_STATUS", json!({})).await;
    assert_eq!(status["instances"], json!([id]));

    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instanceId"], json!(id));
    assert_eq!(body["status"], json!("resuming"));
    assert_eq!(ec2_state(&s, &id).await, "running");
    wait_state(&server, &id, "ready").await;
}

#[tokio::test]
async fn hibernation_without_an_encrypted_root_volume_is_refused_at_start() {
    let s = setup().await;
    let o = idle_options(&s, "pool-v", "    on_idle: hibernate\n");
    let config = format!(
        "provider:\n  kind: ec2\n  ec2:\n    image_id: ami-0123456789abcdef0\n    region: us-east-1\n    account: \"123\"\n{}",
        o.extra_yaml
    );
    let path = std::env::temp_dir().join(format!("hibernate-{}.yaml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rstudio-pool"))
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        message.contains("root_volume_gb") && message.contains("encrypted"),
        "{message}"
    );
}

#[tokio::test]
async fn a_resume_ec2_refuses_leaves_the_instance_paused() {
    let s = setup().await;
    let server = Server::start(idle_options(&s, "pool-f", "")).await;
    let id = server.request("ana").await;
    wait_state(&server, &id, "paused").await;
    s.moto
        .ec2
        .set(|r| r.refuse = Some(("StartInstances", "InsufficientInstanceCapacity")));
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("InsufficientInstanceCapacity") && message.contains("still paused"),
        "{message}"
    );
    assert_eq!(state_of(&server, &id).await.as_deref(), Some("paused"));
    // Never a fresh instance in its place.
    assert_eq!(s.moto.live("pool-f").await.len(), 0);
    s.moto.ec2.set(|r| r.refuse = None);
    assert_eq!(server.request("ana").await, id);
}

#[tokio::test]
async fn a_kill_while_paused_or_resuming_loses_nothing() {
    let s = setup_with(Realism::default_lag()).await;
    let mut server = Server::start(idle_options(&s, "pool-k", "")).await;
    let id = server.request("ana").await;
    wait_state(&server, &id, "paused").await;
    eventually("stopped at EC2", WAIT, || async {
        (ec2_state(&s, &id).await == "stopped").then_some(())
    })
    .await;
    server.restart().await;
    assert_eq!(state_of(&server, &id).await.as_deref(), Some("paused"));
    assert_ne!(
        server.request("bo").await,
        id,
        "a paused instance went to bo"
    );

    // Killed right after the resume was asked for: the instance runs, and is still ana's.
    assert_eq!(server.request("ana").await, id);
    server.restart().await;
    assert_eq!(server.request("ana").await, id);
    wait_state(&server, &id, "ready").await;
}

#[tokio::test]
async fn the_paused_lifetime_and_cap_end_the_oldest() {
    let s = setup().await;
    let now = rstudio_pool::provider::process::now_ms();
    let stopped_owned = |user: &'static str, stopped_at: u64| {
        let s = &s;
        async move {
            let id = s
                .moto
                .run_tagged(&[
                    ("rstudio-pool", "pool-t"),
                    ("Purpose", "rstudio"),
                    ("userId", user),
                    ("stoppedAt", &stopped_at.to_string()),
                ])
                .await;
            s.moto
                .client
                .stop_instances()
                .instance_ids(&id)
                .send()
                .await
                .unwrap();
            id
        }
    };
    let expired = stopped_owned("ana", now - 400 * 3_600_000).await;
    let older = stopped_owned("bo", now - 3_600_000).await;
    let newer = stopped_owned("cy", now - 60_000).await;
    let server = Server::start(idle_options(
        &s,
        "pool-t",
        "    max_paused_instances: 1\n    paused_ttl_hours: 336\n",
    ))
    .await;
    for id in [&expired, &older] {
        eventually(&format!("{id} terminated"), WAIT, || async {
            let state = ec2_state(&s, id).await;
            (state == "terminated" || state == "shutting-down").then_some(())
        })
        .await;
    }
    assert_eq!(state_of(&server, &newer).await.as_deref(), Some("paused"));
    let log = server.log();
    assert!(
        log.contains(&format!("terminating paused {expired} of ana"))
            && log.contains("past paused_ttl_hours"),
        "{log}"
    );
    assert!(
        log.contains(&format!("terminating paused {older} of bo")),
        "{log}"
    );
}
