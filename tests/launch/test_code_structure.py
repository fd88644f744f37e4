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


LIBRARY_PACKAGES = ("models", "diffusion", "evaluation", "launch", "sampling")
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


def test_every_module_directly_in_launch_is_a_command_on_the_top_layer():
    """launch/ at a glance: a module directly in it is a command (a __main__ guard, the top layer); the helpers
    every layer uses live one folder down, in launch/runtime/, the bottom layer."""
    top = set(layer_modules()[0])
    modules = {p.stem: p for p in (ROOT / "launch").glob("*.py") if p.stem != "__init__"}
    assert {f"launch.{name}" for name in modules} == top
    for name, path in modules.items():
        assert 'if __name__ == "__main__":' in path.read_text(), f"launch/{name}.py is not a command"
    assert layer_modules()[-1] == ["launch.runtime"]
    runtime = {p.stem for p in (ROOT / "launch" / "runtime").glob("*.py")}
    assert not [n for n in runtime if (ROOT / "launch" / "runtime" / f"{n}.py").read_text().count("__main__")]


def test_no_module_imports_the_sampler_command():
    """sample_ddp.py is a thin command: the library it runs lives in sampling/, which every command composes."""
    offenders = []
    for path in [*ROOT.glob("*.py"), *(p for pkg in LIBRARY_PACKAGES for p in (ROOT / pkg).rglob("*.py"))]:
        if "sample_ddp" in {m.split(".")[0] for m in imported_modules(path)}:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
    assert len((ROOT / "sample_ddp.py").read_text().splitlines()) <= 300


def test_torch_distributed_is_called_only_by_the_process_group_module():
    callers = []
    for path in [*ROOT.glob("*.py"), *(p for pkg in LIBRARY_PACKAGES for p in (ROOT / pkg).rglob("*.py"))]:
        if any(m.startswith("torch.distributed") and m not in ALLOWED_DISTRIBUTED for m in imported_modules(path)):
            callers.append(str(path.relative_to(ROOT)))
    assert callers == ["launch/runtime/dist.py"], callers


def test_user_errors_have_one_base_and_one_handler():
    """Every error a user can fix derives from UserError; at most a few exception classes stand on builtin bases;
    the bad-input exit code is named in at most two modules (where it is defined and where it is used)."""
    import ast

    builtin_based, naming_exit_2 = [], []
    for path in [*ROOT.glob("*.py"), *(p for pkg in LIBRARY_PACKAGES for p in (ROOT / pkg).rglob("*.py"))]:
        text = path.read_text()
        if "EXIT_BAD_INPUT" in text:
            naming_exit_2.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id in BUILTIN_EXCEPTIONS for b in node.bases):
                builtin_based.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert len(builtin_based) <= 3, builtin_based
    assert len(naming_exit_2) <= 2, naming_exit_2


BUILTIN_EXCEPTIONS = {name for name in dir(__builtins__) if name.endswith(("Error", "Exception"))} | {
    "Exception", "BaseException", "ValueError", "OSError", "RuntimeError", "KeyError", "TypeError"}
# launch.torchrun wraps torchrun's command line (the launcher and its exceptions): no process group, no collective
ALLOWED_DISTRIBUTED = {"torch.distributed.run", "torch.distributed.elastic.multiprocessing.errors",
                       "torch.distributed.elastic.multiprocessing.api"}


def test_the_repository_explains_itself():
    """No file points outside the repository (to a shared folder beside it) or to numbered issues of a tracker
    the repository does not hold."""
    import re

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    text_files = [f for f in tracked if f.endswith((".py", ".md", ".toml", ".cfg", ".sh", ".sbatch", ".txt"))
                  or f.startswith(".ci/")]
    pattern = re.compile(r"\.\./shared|\b[Ii]ssues? #?\d+|\(#\d+\)")
    offenders = [f"{f}:{n}" for f in text_files if (ROOT / f).is_file()
                 for n, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, offenders
    assert (ROOT / "docs" / "DESIGN.md").is_file()
    for doc in ("README.md", "docs/API.md", "pyproject.toml"):
        assert "docs/DESIGN.md" in (ROOT / doc).read_text(), f"{doc} does not point to docs/DESIGN.md"
