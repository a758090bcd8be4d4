"""Seeds: the whole pipeline under seeds 0, 1, 2, ... as a DVC experiment queue, summarised.

    efsolo seeds                 # dvc exp run --queue -S seed=N (N = 0 1 2), dvc queue start, wait
    efsolo seeds --seeds 0 --seeds 1 --seeds 2 --seeds 3 -S freesolo.solver.iters=400

Each seed re-runs every stage that reads ``seed`` (the synthetic data, pretraining, Free Mask,
both trainings), in DVC's queue, one after the other, as experiments named ``seed-N``. The
metrics of every model are then read back with ``dvc exp show --json`` and written to
``metrics/seeds.json``: per seed, and the mean and (sample) standard deviation over seeds.
"""
from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

from efsolo.config import DATA_METRICS, MODELS, load_params
from efsolo.utils import atomic
from efsolo.utils.errors import EfsoloError

README_START, README_END = "<!-- seeds:start -->", "<!-- seeds:end -->"
KEYS = (("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"), ("segm", "AR100"), ("bbox", "AP"), ("bbox", "AP50"))
EEC_KEYS = ("frac_embedded", "frac_used", "grad_ratio", "logit_gap")  # Exemplar-FreeSOLO's training diagnostics (means)
EEC_STATS = "train/exemplar_freesolo.json"


def _dvc(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise EfsoloError(f"dvc {' '.join(args)} failed: {err}")
    return proc.stdout


def experiment_metrics(show: list | dict, names: list[str], metrics_dir: str = "metrics") -> dict[str, dict[str, dict]]:
    """From ``dvc exp show --json`` output, the metrics of the experiments called ``names``:
    {name: {model: metrics dict}} (the newest run of a name when it ran more than once), read
    from ``<metrics_dir>/<model>.json`` (``paths.metrics``)."""
    found: dict[str, tuple[str, dict]] = {}

    def walk(node) -> None:  # noqa: ANN001
        if isinstance(node, list):
            for x in node:
                walk(x)
            return
        if not isinstance(node, dict):
            return
        data = node.get("data")
        if node.get("name") in names and isinstance(data, dict) and data.get("metrics"):
            stamp = str(data.get("timestamp") or "")
            if node["name"] not in found or stamp > found[node["name"]][0]:
                metrics = {}
                for path, blob in data["metrics"].items():
                    model = Path(path).stem
                    if not (isinstance(blob, dict) and blob.get("data")):
                        continue  # a metrics file missing in that run comes as an "error"
                    if Path(path).parent == Path(metrics_dir) and model in MODELS:
                        metrics[model] = blob["data"]
                    elif Path(path) == Path(metrics_dir) / EEC_STATS:
                        metrics["eec"] = eec_means(blob["data"])
                    elif Path(path) == Path(metrics_dir) / DATA_METRICS:
                        metrics["data"] = blob["data"]
                found[node["name"]] = (stamp, metrics)
        for v in node.values():
            walk(v)

    walk(show)
    return {name: m for name, (_, m) in found.items()}


def eec_means(stats: dict) -> dict[str, float]:
    """The EEC diagnostics' means over Exemplar-FreeSOLO's training (its stage's stats file)."""
    rounds = [v for k, v in stats.items() if k.startswith("round")]
    means = rounds[-1].get("extra_mean", {}) if rounds else {}
    return {k: means[k] for k in EEC_KEYS if k in means}


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict:
    """Per seed {model: {"segm AP": percent, ...}} and, per model and figure, mean and sample std.
    Only models that every seed has are kept (a run limited to some stages lacks the others)."""
    common = [m for m in MODELS if all(m in models for models in per_seed.values())]
    rows: dict[int, dict[str, dict[str, float]]] = {}
    for seed, models in sorted(per_seed.items()):
        rows[seed] = {m: {f"{t} {k}": round(100 * models[m][t][k], 2) for t, k in KEYS
                          if t in models[m] and k in models[m][t]} for m in common}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for m in MODELS:
        figures = sorted({f for r in rows.values() for f in r.get(m, {})})
        for f in figures:
            xs = [r[m][f] for r in rows.values() if f in r.get(m, {})]
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
            summary.setdefault(m, {})[f] = {"mean": round(mean, 2), "std": round(std, 2), "n": len(xs)}
    result = {"seeds": {str(s): r for s, r in rows.items()}, "summary": summary}
    eec = {str(s): models["eec"] for s, models in sorted(per_seed.items()) if models.get("eec")}
    if eec:
        result["eec"] = eec
    data = {str(s): models["data"] for s, models in sorted(per_seed.items()) if models.get("data")}
    if data:  # the ground truth each seed was scored on
        result["data"] = data
    if "freesolo" in common and "exemplar_freesolo" in common:
        result["paired"] = paired(rows)
    if "freemask" in common and "freesolo" in common:  # self-training's margin over its own labels
        result["margin"] = paired(rows, base="freemask", other="freesolo")
    return result


def paired(rows: dict[int, dict[str, dict[str, float]]], base: str = "freesolo",
           other: str = "exemplar_freesolo") -> dict:
    """``other`` against ``base`` seed by seed: the difference of every figure per seed, its mean and
    sample std over the seeds, whether ``other`` is higher in every seed, and the ratio of the means."""
    figures = sorted(set.intersection(*(set(r[base]) & set(r[other]) for r in rows.values())))
    diffs = {str(s): {f: round(r[other][f] - r[base][f], 2) for f in figures} for s, r in rows.items()}
    out: dict = {"base": base, "other": other, "difference": diffs, "difference_mean": {}, "difference_std": {},
                 "higher_every_seed": {}, "ratio_of_means": {}}
    for f in figures:
        xs = [d[f] for d in diffs.values()]
        mean = sum(xs) / len(xs)
        out["difference_mean"][f] = round(mean, 2)
        out["difference_std"][f] = round(math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)), 2) \
            if len(xs) > 1 else 0.0
        out["higher_every_seed"][f] = all(d[f] > 0 for d in diffs.values())
        mb = sum(r[base][f] for r in rows.values()) / len(rows)
        mo = sum(r[other][f] for r in rows.values()) / len(rows)
        out["ratio_of_means"][f] = round(mo / mb, 3) if mb > 0 else None
    return out


