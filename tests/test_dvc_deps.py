"""Every module a DVC stage runs is among the stage's deps, so editing code re-runs what uses it.

The stage scripts call ``efsolo.pipeline.<stage>``, whose imports are made inside each stage
function; a stage needs the module-level imports of ``pipeline.py``, its own function's imports,
and everything those import, at any depth (function-level imports included)."""
import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "efsolo":
        return None
    p = REPO.joinpath(*parts)
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def _imports(node: ast.AST) -> set[str]:
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return {m for m in out if _module_file(m)}


def _top_level_imports(tree: ast.Module) -> set[str]:
    return {m for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom)) for m in _imports(s)}


def modules_used(script: Path) -> set[str]:
    """The efsolo files (repo-relative) that running ``script`` can execute."""
    tree = ast.parse(script.read_text())
    pipeline = ast.parse((REPO / "efsolo" / "pipeline.py").read_text())
    start: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "efsolo.pipeline":
            wanted = {a.name for a in node.names}
            start |= {"efsolo.pipeline"} | _top_level_imports(pipeline)
            start |= {m for f in pipeline.body if isinstance(f, ast.FunctionDef) and f.name in wanted
                      for m in _imports(f)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            start |= _imports(node)
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        mod = ast.parse(path.read_text())
        # pipeline.py: only its module-level imports (each stage function's own are added above)
        todo += _top_level_imports(mod) if path.name == "pipeline.py" else _imports(mod)
    # importing efsolo.a.b runs efsolo/__init__.py and efsolo/a/__init__.py first
    parents = {d / "__init__.py" for p in seen for d in p.relative_to(REPO).parents if d.parts and d.parts[0] == "efsolo"}
    return {str(p.relative_to(REPO)) for p in seen} | {str(p) for p in parents}


def _stages() -> list[tuple[str, str, list[str]]]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = []
    for name, st in spec.items():
        body = st.get("do", st)
        script = body["cmd"].split()[1]
        out.append((name, script, [str(d) for d in body.get("deps", [])]))
    return out


@pytest.mark.parametrize("name,script,deps", _stages(), ids=[s[0] for s in _stages()])
def test_every_module_a_stage_runs_is_a_dep(name, script, deps):
    def covered(f: str) -> bool:
        return any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)

    missing = sorted(f for f in modules_used(REPO / script) if not covered(f))
    assert not missing, f"stage {name}: add to its deps in dvc.yaml: {', '.join(missing)}"
    assert covered(script), f"stage {name}: its script {script} is not a dep"


def test_the_walk_follows_function_level_imports():
    used = modules_used(REPO / "stages" / "refine.py")
    # refine -> efsolo.exemplars.crops.run_refine imports efsolo.modeling.model_io inside the function;
    # inference does not import the training loop
    assert {"efsolo/exemplars/crops.py", "efsolo/modeling/model_io.py", "efsolo/pipeline.py"} <= used
    assert "efsolo/engine/pretrain.py" not in used and "efsolo/engine/train.py" not in used


def test_dvc_yaml_and_the_code_take_their_paths_from_the_same_keys(tmp_path):
    """With every folder of ``paths`` moved and one model left out of ``models``, DVC's own
    resolution of dvc.yaml gives each stage exactly the outputs that ``pipeline.Layout`` gives
    the code, and every data path a stage reads lies under the moved folders."""
    import dataclasses

    from dvc.repo import Repo

    from efsolo.config import PathSettings, params_from_dict
    from efsolo.pipeline import Layout

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["paths"] = {f.name: f"moved/{f.name}" for f in dataclasses.fields(PathSettings)}
    raw["models"] = ["freemask", "exemplar_freesolo"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    Repo.init(str(tmp_path), no_scm=True)
    stages = {s.name: s for s in Repo(str(tmp_path)).index.stages}

    files = Layout(params_from_dict(raw).paths)
    m = files.metrics
    expected = {
        "data": {files.data, files.data_metrics},
        "backbone": {files.model("backbone"), files.checkpoints("backbone"), files.live("backbone")},
        "freemask": {files.freemask, files.predictions("freemask").parent, files.checkpoints("freemask")},
        "freesolo": {files.model("freesolo"), files.model("freesolo_start"), files.predictions("freesolo").parent,
                     files.checkpoints("freesolo"), files.live("freesolo"), m / "train" / "freesolo.json"},
        "exemplars": {files.exemplars / "crops", files.exemplars / "crops.json", files.exemplars / "crops_sheet.png"},
        "refine": {files.exemplars / "objects", files.exemplars / "pool.json", files.exemplars / "pool_sheet.png"},
        "pool": {files.pool, m / "pool.json", m / "pool" / "cosines.csv"},
        "exemplar_freesolo": {files.model("exemplar_freesolo"), files.predictions("exemplar_freesolo").parent,
                              files.checkpoints("exemplar_freesolo"), files.live("exemplar_freesolo"),
                              m / "train" / "exemplar_freesolo.json"},
        "report": {files.overlays},
        **{f"evaluate@{k}": {m / f"{k}.json", m / "pr" / k / "segm.csv", m / "pr" / k / "bbox.csv"}
           for k in ("freemask", "exemplar_freesolo")},
    }
    assert set(stages) == set(expected)
    for name, stage in stages.items():
        assert {Path(o.def_path) for o in stage.outs} == expected[name], name
        for d in stage.deps:
            path = Path(d.def_path)
            if path.parts[0] not in ("stages", "efsolo", "params.yaml"):
                assert path.parts[0] == "moved", (name, str(path))
    evaluate = stages["evaluate@exemplar_freesolo"]
    assert str(files.predictions("exemplar_freesolo")) in evaluate.cmd
    assert files.predictions("exemplar_freesolo") in {Path(d.def_path) for d in evaluate.deps}
