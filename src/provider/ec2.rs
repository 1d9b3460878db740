//! The `ec2` provider: each instance is an EC2 VM whose user data installs docker and runs the
//! purpose's image. Instances are found by the pool's tag, so two pools in one account never
//! touch each other's instances, and everything the pool knows lives in their tags.
//!
//! **Architecture invariant:** this is the only module that knows AWS. Credentials, region and
//! endpoint come from aws-config's default chain (`AWS_REGION`/`REGION`, `AWS_ENDPOINT_URL`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, Instance,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName, InstanceType,
    ResourceType, Tag, TagSpecification,
};
use aws_sdk_ec2::Client;
use base64::Engine;
use log::{info, warn};
use tokio::sync::{Mutex, OnceCell};

use super::{
    InstanceRecord, LaunchSpec, Provider, ProviderError, ProviderState, TAG_NAME, TAG_POOL,
    TAG_PURPOSE,
};
use crate::config::{Ec2Config, Purpose};
use crate::core::bucket::TokenBucket;
use crate::core::ids::InstanceId;
use crate::provider::process::now_ms;

/// How often one launch is retried on a transient error with the same client token.
const LAUNCH_ATTEMPTS: u32 = 3;

pub struct Ec2Provider {
    config: Ec2Config,
    pool_name: String,
    ports: BTreeMap<String, u16>,
    /// Per purpose: its own AMI and instance type, over the provider's.
    machines: BTreeMap<String, (String, String)>,
    /// Built on first use, inside the server's runtime.
    client: OnceCell<Client>,
    launches: Mutex<TokenBucket>,
}

impl Ec2Provider {
    pub fn new(config: Ec2Config, pool_name: &str, purposes: &BTreeMap<String, Purpose>) -> Self {
        let launches =
            TokenBucket::new(config.launch_burst, config.launch_rate_per_second, now_ms());
        Self {
            ports: purposes.iter().map(|(n, p)| (n.clone(), p.port)).collect(),
            machines: purposes
                .iter()
                .map(|(n, p)| {
                    let image = p
                        .image_id
                        .clone()
                        .unwrap_or_else(|| config.image_id.clone());
                    let kind = p
                        .instance_type
                        .clone()
                        .unwrap_or_else(|| config.instance_type.clone());
                    (n.clone(), (image, kind))
                })
                .collect(),
            config,
            pool_name: pool_name.to_owned(),
            client: OnceCell::new(),
            launches: Mutex::new(launches),
        }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    // Throttling and 5xx are retried by the SDK with backoff.
                    .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(5))
                    .timeout_config(
                        aws_config::timeout::TimeoutConfig::builder()
                            .operation_attempt_timeout(Duration::from_secs(30))
                            .build(),
                    );
                if let Some(region) = &self.config.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                Client::new(&loader.load().await)
            })
            .await
    }

    /// Waits for a launch token, so that a large top-up does not trip API throttling.
    async fn wait_for_launch_slot(&self) {
        loop {
            let wait = self.launches.lock().await.take(now_ms());
            match wait {
                Ok(()) => return,
                Err(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            }
        }
    }

    fn record(&self, instance: &Instance) -> Option<InstanceRecord> {
        let id = InstanceId::parse(instance.instance_id()?).ok()?;
        let tags: BTreeMap<String, String> = instance
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                ))
            })
            .collect();
        let state = match instance.state().and_then(|s| s.name()) {
            Some(InstanceStateName::Pending) => ProviderState::Pending,
            Some(InstanceStateName::Running) => ProviderState::Running,
            _ => ProviderState::Stopped,
        };
        let port = tags
            .get(TAG_PURPOSE)
            .and_then(|p| self.ports.get(p))
            .copied()
            .unwrap_or(8787);
        Some(InstanceRecord {
            address: self.address(instance, port),
            launched_at_ms: instance
                .launch_time()
                .and_then(|t| t.to_millis().ok())
                .map(|ms| ms.max(0) as u64)
                .unwrap_or_else(now_ms),
            key_name: instance.key_name().map(str::to_owned),
            id,
            state,
            tags,
        })
    }

    /// The address the proxy uses, from the template and the original's host rewrite.
    fn address(&self, instance: &Instance, port: u16) -> Option<String> {
        let fields = [
            ("{private_ip}", instance.private_ip_address()),
            ("{private_dns}", instance.private_dns_name()),
            ("{public_ip}", instance.public_ip_address()),
            ("{public_dns}", instance.public_dns_name()),
        ];
        let mut address = self
            .config
            .address_template
            .replace("{port}", &port.to_string());
        for (placeholder, value) in fields {
            if address.contains(placeholder) {
                let value = value.filter(|v| !v.is_empty())?;
                address = address.replace(placeholder, value);
            }
        }
        if let (Some(from), Some(to)) = (
            &self.config.route_to_replace,
            &self.config.string_to_replace,
        ) {
            address = address.replace(from.as_str(), to);
        }
        Some(address)
    }

    fn tag(key: &str, value: &str) -> Tag {
        Tag::builder().key(key).value(value).build()
    }
}

/// An SDK error in words that say what to fix.
fn explain<E>(what: &str, err: SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    let hint = match code.as_str() {
        c if c.starts_with("InvalidAMIID") => " (check IMAGE_ID: the AMI must exist in this region and account)",
        "InvalidKeyPair.NotFound" => " (check KEY_NAME: the key pair must exist in this region)",
        c if c.starts_with("InvalidGroup") => " (check SECURITY_GROUP: the group ids must exist in this VPC)",
        "InvalidParameterValue" if message.contains("iamInstanceProfile") => {
            " (check INSTANCE_PROFILE: the instance profile must exist)"
        }
        "UnauthorizedOperation" | "AccessDenied" => {
            " (the pool's IAM role lacks a permission: see deploy/iam-policy.json)"
        }
        "InsufficientInstanceCapacity" | "InstanceLimitExceeded" | "VcpuLimitExceeded" => {
            " (AWS has no capacity or quota for IMAGE_TYPE here now: it is retried with backoff; consider another instance type or subnet)"
        }
        "RequestLimitExceeded" => " (EC2 API throttling: lower provider.ec2.launch_rate_per_second)",
        _ => "",
    };
    if code.is_empty() {
        format!("{what}: {}", DisplayErrorContext(&err))
    } else {
        format!("{what}: {code}: {message}{hint}")
    }
}

