//! The `ec2` provider: each instance is an EC2 VM whose user data installs docker and runs the
//! purpose's image. Instances are found by the pool's tag, so two pools in one account never
//! touch each other's instances, and everything the pool knows lives in their tags.
//!
//! **Architecture invariant:** this is the only module that knows AWS. Credentials, region and
//! endpoint come from aws-config's default chain (`AWS_REGION`/`REGION`, `AWS_ENDPOINT_URL`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HibernationOptionsRequest, HttpTokensState,
    IamInstanceProfileSpecification, Instance, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, InstanceType, ResourceType, Tag,
    TagSpecification, VolumeType,
};
use aws_sdk_ec2::Client;
use base64::Engine;
use log::{info, warn};
use tokio::sync::{Mutex, OnceCell};

use super::{
    Consistency, InstanceRecord, LaunchSpec, Provider, ProviderError, ProviderState, TAG_NAME,
    TAG_POOL, TAG_PURPOSE,
};
use crate::config::{Ec2Config, OnIdle, Purpose};
use crate::core::bucket::TokenBucket;
use crate::core::ids::InstanceId;
use crate::provider::process::now_ms;

/// How long one launch may take, every retry with its client token included. A launch that
/// has not answered by then is given up; if its answer was lost, the pool counts it as a
/// launch in doubt until its instance is listed or `LAUNCH_DEADLINE` plus the listing lag
/// has passed.
const LAUNCH_DEADLINE: Duration = Duration::from_secs(30);
/// EC2's largest page of `DescribeInstances`.
const PAGE_SIZE: i32 = 1000;
/// EC2 takes at most 200 values in one filter.
const FILTER_VALUES: usize = 200;

pub struct Ec2Provider {
    config: Ec2Config,
    pool_name: String,
    ports: BTreeMap<String, u16>,
    /// Per purpose: its own AMI and instance type, over the provider's.
    machines: BTreeMap<String, (String, String)>,
    /// Per purpose: whether its instances can hibernate, and its root volume, if set.
    disks: BTreeMap<String, (bool, Option<BlockDeviceMapping>)>,
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
            disks: purposes
                .iter()
                .map(|(n, p)| (n.clone(), (p.on_idle == OnIdle::Hibernate, root_volume(p))))
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
                let shared = loader.load().await;
                let config = aws_sdk_ec2::config::Builder::from(&shared)
                    .interceptor(CountThrottles)
                    .build();
                Client::from_conf(config)
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
            Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => {
                ProviderState::Terminated
            }
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
            client_token: instance
                .client_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
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

    /// Instances carrying this pool's tag.
    fn pool_filter(&self) -> Filter {
        Filter::builder()
            .name(format!("tag:{TAG_POOL}"))
            .values(&self.pool_name)
            .build()
    }

    /// Every instance matching `filters`, page by page.
    async fn describe(&self, filters: Vec<Filter>) -> Result<Vec<InstanceRecord>, ProviderError> {
        let client = self.client().await;
        let mut records = Vec::new();
        let mut next_token = None;
        loop {
            let page = client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .set_next_token(next_token)
                .max_results(PAGE_SIZE)
                .send()
                .await
                .map_err(|e| listing_error("DescribeInstances", e))?;
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
}

/// The root volume a purpose asks for: its size and encryption (hibernation keeps memory
/// there), or the AMI's own when it sets neither.
fn root_volume(purpose: &Purpose) -> Option<BlockDeviceMapping> {
    if purpose.root_volume_gb.is_none() && !purpose.root_volume_encrypted {
        return None;
    }
    let ebs = EbsBlockDevice::builder()
        .set_volume_size(purpose.root_volume_gb.map(|gb| gb as i32))
        .encrypted(purpose.root_volume_encrypted)
        .volume_type(VolumeType::Gp3)
        .delete_on_termination(true)
        .build();
    Some(
        BlockDeviceMapping::builder()
            .device_name(&purpose.root_device_name)
            .ebs(ebs)
            .build(),
    )
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
            " (AWS has no capacity or quota for IMAGE_TYPE here now: warm-up launches back off, and pause after repeated failures; consider another instance type or subnet)"
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

/// Whether EC2 may have carried out a call whose answer is this error: the call timed out,
/// the connection broke, the answer could not be read, or EC2 failed on its side.
fn outcome_unknown<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => matches!(
            err.code(),
            Some("InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable")
        ),
        _ => false,
    }
}

/// Errors worth trying again: throttling, capacity, and every error whose outcome is unknown.
fn is_transient<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    outcome_unknown(err) || matches!(err.code(), Some("RequestLimitExceeded" | "Throttling"))
}

