"""Config schema: defaults, YAML loading, overrides, and one-line errors that name the field."""

import os
import subprocess
import sys

import pytest
import yaml

from puma_ray.cli import main
from puma_ray.config import (
    ID_BLOCK,
    ConfigError,
    NpzSource,
    PipelineConfig,
    apply_overrides,
    load_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "tune_configs", "demo.yaml")


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_demo_yaml_equals_embedded_default():
    demo = load_config(None)
    assert load_config(DEMO) == demo
    # the demo is the recipe shrunk for 2 CPUs; a file's missing keys keep the full recipe
    full = PipelineConfig()
    assert demo.data.sources[0].synthetic < full.data.sources[0].synthetic
    assert demo.training.attack.steps < full.training.attack.steps


def test_every_tune_config_validates():
    names = os.listdir(os.path.join(ROOT, "tune_configs"))
    configs = sorted(f for f in names if f.endswith(".yaml"))
    assert "demo.yaml" in configs
    for name in configs:
        load_config(os.path.join(ROOT, "tune_configs", name))


def test_file_values_and_overrides_apply_in_order(tmp_path):
    path = _write(tmp_path, "training:\n  epochs: 5\npruning:\n  ratio: 0.5\n")
    cfg = load_config(path, ["training.epochs=3", "pruning.strategy=random"])
    assert cfg.training.epochs == 3  # --set wins over the file
    assert cfg.pruning.ratio == 0.5  # the file wins over the default
    assert cfg.pruning.strategy == "random"
    assert cfg.scoring.max_iter == 50  # untouched default


def test_override_indexes_into_lists():
    cfg = load_config(None, ["data.sources.0.synthetic=77"])
    assert cfg.data.sources[0].synthetic == 77


def test_epsilon_accepts_fractions():
    cfg = load_config(None, ["training.attack.epsilon=8/255"])
    assert cfg.training.attack.epsilon == pytest.approx(8 / 255)
    with pytest.raises(ConfigError, match="training.attack.epsilon: expected a number"):
        load_config(None, ["training.attack.epsilon=8/zero"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("pruning.ratio=1.0", "pruning.ratio: must be in [0, 1) (got 1.0)"),
        ("pruning.ratio=-0.1", "pruning.ratio: must be in [0, 1) (got -0.1)"),
        ("pruning.eps_scale=0", "pruning.eps_scale: must be > 0 (got 0.0)"),
        ("pruning.eps_quantile=1.5", "pruning.eps_quantile: must be in [0, 1] (got 1.5)"),
        ("pruning.extrapolation.k=0", "pruning.extrapolation.k: must be > 0 (got 0)"),
        ("pruning.strategy=best", "pruning.strategy: Input should be"),
        ("training.epochs=many", "training.epochs: Input should be a valid integer"),
        ("training.bogus=1", "training.bogus: unknown key"),
        ("data.sources.0.noise=-1", "data.sources[0].noise: must be >= 0"),
        ("data.sources=[{type: npz}]", "data.sources[0].path: required key is missing"),
        ("data.sources=[{type: zip}]", "data.sources[0]: unknown source type"),
        ("data.sources=[]", "data.sources: List should have at least 1 item"),
        ("sweep.space={pruning.lr: {grid: [1]}}", "unknown search key 'pruning.lr'"),
        ("sweep.space={pruning.ratio: {grid: [1], choice: [2]}}", "give exactly one of"),
    ],
)
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith("<default>: ")
    assert expected in first_line


def test_unknown_key_in_file_names_file_and_path(tmp_path):
    path = _write(tmp_path, "scoring:\n  norm: l2\n  overshot: 0.02\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: scoring\.overshot: unknown key"):
        load_config(path)


def test_invalid_yaml_names_line(tmp_path):
    path = _write(tmp_path, "training:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: line \d+, column \d+: invalid YAML"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/no/such/config.yaml")


@pytest.mark.parametrize("bad", ["training.epochs", "=3", "training.epochs.x=3"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_apply_overrides_does_not_mutate_input():
    raw = {"training": {"epochs": 1}}
    out = apply_overrides(raw, ["training.epochs=2"])
    assert raw == {"training": {"epochs": 1}} and out["training"]["epochs"] == 2


def test_smoke_test_shrinks_and_set_still_wins():
    cfg = load_config(None, ["training.epochs=2"], smoke_test=True)
    assert cfg.data.sources[0].synthetic <= 2048
    assert cfg.training.epochs == 2


def test_source_id_offsets_are_positional_unless_given():
    cfg = load_config(
        None,
        [
            "data.sources=[{type: builtin}, {type: npz, path: a.npz}, "
            "{type: npz, path: b.npz, id_offset: 5}]"
        ],
    )
    assert isinstance(cfg.data.sources[1], NpzSource)
    assert [cfg.data.source_id_offset(i) for i in range(3)] == [0, ID_BLOCK, 5]


def test_cli_reports_config_error_in_one_line(capsys):
    assert main(["config", "--set", "pruning.ratio=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "puma-ray config: error: <default>: pruning.ratio: must be in [0, 1) (got 2.0)"


def test_cli_flags_map_to_config(capsys):
    assert main(["config", "--num-workers", "0", "--use-gpu", "--address", "auto"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["ray"] == {**cfg["ray"], "num_workers": 0, "use_gpu": True, "address": "auto"}


def test_console_script_and_module_entry_points():
    for cmd in (["puma-ray", "--help"], [sys.executable, "-m", "puma_ray", "--help"]):
        if cmd[0] == "puma-ray":
            cmd[0] = os.path.join(os.path.dirname(sys.executable), "puma-ray")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "ingest" in out


def test_sweep_demo_repeats_the_demo_recipe():
    """sweep_demo.yaml promises that after `puma-ray run` its sweep reuses the demo's data,
    margin model and scores (same stage fingerprints) and trains with the demo's recipe."""
    from puma_ray.pipeline import stage_fingerprints

    demo = load_config(None)
    sweep = load_config(os.path.join(ROOT, "tune_configs", "sweep_demo.yaml"))
    a, b = stage_fingerprints(demo), stage_fingerprints(sweep)
    assert [a[s] == b[s] for s in ("ingest", "margin_model", "score")] == [True] * 3
    assert sweep.training == demo.training and sweep.model == demo.model
