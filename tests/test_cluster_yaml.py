"""Checks for cluster.yaml, the Ray cluster-launcher config.

The config goes through the same Ray code that `ray up` runs before it creates
anything on AWS: `prepare_config` (merge Ray's AWS defaults) and
`validate_config` (Ray's JSON schema). The security-group test also runs Ray's
AWS bootstrap step against moto's fake AWS, so it checks the inbound rules Ray
actually creates, not just the ones the yaml lists. Nothing contacts AWS.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard / jobs API, Ray client
WORLD = {"0.0.0.0/0", "::/0"}
ALL_PORTS = range(0, 65536)


@pytest.fixture(scope="module")
def raw_config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def config(raw_config) -> dict:
    """The config as `ray up` sees it: defaults merged in and schema-checked."""
    prepared = prepare_config(copy.deepcopy(raw_config))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict) -> dict:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def _start_command(commands: list[str]) -> str:
    matches = [cmd for cmd in commands if "ray start" in cmd]
    assert len(matches) == 1, commands
    return matches[0]


def _rule_ports(rule: dict) -> range:
    if str(rule.get("IpProtocol")) in ("-1", "all"):
        return ALL_PORTS
    start, end = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if start == -1 or end == -1:
        return ALL_PORTS
    return range(start, end + 1)


def _world_open_ports(rules: list[dict]) -> set[int]:
    """Every port that some rule opens to 0.0.0.0/0 or ::/0."""
    ports: set[int] = set()
    for rule in rules:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        if cidrs & WORLD:
            ports.update(_rule_ports(rule))
    return ports


# --- schema ---------------------------------------------------------------


def test_config_passes_rays_schema(config):
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert config["provider"]["cache_stopped_nodes"] is False
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["head_node_type"] in config["available_node_types"]


def _unknown_top_level_key(cfg):
    cfg["max_wokers"] = 4


def _max_workers_not_int(cfg):
    cfg["max_workers"] = "eight"


def _gpu_count_not_int(cfg):
    cfg["available_node_types"]["gpu_1x"]["resources"]["GPU"] = "1"


def _unknown_node_type_key(cfg):
    cfg["available_node_types"]["gpu_1x"]["min_worker"] = 0


def _unknown_security_group_key(cfg):
    cfg["provider"]["security_group"]["Ingress"] = []


def _node_type_without_resources(cfg):
    del cfg["available_node_types"]["gpu_4x"]["resources"]


@pytest.mark.parametrize(
    "break_config",
    [
        _unknown_top_level_key,
        _max_workers_not_int,
        _gpu_count_not_int,
        _unknown_node_type_key,
        _unknown_security_group_key,
        _node_type_without_resources,
    ],
)
def test_schema_rejects_broken_copies(raw_config, break_config):
    """Proves the validation above has teeth: broken copies must raise."""
    broken = copy.deepcopy(raw_config)
    break_config(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_min_workers_above_global_max_is_rejected(raw_config):
    broken = copy.deepcopy(raw_config)
    broken["available_node_types"]["gpu_1x"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(broken))


# --- node types -----------------------------------------------------------


def test_head_node_has_no_gpu(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU", 0) > 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0


def test_gpu_workers_autoscale_from_zero(config):
    gpu_types = {
        name: node_type
        for name, node_type in _worker_types(config).items()
        if node_type["resources"].get("GPU", 0) >= 1
    }
    assert {"gpu_1x", "gpu_4x"} <= gpu_types.keys()
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert 0 < node_type["max_workers"] <= config["max_workers"], name
        assert node_type["resources"].get("CPU", 0) >= 1, name
    assert gpu_types["gpu_1x"]["resources"] == {"CPU": 4, "GPU": 1}
    assert gpu_types["gpu_1x"]["node_config"]["InstanceType"] == "g5.xlarge"
    assert gpu_types["gpu_4x"]["resources"] == {"CPU": 48, "GPU": 4}
    assert gpu_types["gpu_4x"]["node_config"]["InstanceType"] == "g5.12xlarge"
    assert any(t["resources"]["GPU"] > 1 for t in gpu_types.values())


def test_nodes_use_an_ami_and_a_large_root_volume(config):
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", node_config["ImageId"]), name
        root = node_config["BlockDeviceMappings"][0]
        assert root["DeviceName"] == "/dev/sda1", name
        assert root["Ebs"]["VolumeSize"] >= 150, name


def test_gpu_workers_get_an_instance_profile_for_s3(config):
    # The launcher only gives the head an instance profile; without one,
    # trials on workers cannot read s3:// data or write s3:// storage.
    for name, node_type in _worker_types(config).items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name


# --- token authentication --------------------------------------------------


@pytest.mark.parametrize(
    "key", ["head_start_ray_commands", "worker_start_ray_commands"]
)
def test_token_auth_is_on_when_ray_starts(config, key):
    start = _start_command(config[key])
    assert re.search(r"\bRAY_AUTH_MODE=token\b.*\bray start\b", start), start


def test_token_file_is_mounted_from_outside_the_repo(config):
    # Ray reads ~/.ray/auth_token by default; `ray get-auth-token --generate`
    # writes the local one there.
    local = config["file_mounts"]["/home/ubuntu/.ray/auth_token"]
    assert local == "~/.ray/auth_token"
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_TOKEN=" not in text  # no literal token in the config


# --- security group -------------------------------------------------------


def test_declared_rules_open_no_ray_port(config):
    extra_rules = config["provider"]["security_group"]["IpPermissions"]
    world = _world_open_ports(extra_rules)
    assert not world & set(RAY_PORTS)
    assert world <= {22}
    # The launcher already adds SSH from 0.0.0.0/0; repeating it makes
    # AuthorizeSecurityGroupIngress fail with InvalidPermission.Duplicate.
    assert 22 not in world


def test_effective_rules_open_only_ssh_to_the_world(config):
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    rules = _create_default_inbound_rules(
        {"sg-cluster"}, config["provider"]["security_group"]["IpPermissions"]
    )
    assert _world_open_ports(rules) == {22}


def test_ray_up_bootstrap_creates_only_ssh_world_rule(config, monkeypatch, tmp_path):
    """Run Ray's AWS bootstrap (what `ray up` does next) against moto."""
    pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws

    monkeypatch.setenv("HOME", str(tmp_path))  # the launcher writes ~/.ssh/*.pem
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    region = config["provider"]["region"]

    with moto.mock_aws():
        # Pre-create the head's default instance profile so the launcher
        # skips its 15 s IAM propagation waits.
        iam = boto3.client("iam", region_name=region)
        iam.create_role(RoleName="ray-autoscaler-v1", AssumeRolePolicyDocument="{}")
        iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
        iam.add_role_to_instance_profile(
            InstanceProfileName="ray-autoscaler-v1", RoleName="ray-autoscaler-v1"
        )

        resolved = bootstrap_aws(copy.deepcopy(config))

        group_ids = {
            sg_id
            for node_type in resolved["available_node_types"].values()
            for sg_id in node_type["node_config"]["SecurityGroupIds"]
        }
        ec2 = boto3.client("ec2", region_name=region)
        groups = ec2.describe_security_groups(GroupIds=sorted(group_ids))
        groups = groups["SecurityGroups"]

    assert [g["GroupName"] for g in groups] == [
        config["provider"]["security_group"]["GroupName"]
    ]
    rules = groups[0]["IpPermissions"]
    assert _world_open_ports(rules) == {22}
    # Nodes still reach each other on every port through the group itself.
    assert any(
        pair["GroupId"] == groups[0]["GroupId"]
        for rule in rules
        for pair in rule.get("UserIdGroupPairs", [])
    )


# --- software -------------------------------------------------------------


def test_project_is_synced_and_installed_with_cluster_extra(config):
    assert config["file_mounts"]["/home/ubuntu/project"] == "."
    assert {".venv", ".git"} <= set(config["rsync_exclude"])
    assert any(p.rstrip("/") == "runs" for p in config["rsync_exclude"])
    install = re.compile(
        r"pip install (-e|--editable) [\"']?/home/ubuntu/project\[cluster\][\"']?"
    )
    assert any(install.search(cmd) for cmd in config["setup_commands"])
    # prepare_config merges setup_commands into both node kinds.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(cmd) for cmd in config[key]), key


def test_albumentations_update_check_is_disabled(config):
    assert any(
        "export NO_ALBUMENTATIONS_UPDATE=1" in cmd for cmd in config["setup_commands"]
    )
