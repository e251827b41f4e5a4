"""`puma-ray STAGE [CONFIG] [--set k=v ...] [--run-dir DIR] [Ray flags]`.

The CLI only parses, validates and calls the stage modules; heavy imports (torch, Ray) happen
inside the commands so `--help`, `--version` and config errors answer at once.

Length: one module on purpose: every command's parser and its handler, side by side, so a
flag's help text and what it does are read together.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from puma_ray.config import PipelineConfig, dump_yaml, load_config
from puma_ray.config_reference import schema_markdown
from puma_ray.errors import ConfigError, PumaRayError

# `run --force STAGE`: the stages of puma_ray.pipeline (STAGES, then one per baseline), named
# here so that `--help` does not import it (tests/test_cli_polish.py keeps the two equal)
RUN_STAGES = (
    "ingest",
    "margin_model",
    "score",
    "prune",
    "train",
    "evaluate",
    "baseline_random",
    "baseline_full",
)
VERBOSE_HELP = (
    "show the messages of Ray, Ray Data, Ray Train, Ray Tune and MLflow here; without it they "
    "go to <run dir>/logs/<command>-<time>.log, and only puma-ray's lines and errors are shown"
)
# `--force` means one thing everywhere: redo even if up to date
FORCE_HELP = "redo this stage even if it is up to date (its finished output is discarded)"
FORCE_STAGE_HELP = (
    "redo STAGE even if it is up to date, and every stage that reads its output (their "
    "finished output is discarded); repeatable; STAGE is one of: " + ", ".join(RUN_STAGES)
)


def version() -> str:
    """The installed package's version (its metadata), else puma_ray.__version__."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("puma-ray")
    except PackageNotFoundError:
        from puma_ray import __version__

        return __version__


def _common(p: argparse.ArgumentParser, *, config_positional: bool = True) -> None:
    if config_positional:
        p.add_argument(
            "config",
            nargs="?",
            help="pipeline YAML (default: the embedded demo, as in tune_configs/demo.yaml)",
        )
    else:
        p.add_argument("--config", help="pipeline YAML (default: the embedded demo)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.epochs=3 (repeatable)",
    )
    p.add_argument(
        "--run-dir",
        help="where stage outputs go (default: runs/<config name>; with --smoke-test: "
        "<run dir>-smoke)",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (0 = in-process)")
    p.add_argument("--use-gpu", action="store_true", help="use GPUs for scoring and training")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="a few minutes of this config on this machine: tiny data (builtin data for "
        "sources not here), a narrow model, one epoch, the local CPUs/GPUs; writes to "
        "<run dir>-smoke and the experiment <experiment>-smoke (`config --smoke-test` shows it)",
    )


