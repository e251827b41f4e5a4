"""The CLI as Ray and MLflow users expect it, all without Ray: a search space or source list in a
file replaces the default one, `report` takes only its own flags and reads where `sweep` logged,
MLFLOW_EXPERIMENT_NAME the MLflow way, `--version`, `--help` with examples, one `--force`, and
the configuration reference generated from the schema (docs/config.md)."""

import importlib.metadata
import os
import re
import shlex

import pytest
import yaml
from pydantic import BaseModel

from puma_ray import cli
from puma_ray.cli import build_parser, main, report_source
from puma_ray.config import (
    DEFAULT_EXPERIMENT,
    PipelineConfig,
    SearchDim,
    _merge,
    load_config,
)
from puma_ray.config_reference import schema_markdown
from puma_ray.errors import ConfigError
from puma_ray.sweep import plan_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_DEMO = os.path.join(ROOT, "tune_configs", "sweep_demo.yaml")
RATIO_ONLY = "sweep:\n  space:\n    pruning.ratio: {grid: [0.2, 0.5]}\n"


def _write(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def _options(name: str) -> set[str]:
    return {o for a in _subparser(name)._actions for o in a.option_strings}


# --------------------------------------------------------------------------------------------
# 1. What a file writes as a whole replaces the default.


def test_search_space_in_a_file_replaces_the_default(tmp_path, capsys):
    path = _write(tmp_path, RATIO_ONLY)
    cfg = load_config(path)
    assert list(cfg.sweep.space) == ["pruning.ratio"]
    assert cfg.sweep.space["pruning.ratio"] == SearchDim(grid=[0.2, 0.5])
    plan = plan_sweep(cfg)
    assert (plan.trials, plan.baseline_added, plan.swept) == (3, True, ["pruning.ratio"])
    # `puma-ray config` shows the space that results, each dimension with only its kind
    assert main(["config", path]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["sweep"]["space"] == {"pruning.ratio": {"grid": [0.2, 0.5]}}


def test_set_edits_one_search_key(tmp_path):
    path = _write(tmp_path, RATIO_ONLY)
    cfg = load_config(path, ["sweep.space.pruning.eps_scale={grid: [0.5, 1.0]}"])
    assert list(cfg.sweep.space) == ["pruning.ratio", "pruning.eps_scale"]
    assert plan_sweep(cfg).trials == 5
    cfg = load_config(path, ["sweep.space.pruning.ratio.choice=[0.1, 0.3]"])
    assert cfg.sweep.space == {"pruning.ratio": SearchDim(choice=[0.1, 0.3])}
    # on the default space: null drops a key, a whole mapping replaces the space
    cfg = load_config(None, ["sweep.space.pruning.eps_scale=null"])
    assert list(cfg.sweep.space) == ["pruning.ratio"]
    cfg = load_config(None, ["sweep.space={training.seed: {grid: [0, 1]}}"])
    assert list(cfg.sweep.space) == ["training.seed"]
    with pytest.raises(ConfigError, match="unknown search key 'pruning.lr'"):
        load_config(None, ["sweep.space.pruning.lr.grid=[1]"])


def test_source_list_and_model_kwargs_in_a_file_replace_the_default(tmp_path):
    path = _write(
        tmp_path,
        "data:\n  sources:\n    - {type: npz, path: x.npz}\n"
        "model:\n  arch: wide_resnet\n  kwargs: {depth: 10}\n",
    )
    cfg = load_config(path)
    assert [s.type for s in cfg.data.sources] == ["npz"]  # the default builtin source is gone
    assert cfg.model.kwargs == {"depth": 10}
    # the merge itself: sections key by key, the whole mappings and lists replaced
    base = {"model": {"arch": "a", "kwargs": {"width": 2}}, "sweep": {"space": {"a": 1}, "n": 1}}
    top = {"model": {"kwargs": {"depth": 10}}, "sweep": {"space": {"b": 2}}}
    assert _merge(base, top) == {
        "model": {"arch": "a", "kwargs": {"depth": 10}},
        "sweep": {"space": {"b": 2}, "n": 1},
    }


# --------------------------------------------------------------------------------------------
# 2. report: its own arguments, and by default the store and experiment of the named sweep.


def test_report_takes_only_the_flags_it_uses():
    options = _options("report")
    for unused in ("--set", "--address", "--num-workers", "--use-gpu", "--smoke-test"):
        assert unused not in options
    assert {"--run-dir", "--experiment", "--tracking-uri", "--run-id", "--out"} <= options
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["report", "--set", "training.epochs=1"])
    assert info.value.code == 2


def test_report_reads_where_the_sweep_logs(tmp_path, monkeypatch):
    from puma_ray.sweep.driver import _pin_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    for extra in ([], ["--run-dir", "runs/demo"]):
        sweep_args = build_parser().parse_args(["sweep", SWEEP_DEMO, *extra])
        cfg = cli._config(sweep_args)
        run_dir = cli._run_dir(sweep_args, cfg)
        # what run_sweep logs to: its pinned tracking URI and cfg.tracking.experiment
        pinned, uri = _pin_tracking(cfg, run_dir, sweep_args.tracking_uri)
        src = report_source(build_parser().parse_args(["report", SWEEP_DEMO, *extra]))
        assert src.run_dir == run_dir
        assert src.tracking_uri == uri == f"sqlite:///{run_dir}/mlflow.db"
        assert src.experiment == pinned.tracking.experiment == "sweep-demo"
    assert run_dir == str(tmp_path / "runs" / "demo")
    src = report_source(build_parser().parse_args(["report", SWEEP_DEMO]))
    assert src.run_dir == str(tmp_path / "runs" / "sweep_demo")
    args = ["report", "--experiment", "other", "--tracking-uri", "sqlite:///s.db"]
    src = report_source(build_parser().parse_args(args))
    assert (src.experiment, src.tracking_uri) == ("other", f"sqlite:///{tmp_path}/s.db")


def test_report_with_an_experiment_name_as_config_says_what_to_do(capsys):
    assert main(["report", "sweep-demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("puma-ray report: error: sweep-demo: no such config file")
    assert "--experiment sweep-demo" in err and "\n" not in err


def test_report_without_tracking_is_one_line(tmp_path, capsys):
    path = _write(tmp_path, "tracking:\n  tracking_uri: none\n")
    assert main(["report", path]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}: tracking.tracking_uri: tracking is off" in err and "\n" not in err


# --------------------------------------------------------------------------------------------
# 3. MLFLOW_EXPERIMENT_NAME: the default experiment; a name in the file or --set wins.


def test_mlflow_experiment_name_precedence(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert load_config(None).tracking.experiment == DEFAULT_EXPERIMENT == "puma-ray"
    plain = _write(tmp_path, "training:\n  epochs: 2\n", "plain.yaml")
    named = _write(tmp_path, "tracking:\n  experiment: mine\n", "named.yaml")

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert load_config(None).tracking.experiment == "from-env"
    assert load_config(plain).tracking.experiment == "from-env"
    assert load_config(named).tracking.experiment == "mine"  # the file wins
    assert load_config(plain, ["tracking.experiment=cli"]).tracking.experiment == "cli"
    assert load_config(named, ["tracking.experiment=cli"]).tracking.experiment == "cli"
    assert main(["config", plain]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tracking"]["experiment"] == "from-env"
    # report's default follows the same rule as the sweep's
    assert report_source(build_parser().parse_args(["report", plain])).experiment == "from-env"
    # a config handed to a Ray worker keeps the driver's name, whatever the worker's env says
    dumped = load_config(plain).model_dump(mode="json")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "worker-env")
    assert PipelineConfig.model_validate(dumped).tracking.experiment == "from-env"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "")  # set but empty: as if unset
    assert load_config(plain).tracking.experiment == "puma-ray"


# --------------------------------------------------------------------------------------------
# 4-6. --version, --help with examples, --force.


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"puma-ray {importlib.metadata.version('puma-ray')}\n"
    # the fallback for a source tree that is not installed is pyproject's version
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    init = open(os.path.join(ROOT, "puma_ray", "__init__.py")).read()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert re.search(r'__version__ = "([^"]+)"', init).group(1) == declared


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_ends_with_examples_that_parse(name):
    text = _subparser(name).format_help()
    examples = text.split("examples:\n", 1)[1].splitlines()
    commands = [line for line in examples if line.startswith(f"  puma-ray {name}")]
    assert len(commands) >= 2 and len(commands) == len(examples)  # one command per line
    for line in commands:
        argv = shlex.split(line.split(" #")[0].split(" >")[0])[1:]
        build_parser().parse_args(argv)  # exits 2 on an argument the command does not take


def test_force_means_one_thing(capsys):
    from puma_ray.pipeline import BASELINES, STAGES

    for name in ("ingest", "score", "prune", "train"):
        force = next(a for a in _subparser(name)._actions if "--force" in a.option_strings)
        assert force.help == cli.FORCE_HELP and force.nargs == 0
    force = next(a for a in _subparser("run")._actions if "--force" in a.option_strings)
    assert (
        tuple(force.choices) == cli.RUN_STAGES == STAGES + tuple(f"baseline_{b}" for b in BASELINES)
    )
    assert "even if it is up to date" in force.help and "even if it is up to date" in cli.FORCE_HELP
    for stage in cli.RUN_STAGES:
        assert stage in force.help
    assert build_parser().parse_args(
        ["run", "--force", "score", "--force", "train"]
    ).force_stage == [
        "score",
        "train",
    ]
    for argv, message in (
        (["run", "--force"], "argument --force: expected one argument"),
        (["run", "--force", "all"], "argument --force: invalid choice: 'all'"),
    ):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err
    for name in ("evaluate", "sweep", "report", "config"):
        assert "--force" not in _options(name)


# --------------------------------------------------------------------------------------------
# 7. The configuration reference, generated from the schema.


def _models() -> list[type[BaseModel]]:
    """Every model a config is made of (the source kinds and the search dimension too)."""
    import typing

    seen: list[type[BaseModel]] = []

    def visit(hint) -> None:
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            if hint not in seen:
                seen.append(hint)
                for h in typing.get_type_hints(hint, include_extras=True).values():
                    visit(h)
            return
        for arg in typing.get_args(hint):
            visit(arg)

    visit(PipelineConfig)
    return seen


def test_every_field_has_a_description():
    models = _models()
    names = {m.__name__ for m in models}
    assert {"BuiltinSource", "NpzSource", "TorchvisionSource", "SearchDim"} <= names
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        for name, info in m.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert missing == []


def test_docs_config_md_is_the_schema_output(capsys):
    assert main(["config", "--schema"]) == 0
    out = capsys.readouterr().out
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        committed = f.read()
    assert out == committed, "docs/config.md is stale: puma-ray config --schema > docs/config.md"


def test_schema_names_every_key():
    text = schema_markdown()

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and path not in ("sweep.space", "model.kwargs"):
                yield from leaves(v, path + ".")
            else:
                yield path

    raw = PipelineConfig().model_dump(mode="json")
    keys = [
        k for k in leaves(raw) if not k.startswith(("margin_model.model", "margin_model.train"))
    ]
    assert "training.attack.epsilon" in keys and "seed" in keys
    for key in keys:
        assert f"| `{key}` |" in text, key
    assert "| `data.sources[].noise` |" in text and "| `sweep.space.<key>.grid` |" in text
    assert "`8/255`" in text  # the epsilon default as papers write it
    # seed says what it seeds
    seed_row = next(line for line in text.splitlines() if line.startswith("| `seed` |"))
    assert "PGD random starts of the `evaluate` stage" in seed_row
