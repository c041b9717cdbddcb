"""Every part of ``apmask_lib`` a DVC stage executes is one of its dependencies, and no other.

A stage depends on the library by PART: a subpackage folder (``apmask_lib/pretrain``) or a module of
the package's top (``apmask_lib/cli.py``). For each stage of ``dvc.yaml`` the test works out which
``apmask_lib`` modules its command runs: ``apmask CMD`` runs ``apmask_lib/cli.py`` and the imports of
``cmd_CMD``; ``apmask notebook NAME`` also runs the notebook, i.e. the ``apmask_lib`` imports of its
code cells. From there it follows every ``import`` statement (module level and inside functions, an
over-approximation: a lazily imported module counts) through the package, adding each package's
``__init__.py``. The parts holding those files (and the notebooks) must be exactly the stage's
``apmask_lib`` / ``notebooks`` dependencies: none missing (a change would not re-run the stage), none
extra (a change would re-run it for nothing).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = "apmask_lib"


def module_file(name: str) -> Path | None:
    """``apmask_lib.models.vit`` -> its file (module or package ``__init__``), None outside the package."""
    if name != PKG and not name.startswith(PKG + "."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(tree: ast.AST, current: str | None, is_package: bool = False) -> set[str]:
    """Absolute names of the modules an AST imports (relative imports resolved against ``current``);
    ``from X import y`` yields both X and X.y (y may be a submodule)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = current.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def closure(start: set[str], walked: set[Path] = frozenset()) -> set[Path]:
    """Files of ``apmask_lib`` reached from the module names ``start``, parents' ``__init__`` included
    (``walked``: files counted but not followed, as their imports were chosen by the caller)."""
    seen: set[Path] = set(walked)
    todo = list(start)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            f = module_file(".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            todo.extend(imported_modules(ast.parse(f.read_text()), _module_name(f), f.name == "__init__.py"))
    return seen


def function_imports(path: Path, names: set[str]) -> set[str]:
    """Modules a caller of the functions ``names`` of ``path`` imports: the module level plus those
    functions' bodies and the same-module helpers they call (directly)."""
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = names - set(defs)
    assert not missing, f"no {sorted(missing)} in {path.relative_to(ROOT)}"
    mods = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods |= imported_modules(node, module)
    todo, done = list(names), set()
    while todo:
        fn = todo.pop()
        if fn in done:
            continue
        done.add(fn)
        mods |= imported_modules(defs[fn], module)
        todo += [c.func.id for c in ast.walk(defs[fn]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                 and c.func.id in defs]
    return mods


#: entry modules whose imports are followed per function called (their functions import lazily)
ENTRY = {f"{PKG}.cli": ROOT / PKG / "cli.py", f"{PKG}.notebook": ROOT / PKG / "notebook.py"}


def notebook_imports(name: str) -> set[str]:
    """Modules a notebook's code cells import; ``from apmask_lib.notebook import f`` counts f's imports only."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    tree = ast.parse("\n".join(c.source for c in nb.cells if c.cell_type == "code"))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ENTRY:
            mods |= function_imports(ENTRY[node.module], {a.name for a in node.names})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods |= imported_modules(node, None)
    return mods


def stage_files(cmds: list[str]) -> tuple[set[Path], set[Path]]:
    """(apmask_lib files, notebooks) the stage's commands execute."""
    mods: set[str] = {PKG}
    notebooks: set[Path] = set()
    for cmd in cmds:
        m = re.match(r"apmask\s+([\w-]+)(?:\s+(\w+))?", cmd.strip())
        assert m, f"unexpected stage command {cmd!r}: teach this test what it runs"
        command, arg = m.groups()
        mods |= function_imports(ENTRY[f"{PKG}.cli"], {"main", "cmd_" + command.replace("-", "_"), "_cfg"})
        if command == "notebook":
            mods |= notebook_imports(arg)
            notebooks.add(ROOT / "notebooks" / f"{arg}.ipynb")
    walked = {ENTRY[f"{PKG}.cli"]} | ({ENTRY[f"{PKG}.notebook"]} if notebooks else set())
    return closure(mods - set(ENTRY), walked), notebooks


def part(path: Path) -> str:
    """The dependency that covers a file: its subpackage folder of ``apmask_lib``, else the file itself."""
    rel = path.relative_to(ROOT)
    return "/".join(rel.parts[:2]) if rel.parts[0] == PKG and len(rel.parts) > 2 else str(rel)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _cmds(stage: dict) -> list[str]:
    cmd = stage["cmd"]
    return [cmd] if isinstance(cmd, str) else list(cmd)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_the_parts_it_executes(name):
    stage = STAGES[name]
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
    listed = {d for d in deps if d.split("/")[0] in (PKG, "notebooks")}
    files, notebooks = stage_files(_cmds(stage))
    runs = {part(f) for f in files | notebooks}
    assert not runs - listed, f"dvc.yaml stage {name!r} runs these but does not depend on them: {sorted(runs - listed)}"
    assert not listed - runs, f"dvc.yaml stage {name!r} depends on these but never runs them: {sorted(listed - runs)}"


def test_closure_finds_lazy_imports():
    """Guard: the walk reaches a module imported only inside a function (evaluate -> knn), and a part
    is the subpackage folder."""
    files, _ = stage_files(["apmask notebook 03_evaluate"])
    names = {str(f.relative_to(ROOT)) for f in files}
    assert {"apmask_lib/knn/scoring.py", "apmask_lib/evaluate/stage.py", "apmask_lib/config.py", "apmask_lib/core/files.py",
            "apmask_lib/notebook.py", "apmask_lib/cli.py", "apmask_lib/__init__.py"} <= names
    assert {part(f) for f in files} >= {"apmask_lib/knn", "apmask_lib/evaluate", "apmask_lib/core", "apmask_lib/cli.py"}
    assert "apmask_lib/pretrain" not in {part(f) for f in files}
