"""Safe on real data: what a command may clear, what `--force` redoes, which input changes a rerun
notices, the run-dir lock, and temp files a killed run leaves behind. Real components only: the
CLI's `main`, a real local Ray, real Parquet and real lock files held by real processes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from tiny_pipeline import TINY_STAGES

from puma_ray.cli import main
from puma_ray.config import load_config
from puma_ray.errors import ConfigError
from puma_ray.pipeline import run_pipeline

LOCK_NAME = ".puma-ray.lock"

SETS = ["name=safety", *TINY_STAGES, "tracking.tracking_uri=none"]
# prune without scores (random strategy, no epsilon rule): no Ray, no model
RANDOM_PRUNE = ["pruning.strategy=random", "pruning.eps_rule=none"]


def _args(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _json(*parts: str) -> dict:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _margin_checkpoint(path: str, seed: int) -> None:
    """A randomly initialised small CNN: a valid margin model without training one."""
    import torch

    from puma_ray.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(path, create_model("small_cnn", num_classes=10), image_shape=(32, 32, 3))


def _rewrite_keeping_mtime(path: str, write) -> None:
    """Rewrite a file at the same path with new bytes but its old mtime: only its content (and
    the ctime / inode the filesystem keeps) says it changed."""
    before = os.stat(path)
    write()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns


def _run_until(cfg, run_dir: str, stop: str) -> list[str]:
    """Run the pipeline in this process and interrupt it as stage `stop` starts."""
    logs: list[str] = []

    def log(msg: str) -> None:
        logs.append(msg)
        if msg == f"[{stop}] running":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, run_dir, log=log)
    return logs


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, ray_local):
    """One finished tiny pipeline (a given, untrained margin model: no margin training)."""
    tmp = tmp_path_factory.mktemp("safety")
    ckpt = str(tmp / "margin.pt")
    _margin_checkpoint(ckpt, 0)
    sets = [*SETS, f"margin_model.checkpoint={ckpt}"]
    run_dir = str(tmp / "run")
    assert main(["run", "--run-dir", run_dir, *_args(*sets)]) == 0
    return run_dir, sets


def _copy(base_run, tmp_path) -> tuple[str, list[str]]:
    """A private copy of the finished run (nothing in it names its own path, so it is up to
    date as it is)."""
    run_dir, sets = base_run
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    return copy, sets


# ----------------------------------------------------------------------------------------------
# 1. A command clears only a directory holding its own manifest or marker.


def test_prune_out_dir_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main(["ingest", "--run-dir", run_dir, "--no-parallel", *_args(*SETS)]) == 0
    theirs = tmp_path / "thesis"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "thesis.txt").write_text("four years of work")
    (theirs / "sub" / "y").write_text("y")
    prune = ["prune", "--run-dir", run_dir, "--no-parallel", *_args(*SETS, *RANDOM_PRUNE)]
    capsys.readouterr()

    assert main([*prune, "--out-dir", str(theirs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{theirs}: not empty and not written by puma-ray (no manifest or marker)" in err[0]
    assert (theirs / "thesis.txt").read_text() == "four years of work"
    assert (theirs / "sub" / "y").read_text() == "y"
    assert sorted(p.name for p in theirs.rglob("*")) == ["sub", "thesis.txt", "y"]

    # the run dir itself is not a kept set either
    before = sorted(os.listdir(run_dir))
    assert main([*prune, "--out-dir", run_dir]) == 2
    assert sorted(os.listdir(run_dir)) == before
    assert os.path.exists(os.path.join(run_dir, "data", "train", "dataset.json"))

    # a new folder is created with the marker, and is then ours to replace
    mine = tmp_path / "kept_elsewhere"
    assert main([*prune, "--out-dir", str(mine)]) == 0
    assert _json(str(mine), ".puma-ray-output")["kind"] == "kept"
    assert main([*prune, "--out-dir", str(mine), "--force"]) == 0
    assert _json(str(mine), "manifest.json")["strategy"] == "random"


def test_ingest_refuses_to_clear_a_data_folder_it_did_not_write(tmp_path, capsys):
    run_dir = tmp_path / "project"
    notes = run_dir / "data" / "train" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    assert main(["ingest", "--run-dir", str(run_dir), "--no-parallel", *_args(*SETS)]) == 2
    assert "not written by puma-ray" in capsys.readouterr().err
    assert notes.read_text() == "mine"
    assert os.listdir(notes.parent) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------
# 2. The config name cannot point the run dir elsewhere.


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "..", ".", "a/b"])
def test_config_name_must_be_one_plain_folder_name(name, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^<default>: name: must be a plain folder name"):
        load_config(None, [f"name={name}"])
    path = tmp_path / "cfg.yaml"
    path.write_text(f"name: '{name}'\n")
    with pytest.raises(ConfigError, match=rf"^{path}: name: must be a plain folder name"):
        load_config(str(path))
    assert main(["config", str(path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# 3. --force STAGE redoes that stage and every stage after it.


@pytest.mark.slow
@pytest.mark.ray
def test_force_redoes_the_stage_and_every_stage_after_it(base_run, tmp_path):
    run_dir, sets = _copy(base_run, tmp_path)
    model = os.path.join(run_dir, "train", "model.pt")
    kept = os.path.join(run_dir, "kept", "manifest.json")
    scores = os.path.join(run_dir, "scores", "manifest.json")

    before = {p: os.stat(p).st_mtime_ns for p in (model, kept, scores)}
    assert main(["run", "--run-dir", run_dir, "--force", "train", *_args(*sets)]) == 0
    report = _json(run_dir, "report.json")
    assert report["skipped"] == ["ingest", "margin_model", "score", "prune"]
    assert sorted(report["stage_seconds"]) == ["evaluate", "train"]
    assert os.stat(model).st_mtime_ns > before[model]  # retrained, not "up to date"
    assert _json(run_dir, "train", "summary.json")["resumed_from_epoch"] == 0
    assert os.stat(kept).st_mtime_ns == before[kept]
    assert os.stat(scores).st_mtime_ns == before[scores]

    before = {p: os.stat(p).st_mtime_ns for p in (model, kept, scores)}
    assert main(["run", "--run-dir", run_dir, "--force", "score", *_args(*sets)]) == 0
    report = _json(run_dir, "report.json")
    assert report["skipped"] == ["ingest", "margin_model"]
    assert _json(scores)["summary"]["rows_scored_now"] == 256  # rescored from scratch
    for path in (scores, kept, model):  # and prune and train redone, not found up to date
        assert os.stat(path).st_mtime_ns > before[path], path


# ----------------------------------------------------------------------------------------------
# 4. A rerun notices inputs replaced in place (same path, same size, same mtime).


@pytest.mark.ray
def test_npz_source_rewritten_in_place_is_ingested_again(ray_local, tmp_path):
    npz = str(tmp_path / "synthetic.npz")

    def write(seed: int) -> None:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
        np.savez(npz, image=images, label=rng.integers(0, 10, 64))

    write(0)
    sources = (
        "data.sources=[{type: builtin, real_train: 64, real_test: 64, synthetic: 0}, "
        f"{{type: npz, path: '{npz}'}}]"
    )
    cfg = load_config(None, [*SETS, sources])
    run_dir = str(tmp_path / "run")
    assert "[ingest] running" in _run_until(cfg, run_dir, "margin_model")
    first = _json(run_dir, "data", "train", "dataset.json")["fingerprint"]

    size = os.stat(npz).st_size
    _rewrite_keeping_mtime(npz, lambda: write(1))
    assert os.stat(npz).st_size == size  # same shapes: same size too (what ingest used to check)
    logs = _run_until(cfg, run_dir, "margin_model")
    assert "[ingest] running" in logs
    assert _json(run_dir, "data", "train", "dataset.json")["fingerprint"] != first

    # unchanged content: skipped again (the hash is cached by file stat, not recomputed)
    assert "[ingest] up to date, skipped" in _run_until(cfg, run_dir, "margin_model")


@pytest.mark.slow
@pytest.mark.ray
def test_margin_checkpoint_replaced_in_place_is_scored_again(ray_local, tmp_path):
    ckpt = str(tmp_path / "margin.pt")
    _margin_checkpoint(ckpt, 1)
    cfg = load_config(None, [*SETS, f"margin_model.checkpoint={ckpt}"])
    run_dir = str(tmp_path / "run")
    assert "[score] running" in _run_until(cfg, run_dir, "prune")
    first = _json(run_dir, "scores", "manifest.json")["state"]["margin_model_fingerprint"]

    _rewrite_keeping_mtime(ckpt, lambda: _margin_checkpoint(ckpt, 2))
    logs = _run_until(cfg, run_dir, "prune")
    assert "[ingest] up to date, skipped" in logs
    assert "[score] running" in logs
    manifest = _json(run_dir, "scores", "manifest.json")
    assert manifest["state"]["margin_model_fingerprint"] != first
    assert manifest["summary"]["rows_scored_now"] == 256


# ----------------------------------------------------------------------------------------------
# 5. One writer per run dir.

HOLDER = """
import sys, time
from puma_ray.locking import run_dir_lock
with run_dir_lock(sys.argv[1], "run", log=lambda m: None):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, run_dir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        for argv in (
            ["run"],
            ["prune", "--no-parallel", *_args(*RANDOM_PRUNE)],
            ["ingest", "--no-parallel"],
        ):
            # refused before Ray starts or anything is written
            assert main([*argv, "--run-dir", run_dir, *_args(*SETS)]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert f"locked by `puma-ray run` (pid {holder.pid} on {socket.gethostname()}" in err[0]
        assert os.listdir(run_dir) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def _stale_lock(run_dir) -> int:
    """A lock file left by a process of this host that no longer runs; returns its pid."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(run_dir, exist_ok=True)
    body = {"pid": dead.pid, "host": socket.gethostname(), "command": "run", "started": "then"}
    with open(os.path.join(run_dir, LOCK_NAME), "w") as f:
        json.dump(body, f)
    return dead.pid


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    from puma_ray.errors import RunDirLocked
    from puma_ray.locking import run_dir_lock

    run_dir = str(tmp_path / "run")
    lock = os.path.join(run_dir, LOCK_NAME)
    pid = _stale_lock(run_dir)
    logs: list[str] = []
    with run_dir_lock(run_dir, "prune", log=logs.append):
        held = _json(lock)
        assert (held["pid"], held["command"]) == (os.getpid(), "prune")
        with run_dir_lock(run_dir, "score", log=logs.append):  # reentrant in one process
            assert _json(lock)["token"] == held["token"]
    assert not os.path.exists(lock)
    assert len(logs) == 1 and f"pid {pid} is no longer running" in logs[0]

    # through the CLI: the command runs and says it took the lock over
    pid = _stale_lock(run_dir)
    capsys.readouterr()
    assert main(["ingest", "--run-dir", run_dir, "--no-parallel", *_args(*SETS)]) == 0
    assert f"taking over the stale lock of `puma-ray run` (pid {pid}" in capsys.readouterr().out
    assert not os.path.exists(lock)

    # a holder on another host cannot be checked: refused, naming it
    with open(lock, "w") as f:
        json.dump({"pid": 1, "host": "elsewhere", "command": "sweep", "started": "noon"}, f)
    with pytest.raises(RunDirLocked, match=r"locked by `puma-ray sweep` \(pid 1 on elsewhere"):
        with run_dir_lock(run_dir, "run"):
            pass


def test_object_store_lease_is_renewed_and_taken_over_only_after_expiry(tmp_path):
    """The lease code path (used for s3:// and gs://) on a local directory."""
    import time

    from puma_ray import locking
    from puma_ray.errors import RunDirLocked

    run_dir = str(tmp_path / "run")
    logs: list[str] = []
    first = locking._acquire_lease(run_dir, "run", logs.append, ttl=1.0, settle=0.05)
    time.sleep(1.5)  # longer than the lease: only renewal keeps it
    with pytest.raises(RunDirLocked, match=rf"pid {os.getpid()} .*lease runs until"):
        locking._acquire_lease(run_dir, "sweep", logs.append, ttl=1.0, settle=0.05)
    first.stop.set()  # the holder dies: nobody renews
    first.thread.join()
    time.sleep(1.1)
    second = locking._acquire_lease(run_dir, "sweep", logs.append, ttl=1.0, settle=0.05)
    assert any("taking over the expired lease" in m for m in logs)
    locking._release_lease(first)  # not its lease any more: left alone
    assert os.path.exists(os.path.join(run_dir, LOCK_NAME))
    locking._release_lease(second)
    assert not os.path.exists(os.path.join(run_dir, LOCK_NAME))


# ----------------------------------------------------------------------------------------------
# 13. Temp files a killed run left behind are swept by the next run (which holds the lock).


@pytest.mark.ray
def test_temp_files_of_a_killed_run_are_removed_by_the_next(base_run, tmp_path):
    run_dir, sets = _copy(base_run, tmp_path)
    strays = [
        ("kept", "x.tmp-deadbeef"),
        ("kept", ".part-00000.parquet.tmp-0badcafe"),
        ("scores", "manifest.json.tmp-01234567"),
        ("train", "model.pt.tmp-fedcba98"),
        (".", "pipeline.json.tmp-89abcdef"),
    ]
    kept = [
        ("kept", "notes.tmp-later"),  # not a name our writers make
        (".", "thesis.tmp-deadbeef"),  # the run dir holds more than the run's own files
    ]
    for parts in strays + kept:
        with open(os.path.join(run_dir, *parts), "w") as f:
            f.write("partial")
    assert main(["run", "--run-dir", run_dir, *_args(*sets)]) == 0
    assert _json(run_dir, "report.json")["stage_seconds"] == {}  # every stage up to date
    for parts in strays:
        assert not os.path.exists(os.path.join(run_dir, *parts)), parts
    for parts in kept:
        assert os.path.exists(os.path.join(run_dir, *parts)), parts
