#!/bin/bash
# User data of an rstudio-pool EC2 workspace: runs once, as root, at first boot.
# Installs docker, logs in to the registry, and runs the purpose's image so that a reboot
# brings it back. Rendered by rstudio-pool: {{image}}, {{port}}, {{container_port}},
# {{registry}}, {{region}}, {{docker_args}}, {{container_command}} are filled in; the result
# must stay under 16 KB. The container command may use ${INSTANCE_ID} (JupyterLab's base URL).
set -euxo pipefail

if ! command -v docker >/dev/null 2>&1; then
  if command -v dnf >/dev/null 2>&1; then
    dnf install -y docker
  elif command -v yum >/dev/null 2>&1; then
    yum install -y docker
  else
    apt-get update -y
    apt-get install -y docker.io
  fi
fi
systemctl enable --now docker

REGISTRY="{{registry}}"
if [ -n "$REGISTRY" ]; then
  # The instance role allows ECR pulls; IMDSv2 tokens are required (hop limit 1 keeps the
  # role out of the container's reach).
  if ! command -v aws >/dev/null 2>&1; then
    (command -v dnf >/dev/null && dnf install -y awscli) || (command -v yum >/dev/null && yum install -y awscli) || apt-get install -y awscli
  fi
  aws ecr get-login-password --region "{{region}}" | docker login --username AWS --password-stdin "$REGISTRY"
fi

# The instance's own id, from IMDSv2 (the hop limit of 1 keeps it out of the container).
IMDS_TOKEN=$(curl -sS -X PUT http://169.254.169.254/latest/api/token \
  -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
INSTANCE_ID=$(curl -sS -H "X-aws-ec2-metadata-token: $IMDS_TOKEN" \
  http://169.254.169.254/latest/meta-data/instance-id)
export INSTANCE_ID

docker pull "{{image}}"
docker run -d --name workspace --restart unless-stopped \
  -p {{port}}:{{container_port}} {{docker_args}} "{{image}}" {{container_command}}
