"""The whole DVC pipeline on a tiny config, in a temporary copy of the repository."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

OVERRIDES = {
    "seed": 0,
    "device": "cpu",
    "data": {"source": "synthetic", "synthetic": {"num_train": 12, "num_val": 4, "image_size": 64}},
    "backbone": {"arch": "resnet18", "weights": "",
                 "pretrain": {"iters": 3, "batch_size": 4, "crop_size": 48, "queue_size": 16, "log_every": 1,
                              "checkpoint_every": 2}},
    "freemask": {"short_side": 64, "max_side": 64, "score_threshold": 0.5},
}


def _merge(base: dict, over: dict) -> dict:
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


TINY = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), OVERRIDES)


def _sh(cwd, *args):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for item in ("dvc.yaml", "stages", "efsolo", ".dvcignore", "pyproject.toml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    (root / ".gitignore").write_text("/data/prepared\n/models\n/pseudo\n/dvclive\n/checkpoints\n__pycache__/\n")
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    _sh(root, "dvc", "init", "-q")
    _sh(root, "dvc", "repro")
    return root


@pytest.mark.e2e
def test_repro_produces_metrics_and_is_then_up_to_date(repo):
    metrics = json.loads((repo / "metrics" / "freemask.json").read_text())
    assert set(metrics["segm"]) >= {"AP", "AP50", "AR100"} and 0 <= metrics["segm"]["AP"] <= 1
    assert (repo / "metrics" / "pr" / "freemask" / "segm.csv").exists()
    assert (repo / "dvclive" / "backbone" / "metrics.json").exists()
    labels = json.loads((repo / "pseudo" / "freemask" / "train.json").read_text())
    assert len(labels["images"]) == 12
    assert "Data and pipelines are up to date" in _sh(repo, "dvc", "status")
    assert "Running stage" not in _sh(repo, "dvc", "repro")


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.mark.e2e
def test_a_param_change_reruns_only_downstream(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["freemask"]["score_threshold"] = 0.6
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        status = json.loads(_sh(repo, "dvc", "status", "--json"))
        assert set(status) == {"freemask"}
        assert _ran(_sh(repo, "dvc", "repro")) == {"freemask", "evaluate@freemask"}
    finally:
        params["freemask"]["score_threshold"] = 0.5
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        _sh(repo, "dvc", "repro")


@pytest.mark.e2e
def test_bad_params_stop_with_one_line(repo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_merge(TINY, {"freemask": {"mask_threshold": 2}})))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "stages/freemask.py", str(bad)], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: freemask.mask_threshold must be in [0, 1], got 2.0"]
