"""Where the training loop runs, behind one interface (`_Session`): a Ray Train worker
(`_RaySession`: its dataset shard, checkpoints and reports through `ray.train`, sums over the
ranks through torch.distributed) or this process (`_LocalSession`, `ray.num_workers: 0`:
checkpoints in a plain directory)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable

import torch

from puma_ray.train.checkpoints import STATE_FILE, _load_state, _write_meta


class _Session:
    """What the loop needs from its runner; `_RaySession` and `_LocalSession` implement it."""

    rank = 0
    world_size = 1

    def data(self, stream: str):
        """The iterable (Ray `DataIterator` or `Dataset`) of one stream of the `EpochPlan`."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict | None:
        raise NotImplementedError

    def report(self, metrics: dict, state: dict | None) -> None:
        raise NotImplementedError

    def all_sum(self, values: list[float]) -> list[float]:
        return values

    def log(self, msg: str) -> None:
        """A progress line; a Ray Train worker's stdout reaches the driver (log_to_driver)."""
        print(msg, flush=True)


class _RaySession(_Session):
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        # Ray Train logs every report (metrics dict and all) at INFO from a logger named after
        # its file, which RunConfig's LoggingConfig does not reach; the loop logs each epoch.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    def log(self, msg: str) -> None:
        # not print(): Ray Train patches it to log *and* echo, so each line would show twice
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()

    def data(self, stream: str):
        import ray.train

        return ray.train.get_dataset_shard(stream)

    def checkpoint_state(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return _load_state(os.path.join(d, STATE_FILE))

    def report(self, metrics: dict, state: dict | None) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0 and state is not None:
                torch.save(state, os.path.join(d, STATE_FILE))
                _write_meta(d, state)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    def all_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


class _LocalSession(_Session):
    """num_workers=0: the loop in this process; checkpoints in a plain directory."""

    def __init__(self, datasets: dict, ckpt_dir: str, log: Callable[[str], None] = print):
        self.datasets = datasets
        self.ckpt_dir = ckpt_dir
        self.reports: list[dict] = []
        self.log = log

    def data(self, stream: str):
        return self.datasets[stream]

    def checkpoint_state(self) -> dict | None:
        path = os.path.join(self.ckpt_dir, STATE_FILE)
        return _load_state(path) if os.path.exists(path) else None

    def report(self, metrics: dict, state: dict | None) -> None:
        self.reports.append(metrics)
        if state is not None:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            tmp = os.path.join(self.ckpt_dir, STATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, os.path.join(self.ckpt_dir, STATE_FILE))
            _write_meta(self.ckpt_dir, state)
