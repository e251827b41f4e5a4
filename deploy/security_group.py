"""The cluster's security group, created before `ray up` so that SSH is open to your network only.

When Ray creates the group named in cluster.yaml itself, it adds SSH (22) from 0.0.0.0/0 besides
the rules of `provider.security_group.IpPermissions`; a group that already has rules it uses as it
is. So make the group first, with exactly two kinds of rule: all traffic between the cluster's
nodes, and cluster.yaml's IpPermissions (SSH from the CIDR you put there):

    pip install boto3 pyyaml
    python deploy/security_group.py create       # reads ./cluster.yaml; once per region and VPC

It uses the region's default VPC (`--vpc-id` for another one; then give every node_config
`SubnetIds` in that VPC, so `ray up` picks the same). Rerun on an existing group, it removes a
rule that lets SSH in from anywhere and adds yours.

`check` runs on the head (cluster.yaml's head_setup_commands): `ray up` stops with an error when
a group of the cluster's nodes lets SSH in from anywhere, e.g. because Ray made the group.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

import yaml

PLACEHOLDER = "REPLACE_WITH_YOUR_CIDR"
FIELD = "provider.security_group.IpPermissions"


class SetupError(Exception):
    """A one-line problem with cluster.yaml or the group (exit status 2)."""


def _ranges(perm: dict) -> list[str]:
    return [r.get("CidrIp", "") for r in perm.get("IpRanges", [])] + [
        r.get("CidrIpv6", "") for r in perm.get("Ipv6Ranges", [])
    ]


def _covers_ssh(perm: dict) -> bool:
    if str(perm.get("IpProtocol")) == "-1":  # all protocols, all ports
        return True
    if str(perm.get("IpProtocol")) not in ("tcp", "6"):
        return False
    return int(perm.get("FromPort", -1)) <= 22 <= int(perm.get("ToPort", -1))


def _anywhere(cidr: str) -> bool:
    try:
        return ipaddress.ip_network(cidr, strict=False).prefixlen == 0
    except ValueError:
        return False


def open_to_anywhere(perms: list[dict]) -> list[dict]:
    """The parts of EC2 `perms` (IpPermissions) that let SSH in from the whole internet, in the
    form `revoke_security_group_ingress` takes."""
    out = []
    for p in perms:
        if not _covers_ssh(p):
            continue
        v4 = [r for r in p.get("IpRanges", []) if _anywhere(r.get("CidrIp", ""))]
        v6 = [r for r in p.get("Ipv6Ranges", []) if _anywhere(r.get("CidrIpv6", ""))]
        if v4 or v6:
            part = {k: p[k] for k in ("IpProtocol", "FromPort", "ToPort") if k in p}
            ranges = {"IpRanges": v4, "Ipv6Ranges": v6}
            out.append({**part, **{k: v for k, v in ranges.items() if v}})
    return out


def ssh_rules(cluster: dict, where: str = "cluster.yaml") -> list[dict]:
    """cluster.yaml's ingress rules, refused unless each names a real CIDR narrower than the whole
    internet (the placeholder must have been replaced)."""
    perms = ((cluster.get("provider") or {}).get("security_group") or {}).get("IpPermissions")
    if not perms:
        raise SetupError(f"{where}: {FIELD}: add the rule for SSH (22) from your network")
    for perm in perms:
        cidrs = _ranges(perm)
        if not cidrs:
            raise SetupError(f"{where}: {FIELD}: every rule needs IpRanges with your CIDR")
        for cidr in cidrs:
            if cidr == PLACEHOLDER:
                raise SetupError(
                    f"{where}: {FIELD}: replace {PLACEHOLDER} with the network allowed to SSH "
                    "in, e.g. your address: $(curl -s https://checkip.amazonaws.com)/32"
                )
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise SetupError(f"{where}: {FIELD}: {cidr!r} is not a CIDR") from None
            if net.prefixlen == 0:
                raise SetupError(f"{where}: {FIELD}: {cidr} opens the nodes to the whole internet")
    return perms


def _load(path: str) -> dict:
    try:
        with open(os.path.expanduser(path)) as f:
            return yaml.safe_load(f) or {}
    except OSError as e:
        raise SetupError(f"{path}: cannot read it ({e.strerror})") from None


def create(cluster_path: str, vpc_id: str | None = None) -> str:
    """Create (or repair) the group of cluster.yaml; returns a one-line summary."""
    cluster = _load(cluster_path)
    perms = ssh_rules(cluster, cluster_path)  # before any AWS call
    import boto3
    from botocore.exceptions import ClientError

    region = cluster["provider"]["region"]
    name = cluster["provider"]["security_group"]["GroupName"]
    ec2 = boto3.client("ec2", region_name=region)
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise SetupError(f"{region}: no default VPC; pass --vpc-id")
        vpc_id = vpcs[0]["VpcId"]
    filters = [{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    found = ec2.describe_security_groups(Filters=filters)["SecurityGroups"]
    if found:
        group_id = found[0]["GroupId"]
        bad = open_to_anywhere(found[0]["IpPermissions"])
        if bad:
            ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=bad)
    else:
        group_id = ec2.create_security_group(
            GroupName=name, Description="puma-ray cluster nodes", VpcId=vpc_id
        )["GroupId"]
    internal = {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]}
    for perm in [internal, *perms]:
        try:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[perm])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
                raise
    cidrs = ", ".join(c for p in perms for c in _ranges(p))
    return f"{name} ({group_id}) in {vpc_id}: all traffic between its nodes; SSH from {cidrs}"


def check(bootstrap_path: str) -> list[str]:
    """Problems of the security groups of a launched cluster (its bootstrapped config)."""
    import boto3

    cluster = _load(bootstrap_path)
    ids = sorted(
        {
            g
            for t in cluster.get("available_node_types", {}).values()
            for g in t.get("node_config", {}).get("SecurityGroupIds", [])
        }
    )
    if not ids:
        return []
    ec2 = boto3.client("ec2", region_name=cluster["provider"]["region"])
    groups = ec2.describe_security_groups(GroupIds=ids)["SecurityGroups"]
    return [
        f"security group {g['GroupId']} ({g['GroupName']}) lets SSH in from "
        f"{', '.join(_ranges(bad))}: run `python deploy/security_group.py create` on your "
        "machine (it removes that rule), or set SecurityGroupIds yourself"
        for g in groups
        for bad in open_to_anywhere(g.get("IpPermissions", []))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="create or repair the group of cluster.yaml (your machine)")
    p.add_argument("--cluster", default="cluster.yaml")
    p.add_argument("--vpc-id", help="default: the region's default VPC")
    p = sub.add_parser("check", help="fail if the nodes' group allows SSH from anywhere (head)")
    p.add_argument("--bootstrap", default="~/ray_bootstrap_config.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            print(create(args.cluster, args.vpc_id))
            return 0
        problems = check(args.bootstrap)
    except SetupError as e:
        print(f"security_group.py: error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"security_group.py: error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
