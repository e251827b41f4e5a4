"""`puma-ray sweep`: Ray Tune over prune ratio x epsilon scaling (x strategy, q, alpha, seeds),
one trial = prune -> Ray Train run -> evaluation, with an MLflow parent run per sweep, a child
run per trial, and a results table and plots at the end.

The package follows the sweep's seams; dependencies point one way, driver -> trial -> plan:

  plan      the search space expanded into trials and checked before Ray starts
  trial     what one Tune trial does (prune, train, evaluate, log to its MLflow run)
  driver    `run_sweep`: resources, shared inputs, parent run, the Tune experiment, the report

The shape (Ray 2.60): every Tune trial is a plain function that prunes its kept set from the
scores computed once for the whole sweep (never rescored per trial), builds and fits its own
`TorchTrainer` through `train.run_train`, and relays the Train reports to Tune with
`TuneReportCallback`, so ASHA can stop weak trials on their per-epoch test robust accuracy. The
trial's Ray Train run is named after the trial, so a restarted trial resumes its own
checkpoints; its kept set, model and evaluation are skipped when already complete.

Layout under the run directory (ingest, margin model and scores are shared with `puma-ray run`):

  sweep/<name>-<fingerprint>/       one sweep; a changed config (not resources) gets a new one
    sweep.json                      fingerprint and MLflow parent run (reopened by a restore)
    tune/                           the Tune experiment: `Tuner.restore` finishes what is left
    ray_train/<trial>/              each trial's Ray Train run (checkpoints)
    <trial>/kept/                   the trial's kept set + manifest + margin histogram
    <trial>/train/, <trial>/evaluate/   run_train and run_evaluate outputs
    <trial>/result.json             the trial's final numbers, written last
    report/                         results.csv, results.md, plots/*.png (also on MLflow)

Resources per trial (all logical Ray resources, so the same config scales from a laptop to a
cluster): the trial process only orchestrates, like Ray Train's own controller, so it holds
`sweep.trial_cpus` (default 0: a token of memory, as Tune needs a bundle to place it); its Train
workers add `ray.num_workers x ray.cpus_per_worker` (+1 GPU each with `ray.use_gpu`) while
training; the evaluation task after training takes `ray.cpus_per_worker`. With in-process
training (`ray.num_workers: 0`) the trial itself trains and holds `ray.cpus_per_worker`.
Ray Data's read tasks inside training ask for one more CPU each, so one CPU stays free.
`sweep.max_concurrent_trials` is capped to what fits a local instance; on a cluster
(`--address` / RAY_ADDRESS) it is left as given, because an autoscaler adds nodes for trials
that wait.
"""

from puma_ray.sweep.driver import (
    DATA_CPUS,
    STATE_FILE,
    TUNE_NAME,
    SweepResult,
    _fit_concurrency,
    prepare_inputs,
    run_sweep,
    trial_resources,
)
from puma_ray.sweep.plan import (
    BASELINE_VALUES,
    SweepError,
    SweepPlan,
    apply_values,
    is_unpruned,
    plan_sweep,
    sweep_fingerprint,
    trial_values,
)

# A Tune experiment saved before this module became a package pickled its trial name creator
# as `puma_ray.sweep._trial_name`; these names keep such a sweep restorable.
from puma_ray.sweep.trial import RESULT_FILE, TRIAL_FILE, _trial_fn, _trial_name

__all__ = [
    "BASELINE_VALUES",
    "DATA_CPUS",
    "RESULT_FILE",
    "STATE_FILE",
    "TRIAL_FILE",
    "TUNE_NAME",
    "SweepError",
    "SweepPlan",
    "SweepResult",
    "_fit_concurrency",
    "_trial_fn",
    "_trial_name",
    "apply_values",
    "is_unpruned",
    "plan_sweep",
    "prepare_inputs",
    "run_sweep",
    "sweep_fingerprint",
    "trial_resources",
    "trial_values",
]
