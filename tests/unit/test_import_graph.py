"""The import graph of the repository, read from the sources, against the layering in
docs/architecture.md: which folder may import which, which modules import nothing of the
project, and no import circles at module level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The installed packages and their folders (pyproject.toml's package-dir says the same).
PACKAGES = {"deployments": "tokenmart.deployments", "cluster": "tokenmart.cluster", "doubles": "tokenmart.doubles"}
# Which installed package may import which, at module level.
MAY_IMPORT = {
    "tokenmart.deployments": {"tokenmart.deployments"},
    "tokenmart.cluster": {"tokenmart.cluster", "tokenmart.deployments"},
    "tokenmart.doubles": {"tokenmart.doubles", "tokenmart.deployments"},
}
# Imports inside a function that cross a line on purpose, each with its reason.
LAZY_CROSSINGS = {
    # `engine: fake` serves a catalog with the fake engine; nothing else loads it.
    ("tokenmart.deployments.app", "tokenmart.doubles.fake_engine"),
}
# Modules that import nothing of the project: the rules everything else reads.
# periods: the spend-cap calendar that lua/lib/calendar.lua mirrors.
LEAVES = {
    "scripts",
    "errors",
    "catalog_rules",
    "ray_llm",
    "caller_watch",
    "request_id",
    "spool",
    "metrics",
    "periods",
}
# Modules that import only the leaves: placement reads the catalog's rule table.
NEAR_LEAVES = {"placement"}
# The engine side runs in the model replicas and never imports the paid-request side.
ENGINE_SIDE = {
    "tokenmart.deployments.engine_server",
    "tokenmart.deployments.caller_watch",
    "tokenmart.deployments.lora",
    "tokenmart.deployments.lora_loader",
    "tokenmart.doubles.fake_engine",
}
REQUEST_SIDE = {
    f"tokenmart.deployments.{name}"
    for name in (
        "gateway",
        "ingress",
        "billing",
        "limits",
        "keystore",
        "auth",
        "usage",
        "reconcile",
        "validation",
        "generations",
        "ledger",
        "alerts",
    )
}


def _modules() -> dict[str, Path]:
    return {
        f"{package}.{path.stem}" if path.stem != "__init__" else package: path
        for folder, package in PACKAGES.items()
        for path in sorted((REPO / folder).glob("*.py"))
    }


def _imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(module-level, inside functions) project imports of one module, as module names."""
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            # `if TYPE_CHECKING:` imports never run.
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            names: set[str] = set()
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    names = {f"{base}.{child.module}"} if child.module else {f"{base}.{a.name}" for a in child.names}
                elif child.module:
                    names = {child.module}
            elif isinstance(child, ast.Import):
                names = {alias.name for alias in child.names}
            (lazy if inner else top).update(name for name in names if name.startswith("tokenmart."))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return top, lazy


MODULES = _modules()
GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _package(module: str) -> str:
    return next(package for package in MAY_IMPORT if module == package or module.startswith(package + "."))


def test_the_graph_is_read_from_every_module() -> None:
    assert {"tokenmart.deployments.gateway", "tokenmart.cluster.launcher", "tokenmart.doubles.fake_engine"} <= set(
        GRAPH
    )
    assert "tokenmart.deployments.billing" in GRAPH["tokenmart.deployments.gateway"][0]
    # The money path's modules of organizations are read too.
    assert {f"tokenmart.deployments.{name}" for name in ("periods", "generations", "ledger", "alerts")} <= set(GRAPH)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_the_folders_below_it(module: str) -> None:
    top, lazy = GRAPH[module]
    allowed = MAY_IMPORT[_package(module)]
    assert {name for name in top if _package(name) not in allowed} == set()
    assert {name for name in lazy if _package(name) not in allowed and (module, name) not in LAZY_CROSSINGS} == set()


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_the_rule_modules_import_nothing_of_the_project(name: str) -> None:
    top, lazy = GRAPH[f"tokenmart.deployments.{name}"]
    assert top | lazy == set()


@pytest.mark.parametrize("name", sorted(NEAR_LEAVES))
def test_the_modules_next_to_the_rules_import_only_the_rules(name: str) -> None:
    top, lazy = GRAPH[f"tokenmart.deployments.{name}"]
    assert top | lazy <= {f"tokenmart.deployments.{leaf}" for leaf in LEAVES}


@pytest.mark.parametrize("module", sorted(ENGINE_SIDE))
def test_the_engine_side_never_imports_the_paid_request_side(module: str) -> None:
    top, lazy = GRAPH[module]
    assert (top | lazy) & REQUEST_SIDE == set()


def test_no_import_circle_at_module_level() -> None:
    graph = {module: {name for name in top if name in GRAPH} for module, (top, _) in GRAPH.items()}
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for name in sorted(graph[module]):
            walk(name, [*path, module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])
