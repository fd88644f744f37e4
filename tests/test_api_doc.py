"""docs/API.md is true: every name it lists imports, and its signature is the code's, as written in the source.

The page lists the contracts between packages as lines "- `module.name(params) -> returns`" under a
"### module" heading (`Class.method` for methods; a class shows its constructor without `self`).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "API.md"
ENTRY = re.compile(r"^- `([A-Za-z_][\w.]*)((?:\(.*\))?(?: -> .+)?)`")  # an exception class: name only


def listed() -> list[tuple[str, str, str]]:
    """(module, dotted name, signature text) for every entry of the page."""
    out, module = [], None
    for line in API.read_text().splitlines():
        if line.startswith("### "):
            module = line[4:].strip()
        elif (m := ENTRY.match(line)) and module:
            out.append((module, m.group(1), m.group(2)))
    return out


def resolve(module: str, name: str) -> object:
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def source_signature(obj: object) -> str:
    """`(params) -> returns` as the source spells it (defaults by name, not value); `self`/`cls` dropped."""
    fn = inspect.unwrap(obj.__init__ if inspect.isclass(obj) else obj)
    try:
        source = inspect.getsource(fn) if not inspect.isclass(obj) or "__init__" in vars(obj) else None
    except (OSError, TypeError):
        source = None
    if source is None:  # a dataclass or an exception: a generated or inherited constructor
        return str(inspect.signature(obj)).replace("'", "")
    node = ast.parse(textwrap.dedent(source)).body[0]
    args = node.args
    if args.posonlyargs + args.args and (args.posonlyargs + args.args)[0].arg in ("self", "cls"):
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        else:
            args.args = args.args[1:]
    text = f"({ast.unparse(args)})"
    if node.returns is not None and not inspect.isclass(obj):
        text += f" -> {ast.unparse(node.returns)}"
    return text


def normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace(" = ", "=").replace("=", " = ")).strip()


ENTRIES = listed()


ROOT = API.parents[1]
PACKAGES = {"models", "diffusion", "evaluation", "launch", "sampling"}


def crossing_imports() -> set[tuple[str, str]]:
    """(module, name) of every class or function one package (or a command, or launch/ vs launch/runtime/)
    imports from another: the contracts between packages."""
    out = set()
    for path in [*ROOT.glob("*.py"), *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]:
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            source = node.module
            if source.split(".")[0] not in PACKAGES:
                continue
            if source.split(".")[0] == mod.split(".")[0] and \
                    source.startswith("launch.runtime") == mod.startswith("launch.runtime"):
                continue
            for alias in node.names:
                try:
                    obj = resolve(source, alias.name)
                except AttributeError:  # a submodule (from models import data)
                    continue
                if (inspect.isclass(obj) or inspect.isfunction(obj)) and not alias.name.startswith("_"):
                    out.add((source, alias.name))
    return out


def test_every_class_or_function_used_across_packages_is_on_the_page():
    documented = {(m, n) for m, n, _ in ENTRIES}
    missing = sorted(f"{m}.{n}" for m, n in crossing_imports() - documented)
    assert not missing, missing
    sections = [line[4:].strip() for line in API.read_text().splitlines() if line.startswith("### ")]
    assert len(sections) == len(set(sections)), "a module has two sections"


@pytest.mark.parametrize("module, name, documented", ENTRIES, ids=[f"{m}.{n}" for m, n, _ in ENTRIES])
def test_documented_signature_is_the_code(module: str, name: str, documented: str):
    obj = resolve(module, name)
    if not documented:
        assert inspect.isclass(obj) and issubclass(obj, Exception), f"{name}: only exceptions are listed by name"
        return
    assert normal(source_signature(obj)) == normal(documented)
