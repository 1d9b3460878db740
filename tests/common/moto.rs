//! A moto server (a local EC2 API over real HTTP) per test, an EC2 client for it that sees
//! the truth, and in front of it, for the pool, an EC2 that behaves like EC2 ([`Ec2Sim`]:
//! listing lag, throttling, idempotent launches, faults on demand).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{Filter, Instance, ResourceType, Tag, TagSpecification};
use aws_sdk_ec2::Client;

use super::ec2sim::{Ec2Sim, Realism};
use super::{free_port, DemoProcess, Options};

pub const REGION: &str = "us-east-1";
pub const ACCOUNT: &str = "123456789012";

pub struct Moto {
    child: Child,
    /// Moto itself: the truth, as the tests' own client sees it.
    pub endpoint: String,
    pub client: Client,
    /// What the pool talks to.
    pub ec2: Ec2Sim,
}

impl Moto {
    /// Moto behind an EC2 with the default realism: new instances unlisted for a while,
    /// AWS's throttling.
    pub async fn start() -> Moto {
        Self::start_with(Realism::default_lag()).await
    }

    pub async fn start_with(realism: Realism) -> Moto {
        let program = std::env::var("MOTO_SERVER").unwrap_or_else(|_| {
            format!(
                "{}/.cache/rstudio-pool-venv/bin/moto_server",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let port = free_port();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program} ({e}): run scripts/test.sh, which installs moto")
            });
        let endpoint = format!("http://127.0.0.1:{port}");
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&endpoint)
            .credentials_provider(Credentials::new("testing", "testing", None, None, "static"))
            .build();
        let moto = Moto {
            ec2: Ec2Sim::start(&endpoint, realism),
            child,
            endpoint,
            client: Client::from_conf(config),
        };
        let until = Instant::now() + Duration::from_secs(60);
        while moto.client.describe_instances().send().await.is_err() {
            assert!(Instant::now() < until, "moto did not answer within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }

    /// The environment a server needs to talk to this moto, through the realistic EC2.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.ec2.endpoint.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            // Never ask the instance metadata service for anything.
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Creates an IAM instance profile (moto checks that the profile exists).
    pub async fn create_instance_profile(&self, name: &str) {
        let r = reqwest::Client::new()
            .post(&self.endpoint)
            .header(
                "authorization",
                format!("AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/iam/aws4_request, SignedHeaders=host, Signature=0"),
            )
            .form(&[
                ("Action", "CreateInstanceProfile"),
                ("InstanceProfileName", name),
                ("Version", "2010-05-08"),
            ])
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    pub async fn create_security_group(&self, name: &str) -> String {
        self.client
            .create_security_group()
            .group_name(name)
            .description("workspaces")
            .send()
            .await
            .unwrap()
            .group_id()
            .unwrap()
            .to_owned()
    }

    /// Instances of `pool` in the given states.
    pub async fn instances(&self, pool: &str, states: &[&str]) -> Vec<Instance> {
        let mut out = Vec::new();
        let pages = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:rstudio-pool")
                    .values(pool)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(states.iter().map(|s| s.to_string()).collect()))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        for r in pages.reservations() {
            out.extend(r.instances().iter().cloned());
        }
        out
    }

    pub async fn live(&self, pool: &str) -> Vec<Instance> {
        self.instances(pool, &["pending", "running"]).await
    }

    /// Launches an instance by hand with these tags, as someone outside the pool would.
    pub async fn run_tagged(&self, tags: &[(&str, &str)]) -> String {
        let out = self
            .client
            .run_instances()
            .image_id("ami-12345678")
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(
                        tags.iter()
                            .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                            .collect(),
                    ))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.instances()[0].instance_id().unwrap().to_owned()
    }

    pub async fn state_of(&self, id: &str) -> String {
        let out = self
            .client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
        out.reservations()[0].instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default()
    }
}

pub const PROFILE: &str = "workspace-profile";

/// Moto with what the pool needs in it, and a demo workspace standing in for every EC2
/// instance's RStudio (workspaces do not boot in moto).
pub struct Setup {
    pub moto: Moto,
    pub stand: DemoProcess,
    pub security_group: String,
}

pub async fn setup() -> Setup {
    setup_with(Realism::default_lag()).await
}

pub async fn setup_with(realism: Realism) -> Setup {
    let moto = Moto::start_with(realism).await;
    moto.create_instance_profile(PROFILE).await;
    let security_group = moto.create_security_group("workspaces").await;
    Setup {
        moto,
        stand: DemoProcess::start(),
        security_group,
    }
}

/// A pool on the ec2 provider against `s`, every instance's address pointing at the stand-in
/// workspace, and the provider's consistency settings matched to the realistic EC2's lag.
pub fn options(s: &Setup, pool: &str, min_free: usize, max: usize) -> Options {
    let mut env = s.moto.env();
    for (k, v) in [
        ("IMAGE_ID", "ami-0123456789abcdef0"),
        ("IMAGE_TYPE", "t3.small"),
        ("KEY_NAME", "analysts"),
        ("SECURITY_GROUP", s.security_group.as_str()),
        ("INSTANCE_PROFILE", PROFILE),
        ("ACCOUNT", ACCOUNT),
        ("REGION", REGION),
    ] {
        env.push((k.to_owned(), v.to_owned()));
    }
    Options {
        min_free,
        max,
        pool_name: pool.to_owned(),
        provider_yaml: Some(
            "provider:\n  kind: ec2\n  ec2:\n    address_template: \"127.0.0.1:{port}\"\n    launch_rate_per_second: 200\n    launch_burst: 100\n    listing_lag_seconds: 2\n    missing_grace_seconds: 20\n"
                .to_owned(),
        ),
        extra_yaml: format!("purposes:\n  rstudio:\n    port: {}\n", s.stand.port),
        env,
        ..Options::default()
    }
}

pub fn tag<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
