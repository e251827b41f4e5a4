"""`puma-ray evaluate CHECKPOINT`: clean accuracy, PGD-k robust accuracy and (optionally)
AutoAttack on the held-out test split (or the validation split, `split="val"`), or its first
`evaluation.subset` rows. Every number carries its split in its name (`test/robust_acc`) and its
95% sampling interval over the rows (Wilson), so a difference smaller than the interval is not
read as a result.

The threat model is `training.attack` (norm, epsilon). PGD uses step size 2.5·ε/k (Madry et al.
2018, arXiv:1706.06083) with a random start per restart; a sample counts as robust only if no
restart fools the model. AutoAttack (Croce & Hein 2020, arXiv:2003.01690) runs with the reference
implementation (`pyautoattack`, through `puma_ray.attacks.autoattack`) when `evaluation.autoattack`
is set, in `evaluation.autoattack_version`; the robust accuracy after each of its attack stages
goes to the table, the summary and MLflow (`test/autoattack/apgd-ce`, ...). The summary records
which attacks actually ran.

The rows are evaluated in chunks on Ray workers, each chunk's result published atomically, so
an interrupted evaluation resumes where it stopped (`chunks`). The modules: `rows` (which rows),
`robustness` (PGD per row, pure PyTorch), `chunks` (the tasks and their files), `summary`
(what is reported), `stage` (`run_evaluate`).
"""

from puma_ray.evaluate.robustness import pgd_robust_rows, robust_accuracy
from puma_ray.evaluate.rows import SPLITS, load_split_rows, split_rows
from puma_ray.evaluate.stage import run_evaluate
from puma_ray.evaluate.summary import EvalSummary, autoattack_stages

__all__ = [
    "SPLITS",
    "EvalSummary",
    "autoattack_stages",
    "load_split_rows",
    "pgd_robust_rows",
    "robust_accuracy",
    "run_evaluate",
    "split_rows",
]
