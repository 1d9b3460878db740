//! The ec2 provider against a moto server over real HTTP (issue 4). Workspaces do not boot in
//! moto, so each test runs one local demo workspace and points every instance's address at it
//! (`address_template: 127.0.0.1:{port}`): the pool, the readiness probe and the proxy are real.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::moto::{options, setup, tag, Moto, ACCOUNT, PROFILE, REGION};
use common::{eventually, is_known, wait_ready, Server};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// The decoded user data of an instance, as moto stores it.
async fn user_data(moto: &Moto, id: &str) -> String {
    let attribute = moto
        .client
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let encoded = attribute.user_data().and_then(|u| u.value()).unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}
#[tokio::test]
async fn instances_are_launched_with_the_configuration_and_tags() {
    let s = setup().await;
    let server = Server::start(options(&s, "pool-a", 1, 3)).await;
    let instance = eventually("one warm instance in moto", WAIT, || async {
        s.moto.live("pool-a").await.into_iter().next()
    })
    .await;
    assert_eq!(instance.image_id(), Some("ami-0123456789abcdef0"));
    assert_eq!(
        instance.instance_type().map(|t| t.as_str()),
        Some("t3.small")
    );
    assert_eq!(instance.key_name(), Some("analysts"));
    assert!(instance
        .security_groups()
        .iter()
        .any(|g| g.group_id() == Some(s.security_group.as_str())));
    let profile = instance
        .iam_instance_profile()
        .and_then(|p| p.arn())
        .unwrap_or_default();
    assert!(
        profile.ends_with(&format!("instance-profile/{PROFILE}")),
        "{profile}"
    );
    let metadata = instance.metadata_options().unwrap();
    assert_eq!(metadata.http_tokens().map(|t| t.as_str()), Some("required"));
    assert_eq!(metadata.http_put_response_hop_limit(), Some(1));
    assert_eq!(tag(&instance, "Purpose"), Some("rstudio"));
    assert_eq!(tag(&instance, "rstudio-pool"), Some("pool-a"));
    assert_eq!(tag(&instance, "Name"), Some("pool-a-rstudio"));
    assert_eq!(tag(&instance, "userId"), None);

    // The user data runs the purpose's image on its port, with a restart policy.
    let id = instance.instance_id().unwrap().to_owned();
    let script = user_data(&s.moto, &id).await;
    assert!(
        script.contains(&format!(
            "{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/rstudio:latest"
        )),
        "{script}"
    );
    assert!(
        script.contains(&format!("-p {0}:{0}", s.stand.port)),
        "{script}"
    );
    assert!(script.contains("--restart unless-stopped"), "{script}");

    // Assignment tags the instance; GET_STATUS reports what the original did.
    let assigned = server.request("ana").await;
    assert_eq!(assigned, id, "the warm instance is handed out");
    let tagged = s
        .moto
        .live("pool-a")
        .await
        .into_iter()
        .find(|i| i.instance_id() == Some(&id))
        .unwrap();
    assert_eq!(tag(&tagged, "userId"), Some("ana"));
    let (status, body) = server
        .command("GET_STATUS", json!({"instanceId": id}))
        .await;
    assert_eq!(status, 200, "{body}");
    let view = &body["instance"];
    assert_eq!(view["instanceId"], json!(id));
    assert_eq!(view["keyName"], json!("analysts"));
    assert_eq!(view["userId"], json!("ana"));
    assert_eq!(view["Purpose"], json!("rstudio"));
    assert!(view["url"].is_string(), "{view}");

    // Through the proxy to the (stand-in) workspace.
    wait_ready(&server, &id).await;

    // DELETE terminates it in moto.
    let (status, _) = server.command("DELETE", json!({"instanceId": id})).await;
    assert_eq!(status, 200);
    let state = s.moto.state_of(&id).await;
    assert!(state == "terminated" || state == "shutting-down", "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_on_ec2_hold_every_invariant() {
    const USERS: usize = 50;
    const MAX: usize = 60;
    let s = Arc::new(setup().await);
    let server = Arc::new(Server::start(options(&s, "pool-c", 5, MAX)).await);

    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (s, done, most) = (Arc::downgrade(&s), Arc::clone(&done), Arc::clone(&most));
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let Some(s) = s.upgrade() else { return };
                most.fetch_max(s.moto.live("pool-c").await.len(), Ordering::SeqCst);
                drop(s);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let calls = (0..200).map(|n| {
        let server = Arc::clone(&server);
        let user = format!("user-{}", n % USERS);
        tokio::spawn(async move {
            let (status, body) = server
                .command("REQUEST_RSTUDIO", json!({"userId": user}))
                .await;
            (user, status, body)
        })
    });
    let mut by_user: HashMap<String, HashSet<String>> = HashMap::new();
    for result in futures_util::future::join_all(calls).await {
        let (user, status, body) = result.unwrap();
        assert_eq!(status, 200, "{user}: {body}");
        by_user
            .entry(user)
            .or_default()
            .insert(body["instanceId"].as_str().unwrap().to_owned());
    }
    let mut owners = HashMap::new();
    for (user, ids) in &by_user {
        assert_eq!(ids.len(), 1, "{user} got {ids:?}");
        let id = ids.iter().next().unwrap().clone();
        assert!(
            owners.insert(id.clone(), user.clone()).is_none(),
            "{id} has two users"
        );
    }
    assert_eq!(owners.len(), USERS);
    eventually("five free instances and 55 live in moto", WAIT, || async {
        (server.free("rstudio").await == 5 && s.moto.live("pool-c").await.len() == USERS + 5)
            .then_some(())
    })
    .await;
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= MAX,
        "{most} live instances in moto at once, over the maximum of {MAX}"
    );
    // The tags in moto agree with the answers.
    for instance in s.moto.live("pool-c").await {
        let id = instance.instance_id().unwrap();
        assert_eq!(
            tag(&instance, "userId"),
            owners.get(id).map(String::as_str),
            "{id}"
        );
    }
}

