"""Training curves: the DVCLive logger of a training stage, resumable with its checkpoints."""
from __future__ import annotations

from pathlib import Path

from efsolo.utils import atomic


def make_live(log_dir: str | Path, resume_at: int | None = None):
    """A DVCLive logger that writes metrics and plots under ``log_dir`` and nothing else.

    ``resume_at``: the step a run resumes from. Its curves so far are kept (dvc.yaml persists
    the folder) and the points logged after that step, by the run that was interrupted before
    its next checkpoint, are dropped, since they are logged again. ``None``: a fresh run, whose
    curves start empty."""
    from dvclive import Live

    if resume_at is not None:
        for tsv in sorted((Path(log_dir) / "plots").rglob("*.tsv")):
            header, *rows = tsv.read_text().splitlines()
            kept = [r for r in rows if int(float(r.split("\t", 1)[0])) <= resume_at]
            if len(kept) < len(rows):
                atomic.write_text(tsv, "\n".join([header, *kept]) + "\n")
    return Live(dir=str(log_dir), resume=resume_at is not None, save_dvc_exp=False, dvcyaml=None, report=None)
