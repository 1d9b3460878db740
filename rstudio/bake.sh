#!/bin/bash
# Bakes a workspace AMI: docker installed and enabled, and the workspace image(s) already
# pulled, so that rstudio/user-data.sh installs, signs in and pulls nothing at launch.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: rstudio/bake.sh [options]

Bakes an AMI for rstudio-pool's ec2 provider with docker and the workspace images on it,
using the AWS CLI. A builder instance is launched from the base AMI; its user data installs
docker, signs in to ECR with the instance profile, pulls the images and powers off. The AMI
is made of the stopped builder, which is then terminated (on failure or Ctrl-C too). The AMI
id is printed on standard output; progress goes to standard error. Set the result as the
pool's IMAGE_ID (or a purpose's image_id).

The builder is tagged Name=rstudio-pool-bake and rstudio-pool-bake=<AMI name>, never with
the pool's `rstudio-pool` tag, so no pool adopts it.

Options (each has an environment variable; an option wins over it):
  --region REGION            REGION, else AWS_REGION or AWS_DEFAULT_REGION. Required.
  --image IMAGE              IMAGES (space-separated). An image to pre-pull; repeat for more.
                             Use the exact reference the pool runs (its purpose's `image`).
                             Default: ACCOUNT.dkr.ecr.REGION.amazonaws.com/rstudio:latest,
                             the rstudio purpose's default image.
  --account ACCOUNT          ACCOUNT. The account of the default image's registry.
  --base-ami AMI             BASE_AMI. An AMI id, or an SSM parameter path that names one.
                             Default: /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64
                             (the newest Amazon Linux 2023, x86_64).
  --instance-profile NAME    INSTANCE_PROFILE. Instance profile (name or ARN) of the builder;
                             it must be allowed to pull the images (e.g. the managed policy
                             AmazonEC2ContainerRegistryReadOnly). Needed for ECR images.
  --subnet SUBNET            SUBNET_ID. The builder's subnet: it needs a way to ECR (and to
                             the package repository). Default: the default VPC's.
  --security-group SG[,SG]   SECURITY_GROUP. Default: the VPC's default group. No inbound
                             rule is needed.
  --instance-type TYPE       BAKE_INSTANCE_TYPE. Default t3.medium (match the base AMI's
                             architecture).
  --volume-gb N              ROOT_VOLUME_GB. Root volume size of the builder, hence the
                             AMI's default. Default 20.
  --name NAME                AMI_NAME. Default rstudio-pool-workspace-<UTC date-time>.
                             Letters, digits, '.', '_' and '-', 3 to 128 characters.
  --timeout-minutes N        BAKE_TIMEOUT_MINUTES. For the builder to finish, and again for
                             the AMI to become available. Default 30.
  --print-user-data          Print the builder's user data and exit (no AWS call).
  -h, --help                 This text.
  BAKE_POLL_SECONDS          (environment only) seconds between state polls. Default 15.

Example:
  rstudio/bake.sh --region eu-west-1 --account 123456789012 \
    --instance-profile rstudio-workspace --subnet subnet-0abc --security-group sg-0abc
USAGE
}

say() { printf 'bake: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

region="${REGION:-${AWS_REGION:-${AWS_DEFAULT_REGION:-}}}"
account="${ACCOUNT:-}"
base_ami="${BASE_AMI:-/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64}"
instance_profile="${INSTANCE_PROFILE:-}"
subnet="${SUBNET_ID:-}"
security_groups="${SECURITY_GROUP:-}"
instance_type="${BAKE_INSTANCE_TYPE:-t3.medium}"
volume_gb="${ROOT_VOLUME_GB:-20}"
name="${AMI_NAME:-rstudio-pool-workspace-$(date -u +%Y%m%d-%H%M%S)}"
timeout_minutes="${BAKE_TIMEOUT_MINUTES:-30}"
poll_seconds="${BAKE_POLL_SECONDS:-15}"
print_user_data=false
images=()
read -r -a images <<<"${IMAGES:-}"
images_from_flags=()

need_value() {
  if [ "$#" -lt 2 ] || [ -z "$2" ]; then
    die "$1 needs a value (see --help)"
  fi
}
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --print-user-data)
      print_user_data=true
      shift
      continue
      ;;
    --region | --image | --account | --base-ami | --instance-profile | --subnet | \
      --security-group | --instance-type | --volume-gb | --name | --timeout-minutes)
      need_value "$@"
      ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  case "$1" in
    --region) region="$2" ;;
    --image) images_from_flags+=("$2") ;;
    --account) account="$2" ;;
    --base-ami) base_ami="$2" ;;
    --instance-profile) instance_profile="$2" ;;
    --subnet) subnet="$2" ;;
    --security-group) security_groups="$2" ;;
    --instance-type) instance_type="$2" ;;
    --volume-gb) volume_gb="$2" ;;
    --name) name="$2" ;;
    --timeout-minutes) timeout_minutes="$2" ;;
  esac
  shift 2