#[tokio::test]
async fn a_restart_rebuilds_the_pool_from_tags_and_leaves_no_orphans() {
    let s = setup().await;
    let mut server = Server::start(options(&s, "pool-r", 2, 8)).await;
    let mut assigned = HashMap::new();
    for user in ["ana", "bo", "cy"] {
        assigned.insert(user, server.request(user).await);
    }
    eventually("two free instances", WAIT, || async {
        (server.census("rstudio").await["freeReady"] == json!(2)).then_some(())
    })
    .await;
    let before = server.command("GET_STATUS", json!({})).await.1["instances"].clone();
    server.kill9();

    // While it is down, someone tags instances for the pool by hand.
    let no_purpose = s.moto.run_tagged(&[("rstudio-pool", "pool-r")]).await;
    let stopped = s
        .moto
        .run_tagged(&[("rstudio-pool", "pool-r"), ("Purpose", "rstudio")])
        .await;
    s.moto
        .client
        .stop_instances()
        .instance_ids(&stopped)
        .send()
        .await
        .unwrap();
    let unknown_purpose = s
        .moto
        .run_tagged(&[("rstudio-pool", "pool-r"), ("Purpose", "cobol")])
        .await;
    let owned = s
        .moto
        .run_tagged(&[
            ("rstudio-pool", "pool-r"),
            ("Purpose", "rstudio"),
            ("userId", "zed"),
        ])
        .await;
    let other_pool = s
        .moto
        .run_tagged(&[("rstudio-pool", "someone-else"), ("Purpose", "rstudio")])
        .await;

    server.restart().await;
    let after = server.command("GET_STATUS", json!({})).await.1["instances"].clone();
    let mut expected: Vec<String> = serde_json::from_value(before).unwrap();
    expected.push(owned.clone());
    expected.sort();
    assert_eq!(
        serde_json::from_value::<Vec<String>>(after).unwrap(),
        expected
    );
    for (user, id) in &assigned {
        assert_eq!(
            &server.request(user).await,
            id,
            "{user} got another instance after the restart"
        );
    }
    assert_eq!(
        server.request("zed").await,
        owned,
        "the hand-tagged owned instance was adopted"
    );

    for id in [&no_purpose, &stopped, &unknown_purpose] {
        eventually(&format!("{id} is terminated"), WAIT, || async {
            let state = s.moto.state_of(id).await;
            (state == "terminated" || state == "shutting-down").then_some(())
        })
        .await;
    }
    assert_eq!(
        s.moto.state_of(&other_pool).await,
        "running",
        "another pool's instance was touched"
    );
    // No instance of the pool in moto that the pool does not know.
    eventually("every live instance is known to the pool", WAIT, || async {
        for instance in s.moto.live("pool-r").await {
            if !is_known(&server, instance.instance_id().unwrap()).await {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test]
async fn two_pools_in_one_account_leave_each_other_alone() {
    let s = setup().await;
    let a = Server::start(options(&s, "pool-one", 2, 4)).await;
    let mut b = Server::start(options(&s, "pool-two", 2, 4)).await;
    for (server, pool) in [(&a, "pool-one"), (&b, "pool-two")] {
        eventually(&format!("{pool} has two instances"), WAIT, || async {
            (server.free("rstudio").await == 2 && s.moto.live(pool).await.len() == 2).then_some(())
        })
        .await;
    }
    let b_instances: HashSet<String> = s
        .moto
        .live("pool-two")
        .await
        .iter()
        .map(|i| i.instance_id().unwrap().to_owned())
        .collect();
    // A cannot act on B's instances.
    let b_id = b_instances.iter().next().unwrap();
    let (status, _) = a.command("DELETE", json!({"instanceId": b_id})).await;
    assert_eq!(status, 404);
    // A restart of B re-adopts exactly its own; A's and B's sets stay apart and intact.
    b.restart().await;
    eventually("pool-two settles with the same instances", WAIT, || async {
        let now: HashSet<String> = s
            .moto
            .live("pool-two")
            .await
            .iter()
            .map(|i| i.instance_id().unwrap().to_owned())
            .collect();
        (now == b_instances && b.free("rstudio").await == 2).then_some(())
    })
    .await;
    assert_eq!(s.moto.live("pool-one").await.len(), 2);
    assert_eq!(a.free("rstudio").await, 2);
}

#[tokio::test]
async fn a_failing_launch_says_what_to_fix_backs_off_and_pauses() {
    let s = setup().await;
    let mut o = options(&s, "pool-f", 1, 3);
    for (k, v) in o.env.iter_mut() {
        if k == "SECURITY_GROUP" {
            *v = "sg-0000000000000dead".into();
        }
    }
    o.pool_yaml = "  launch_failures_to_pause: 3\n  launch_pause_seconds: 600\n".into();
    let server = Server::start(o).await;
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("SECURITY_GROUP"), "{message}");
    // The warm-ups back off (1 s, 2 s), and the third failure in a row pauses launching.
    eventually("launching paused", WAIT, || async {
        let (_, status) = server.command("GET_STATUS", json!({})).await;
        status["launchesPaused"]["rstudio"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    let launches = s.moto.ec2.history(|h| h.count("RunInstances", "error"));
    assert!(
        (3..=4).contains(&launches),
        "{launches} failed launches before the pause"
    );
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "bo"}))
        .await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("paused after 3 failed starts") && message.contains("SECURITY_GROUP"),
        "{message}"
    );
    assert!(server.log().contains("launches paused"), "{}", server.log());
    // Nothing more is launched while paused: not by the top-up, not for the user.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.moto.ec2.history(|h| h.count("RunInstances", "error")),
        launches
    );
    assert!(s.moto.live("pool-f").await.is_empty());
}

#[tokio::test]
async fn each_purpose_launches_its_own_image_and_port() {
    let s = setup().await;
    let mut o = options(&s, "pool-p", 0, 3);
    o.extra_yaml = format!(
        "purposes:\n  rstudio:\n    port: {}\n  jupyter:\n    min_free_instances: 1\n    instance_type: t3.xlarge\n",
        s.stand.port
    );
    let server = Server::start(o).await;
    let instance = eventually("a warm JupyterLab instance", WAIT, || async {
        s.moto.live("pool-p").await.into_iter().next()
    })
    .await;
    assert_eq!(tag(&instance, "Purpose"), Some("jupyter"));
    assert_eq!(
        instance.instance_type().map(|t| t.as_str()),
        Some("t3.xlarge")
    );
    let id = instance.instance_id().unwrap();
    let script = user_data(&s.moto, id).await;
    assert!(
        script.contains("\"quay.io/jupyter/base-notebook:latest\""),
        "{script}"
    );
    assert!(script.contains("-p 8888:8888"), "{script}");
    assert!(
        script.contains("\"--ServerApp.base_url=/${INSTANCE_ID}/\""),
        "{script}"
    );

    // An RStudio request launches its own purpose's image, on the instance type of the pool.
    let rstudio = server.request("ana").await;
    let launched = s
        .moto
        .live("pool-p")
        .await
        .into_iter()
        .find(|i| i.instance_id() == Some(&rstudio))
        .unwrap();
    assert_eq!(tag(&launched, "Purpose"), Some("rstudio"));
    assert_eq!(
        launched.instance_type().map(|t| t.as_str()),
        Some("t3.small")
    );
}

/// Right after a restart the pool is rebuilt from EC2's listings, which may fail for a while:
/// a workspace it has not found again yet gets a page that reloads itself (503), not "shut
/// down" (404).
#[tokio::test]
async fn a_workspace_not_yet_found_again_after_a_restart_is_503_not_gone() {
    let s = setup().await;
    let mut opts = options(&s, "pool-r", 0, 2);
    opts.wait_recovered = false;
    let mut server = Server::start(opts).await;
    let recovered = |server: &Server| {
        let url = format!("http://{}/healthz", server.api);
        let client = server.client().clone();
        async move {
            let v: serde_json::Value = client.get(url).send().await.ok()?.json().await.ok()?;
            v["recovered"].as_bool()
        }
    };
    eventually("the pool is rebuilt", WAIT, || async {
        (recovered(&server).await == Some(true)).then_some(())
    })
    .await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;

    // EC2's listing is down while the pool restarts: it cannot find its instances yet.
    s.moto
        .ec2
        .set(|r| r.refuse = Some(("DescribeInstances", "Unavailable")));
    server.restart().await;
    let (status, body) = server.page(&format!("/{id}/")).await;
    assert_eq!(
        recovered(&server).await,
        Some(false),
        "rebuilt without a listing"
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Reconnecting to your workspace"), "{body}");
    s.moto.ec2.set(|r| r.refuse = None);
    wait_ready(&server, &id).await;
}