/// A failed call on one instance as the pool reads it: unknown to EC2 (which, just after a
/// launch, says nothing about whether it exists), worth trying again, or a mistake to fix.
fn instance_error<E>(what: &str, id: &InstanceId, err: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if err.code() == Some("InvalidInstanceID.NotFound") {
        ProviderError::NotFound(id.clone())
    } else if is_transient(&err) {
        ProviderError::Unavailable(explain(what, err))
    } else {
        ProviderError::Other(explain(what, err))
    }
}

#[async_trait]
impl Provider for Ec2Provider {
    fn kind(&self) -> &'static str {
        "ec2"
    }

    fn consistency(&self) -> Consistency {
        Consistency {
            listing_lag: self.config.listing_lag,
            missing_grace: self.config.missing_grace,
        }
    }

    fn launch_deadline(&self) -> Duration {
        LAUNCH_DEADLINE
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<InstanceRecord, ProviderError> {
        let fail = |reason: String, in_doubt: bool| ProviderError::Launch {
            purpose: spec.purpose.clone(),
            reason,
            in_doubt,
        };
        let user_data = self.config.user_data.get(&spec.purpose).ok_or_else(|| {
            fail(
                format!("no user data is configured for purpose `{}`", spec.purpose),
                false,
            )
        })?;
        let mut tags = vec![
            Self::tag(TAG_PURPOSE, &spec.purpose),
            Self::tag(TAG_POOL, &self.pool_name),
            Self::tag(TAG_NAME, &format!("{}-{}", self.pool_name, spec.purpose)),
        ];
        tags.extend(spec.tags.iter().map(|(k, v)| Self::tag(k, v)));
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
            // One token for every attempt of this launch: EC2 makes at most one instance of it.
            .client_token(&spec.client_token)
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
        if let Some((hibernate, root)) = self.disks.get(&spec.purpose) {
            if *hibernate {
                request = request.hibernation_options(
                    HibernationOptionsRequest::builder()
                        .configured(true)
                        .build(),
                );
            }
            if let Some(root) = root {
                request = request.block_device_mappings(root.clone());
            }
        }
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
        // Retries reuse the token, so they make no second instance and take no launch slot.
        self.wait_for_launch_slot().await;
        let deadline = Instant::now() + LAUNCH_DEADLINE;
        let mut in_doubt = false;
        let mut attempt: u32 = 0;
        let output = loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let error = match tokio::time::timeout(left, request.clone().send()).await {
                Ok(Ok(output)) => break output,
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(fail(
                        format!(
                            "RunInstances did not answer within {} s",
                            LAUNCH_DEADLINE.as_secs()
                        ),
                        true,
                    ))
                }
            };
            in_doubt |= outcome_unknown(&error);
            let backoff = Duration::from_millis(250 * u64::from(attempt.min(8)));
            if !is_transient(&error) || Instant::now() + backoff >= deadline {
                return Err(fail(explain("RunInstances", error), in_doubt));
            }
            warn!(
                "{}; retrying with the same client token",
                explain("RunInstances", error)
            );
            tokio::time::sleep(backoff).await;
        };
        let instance = output
            .instances()
            .first()
            .ok_or_else(|| fail("RunInstances answered without an instance".into(), true))?;
        let record = self.record(instance).ok_or_else(|| {
            fail(
                "RunInstances answered with an instance without a valid id".into(),
                true,
            )
        })?;
        info!("launched {} ({}) from {image_id}", record.id, spec.purpose);
        Ok(record)
    }

    async fn list(&self) -> Result<Vec<InstanceRecord>, ProviderError> {
        self.describe(vec![
            self.pool_filter(),
            // Everything not terminated: stopped ones too, so that the pool terminates them.
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    ["pending", "running", "stopping", "stopped"]
                        .map(String::from)
                        .to_vec(),
                ))
                .build(),
        ])
        .await
    }

    async fn lookup(&self, ids: &[InstanceId]) -> Result<Vec<InstanceRecord>, ProviderError> {
        let mut records = Vec::new();
        // A filter, not `InstanceIds`: EC2 fails the whole call if one id is unknown to it.
        for chunk in ids.chunks(FILTER_VALUES) {
            let ids = Filter::builder()
                .name("instance-id")
                .set_values(Some(chunk.iter().map(|i| i.as_str().to_owned()).collect()))
                .build();
            records.extend(self.describe(vec![self.pool_filter(), ids]).await?);
        }
        Ok(records)
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
            .map_err(|e| instance_error("CreateTags", id, e))
    }

    async fn stop(&self, id: &InstanceId, hibernate: bool) -> Result<(), ProviderError> {
        self.client()
            .await
            .stop_instances()
            .instance_ids(id.as_str())
            .hibernate(hibernate)
            .send()
            .await
            .map_err(|e| instance_error("StopInstances", id, e))?;
        info!(
            "stopped {id}{}",
            if hibernate { " (hibernating)" } else { "" }
        );
        Ok(())
    }

    async fn start(&self, id: &InstanceId) -> Result<Option<InstanceRecord>, ProviderError> {
        self.client()
            .await
            .start_instances()
            .instance_ids(id.as_str())
            .send()
            .await
            .map_err(|e| instance_error("StartInstances", id, e))?;
        info!("started {id} again");
        // Its addresses (a public one changes) as EC2 says now; the listings catch up too.
        Ok(self
            .lookup(std::slice::from_ref(id))
            .await
            .ok()
            .and_then(|mut r| r.pop()))
    }

    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError> {
        self.client()
            .await
            .terminate_instances()
            .instance_ids(id.as_str())
            .send()
            .await
            .map_err(|e| instance_error("TerminateInstances", id, e))?;
        info!("terminated {id}");
        Ok(())
    }
}

