"""The code's shape: short functions, an import graph that is a clean stack without cycles, and an
evaluation that never loads the training machinery."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = ("tricoclr", "data_tools")
MAX_FUNCTION_LINES = 80
# At most three functions may be longer, each saying why in its docstring with this phrase.
JUSTIFIED_PHRASE = "Longer than 80 lines because"
MAX_JUSTIFIED = 3

# The stack, bottom first: a module may import its own layer (without cycles) and layers below.
# config sits above tricoclr.data because it checks modality names against the data layer's
# registry; the evaluation library sits below training because the online kNN monitor measures
# with the evaluation's feature extraction (so monitor and evaluation agree).
LAYERS = [
    ("utilities", ("tricoclr.durable", "tricoclr.distributed", "tricoclr.ops", "tricoclr.preemption")),
    ("data", ("tricoclr.data",)),
    ("data_tools", ("data_tools",)),
    ("config", ("tricoclr.config",)),
    (
        "models, losses, mining, queue",
        ("tricoclr.models", "tricoclr.losses", "tricoclr.mining", "tricoclr.feature_queue"),
    ),
    ("method", ("tricoclr.method",)),
    ("evaluation", ("tricoclr.eval",)),
    (
        "training",
        (
            "tricoclr.optim",
            "tricoclr.backend",
            "tricoclr.checkpoint",
            "tricoclr.run_state",
            "tricoclr.train_log",
            "tricoclr.trainer",
        ),
    ),
    ("CLIs and demo", ("tricoclr.cli", "tricoclr.train", "tricoclr.demo", "data_tools.cli")),
]
# data_tools may use only the layers below it (the data schema and store, the ops); only the
# top layer may import data_tools.
# Function-local imports of project modules hide ties; these few have a reason in a comment.
LAZY_PROJECT_IMPORTS = {
    ("tricoclr/cli.py", "tricoclr.trainer"),  # `tricoclr eval` must not load Accelerate
    ("tricoclr/demo.py", "tricoclr.trainer"),  # the demo's parser is built for every command
    ("tricoclr/ops/tvl1.py", "tricoclr.ops.tvl1_triton"),  # Triton is an optional dependency
    ("data_tools/cli.py", "data_tools"),  # each subcommand loads only its own module
}


def python_files():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, whether the import is inside a function) for every import."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    local = {
        id(node)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((resolve(name), id(node) in local))
    return found


def resolve(name: str) -> str:
    """The project module a dotted name refers to (``tricoclr.models.build_encoder`` -> tricoclr.models)."""
    parts = name.split(".")
    while parts:
        candidate = REPO.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    raise AssertionError(f"import of {name} resolves to no project module")


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS: place it"
    return best[0]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in python_files():
        graph[module_name(path)] = {target for target, _ in imports_of(path)} - {module_name(path)}
    return graph


def test_no_function_is_longer_than_80_lines():
    too_long, justified = [], []
    for path in python_files():
        relative = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= MAX_FUNCTION_LINES:
                continue
            if JUSTIFIED_PHRASE in (ast.get_docstring(node) or ""):
                justified.append(f"{relative}:{node.name}")
            else:
                too_long.append(f"{relative}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"
    assert len(justified) <= MAX_JUSTIFIED, f"more than {MAX_JUSTIFIED} justified long functions: {justified}"


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = trail[trail.index(target) :] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_each_layer_imports_only_layers_below_it():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            if target in PACKAGES:  # the package itself (its __init__ holds nothing)
                continue
            if layer_of(target) > layer_of(module):
                wrong.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
            if (
                target.startswith("data_tools")
                and not module.startswith("data_tools")
                and layer_of(module) != len(LAYERS) - 1
            ):
                wrong.append(f"{module} imports {target}: only the CLIs and the demo may import data_tools")
    assert not wrong, "\n".join(sorted(wrong))


def test_project_imports_are_at_the_top_of_their_module():
    hidden = []
    for path in python_files():
        relative = str(path.relative_to(REPO))
        for target, inside_function in imports_of(path):
            allowed = any(
                relative == file and (target == name or target.startswith(name + "."))
                for file, name in LAZY_PROJECT_IMPORTS
            )
            if inside_function and not allowed:
                hidden.append(f"{relative} imports {target} inside a function")
    assert not hidden, "\n".join(hidden)


def test_importing_the_evaluation_cli_loads_no_training_machinery():
    code = (
        "import sys, tricoclr.eval.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('accelerate', 'deepspeed') "
        "or m in ('tricoclr.trainer', 'tricoclr.backend', 'tricoclr.checkpoint')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_trainer_is_a_short_loop():
    # Checkpointing lives in tricoclr/checkpoint.py, backend differences in tricoclr/backend.py.
    lines = (REPO / "tricoclr" / "trainer.py").read_text().count("\n")
    assert lines < 300, f"tricoclr/trainer.py has {lines} lines"
