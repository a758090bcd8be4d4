import json

import cv2
import numpy as np
import pytest
import torch

from efsolo.data.coco_format import mask_annotation
from efsolo.evaluation.overlay import draw_annotations, draw_instances, palette, side_by_side
from efsolo.evaluation.report import sample_ids, write_overlays


def test_draw_instances_colours_masks_and_keeps_the_rest():
    img = np.zeros((20, 30, 3), np.uint8)
    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:8, 2:8] = True
    masks[1, 10:18, 12:28] = True
    out = draw_instances(img, masks, np.array([[2, 2, 6, 6], [12, 10, 16, 8]]), np.array([0.9, 0.4]))
    assert out.shape == img.shape and out[4, 4].any() and out[14, 20].any()
    assert not out[0, 29].any() and not img.any()  # outside every instance dimmed (black stays black); input untouched
    assert np.array_equal(draw_instances(img, masks[:0]), img)
    assert len({tuple(c) for c in palette(10)}) == 10


def test_side_by_side_and_annotations():
    img = np.full((16, 16, 3), 100, np.uint8)
    m = np.zeros((16, 16), bool)
    m[4:12, 4:12] = True
    drawn = draw_annotations(img, [{**mask_annotation(m, 1, 1), "score": 0.2}], min_score=0.5)
    assert np.array_equal(drawn, img)  # below the score threshold: nothing drawn
    boxed = draw_annotations(img, [{"bbox": [2, 2, 8, 8], "image_id": 1}])  # VOC ground truth: a box only
    assert boxed[2, 5].any() and not np.array_equal(boxed[2, 5], img[2, 5])
    row = side_by_side([("a", img), ("b", draw_annotations(img, [mask_annotation(m, 1, 1)]))])
    assert row.shape == (16 + 16, 16 * 2 + 4, 3)


def test_report_draws_a_seeded_sample_under_every_model(tmp_path):
    records, gt_anns, preds = [], [], []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.full((40, 40, 3), 30 * i, np.uint8))
        records.append({"id": i + 1, "file_name": str(p), "width": 40, "height": 40})
        m = np.zeros((40, 40), bool)
        m[5:20, 5:20] = True
        gt_anns.append(mask_annotation(m, i + 1, i + 1))
        preds.append({**mask_annotation(m, i + 1, i + 1, score=0.9)})
    (tmp_path / "val.json").write_text(json.dumps({"images": records}))
    (tmp_path / "gt.json").write_text(json.dumps({"images": records, "annotations": gt_anns, "categories": []}))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    out = tmp_path / "overlays"
    (out).mkdir()
    (out / "stale.png").write_bytes(b"x")
    res = write_overlays(tmp_path / "val.json", tmp_path / "gt.json", {"A": tmp_path / "pred.json", "B": tmp_path / "pred.json"},
              out, num_images=3, seed=0, min_height=80)
    assert res["panels"] == ["ground truth", "A", "B"] and len(res["images"]) == 3
    assert sorted(p.name for p in out.glob("*.png")) == sorted(res["images"])
    picture = cv2.imread(str(out / res["images"][0]))
    assert picture.shape[0] == 80 + 16 and picture.shape[1] == 3 * 80 + 2 * 4
    assert sample_ids(list(range(1, 6)), 3, 0) == [int(n.split("_")[0]) for n in res["images"]]
    assert sample_ids(list(range(10)), 20, 1) == list(range(10))


def test_benchmark_measures_and_tabulates(tmp_path):
    from efsolo import benchmark
    from efsolo.pipeline import replace_between_markers

    row = benchmark.measure_one({"what": "train_step", "size": "tiny", "device": "cpu"})
    assert row["images_per_second"] > 0 and row["tflop_per_step"] > 0 and row["peak_rss_mib"] > 0
    bench = benchmark.run_benchmarks(["tiny"], ["cpu"], ["inference"])
    assert bench["results"][0]["images_per_second"] > 0
    text = benchmark.table({**bench, "results": bench["results"] + [row, {"what": "freemask", "size": "paper",
                                                                           "device": "cpu", "error": "out of memory"}]})
    assert "| cpu | tiny (64x64) | train_step | float32 |" in text and "failed: out of memory" in text
    assert "Nominal CPU peak" in text
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:start -->\nold\n<!-- bench:end -->\nb\n")
    replace_between_markers(readme, "<!-- bench:start -->", "<!-- bench:end -->", text)
    assert readme.read_text().startswith("a\n<!-- bench:start -->\n| device") and "old" not in readme.read_text()


@pytest.mark.parametrize("what", ["train_profile", "pretrain_profile"])
def test_profiles_split_a_step_into_parts_that_sum_to_it(what):
    """One FreeSOLO (or pretraining) step's parts: every module's forward and backward, each loss
    term, views, the loader and the optimiser; their sum is the step (bf16: emulated on a CPU
    without bf16 instructions, but it runs)."""
    from efsolo import benchmark

    for precision in ("float32", "bfloat16"):
        row = benchmark.measure_one({"what": what, "size": "tiny", "device": "cpu", "precision": precision})
        parts = row["parts_s"]
        assert row["precision"] == precision and all(v >= -1e-3 for v in parts.values()), parts
        assert sum(parts.values()) == pytest.approx(row["step_s"], rel=0.02, abs=2e-3)
        if what == "train_profile":
            assert {"trunk res5 forward", "trunk res5 backward", "head backward", "mask branch forward",
                    "loss pairwise", "loss max projection", "views and copy-paste", "data loader",
                    "optimizer"} <= set(parts)
            assert "trunk res2 backward" not in parts  # frozen (freeze_at 4): no backward through it


def test_nominal_peak_from_cpu_flags(tmp_path):
    from efsolo.benchmark import peak_gflops
    from efsolo.modeling.backbone import cpu_has_bf16_instructions, resolve_precision

    assert peak_gflops(["fma", "avx2"], 2, 2500.0) == {"float32": 160.0, "bfloat16": None, "bf16_instructions": False}
    assert peak_gflops(["avx512f", "avx512_bf16"], 2, 2500.0)["bfloat16"] == 640.0
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n")
    assert cpu_has_bf16_instructions(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert not cpu_has_bf16_instructions(info) and not cpu_has_bf16_instructions(tmp_path / "missing")
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == "float32" and resolve_precision("bfloat16", cpu) == "bfloat16"
    assert resolve_precision("auto", torch.device("cuda")) == "bfloat16"
