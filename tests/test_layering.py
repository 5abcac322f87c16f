"""House rules: engine never imports textual, tui or the organism recipe; tui never touches torch directly."""

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def absolute_imports(package: str) -> Iterator[tuple[str, str]]:
    """(file:line, top-level module) for every absolute import in `package`'s source, lazy ones included."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                yield from ((where, a.name.split(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield where, node.module.split(".")[0]


def imported_modules(package: str) -> set[str]:
    return {name for _, name in absolute_imports(package)}


def where_imported(package: str, module: str) -> list[str]:
    return [where for where, name in absolute_imports(package) if name == module]


@pytest.fixture(scope="module")
def loaded_by_the_engine() -> set[str]:
    """Top-level modules in sys.modules after importing every engine module (in a fresh interpreter)."""
    code = (
        "import sys, pkgutil, importlib, engine\n"
        "for m in pkgutil.iter_modules(engine.__path__): importlib.import_module('engine.' + m.name)\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(out.stdout.split())


def test_engine_source_never_imports_textual():
    assert "textual" not in imported_modules("engine")


def test_engine_source_never_imports_the_organism():
    assert where_imported("engine", "organism") == []


def test_engine_source_never_imports_tui():
    assert where_imported("engine", "tui") == []


def test_tui_source_never_imports_torch():
    assert not {"torch", "transformers", "safetensors"} & imported_modules("tui")


def test_importing_the_whole_engine_loads_no_textual(loaded_by_the_engine):
    assert "engine" in loaded_by_the_engine and "textual" not in loaded_by_the_engine


def test_importing_the_whole_engine_loads_no_organism(loaded_by_the_engine):
    assert "organism" not in loaded_by_the_engine


def test_every_dependency_in_pyproject_is_imported_somewhere():
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower().replace("-", "_") for d in deps}
    used = set().union(*(imported_modules(p) for p in ("engine", "tui", "organism")))
    assert names - used == set(), f"declared but never imported: {sorted(names - used)}"
