"""`training.init_from`: fine-tuning from a puma_ray checkpoint or a RobustBench zoo model
(puma_ray/train/init.py). The checks of the initial model, its weights and the fingerprints
need neither Ray nor a download; one test marked `ray` trains an epoch from given weights."""

import importlib.util
import os

import pytest
import torch

from puma_ray.config import load_config
from puma_ray.errors import ConfigError
from puma_ray.models import create_model, load_checkpoint, save_checkpoint
from puma_ray.stages import input_stamps, recipe_dump, stage_fingerprints
from puma_ray.train.init import init_model, initial_model

SHAPE = (32, 32, 3)
HAS_ZOO = importlib.util.find_spec("robustbench") is not None  # not importorskip: models/zoo.py


def _checkpoint(path, seed: int = 0, arch: str = "small_cnn", **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, 10, **kwargs)
    save_checkpoint(path, model)
    return model


def _cfg(init_from, *sets):
    return load_config(None, [f"training.init_from={init_from}", *sets])


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _built(cfg, num_classes: int = 10, shape=SHAPE) -> torch.nn.Module:
    spec = init_model(cfg, num_classes, shape)
    torch.manual_seed(123)  # another seed than the checkpoint's: the weights must come from it
    return initial_model(spec["arch"], num_classes, spec["model_kwargs"], spec["init_from"])


# --------------------------------------------------------------------------------------------
# (a) our own checkpoints, pure torch


def test_initial_model_has_exactly_the_checkpoints_weights(tmp_path):
    given = _checkpoint(str(tmp_path / "init.pt"))
    model = _built(_cfg(tmp_path / "init.pt"))
    assert _same_state(model, given) and model.training and model.arch == "small_cnn"
    torch.manual_seed(123)
    assert not _same_state(create_model("small_cnn", 10), given)  # not the seed's init


def test_the_loop_builds_it_unless_resuming(tmp_path):
    from puma_ray.config import TrainingConfig
    from puma_ray.train.loop import _model

    given = _checkpoint(str(tmp_path / "init.pt"), seed=7)  # the loop seeds training.seed, 0
    net = {"arch": "small_cnn", "num_classes": 10, "model_kwargs": {}}
    model, wrapped, _, _ = _model(net, TrainingConfig(), 1, str(tmp_path / "init.pt"))
    assert _same_state(model, given) and wrapped is model
    scratch, *_ = _model(net, TrainingConfig(), 1, None)  # resuming passes no init
    assert not _same_state(scratch, given)


def test_options_left_at_their_defaults_match(tmp_path):
    given = _checkpoint(str(tmp_path / "init.pt"), in_channels=3)  # spelled out in the file
    assert _same_state(_built(_cfg(tmp_path / "init.pt")), given)


@pytest.mark.parametrize(
    ("sets", "num_classes", "shape", "says"),
    [
        (["model.arch=preact_resnet18"], 10, SHAPE, "is a small_cnn with kwargs {} but model is"),
        (["model.kwargs={mean: [0.5, 0.5, 0.5]}"], 10, SHAPE, "set model.arch and model.kwargs"),
        ([], 100, SHAPE, "model has 10 classes but the dataset has 100"),
        ([], 10, (28, 28, 1), "trained on 32x32x3 images but the dataset's are 28x28x1"),
    ],
)
def test_a_mismatch_is_one_line_naming_the_key(tmp_path, sets, num_classes, shape, says):
    _checkpoint(str(tmp_path / "init.pt"))
    with pytest.raises(ConfigError) as e:
        init_model(_cfg(tmp_path / "init.pt", *sets), num_classes, shape)
    message = str(e.value)
    assert "\n" not in message and message.startswith("training.init_from: ")
    assert says in message


def test_missing_file_and_margin_model_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^training.init_from: .*checkpoint not found$"):
        init_model(_cfg(tmp_path / "none.pt"), 10, SHAPE)
    with pytest.raises(ConfigError, match="margin model is trained from a random init"):
        load_config(None, [f"margin_model.train.init_from={tmp_path / 'init.pt'}"])


def test_smoke_test_drops_it(tmp_path):
    """A file's init_from does not fit the smoke test's shrunk model (a --set value still wins,
    as every --set does)."""
    path = tmp_path / "cfg.yaml"
    path.write_text("training:\n  init_from: x.pt\n")
    notes = []
    cfg = load_config(str(path), smoke_test=True, log=notes.append)
    assert cfg.training.init_from is None
    assert any("training.init_from is not used" in n for n in notes)


