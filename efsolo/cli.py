"""The ``efsolo`` command line: one command per pipeline stage, plus the results table."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from efsolo import pipeline
from efsolo.config import OVERLAY_MIN_SCORE, load_params
from efsolo.utils.errors import EfsoloError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Exemplar-FreeSOLO: unsupervised class-agnostic instance segmentation.")

PARAMS = typer.Option("params.yaml", "--params", "-p", help="Parameters file.")


def _run(fn, *args) -> None:  # noqa: ANN001
    try:
        result = fn(*args)
    except EfsoloError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if isinstance(result, str):
        typer.echo(result)


STAGES = {
    "data": (pipeline.data, "Prepare the training and validation sets (manifests, class-agnostic ground truth)."),
    "backbone": (pipeline.backbone, "Convert a DenseCL checkpoint, or pretrain a backbone self-supervised."),
    "freemask": (pipeline.freemask, "Free Mask pseudo-labels and embeddings for the train and val images."),
    "freesolo": (pipeline.freesolo, "FreeSOLO self-training on the Free Mask pseudo-labels, then val predictions "
                                    "(use torchrun for DDP)."),
    "exemplars": (pipeline.exemplars, "GrabCut exemplar crops from randomly chosen training images."),
    "refine": (pipeline.refine, "Refine the exemplar crops with the trained FreeSOLO: the exemplar objects."),
    "pool": (pipeline.pool, "Embed the exemplar objects with the backbone (the EEC's exemplar pool)."),
    "exemplar-freesolo": (pipeline.exemplar_freesolo, "Exemplar-FreeSOLO training (FreeSOLO + lambda_eec * "
                                                      "L_eec), then val predictions."),
    "report": (pipeline.report, "Overlays of ground truth and every model on a seeded sample of val images."),
}


def _stage_command(stage):  # noqa: ANN001, ANN202
    def command(params: str = PARAMS) -> None:
        _run(lambda: stage(load_params(params)))

    return command


for _name, (_stage, _help) in STAGES.items():
    app.command(_name, help=_help)(_stage_command(_stage))


@app.command()
def evaluate(model: str = typer.Option(..., help="Model name: metrics/<model>.json is written."),
             predictions: Optional[str] = typer.Option(None, help="COCO results or dataset json to evaluate "
                                                                  "(default: the model's, under paths.predictions)."),
             params: str = PARAMS) -> None:
    """Class-agnostic COCO evaluation (segm and bbox) of one model on the val set."""
    _run(lambda: pipeline.evaluate(load_params(params), model, predictions))


@app.command()
def audit(ground_truth: str = typer.Option(..., "--gt", help="COCO ground truth, e.g. data/prepared/train_gt.json."),
          predictions: str = typer.Option(..., help="COCO results or a scored dataset, e.g. pseudo/freemask/train.json."),
          min_on_objects: float = typer.Option(0.2, help="A mask with less of its pixels on ground-truth objects "
                                                         "is on the background.")) -> None:
    """Where masks lie: on the ground truth's objects, or on what it does not list (docs/free-mask.md)."""
    def run() -> None:
        from efsolo.data.coco_format import read_json
        from efsolo.evaluation.audit import audit_predictions
        from efsolo.evaluation.evaluate import as_results

        a = audit_predictions(read_json(ground_truth), as_results(read_json(predictions), predictions), min_on_objects)
        n = max(1, a["predictions"])
        print(f"{a['predictions']} masks: {a['matching']} match an object (IoU >= 0.5), {a['on_background']} "
              f"({a['on_background'] / n:.0%}) on the background; {a['found']} of {a['objects']} objects found")
        for key, label in (("segm", "as predicted"), ("segm_without_background", "background masks removed")):
            print(f"segm AP / AP50 / AP75, {label}: " + " / ".join(f"{100 * a[key][k]:.2f}" for k in ("AP", "AP50", "AP75")))
    _run(run)


@app.command()
def table(readme: Optional[str] = typer.Option(None, help="Also write the table into this README, "
                                                           "between its results markers."),
          params: str = PARAMS) -> None:
    """Print the results table (percent) of every model in the metrics folder (paths.metrics)."""
    _run(lambda: pipeline.update_readme(load_params(params), readme) if readme else pipeline.table(load_params(params)))


