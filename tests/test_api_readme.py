"""README's Python API example, exactly as written there (the ```python block of its "Python API"
section), run from a scratch working directory on the tests' shared local Ray; then its results
are checked against the files the stages wrote."""

import json
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_example() -> str:
    with open(README) as f:
        section = f.read().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


def test_readme_example_is_found():
    code = readme_example()
    assert "from puma_ray import api" in code and "api.run(" in code


@pytest.mark.slow
@pytest.mark.ray
def test_readme_api_example_runs(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(readme_example(), README, "exec"), ns)
    out = capsys.readouterr().out

    run_dir = tmp_path / "runs" / "notebook"
    result, kept, model, ev = ns["result"], ns["kept"], ns["model"], ns["ev"]
    assert result.run_dir == str(run_dir) and result.report.methods[0].method == "puma"
    assert "| puma |" in out  # the table it prints
    with open(run_dir / "kept_r05" / "manifest.json") as f:
        assert json.load(f)["counts"]["kept"] == kept.kept
    assert kept.kept < result.report.kept  # ratio 0.5 keeps fewer rows than the run's 0.3
    assert model.model_path == str(run_dir / "train_r05" / "model.pt") and model.rows == kept.kept
    with open(run_dir / "evaluate_r05" / "summary.json") as f:
        assert json.load(f)["pgd_acc"] == ev.pgd_acc
    # quiet by default: each call says where Ray's and MLflow's messages went
    assert f"logs: Ray and MLflow messages go to {run_dir}/logs/run-" in out