def table(result: dict) -> str:
    """Markdown: one row per model and seed, then mean ± std."""
    figures = [f"{t} {k}" for t, k in KEYS]
    lines = ["| model | seed | " + " | ".join(figures) + " |", "|---|---|" + "---|" * len(figures)]
    for m in MODELS:
        for seed, r in result["seeds"].items():
            if m in r:
                lines.append(f"| {m} | {seed} | " + " | ".join(f"{r[m].get(f, '-')}" for f in figures) + " |")
        if m in result["summary"]:
            s = result["summary"][m]
            lines.append(f"| {m} | mean ± std | " + " | ".join(
                f"{s[f]['mean']:.1f} ± {s[f]['std']:.1f}" if f in s else "-" for f in figures) + " |")
    for key in ("margin", "paired"):
        if key not in result:
            continue
        pr = result[key]
        base, other = pr.get("base", "freesolo"), pr.get("other", "exemplar_freesolo")
        for seed, d in pr["difference"].items():
            lines.append(f"| {other} - {base} | {seed} | " +
                         " | ".join(f"{d[f]:+.2f}" if f in d else "-" for f in figures) + " |")
        if "difference_mean" in pr:
            lines.append(f"| {other} - {base} | mean ± std | " + " | ".join(
                f"{pr['difference_mean'][f]:+.2f} ± {pr['difference_std'][f]:.2f}" if f in pr["difference_mean"] else "-"
                for f in figures) + " |")
        lines.append(f"| {other} / {base} | ratio of means | " + " | ".join(
            f"{pr['ratio_of_means'][f]:.2f}" if pr["ratio_of_means"].get(f) else "-" for f in figures) + " |")
    if "eec" in result:
        lines += ["", "| seed | " + " | ".join(f"EEC mean {k}" for k in EEC_KEYS) + " |", "|---|" + "---|" * len(EEC_KEYS)]
        lines += [f"| {seed} | " + " | ".join(f"{d[k]:.3f}" if k in d else "-" for k in EEC_KEYS) + " |"
                  for seed, d in result["eec"].items()]
    if "data" in result:
        lines += ["", "| seed | val objects ignored | training objects ignored |", "|---|---|---|"]
        lines += [f"| {seed} | " + " | ".join(f"{d[k]['ignored']} / {d[k]['objects']}" if k in d else "-"
                                           for k in ("val", "train")) + " |" for seed, d in result["data"].items()]
    return "\n".join(lines)


