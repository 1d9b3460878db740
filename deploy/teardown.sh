#!/bin/bash
# Tears down an rstudio-pool stack without leaving instances behind:
#   deploy/teardown.sh STACK_NAME [--keep-secrets]
# 1. the pool host's Auto Scaling group goes to zero, so no pool relaunches anything;
# 2. every instance tagged for the pool (running, paused, starting) is terminated, and waited
#    for: they hold the workspace security group and profile the stack deletes next;
# 3. the stack is deleted, and waited for;
# 4. the pool's secrets in SSM Parameter Store (/rstudio-pool/<pool>/...), which the host made
#    and the stack does not own, are deleted unless --keep-secrets.
# Users' work on paused instances goes with them: keep what you need first.
# Uses the AWS CLI with the caller's credentials and region (AWS_REGION or the profile's).
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

STACK=""
KEEP_SECRETS=no
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --keep-secrets) KEEP_SECRETS=yes ;;
    -*) echo "teardown: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) STACK="$arg" ;;
  esac
done
if [ -z "$STACK" ]; then
  usage >&2
  exit 2
fi

output() {
  aws cloudformation describe-stacks --stack-name "$STACK" \
    --query "Stacks[0].Outputs[?OutputKey=='$1'].OutputValue" --output text
}
POOL=$(output PoolName)
GROUP=$(output HostGroup)
if [ -z "$POOL" ] || [ "$POOL" = None ]; then
  echo "teardown: $STACK has no PoolName output: is it an rstudio-pool stack?" >&2
  exit 1
fi
echo "teardown: stack $STACK, pool $POOL, host group $GROUP" >&2

# 1. No host, so nothing launches while the instances go.
aws autoscaling update-auto-scaling-group --auto-scaling-group-name "$GROUP" \
  --min-size 0 --max-size 0 --desired-capacity 0
for _ in $(seq 1 120); do
  hosts=$(aws autoscaling describe-auto-scaling-groups --auto-scaling-group-names "$GROUP" \
    --query 'length(AutoScalingGroups[0].Instances)' --output text)
  [ "$hosts" = 0 ] && break
  sleep 5
done
if [ "$hosts" != 0 ]; then
  echo "teardown: the pool host did not stop within 10 minutes" >&2
  exit 1
fi

# 2. Every instance of the pool.
mapfile -t instances < <(aws ec2 describe-instances \
  --filters "Name=tag:rstudio-pool,Values=$POOL" \
  "Name=instance-state-name,Values=pending,running,stopping,stopped" \
  --query 'Reservations[].Instances[].InstanceId' --output text | tr '\t' '\n' | sed '/^$/d')
if [ "${#instances[@]}" -gt 0 ]; then
  echo "teardown: terminating ${#instances[@]} instance(s) of $POOL" >&2
  aws ec2 terminate-instances --instance-ids "${instances[@]}" >/dev/null
  aws ec2 wait instance-terminated --instance-ids "${instances[@]}"
fi

# 3. The stack.
aws cloudformation delete-stack --stack-name "$STACK"
aws cloudformation wait stack-delete-complete --stack-name "$STACK"

# 4. The secrets the host made.
if [ "$KEEP_SECRETS" = no ]; then
  for name in api-token auth-secrets; do
    aws ssm delete-parameter --name "/rstudio-pool/$POOL/$name" 2>/dev/null || true
  done
fi
echo "teardown: $STACK is gone, and no instance of $POOL is left" >&2