/// A failed listing: worth trying again, or a mistake to fix.
fn listing_error<E>(what: &str, err: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if is_transient(&err) {
        ProviderError::Unavailable(explain(what, err))
    } else {
        ProviderError::Other(explain(what, err))
    }
}

/// Counts every attempt EC2 throttled (`RequestLimitExceeded`, HTTP 503 or 429 with a
/// throttling code), retried by the SDK or not, in
/// `rstudio_pool_provider_throttled_attempts_total`, by the pool's name of the operation.
#[derive(Debug)]
struct CountThrottles;

impl aws_sdk_ec2::config::Intercept for CountThrottles {
    fn name(&self) -> &'static str {
        "CountThrottles"
    }

    fn read_after_attempt(
        &self,
        context: &aws_sdk_ec2::config::interceptors::FinalizerInterceptorContextRef<'_>,
        _components: &aws_sdk_ec2::config::RuntimeComponents,
        cfg: &mut aws_sdk_ec2::config::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let status = context.response().map(|r| r.status().as_u16());
        if !matches!(status, Some(503 | 429 | 400)) {
            return Ok(());
        }
        let Some(Err(error)) = context.output_or_error() else {
            return Ok(());
        };
        if !super::metered::is_throttling(&format!("{error:?}")) {
            return Ok(());
        }
        let action = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map(|m| m.name())
            .unwrap_or_default();
        let operation = match action {
            "RunInstances" => "launch",
            "DescribeInstances" => "list",
            "CreateTags" => "set_tags",
            "StopInstances" => "stop",
            "StartInstances" => "start",
            "TerminateInstances" => "terminate",
            _ => "other",
        };
        crate::metrics::metrics()
            .provider_throttles
            .with_label_values(&[operation])
            .inc();
        Ok(())
    }
}
