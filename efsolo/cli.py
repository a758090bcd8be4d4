"""The ``efsolo`` command line: one command per pipeline stage, plus the results table."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from efsolo import pipeline
from efsolo.config import load_params
from efsolo.errors import EfsoloError

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
}


def _stage_command(stage):  # noqa: ANN001, ANN202
    def command(params: str = PARAMS) -> None:
        _run(lambda: stage(load_params(params)))

    return command


for _name, (_stage, _help) in STAGES.items():
    app.command(_name, help=_help)(_stage_command(_stage))


@app.command()
def evaluate(model: str = typer.Option(..., help="Model name: metrics/<model>.json is written."),
             predictions: Optional[str] = typer.Option(None, help="COCO results or dataset json to evaluate.")) -> None:
    """Class-agnostic COCO evaluation (segm and bbox) of one model on the val set."""
    _run(lambda: pipeline.evaluate(model, predictions))


@app.command()
def table(readme: Optional[str] = typer.Option(None, help="Also write the table into this README, "
                                                           "between its results markers.")) -> None:
    """Print the results table (percent) of every model in metrics/."""
    _run(lambda: pipeline.update_readme(readme) if readme else pipeline.table())


def main() -> None:
    app(prog_name="efsolo")


if __name__ == "__main__":
    sys.exit(main())