done
if [ "${#images_from_flags[@]}" -gt 0 ]; then
  images=("${images_from_flags[@]}")
fi

[ -n "$region" ] || die "no region: give --region or set REGION"
[[ $region =~ ^[a-z0-9-]+$ ]] || die "not a region: $region"
if [ "${#images[@]}" -eq 0 ]; then
  [ -n "$account" ] || die "no image: give --image, or --account (ACCOUNT) for the default image"
  images=("$account.dkr.ecr.$region.amazonaws.com/rstudio:latest")
fi
for image in "${images[@]}"; do
  [[ $image =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]] || die "not an image reference: $image"
done
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{2,127}$ ]] \
  || die "AMI name must be 3-128 letters, digits, '.', '_' or '-': $name"
for number in "$volume_gb" "$timeout_minutes" "$poll_seconds"; do
  [[ $number =~ ^[0-9]+$ ]] || die "not a whole number: $number"
done

# The builder's user data: runs once, as root, at its first boot. It ends by powering off
# (the builder is launched with instance-initiated-shutdown-behavior stop); on a failure it
# says so on the console, which this script watches, and stays up until terminated.
builder_user_data() {
  printf '#!/bin/bash\n'
  printf '# Builder of an rstudio-pool workspace AMI (rstudio/bake.sh).\n'
  printf 'IMAGES=('
  printf ' %q' "${images[@]}"
  printf ' )\n'
  cat <<'BUILDER'
# The marker rstudio/bake.sh looks for on the console; only printed on a failure.
report_failure() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "rstudio-pool-bake: FAILED (exit status $status)" | tee /dev/console
  fi
}
trap report_failure EXIT
set -euxo pipefail

install_packages() {
  if command -v dnf >/dev/null 2>&1; then
    dnf install -y "$@"
  elif command -v yum >/dev/null 2>&1; then
    yum install -y "$@"
  else
    apt-get update -y
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
  fi
}

if ! command -v docker >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    install_packages docker.io
  else
    install_packages docker
  fi
fi
systemctl enable --now docker

export DOCKER_CONFIG=/root/.docker
mkdir -p "$DOCKER_CONFIG"
for image in "${IMAGES[@]}"; do
  registry="${image%%/*}"
  case "$registry" in
    *.dkr.ecr.*.amazonaws.com)
      ecr_region="${registry#*.dkr.ecr.}"
      ecr_region="${ecr_region%.amazonaws.com}"
      if command -v aws >/dev/null 2>&1; then
        aws ecr get-login-password --region "$ecr_region" \
          | docker login --username AWS --password-stdin "$registry"
      else
        command -v docker-credential-ecr-login >/dev/null 2>&1 \
          || install_packages amazon-ecr-credential-helper
        printf '{"credHelpers": {"%s": "ecr-login"}}\n' "$registry" >"$DOCKER_CONFIG/config.json"
      fi
      ;;
  esac
  docker pull "$image"
done

# Nothing of the builder's stays in the AMI: no registry token, no cloud-init state (its user
# data included), no machine id (each instance makes its own at first boot).
rm -f "$DOCKER_CONFIG/config.json"
mkdir -p /var/lib/rstudio-pool
printf '%s\n' "${IMAGES[@]}" >/var/lib/rstudio-pool/baked-images
if command -v cloud-init >/dev/null 2>&1; then
  cloud-init clean --logs || true
fi
truncate -s 0 /etc/machine-id
sync
echo "rstudio-pool-bake: done" | tee /dev/console
shutdown -h now
BUILDER
}

if "$print_user_data"; then
  builder_user_data
  exit 0
fi

command -v aws >/dev/null 2>&1 || die "the AWS CLI (aws) is not installed"
if [ -z "$instance_profile" ]; then
  for image in "${images[@]}"; do
    case "${image%%/*}" in
      *.dkr.ecr.*.amazonaws.com)
        die "no instance profile: the builder could not pull $image (give --instance-profile)"
        ;;
    esac
  done
fi

