"""The package's layering: no import circles among ``apmask_lib`` and ``benchmarks`` (imports at
module level and inside functions alike: a circle hidden in a function is still a circle), and ``apmask_lib.models`` holds torch modules only (no files, environment or network)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("apmask_lib", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(name: str) -> set[str]:
    """Modules of :data:`PACKAGES` imported anywhere in ``name`` (relative imports resolved;
    ``from X import y`` counts X.y where that is a module, else X)."""
    path = MODULES[name]
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


def find_cycle() -> list[str] | None:
    graph = {m: imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if m.startswith(n + "."):  # a submodule importing its own package's __init__ (already running)
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_walk_sees_imports():
    """Guard: the walk resolves relative and absolute imports (else a circle could go unseen)."""
    assert "apmask_lib.weights.dinov2_onnx" in imports("apmask_lib.weights.backbones")
    assert "apmask_lib.models.vit" in imports("apmask_lib.weights.backbones")
    assert "benchmarks.common" in imports("benchmarks.ablations")


def test_no_import_circles():
    cycle = find_cycle()
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("path", sorted((ROOT / "apmask_lib" / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_are_models_only(path):
    """No files, environment variables or sockets in ``apmask_lib.models``: weights are read and
    written by ``apmask_lib.weights``, files by ``apmask_lib.core.files``."""
    forbidden = {"os", "pathlib", "socket", "urllib", "shutil", "tempfile", "apmask_lib.core.files", "apmask_lib.weights"}
    name = module_name(path)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level]
                mod = ".".join(parts + ([mod] if mod else []))
            imported.add(mod)
    bad = {m for m in imported for f in forbidden if m == f or m.startswith(f + ".")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


#: docs/architecture.md "code map": the layers, lowest first, one top-level name of ``apmask_lib`` each (a subpackage,
#: or a module of the top: config, notebook, cli). A module may import its own layer and lower ones.
LAYERS = ["config", "core", "metrics", "data", "models", "weights", "training", "pretrain", "finetune", "inference",
          "knn", "viz", "evaluate", "deploy", "report", "notebook", "cli"]


def _layer_of(module: str) -> int:
    top = module.split(".")[1]
    if top not in LAYERS:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py LAYERS: place it there and in "
                             "docs/architecture.md (the code map)")
    return LAYERS.index(top)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    ups = []
    for m, targets in graph.items():
        if not m.startswith("apmask_lib.") or m == "apmask_lib":
            continue
        for n in targets:
            if n == "apmask_lib" or not n.startswith("apmask_lib."):
                continue
            if _layer_of(n) > _layer_of(m):
                ups.append(f"{m} -> {n}")
    return ups


def test_every_module_sits_in_a_layer_and_imports_no_higher_layer():
    ups = upward_imports({m: imports(m) for m in MODULES})
    assert not ups, f"imports from a higher layer (docs/architecture.md): {ups}"


def documented_layers(text: str) -> list[str]:
    """The first column of the code-map table of docs/architecture.md, as LAYERS names (rows that
    continue a layer leave it empty)."""
    table = text.split("\n## ")[0]  # the code map comes before the page's other sections
    rows = re.findall(r"^\| `([\w.]+?)(?:/|\.py)?` \|", table, re.M)
    return [r for r in rows if r != "layer"]


def test_the_code_map_lists_every_layer_in_order():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert documented_layers(text) == LAYERS, "docs/architecture.md's code map and LAYERS differ"
    assert documented_layers(text.replace("| `knn/` |", "| `knn2/` |")) != LAYERS


def test_the_layer_check_can_fail():
    """The base layer importing a stage, or a module in no layer, is caught."""
    assert upward_imports({"apmask_lib.core.files": {"apmask_lib.evaluate.stage"}}) == ["apmask_lib.core.files -> apmask_lib.evaluate.stage"]
    with pytest.raises(AssertionError, match="in no layer"):
        upward_imports({"apmask_lib.newthing": {"apmask_lib.core.files"}})


def test_benchmarks_do_not_edit_sys_path():
    """Benchmarks are a package (``python -m benchmarks.NAME``): imports resolve without path edits."""
    edits = [p.name for p in (ROOT / "benchmarks").glob("*.py") if "sys.path.insert" in p.read_text()]
    assert not edits, f"benchmarks editing sys.path: {edits}"