/// Errors worth retrying with the same client token.
fn is_transient<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
        SdkError::ServiceError(_) => matches!(
            err.code(),
            Some(
                "InsufficientInstanceCapacity"
                    | "RequestLimitExceeded"
                    | "InternalError"
                    | "Unavailable"
            )
        ),
        _ => false,
    }
}

#[async_trait]
impl Provider for Ec2Provider {
    fn kind(&self) -> &'static str {
        "ec2"
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<InstanceRecord, ProviderError> {
        let fail = |reason: String| ProviderError::Launch {
            purpose: spec.purpose.clone(),
            reason,
        };
        let user_data = self.config.user_data.get(&spec.purpose).ok_or_else(|| {
            fail(format!(
                "no user data is configured for purpose `{}`",
                spec.purpose
            ))
        })?;
        let mut tags = vec![
            Self::tag(TAG_PURPOSE, &spec.purpose),
            Self::tag(TAG_POOL, &self.pool_name),
            Self::tag(TAG_NAME, &format!("{}-{}", self.pool_name, spec.purpose)),
        ];
        tags.extend(spec.tags.iter().map(|(k, v)| Self::tag(k, v)));
        // One token for every attempt of this launch: EC2 makes at most one instance of it.
        let client_token = format!("{}-{:016x}", self.pool_name, rand::random::<u64>());
        let (image_id, instance_type) =
            self.machines
                .get(&spec.purpose)
                .cloned()
                .unwrap_or_else(|| {
                    (
                        self.config.image_id.clone(),
                        self.config.instance_type.clone(),
                    )
                });
        let mut request = self
            .client()
            .await
            .run_instances()
            .image_id(&image_id)
            .instance_type(InstanceType::from(instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(&client_token)
            .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags))
                    .build(),
            )
            .set_key_name(self.config.key_name.clone())
            .set_subnet_id(self.config.subnet_id.clone());
        if !self.config.security_group_ids.is_empty() {
            request = request.set_security_group_ids(Some(self.config.security_group_ids.clone()));
        }
        if let Some(profile) = &self.config.instance_profile {
            let spec = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder()
                    .arn(profile)
                    .build()
            } else {
                IamInstanceProfileSpecification::builder()
                    .name(profile)
                    .build()
            };
            request = request.iam_instance_profile(spec);
        }
        let mut attempt = 0;
        let output = loop {
            attempt += 1;
            self.wait_for_launch_slot().await;
            match request.clone().send().await {
                Ok(output) => break output,
                Err(e) if attempt < LAUNCH_ATTEMPTS && is_transient(&e) => {
                    warn!(
                        "{}; retrying with the same client token",
                        explain("RunInstances", e)
                    );
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(e) => return Err(fail(explain("RunInstances", e))),
            }
        };
        let instance = output
            .instances()
            .first()
            .ok_or_else(|| fail("RunInstances answered without an instance".into()))?;
        let record = self.record(instance).ok_or_else(|| {
            fail("RunInstances answered with an instance without a valid id".into())
        })?;
        info!("launched {} ({}) from {image_id}", record.id, spec.purpose);
        Ok(record)
    }

    async fn list(&self) -> Result<Vec<InstanceRecord>, ProviderError> {
        let client = self.client().await;
        let filters = vec![
            Filter::builder()
                .name(format!("tag:{TAG_POOL}"))
                .values(&self.pool_name)
                .build(),
            // Everything not terminated: stopped ones too, so that the pool terminates them.
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    ["pending", "running", "stopping", "stopped"]
                        .map(String::from)
                        .to_vec(),
                ))
                .build(),
        ];
        let mut records = Vec::new();
        let mut next_token = None;
        loop {
            let page = client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .set_next_token(next_token)
                // Small pages, so that paging is exercised by any pool over 50 instances.
                .max_results(50)
                .send()
                .await
                .map_err(|e| ProviderError::Other(explain("DescribeInstances", e)))?;
            for reservation in page.reservations() {
                for instance in reservation.instances() {
                    match self.record(instance) {
                        Some(record) => records.push(record),
                        None => warn!(
                            "ignoring an instance without a valid id: {:?}",
                            instance.instance_id()
                        ),
                    }
                }
            }
            next_token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if next_token.is_none() {
                return Ok(records);
            }
        }
    }

    async fn set_tags(
        &self,
        id: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), ProviderError> {
        self.client()
            .await
            .create_tags()
            .resources(id.as_str())
            .set_tags(Some(tags.iter().map(|(k, v)| Self::tag(k, v)).collect()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                if e.code() == Some("InvalidInstanceID.NotFound") {
                    ProviderError::NotFound(id.clone())
                } else {
                    ProviderError::Other(explain("CreateTags", e))
                }
            })
    }

    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError> {
        match self
            .client()
            .await
            .terminate_instances()
            .instance_ids(id.as_str())
            .send()
            .await
        {
            Ok(_) => {
                info!("terminated {id}");
                Ok(())
            }
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Ok(()),
            Err(e) => Err(ProviderError::Other(explain("TerminateInstances", e))),
        }
    }
}
