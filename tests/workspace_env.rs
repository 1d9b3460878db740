//! What a process-provider workspace inherits of the pool's environment: the few variables a
//! program needs to run (PATH, HOME, the locale...), never the pool's secrets nor its own
//! settings. Code a user runs in a workspace can read its environment from
//! /proc/self/environ; with `AUTH_SECRETS` it could forge any user's link, with `API_TOKEN`
//! command the pool, and code-server binds `PORT`, the proxy's own port.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{answers, eventually, free_port, Options, Server};

const WAIT: Duration = Duration::from_secs(30);
const AUTH_SECRET: &str = "env-secret-0123456789abcdef";
const API_TOKEN: &str = "env-api-token-0123456789";
const CANARY: &str = "RSTUDIO_POOL_TEST_CANARY";

/// The environment of a running process, from /proc.
fn environ(pid: u32) -> HashMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("cannot read the environment of {pid}: {e}"));
    raw.split(|&b| b == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (name, value) = entry.split_once('=').unwrap_or((&entry, ""));
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn workspaces_see_neither_the_pools_secrets_nor_its_settings() {
    let port = free_port();
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
    let home = std::env::var("HOME").unwrap_or_else(|_| "/nonexistent".into());
    let mut server = Server::start(Options {
        auth_yaml: Some("auth:\n  mode: token\n".into()),
        api_token: Some(API_TOKEN.into()),
        env: vec![
            ("AUTH_SECRETS".into(), AUTH_SECRET.into()),
            ("API_TOKEN".into(), API_TOKEN.into()),
            ("PORT".into(), port.to_string()),
            (CANARY.into(), "visible to the pool only".into()),
            ("PATH".into(), path.clone()),
            ("HOME".into(), home.clone()),
            ("LC_PAPER".into(), "C".into()),
        ],
        ..Options::default()
    })
    .await;
    // PORT reached the pool: its proxy listens there, not where the configuration said.
    server.proxy = SocketAddr::from(([127, 0, 0, 1], port));
    eventually("the proxy listens on PORT", WAIT, || async {
        answers(&server.proxy.to_string()).await.then_some(())
    })
    .await;

    let id = server.request("ana").await;
    let upstream = server.upstream(&id).await;
    eventually("the workspace answers", WAIT, || async {
        answers(&upstream).await.then_some(())
    })
    .await;
    let workspaces = server.workspaces();
    let pid = workspaces
        .iter()
        .find(|(_, found)| *found == id)
        .map(|(pid, _)| *pid)
        .unwrap_or_else(|| panic!("no process of {id} among {workspaces:?}"));

    // Every workspace the pool started (the assigned one and the warm spare), not only one.
    for (pid, id) in &workspaces {
        let env = environ(*pid);
        for name in ["AUTH_SECRETS", "API_TOKEN", "PORT", CANARY, "RUST_LOG"] {
            assert!(
                !env.contains_key(name),
                "workspace {id} (pid {pid}) inherited the pool's {name}: {env:?}"
            );
        }
        assert!(
            !env.values()
                .any(|v| v.contains(AUTH_SECRET) || v.contains(API_TOKEN)),
            "a secret of the pool is in the environment of {id}: {env:?}"
        );
    }

    // What a program needs to run is passed on, with the provider's own variable.
    let env = environ(pid);
    assert_eq!(env.get("PATH"), Some(&path), "{env:?}");
    assert_eq!(env.get("HOME"), Some(&home), "{env:?}");
    assert_eq!(
        env.get("LC_PAPER").map(String::as_str),
        Some("C"),
        "{env:?}"
    );
    assert_eq!(
        env.get("RSTUDIO_POOL_INSTANCE_ID"),
        Some(&id),
        "the provider tells the workspace its id: {env:?}"
    );
}