def workspace_metrics(seed: int, overrides: list[str]) -> dict | None:
    """The workspace's own metrics when they are those of ``seed``: no overrides, params.yaml's
    seed is ``seed`` and ``dvc status`` finds the pipeline up to date; else ``None``."""
    params = load_params("params.yaml")
    if overrides or params.seed != seed:
        return None
    metrics_dir = params.paths.metrics
    if json.loads(_dvc("status", "--json") or "{}"):
        return None
    found = {m: json.loads((Path(metrics_dir) / f"{m}.json").read_text()) for m in MODELS
             if (Path(metrics_dir) / f"{m}.json").is_file()}
    if found and (Path(metrics_dir) / EEC_STATS).is_file():
        found["eec"] = eec_means(json.loads((Path(metrics_dir) / EEC_STATS).read_text()))
    if found and (Path(metrics_dir) / DATA_METRICS).is_file():
        found["data"] = json.loads((Path(metrics_dir) / DATA_METRICS).read_text())
    return found or None


def run_seeds(seeds: list[int], overrides: list[str], out: str | Path = "metrics/seeds.json", poll: float = 10.0,
        targets: list[str] | None = None, only_collect: bool = False) -> dict:
    """Queue the pipeline for every seed, run the queue (one job at a time), wait, summarise.

    A seed whose results the workspace already holds (``dvc repro`` with that seed, nothing
    changed since) is read from ``metrics/`` instead of being run again. ``targets`` (stage
    names, e.g. ``evaluate@freesolo``) limit each run to those stages and what they need.
    ``only_collect``: run nothing, read the finished experiments ``seed-N`` (after an
    interrupted wait, or a queue started by hand)."""
    if not seeds:
        raise EfsoloError("seeds: give at least one seed")
    known = {s: m for s in seeds if (m := workspace_metrics(s, overrides)) is not None}
    if known:
        print(f"seed {', '.join(map(str, known))}: the workspace's results (dvc status: up to date)")
    names = [f"seed-{s}" for s in seeds if s not in known]
    if not names:
        found = {}
    elif only_collect:
        found = collect(names)
    else:
        found = _run_queue(names, overrides, poll, targets or [])
    per_seed = {**known, **{int(n.split("-", 1)[1]): found[n] for n in names}}
    # a run limited to some evaluations carries the other models' metrics files unchanged from
    # the commit it started from: keep only the models it evaluated
    evaluated = [t.split("@", 1)[1] for t in targets or [] if t.startswith("evaluate@")]
    if evaluated:
        per_seed = {s: {m: v for m, v in models.items() if m in evaluated} for s, models in per_seed.items()}
    result = summarise(per_seed)
    result["overrides"] = overrides
    atomic.write_json(out, result, indent=1)
    return result


def _run_queue(names: list[str], overrides: list[str], poll: float, targets: list[str]) -> dict[str, dict]:
    """Queue experiments ``seed-N`` (seed=N plus ``overrides``), run them one at a time, wait,
    and return their metrics."""
    # earlier runs of the same names (another look's table): one by one, because `dvc exp remove`
    # removes nothing when any name it is given does not exist; and queued tasks of those names
    for name in names:
        _dvc("exp", "remove", name, check=False)
        _dvc("queue", "remove", name, check=False)
    for name in names:
        args = ["exp", "run", "--queue", "--name", name, "-S", f"seed={name.split('-', 1)[1]}"]
        for o in overrides:
            args += ["-S", o]
        _dvc(*args, *targets)
    _dvc("queue", "start", "-j", "1")
    for name in names:  # follow each log to its end: progress for the user, and the wait
        subprocess.run(["dvc", "queue", "logs", "--follow", name])
    while any(w in _dvc("queue", "status") for w in ("Queued", "Running")):
        time.sleep(poll)
    status = _dvc("queue", "status").splitlines()
    failed = [n for n in names if any(n in line.split() and "Failed" in line for line in status)]
    if failed:
        raise EfsoloError(f"seeds: experiments {', '.join(failed)} failed; see `dvc queue logs <name>`")
    return collect(names)


def collect(names: list[str]) -> dict[str, dict]:
    """The metrics of the finished experiments ``names``, whatever commit they started from (a
    commit made while the queue ran moves HEAD away from their baseline)."""
    found = experiment_metrics(json.loads(_dvc("exp", "show", "--json", "--all-commits")), names,
                               load_params("params.yaml").paths.metrics)
    missing = [n for n in names if n not in found]
    if missing:
        raise EfsoloError(f"seeds: no finished experiment {', '.join(missing)}; see `dvc queue status` "
                          "and `dvc queue logs <name>`")
    return found
