"""Make puma_ray/assets/demo_margin_model.pt: the demo's margin model, trained exactly as
`puma-ray run --train-margin-model` would train it (the demo config's `margin_model.train`
recipe on the demo's training split), then shipped so that `puma-ray run` only scores.

    python scripts/train_demo_margin_model.py           # train and write the packaged file
    python scripts/train_demo_margin_model.py --check   # train again, compare with the file

Training on CPU is deterministic (same config and seed -> the same weights, see
docs/training.md), so `--check` reproduces the packaged weights bit for bit: it compares
`model_fingerprint` (every tensor's bytes), not the file's bytes, which also hold wall times.
About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "puma_ray", "assets", "demo_margin_model.pt")


def train(run_dir: str) -> str:
    from puma_ray.config import load_config
    from puma_ray.ingest import run_ingest
    from puma_ray.pipeline import margin_model_config
    from puma_ray.runtime import ensure_ray
    from puma_ray.train import run_train

    cfg = load_config(None, ["margin_model.checkpoint=null", "tracking.tracking_uri=none"])
    ensure_ray(cfg.ray)
    run_ingest(cfg, run_dir, parallel=True, log=print)
    summary = run_train(margin_model_config(cfg), run_dir, dataset="full", name="margin_model")
    print(summary.format())
    return summary.model_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the packaged file")
    args = parser.parse_args(argv)
    from puma_ray.models import model_fingerprint

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="demo-margin-model-") as run_dir:
        path = train(run_dir)
        fresh = model_fingerprint(path)
        print(f"trained in {time.perf_counter() - start:.0f} s; fingerprint {fresh}")
        if args.check:
            packaged = model_fingerprint(TARGET)
            same = fresh == packaged
            print(f"packaged {TARGET}: fingerprint {packaged} ({'same' if same else 'DIFFERENT'})")
            return 0 if same else 1
        os.makedirs(os.path.dirname(TARGET), exist_ok=True)
        shutil.copyfile(path, TARGET + ".tmp")
        os.replace(TARGET + ".tmp", TARGET)
        print(f"wrote {TARGET} ({os.path.getsize(TARGET) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
