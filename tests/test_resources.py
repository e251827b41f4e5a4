"""A request the cluster can never meet stops at once with one line (puma_ray.runtime), instead
of Ray waiting for it forever: the capacity counted (per node, plus the node types an
autoscaler may launch), on given node lists; then on the tests' real local Ray (4 CPUs, no
GPU), directly and through `puma-ray train --use-gpu`."""

import pytest

from puma_ray import runtime
from puma_ray.cli import main
from puma_ray.runtime import InfeasibleResources, check_feasible, infeasibility

LAPTOP = [{"CPU": 2.0, "memory": 8e9, "node:127.0.0.1": 1.0}]


def test_a_gpu_request_on_a_cpu_machine_names_the_request_and_what_exists():
    msg = infeasibility({"CPU": 10, "GPU": 1}, "train margin_model", 8, nodes=LAPTOP, node_types=[])
    assert msg.startswith(
        "train margin_model: needs 8 x {CPU: 10, GPU: 1}, which this Ray cluster can never "
        "provide: it has 1 node: 1 x {CPU: 2, GPU: 0}; it can launch no other nodes"
    )
    assert "\n" not in msg


def test_each_bundle_must_fit_on_one_node_and_the_count_is_summed_over_nodes():
    two = [{"CPU": 4.0}, {"CPU": 4.0}]
    assert infeasibility({"CPU": 4}, "x", 2, nodes=two, node_types=[]) is None
    # 8 CPUs in all, but no node holds 6 of them
    assert "never provide" in infeasibility({"CPU": 6}, "x", 1, nodes=two, node_types=[])
    # fractional CPUs: 0.5 x 16 fits in 8, not 17 of them
    assert infeasibility({"CPU": 0.5}, "x", 16, nodes=two, node_types=[]) is None
    assert "(room for 16)" in infeasibility({"CPU": 0.5}, "x", 17, nodes=two, node_types=[])
    # nothing asked (0 workers, 0 GPUs) is always possible
    assert infeasibility({"CPU": 1}, "x", 0, nodes=[], node_types=[]) is None
    assert infeasibility({"GPU": 0}, "x", 3, nodes=LAPTOP, node_types=[]) is None


def test_node_types_an_autoscaler_can_launch_count():
    gpu8 = {"name": "gpu_8x", "resources": {"CPU": 96, "GPU": 8}, "max_count": 2}
    request = ({"CPU": 10, "GPU": 1}, "train", 8)
    assert infeasibility(*request, nodes=LAPTOP, node_types=[gpu8]) is None
    assert "room for 16" in infeasibility(
        {"CPU": 10, "GPU": 1}, "train", 17, nodes=LAPTOP, node_types=[gpu8]
    )
    unlimited = {**gpu8, "max_count": -1}
    assert (
        infeasibility({"CPU": 10, "GPU": 1}, "t", 10**6, nodes=[], node_types=[unlimited]) is None
    )
    gpu1 = {"name": "gpu_1x", "resources": {"CPU": 4, "GPU": 1}, "max_count": 8}
    msg = infeasibility({"CPU": 10, "GPU": 1}, "train", 1, nodes=LAPTOP, node_types=[gpu1])
    assert msg.endswith("; it can launch gpu_1x {CPU: 4, GPU: 1} x 8")


def test_node_types_of_a_ray_up_bootstrap_config(tmp_path):
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(
        "head_node_type: head\n"
        "available_node_types:\n"
        "  head: {resources: {CPU: 0}, max_workers: 0}\n"
        "  gpu_1x: {min_workers: 0, max_workers: 8, resources: {CPU: 4, GPU: 1}}\n"
        "  off: {max_workers: 0, resources: {CPU: 64}}\n"
    )
    types = runtime._bootstrap_node_types(str(path))
    assert types == [{"name": "gpu_1x", "resources": {"CPU": 4, "GPU": 1}, "max_count": 8}]
    # a type whose resources Ray would detect at launch: nothing can be concluded
    path.write_text("available_node_types:\n  big: {max_workers: 2, node_config: {}}\n")
    assert runtime._bootstrap_node_types(str(path)) is None
    assert runtime._bootstrap_node_types(str(tmp_path / "absent.yaml")) == []


def test_the_check_can_be_skipped(monkeypatch):
    monkeypatch.setenv(runtime.SKIP_ENV, "1")
    assert infeasibility({"GPU": 1}, "x", nodes=LAPTOP, node_types=[]) is None


@pytest.mark.ray
def test_gpus_on_this_machine_fail_in_one_line(ray_local):
    with pytest.raises(InfeasibleResources) as info:
        check_feasible({"CPU": 1, "GPU": 1}, "train demo", 1, hint="set ray.use_gpu false")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("train demo: needs {CPU: 1, GPU: 1}, which this Ray cluster")
    assert "1 node: 1 x {CPU: 4, GPU: 0}" in msg and msg.endswith("; set ray.use_gpu false")
    check_feasible({"CPU": 1}, "fits", 4)  # the fixture's 4 logical CPUs
    with pytest.raises(InfeasibleResources, match=r"needs 5 x \{CPU: 1\}.*room for 4"):
        check_feasible({"CPU": 1}, "too many", 5)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_with_gpus_on_this_machine_stops_before_anything_hangs(ray_local, tmp_path, capsys):
    sets = [
        "data.sources=[{type: builtin, real_train: 48, real_test: 16, synthetic: 48}]",
        "data.validation=8",
        "margin_model.train.batch_size=32",
        "ray.num_workers=1",
        "ray.cpus_per_worker=1",
        "tracking.tracking_uri=none",
    ]
    args = ["--run-dir", str(tmp_path / "run"), *[x for s in sets for x in ("--set", s)]]
    assert main(["ingest", "--no-parallel", *args]) == 0
    capsys.readouterr()
    assert main(["train", "--dataset", "full", "--use-gpu", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "puma-ray train: error: train margin_model (ray.num_workers workers): needs "
        "{CPU: 1, GPU: 1}, which this Ray cluster can never provide"
    )
    assert not (tmp_path / "run" / "margin_model" / "model.pt").exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_run_checks_every_stage_before_the_first_one_runs(ray_local, tmp_path, capsys):
    """`puma-ray run --use-gpu` on a machine without GPUs: refused before ingest writes a row
    (scoring asks for a GPU per actor, training for one per worker)."""
    sets = [
        "data.sources=[{type: builtin, real_train: 48, real_test: 16, synthetic: 48}]",
        "data.validation=8",
        "ray.num_workers=1",
        "ray.cpus_per_worker=1",
        "tracking.tracking_uri=none",
    ]
    run_dir = tmp_path / "run"
    argv = ["run", "--use-gpu", "--run-dir", str(run_dir), *[x for s in sets for x in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which this Ray cluster can never provide" in err[0], err
    assert err[0].startswith("puma-ray run: error: [score]"), err
    assert not (run_dir / "data").exists()
