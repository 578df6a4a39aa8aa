"""The package's shape, checked from its source: what each side may import, no import cycles,
no module over 400 lines. Reads every import statement, also those inside functions and
``TYPE_CHECKING`` blocks."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "spark_ddl"
MAX_LINES = 400

# What the executor side must never load: the driver, the pyspark.ml layer, and pyspark.ml
# itself (pandas and scipy in every agent's Python worker).
DRIVER_ONLY = ("spark_ddl.driver", "spark_ddl.ml", "spark_ddl.apps", "spark_ddl.cli", "spark_ddl.runner",
               "spark_ddl.benchmarks", "spark_ddl.streaming", "spark_ddl.testbed", "spark_ddl.mlflow", "pyspark.ml")
# Benchmarks time the agent's pieces directly (the launch floor's teardown, the ingest step).
AGENT_IMPORTERS_ALLOWED = {"spark_ddl.benchmarks.launch", "spark_ddl.benchmarks.suite",
                           "spark_ddl.benchmarks.throughput"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (never run)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            inside |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return inside


def imports_of(name: str, runtime_only: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """(imported module, names imported from it) for every import statement of module ``name``
    (with ``runtime_only``, not those in ``TYPE_CHECKING`` blocks)."""
    tree = ast.parse(MODULES[name].read_text())
    skipped = _type_checking_blocks(tree) if runtime_only else set()
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = tuple(alias.name for alias in node.names)
            submodules = [n for n in names if f"{node.module}.{n}" in MODULES]
            found += [(f"{node.module}.{n}", ()) for n in submodules]
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                found.append((node.module, rest))
    return found


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(start: str) -> set[str]:
    """Every module ``start`` loads, following the package's own imports that run (third-party
    ones are recorded but not followed)."""
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in MODULES:
            todo += [target for target, _ in imports_of(current, runtime_only=True)]
            todo += [parent for parent in _parents(current) if parent in MODULES]  # packages' __init__ run first
    return seen


def test_the_agent_side_never_loads_the_driver_side_or_pyspark_ml():
    for start in ["spark_ddl.agent.entry"] + [m for m in MODULES if within(m, "spark_ddl.agent", "spark_ddl.sync")]:
        loaded = closure(start)
        forbidden = sorted(m for m in loaded if within(m, *DRIVER_ONLY))
        assert not forbidden, f"{start} loads {forbidden}"


# What a barrier task's Python worker does first: import the agent's entry point (the driver's
# closure refers to spark_ddl.agent.entry.run_agent), then report what that loaded.
_AGENT_IMPORT = """
import json, sys
import spark_ddl.agent.entry
assert callable(spark_ddl.agent.entry.run_agent)
print(json.dumps(sorted(sys.modules)))
"""


def test_a_fresh_process_importing_the_agent_entry_point_loads_no_driver_module_or_pyspark_ml():
    """At run time, not only in the import statements: conditional imports, ``importlib`` and
    whatever third-party packages import back into this one all count."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(PACKAGE.parent), os.environ.get("PYTHONPATH")]
                                                      if p))
    done = subprocess.run([sys.executable, "-c", _AGENT_IMPORT], cwd=PACKAGE.parent, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "spark_ddl.agent.training" in loaded and "torch" in loaded  # the check sees the agent's imports
    forbidden = sorted(m for m in loaded if within(m, *DRIVER_ONLY))
    assert not forbidden, f"importing spark_ddl.agent.entry loaded {forbidden}"


def test_sync_strategies_do_not_depend_on_the_agent_package():
    for name in MODULES:
        if within(name, "spark_ddl.sync"):
            assert not [t for t, _ in imports_of(name) if within(t, "spark_ddl.agent")], name


def test_the_driver_side_imports_the_agent_only_for_its_entry_function():
    for name in MODULES:
        if within(name, "spark_ddl.agent") or name in AGENT_IMPORTERS_ALLOWED:
            continue
        for target, names in imports_of(name):
            if within(target, "spark_ddl.agent"):
                assert (target, names) == ("spark_ddl.agent.entry", ("run_agent",)), (name, target, names)


def test_no_import_cycles():
    graph = {name: {t for t, _ in imports_of(name) if t in MODULES and t != name} for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_size_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (limit {MAX_LINES})"


# The top level shows the layers: entry points and what users import, then one package a layer.
TOP_LEVEL_MODULES = {"spark_ddl", "spark_ddl._version", "spark_ddl._moved", "spark_ddl.errors", "spark_ddl.networks",
                     "spark_ddl.runner", "spark_ddl.cli"}
LAYERS = {"ml", "common", "formats", "driver", "agent", "sync", "streaming", "mlflow", "apps", "benchmarks",
          "testbed"}


def test_the_top_level_holds_entry_points_and_one_package_per_layer():
    assert {m for m in MODULES if m.count(".") <= 1 and not MODULES[m].name == "__init__.py"} | {"spark_ddl"} \
        == TOP_LEVEL_MODULES
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == LAYERS


def test_the_shared_layers_import_neither_side():
    """common/ and formats/ (and the strategies' registry they consult) serve both sides."""
    for name in MODULES:
        if within(name, "spark_ddl.common", "spark_ddl.formats"):
            sides = [t for t, _ in imports_of(name) if within(t, "spark_ddl.driver", "spark_ddl.agent", "spark_ddl.ml",
                                                               "spark_ddl.streaming", "pyspark.ml")]
            assert not sides, (name, sides)


def test_the_checks_see_the_package():
    # guards the checks above against reading nothing
    assert {"spark_ddl.agent.entry", "spark_ddl.driver.launcher", "spark_ddl.sync.allreduce"} <= set(MODULES)
    assert ("spark_ddl.agent.entry", ("run_agent",)) in imports_of("spark_ddl.driver.launcher")
    assert "pyspark.ml" in closure("spark_ddl.ml.estimator") or any(
        within(m, "pyspark.ml") for m in closure("spark_ddl.ml.estimator"))


def test_only_spark_ddl_mlflow_imports_mlflow():
    """MLflow is an extra: the rest of the package reaches it only through spark_ddl.mlflow, and
    only where a user asked for it (fit_stream's registered_model_name, a models:/ URI)."""
    for name in MODULES:
        if within(name, "spark_ddl.mlflow"):
            continue
        assert not [t for t, _ in imports_of(name) if within(t, "mlflow")], name
