"""The package's shape: imports flow one way, a dataset is one file plus one registry line, and the workflow front
ends spell the same paths as src/advtrain/paths.py."""
import ast
import json
import re
import sys
from pathlib import Path

import yaml

from advtrain import cli, paths
from advtrain.sources import SOURCES
from conftest import BIN, ROOT, make_project, run
from toy_source import Toy

PACKAGE = ROOT / "src" / "advtrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported advtrain module, whether the import is at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "advtrain":
                continue
            for alias in node.names:  # `from . import small_cnn` imports a submodule
                sub = f"{target}.{alias.name}"
                exists = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                out.append((sub if exists else target, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.split(".")[0] == "advtrain"]
    return out


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): {m for m, _ in imports(p)} - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_module_imports_its_own_package_inside_a_function():
    """Imports inside functions are kept for heavy optional packages (mlflow, pyautoattack, matplotlib, torchvision);
    none dodges a cycle inside the package."""
    inner = [(module_name(p), m) for p in PACKAGE.rglob("*.py") for m, at_top in imports(p) if not at_top]
    assert inner == []


def test_leaves_import_nothing_of_the_package_but_leaves():
    graph = import_graph()
    assert graph["advtrain.errors"] == set() and graph["advtrain.paths"] == set()
    assert graph["advtrain.schema"] == {"advtrain.errors"}
    # methods and models take their setting checks from the schema, never from config
    for node, deps in graph.items():
        if node.startswith(("advtrain.methods", "advtrain.models", "advtrain.sources")):
            assert "advtrain.config" not in deps, node
    assert graph["advtrain.cli"] <= {f"advtrain.commands.{c}" for c in
                                     ("aggregate", "check", "evaluate", "prepare", "report", "sync", "train")} | {
        "advtrain.commands", "advtrain.config", "advtrain.console", "advtrain.errors",
        "advtrain.preemption"}  # the exit status of a run stopped by a signal, as errors' is of a refusal


def test_checking_the_params_imports_no_torch():
    """`advtrain check` loads and validates params.yaml (Params.load, require_runs) without importing torch, which
    takes over a second: the modules of the methods, models, data sources and attacks, and every other module the
    command line imports, take torch from advtrain.lazy, and a model file's networks are defined only when a model
    is built (models/base.py: Deferred). In a fresh interpreter, as this test's own process holds torch already."""
    code = ("import sys\n"
            "from advtrain import cli\n"
            "assert cli.main(['--params', 'params.yaml', 'check']) == 0\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
            "assert not loaded, loaded[:10]\n")
    run([sys.executable, "-c", code], ROOT, extra_env={"PYTHONPATH": str(ROOT / "src")})


def test_the_word_of_a_teacher_method_lives_only_in_its_file():
    """Teacher-based methods are handled by contract (Method.needs_teacher); nothing names DYNAT but its own file."""
    front_ends = [ROOT / "Snakefile", ROOT / "dvc.yaml", *(ROOT / "workflow").rglob("*.smk")]
    registry = PACKAGE / "methods" / "__init__.py"  # its one registry line
    code = [p for p in PACKAGE.rglob("*.py") if p.name != "dynat.py" and p != registry]
    for path in front_ends + code:
        assert "dynat" not in path.read_text().lower(), path


def test_snakefile_and_dvc_yaml_spell_the_paths_of_paths_py(tmp_path):
    """dvc.yaml is static YAML: each of its paths must be a paths.py pattern with DVC's ${item...} in the fields."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc = declared["stages"]
    # the per-epoch curves DVC plots: the folder of every run's training metrics
    assert [next(iter(p)) for p in declared["plots"]] == [str(Path(paths.TRAIN_METRICS).parent)]
    patterns = {paths.MODEL, paths.TEACHER, paths.TRAIN_METRICS, paths.TEACHER_METRICS, paths.SEED_RESULT, paths.RESULT,
                paths.METRICS, paths.PREPARED, paths.LOG}
    as_dvc = lambda s: re.sub(r"\$\{item(?:\.(\w+))?\}", lambda m: "{" + (m.group(1) or "dataset") + "}", s)  # noqa

    seen = set()
    for name, stage in dvc.items():
        body = stage.get("do", stage)
        for key in ("deps", "outs", "plots", "metrics"):
            for entry in body.get(key, []):
                path = as_dvc(next(iter(entry)) if isinstance(entry, dict) else entry)
                if "{" in path:
                    assert path in patterns | {str(Path(paths.SEED_RESULT).parent)}, (name, path)
                    seen.add(path)
        log = re.search(r"--log (\S+)", body["cmd"])
        assert log, name
        assert re.fullmatch(r"logs/(\w+)/(.+)\.log", as_dvc(log.group(1))), body["cmd"]
    assert seen - {str(Path(paths.SEED_RESULT).parent)} == patterns - {paths.LOG}
    # the Snakefile builds its rules from paths.py: its planned outputs are those paths
    proj = make_project(tmp_path / "p")
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--printshellcmds"], proj).stdout
    for path in (paths.model_path("pgd", "fashionmnist", 1), paths.teacher_path("dynat", "fashionmnist", 0),
                 paths.seed_result_path("dynat", "fashionmnist", 1), paths.result_path("dynat", "fashionmnist"),
                 paths.metrics_path("pgd", "fashionmnist"), paths.log_path("train", "pgd_fashionmnist_seed0")):
        assert str(path) in out, path


def test_a_data_source_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    """tests/toy_source.py, registered in one line, runs through prepare -> train -> evaluate."""
    monkeypatch.setitem(SOURCES, Toy.name, Toy)  # the registry line
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.delenv("ADVTRAIN_PARAMS", raising=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["runs"] = {"datasets": ["toy"], "methods": ["pgd"], "teacher_methods": []}
    params["datasets"]["toy"] = {
        "source": {"name": "toy", "n": 600}, "model": "small_cnn", "eps": 0.1, "alpha": 0.025,
        "training": {"epochs": 2, "batch_size": 50, "lr": 0.05, "val_points": 100, "val_pgd_steps": 2},
        "evaluation": {"n_points": 50, "autoattack": "fast", "pgd_steps": 5, "cw_steps": 5}}
    params["methods"]["pgd"]["toy"] = {"steps": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for argv in (["prepare", "toy"], ["train", "pgd", "toy"], ["evaluate", "pgd", "toy"]):
        assert cli.main(argv) == 0, argv
    meta = json.loads((tmp_path / "data/prepared/toy/meta.json").read_text())
    assert meta["n_train"] == 600 and meta["classes"] == Toy.classes and meta["source"]["how"] == "generated"
    result = json.loads((tmp_path / paths.seed_result_path("pgd", "toy", 0)).read_text())
    assert result["class_names"] == Toy.classes and result["n_points"] == 50
    assert result["clean_acc"] > 0.9 and result["robust_acc"] > 0.5  # eps 0.1 cannot move a bright bar
