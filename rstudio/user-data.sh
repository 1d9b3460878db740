#!/bin/bash
# User data of an rstudio-pool EC2 workspace: runs once, as root, at first boot.
# Installs docker, signs in to the registry, and runs the purpose's image so that a reboot
# brings it back. What the AMI already has is skipped: on an AMI baked by rstudio/bake.sh
# (docker and the image on it) nothing is installed, signed in to or pulled. Works on Amazon
# Linux 2023 (dnf), Amazon Linux 2 (yum) and Ubuntu 22.04 and 24.04 (apt-get). Rendered by
# rstudio-pool: {{image}}, {{port}}, {{container_port}}, {{registry}}, {{region}},
# {{docker_args}}, {{container_command}} are filled in; the result must stay under 16 KB.
# The container command may use ${INSTANCE_ID} (JupyterLab's base URL).
set -euxo pipefail

# Installs packages with this distribution's package manager.
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

# An image already present (baked into the AMI) is used as it is: no sign-in, no pull.
if docker image inspect "{{image}}" >/dev/null 2>&1; then PULL=no; else PULL=yes; fi

REGISTRY="{{registry}}"
if [ "$PULL" = yes ] && [ -n "$REGISTRY" ]; then
  # The pull signs in with the instance role (IMDSv2; the hop limit of 1 keeps the role out
  # of the container's reach). An AWS CLI on the image (Amazon Linux has one) signs in
  # directly; elsewhere Amazon's ECR credential helper does, which every supported
  # distribution packages, while Ubuntu 24.04 no longer packages the AWS CLI.
  if command -v aws >/dev/null 2>&1; then
    aws ecr get-login-password --region "{{region}}" \
      | docker login --username AWS --password-stdin "$REGISTRY"
  else
    command -v docker-credential-ecr-login >/dev/null 2>&1 \
      || install_packages amazon-ecr-credential-helper
    export DOCKER_CONFIG="${DOCKER_CONFIG:-/root/.docker}"
    mkdir -p "$DOCKER_CONFIG"
    printf '{"credHelpers": {"%s": "ecr-login"}}\n' "$REGISTRY" >"$DOCKER_CONFIG/config.json"
  fi
fi

# The instance's own id, from IMDSv2 (the hop limit of 1 keeps it out of the container).
IMDS_TOKEN=$(curl -sS -X PUT http://169.254.169.254/latest/api/token \
  -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
INSTANCE_ID=$(curl -sS -H "X-aws-ec2-metadata-token: $IMDS_TOKEN" \
  http://169.254.169.254/latest/meta-data/instance-id)
export INSTANCE_ID

if [ "$PULL" = yes ]; then
  docker pull "{{image}}"
fi
docker run -d --name workspace --restart unless-stopped \
  -p {{port}}:{{container_port}} {{docker_args}} "{{image}}" {{container_command}}