def test_fingerprints_follow_the_weights_content(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    path = str(tmp_path / "init.pt")
    _checkpoint(path, seed=0)
    cfg = _cfg(path)
    stamps = input_stamps(cfg, run_dir)
    first = stage_fingerprints(cfg, stamps)
    _checkpoint(path, seed=1)  # other weights in the same file
    second = stage_fingerprints(cfg, input_stamps(cfg, run_dir))
    assert input_stamps(cfg, run_dir)["init_from"] != stamps["init_from"]
    for stage in ("train", "evaluate", "baseline_full", "baseline_random"):
        assert first[stage] != second[stage]
    for stage in ("ingest", "margin_model", "score", "prune"):
        assert first[stage] == second[stage]
    scratch = load_config(None)
    assert "init_from" not in input_stamps(scratch, run_dir)
    assert stage_fingerprints(scratch, input_stamps(scratch, run_dir))["train"] != first["train"]
    # unset, the key is left out, so recipes keep the fingerprints they had before it existed
    assert "init_from" not in recipe_dump(scratch.training.model_dump())


# --------------------------------------------------------------------------------------------
# (b) RobustBench zoo models, offline (the pattern of tests/test_zoo.py)

NAME, DATASET, THREAT = "Hendrycks2020AugMix_WRN", "cifar10", "corruptions"
ZOO = [
    "margin_model.checkpoint=null",
    f"margin_model.robustbench.dataset={DATASET}",
    f"margin_model.robustbench.threat_model={THREAT}",
]


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    """Random weights of a small zoo architecture where robustbench's loader looks."""
    if not HAS_ZOO:
        pytest.skip("needs the zoo extra (robustbench)")
    from puma_ray.models.zoo import build_zoo_architecture, weights_path

    model_dir = tmp_path_factory.mktemp("zoo") / "models"
    torch.manual_seed(0)
    net = build_zoo_architecture(NAME, DATASET, THREAT).eval()
    path = weights_path(NAME, DATASET, THREAT, str(model_dir))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(net.state_dict(), path)
    return model_dir, net, path


def _zoo_cfg(model_dir, init_from=f"robustbench:{NAME}"):
    return load_config(
        None,
        [
            *ZOO,
            f"margin_model.robustbench.model_dir={model_dir}",
            f"training.init_from={init_from}",
        ],
    )


def test_zoo_model_is_the_network_trained(placed, tmp_path):
    model_dir, net, path = placed
    spec = init_model(_zoo_cfg(model_dir), 10, SHAPE)
    assert spec["arch"] == f"robustbench:{NAME}" and spec["init_from"] == f"robustbench:{path}"
    model = _built(_zoo_cfg(model_dir)).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), net(x))  # the zoo's own normalisation inside
    # the saved model.pt is rebuilt from robustbench's registry (no download), as evaluate does
    save_checkpoint(str(tmp_path / "model.pt"), model)
    loaded, meta = load_checkpoint(str(tmp_path / "model.pt"))
    assert meta["arch"] == f"robustbench:{NAME}"
    assert meta["kwargs"] == {"dataset": DATASET, "threat_model": THREAT}
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    # and it can be the initial weights in turn, keeping its zoo arch
    again = init_model(_zoo_cfg(model_dir, tmp_path / "model.pt"), 10, SHAPE)
    assert again["arch"] == f"robustbench:{NAME}"
    assert _same_state(_built(_zoo_cfg(model_dir, tmp_path / "model.pt")), model)


def test_zoo_path_form_and_missing_weights(placed, tmp_path):
    model_dir, _, path = placed
    assert init_model(_zoo_cfg(model_dir, f"robustbench:{path}"), 10, SHAPE)["init_from"] == (
        f"robustbench:{path}"
    )
    with pytest.raises(ConfigError) as e:
        init_model(_zoo_cfg(tmp_path / "empty"), 10, SHAPE)
    message = str(e.value)
    assert "\n" not in message and message.startswith("training.init_from: ")
    assert "not found" in message and "download: true" in message
    assert not (tmp_path / "empty").exists()  # nothing fetched
    with pytest.raises(ConfigError, match="model has 10 classes but the dataset has 100"):
        init_model(_zoo_cfg(model_dir), 100, SHAPE)


# --------------------------------------------------------------------------------------------
# (c) one epoch of the train stage from given weights


@pytest.mark.slow
@pytest.mark.ray
def test_train_stage_starts_from_the_given_weights(tmp_path, ray_local):
    """An lr too small to move a weight: the trained parameters are the given ones to 1e-20
    (a zero bias may become ~1e-30; BatchNorm's running statistics do move), where a random
    init would differ by ~1e-2; the model.pt loads like any other; a rerun is a no-op."""
    import tiny_pipeline

    from puma_ray.ingest import run_ingest
    from puma_ray.prune import run_prune
    from puma_ray.train import run_train

    given = _checkpoint(str(tmp_path / "init.pt"), seed=7)
    cfg = load_config(
        None,
        [
            *tiny_pipeline.TINY_STAGES,
            "pruning.strategy=random",
            "pruning.eps_rule=none",
            "training.lr=1.0e-30",
            "training.warmup_epochs=0",
            "training.weight_decay=0",
            f"training.init_from={tmp_path / 'init.pt'}",
            "tracking.tracking_uri=none",
        ],
    )
    run_dir = str(tmp_path / "run")
    quiet = lambda _m: None  # noqa: E731
    run_ingest(cfg, run_dir, parallel=False, log=quiet)
    run_prune(cfg, run_dir, parallel=False, log=quiet)
    summary = run_train(cfg, run_dir, log=quiet)
    trained, meta = load_checkpoint(summary.model_path)
    assert meta["arch"] == "small_cnn" and len(summary.history) == 1
    params = dict(given.named_parameters())
    for k, p in trained.named_parameters():
        torch.testing.assert_close(p, params[k], rtol=0, atol=1e-20)
    assert run_train(cfg, run_dir, log=quiet).skipped
