"""Seeds summary: metrics read back from `dvc exp show --json`, mean and sample std per model."""
import pytest

from efsolo.evaluation.seeds import experiment_metrics, summarise, table


def _exp(name, stamp, ap):
    blob = {"segm": {"AP": ap, "AP50": 2 * ap, "AR100": 0.3}, "bbox": {"AP": ap / 2, "AP50": ap}}
    return {"rev": "x", "name": name, "data": {"timestamp": stamp, "metrics": {
        "metrics/freesolo.json": {"data": blob}, "metrics/freemask.json": {"data": blob},
        "metrics/train/freesolo.json": {"data": {"round1": {}}},
        "metrics/exemplar_freesolo.json": {"error": {"type": "FileNotFoundError"}}}}, "experiments": None}


SHOW = [{"rev": "workspace", "name": None, "data": {"metrics": {}}, "experiments": None},
        {"rev": "c0", "name": "main", "data": {"metrics": {}}, "experiments": [
            {"revs": [_exp("seed-0", "2026-01-01T00:00:00", 0.10)]},
            {"revs": [_exp("seed-1", "2026-01-01T00:00:00", 0.20)]},
            {"revs": [_exp("seed-1", "2026-01-02T00:00:00", 0.14)]},  # a later run of the same name wins
            {"revs": [_exp("other", "2026-01-03T00:00:00", 0.99)]}]}]


def test_experiment_metrics_takes_the_named_and_newest_runs():
    found = experiment_metrics(SHOW, ["seed-0", "seed-1"])
    assert set(found) == {"seed-0", "seed-1"}
    assert set(found["seed-0"]) == {"freesolo", "freemask"}  # training stats and errors are not model metrics
    assert found["seed-1"]["freesolo"]["segm"]["AP"] == 0.14


def test_summarise_gives_percent_per_seed_and_mean_with_sample_std():
    found = experiment_metrics(SHOW, ["seed-0", "seed-1"])
    result = summarise({0: found["seed-0"], 1: found["seed-1"]})
    assert result["seeds"]["0"]["freesolo"]["segm AP"] == 10.0
    s = result["summary"]["freesolo"]["segm AP"]
    assert s["mean"] == 12.0 and s["std"] == pytest.approx(2.83, abs=0.01) and s["n"] == 2
    assert "exemplar_freesolo" not in result["summary"]
    only_one = summarise({0: found["seed-0"], 1: {"freesolo": found["seed-1"]["freesolo"]}})
    assert set(only_one["summary"]) == {"freesolo"}  # models that every seed has
    text = table(result)
    # two models of two seeds and a mean, then the margin: two seeds, its mean and the ratio of means
    assert "| freesolo | mean ± std | 12.0 ± 2.8 |" in text and text.count("\n") == 1 + 2 * 3 + 4


def test_paired_difference_of_exemplar_freesolo_and_freesolo():
    def m(ap):
        return {"segm": {"AP": ap / 100, "AP50": 2 * ap / 100, "AR100": 0.1}, "bbox": {"AP": 0.1, "AP50": 0.2}}

    result = summarise({0: {"freesolo": m(10), "exemplar_freesolo": m(12)},
                        1: {"freesolo": m(8), "exemplar_freesolo": m(7)}})
    pr = result["paired"]
    assert pr["difference"]["0"]["segm AP"] == 2.0 and pr["difference"]["1"]["segm AP"] == -1.0
    assert pr["higher_every_seed"]["segm AP"] is False and pr["higher_every_seed"]["segm AR100"] is False
    assert pr["ratio_of_means"]["segm AP"] == pytest.approx(19 / 18, abs=1e-3)
    text = table(result)
    assert "| exemplar_freesolo - freesolo | 0 | +2.00 |" in text and "| exemplar_freesolo / freesolo | ratio of means | 1.06 |" in text
    assert pr["difference_mean"]["segm AP"] == 0.5 and pr["difference_std"]["segm AP"] == pytest.approx(2.12, abs=0.01)
    assert "| exemplar_freesolo - freesolo | mean ± std | +0.50 ± 2.12 |" in text
    assert "paired" not in summarise({0: {"freesolo": m(10)}})


def test_self_trainings_margin_over_its_labels():
    def m(ap):
        return {"segm": {"AP": ap / 100}}

    result = summarise({0: {"freemask": m(10), "freesolo": m(13)}, 1: {"freemask": m(12), "freesolo": m(11)}})
    margin = result["margin"]
    assert (margin["base"], margin["other"]) == ("freemask", "freesolo")
    assert margin["difference"]["1"]["segm AP"] == -1.0 and margin["difference_mean"]["segm AP"] == 1.0
    assert margin["higher_every_seed"]["segm AP"] is False
    assert "| freesolo - freemask | 0 | +3.00 |" in table(result)


