"""RobustBench zoo models as margin models, offline: a zoo architecture built by the robustbench
package with random weights, saved where robustbench's loader looks, loaded, fingerprinted,
scored and evaluated through puma_ray. The tests marked `ray` run the pipeline on it."""

import hashlib
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("robustbench") is None:  # not importorskip: see models/zoo.py
    pytest.skip("needs the zoo extra (robustbench)", allow_module_level=True)

from puma_ray.config import load_config  # noqa: E402
from puma_ray.errors import CheckpointError, ConfigError  # noqa: E402
from puma_ray.models import check_compatible, load_checkpoint, model_fingerprint  # noqa: E402
from puma_ray.models.zoo import (  # noqa: E402
    build_zoo_architecture,
    margin_model_source,
    resolve_model_arg,
    weights_path,
    zoo_ref,
)

# The smallest CIFAR-10 zoo entry (a WRN-40-2, 2.2M parameters, 9 MB of weights), so a test
# can build, save and run it in seconds. Its threat model does not matter for margins.
NAME, DATASET, THREAT = "Hendrycks2020AugMix_WRN", "cifar10", "corruptions"
ZOO = [
    "margin_model.checkpoint=null",  # the demo's packaged model gives way to the zoo's
    f"margin_model.robustbench.name={NAME}",
    f"margin_model.robustbench.dataset={DATASET}",
    f"margin_model.robustbench.threat_model={THREAT}",
]