def _config(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.num_workers is not None:
        overrides.append(f"ray.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.append("ray.use_gpu=true")
    return load_config(args.config, overrides, smoke_test=args.smoke_test)


def _absolute(path: str | None) -> str | None:
    """Local paths (and `file://` URIs) made absolute paths, since Ray workers run elsewhere;
    remote URIs (s3://, gs://) as given."""
    if not path or ("://" in path and not path.startswith("file://")):
        return path
    from puma_ray.storage import local_path

    return local_path(path)


def _run_dir(args: argparse.Namespace, cfg: PipelineConfig) -> str:
    """`--run-dir` (`X-smoke` with --smoke-test), else runs/<config name>; the command's log
    file goes there."""
    from puma_ray import api, logs

    run_dir = api.run_dir_for(cfg, args.run_dir, smoke_test=getattr(args, "smoke_test", False))
    logs.set_run_dir(run_dir)
    return run_dir


def _output_name(name: str | None) -> str | None:
    """`--name`: one folder under the run dir, never a path that leads out of it."""
    if name is None:
        return None
    from puma_ray.config import check_plain_name

    return check_plain_name(name, "--name")


def _say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Commands. Each returns a process exit code.


def cmd_config(args: argparse.Namespace) -> int:
    if args.schema:
        sys.stdout.write(schema_markdown())
        return 0
    cfg = _config(args)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    cfg = _config(args)
    run_dir = _run_dir(args, cfg)
    from puma_ray.ingest import run_ingest
    from puma_ray.locking import run_dir_lock
    from puma_ray.runtime import ensure_ray

    with run_dir_lock(run_dir, "ingest", log=_say):
        if args.parallel:
            ensure_ray(cfg.ray)
        summary = run_ingest(cfg, run_dir, parallel=args.parallel, force=args.force)
    _say(summary.format())
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    cfg = _config(args)
    run_dir = _run_dir(args, cfg)
    from puma_ray.locking import run_dir_lock
    from puma_ray.runtime import ensure_ray
    from puma_ray.score import run_score

    with run_dir_lock(run_dir, "score", log=_say):
        ensure_ray(cfg.ray)
        summary = run_score(
            cfg, run_dir, force=args.force, embeddings=True if args.embeddings else None, log=_say
        )
    _say(summary.format())
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    cfg = _config(args)
    run_dir = _run_dir(args, cfg)
    from puma_ray.locking import run_dir_lock
    from puma_ray.prune import run_prune
    from puma_ray.runtime import ensure_ray

    with run_dir_lock(run_dir, "prune", log=_say):
        if args.parallel:
            ensure_ray(cfg.ray)
        summary = run_prune(
            cfg,
            run_dir,
            force=args.force,
            parallel=args.parallel,
            out_dir=_absolute(args.out_dir),
            log=_say,
        )
    _say(summary.format())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    run_dir = _run_dir(args, cfg)
    from puma_ray.locking import run_dir_lock
    from puma_ray.pipeline import margin_model_config
    from puma_ray.runtime import ensure_ray
    from puma_ray.train import run_train

    name = _output_name(args.name) or ("margin_model" if args.dataset == "full" else "train")
    train_cfg = margin_model_config(cfg) if args.dataset == "full" else cfg
    with run_dir_lock(run_dir, "train", log=_say):
        ensure_ray(cfg.ray)
        summary = run_train(
            train_cfg,
            run_dir,
            dataset=args.dataset,
            name=name,
            kept_dir=_absolute(args.kept_dir),
            force=args.force,
            log=_say,
        )
    _say(summary.format())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    run_dir = _run_dir(args, cfg)
    from puma_ray.evaluate import run_evaluate
    from puma_ray.locking import run_dir_lock
    from puma_ray.models.zoo import is_zoo_ref, resolve_model_arg

    checkpoint = args.checkpoint
    if is_zoo_ref(checkpoint):  # robustbench:NAME or robustbench:PATH.pt
        checkpoint = resolve_model_arg(checkpoint, cfg.margin_model.robustbench)
    else:
        checkpoint = _absolute(checkpoint)
    with run_dir_lock(run_dir, "evaluate", log=_say):
        summary = run_evaluate(
            cfg,
            run_dir,
            checkpoint,
            split=args.split,
            name=_output_name(args.name)
            or ("evaluate" if args.split == "test" else "evaluate_val"),
            log=_say,
        )
    _say(summary.format())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.compare:
        args.overrides = ["compare=[random, full]", *args.overrides]
    if args.seeds is not None:
        args.overrides = [f"seeds={args.seeds}", *args.overrides]
    if args.train_margin_model:
        args.overrides = ["margin_model.checkpoint=null", *args.overrides]
    cfg = _config(args)
    run_dir = _run_dir(args, cfg)
    if args.dry_run:
        from puma_ray.dry_run import plan_run

        _say(plan_run(cfg, run_dir, tuple(args.force_stage)).format())
        return 0
    from puma_ray.pipeline import run_pipeline

    # the pipeline ends with its summary: stage times, counts, accuracy, MLflow location
    run_pipeline(cfg, run_dir, force=tuple(args.force_stage), log=_say)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _config(args)
    run_dir = _run_dir(args, cfg)
    if args.dry_run:
        from puma_ray.dry_run import plan_sweep_run

        _say(plan_sweep_run(cfg, run_dir))
        return 0
    from puma_ray.locking import run_dir_lock
    from puma_ray.sweep import run_sweep

    # run_sweep checks the search space before it starts Ray; its trials write into the run
    # dir under this lock, held by the driver
    with run_dir_lock(run_dir, "sweep", log=_say):
        result = run_sweep(
            cfg,
            run_dir,
            tracking_uri=args.tracking_uri,
            resume=not args.fresh,
            log=_say,
        )
    _say(result.format())
    return 0 if result.complete else 1


@dataclass(frozen=True)
class ReportSource:
    """Where `puma-ray report` reads: the MLflow store and experiment `puma-ray sweep` logs to
    for the same config and run dir."""

    tracking_uri: str
    experiment: str
    run_dir: str


def report_source(args: argparse.Namespace) -> ReportSource:
    """The store and experiment of `puma-ray report [CONFIG]`, resolved as `puma-ray sweep CONFIG`
    resolves them (no Ray, no MLflow): `--tracking-uri`, else tracking.tracking_uri, else
    MLFLOW_TRACKING_URI, else `<run_dir>/mlflow.db`, the run dir being `--run-dir` or
    runs/<name>; the experiment is `--experiment`, else tracking.experiment."""
    from puma_ray.tracking import absolute_uri, tracking_uri

    path = args.config
    if path and not os.path.exists(path) and not path.endswith((".yaml", ".yml")):
        # `puma-ray report EXPERIMENT` was this command's form before it took the config
        raise ConfigError(
            f"{path}: no such config file; `puma-ray report` takes the sweep's config (for its "
            f"experiment and run dir); to name an MLflow experiment, use --experiment {path}"
        )
    cfg = load_config(path)
    run_dir = _run_dir(args, cfg)
    uri = args.tracking_uri or tracking_uri(cfg.tracking, run_dir)
    if uri is None:
        raise ConfigError(
            f"{path or '<default>'}: tracking.tracking_uri: tracking is off, so there is no "
            "MLflow store to read; give --tracking-uri URI"
        )
    return ReportSource(absolute_uri(uri), args.experiment or cfg.tracking.experiment, run_dir)


def cmd_report(args: argparse.Namespace) -> int:
    from puma_ray.report import load_report
    from puma_ray.tracking import sqlite_path

    src = report_source(args)
    if args.pipeline:
        from puma_ray.report import load_pipeline_report

        _say(load_pipeline_report(src.tracking_uri, src.experiment, parent_run_id=args.run_id))
        return 0
    report = load_report(src.tracking_uri, src.experiment, parent_run_id=args.run_id)
    # default: beside a sqlite store (the run dir, which is git-ignored), else ./reports
    db = sqlite_path(src.tracking_uri)
    base = os.path.join(os.path.dirname(db), "reports") if db else "reports"
    folder = f"{report.experiment}-{report.parent_run_id[:8]}".replace("/", "_")
    out = _absolute(args.out or os.path.join(base, folder))
    files = report.write(out)
    _say(report.format())
    _say(f"report: {len(files)} files in {out} ({', '.join(files)})")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "ingest": (cmd_ingest, "build Parquet sample shards from the configured sources"),
    "score": (cmd_score, "DeepFool margin of every training sample, on a Ray Data actor pool"),
    "prune": (cmd_prune, "pick the kept set (PUMA or a baseline) and each sample's epsilon"),
    "train": (cmd_train, "Ray Train adversarial training on the kept set (or all data)"),
    "evaluate": (cmd_evaluate, "clean, PGD and (optionally) AutoAttack accuracy of a checkpoint"),
    "run": (cmd_run, "the whole pipeline: ingest, margin model, score, prune, train, evaluate"),
    "sweep": (cmd_sweep, "Ray Tune sweep of prune ratio x eps scaling (prune, train, evaluate)"),
    "report": (cmd_report, "a sweep's table and plots, read from MLflow (no Ray needed)"),
    "config": (cmd_config, "print the fully resolved config (defaults, file and --set merged)"),
}

# `puma-ray COMMAND --help` ends with these: real command lines, from the repository root.
EXAMPLES = {
    "ingest": """\
  puma-ray ingest                          # the demo's builtin data -> runs/demo/data
  puma-ray ingest tune_configs/cifar10_edm1m.yaml --run-dir s3://BUCKET/runs/edm1m
  puma-ray ingest --force --no-parallel    # rebuild the shards, in this process""",
    "score": """\
  puma-ray score --run-dir runs/demo       # after ingest and `train --dataset full`
  puma-ray score --set margin_model.checkpoint=robust.pt    # score with a given model
  puma-ray score --force                   # rescore every row, discarding finished shards""",
    "prune": """\
  puma-ray prune --set pruning.ratio=0.3   # -> runs/demo/kept
  puma-ray prune --set pruning.strategy=random --out-dir runs/demo/kept_random
  puma-ray prune --force --no-parallel     # prune again, in this process""",
    "train": """\
  puma-ray train --dataset full            # the margin model -> runs/demo/margin_model
  puma-ray train                           # the kept set -> runs/demo/train
  puma-ray train --num-workers 0 --set training.epochs=1   # in-process, for debugging""",
    "evaluate": """\
  puma-ray evaluate runs/demo/train/model.pt
  puma-ray evaluate runs/demo/train/model.pt --set evaluation.subset=null
  puma-ray evaluate model.pt --config tune_configs/cifar10_edm1m.yaml --run-dir runs/edm1m
  puma-ray evaluate robustbench:Wang2023Better_WRN-28-10 --config tune_configs/cifar10_edm1m.yaml
  puma-ray evaluate runs/demo/train/model.pt --set evaluation.autoattack=true""",
    "run": """\
  puma-ray run                             # the embedded demo (builtin data, CPU)
  puma-ray run --compare                   # + the random-subset and full-data baselines
  puma-ray run --seeds 3 --compare         # each method with 3 training seeds, mean ± 95%
  puma-ray run --force score               # score again, then prune, train and evaluate""",
    "sweep": """\
  puma-ray sweep tune_configs/sweep_demo.yaml      # 2 x 2 grid + unpruned baseline
  puma-ray sweep tune_configs/sweep_demo.yaml --run-dir runs/demo   # reuse the demo's scores
  puma-ray sweep --smoke-test --set 'sweep.space.pruning.ratio={grid: [0.2, 0.5]}'""",
    "report": """\
  puma-ray report tune_configs/sweep_demo.yaml     # runs/sweep_demo, experiment sweep-demo
  puma-ray report --pipeline                       # the demo's `run --seeds N --compare` table
  puma-ray report tune_configs/sweep_demo.yaml --run-dir runs/demo --out /tmp/report
  puma-ray report --experiment sweep-demo --tracking-uri http://127.0.0.1:5000""",
    "config": """\
  puma-ray config tune_configs/sweep_demo.yaml --set pruning.ratio=0.5
  puma-ray config --smoke-test             # what --smoke-test changes
  puma-ray config --schema > docs/config.md   # the reference of every key""",
}


def _report_args(p: argparse.ArgumentParser) -> None:
    """`report` reads MLflow only: no --set, no Ray flags, no --smoke-test."""
    p.add_argument(
        "config",
        nargs="?",
        help="the sweep's pipeline YAML, for its tracking.experiment and run dir runs/<name> "
        "(default: the embedded demo)",
    )
    p.add_argument(
        "--run-dir",
        help="the sweep's run directory, whose mlflow.db is read (default: runs/<config name>)",
    )
    p.add_argument(
        "--experiment",
        help="MLflow experiment (name or id) to read (default: the config's "
        "tracking.experiment, as `puma-ray sweep` uses)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow store to read (default: tracking.tracking_uri, else MLFLOW_TRACKING_URI, "
        "else the sqlite store of the run dir)",
    )
    p.add_argument("--run-id", help="the sweep's parent run (default: the latest sweep)")
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="print the comparison table of the latest `puma-ray run` instead (per method: "
        "mean over its seeds, 95%% interval, paired difference to full data)",
    )
    p.add_argument(
        "--out",
        help="folder for results.md/.csv and plots/ "
        "(default: reports/<experiment>-<run id> beside a sqlite store, else in .)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puma-ray",
        description="Margin-based data pruning (PUMA) for adversarial training, on Ray.",
        epilog="`puma-ray COMMAND --help` shows a command's arguments and examples.",
    )
    parser.add_argument("--version", action="version", version=f"puma-ray {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_fn, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="examples:\n" + EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # also after the command (`puma-ray run -v`); SUPPRESS keeps the global value otherwise
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
        if name == "report":
            _report_args(p)
            continue
        if name == "evaluate":  # `puma-ray evaluate CHECKPOINT`: the model is what it is about
            p.add_argument(
                "checkpoint",
                help="model.pt to evaluate (a local path or URI), or a RobustBench zoo model: "
                "robustbench:NAME (dataset, threat model and model_dir from the config's "
                "margin_model.robustbench) or robustbench:MODEL_DIR/DATASET/THREAT/NAME.pt",
            )
        _common(p, config_positional=name != "evaluate")
        if name in ("ingest", "score", "prune", "train"):
            p.add_argument("--force", action="store_true", help=FORCE_HELP)
        if name == "score":
            p.add_argument(
                "--embeddings",
                action="store_true",
                help="also write penultimate-layer embeddings (for the extrapolated strategy)",
            )
        if name in ("ingest", "prune"):
            p.add_argument(
                "--no-parallel",
                dest="parallel",
                action="store_false",
                help="do the work in this process instead of Ray tasks (same result)",
            )
        if name == "train":
            p.add_argument(
                "--dataset",
                choices=("kept", "full"),
                default="kept",
                help="kept: the pruned set with per-sample eps; full: all samples (margin model)",
            )
            p.add_argument("--kept-dir", help="kept set to train on (default: <run_dir>/kept)")
        if name in ("train", "evaluate"):
            p.add_argument("--name", help="output folder under the run dir and MLflow run name")
        if name == "evaluate":
            p.add_argument(
                "--split",
                choices=("test", "val"),
                default="test",
                help="the split to measure (default test; val: the validation split that "
                "training-time choices are made on)",
            )
        if name == "run":
            p.add_argument(
                "--force",
                dest="force_stage",
                action="append",
                default=[],
                choices=RUN_STAGES,
                metavar="STAGE",
                help=FORCE_STAGE_HELP,
            )
            p.add_argument(
                "--compare",
                action="store_true",
                help="also train the baselines (random subset of the same size, all data) with "
                "the same recipe and print them beside PUMA (config: compare: [random, full])",
            )
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="print what the run would do, stage by stage (run or skip, and which "
                "config keys or input files changed), and whether each stage's resources "
                "exist; runs, writes and locks nothing",
            )
            p.add_argument(
                "--train-margin-model",
                action="store_true",
                help="train the margin model (margin_model.train) instead of scoring with a "
                "given one (the demo's is packaged: puma_ray:demo_margin_model.pt)",
            )
            p.add_argument(
                "--seeds",
                type=int,
                metavar="N",
                help="train every method with N training seeds and report mean, 95%% interval "
                "and the paired difference to full data (config: seeds; default 1)",
            )
        if name == "prune":
            p.add_argument(
                "--out-dir",
                help="where the kept set goes (default: <run_dir>/kept; one per sweep trial)",
            )
        if name == "sweep":
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="print the trials, the shared input stages (run or skip, and why) and what "
                "a trial asks for; runs, writes and locks nothing",
            )
            p.add_argument(
                "--tracking-uri",
                help="MLflow store (default: tracking.tracking_uri, else MLFLOW_TRACKING_URI, "
                "else sqlite in the run dir); a shared server for concurrent trials",
            )
            p.add_argument(
                "--fresh",
                action="store_true",
                help="start the sweep over instead of restoring an interrupted one",
            )
        if name == "config":
            p.add_argument(
                "--schema",
                action="store_true",
                help="print the reference of every config key (Markdown: dotted path, type, "
                "default, description) instead of a config; docs/config.md is its output",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn = COMMANDS[args.command][0]
    start = time.perf_counter()
    try:
        if args.command == "config":  # prints a config, touches neither Ray nor MLflow
            code = fn(args)
        else:
            from puma_ray import logs

            # the log file is named once the run dir is known (`_run_dir`)
            with logs.session(args.command, verbose=args.verbose, say=_say):
                code = fn(args)
    except PumaRayError as e:
        print(f"puma-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\npuma-ray {args.command}: interrupted after {time.perf_counter() - start:.0f}s; "
            "finished parts are kept, rerun the same command to continue",
            file=sys.stderr,
        )
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
