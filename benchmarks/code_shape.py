"""Measure the code's shape (the before/after numbers of a restructuring): lines of code, imports inside functions,
imports that point up the layers, module-level import cycles, the longest functions.

    python benchmarks/code_shape.py [ROOT]

Layers as in pyproject.toml's import-linter contract, plus the top-level scripts: commands (sample_ddp, train,
every module directly in launch/) > sampling > models | evaluation > diffusion > launch.runtime.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("models", "diffusion", "evaluation", "launch", "sampling")
SCRIPTS = ("sample_ddp", "train")
COMMANDS = {"sample_ddp", "train", "launch.pipeline", "launch.prefetch", "launch.sweep", "launch.torchrun"}
LEVEL = {"commands": 4, "sampling": 3, "models": 2, "evaluation": 2, "diffusion": 1, "launch": 0}
LONGEST_SHOWN = 5


def modules(root: Path) -> dict[str, Path]:
    found = {name: root / f"{name}.py" for name in SCRIPTS if (root / f"{name}.py").exists()}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> str:
    if module in COMMANDS:
        return "commands"
    return module.split(".")[0]


def project_target(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import name refers to (longest known prefix)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


def imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every absolute import; `from pkg import mod` yields pkg.mod."""
    out: list[tuple[str, bool]] = []
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            out += [(a.name, at_top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(f"{node.module}.{a.name}", at_top) for a in node.names]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(root: Path) -> None:
    known = modules(root)
    loc = 0
    inner_imports = 0
    upward: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    graph_all: dict[str, set[str]] = {m: set() for m in known}  # also the imports inside functions
    functions: list[tuple[int, str]] = []
    for name, path in sorted(known.items()):
        text = path.read_text()
        loc += sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
        tree = ast.parse(text)
        for imported, at_top in imports(tree):
            inner_imports += not at_top
            target = project_target(imported, known)
            if target is None or target == name:
                continue
            graph_all[name].add(target)
            if at_top:
                graph[name].add(target)
            a, b = layer(name), layer(target)
            if LEVEL[b] > LEVEL[a] or (a != b and LEVEL[a] == LEVEL[b]) or (b == "commands" and a != "commands"):
                upward.append(f"{name} -> {target}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    functions.sort(reverse=True)
    print(f"root: {root}")
    print(f"lines of code (non-blank, non-comment, library + entry scripts): {loc}")
    print(f"imports inside function bodies: {inner_imports}")
    print(f"imports pointing up or across the layers: {len(sorted(set(upward)))}")
    for u in sorted(set(upward)):
        print(f"  {u}")
    found = cycles(graph)
    print(f"module-level import cycles: {len(found)}")
    for c in found:
        print(f"  {' <-> '.join(c)}")
    found_all = cycles(graph_all)
    print(f"import cycles counting imports inside functions: {len(found_all)}")
    for c in found_all:
        print(f"  {' <-> '.join(c)}")
    print(f"functions over 80 lines: {sum(1 for n, _ in functions if n > 80)}; longest:")
    for n, f in functions[:LONGEST_SHOWN]:
        print(f"  {n:4d} {f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
