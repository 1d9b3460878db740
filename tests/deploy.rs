//! The AWS deployment (`deploy/cloudformation.yaml`) as one stack: generated from its sources,
//! clean under cfn-lint, created in moto's CloudFormation with every resource checked, its
//! host's user data accepted by bash and shellcheck, the configuration it writes serving a
//! user, and its host role unable to touch any instance but its own pool's.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::moto::{tag, Moto};
use common::{eventually, DemoProcess, Options, Server};
use serde_json::{json, Value};

const POOL: &str = "analysts";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn venv_bin(program: &str) -> PathBuf {
    let venv = std::env::var("RSTUDIO_POOL_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/rstudio-pool-venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let path = Path::new(&venv).join("bin").join(program);
    assert!(
        path.exists(),
        "no {} in {venv}: run scripts/test.sh, which installs it",
        path.display()
    );
    path
}

// ---- The generated blocks ----

const BEGIN: &str = "# BEGIN generated from ";
const END: &str = "# END generated";

/// A value of the policy as CloudFormation writes it: a string naming a placeholder of
/// `deploy/iam-policy.json` becomes an `Fn::Sub` of the stack's own values.
fn with_stack_values(value: &Value) -> Value {
    const PLACEHOLDERS: [(&str, &str); 4] = [
        ("POOL_NAME", "${PoolName}"),
        ("WORKSPACE_ROLE", "${WorkspaceRole}"),
        ("REGION", "${AWS::Region}"),
        ("ACCOUNT", "${AWS::AccountId}"),
    ];
    match value {
        Value::String(s) if PLACEHOLDERS.iter().any(|(p, _)| s.contains(p)) => {
            let mut out = s.clone();
            for (placeholder, sub) in PLACEHOLDERS {
                out = out.replace(placeholder, sub);
            }
            json!({ "Fn::Sub": out })
        }
        Value::Array(items) => Value::Array(items.iter().map(with_stack_values).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), with_stack_values(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The template with each generated block made again from its source file.
fn regenerate(template: &str) -> String {
    let mut out = String::new();
    let mut lines = template.lines();
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        let Some(source) = line.trim_start().strip_prefix(BEGIN) else {
            continue;
        };
        let indent = &line[..line.len() - line.trim_start().len()];
        for skipped in lines.by_ref() {
            if skipped.trim_start() == END {
                break;
            }
        }
        let text = std::fs::read_to_string(repo(source.trim()))
            .unwrap_or_else(|e| panic!("{source}: {e}"));
        let body = match source.trim() {
            "deploy/iam-policy.json" => {
                let policy: Value = serde_json::from_str(&text).unwrap();
                let json = serde_json::to_string_pretty(&with_stack_values(&policy)).unwrap();
                let mut body = format!("{indent}PolicyDocument:\n");
                for l in json.lines() {
                    body.push_str(&format!("{indent}  {l}\n"));
                }
                body
            }
            _ => text
                .lines()
                .map(|l| {
                    if l.is_empty() {
                        "\n".to_owned()
                    } else {
                        format!("{indent}{l}\n")
                    }
                })
                .collect(),
        };
        out.push_str(&body);
        out.push_str(&format!("{indent}{END}\n"));
    }
    out
}

/// The template's generated blocks are its sources' (the IAM policy and the systemd unit), so
/// the two never drift; an edited source rewrites the block here, and the test fails once.
#[test]
fn the_templates_generated_blocks_match_their_sources() {
    let path = repo("deploy/cloudformation.yaml");
    let template = std::fs::read_to_string(&path).unwrap();
    assert_eq!(template.matches(BEGIN).count(), 2, "two generated blocks");
    let fresh = regenerate(&template);
    if fresh != template {
        std::fs::write(&path, &fresh).unwrap();
        panic!(
            "deploy/cloudformation.yaml was behind deploy/iam-policy.json or \
             deploy/rstudio-pool.service; it is rewritten now: commit it"
        );
    }
}

#[test]
fn cfn_lint_finds_nothing() {
    let out = Command::new(venv_bin("cfn-lint"))
        .arg(repo("deploy/cloudformation.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cfn-lint ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- The stack in moto ----

/// A port and where it may be reached from (a security group or a network).
type Rule = (u64, String);

/// Moto with the stack created in it, and what the stack made, as AWS's APIs report it.
struct Deployed {
    moto: Moto,
    stack: Value,
}

async fn deploy() -> Deployed {
    let moto = Moto::start().await;
    let out = Command::new(venv_bin("python"))
        .arg(repo("tests/deploy/stack.py"))
        .arg(&moto.endpoint)
        .arg(repo("deploy/cloudformation.yaml"))
        .arg(POOL)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "creating the stack in moto failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stack: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stack["status"], "CREATE_COMPLETE");
    Deployed { moto, stack }
}

impl Deployed {
    fn group_id(&self, logical: &str) -> &str {
        self.stack["security_groups"][logical]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no security group {logical}"))
    }

    /// (port, source group) of every ingress rule of a group, and (port, network) of its
    /// CIDR rules.
    fn ingress(&self, logical: &str) -> (Vec<Rule>, Vec<Rule>) {
        let mut from_groups = Vec::new();
        let mut from_networks = Vec::new();
        for rule in self.stack["security_groups"][logical]["ingress"]
            .as_array()
            .unwrap()
        {
            let port = rule["FromPort"].as_u64().unwrap_or(0);
            assert_eq!(rule["ToPort"].as_u64().unwrap_or(0), port, "{rule}");
            for pair in rule["UserIdGroupPairs"].as_array().unwrap() {
                from_groups.push((port, pair["GroupId"].as_str().unwrap().to_owned()));
            }
            for range in rule["IpRanges"].as_array().unwrap() {
                from_networks.push((port, range["CidrIp"].as_str().unwrap().to_owned()));
            }
            for range in rule["Ipv6Ranges"].as_array().unwrap() {
                from_networks.push((port, range["CidrIpv6"].as_str().unwrap().to_owned()));
            }
        }
        from_groups.sort();
        from_networks.sort();
        (from_groups, from_networks)
    }

    /// The text between `cat >FILE <<'MARK'` and `MARK` in the host's user data.
    fn written_file(&self, file: &str) -> String {
        let script = self.stack["user_data"].as_str().unwrap();
        let (_, rest) = script
            .split_once(&format!("cat >{file} <<'"))
            .unwrap_or_else(|| panic!("the user data writes no {file}"));
        let (mark, rest) = rest.split_once("'\n").unwrap();
        let end = format!("\n{mark}\n");
        let (body, _) = rest.split_once(&end).unwrap();
        format!("{body}\n")
    }
}

#[tokio::test]
async fn the_stack_creates_in_moto_what_the_template_promises() {
    let d = deploy().await;
    let s = &d.stack;

    // Outputs.
    assert_eq!(s["outputs"]["PublicUrl"], "https://rstudio.example.com");
    assert_eq!(s["outputs"]["PoolName"], POOL);
    let api_dns = s["balancers"]["ApiLoadBalancer"]["dns"].as_str().unwrap();
    assert_eq!(s["outputs"]["ApiUrl"], format!("http://{api_dns}:3001"));
    assert_eq!(
        s["outputs"]["ApiClientSecurityGroup"],
        d.group_id("ApiClientSecurityGroup")
    );

    // Only the load balancer's 80 and 443 are open to the internet.
    let groups = s["security_groups"].as_object().unwrap();
    assert_eq!(groups.len(), 5, "{:?}", groups.keys());
    for logical in groups.keys() {
        let (_, networks) = d.ingress(logical);
        for (port, cidr) in networks {
            assert!(
                logical == "LoadBalancerSecurityGroup" && (port == 80 || port == 443),
                "{logical} lets {cidr} in on {port}"
            );
        }
    }
    let (lb_groups, lb_networks) = d.ingress("LoadBalancerSecurityGroup");
    assert!(lb_groups.is_empty());
    assert_eq!(
        lb_networks,
        [(80, "0.0.0.0/0".to_owned()), (443, "0.0.0.0/0".to_owned())]
    );
    // Workspaces: their ports from the pool host's group only, and no SSH unless asked.
    let host = d.group_id("HostSecurityGroup").to_owned();
    let (workspace_groups, workspace_networks) = d.ingress("WorkspaceSecurityGroup");
    assert_eq!(
        workspace_groups,
        [(8787, host.clone()), (8888, host.clone())]
    );
    assert!(workspace_networks.is_empty(), "{workspace_networks:?}");
    // The host: the proxy from the public load balancer, the API from the internal one.
    let (host_groups, host_networks) = d.ingress("HostSecurityGroup");
    assert_eq!(
        host_groups,
        [
            (3001, d.group_id("ApiLoadBalancerSecurityGroup").to_owned()),
            (8081, d.group_id("LoadBalancerSecurityGroup").to_owned()),
        ]
    );
    assert!(host_networks.is_empty());
    let (api_groups, _) = d.ingress("ApiLoadBalancerSecurityGroup");
    assert_eq!(
        api_groups,
        [(3001, d.group_id("ApiClientSecurityGroup").to_owned())]
    );
    // Moto keeps no egress rules of CloudFormation's, so they are read from the template:
    // the only way out to anywhere is the host's HTTPS (AWS's APIs, packages); workspaces
    // keep the default (their users install packages).
    for (logical, resource) in s["template"]["Resources"].as_object().unwrap() {
        for rule in resource["Properties"]["SecurityGroupEgress"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if rule.get("CidrIp").is_some() {
                assert_eq!(logical, "HostSecurityGroup", "{rule}");
                assert_eq!(
                    (&rule["FromPort"], &rule["ToPort"]),
                    (&json!(443), &json!(443))
                );
            }
        }
    }

    // The workspace profile carries the workspace role, which may pull from ECR only.
    let workspace = &s["profiles"]["WorkspaceInstanceProfile"];
    let workspace_role = s["roles"]["WorkspaceRole"]["name"].as_str().unwrap();
    assert_eq!(workspace["roles"], json!([workspace_role]));
    let policies = s["roles"]["WorkspaceRole"]["policies"].as_object().unwrap();
    assert_eq!(policies.keys().collect::<Vec<_>>(), ["pull-images"]);
    let actions: Vec<&str> = policies["pull-images"]["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|st| match &st["Action"] {
            Value::String(a) => vec![a.as_str()],
            v => v
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect(),
        })
        .collect();
    assert!(
        actions.iter().all(|a| a.starts_with("ecr:")
            && !a.contains('*')
            && (a.starts_with("ecr:Get") || a.starts_with("ecr:Batch"))),
        "{actions:?}"
    );
    // Every policy is inline, so what moto reports is all the roles may do.
    for role in ["WorkspaceRole", "HostRole"] {
        assert!(
            s["template"]["Resources"][role]["Properties"]
                .get("ManagedPolicyArns")
                .is_none(),
            "{role}"
        );
    }

    // The host's launch template: IMDSv2 only, hop limit 1, its profile and group.
    let lt = &s["launch_template"];
    assert_eq!(lt["MetadataOptions"]["HttpTokens"], "required");
    assert_eq!(lt["MetadataOptions"]["HttpPutResponseHopLimit"], 1);
    assert_eq!(
        lt["IamInstanceProfile"]["Arn"],
        s["profiles"]["HostInstanceProfile"]["arn"]
    );
    assert_eq!(lt["SecurityGroupIds"], json!([host]));
    assert_eq!(lt["BlockDeviceMappings"][0]["Ebs"]["Encrypted"], true);

    // An Auto Scaling group of one in the private subnets, behind both target groups.
    let group = &s["host_group"];
    assert_eq!((&group["min"], &group["max"]), (&json!(1), &json!(1)));
    let private = json!([s["subnets"]["private-a"], s["subnets"]["private-b"]]);
    let mut private_sorted: Vec<String> = serde_json::from_value(private.clone()).unwrap();
    private_sorted.sort();
    assert_eq!(group["subnets"], json!(private_sorted));
    assert_eq!(group["health_check_type"], "ELB");
    let mut target_groups = vec![
        s["target_groups"]["ProxyTargetGroup"]["arn"].clone(),
        s["target_groups"]["ApiTargetGroup"]["arn"].clone(),
    ];
    target_groups.sort_by_key(|v| v.to_string());
    assert_eq!(group["target_groups"], json!(target_groups));

    // The public load balancer: HTTPS with the certificate, HTTP redirected, the proxy's own
    // health check, and an idle timeout for long polls and WebSockets.
    let public = &s["balancers"]["LoadBalancer"];
    assert_eq!(public["scheme"], "internet-facing");
    let mut public_subnets = vec![
        s["subnets"]["public-a"].as_str().unwrap(),
        s["subnets"]["public-b"].as_str().unwrap(),
    ];
    public_subnets.sort();
    assert_eq!(public["subnets"], json!(public_subnets));
    let listeners = public["listeners"].as_array().unwrap();
    let https = listeners.iter().find(|l| l["Port"] == 443).unwrap();
    assert_eq!(https["Protocol"], "HTTPS");
    assert_eq!(
        https["Certificates"][0]["CertificateArn"],
        s["parameters"]["CertificateArn"]
    );
    assert_eq!(
        https["DefaultActions"][0]["TargetGroupArn"],
        s["target_groups"]["ProxyTargetGroup"]["arn"]
    );
    let http = listeners.iter().find(|l| l["Port"] == 80).unwrap();
    assert_eq!(http["DefaultActions"][0]["Type"], "redirect");
    assert_eq!(
        http["DefaultActions"][0]["RedirectConfig"]["Protocol"],
        "HTTPS"
    );
    assert_eq!(
        s["target_groups"]["ProxyTargetGroup"]["health_path"],
        rstudio_pool::edge::proxy::HEALTH_PATH
    );
    assert_eq!(s["target_groups"]["ProxyTargetGroup"]["port"], 8081);
    let attributes =
        &s["template"]["Resources"]["LoadBalancer"]["Properties"]["LoadBalancerAttributes"];
    let idle: u64 = attributes
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["Key"] == "idle_timeout.timeout_seconds")
        .and_then(|a| a["Value"].as_str())
        .unwrap()
        .parse()
        .unwrap();
    assert!(idle >= 3600, "{idle} s cuts RStudio's sockets");
    assert_eq!(s["balancers"]["ApiLoadBalancer"]["scheme"], "internal");

    // Host routing: the name and its wildcard point at the load balancer.
    let records = s["records"].as_array().unwrap();
    for name in ["rstudio.example.com", "*.rstudio.example.com"] {
        assert!(
            records
                .iter()
                .any(|r| r["name"] == name && r["type"] == "A"),
            "{records:?}"
        );
    }

    // The host role's pool policy is deploy/iam-policy.json, filled in for this stack.
    let expected = std::fs::read_to_string(repo("deploy/iam-policy.json"))
        .unwrap()
        .replace("POOL_NAME", POOL)
        .replace("WORKSPACE_ROLE", workspace_role)
        .replace("REGION", common::moto::REGION)
        .replace("ACCOUNT", common::moto::ACCOUNT);
    let expected: Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(s["roles"]["HostRole"]["policies"]["pool"], expected);

    // The host installs the unit of deploy/, unchanged.
    let unit = d.written_file("/etc/systemd/system/rstudio-pool.service");
    let shipped = std::fs::read_to_string(repo("deploy/rstudio-pool.service")).unwrap();
    assert_eq!(
        unit.lines()
            .filter(|l| !l.starts_with(BEGIN) && *l != END)
            .collect::<Vec<_>>(),
        shipped.lines().collect::<Vec<_>>()
    );
}

/// Bash and shellcheck accept the host's user data as the stack renders it, and each
/// script it writes.
#[tokio::test]
async fn the_hosts_user_data_passes_bash_and_shellcheck() {
    let d = deploy().await;
    let dir = tempfile::tempdir().unwrap();
    let scripts = [
        (
            "user-data.sh",
            d.stack["user_data"].as_str().unwrap().to_owned(),
        ),
        (
            "rstudio-pool-env",
            d.written_file("/usr/local/libexec/rstudio-pool-env"),
        ),
    ];
    for (name, script) in scripts {
        assert!(script.starts_with("#!/bin/bash\n"), "{name}");
        assert!(!script.contains("${"), "{name}: an unfilled ${{...}}");
        let path = dir.path().join(name);
        std::fs::write(&path, &script).unwrap();
        common::lint_shell(name, &path);
    }
}

/// The configuration the stack writes on its host, run here against the same moto: it passes
/// `-t`, and serves a user their workspace through host routing. Workspaces do not boot in
/// moto, so two things are changed, and only these: instances are reached at a local demo
/// workspace's port instead of their private address, as in tests/ec2.rs.
#[tokio::test]
async fn the_configuration_the_stack_writes_serves_a_user() {
    let d = deploy().await;
    let stand = DemoProcess::start();
    let written = d.written_file("/etc/rstudio-pool/rstudio-pool.yaml");
    let address = "address_template: \"{private_ip}:{port}\"";
    assert!(written.contains(address), "{written}");
    let mut config = written.replace(address, "address_template: \"127.0.0.1:{port}\"");
    for purpose in ["rstudio", "jupyter"] {
        let key = format!("\n  {purpose}:\n");
        assert!(config.contains(&key), "{config}");
        config = config.replace(&key, &format!("{key}    port: {}\n", stand.port));
    }
    let token = "a-token-from-ssm-0123456789";
    let mut env = d.moto.env();
    env.extend(
        [
            ("API_TOKEN", token),
            ("AUTH_SECRETS", "an-auth-secret-from-ssm-0123456789"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let state = tempfile::tempdir().unwrap();
    env.push(("STATE_DIR".into(), state.path().display().to_string()));
    let server = Server::start(Options {
        config_yaml: Some(config),
        api_token: Some(token.into()),
        env,
        wait_recovered: false,
        ..Options::default()
    })
    .await;
    // The host checks its configuration with -t before it starts the unit.
    let (status, out) = server.run_cli(&["-t"]);
    assert!(status.success(), "{out}");

    // The pool rebuilds itself (after EC2's listing lag) and warms one instance per purpose.
    let (status, body) = eventually(
        "the pool assigns a workspace",
        Duration::from_secs(120),
        || async {
            let (status, body) = server
                .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
                .await;
            (status != 503).then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["instanceId"].as_str().unwrap().to_owned();
    let link = body["url"].as_str().unwrap();
    let host = format!("{id}.rstudio.example.com");
    assert!(
        link.starts_with(&format!("https://{host}/")),
        "host routing under the public URL: {link}"
    );

    // The instance was launched as the stack says: its group, subnet and profile.
    let instance = d
        .moto
        .live(POOL)
        .await
        .into_iter()
        .find(|i| i.instance_id() == Some(id.as_str()))
        .unwrap();
    assert_eq!(tag(&instance, "userId"), Some("ana"));
    let groups: Vec<_> = instance
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id())
        .collect();
    assert_eq!(groups, [d.group_id("WorkspaceSecurityGroup")]);
    assert_eq!(
        instance.subnet_id(),
        d.stack["subnets"]["private-a"].as_str()
    );
    assert_eq!(
        instance.iam_instance_profile().and_then(|p| p.arn()),
        d.stack["profiles"]["WorkspaceInstanceProfile"]["arn"].as_str()
    );

    // The load balancer ends TLS and forwards plain HTTP with the user's Host: so does this.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, server.proxy)
        .build()
        .unwrap();
    let base = format!("http://{host}:{}", server.proxy.port());
    let opened = link.replacen(&format!("https://{host}"), &base, 1);
    let r = client.get(&opened).send().await.unwrap();
    assert_eq!(r.status(), 302, "{}", r.text().await.unwrap());
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = eventually(
        "ana's workspace answers",
        Duration::from_secs(60),
        || async {
            let r = client
                .get(format!("{base}/"))
                .header("cookie", &cookie)
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(r.text().await.ok()?)
        },
    )
    .await;
    // The stand-in answers for every instance: it is the workspace behind this instance's host.
    assert!(page.contains("<h1>Demo workspace</h1>"), "{page}");
    // The load balancer's health check reaches the proxy itself.
    let health = reqwest::get(server.proxy_url(rstudio_pool::edge::proxy::HEALTH_PATH))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

// ---- What the host role may do ----

/// One request as IAM evaluates it: an action on a resource with its context keys.
struct Request {
    action: &'static str,
    resource: String,
    context: Vec<(String, Vec<String>)>,
}

/// IAM's wildcard match: `*` any run of characters, `?` one.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some((b'?', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        Value::Bool(b) => vec![b.to_string()],
        other => panic!("not a string or a list of them: {other}"),
    }
}

/// Whether every condition of a statement holds for the request (the operators the pool's
/// policies use; any other fails the test, so that a new one is added here knowingly).
fn conditions_hold(condition: Option<&Value>, request: &Request) -> bool {
    let Some(condition) = condition else {
        return true;
    };
    condition
        .as_object()
        .unwrap()
        .iter()
        .all(|(operator, keys)| {
            keys.as_object().unwrap().iter().all(|(key, wanted)| {
                let wanted = strings(wanted);
                let present = request
                    .context
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(key))
                    .map(|(_, v)| v.as_slice());
                match (operator.as_str(), present) {
                    ("StringEquals", Some(values)) => values.iter().any(|v| wanted.contains(v)),
                    ("StringLike", Some(values)) => {
                        values.iter().any(|v| wanted.iter().any(|w| glob(w, v)))
                    }
                    ("StringEquals" | "StringLike", None) => false,
                    // IAM: true when the key is absent; otherwise every value must be listed.
                    ("ForAllValues:StringEquals", values) => values
                        .unwrap_or_default()
                        .iter()
                        .all(|v| wanted.contains(v)),
                    (other, _) => panic!("the simulation does not know the operator {other}"),
                }
            })
        })
}

/// IAM's decision for an identity's policies: an explicit deny wins, then any allow, and
/// nothing else is allowed.
fn allowed(policies: &Value, request: &Request) -> bool {
    let mut allow = false;
    for document in policies.as_object().unwrap().values() {
        for statement in document["Statement"].as_array().unwrap() {
            for unsupported in ["NotAction", "NotResource", "NotPrincipal"] {
                assert!(statement.get(unsupported).is_none(), "{unsupported}");
            }
            let matches = strings(&statement["Action"]).iter().any(|a| {
                glob(
                    &a.to_ascii_lowercase(),
                    &request.action.to_ascii_lowercase(),
                )
            }) && strings(&statement["Resource"])
                .iter()
                .any(|r| glob(r, &request.resource))
                && conditions_hold(statement.get("Condition"), request);
            if matches {
                match statement["Effect"].as_str() {
                    Some("Deny") => return false,
                    Some("Allow") => allow = true,
                    other => panic!("effect {other:?}"),
                }
            }
        }
    }
    allow
}

/// The host role, as the stack made it in moto, can launch, tag, pause, resume and terminate
/// only instances tagged for its own pool, pass only the workspace role, read only its own
/// secrets; it cannot tag a stranger's instance into its pool, nor change an instance's
/// profile, user data or metadata options. IAM's rules are simulated on the policies moto
/// reports (moto itself does not evaluate IAM conditions).
#[tokio::test]
async fn the_host_role_can_touch_only_its_own_pools_instances() {
    let d = deploy().await;
    let policies = &d.stack["roles"]["HostRole"]["policies"];
    assert_eq!(
        policies.as_object().unwrap().len(),
        2,
        "the pool's and the host's: {policies}"
    );
    let account = common::moto::ACCOUNT;
    let region = common::moto::REGION;
    let instance = |id: &str| format!("arn:aws:ec2:{region}:{account}:instance/{id}");
    let tagged = |pool: Option<&str>| -> Vec<(String, Vec<String>)> {
        pool.map(|p| {
            vec![
                (
                    "aws:ResourceTag/rstudio-pool".to_owned(),
                    vec![p.to_owned()],
                ),
                (
                    "ec2:ResourceTag/rstudio-pool".to_owned(),
                    vec![p.to_owned()],
                ),
            ]
        })
        .unwrap_or_default()
    };
    let with_tags = |mut context: Vec<(String, Vec<String>)>, tags: &[(&str, &str)]| {
        context.push((
            "aws:TagKeys".to_owned(),
            tags.iter().map(|(k, _)| k.to_string()).collect(),
        ));
        for (k, v) in tags {
            context.push((format!("aws:RequestTag/{k}"), vec![v.to_string()]));
        }
        context
    };
    const ON_INSTANCES: [&str; 15] = [
        "ec2:TerminateInstances",
        "ec2:StopInstances",
        "ec2:StartInstances",
        "ec2:RebootInstances",
        "ec2:CreateTags",
        "ec2:DeleteTags",
        "ec2:ModifyInstanceAttribute",
        "ec2:ModifyInstanceMetadataOptions",
        "ec2:AssociateIamInstanceProfile",
        "ec2:ReplaceIamInstanceProfileAssociation",
        "ec2:GetConsoleOutput",
        "ec2:GetPasswordData",
        "ec2:CreateImage",
        "ec2:AttachVolume",
        "ec2:MonitorInstances",
    ];
    let mut checked = 0;
    let mut expect = |what: &str, request: Request, want: bool| {
        checked += 1;
        assert_eq!(
            allowed(policies, &request),
            want,
            "{what}: {} on {}",
            request.action,
            request.resource
        );
    };

    // Nothing at all on instances of another pool or of nobody's.
    for (whose, pool) in [("another pool's", Some("finance")), ("an untagged", None)] {
        for action in ON_INSTANCES {
            for tags in [
                &[][..],
                &[("userId", "ana")][..],
                &[("rstudio-pool", POOL)][..],
            ] {
                let context = with_tags(tagged(pool), tags);
                expect(
                    &format!("{whose} instance, tags {tags:?}"),
                    Request {
                        action,
                        resource: instance("i-0f00"),
                        context,
                    },
                    false,
                );
            }
        }
    }
    // On its own pool's: what the pool does, and no more.
    let own = || tagged(Some(POOL));
    for (action, want) in [
        ("ec2:TerminateInstances", true),
        ("ec2:StopInstances", true),
        ("ec2:StartInstances", true),
        ("ec2:ModifyInstanceAttribute", false),
        ("ec2:AssociateIamInstanceProfile", false),
        ("ec2:ReplaceIamInstanceProfileAssociation", false),
        ("ec2:ModifyInstanceMetadataOptions", false),
        ("ec2:DeleteTags", false),
    ] {
        expect(
            "its own instance",
            Request {
                action,
                resource: instance("i-0a11"),
                context: own(),
            },
            want,
        );
    }
    for (tags, want) in [
        (&[("userId", "ana"), ("assignedAt", "1")][..], true),
        (&[("lastActivity", "1")][..], true),
        (&[("rstudio-pool", "finance")][..], false),
        (&[("Purpose", "jupyter")][..], false),
    ] {
        expect(
            &format!("retagging its own instance with {tags:?}"),
            Request {
                action: "ec2:CreateTags",
                resource: instance("i-0a11"),
                context: with_tags(own(), tags),
            },
            want,
        );
    }
    // Launches: only instances tagged for this pool from the start.
    let launch_tags = [
        ("rstudio-pool", POOL),
        ("Purpose", "rstudio"),
        ("Name", "analysts-rstudio"),
    ];
    for (tags, want) in [
        (&launch_tags[..], true),
        (
            &[("rstudio-pool", "finance"), ("Purpose", "rstudio")][..],
            false,
        ),
        (&[("Purpose", "rstudio")][..], false),
        (&[][..], false),
        (&[("rstudio-pool", POOL), ("Owner", "someone")][..], false),
    ] {
        expect(
            &format!("a launch tagged {tags:?}"),
            Request {
                action: "ec2:RunInstances",
                resource: instance("*"),
                context: with_tags(Vec::new(), tags),
            },
            want,
        );
    }
    let mut at_launch = with_tags(Vec::new(), &launch_tags);
    at_launch.push((
        "ec2:CreateAction".to_owned(),
        vec!["RunInstances".to_owned()],
    ));
    expect(
        "tags written by the launch itself",
        Request {
            action: "ec2:CreateTags",
            resource: instance("i-0a12"),
            context: at_launch,
        },
        true,
    );
    // Roles: the workspace role to EC2, nothing else.
    let role = |name: &str| format!("arn:aws:iam::{account}:role/{name}");
    let to_ec2 = || {
        vec![(
            "iam:PassedToService".to_owned(),
            vec!["ec2.amazonaws.com".to_owned()],
        )]
    };
    let workspace_role = d.stack["roles"]["WorkspaceRole"]["name"].as_str().unwrap();
    let host_role = d.stack["roles"]["HostRole"]["name"].as_str().unwrap();
    expect(
        "the workspace role",
        Request {
            action: "iam:PassRole",
            resource: role(workspace_role),
            context: to_ec2(),
        },
        true,
    );
    expect(
        "its own role",
        Request {
            action: "iam:PassRole",
            resource: role(host_role),
            context: to_ec2(),
        },
        false,
    );
    expect(
        "an admin role",
        Request {
            action: "iam:PassRole",
            resource: role("admin"),
            context: to_ec2(),
        },
        false,
    );
    for action in [
        "iam:CreateRole",
        "iam:PutRolePolicy",
        "iam:AttachRolePolicy",
        "ec2:AuthorizeSecurityGroupIngress",
        "ec2:CreateSecurityGroup",
    ] {
        expect(
            "no IAM or network changes",
            Request {
                action,
                resource: "*".into(),
                context: Vec::new(),
            },
            false,
        );
    }
    // Secrets: its own pool's.
    let parameter = |path: &str| format!("arn:aws:ssm:{region}:{account}:parameter{path}");
    expect(
        "its token",
        Request {
            action: "ssm:GetParameter",
            resource: parameter("/rstudio-pool/analysts/api-token"),
            context: Vec::new(),
        },
        true,
    );
    expect(
        "another pool's token",
        Request {
            action: "ssm:GetParameter",
            resource: parameter("/rstudio-pool/finance/api-token"),
            context: Vec::new(),
        },
        false,
    );
    expect(
        "the account's parameters",
        Request {
            action: "ssm:GetParameter",
            resource: parameter("/prod/db-password"),
            context: Vec::new(),
        },
        false,
    );
    expect(
        "listing is read-only",
        Request {
            action: "ec2:DescribeInstances",
            resource: "*".into(),
            context: Vec::new(),
        },
        true,
    );
    assert!(checked > 100, "{checked} requests");
}

/// `deploy/teardown.sh` leaves no instance of the pool behind (running, paused or starting),
/// touches no other pool's, and deletes the stack: with the AWS CLI against the same moto.
#[tokio::test]
async fn teardown_terminates_the_pools_instances_then_deletes_the_stack() {
    let d = deploy().await;
    let ours = [
        d.moto
            .run_tagged(&[("rstudio-pool", POOL), ("Purpose", "rstudio")])
            .await,
        d.moto
            .run_tagged(&[
                ("rstudio-pool", POOL),
                ("Purpose", "rstudio"),
                ("userId", "ana"),
            ])
            .await,
        d.moto
            .run_tagged(&[("rstudio-pool", POOL), ("Purpose", "jupyter")])
            .await,
    ];
    // A paused one: its volume holds a user's work, and it holds the workspace group too.
    d.moto
        .client
        .stop_instances()
        .instance_ids(&ours[1])
        .send()
        .await
        .unwrap();
    let theirs = d.moto.run_tagged(&[("rstudio-pool", "finance")]).await;

    let stack = format!("rstudio-pool-{POOL}");
    let path = format!(
        "{}:{}",
        venv_bin("aws").parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(repo("deploy/teardown.sh"))
        .arg(&stack)
        .env("PATH", path)
        .env("AWS_ENDPOINT_URL", &d.moto.endpoint)
        .env("AWS_DEFAULT_REGION", common::moto::REGION)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "teardown failed:\n{said}");
    assert!(said.contains("terminating 3 instance(s)"), "{said}");

    for id in &ours {
        assert_eq!(d.moto.state_of(id).await, "terminated", "{id}");
    }
    assert_eq!(d.moto.state_of(&theirs).await, "running");
    assert!(d
        .moto
        .instances(POOL, &["pending", "running", "stopping", "stopped"])
        .await
        .is_empty());
    let listed = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import boto3,sys; c=boto3.client('cloudformation', region_name='us-east-1', endpoint_url=sys.argv[1], aws_access_key_id='t', aws_secret_access_key='t'); print(' '.join(s['StackName'] for s in c.list_stacks(StackStatusFilter=['CREATE_COMPLETE'])['StackSummaries']))",
            &d.moto.endpoint,
        ])
        .output()
        .unwrap();
    let live = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success());
    assert!(!live.contains(&stack), "still there: {live}");
}
