from typer.testing import CliRunner

from efsolo.cli import app


def test_cli_lists_every_stage_and_reports_errors_in_one_line(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("data", "backbone", "freemask", "freesolo", "exemplars", "refine", "pool", "exemplar-freesolo",
                "evaluate", "table"):
        assert cmd in out
    bad = tmp_path / "p.yaml"
    bad.write_text("eec: {thresholds: absolute, alpha: 0.2, beta: 0.3}\n")
    res = runner.invoke(app, ["pool", "--params", str(bad)])
    assert res.exit_code == 1
    assert res.output.strip() == (f"error: {bad}: eec.alpha must be greater than eec.beta (0.3) and both in [-1, 1] "
                                  "(cosines: eec.thresholds is absolute), got 0.2")
    bad.write_text("eec: {alpha: 1.5}\n")  # quantile thresholds (the default)
    res = runner.invoke(app, ["pool", "--params", str(bad)])
    assert res.exit_code == 1
    assert res.output.strip() == f"error: {bad}: eec.alpha must be in (0, 1) (a quantile: eec.thresholds is quantile), got 1.5"