def test_the_eec_diagnostics_of_each_seed_are_kept():
    show = [{"rev": "c0", "name": "main", "data": {"metrics": {}}, "experiments": [{"revs": [
        {"rev": "x", "name": "seed-3", "experiments": None, "data": {"timestamp": "t", "metrics": {
            "metrics/freesolo.json": {"data": {"segm": {"AP": 0.1}}},
            "metrics/train/exemplar_freesolo.json": {"data": {"round1": {"extra_mean": {
                "frac_embedded": 0.8, "frac_used": 0.6, "grad_ratio": 0.4, "loss": 0.2}}}}}}}]}]}]
    found = experiment_metrics(show, ["seed-3"])
    assert found["seed-3"]["eec"] == {"frac_embedded": 0.8, "frac_used": 0.6, "grad_ratio": 0.4}
    result = summarise({3: found["seed-3"]})
    assert result["eec"] == {"3": {"frac_embedded": 0.8, "frac_used": 0.6, "grad_ratio": 0.4}}
    assert "| 3 | 0.800 | 0.600 | 0.400 | - |" in table(result)
    # a run from before frac_embedded was logged: its cell is empty, the others keep their columns
    assert "| 3 | - | 0.600 | 0.400 | - |" in table({**result, "eec": {"3": {"frac_used": 0.6, "grad_ratio": 0.4}}})


def test_each_seeds_ignored_objects_are_kept_and_tabled():
    counts = {"train": {"images": 320, "objects": 1151, "ignored": 25}, "val": {"images": 80, "objects": 294, "ignored": 7},
              "skipped": 0}
    show = [{"rev": "c0", "name": "main", "data": {"metrics": {}}, "experiments": [{"revs": [
        {"rev": "x", "name": "seed-0", "experiments": None, "data": {"timestamp": "t", "metrics": {
            "metrics/freesolo.json": {"data": {"segm": {"AP": 0.1}}}, "metrics/data.json": {"data": counts}}}}]}]}]
    found = experiment_metrics(show, ["seed-0"])
    assert found["seed-0"]["data"] == counts
    result = summarise({0: found["seed-0"]})
    assert result["data"] == {"0": counts} and "data" not in result["summary"]
    assert "| 0 | 7 / 294 | 25 / 1151 |" in table(result)


def test_collect_reads_experiments_of_every_commit_and_names_the_missing(monkeypatch):
    import json

    from efsolo.evaluation import seeds
    from efsolo.utils.errors import EfsoloError

    calls = []
    # seed-1 started from an older commit than HEAD: only --all-commits lists it
    older = [{"rev": "c1", "name": "main", "data": {"metrics": {}}, "experiments": None},
             {"rev": "c0", "name": None, "data": {"metrics": {}}, "experiments": [
                 {"revs": [_exp("seed-1", "2026-01-01T00:00:00", 0.20)]}]}]

    def fake_dvc(*args, check=True):
        calls.append(args)
        return json.dumps(older if "--all-commits" in args else older[:1])

    monkeypatch.setattr(seeds, "_dvc", fake_dvc)
    assert seeds.collect(["seed-1"])["seed-1"]["freesolo"]["segm"]["AP"] == 0.20
    assert calls == [("exp", "show", "--json", "--all-commits")]
    with pytest.raises(EfsoloError, match="no finished experiment seed-2"):
        seeds.collect(["seed-1", "seed-2"])


def test_a_second_table_removes_the_first_tables_experiments_name_by_name(monkeypatch):
    """`make seeds LOOK=photo` after `make seeds`: the experiments seed-1 and seed-2 exist, seed-0
    does not (the workspace gave it). dvc refuses a removal naming a missing experiment and
    removes nothing, so each name is removed on its own, before the new ones are queued."""
    from efsolo.evaluation import seeds

    existing = {"seed-1", "seed-2"}
    calls = []

    def fake_dvc(*args, check=True):
        calls.append(args)
        if args[:2] == ("exp", "remove"):
            if not set(args[2:]) <= existing:
                return ""  # like dvc: an error, nothing removed
            existing.difference_update(args[2:])
        if args[:3] == ("exp", "run", "--queue") and args[4] in existing:
            raise AssertionError(f"{args[4]} queued over an existing experiment")
        return ""

    monkeypatch.setattr(seeds, "_dvc", fake_dvc)
    monkeypatch.setattr(seeds.subprocess, "run", lambda *a, **k: None)  # the log follow
    monkeypatch.setattr(seeds, "collect", lambda names: {n: {} for n in names})
    seeds._run_queue(["seed-0", "seed-1", "seed-2"], ["data.synthetic.look=photo"], poll=0, targets=[])
    assert not existing
    queued = [a for a in calls if a[:3] == ("exp", "run", "--queue")]
    assert [a[4] for a in queued] == ["seed-0", "seed-1", "seed-2"]
    assert all("data.synthetic.look=photo" in a for a in queued)
