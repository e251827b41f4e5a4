"""How a sweep names each trial's end, from what Tune left and the trial dirs on disk: a
result file means finished; a trial Tune ended without one was stopped by ASHA only when
ASHA is on (without it the sweep itself was stopped, and a rerun restores the trial)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from puma_ray.sweep.driver import RESULT_FILE, _trial_statuses


class _Grid(list):
    """What `_trial_statuses` reads of a Tune ResultGrid: per trial a path and an error, and
    the experiment's trial states."""

    def __init__(self, rows, states):
        super().__init__(SimpleNamespace(path=p, error=e) for p, e in rows)
        # Tune's trial ids are <experiment>_<index>; the trial dir is trial_<index>
        trials = [SimpleNamespace(trial_id=f"exp_{n}", status=s) for n, s in states.items()]
        self._experiment_analysis = SimpleNamespace(trials=trials)


@pytest.mark.parametrize(
    ("asha", "ended_without_result"), [(True, "stopped early"), (False, "interrupted")]
)
def test_a_trial_ended_without_a_result_is_asha_only_with_asha(
    tmp_path, asha, ended_without_result
):
    names = ["trial_00000", "trial_00001", "trial_00002", "trial_00003"]
    for n in names:
        os.makedirs(tmp_path / n)
    (tmp_path / names[0] / RESULT_FILE).write_text("{}")
    grid = _Grid(
        [(str(tmp_path / n), RuntimeError("boom") if n == names[2] else None) for n in names],
        {"00000": "TERMINATED", "00001": "TERMINATED", "00002": "ERROR", "00003": "RUNNING"},
    )
    assert _trial_statuses(grid, str(tmp_path), asha) == {
        names[0]: "finished",
        names[1]: ended_without_result,
        names[2]: "failed",
        names[3]: "interrupted",
    }
