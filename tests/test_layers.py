"""The layer rule of README.md ("Layout"), read from the source: every import of a project module points
down (or sideways inside one layer), no stage imports another stage, Prefect is imported only in flows/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Repository folder → installed package (pyproject's package-dir).
FOLDERS = {"cptflow": "cptflow", "tasks": "cptflow.tasks", "flows": "cptflow.flows", "kernels": "cptflow.kernels"}

# Bottom to top. A module may import modules of its own layer or of any layer below.
LAYERS = {
    "core": (
        "cptflow",
        "cptflow.store",
        "cptflow.stage",
        "cptflow.docshards",
        "cptflow.token_shards",
        "cptflow.token_reader",
        "cptflow.tokenization",
        "cptflow.fast_bpe",
        "cptflow.tiny_model",
        "cptflow.models",
        "cptflow.distributed",
        "cptflow.export",
        "cptflow.training_process",
        "cptflow.kernels",
    ),
    "training": ("cptflow.training",),
    "stages": ("cptflow.tasks",),
    "pipeline": ("cptflow.config", "cptflow.plan"),
    "flows": ("cptflow.flows",),
    "entry points": ("cptflow.cli", "cptflow.launch"),
}
ORDER = list(LAYERS)


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def layer_of(module: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (layer, prefix)
    return best[0] if best else None


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, function-local ones included."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(modules: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in modules.items():
        layer = layer_of(module)
        where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        if layer is None:
            problems.append(f"{where}: module {module} has no layer in tests/test_layers.py")
            continue
        for line, imported in imports_of(path, module):
            top = imported.split(".")[0]
            if top in ("tasks", "flows", "kernels"):
                problems.append(
                    f"{where}:{line}: imports the folder '{imported}' as a top-level package (use cptflow.{imported})"
                )
            if top == "prefect" and layer not in ("flows",):
                problems.append(f"{where}:{line}: imports prefect outside cptflow.flows")
            if top != "cptflow" or imported not in modules:
                continue  # a name imported from a module, or a third-party module
            target = layer_of(imported)
            if target is None:
                continue
            if ORDER.index(target) > ORDER.index(layer):
                problems.append(f"{where}:{line}: {module} ({layer}) imports {imported} ({target}), a layer above it")
            stage_of = lambda name: name.split(".")[2] if name.startswith("cptflow.tasks.") else None  # noqa: E731
            if layer == target == "stages" and stage_of(module) != stage_of(imported):
                problems.append(f"{where}:{line}: stage {module} imports stage {imported} (move the shared code down)")
    return problems


# Modules whose function-local imports of project modules are deferred on purpose (a heavy dependency
# behind them): the CLI imports torch, transformers and prefect only in the command that needs them.
DEFERRED_IMPORTS_ALLOWED = {"cptflow.cli"}


def function_local_project_imports(modules: dict[str, Path]) -> list[str]:
    found = []
    for module, path in modules.items():
        if module in DEFERRED_IMPORTS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                names = (
                    [inner.module or ""]
                    if isinstance(inner, ast.ImportFrom)
                    else [a.name for a in getattr(inner, "names", [])]
                    if isinstance(inner, ast.Import)
                    else []
                )
                if any(name.split(".")[0] == "cptflow" for name in names):
                    found.append(f"{path.relative_to(REPO)}:{inner.lineno}: {ast.unparse(inner)}")
    return found


def test_project_imports_sit_at_the_top_of_each_module():
    """No import of a project module is hidden inside a function to get around a cycle."""
    found = function_local_project_imports(project_modules())
    assert not found, "function-local project imports:\n" + "\n".join(found)


def test_every_import_points_down_the_layers():
    problems = violations(project_modules())
    assert not problems, "layer rule broken:\n" + "\n".join(problems)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The check itself can fail: a core module importing the pipeline, and a stage importing a stage."""
    modules = project_modules()
    core = tmp_path / "store.py"
    core.write_text("from cptflow.plan import plan_pipeline\n")
    stage = tmp_path / "sft.py"
    stage.write_text("def f():\n    from cptflow.tasks.cpt import run\n")
    modules["cptflow.store"], modules["cptflow.tasks.sft"] = core, stage
    problems = violations(modules)
    assert any("cptflow.store (core) imports cptflow.plan (pipeline)" in p for p in problems), problems
    assert any("stage cptflow.tasks.sft imports stage cptflow.tasks.cpt" in p for p in problems), problems


@pytest.mark.parametrize("module", ["cptflow.tasks.clean", "cptflow.flows.pipeline", "cptflow.kernels"])
def test_modules_come_from_the_installed_namespace(module):
    imported = __import__(module, fromlist=["_"])
    assert imported.__name__ == module


def test_a_stage_is_one_module_in_the_pipeline_list():
    """Each module of plan.STAGE_MODULES declares what the pipeline needs, its upstream is the module
    before it, and PipelineConfig has its typed section under the stage's name."""
    from cptflow.config import PipelineConfig
    from cptflow.plan import DATA_STAGES, PIPELINE_STAGES, STAGE_MODULES, TRAINING_STAGES, UPSTREAM

    assert PIPELINE_STAGES == ("clean", "quality", "perplexity", "mix", "tokenize", "cpt", "sft", "evaluate")
    previous = None
    for module in STAGE_MODULES:
        for name in ("NAME", "UPSTREAM", "STAGE_VERSION", "Config", "fingerprint_inputs", "artifacts"):
            assert hasattr(module, name), f"{module.__name__} does not declare {name}"
        assert module.__name__ == f"cptflow.tasks.{module.NAME}"
        assert module.UPSTREAM == previous, f"{module.NAME}: upstream {module.UPSTREAM}, the list says {previous}"
        assert PipelineConfig.model_fields[module.NAME].annotation is module.Config
        data = all(hasattr(module, f) for f in ("plan", "process", "commit"))
        assert data != hasattr(module, "run"), f"{module.NAME}: plan/process/commit (data) or run (training), not both"
        previous = module.NAME
    assert DATA_STAGES == PIPELINE_STAGES[:5] and TRAINING_STAGES == PIPELINE_STAGES[5:]
    assert UPSTREAM == {s: u for s, u in zip(PIPELINE_STAGES[1:], PIPELINE_STAGES[:-1])}
