"""The README is a front page: its results come from the committed metrics, and its prose quotes
no figure of its own (measurements live in docs/, each naming its run)."""
import re
from pathlib import Path

from efsolo.config import load_params
from efsolo.pipeline import README_END, README_START, table

REPO = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_the_results_table_is_the_committed_metrics(monkeypatch):
    monkeypatch.chdir(REPO)
    text = _readme()
    block = text.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert block == table(load_params("params.yaml")).strip(), "run `make readme` after `dvc repro`"


def test_the_prose_quotes_no_measured_figure():
    text = _readme()
    text = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # commands
    text = re.sub(r"`[^`]*`", "", text)  # keys, values, messages
    figures = re.findall(r"\b\d+\.\d+\b|\b\d+(?:\.\d+)? ?%", text)
    assert not figures, f"figures in the README's prose (put them in docs/, naming their run): {figures}"


def test_the_front_page_is_short_and_its_picture_and_links_exist():
    text = _readme()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target
    assert re.search(r"!\[[^\]]*\]\(reports/overlays/[^)]+\.png\)", text)