builder=""
ami=""
work="$(mktemp -d)"
cleanup() {
  local status=$?
  if [ -n "$builder" ]; then
    say "terminating the builder $builder"
    aws ec2 terminate-instances --region "$region" --instance-ids "$builder" >/dev/null \
      || say "could not terminate the builder $builder: terminate it yourself"
  fi
  if [ "$status" -ne 0 ] && [ -n "$ami" ]; then
    say "the AMI $ami was requested but not seen available: deregister it if it is not wanted"
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

console_tail() {
  printf '%s\n' "${console:-}" | tail -n 30 >&2
}

if [[ $base_ami == /* ]]; then
  say "resolving $base_ami"
  base_ami="$(aws ssm get-parameter --region "$region" --name "$base_ami" \
    --query Parameter.Value --output text)"
fi
[[ $base_ami =~ ^ami-[0-9a-f]+$ ]] || die "not an AMI id: $base_ami"
root_device="$(aws ec2 describe-images --region "$region" --image-ids "$base_ami" \
  --query 'Images[0].RootDeviceName' --output text)"
[[ $root_device == /dev/* ]] || die "cannot find the root device of $base_ami"

builder_user_data >"$work/user-data.sh"
launch=(
  --region "$region"
  --image-id "$base_ami"
  --instance-type "$instance_type"
  --count 1
  --user-data "file://$work/user-data.sh"
  --metadata-options "HttpTokens=required,HttpEndpoint=enabled,HttpPutResponseHopLimit=1"
  --instance-initiated-shutdown-behavior stop
  --block-device-mappings "[{\"DeviceName\":\"$root_device\",\"Ebs\":{\"VolumeSize\":$volume_gb,\"VolumeType\":\"gp3\",\"DeleteOnTermination\":true}}]"
  --tag-specifications
  "ResourceType=instance,Tags=[{Key=Name,Value=rstudio-pool-bake},{Key=rstudio-pool-bake,Value=$name}]"
  "ResourceType=volume,Tags=[{Key=Name,Value=rstudio-pool-bake},{Key=rstudio-pool-bake,Value=$name}]"
)
if [ -n "$instance_profile" ]; then
  if [[ $instance_profile == arn:* ]]; then
    launch+=(--iam-instance-profile "Arn=$instance_profile")
  else
    launch+=(--iam-instance-profile "Name=$instance_profile")
  fi
fi
[ -z "$subnet" ] || launch+=(--subnet-id "$subnet")
if [ -n "$security_groups" ]; then
  IFS=', ' read -r -a groups <<<"$security_groups"
  launch+=(--security-group-ids "${groups[@]}")
fi

say "launching a builder from $base_ami ($instance_type) for: ${images[*]}"
builder="$(aws ec2 run-instances "${launch[@]}" --query 'Instances[0].InstanceId' --output text)"
[[ $builder =~ ^i-[0-9a-f]+$ ]] || die "run-instances answered no instance id: $builder"
say "builder $builder: installing docker and pulling; waiting for it to power off"

deadline=$((SECONDS + timeout_minutes * 60))
while :; do
  # A new instance may be unknown to the API for a moment: then poll again.
  state="$(aws ec2 describe-instances --region "$region" --instance-ids "$builder" \
    --query 'Reservations[0].Instances[0].State.Name' --output text 2>/dev/null)" \
    || state=unknown
  case "$state" in
    stopped) break ;;
    shutting-down | terminated) die "the builder $builder is $state before it finished" ;;
  esac
  console="$(aws ec2 get-console-output --region "$region" --instance-id "$builder" --latest \
    --query Output --output text 2>/dev/null)" || console=""
  if [[ $console == *"rstudio-pool-bake: FAILED"* ]]; then
    console_tail
    die "the builder's user data failed (its console output is above)"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    console_tail
    die "the builder $builder did not finish within $timeout_minutes minutes (state $state)"
  fi
  sleep "$poll_seconds"
done

description="rstudio-pool workspace (rstudio/bake.sh): docker, ${images[*]}"
say "builder stopped; creating the AMI $name"
ami="$(aws ec2 create-image --region "$region" --instance-id "$builder" --name "$name" \
  --description "${description:0:255}" \
  --tag-specifications \
  "ResourceType=image,Tags=[{Key=Name,Value=$name},{Key=rstudio-pool-bake,Value=$name}]" \
  "ResourceType=snapshot,Tags=[{Key=Name,Value=$name},{Key=rstudio-pool-bake,Value=$name}]" \
  --query ImageId --output text)"
[[ $ami =~ ^ami-[0-9a-f]+$ ]] || die "create-image answered no AMI id: $ami"
say "waiting for $ami to become available"

deadline=$((SECONDS + timeout_minutes * 60))
while :; do
  image_state="$(aws ec2 describe-images --region "$region" --image-ids "$ami" \
    --query 'Images[0].State' --output text 2>/dev/null)" || image_state=unknown
  case "$image_state" in
    available) break ;;
    failed | error | invalid | deregistered | disabled)
      die "the AMI $ami is $image_state"
      ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    die "the AMI $ami is not available after $timeout_minutes minutes (state $image_state)"
  fi
  sleep "$poll_seconds"
done

say "done: $ami (set IMAGE_ID=$ami)"
printf '%s\n' "$ami"