def _place_weights(model_dir, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """Random weights of the zoo architecture, saved as `<model_dir>/cifar10/corruptions/
    <NAME>.pt`, the file robustbench's `load_model` reads."""
    torch.manual_seed(seed)
    net = build_zoo_architecture(NAME, DATASET, THREAT).eval()
    path = weights_path(NAME, DATASET, THREAT, str(model_dir))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(net.state_dict(), path)
    return net, path


def _cfg(model_dir, *sets):
    return load_config(None, [*ZOO, f"margin_model.robustbench.model_dir={model_dir}", *sets])


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("zoo") / "models"
    net, path = _place_weights(model_dir)
    return model_dir, net, path


def test_loads_through_robustbench_and_keeps_its_normalisation(placed):
    model_dir, net, path = placed
    ref = zoo_ref(_cfg(model_dir).margin_model.robustbench)
    assert ref == f"robustbench:{path}"
    model, meta = load_checkpoint(ref)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        # the zoo model takes [0, 1] pixels and normalises inside: the same logits as the
        # network robustbench builds, given the same pixels
        torch.testing.assert_close(model(x), net(x))
        assert model.forward_features(x).shape == (3, net.fc.in_features)
    assert meta["num_classes"] == 10 and meta["image_shape"] == [32, 32, 3]
    check_compatible(meta, 10, (32, 32, 3))
    with pytest.raises(CheckpointError, match=r"trained on 32x32x3 images but the dataset's are"):
        check_compatible(meta, 10, (28, 28, 1))


def test_fingerprint_is_the_weights_content(tmp_path):
    _, path = _place_weights(tmp_path)
    ref = f"robustbench:{path}"
    first = model_fingerprint(ref)
    assert first == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert model_fingerprint(ref) == first
    _place_weights(tmp_path, seed=1)  # other weights under the same name
    assert model_fingerprint(ref) != first


def test_missing_weights_are_one_line_naming_the_file(tmp_path):
    cfg = _cfg(tmp_path / "empty")
    expected = os.path.join(str(tmp_path / "empty"), DATASET, THREAT, f"{NAME}.pt")
    for call in (
        lambda: margin_model_source(cfg, str(tmp_path / "run")),
        lambda: load_checkpoint(zoo_ref(cfg.margin_model.robustbench)),
    ):
        with pytest.raises(CheckpointError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{expected}: ")
        assert "download: true" in message
    assert not (tmp_path / "empty").exists()  # nothing fetched, not even a folder made


def test_names_and_sections_are_checked(placed):
    model_dir, _, _ = placed
    with pytest.raises(ConfigError, match="not both"):
        _cfg(model_dir, "margin_model.checkpoint=model.pt")
    cfg = _cfg(model_dir, "margin_model.robustbench.name=Hendrycks2020AugMix_WRM")
    # the file is looked for first; a name the zoo does not list fails when it is loaded
    typo = weights_path("Hendrycks2020AugMix_WRM", DATASET, THREAT, str(model_dir))
    os.link(placed[2], typo)
    with pytest.raises(ConfigError, match="did you mean Hendrycks2020AugMix_WRN"):
        load_checkpoint(zoo_ref(cfg.margin_model.robustbench))


def test_evaluate_argument_forms(placed):
    model_dir, _, path = placed
    section = _cfg(model_dir).margin_model.robustbench
    assert resolve_model_arg(f"robustbench:{NAME}", section) == f"robustbench:{path}"
    assert resolve_model_arg(f"robustbench:{path}", section) == f"robustbench:{path}"
    assert resolve_model_arg("runs/x/model.pt", section) == "runs/x/model.pt"
    with pytest.raises(ConfigError):
        resolve_model_arg("robustbench:", section)


def test_scoring_inputs_and_one_scoring_batch_in_process(placed, tmp_path):
    """score's input check and its actor (the class Ray Data runs), without Ray."""
    import numpy as np
    import pyarrow as pa

    from puma_ray.ingest import run_ingest
    from puma_ray.score import MarginScorer, _check_inputs, _settings

    model_dir, _, path = placed
    cfg = _cfg(
        model_dir,
        "data.sources=[{type: builtin, real_train: 8, real_test: 4, synthetic: 0}]",
        "data.validation=0",
        "scoring.max_iter=3",
        "scoring.candidates=2",
    )
    run_dir = str(tmp_path / "run")
    run_ingest(cfg, run_dir, parallel=False, log=lambda _m: None)
    _, ckpt, fingerprint = _check_inputs(cfg, run_dir)
    assert ckpt == f"robustbench:{path}"
    assert fingerprint == hashlib.sha256(open(path, "rb").read()).hexdigest()
    scorer = MarginScorer(ckpt, (32, 32, 3), _settings(cfg), threads=1, device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    batch = pa.table(
        {
            "id": pa.array(np.arange(4), pa.int64()),
            "label": pa.array([0, 1, 2, 3], pa.int16()),
            "source": ["real"] * 4,
            "image": pa.array([im.tobytes() for im in images], pa.binary()),
            "path": ["/data/train/part-00000.parquet"] * 4,
        }
    )
    rows = scorer(batch)
    assert rows.num_rows == 4
    margins = rows.column("margin").to_numpy()
    assert np.isfinite(margins).all()


def test_pipeline_fingerprints_follow_the_weights(tmp_path):
    from puma_ray.pipeline import input_stamps, stage_fingerprints

    _, path = _place_weights(tmp_path / "models")
    cfg = _cfg(tmp_path / "models")
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    stamps = input_stamps(cfg, run_dir)
    assert stamps["margin_checkpoint"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    before = stage_fingerprints(cfg, stamps)
    _place_weights(tmp_path / "models", seed=1)
    after = stage_fingerprints(cfg, input_stamps(cfg, run_dir))
    assert after["score"] != before["score"] and after["ingest"] == before["ingest"]
    # where the weights are staged is not part of the model
    moved = tmp_path / "elsewhere"
    os.makedirs(os.path.dirname(weights_path(NAME, DATASET, THREAT, str(moved))))
    os.link(path, weights_path(NAME, DATASET, THREAT, str(moved)))
    elsewhere = _cfg(moved)
    assert (
        stage_fingerprints(elsewhere, input_stamps(elsewhere, run_dir))["score"] == after["score"]
    )


@pytest.mark.slow
@pytest.mark.ray
def test_zoo_margin_model_scored_and_evaluated_through_the_pipeline(tmp_path, ray_local):
    """`puma-ray run` with the zoo model as margin model: no margin model is trained, scores
    record the weights' hash, a rerun skips everything, new weights rescore; the zoo model is
    also evaluated by `run_evaluate`."""
    import json

    import tiny_pipeline

    from puma_ray.evaluate import run_evaluate
    from puma_ray.pipeline import run_pipeline

    _, path = _place_weights(tmp_path / "models")
    cfg = load_config(
        None,
        [
            "name=zoo",
            *tiny_pipeline.TINY_STAGES,
            "data.sources=[{type: builtin, real_train: 48, real_test: 32, synthetic: 48}]",
            "scoring.max_iter=3",
            "scoring.candidates=2",
            "evaluation.subset=16",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            *ZOO,
            f"margin_model.robustbench.model_dir={tmp_path / 'models'}",
        ],
    )
    run_dir = str(tmp_path / "run")
    quiet = lambda _m: None  # noqa: E731
    result = run_pipeline(cfg, run_dir, log=quiet)
    assert not os.path.exists(os.path.join(run_dir, "margin_model", "model.pt"))
    state = json.load(open(os.path.join(run_dir, "scores", "state.json")))
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert state["margin_model"] == f"robustbench:{path}"
    assert state["margin_model_fingerprint"] == sha
    from puma_ray.data import dataset_dirs, open_dataset

    assert result.summaries["score"].rows == open_dataset(dataset_dirs(run_dir)[0]).num_rows
    again = run_pipeline(cfg, run_dir, log=quiet)
    assert "score" in again.skipped and "train" in again.skipped
    _place_weights(tmp_path / "models", seed=1)
    changed = run_pipeline(cfg, run_dir, log=quiet)
    assert "score" not in changed.skipped and "ingest" in changed.skipped
    ev = run_evaluate(cfg, run_dir, f"robustbench:{path}", name="evaluate_zoo", log=quiet)
    assert ev.rows == 16 and 0 <= ev.pgd_acc <= ev.clean_acc <= 1
