"""The whole DVC pipeline on a tiny config, in a temporary copy of the repository."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

OVERRIDES = {
    "seed": 0,
    "data": {"source": "synthetic", "synthetic": {"num_train": 12, "num_val": 4, "image_size": 64}},
    "backbone": {"arch": "resnet18", "weights": "",
                 "pretrain": {"iters": 3, "batch_size": 4, "crop_size": 48, "queue_size": 16}},
    "freemask": {"short_side": 64, "max_side": 64, "score_threshold": 0.5},
    "freesolo": {"model": {"fpn_channels": 16, "head_channels": 16, "head_convs": 1, "mask_channels": 16,
                           "kernel_dim": 8, "grids": [8, 6, 4, 3, 2]},
                 "input": {"train_short_sides": [64], "max_side": 64},
                 "loss": {"pairwise_warmup": 1},
                 "solver": {"iters": 2, "batch_size": 2, "warmup_iters": 1},
                 "test": {"short_side": 64, "max_side": 64, "score_threshold": 0.0}},
    "exemplar": {"num_images": 4, "grabcut_iterations": 2, "refine_min_overlap": 0.0, "min_pool": 1},
    "eec": {"alpha": 0.5, "beta": 0.4, "exemplar_short_side": 64, "exemplar_max_side": 64, "start_iter": 1,
            "min_frac_used": 0.0},
    "runtime": {"device": "cpu", "pretrain": {"log_every": 1, "checkpoint_every": 2},
                "freesolo": {"log_every": 1, "checkpoint_every": 1, "eval_every": 1}},
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
    for item in ("dvc.yaml", "stages", "efsolo", ".dvcignore", "pyproject.toml", "README.md"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    _sh(root, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvc" / "plots_template.html", root / ".dvc" / "plots_template.html")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    _sh(root, "dvc", "repro")
    return root


@pytest.mark.e2e
def test_repro_produces_metrics_and_is_then_up_to_date(repo):
    metrics = json.loads((repo / "metrics" / "freemask.json").read_text())
    assert set(metrics["segm"]) >= {"AP", "AP50", "AR100"} and 0 <= metrics["segm"]["AP"] <= 1
    assert (repo / "metrics" / "pr" / "freemask" / "segm.csv").exists()
    assert (repo / "dvclive" / "backbone" / "metrics.json").exists()
    # learning curves (runtime.freesolo.eval_every = 1); Exemplar-FreeSOLO starts after eec.start_iter = 1
    for model, steps in (("freesolo", ["1", "2"]), ("exemplar_freesolo", ["2"])):
        curve = (repo / "dvclive" / model / "plots" / "metrics" / "train" / "val" / "segm_AP.tsv").read_text()
        assert [line.split()[0] for line in curve.splitlines()] == ["step", *steps]
    labels = json.loads((repo / "pseudo" / "freemask" / "train.json").read_text())
    assert len(labels["images"]) == 12
    # every model's val predictions under paths.predictions, Free Mask's too
    assert (repo / "predictions" / "freemask" / "val.json").exists()
    assert not (repo / "pseudo" / "freemask" / "val.json").exists()
    for model in ("freesolo", "exemplar_freesolo"):
        m = json.loads((repo / "metrics" / f"{model}.json").read_text())
        assert 0 <= m["segm"]["AP"] <= 1 and 0 <= m["bbox"]["AR100"] <= 1
    train_stats = json.loads((repo / "metrics" / "train" / "exemplar_freesolo.json").read_text())
    assert {"eec/frac_pos", "eec/logit_gap", "eec/grad_ratio"} <= set(train_stats["round1"]["final"])
    assert "frac_used" in train_stats["round1"]["extra_mean"]
    # the pool stage measured the cosines the loss selects on, and the thresholds came from them
    pool = json.loads((repo / "metrics" / "pool.json").read_text())
    assert pool["calibration_images"] == 12 and pool["rows"] <= 12 and "p50" in pool["best_cosine"]
    assert train_stats["thresholds"]["positive_cosine"] == pool["thresholds"]["positive_cosine"]
    calibration = torch.load(repo / "exemplars" / "pool.pt", weights_only=True)["calibration"]
    assert calibration["slots"] == 12 and pool["embedded"] == round(pool["rows"] / 12, 4)  # granularity: image
    assert (repo / "metrics" / "pool" / "cosines.csv").read_text().startswith("quantile,best_cosine,worst_cosine")
    # eec.start_iter 1: Exemplar-FreeSOLO continued FreeSOLO's state after 1 of its 2 iterations
    eec_curve = (repo / "dvclive" / "exemplar_freesolo" / "plots" / "metrics" / "train" / "eec" / "frac_used.tsv")
    assert [line.split()[0] for line in eec_curve.read_text().splitlines()] == ["step", "2"]
    assert (repo / "exemplars" / "crops_sheet.png").exists() and (repo / "exemplars" / "pool_sheet.png").exists()
    assert len(list((repo / "reports" / "overlays").glob("*.png"))) == 4  # every val image (4 < report.num_images)
    assert "Data and pipelines are up to date" in _sh(repo, "dvc", "status")
    assert "Running stage" not in _sh(repo, "dvc", "repro")


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def _changed_after(repo, section: str, key: str, value, run: bool = False) -> tuple[set[str], set[str]]:
    """Stages `dvc status` reports after setting ``section.key``, and with ``run`` the stages
    `dvc repro` then runs; restored after (and re-run, if anything ran)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    old = params[section][key]
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        return set(json.loads(_sh(repo, "dvc", "status", "--json"))), _ran(_sh(repo, "dvc", "repro")) if run else set()
    finally:
        params[section][key] = old
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        if run:
            _sh(repo, "dvc", "repro")


