"""The package's shape, read from its source: no import cycles (lazy and type-only imports counted), the core never
imports a product, the engine stays small, no function is long, the formatter decides line breaks, and importing the
engine loads none of the optional products' libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bertqa"
PRODUCTS = ("bertqa.deploy", "bertqa.tune")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The bertqa modules `path` imports anywhere in it: at the top, inside functions, under TYPE_CHECKING. `from
    bertqa.training import setup` is an import of bertqa.training.setup (a module), not of the package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            named = {f"{base}.{a.name}" for a in node.names} & known
            found |= named or ({base} & known)
    found.discard(module_name(path))
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_the_cycle_finder_finds_a_cycle_and_an_import_through_a_package():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    known = set(modules())
    source = PACKAGE / "engine.py"
    assert "bertqa.training.setup" in imports(source, known) and "bertqa.training" not in imports(source, known)


def test_no_import_cycles_counting_lazy_and_type_only_imports():
    assert cycles(graph()) == []


def test_the_core_never_imports_a_product():
    edges = graph()
    core = [name for name in edges if not name.startswith(PRODUCTS)]
    wrong = {name: sorted(t for t in edges[name] if t.startswith(PRODUCTS)) for name in core}
    assert not {name: targets for name, targets in wrong.items() if targets}


def test_the_engine_is_small_and_imports_few_modules():
    engine = PACKAGE / "engine.py"
    assert len(engine.read_text().splitlines()) <= 300
    runtime = {t for t in graph()["bertqa.engine"] if t != "bertqa.config"}  # the config: its type only
    assert len(runtime) <= 6, sorted(runtime)
    assert "bertqa.distill" not in graph()["bertqa.engine"]


def test_no_function_is_over_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert not long


def test_the_formatter_decides_line_breaks_and_folders_stay_small():
    skips = sum(p.read_text().count("# fmt: skip") for p in PACKAGE.rglob("*.py"))
    assert skips <= 10
    per_folder: dict[Path, int] = defaultdict(int)
    for path in PACKAGE.rglob("*.py"):
        per_folder[path.parent] += path.name != "__init__.py"
    assert max(per_folder.values()) <= 20, dict(per_folder)


def test_importing_the_engine_loads_no_optional_library():
    optional = ["fastapi", "uvicorn", "onnxruntime", "onnx", "optuna", "peft", "bertqa.deploy", "bertqa.tune"]
    code = f"import sys, bertqa.engine; print([m for m in {optional!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
