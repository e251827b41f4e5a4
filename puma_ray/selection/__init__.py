"""Selection rules for margin-based data pruning: pure NumPy, no Ray, no file I/O.

What lives here (the stage in `puma_ray.prune` only reads shards, runs passes and writes):

* **The exact order.** Rows of a group are ordered by the key (tier, margin, id) ascending, or
  by (hash(seed, id), id) for `random`. A key is a 128-bit unsigned integer: the high 64 bits
  hold the rank tier (bits 32-33, see the row policies) above the order-preserving bit pattern
  of the float32 margin (or the 64-bit hash), the low 64 bits the order-preserving pattern of
  the int64 id. Ids are unique, so keys are unique and every cut "the row of rank r" is one
  exact key; the tie-break between equal margins is the id.
* **The row policies** (`apply_policies`): what the margin strategies do with rows the margin
  model misclassifies (`pruning.misclassified`) and rows whose DeepFool did not converge
  (`pruning.nonconverged`). A policy either moves a row to another rank tier (above or below
  every converged row) or takes it out of the order: always kept at the base epsilon, or always
  dropped. Forced rows still count in their group's size, so the ratio alone fixes how many
  rows a group loses; the policies decide which.
* **The strategies** as rank intervals per group (`plan_group`): `puma` and `high_margin` keep
  the first n - n_drop rows of the order (drop the highest margins), `low_margin` and `random`
  keep the last n - n_drop, `none` keeps everything.
* **The epsilon rules** (`EPS_RULES`, one entry per rule). The PUMA paper (Maroto & Frossard,
  arXiv 2405.06298) lowers the training epsilon of the lowest-margin samples, but its exact
  rule is not public, so this is a family; adding a rule is one function plus one dict entry.
* **The in-memory reference** `select_reference` (argsort over all rows), and the pieces of the
  scalable exact selection: `shard_stats` (what one shard contributes to a pass) and `find_cuts`
  (the driver's radix select over those passes, O(buckets x targets) memory), then `apply_cuts`
  (kept mask and per-sample epsilon of one shard from the cut keys).
* **k-NN extrapolation** (Nieth et al., arXiv 2406.13283): `extrapolation_subset` (the rows
  DeepFool scores), `holdout_subset`, and the estimates in `knn` (`knn_mean` is re-exported).

The modules, each importing only those before it: `keys` (the key encoding and the hashes),
`rules` (parameters, policies, plans, epsilon rules, the reference), `radix` (the scalable
select), `knn`. Everything is importable from `puma_ray.selection`, as when it was one module.
"""

from puma_ray.selection.keys import (
    EXTRAPOLATION_SALT,
    HOLDOUT_SALT,
    KEY_END,
    M64,
    RANDOM_SALT,
    SIGN32,
    SIGN64,
    TIER_ABOVE,
    TIER_BELOW,
    TIER_NAMES,
    TIER_NORMAL,
    describe_key,
    extrapolation_subset,
    hash_ids,
    holdout_subset,
    id_order_key,
    keys_below,
    margin_from_order_key,
    margin_order_key,
    row_keys,
    selection_digest,
)
from puma_ray.selection.knn import (
    knn_mean,
)
from puma_ray.selection.radix import (
    DuplicateKeyError,
    Request,
    apply_cuts,
    find_cuts,
    group_slices,
    shard_stats,
)
from puma_ray.selection.rules import (
    EPS_RULES,
    FORCED_BASE,
    FORCED_DROP,
    MISCLASSIFIED_POLICIES,
    NONCONVERGED_POLICIES,
    OUT_OF_SCOPE,
    STRATEGIES,
    EpsInputs,
    EpsRule,
    GroupPlan,
    Selection,
    SelectionParams,
    apply_policies,
    forced_code,
    forced_counts,
    group_index,
    plan_group,
    round_half_up,
    select_reference,
    selection_rows,
)

__all__ = [
    "DuplicateKeyError",
    "EPS_RULES",
    "EXTRAPOLATION_SALT",
    "EpsInputs",
    "EpsRule",
    "FORCED_BASE",
    "FORCED_DROP",
    "GroupPlan",
    "HOLDOUT_SALT",
    "KEY_END",
    "M64",
    "MISCLASSIFIED_POLICIES",
    "NONCONVERGED_POLICIES",
    "OUT_OF_SCOPE",
    "RANDOM_SALT",
    "Request",
    "SIGN32",
    "SIGN64",
    "STRATEGIES",
    "Selection",
    "SelectionParams",
    "TIER_ABOVE",
    "TIER_BELOW",
    "TIER_NAMES",
    "TIER_NORMAL",
    "apply_cuts",
    "apply_policies",
    "describe_key",
    "extrapolation_subset",
    "find_cuts",
    "forced_code",
    "forced_counts",
    "group_index",
    "group_slices",
    "hash_ids",
    "holdout_subset",
    "id_order_key",
    "keys_below",
    "knn_mean",
    "margin_from_order_key",
    "margin_order_key",
    "plan_group",
    "round_half_up",
    "row_keys",
    "select_reference",
    "selection_digest",
    "selection_rows",
    "shard_stats",
]
