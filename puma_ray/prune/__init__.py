"""`puma-ray prune`: the global selection (PUMA and its baselines) and the kept set it writes.

Inputs (under the run directory):
  data/train/        sample shards + dataset.json
  scores/            DeepFool margins per sample shard (`shard=part-XXXXX/`), manifest.json last;
                     needed by puma / high_margin / low_margin / extrapolated, optional for
                     random / none (used for the margin histogram only)
  embeddings/        per-row embeddings, same layout; only for `extrapolated`

Output `<run_dir>/kept/`:
  part-XXXXX.parquet the kept rows of sample shard part-XXXXX (id, image, label, source) plus
                     `eps` float32, the per-sample training epsilon; one file per input shard,
                     written under a hidden temp name and renamed
  margin_hist.png    kept vs pruned margins per source
  manifest.json      written last: strategy, parameters, cut keys, counts, input fingerprints
  .puma-ray-output   the marker that makes the folder prune's to replace (`puma_ray.outputs`);
                     an `--out-dir` holding anything else is refused, never cleared

For `extrapolated`, `<run_dir>/extrapolated/` holds every row's margin (its same-class k-NN
estimate, leave-one-out for the scored rows; or their exact score) and the scored rows' flags,
with its own manifest, reused while its inputs are unchanged.

How the selection scales: the exact cut keys come from `selection.find_cuts`, a radix select
whose passes are one Ray task per shard (or the same function in-process when Ray is not up);
each task reads only the id/label/source/margin columns of its shard (and pred/converged when a
row policy needs them) and returns a histogram or a few candidate keys. The driver holds
O(buckets x targets), never a row list. A last pass per shard applies the cuts and writes that
shard's kept rows.

The package follows the stage's seams; imports point one way (driver, then extrapolate, passes
and report, then shards and layout):

  layout       the folders prune writes (kept/, extrapolated/), their manifests and fingerprints
  shards       the work on one shard, run inside Ray tasks: read, validate, pass, count, write
  passes       functions over all shards (Ray tasks or in-process) and the radix-select passes
  extrapolate  k-NN extrapolated margins from a scored subset (`pruning.strategy: extrapolated`)
  report       PruneSummary, the description of the selection, group report, margin histogram
  driver       `run_prune`: checks, inputs, fingerprint, passes, write pass, manifest
"""

from puma_ray.prune.driver import run_prune
from puma_ray.prune.layout import (
    EXTRAPOLATED_FORMAT,
    FORMAT,
    MANIFEST,
    extrapolated_dir,
    kept_dir,
    kept_files,
)
from puma_ray.prune.passes import count_selection, select_scalable
from puma_ray.prune.report import PruneSummary
from puma_ray.prune.shards import HIST_EDGES, SOURCES, STATUSES, ShardInput

__all__ = [
    "EXTRAPOLATED_FORMAT",
    "FORMAT",
    "HIST_EDGES",
    "MANIFEST",
    "SOURCES",
    "STATUSES",
    "PruneSummary",
    "ShardInput",
    "count_selection",
    "extrapolated_dir",
    "kept_dir",
    "kept_files",
    "run_prune",
    "select_scalable",
]
