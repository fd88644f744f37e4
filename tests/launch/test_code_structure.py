"""The code's shape, checked in CI: lint clean, and imports only point down the layers of DESIGN.md
(the import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[test]'"
    return found


def test_import_layers_hold():
    proc = subprocess.run([tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " broken" not in proc.stdout or "0 broken" in proc.stdout


def test_ruff_clean():
    proc = subprocess.run([tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]


LIBRARY_PACKAGES = ("models", "diffusion", "evaluation", "launch")
ENTRY_SCRIPTS = {"sample_ddp", "train"}


def imported_modules(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_library_module_imports_an_entry_script():
    """import-linter only sees packages: the top-level scripts are checked here."""
    commands = {f"launch.{m.split('.')[1]}" for m in layer_modules()[0]}
    offenders = []
    for package in LIBRARY_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if module in commands:
                continue
            bad = {m.split(".")[0] for m in imported_modules(path)} & ENTRY_SCRIPTS
            if bad:
                offenders.append(f"{module} imports {', '.join(sorted(bad))}")
    assert not offenders, offenders


def layer_modules() -> list[list[str]]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in layers]


def test_every_launch_module_has_a_layer():
    """A new module under launch/ must be placed: a command (top) or a runtime helper (bottom)."""
    placed = {m for layer in layer_modules() for m in layer}
    modules = {f"launch.{p.stem}" for p in (ROOT / "launch").glob("*.py") if p.stem != "__init__"}
    assert modules <= placed, sorted(modules - placed)