@app.command()
def predict(inputs: list[str] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
            model: str = typer.Option(..., "--model", "-m", help="A trained model file, e.g. "
                                                                "models/exemplar_freesolo.pt."),
            out: str = typer.Option(..., "--out", "-o", help="Output folder."),
            short_side: Optional[int] = typer.Option(None, help="Resize the short side to this "
                                                                "(default: the model's test size)."),
            max_side: Optional[int] = typer.Option(None, help="Cap the long side (default: the model's)."),
            score_threshold: Optional[float] = typer.Option(None, help="Candidate score threshold (method "
                                                                       "reference, s. 4; default: the model's)."),
            max_per_image: Optional[int] = typer.Option(None, help="At most this many instances an image "
                                                                   "(default: the model's)."),
            maskness_power: Optional[float] = typer.Option(None, help="Score = category score x maskness ** this "
                                                                      "(default: the model's)."),
            overlay_min_score: float = typer.Option(OVERLAY_MIN_SCORE, help="Draw instances scoring at least this."),
            overlays: bool = typer.Option(True, help="Write overlay PNGs."),
            device: str = typer.Option("auto", help="auto | cpu | cuda")) -> None:
    """Segment any images: COCO results json (RLE) and overlay PNGs; unreadable files are skipped and listed.
    Inference settings default to those the model file records (its stage's freesolo.test)."""
    from efsolo.evaluation.predict import predict_folder
    from efsolo.modeling.backbone import resolve_device

    def go() -> str:
        given = dict(score_threshold=score_threshold, max_per_image=max_per_image, maskness_power=maskness_power)
        summary = predict_folder(model, inputs, out, short_side, max_side, None,
                         resolve_device(device), overlay_min_score, overlays,
                         test_overrides={k: v for k, v in given.items() if v is not None})
        return (f"{summary['images']} images, {summary['instances']} instances, {summary['skipped']} skipped "
                f"-> {summary['out']}/results.json")

    _run(go)


@app.command()
def seeds(seed: list[int] = typer.Option([0, 1, 2], "--seeds", help="Seeds to run (repeat the option)."),
          set_param: list[str] = typer.Option([], "--set-param", "-S", help="Also set key=value in every run."),
          out: str = typer.Option("metrics/seeds.json", help="Where to write the per-seed results and mean ± std."),
          readme: Optional[str] = typer.Option(None, help="Also write the table into this README, between its "
                                                          "seeds markers."),
          target: list[str] = typer.Option([], "--target", help="Run only these stages and what they need "
                                                                 "(e.g. evaluate@freesolo); repeat the option."),
          collect: bool = typer.Option(False, "--collect", help="Run nothing: summarise the finished "
                                                                "experiments seed-N.")) -> None:
    """Run the whole pipeline for several seeds (a DVC experiment queue) and summarise mean ± std."""
    from efsolo.evaluation.seeds import README_END, README_START, run_seeds, table

    def go() -> str:
        text = table(run_seeds(list(seed), list(set_param), out, targets=list(target), only_collect=collect))
        if readme:
            pipeline.replace_between_markers(readme, README_START, README_END, text)
        return text

    _run(go)


@app.command()
def profile(dataset: str = typer.Argument(..., help="coco | uvo | voc"),
            weights: str = typer.Option("", help="DenseCL ResNet-50 checkpoint (.pth, or detectron2 .pkl)."),
            coco_root: str = typer.Option("", help="coco, uvo: the COCO folder (train2017, unlabeled2017, val2017, "
                                                   "annotations/)."),
            val_images: str = typer.Option("", help="uvo: the folder of UVO val frames."),
            val_annotations: str = typer.Option("", help="uvo: the UVO val COCO-format json."),
            voc_root: str = typer.Option("", help="voc: VOCdevkit/VOC2007."),
            arch: str = typer.Option("resnet50", help="resnet50 (paper) | resnet101 (FreeSOLO release)."),
            out: str = typer.Option("params.yaml", help="Where to write the params file.")) -> None:
    """Write the paper's settings for COCO, UVO or VOC as a params file (then: dvc repro)."""
    from efsolo.config.profiles import write_profile

    def go() -> str:
        write_profile(out, dataset, weights, coco_root=coco_root, val_images=val_images,
                      val_annotations=val_annotations, voc_root=voc_root, arch=arch)
        return f"wrote the paper profile for {dataset} to {out}"

    _run(go)


def main() -> None:
    app(prog_name="efsolo")


if __name__ == "__main__":
    sys.exit(main())
