//! Cost control: the books survive a crash, the simulator replays a trace through the same
//! pool code as the server and makes the same decisions, and a bad trace line loses nothing
//! else.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{eventually, Options, Server};
use serde_json::{json, Value};

/// `pools.<purpose>.cost` of GET_STATUS.
async fn books(server: &Server) -> Value {
    server.census("rstudio").await["cost"].clone()
}

fn seconds(span: &Value, state: &str) -> f64 {
    span["byState"][state]["seconds"].as_f64().unwrap()
}

/// A SIGKILL loses at most one reconcile round of the books: the time the pool was down is
/// put on the instances it left, in the state they were in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_books_survive_a_sigkill_within_one_round() {
    // 3.6 an hour is 0.001 a second.
    let mut server = Server::start(Options {
        min_free: 2,
        extra_yaml: "purposes:\n  rstudio:\n    hourly_cost: 3.6\n    paused_hourly_cost: 0.36\n"
            .into(),
        ..Options::default()
    })
    .await;
    eventually(
        "two free instances ready",
        Duration::from_secs(30),
        || async { (server.census("rstudio").await["freeReady"] == json!(2)).then_some(()) },
    )
    .await;
    let alice = server.request("alice").await;
    eventually(
        "the warm pool topped up",
        Duration::from_secs(30),
        || async { (server.census("rstudio").await["freeReady"] == json!(2)).then_some(()) },
    )
    .await;
    // Three instances from here on: alice's and two free. A scrape counts up to now.
    server.metrics().await;
    let before = books(&server).await;
    let read_before = Instant::now();
    let free_before = seconds(&before["total"], "free");
    let alice_before = before["users"]["alice"]["instanceSeconds"]
        .as_f64()
        .unwrap();
    let file = server.state_dir().join("test-pool.books.json");
    assert!(file.exists(), "the books are saved in {}", file.display());

    server.kill9();
    // Down for a while, as a crash with systemd's RestartSec would be.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;
    assert_eq!(server.request("alice").await, alice, "the same instance");
    // A scrape counts up to now (the pool is rebuilt: `restart` waits for that).
    server.metrics().await;
    let after = books(&server).await;
    let elapsed = read_before.elapsed().as_secs_f64();
    let free_after = seconds(&after["total"], "free");
    let alice_after = after["users"]["alice"]["instanceSeconds"].as_f64().unwrap();

    // Each figure is at most a round (200 ms) behind at each read, and the span between the
    // reads is measured around them: a second of slack per instance.
    let round = 0.2;
    let slack = 2.0 * round + 0.6;
    let free_gain = free_after - free_before;
    assert!(
        (free_gain - 2.0 * elapsed).abs() <= 2.0 * slack,
        "two free instances for {elapsed:.2} s should add {:.2} free seconds, added {free_gain:.2} ({before} -> {after})",
        2.0 * elapsed
    );
    let alice_gain = alice_after - alice_before;
    assert!(
        (alice_gain - elapsed).abs() <= slack,
        "alice's instance for {elapsed:.2} s should add as much, added {alice_gain:.2}"
    );
    assert_eq!(after["since"], before["since"], "the same books");
    // The forecast's history (arrivals per hour of the week) came back with them: alice's
    // arrival is in the hour being counted (or, past the hour, in its average).
    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let history = &saved["history"]["rstudio"];
    let folded = history["avg"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v.as_f64() > Some(0.0)));
    assert!(history["count"].as_u64() >= Some(1) || folded, "{history}");
    // Money follows the seconds at the configured price.
    let total = &after["total"];
    let running: f64 = ["free", "launching", "assigned_active", "assigned_idle"]
        .iter()
        .map(|s| seconds(total, s))
        .sum();
    let expected = running * 0.001 + seconds(total, "paused") * 0.0001;
    assert!(
        (total["cost"].as_f64().unwrap() - expected).abs() < 0.001,
        "{total}"
    );
    // The metrics show the same books.
    let metrics = server.metrics().await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("rstudio_pool_ledger_cost{purpose=\"rstudio\",span=\"total\"}"))
        .unwrap_or_else(|| panic!("no ledger cost in the metrics:\n{metrics}"));
    let scraped: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        scraped >= total["cost"].as_f64().unwrap() - 1e-9,
        "{line} vs {total}"
    );
}

/// One session of the shared trace: when (seconds after the start), who, and for how long
/// they act.
struct Step {
    at_s: u64,
    user: &'static str,
    active_s: u64,
}

