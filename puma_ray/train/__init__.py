"""`puma-ray train`: adversarial training on the kept set (or the full set, for the margin model)
with Ray Train (DDP), per-sample epsilon, checkpoints every epoch and automatic resume.

The loop, `train_loop(config)`, is a plain function of a dict. `run_train` hands it to
`ray.train.torch.TorchTrainer` (CPU workers with gloo, GPU workers with nccl), or calls it in this
process when `ray.num_workers == 0` (for debugging), through the same `_Session` interface.

- Data: Ray Data streams the Parquet shards; Ray Train splits them across workers with an equal
  streaming split, so the workers see disjoint rows and never hold a full copy. With real and
  synthetic rows, each source is its own stream and every batch holds `real_fraction` real rows
  (`epoch_plan`); streams reshuffle every pass through a local shuffle buffer. Images are
  decoded and augmented (random crop with 4 pixels of padding + horizontal flip) as whole-batch
  tensor ops.
- Objectives: PGD-AT (Madry et al. 2018, arXiv:1706.06083) and TRADES (Zhang et al. 2019,
  arXiv:1901.08573) with the per-sample eps of the kept set (`eps` column; PUMA shrinks it for
  the lowest-margin samples), or `training.attack.epsilon` for every row of an unpruned set.
  The attack runs on the unwrapped model without touching BatchNorm's running statistics (PGD
  in eval mode; TRADES as `training.trades_attack_bn`), so they come from the training
  forward(s) only: TRADES forwards the clean and the adversarial batch separately, as the
  reference code, unless `training.trades_forward: concatenated`.
- Optimiser: SGD-Nesterov, weight decay only on conv/linear weights (not BatchNorm or biases),
  linear warm-up then cosine (or one-cycle / constant) stepped per batch; label smoothing; an
  optional EMA of the weights with the usual warm-up decay min(d, (1+t)/(10+t)).
- Epoch length follows the dataset (kept-set) size, so pruning saves compute, or is a fixed
  number of samples (`epoch_length: fixed`); `eps_warmup_epochs` ramps every sample's eps in.
- `training.batch_size` is the global batch, split equally over the workers (a batch that does
  not split is refused), so the batch and the lr schedule's steps do not depend on the worker
  count (`batch_plan`); checkpoints record them, and a resume that would change them is refused.
- Every epoch all ranks call `ray.train.report(metrics, checkpoint)`; only rank 0 writes the
  checkpoint (model, EMA, optimiser, scheduler, epoch, torch RNG, metric history, batch plan).
  The Ray run is named `<name>-<fingerprint of every input>`, so rerunning the same inputs
  resumes from the last checkpoint (or is a no-op once `summary.json` exists), changed inputs
  never resume a stale one, and `force=True` deletes the run's checkpoints and starts over.

The package follows the stage's seams; imports point one way (driver, then loop, then the rest):

  step         one optimiser step as pure tensor code (augment, attack, loss, lr/eps schedules,
               EMA): no Ray, also timed by benchmarks/train.py
  plan         how an epoch is built (`epoch_plan`) and the batch plan a resume must keep
  checkpoints  what an epoch checkpoint holds on disk (`state.pt`, `plan.json`), read back
  init         `training.init_from` (fine-tuning): the network trained and its initial weights
  streams      the data streams of one worker: files per stream, reshuffled passes, exact cuts
  session      where the loop runs: a Ray Train worker or this process
  loop         `train_loop`: one worker's loop (run by every Ray Train worker)
  driver       `run_train`: inputs, fingerprint, resume checks, MLflow run, TorchTrainer, model
"""

from puma_ray.train.checkpoints import (
    META_FILE,
    STATE_FILE,
    _checkpoint_metas,
    _last_reported_epoch,
    _load_state,
    _write_meta,
)
from puma_ray.train.driver import TrainSummary, run_train
from puma_ray.train.loop import train_loop
from puma_ray.train.plan import (
    EpochPlan,
    TrainingError,
    batch_plan,
    check_resume,
    epoch_plan,
    schedule_steps,
)
from puma_ray.train.session import _LocalSession, _RaySession, _Session
from puma_ray.train.step import (
    EMA,
    adversarial_batch,
    augment_batch,
    eps_factor,
    lr_factor,
    param_groups,
    train_step,
    training_loss,
)
from puma_ray.train.streams import _exact, stream_files

__all__ = [
    "EMA",
    "META_FILE",
    "STATE_FILE",
    "EpochPlan",
    "TrainSummary",
    "TrainingError",
    "_LocalSession",
    "_RaySession",
    "_Session",
    "_checkpoint_metas",
    "_exact",
    "_last_reported_epoch",
    "_load_state",
    "_write_meta",
    "adversarial_batch",
    "augment_batch",
    "batch_plan",
    "check_resume",
    "epoch_plan",
    "eps_factor",
    "lr_factor",
    "param_groups",
    "run_train",
    "schedule_steps",
    "stream_files",
    "train_loop",
    "train_step",
    "training_loss",
]
