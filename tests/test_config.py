import pytest

from efsolo.config import ParamsError, load_params, params_from_dict


def test_defaults_and_roundtrip_of_repo_params():
    p = load_params("params.yaml")
    assert p.data.source == "synthetic"
    assert p.freemask.feature_stride in (8, 16, 32)


def test_single_folder_becomes_tuple():
    p = params_from_dict({"data": {"source": "folder", "train_images": "a", "val_images": ["b", "c"]}})
    assert p.data.train_images == ("a",) and p.data.val_images == ("b", "c")


@pytest.mark.parametrize("raw, key", [
    ({"freemask": {"score_threshold": 1.5}}, "freemask.score_threshold must be in [0, 1]"),
    ({"freemask": {"bogus": 1}}, "unknown key freemask.bogus"),
    ({"nope": 1}, "unknown key nope"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"data": {"source": "imagenet"}}, "data.source must be one of"),
    ({"freemask": {"feature_stride": 4}}, "freemask.feature_stride must be one of"),
    ({"backbone": {"pretrain": {"lr": -1}}}, "backbone.pretrain.lr must be > 0"),
    ({"data": {"source": "coco", "train_images": "a", "val_images": "b"}}, "data.val_annotations"),
    ({"data": {"synthetic": {"min_objects": 5, "max_objects": 2}}}, "data.synthetic.min_objects"),
])
def test_invalid_values_name_the_key(raw, key):
    with pytest.raises(ParamsError, match=key.replace("[", r"\[").replace("]", r"\]")):
        params_from_dict(raw)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("freemask: {nms: soft}\n")
    with pytest.raises(ParamsError, match=r"p.yaml: freemask.nms must be one of"):
        load_params(bad)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    err_msgs = []
    for text in ("a: [", "- 1\n- 2\n"):
        bad.write_text(text)
        with pytest.raises(ParamsError) as e:
            load_params(bad)
        err_msgs.append(str(e.value))
    assert all("\n" not in m for m in err_msgs)


def test_params_are_frozen():
    p = params_from_dict({})
    with pytest.raises(Exception):
        p.seed = 3  # type: ignore[misc]
