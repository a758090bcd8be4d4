from pathlib import Path

import pytest

from efsolo.config import Params, ParamsError, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_roundtrip_of_repo_params():
    p = load_params("params.yaml")
    assert p.data.source == "synthetic"
    assert p.freemask.trunk_output_stride in (8, 16, 32)


def test_single_folder_becomes_tuple():
    p = params_from_dict({"data": {"source": "folder", "train_images": "a", "val_images": ["b", "c"]}})
    assert p.data.train_images == ("a",) and p.data.val_images == ("b", "c")


@pytest.mark.parametrize("raw, key", [
    ({"freemask": {"score_threshold": 1.5}}, "freemask.score_threshold must be in [0, 1]"),
    ({"freemask": {"bogus": 1}}, "unknown key freemask.bogus"),
    ({"nope": 1}, "unknown key nope"),
    ({"device": "cpu"}, "unknown key device: it moved to runtime.device"),
    ({"freesolo": {"eval_every": 100}}, "unknown key freesolo.eval_every: it moved to runtime.freesolo.eval_every"),
    ({"freesolo": {"iters": 100}}, "unknown key freesolo.iters: it moved to freesolo.solver.iters"),
    ({"freemask": {"feature_stride": 32}}, "unknown key freemask.feature_stride: it moved to freemask.trunk_output_stride"),
    ({"freesolo": {"test_maskness_power": 2}}, "it moved to freesolo.test.maskness_power"),
    ({"freesolo": {"test": {"maskness_power": 0}}}, "freesolo.test.maskness_power must be > 0"),
    ({"freesolo": {"loss": {"scale_ranges": [[1, 2]]}}}, "freesolo.loss.scale_ranges must be 5"),
    ({"freesolo": {"solver": {"iters": 10}}, "eec": {"start_iter": 10}}, "must be less than freesolo.solver.iters"),
    ({"backbone": {"pretrain": {"log_every": 5}}}, "it moved to runtime.pretrain.log_every"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"data": {"source": "imagenet"}}, "data.source must be one of"),
    ({"freemask": {"trunk_output_stride": 4}}, "freemask.trunk_output_stride must be one of"),
    ({"freemask": {"feature_level": "c3", "concat_levels": ["c3"]}}, "freemask.concat_levels must not repeat"),
    ({"freemask": {"concat_levels": ["c1"]}}, "freemask.concat_levels"),
    ({"freemask": {"max_border_fraction": 2}}, "freemask.max_border_fraction must be in [0, 1]"),
    ({"backbone": {"pretrain": {"lr": -1}}}, "backbone.pretrain.lr must be > 0"),
    ({"backbone": {"pretrain": {"color_jitter": 1.5}}}, "backbone.pretrain.color_jitter must be in [0, 1]"),
    ({"backbone": {"pretrain": {"grayscale_prob": -0.1}}}, "backbone.pretrain.grayscale_prob must be in [0, 1]"),
    ({"data": {"source": "coco", "train_images": "a", "val_images": "b"}}, "data.val_annotations"),
    ({"data": {"synthetic": {"min_objects": 5, "max_objects": 2}}}, "data.synthetic.min_objects"),
    ({"paths": {"models": "/abs/models"}}, "paths.models must be a folder inside the repository"),
    ({"paths": {"metrics": "../metrics"}}, "paths.metrics must be a folder inside the repository"),
    ({"paths": {"reports": "metrics"}}, "paths.reports must differ from paths.metrics"),
    ({"paths": {"data": ""}}, "paths.data must be a non-empty folder"),
    ({"models": ["freesolo", "cutler"]}, "models must be distinct names among freemask, freesolo, exemplar_freesolo"),
    ({"models": []}, "models must be distinct names"),
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


def _schema_keys(cls, prefix=""):
    """Dotted keys of every leaf field of a params dataclass."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def _yaml_keys(raw, prefix=""):
    for k, v in raw.items():
        if isinstance(v, dict):
            yield from _yaml_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_params_yaml_sets_every_field_of_the_schema():
    """No default is used silently: the demo's params file writes every key the code reads."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = sorted(set(_schema_keys(Params)) - set(_yaml_keys(raw)))
    assert not missing, f"params.yaml does not set {missing}"


def test_modules_take_the_schema_sections_themselves():
    """One schema: the settings the modules take are the params sections (no hand copies, each
    default in one place); SOLOArch is freesolo.model plus what the pipeline knows."""
    import dataclasses

    from efsolo import config
    from efsolo.exemplars import crops as exemplars
    from efsolo.engine import self_training as freesolo
    from efsolo.modeling import inference
    from efsolo.evaluation import predict
    from efsolo.engine import train
    from efsolo.modeling.solo_model import SOLOArch

    assert inference.TestSettings is predict.TestSettings is freesolo.TestSettings is exemplars.TestSettings \
        is config.TestSettings
    assert train.LossSettings is config.LossSettings and issubclass(SOLOArch, config.ModelSettings)
    assert {f.name for f in dataclasses.fields(SOLOArch)} - {f.name for f in dataclasses.fields(config.ModelSettings)} \
        == {"backbone", "embed_dim"}
    sections = {f.name: f.type for f in dataclasses.fields(config.FreeSOLOParams)}
    assert {sections[k] for k in ("model", "input", "loss", "solver", "test")} == {
        "ModelSettings", "InputSettings", "LossSettings", "SolverSettings", "TestSettings"}
    p = params_from_dict({"freesolo": {"solver": {"lr": 0.5}, "test": {"maskness_power": 2.0}}})
    kwargs = pipeline_kwargs(p)
    assert kwargs["solver"] is p.freesolo.solver and kwargs["solver"].lr == 0.5 and kwargs["losses"] is p.freesolo.loss
    assert kwargs["inputs"] is p.freesolo.input and kwargs["runtime"] is p.runtime.freesolo


def test_each_stage_function_takes_its_settings_object_whole():
    """Free Mask takes ``freemask``, the pretraining ``backbone.pretrain``, the training the solver,
    input, loss and runtime sections, the data stage ``data``: no keyword walls of copied fields."""
    import dataclasses
    import typing

    from efsolo import config
    from efsolo.data.datasets import prepare_dataset
    from efsolo.engine.pretrain import pretrain_backbone
    from efsolo.engine.train import train
    from efsolo.freemask.free_mask import label_dataset

    def hints(fn):
        return typing.get_type_hints(fn)

    assert hints(label_dataset)["settings"] is config.FreeMaskParams
    assert hints(label_dataset)["runtime"] is config.FreeMaskRuntime
    assert hints(pretrain_backbone)["settings"] is config.PretrainParams
    assert hints(prepare_dataset)["settings"] is config.DataParams
    h = hints(train)
    assert (h["solver"], h["inputs"], h["losses"], h["runtime"]) == (
        config.SolverSettings, config.InputSettings, config.LossSettings, config.TrainingRuntime)
    copied = {(label_dataset, config.FreeMaskParams), (pretrain_backbone, config.PretrainParams),
              (prepare_dataset, config.SyntheticParams), (train, config.SolverSettings), (train, config.InputSettings)}
    for fn, section in copied:  # no field of the section comes as its own argument
        fields = {f.name for f in dataclasses.fields(section)}
        assert not fields & set(hints(fn)), (fn.__name__, sorted(fields & set(hints(fn))))


def pipeline_kwargs(p):
    import numpy as np
    import tempfile

    from efsolo import pipeline

    with tempfile.TemporaryDirectory() as d:
        emb = Path(d) / "e.npz"
        np.savez(emb, embeddings=np.zeros((1, 8)))
        return pipeline.solo_training_kwargs(p, emb)


def test_stages_declare_schema_keys_and_no_runtime_key():
    """Each param a stage declares exists; none is a runtime setting (those re-run nothing)."""
    import yaml

    keys = set(_schema_keys(Params))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            assert isinstance(entry, str), (name, entry)  # keys of params.yaml
            declared = entry
            assert any(k == declared or k.startswith(declared + ".") for k in keys), (name, declared)
            assert not declared.startswith("runtime"), (name, declared)