/// Warm ones, a cold one (two at once), returns to a paused instance, a return to one still
/// assigned, spaced so that every start is over before the next step.
const STEPS: &[Step] = &[
    Step {
        at_s: 0,
        user: "u1",
        active_s: 1,
    },
    Step {
        at_s: 4,
        user: "u2",
        active_s: 1,
    },
    Step {
        at_s: 8,
        user: "u3",
        active_s: 1,
    },
    // u1 was idle for 4 s at about 5 s: paused; coming back resumes it.
    Step {
        at_s: 12,
        user: "u1",
        active_s: 1,
    },
    // u3 acted last at about 8: paused at about 12.5, so this resumes (with a longer
    // timeout it would be their own).
    Step {
        at_s: 14,
        user: "u3",
        active_s: 1,
    },
    Step {
        at_s: 16,
        user: "u4",
        active_s: 1,
    },
    // Still u4's (idle since 17, paused at 21): their own.
    Step {
        at_s: 18,
        user: "u4",
        active_s: 1,
    },
    Step {
        at_s: 24,
        user: "u5",
        active_s: 1,
    },
    Step {
        at_s: 24,
        user: "u6",
        active_s: 1,
    },
    Step {
        at_s: 30,
        user: "u2",
        active_s: 1,
    },
];

/// The simulator and the server, given the same configuration and the same trace, make the
/// same decisions: how each request is served (warm, cold, the user's own, a resume), and how
/// many launches are made between one step and the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_and_the_server_make_the_same_decisions() {
    let server = Server::start(Options {
        min_free: 1,
        max: 10,
        timeout_instance_ms: 4000,
        // Audit events as JSON lines, to be turned into a trace at the end.
        env: vec![("LOG_FORMAT".into(), "json".into())],
        ..Options::default()
    })
    .await;
    eventually("a free instance ready", Duration::from_secs(30), || async {
        (server.census("rstudio").await["freeReady"] == json!(1)).then_some(())
    })
    .await;
    // 2026-11-30T10:00:00Z: any time works for the fixed policy.
    let base_ms: u64 = 1_796_032_800_000;
    let trace: String = STEPS
        .iter()
        .map(|s| {
            format!(
                "{{\"user\": \"{}\", \"at\": {}, \"active\": [[0, {}]]}}\n",
                s.user,
                (base_ms / 1000) + s.at_s,
                s.active_s
            )
        })
        .collect();
    let trace_file = server.dir.join("trace.jsonl");
    std::fs::write(&trace_file, &trace).unwrap();

    // The server, in real time.
    let start = Instant::now();
    let mut served: Vec<(String, String)> = Vec::new();
    let mut launches_before: Vec<u64> = Vec::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut activity = Vec::new();
    let mut i = 0;
    while i < STEPS.len() {
        let at = Duration::from_secs(STEPS[i].at_s);
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        launches_before.push(launches(&server).await);
        // Every step of this second, one after the other, as the simulator orders them.
        let mut j = i;
        while j < STEPS.len() && STEPS[j].at_s == STEPS[i].at_s {
            let step = &STEPS[j];
            let (status, body) = server
                .command("REQUEST_RSTUDIO", json!({"userId": step.user}))
                .await;
            assert_eq!(status, 200, "{body}");
            let id = body["instanceId"].as_str().unwrap().to_owned();
            let how = match body["status"].as_str().unwrap() {
                "resuming" => "resume",
                "launching" => "cold",
                _ if owner.get(&id).map(String::as_str) == Some(step.user) => "own",
                _ => "warm",
            };
            owner.insert(id.clone(), step.user.to_owned());
            served.push((step.user.to_owned(), how.to_owned()));
            // The user works in it once it answers: one action now.
            let url = server.proxy_url(&format!("/{id}/"));
            let client = server.client().clone();
            let server_id = id.clone();
            activity.push(tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(30);
                while Instant::now() < until {
                    if let Ok(r) = client.get(&url).send().await {
                        if r.status().is_success() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("{server_id} never answered");
            }));
            j += 1;
        }
        i = j;
    }
    for a in activity {
        a.await.unwrap();
    }
    // After the last step, once the pool has settled (the top-up that follows it is ready):
    // every launch the trace causes has been made.
    eventually("the pool settled", Duration::from_secs(30), || async {
        let pool = server.census("rstudio").await;
        (pool["freeReady"] == json!(1)
            && pool["freeLaunching"] == json!(0)
            && pool["pendingLaunches"] == json!(0))
        .then_some(())
    })
    .await;
    launches_before.push(launches(&server).await);

    // The simulator, over the same configuration.
    let decisions = server.dir.join("decisions.jsonl");
    let (status, out) = server.run_cli(&[
        "simulate",
        "--trace",
        trace_file.to_str().unwrap(),
        "--decisions",
        decisions.to_str().unwrap(),
    ]);
    assert!(status.success(), "{out}");
    let decisions: Vec<Value> = std::fs::read_to_string(&decisions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let simulated: Vec<(String, String)> = decisions
        .iter()
        .filter(|d| d["decision"] == "assign")
        .map(|d| {
            (
                d["user"].as_str().unwrap().to_owned(),
                d["how"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let launch_times: Vec<u64> = decisions
        .iter()
        .filter(|d| d["decision"] == "launch")
        .map(|d| d["at_ms"].as_u64().unwrap())
        .collect();
    let mut simulated_launches: Vec<u64> = STEPS
        .iter()
        .map(|s| s.at_s)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|at| {
            launch_times
                .iter()
                .filter(|&&t| t < base_ms + at * 1000)
                .count() as u64
        })
        .collect();
    // And every launch of the simulated run, which goes on until the pool has settled too.
    simulated_launches.push(launch_times.len() as u64);

    assert_eq!(
        served, simulated,
        "how each request was served: server vs simulator\n{out}"
    );
    // Sanity: the trace exercises every kind of answer.
    for how in ["warm", "cold", "own", "resume"] {
        assert!(
            served.iter().any(|(_, h)| h == how),
            "no `{how}` answer in {served:?}"
        );
    }
    assert_eq!(
        launches_before, simulated_launches,
        "launches made before each step (and after the last): server vs simulator"
    );

    // The server's audit log is a trace again: a session per assignment or resume (a
    // request for one's own instance is not an event), for the same users.
    let log = server.dir.join("server.log");
    let (status, out) = server.run_cli(&[
        "trace",
        "from-audit",
        log.to_str().unwrap(),
        "--idle-timeout-ms",
        "4000",
    ]);
    assert!(status.success(), "{out}");
    let mut users: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["user"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut expected: Vec<String> = served
        .iter()
        .filter(|(_, how)| how != "own")
        .map(|(user, _)| user.clone())
        .collect();
    users.sort();
    expected.sort();
    assert_eq!(users, expected, "{out}");
}

/// The launches the server has made (its provider's launch calls).
async fn launches(server: &Server) -> u64 {
    let metrics = server.metrics().await;
    metrics
        .lines()
        .find(|l| l.starts_with("rstudio_pool_provider_calls_total{operation=\"launch\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no launch count in the metrics:\n{metrics}"))
}

/// A bad line of a trace is reported with its number, and every other line is replayed.
#[test]
fn a_bad_trace_line_is_reported_with_its_number_and_the_rest_replays() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(
        &trace,
        "# four sessions and a mistake\n\
         {\"user\": \"a\", \"at\": \"2026-11-30T09:00:00Z\", \"end\": 600}\n\
         {\"user\": \"b\", \"at\": \"2026-11-30T09:05:00Z\", \"end\": 600}\n\
         {\"user\": \"c\", \"at\": \"2026-11-30T25:00:00Z\", \"end\": 600}\n\
         {\"user\": \"d\", \"at\": \"2026-11-30T09:20:00Z\", \"end\": 600}\n\
         {\"user\": \"e\", \"at\": \"2026-11-30T09:30:00Z\", \"end\": 600}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rstudio-pool"))
        .args(["simulate", "--trace"])
        .arg(&trace)
        .env("STATE_DIR", dir.path().join("state"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("line 4") && stderr.contains("`at`"),
        "the bad line is named with what is wrong in it: {stderr}"
    );
    assert!(stderr.contains("1 line(s) skipped"), "{stderr}");
    // Four sessions replayed: four requests in the policy's row.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| config"))
        .unwrap_or_else(|| panic!("no row in {stdout}"));
    let requests: u32 = row.split('|').nth(2).unwrap().trim().parse().unwrap();
    assert_eq!(requests, 4, "{stdout}");
    assert!(stdout.contains("4 sessions of 4 users"), "{stdout}");
}

/// A pool whose target drops (here `min_free_instances` lowered across a restart; a warm
/// policy does it every evening) lets go of the free instances beyond it once they have been
/// up `scale_down_after_seconds`, and never of one a user holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_instances_beyond_a_lowered_target_are_let_go_and_assigned_ones_kept() {
    let mut server = Server::start(Options {
        min_free: 3,
        pool_yaml: "  scale_down_after_seconds: 1\n".into(),
        ..Options::default()
    })
    .await;
    let alice = server.request("alice").await;
    eventually(
        "three free instances ready",
        Duration::from_secs(30),
        || async { (server.census("rstudio").await["freeReady"] == json!(3)).then_some(()) },
    )
    .await;
    assert_eq!(server.workspaces().len(), 4);

    let config = std::fs::read_to_string(&server.config).unwrap();
    let lowered = config.replace("min_free_instances: 3", "min_free_instances: 1");
    assert_ne!(config, lowered);
    std::fs::write(&server.config, lowered).unwrap();
    server.restart().await;

    eventually(
        "the two surplus workspaces ended",
        Duration::from_secs(30),
        || async {
            let pool = server.census("rstudio").await;
            (pool["freeReady"] == json!(1)
                && pool["terminating"] == json!(0)
                && server.workspaces().len() == 2)
                .then_some(())
        },
    )
    .await;
    assert_eq!(server.request("alice").await, alice, "alice keeps hers");
    let metrics = server.metrics().await;
    assert!(
        metrics
            .contains("rstudio_pool_terminations_total{purpose=\"rstudio\",reason=\"surplus\"} 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("terminations_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(server.census("rstudio").await["cost"]["keepFree"], json!(1));
}