@pytest.mark.e2e
def test_a_param_change_marks_only_the_stages_that_read_it(repo):
    """`dvc status` names the stages that declare the key; DVC's graph re-runs what follows them
    (one real re-run is checked below, for the README's eec.alpha)."""
    status, _ = _changed_after(repo, "freemask", "score_threshold", 0.6)
    # pool and exemplar_freesolo read it too: the EEC guide mask is filtered as Free Mask filters
    assert status == {"freemask", "pool", "exemplar_freesolo"}
    # the arithmetic changes every result the networks compute: the stages that train or label
    text = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load(text), "precision": "bfloat16"}))
    try:
        assert set(json.loads(_sh(repo, "dvc", "status", "--json"))) == {"backbone", "freemask", "freesolo",
                                                                          "exemplar_freesolo"}
    finally:
        (repo / "params.yaml").write_text(text)


@pytest.mark.e2e
def test_eec_alpha_reruns_only_exemplar_training_and_its_evaluation(repo):
    status, ran = _changed_after(repo, "eec", "alpha", 0.6, run=True)
    assert status == {"exemplar_freesolo"}
    # its evaluation re-runs too whenever the predictions change (DVC skips it if they do not)
    assert "exemplar_freesolo" in ran and ran <= {"exemplar_freesolo", "evaluate@exemplar_freesolo", "report"}


@pytest.mark.e2e
def test_runtime_settings_rerun_nothing(repo):
    """Logging and checkpoint intervals, batch and shard sizes and the device are not results."""
    text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["runtime"] = _merge(params["runtime"], {"device": "auto", "pretrain": {"log_every": 7},
                                                   "freemask": {"batch_size": 3, "shard_size": 5},
                                                   "freesolo": {"log_every": 3, "checkpoint_every": 9,
                                                                "eval_every": 0}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        assert json.loads(_sh(repo, "dvc", "status", "--json")) == {}
    finally:
        (repo / "params.yaml").write_text(text)


def _stage_error(repo, tmp_path, stage: str, over: dict) -> tuple[Path, list[str]]:
    """Run one stage with the tiny params changed by ``over``; it must exit 1. (params file, stderr lines)"""
    params = tmp_path / f"{stage}.yaml"
    params.write_text(yaml.safe_dump(_merge(TINY, over)))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, f"stages/{stage}.py", str(params)], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return params, proc.stderr.strip().splitlines()


@pytest.mark.e2e
def test_a_pool_below_min_pool_stops_exemplar_training_with_one_line(repo, tmp_path):
    _, lines = _stage_error(repo, tmp_path, "exemplar_freesolo", {"exemplar": {"min_pool": 1000}})
    assert len(lines) == 1 and "fewer than exemplar.min_pool (1000)" in lines[0] and "pool.pt" in lines[0]


@pytest.mark.e2e
def test_number_of_exemplars_marks_the_exemplar_branch_only(repo):
    status, _ = _changed_after(repo, "exemplar", "num_images", 3)
    assert status == {"exemplars"}  # refine, pool, exemplar_freesolo follow it in the graph


@pytest.mark.e2e
def test_plots_show_gives_one_html_report_with_every_plot(repo, tmp_path):
    _sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    for needle in ("reports_overlays_", "exemplars_pool_sheet_png", "freesolo mask precision-recall",
                   "val segm AP (percent) against training iterations",
                   "centred cosine of training images to the exemplar pool",
                   "dvclive/freesolo/plots/metrics/train/max_proj.tsv",
                   "dvclive/backbone/plots/metrics/pretrain/loss.tsv"):
        assert needle in html, needle
    assert "cdn.jsdelivr" not in html and "vega-embed 6.18.2" in html  # renders with no network
    images = list((tmp_path / "plots").rglob("*.png"))
    assert len(images) >= 4 + 2  # the overlays and the two contact sheets


@pytest.mark.e2e
def test_bad_params_stop_with_one_line(repo, tmp_path):
    bad, lines = _stage_error(repo, tmp_path, "freemask", {"freemask": {"mask_threshold": 2}})
    assert lines == [f"error: {bad}: freemask.mask_threshold must be in [0, 1], got 2.0"]


def _readme_block(start: str, end: str) -> str:
    text = (REPO / "README.md").read_text()
    block = text[text.index(start) + len(start):text.index(end)]
    return block.split("```bash", 1)[1].rsplit("```", 1)[0]


@pytest.mark.e2e
def test_readme_commands_after_the_demo_run_from_a_fresh_shell(repo):
    """The README's after-demo block, as written, in a shell whose PATH lacks the environment.
    Last in the module: it leaves eec.alpha changed in the workspace."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests run outside a virtual environment: there is no .venv to activate")
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    with open(repo / ".git" / "info" / "exclude", "a") as f:
        f.write(".venv\nseg/\n")  # .gitignore's ".venv/" does not match a symlink
    block = _readme_block("<!-- after-demo:start -->", "<!-- after-demo:end -->")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and Path(p).resolve() != BIN.resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=path, DVC_NO_ANALYTICS="1")
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"README block failed:\n{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ran = _ran(proc.stdout)  # the evaluation re-runs only if the tiny model's predictions changed
    assert "exemplar_freesolo" in ran and ran <= {"exemplar_freesolo", "evaluate@exemplar_freesolo", "report"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["eec"]["alpha"] == 0.85
    assert (repo / "dvc_plots" / "index.html").exists()
    assert json.loads((repo / "seg" / "results.json").read_text()) is not None
    assert "exemplar_freesolo" in proc.stdout  # dvc exp show / metrics diff list the model's metrics
