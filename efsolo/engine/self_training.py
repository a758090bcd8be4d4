"""The ``freesolo`` stage: self-training on Free Mask pseudo-labels, optional re-labelling rounds,
and the trained model's predictions on the validation images."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from efsolo.config import TestSettings
from efsolo.data.coco_format import AGNOSTIC_CATEGORY
from efsolo.data.datasets import load_manifest
from efsolo.engine.train import train
from efsolo.data.pseudo_label_format import save_pseudo_labels
from efsolo.modeling.inference import predict_records, write_results
from efsolo.modeling.model_io import load_model
from efsolo.utils import atomic
from efsolo.utils.distributed import dist_env


def relabel(model_path: Path, records: list[dict], out_dir: Path, test: TestSettings, min_score: float,
            max_per_image: int, device: torch.device) -> tuple[Path, Path]:
    """Pseudo-labels from a trained model (score >= ``min_score``, at most ``max_per_image``),
    with the model's predicted embeddings, in the Free Mask file format; inference at ``test``'s size."""
    model = load_model(model_path).to(device)
    results, embeds, _ = predict_records(model, records, test.short_side, test.max_side, test, device,
                                         desc="re-labelling")
    keep, per_image = [], {}
    for i, r in enumerate(results):
        if r["score"] >= min_score and per_image.get(r["image_id"], 0) < max_per_image:
            per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
            keep.append(i)
    anns = [{**results[i], "id": n + 1, "area": float(results[i]["bbox"][2] * results[i]["bbox"][3]), "iscrowd": 0}
            for n, i in enumerate(keep)]
    images = [{k: r[k] for k in ("id", "file_name", "width", "height")} for r in records]
    dataset = {"info": {"description": f"re-labelled by {model_path}"}, "images": images, "annotations": anns,
               "categories": [AGNOSTIC_CATEGORY]}
    save_pseudo_labels(out_dir, "train", dataset, embeds[keep].astype(np.float16))
    return out_dir / "train.json", out_dir / "train_embeddings.npz"


def val_evaluator(val_manifest: Path, val_gt: Path, test: TestSettings, device: torch.device):
    """A function model -> {"segm_AP", "segm_AP50"} (percent; bbox for box-only ground truth) on the
    validation set, for learning curves during training; ``None`` when val has no ground truth."""
    from efsolo.data.coco_format import read_json
    from efsolo.evaluation.evaluate import evaluate, iou_types

    gt = read_json(val_gt)
    if not gt.get("info", {}).get("has_ground_truth", True):
        return None
    records = load_manifest(val_manifest)
    kind = iou_types(gt)[0]

    def evaluator(model: torch.nn.Module) -> dict[str, float]:
        results, _, skipped = predict_records(model, records, test.short_side, test.max_side, test, device,
                                              desc="val curve")
        evaluator.last = (results, skipped)  # the final predictions, when this call saw the saved weights
        metrics, _ = evaluate(gt, results)
        return {f"{kind}_AP": round(100 * metrics[kind]["AP"], 2), f"{kind}_AP50": round(100 * metrics[kind]["AP50"], 2)}

    evaluator.last = None
    return evaluator


def self_train(*, labels: Path, embeddings: Path, val_manifest: Path, train_manifest: Path, model_path: Path,
        predictions_path: Path, stats_path: Path, work_dir: Path, live_dir: Path, rounds: int, relabel_score: float,
        relabel_max: int, test: TestSettings, device: torch.device,
        val_gt: Path | None = None, state_at: int = -1, state_path: Path | None = None, extra_stats: dict | None = None,
        **train_kwargs) -> dict:
    """Train ``rounds`` rounds (each on the previous round's labels), then predict on val.

    With ``runtime.eval_every`` > 0 among ``train_kwargs`` and a ``val_gt`` that has ground truth, val
    segm AP and AP50 are logged during training (learning curves). With ``state_path``, the first
    round's training state after ``state_at`` iterations is written there (the start of
    Exemplar-FreeSOLO at ``eec.start_iter``). ``extra_stats`` are written with the training's."""
    stats: dict = dict(extra_stats or {})
    if train_kwargs["runtime"].eval_every and val_gt is not None and "evaluator" not in train_kwargs:
        train_kwargs["evaluator"] = val_evaluator(val_manifest, val_gt, test, device)
    for r in range(1, rounds + 1):
        round_model = model_path if r == rounds else work_dir / f"round{r}.pt"
        stats[f"round{r}"] = train(labels=labels, embeddings=embeddings, out_path=round_model,
                                   ckpt_dir=work_dir / f"round{r}", live_dir=live_dir, device=device,
                                   log_prefix=f"round{r}" if rounds > 1 else "train", model_meta={"test": asdict(test)},
                                   **({"state_at": state_at, "state_path": state_path} if r == 1 else {}),
                                   **train_kwargs)
        if r < rounds:
            labels, embeddings = relabel(round_model, load_manifest(train_manifest), work_dir / f"labels{r + 1}",
                                         test, relabel_score, relabel_max, device)
    if dist_env()[0] != 0:  # under torchrun, rank 0 alone predicts and writes
        return stats
    t0 = time.time()
    records = load_manifest(val_manifest)
    evaluator = train_kwargs.get("evaluator")
    reused = stats[f"round{rounds}"].get("evaluated_at_end", False) and getattr(evaluator, "last", None) is not None
    if reused:  # the learning curve's last point predicted val with the saved weights already
        results, skipped = evaluator.last
    else:
        model = load_model(model_path).to(device)
        results, _, skipped = predict_records(model, records, test.short_side, test.max_side, test, device,
                                              desc="val inference")
    write_results(predictions_path, results)
    stats["val_inference"] = {"images": len(records), "instances": len(results),
                              "seconds": round(time.time() - t0, 1), "skipped": skipped,
                              "from_learning_curve": reused}
    atomic.write_json(stats_path, stats, indent=1)
    return stats

