"""The package's rooms and layers (docs/design.md): what may import what, no import cycles
(deferred imports included), no private name imported from another module, and no module too long
to read in one sitting. Read from the source, so a change that breaks a rule fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinygen"
MAX_LINES = 400
# Each room and the rooms it may import; the modules at the top (errors, atomic) are for all.
MAY_IMPORT = {
    "core": set(),
    "formats": {"core"},
    "generate": {"core"},
    "training": {"core", "generate"},
    "inspect": {"core", "generate"},
    "bench": {"core", "formats", "generate", "training"},
    "cli": {"core", "formats", "generate", "training", "inspect", "bench"},
}
SHARED = {"tinygen", "tinygen.errors", "tinygen.atomic"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("tinygen")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("tinygen"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, []) if sub in known else (base, [a.name]))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports(name, path, known) if m in known and m != name} for name, path in known.items()}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else None


def test_rooms_import_only_the_rooms_below_them():
    wrong = []
    for module, targets in graph().items():
        here = room(module)
        for target in targets:
            there = room(target)
            if here and there and there != here and there not in MAY_IMPORT[here]:
                wrong.append(f"{module} -> {target}")
            if here is None and module not in SHARED and target not in SHARED:
                continue
            if module in SHARED and module != "tinygen" and target not in SHARED:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that run up the layers: " + ", ".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    # The package's __init__ plugs formats/ into core at import time; that is its one job, not a cycle
    # between modules.
    g["tinygen"] = set()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    private = [f"{name}: {target}.{n}" for name, path in known.items()
               for target, names in imports(name, path, known) for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not private, "private names imported across modules: " + ", ".join(private)


def test_no_module_is_too_long_to_read_in_one_sitting():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checks_see_what_they_look_for(tmp_path):
    """The rules above read real imports: a known upward import and a known private import are found."""
    known = modules()
    found = dict(imports("tinygen.formats.hf", known["tinygen.formats.hf"], known))
    assert "tinygen.core.checkpoint" in found and "tinygen.formats.llama" in found
    assert room("tinygen.formats.hf") == "formats" and room("tinygen.errors") is None
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from tinygen.core.model import _hidden\n")
    assert ("tinygen.core.model", ["_hidden"]) in imports("tinygen.core.x", fake, known)
