"""cluster.yaml against the schema Ray ships, and the paper-scale configs against ours.

No cloud account is needed: `ray up` validates a config with `ray-schema.json` (jsonschema, a
core Ray dependency) before it talks to AWS, and these tests run the same check offline, plus
the checks of a misspelled key that prove the validation can fail at all.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from fractions import Fraction

import jsonschema
import pytest
import ray.autoscaler
import yaml

from puma_ray.config import load_config
from puma_ray.models import list_models, model_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(ROOT, "cluster.yaml")
CLUSTER_DOC = os.path.join(ROOT, "docs", "cluster.md")
DEPLOY = os.path.join(ROOT, "deploy")
CONFIGS = os.path.join(ROOT, "tune_configs")
# The configs this file owns, plus the embedded demo.
PAPER_CONFIGS = ("cifar10_edm1m.yaml", "cifar10_edm1m_l2.yaml", "cifar10_edm1m_sweep.yaml")


@pytest.fixture(scope="module")
def schema() -> dict:
    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as f:
        return json.load(f)


@pytest.fixture()
def cluster() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_matches_ray_schema(cluster, schema):
    jsonschema.validate(cluster, schema)


def test_cluster_yaml_passes_ray_up_validation(cluster):
    # What `ray up` itself runs before launching anything: the provider's defaults merged in,
    # then the schema plus semantic checks (head type defined, min_workers <= max_workers).
    # Private API (the same pattern as Ray's own tests/test_autoscaler_yaml.py).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def _rename_key(node: dict, path: list[str], new: str) -> None:
    for p in path[:-1]:
        node = node[p]
    node[new] = node.pop(path[-1])


@pytest.mark.parametrize(
    "path, typo",
    [
        (["max_workers"], "max_worker"),
        (["head_start_ray_commands"], "head_start_commands"),
        (["available_node_types", "gpu_1x", "min_workers"], "min_worker"),
        (["available_node_types", "gpu_8x", "resources"], "resource"),
        (["provider", "security_group", "IpPermissions"], "IpPermission"),
    ],
)
def test_misspelled_key_fails_validation(cluster, schema, path, typo):
    broken = copy.deepcopy(cluster)
    _rename_key(broken, path, typo)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        jsonschema.validate(broken, schema)


def test_head_type_must_exist(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster)
    broken["head_node_type"] = "haed"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_security_and_auth(cluster):
    """The properties docs/cluster.md promises: ingress only for SSH, token auth on every
    node, MLflow on the private address, the token shipped to every node."""
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in rules] == [("tcp", 22, 22)]
    head_start = " ".join(cluster["head_start_ray_commands"])
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start
    assert '--host "$HEAD_IP"' in head_start and "mlflow server --host 0.0.0.0" not in head_start
    assert "MLFLOW_TRACKING_URI" in cluster["head_start_ray_commands"][-1]
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0


def _security_group_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("security_group", f"{DEPLOY}/security_group.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ssh_is_open_only_to_a_cidr_the_user_sets(cluster):
    """No ingress rule lets SSH in from anywhere; the source is a placeholder that cluster.yaml
    and docs/cluster.md tell the user to replace, and the group tool refuses to run without it."""
    sg = _security_group_tool()
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert sg.open_to_anywhere(rules) == []
    cidrs = [r["CidrIp"] for rule in rules for r in rule["IpRanges"]]
    assert cidrs == [sg.PLACEHOLDER] and not any(rule.get("Ipv6Ranges") for rule in rules)
    with open(CLUSTER_YAML) as f:
        assert f"replace\n  # {sg.PLACEHOLDER} with your network" in f.read()
    with open(CLUSTER_DOC) as f:
        doc = f.read()
    assert sg.PLACEHOLDER in doc and "deploy/security_group.py create" in doc
    own = [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-1"}]}, *rules]
    assert sg.open_to_anywhere(own) == []  # the rules `create` gives the group
    with pytest.raises(sg.SetupError, match=sg.PLACEHOLDER):
        sg.ssh_rules(cluster)
    for bad in ("0.0.0.0/0", "::/0", "not-a-cidr"):
        broken = copy.deepcopy(cluster)
        broken["provider"]["security_group"]["IpPermissions"][0]["IpRanges"][0]["CidrIp"] = bad
        with pytest.raises(sg.SetupError, match="IpPermissions"):
            sg.ssh_rules(broken)
    filled = copy.deepcopy(cluster)
    filled["provider"]["security_group"]["IpPermissions"][0]["IpRanges"][0]["CidrIp"] = (
        "203.0.113.7/32"
    )
    assert sg.ssh_rules(filled) == filled["provider"]["security_group"]["IpPermissions"]
    # the head's setup runs the check, so a group open to the internet stops `ray up`
    assert any("security_group.py check" in c for c in cluster["head_setup_commands"])


def test_ray_adds_ssh_from_anywhere_to_a_group_it_creates(cluster):
    """Why the group is created before `ray up`: Ray's own rules for a new group (Ray's AWS
    module needs boto3, which `ray up` needs too but the tests do not)."""
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    sg = _security_group_tool()
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert sg.open_to_anywhere(_create_default_inbound_rules(["sg-1"], rules))


def test_security_group_tool_refuses_the_placeholder_before_calling_aws(tmp_path):
    """`create` on the shipped cluster.yaml: one line, status 2, no AWS call (nor boto3)."""
    result = subprocess.run(
        [sys.executable, f"{DEPLOY}/security_group.py", "create", "--cluster", CLUSTER_YAML],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "REPLACE_WITH_YOUR_CIDR" in result.stderr


def _statements(name: str) -> list[dict]:
    with open(os.path.join(DEPLOY, name)) as f:
        policy = json.load(f)
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def _as_list(value) -> list[str]:
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("name", ["head-iam-policy.json", "worker-iam-policy.json"])
def test_iam_policies_are_narrow(name):
    """No service-wide wildcard actions; `"Resource": "*"` only for EC2 Describe calls (they
    have no resource-level permissions); S3 only on the configured bucket."""
    for st in _statements(name):
        assert st["Effect"] == "Allow"
        actions, resources = _as_list(st["Action"]), _as_list(st["Resource"])
        assert not any("*" in a for a in actions), st
        if "*" in resources:
            assert all(a.startswith("ec2:Describe") for a in actions), st
        for a in actions:
            if a.startswith("s3:"):
                assert set(resources) <= {
                    "arn:aws:s3:::REPLACE_WITH_BUCKET",
                    "arn:aws:s3:::REPLACE_WITH_BUCKET/*",
                }, st


def test_head_policy_fits_cluster_yaml(cluster):
    """The head may pass only the workers' role, and change only this cluster's instances."""
    st = _statements("head-iam-policy.json")
    passes = [s for s in st if "iam:PassRole" in _as_list(s["Action"])]
    assert [s["Resource"] for s in passes] == [
        "arn:aws:iam::REPLACE_WITH_ACCOUNT_ID:role/puma-ray-worker"
    ]
    nodes = cluster["available_node_types"]
    profiles = {n: t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in nodes.items()}
    assert profiles.pop(cluster["head_node_type"]).endswith(":instance-profile/puma-ray-head")
    assert {p.rsplit("/", 1)[1] for p in profiles.values()} == {"puma-ray-worker"}
    region, name = cluster["provider"]["region"], cluster["cluster_name"]
    mutating = {"ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"}
    for s in st:
        if mutating & set(_as_list(s["Action"])):
            assert s["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": name}}
        if "ec2:RunInstances" in _as_list(s["Action"]):
            assert all(f":ec2:{region}:" in r for r in _as_list(s["Resource"]))
    with open(os.path.join(DEPLOY, "ec2-trust-policy.json")) as f:
        trust = json.load(f)["Statement"]
    assert trust[0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    with open(CLUSTER_DOC) as f:
        doc = f.read()
    assert "iam:PassRole" in doc and "no authentication" in doc


def test_cluster_commands_are_valid_shell(cluster):
    keys = ("setup_commands", "head_setup_commands", "head_start_ray_commands")
    keys += ("worker_start_ray_commands",)
    for key in keys:
        for cmd in cluster[key]:
            result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {cmd!r}: {result.stderr}"


# ----------------------------------------------------------------------------------------------
# tune_configs/


@pytest.mark.parametrize("name", ("demo.yaml", *PAPER_CONFIGS))
def test_config_loads(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    for model in (cfg.model, cfg.margin_model.model):
        assert model.arch in list_models()
        assert set(model.kwargs) <= set(model_options(model.arch))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_recipe(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    kinds = {s.type: s for s in cfg.data.sources}
    assert kinds["torchvision"].name == "cifar10" and kinds["torchvision"].download is False
    assert kinds["npz"].source == "synthetic"
    assert cfg.model.arch == "wrn28_10"
    for t in (cfg.training, cfg.margin_model.train):
        assert (t.objective, t.trades_beta, t.batch_size) == ("trades", 5.0, 512)
        assert (t.label_smoothing, t.ema_decay, t.real_fraction) == (0.1, 0.995, 0.3)
        eps = Fraction(t.attack.epsilon).limit_denominator(255)
        assert (t.attack.norm, eps) in (("linf", Fraction(8, 255)), ("l2", Fraction(128, 255)))
    assert cfg.ray.use_gpu and cfg.scoring.gpus_per_actor == 1
    # the published robust model of the same threat model ranks the samples
    zoo = cfg.margin_model.robustbench
    assert (zoo.name, zoo.download) == ("Wang2023Better_WRN-28-10", False)
    assert zoo.threat_model == {"linf": "Linf", "l2": "L2"}[cfg.training.attack.norm]


def _without(raw: dict, *paths: str) -> dict:
    out = copy.deepcopy(raw)
    for path in paths:
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node[p]
        node.pop(leaf)
    return out


def test_variants_differ_from_base_only_where_intended():
    """The l2 and sweep files are copies of the base config (YAML has no include), so they
    must not drift from it: only the name, the threat model and the sweep section differ."""
    dump = {n: load_config(os.path.join(CONFIGS, n)).model_dump(mode="json") for n in PAPER_CONFIGS}
    base, l2, sweep = (dump[n] for n in PAPER_CONFIGS)
    assert _without(sweep, "name", "sweep") == _without(base, "name", "sweep")
    threat = ("name", "tracking.experiment", "training.attack", "margin_model.train.attack")
    threat += ("margin_model.robustbench.threat_model",)  # the zoo model of the threat model
    assert _without(l2, *threat) == _without(base, *threat)
    assert set(sweep["sweep"]["space"]) == {"pruning.ratio", "pruning.eps_scale"}


def test_sweep_plan():
    from puma_ray.sweep import plan_sweep

    plan = plan_sweep(load_config(os.path.join(CONFIGS, "cifar10_edm1m_sweep.yaml")))
    assert plan.trials == 7 and plan.baseline_added  # 3 ratios x 2 eps scales + unpruned


def test_configs_fit_the_cluster_node_types(cluster):
    """A Ray Train worker or scoring actor that fits no node type waits forever (the
    autoscaler cannot help): check the configs' requests against cluster.yaml's types."""
    types = {
        name: t["resources"]
        for name, t in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    }
    for name in PAPER_CONFIGS:
        cfg = load_config(os.path.join(CONFIGS, name))
        # DDP ranks are packed on one node: the whole group must fit on a single node type
        fits = [
            n
            for n, r in types.items()
            if r.get("GPU", 0) >= cfg.ray.num_workers
            and r.get("CPU", 0) >= cfg.ray.num_workers * cfg.ray.cpus_per_worker
        ]
        assert fits == ["gpu_8x"], f"{name}: train workers fit {fits}"
        s = cfg.scoring
        scorer_fits = [
            n
            for n, r in types.items()
            if r.get("GPU", 0) >= s.gpus_per_actor and r.get("CPU", 0) >= s.cpus_per_actor
        ]
        assert "gpu_1x" in scorer_fits, f"{name}: a scoring actor fits {scorer_fits}"
        gpus_1x = types["gpu_1x"]["GPU"] * cluster["available_node_types"]["gpu_1x"]["max_workers"]
        assert s.pool_max <= gpus_1x
