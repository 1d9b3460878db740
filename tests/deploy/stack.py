"""Creates deploy/cloudformation.yaml as a stack in a moto server and prints, as one JSON
object, what the stack made as EC2, IAM, ELB, Auto Scaling and Route 53 report it.

Used by tests/deploy.rs: python stack.py <moto endpoint> <template> <pool name>.
Moto stands in for AWS: the network the stack expects (a VPC, two public and two private
subnets), a certificate and a hosted zone are made first, as an operator would have them.
"""

import ast
import base64
import json
import sys

import boto3
from cfnlint.decode import decode_str

endpoint, template_path, pool = sys.argv[1:4]
REGION = "us-east-1"


def client(service):
    return boto3.client(
        service,
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


ec2 = client("ec2")
vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
subnets = {}
for name, cidr, zone in [
    ("public-a", "10.20.0.0/24", "a"),
    ("public-b", "10.20.1.0/24", "b"),
    ("private-a", "10.20.10.0/24", "a"),
    ("private-b", "10.20.11.0/24", "b"),
]:
    subnets[name] = ec2.create_subnet(
        VpcId=vpc, CidrBlock=cidr, AvailabilityZone=REGION + zone
    )["Subnet"]["SubnetId"]
ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
certificate = client("acm").request_certificate(
    DomainName="rstudio.example.com",
    SubjectAlternativeNames=["*.rstudio.example.com"],
)["CertificateArn"]
zone = client("route53").create_hosted_zone(
    Name="example.com", CallerReference="rstudio-pool-test"
)["HostedZone"]["Id"].split("/")[-1]

parameters = {
    "PoolName": pool,
    "VpcId": vpc,
    "PublicSubnetIds": subnets["public-a"] + "," + subnets["public-b"],
    "PrivateSubnetIds": subnets["private-a"] + "," + subnets["private-b"],
    "CertificateArn": certificate,
    "DomainName": "rstudio.example.com",
    "HostedZoneId": zone,
    "BinaryS3Bucket": "releases-example",
    "BinaryS3Key": "rstudio-pool/v1/rstudio-pool-x86_64",
    "BinarySha256": "0" * 64,
    "RStudioImageId": ami,
    "JupyterImageId": ami,
    "MinFreeInstances": "1",
    "MaxInstances": "3",
}
cloudformation = client("cloudformation")
with open(template_path) as f:
    body = f.read()
cloudformation.create_stack(
    StackName="rstudio-pool-" + pool,
    TemplateBody=body,
    Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    Capabilities=["CAPABILITY_IAM"],
)
stack = cloudformation.describe_stacks(StackName="rstudio-pool-" + pool)["Stacks"][0]
resources = {
    r["LogicalResourceId"]: r
    for r in cloudformation.list_stack_resources(StackName="rstudio-pool-" + pool)[
        "StackResourceSummaries"
    ]
}


def physical(name):
    return resources[name]["PhysicalResourceId"]


groups = {}
for logical, r in resources.items():
    if r["ResourceType"] == "AWS::EC2::SecurityGroup":
        group = ec2.describe_security_groups(GroupIds=[r["PhysicalResourceId"]])[
            "SecurityGroups"
        ][0]
        groups[logical] = {
            "id": group["GroupId"],
            "ingress": group["IpPermissions"],
            "egress": group["IpPermissionsEgress"],
        }

iam = client("iam")


def role_policies(role_name):
    """Every policy document of a role: inline ones and attached managed ones."""
    documents = {}
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        documents[name] = iam.get_role_policy(RoleName=role_name, PolicyName=name)[
            "PolicyDocument"
        ]
    for attached in iam.list_attached_role_policies(RoleName=role_name)[
        "AttachedPolicies"
    ]:
        policy = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
        documents[attached["PolicyArn"]] = iam.get_policy_version(
            PolicyArn=attached["PolicyArn"], VersionId=policy["DefaultVersionId"]
        )["PolicyVersion"]["Document"]
    for name, document in documents.items():
        if isinstance(document, str):
            # Moto keeps a document made by CloudFormation as Python's text of it.
            try:
                documents[name] = json.loads(document)
            except json.JSONDecodeError:
                documents[name] = ast.literal_eval(document)
    return documents


profiles = {}
for logical in ["WorkspaceInstanceProfile", "HostInstanceProfile"]:
    profile = iam.get_instance_profile(InstanceProfileName=physical(logical))[
        "InstanceProfile"
    ]
    profiles[logical] = {
        "name": profile["InstanceProfileName"],
        "arn": profile["Arn"],
        "roles": [role["RoleName"] for role in profile["Roles"]],
    }
roles = {
    logical: {"name": physical(logical), "policies": role_policies(physical(logical))}
    for logical in ["WorkspaceRole", "HostRole"]
}

template_id = physical("HostLaunchTemplate")
version = ec2.describe_launch_template_versions(
    LaunchTemplateId=template_id, Versions=["$Latest"]
)["LaunchTemplateVersions"][0]["LaunchTemplateData"]
user_data = base64.b64decode(version.pop("UserData")).decode()

autoscaling = client("autoscaling")
group = autoscaling.describe_auto_scaling_groups(
    AutoScalingGroupNames=[physical("HostGroup")]
)["AutoScalingGroups"][0]

elb = client("elbv2")
balancers = {}
for logical in ["LoadBalancer", "ApiLoadBalancer"]:
    arn = physical(logical)
    lb = elb.describe_load_balancers(LoadBalancerArns=[arn])["LoadBalancers"][0]
    balancers[logical] = {
        "scheme": lb["Scheme"],
        "dns": lb["DNSName"],
        "subnets": sorted(z["SubnetId"] for z in lb["AvailabilityZones"]),
        "security_groups": lb.get("SecurityGroups", []),
        "attributes": {
            a["Key"]: a["Value"]
            for a in elb.describe_load_balancer_attributes(LoadBalancerArn=arn)[
                "Attributes"
            ]
        },
        "listeners": elb.describe_listeners(LoadBalancerArn=arn)["Listeners"],
    }
target_groups = {}
for logical in ["ProxyTargetGroup", "ApiTargetGroup"]:
    tg = elb.describe_target_groups(TargetGroupArns=[physical(logical)])["TargetGroups"][0]
    target_groups[logical] = {
        "arn": tg["TargetGroupArn"],
        "port": tg["Port"],
        "health_path": tg.get("HealthCheckPath"),
    }

records = client("route53").list_resource_record_sets(HostedZoneId=zone)[
    "ResourceRecordSets"
]

print(
    json.dumps(
        {
            "status": stack["StackStatus"],
            # The template as CloudFormation reads it (long-form intrinsics), for what moto
            # does not keep: security group egress and load balancer attributes.
            "template": decode_str(body)[0],
            "outputs": {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])},
            "parameters": parameters,
            "subnets": subnets,
            "resources": {k: v["ResourceType"] for k, v in resources.items()},
            "security_groups": groups,
            "profiles": profiles,
            "roles": roles,
            "launch_template": version,
            "user_data": user_data,
            "host_group": {
                "min": group["MinSize"],
                "max": group["MaxSize"],
                "desired": group["DesiredCapacity"],
                "subnets": sorted(group["VPCZoneIdentifier"].split(",")),
                "target_groups": sorted(group.get("TargetGroupARNs", [])),
                "health_check_type": group["HealthCheckType"],
                "launch_template": group.get("LaunchTemplate", {}),
            },
            "balancers": balancers,
            "target_groups": target_groups,
            "records": [{"name": r["Name"], "type": r["Type"]} for r in records],
        },
        default=str,
    )
)
