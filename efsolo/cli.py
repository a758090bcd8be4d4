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


@app.command()
def data(params: str = PARAMS) -> None:
    """Prepare the training and validation sets (manifests, class-agnostic ground truth)."""
    _run(lambda: pipeline.data(load_params(params)))


@app.command()
def backbone(params: str = PARAMS) -> None:
    """Convert a DenseCL checkpoint, or pretrain a backbone self-supervised, to models/backbone.pt."""
    _run(lambda: pipeline.backbone(load_params(params)))


@app.command()
def freemask(params: str = PARAMS) -> None:
    """Free Mask pseudo-labels and embeddings for the train and val images."""
    _run(lambda: pipeline.freemask(load_params(params)))


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
