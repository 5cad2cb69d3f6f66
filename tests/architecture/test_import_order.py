"""The package's shape: each room imports only rooms below it.

A room is a sub-package of ``fedguard`` (or a top-level module); ``LAYERS`` lists
them from the bottom up, rooms on one line being peers that must not import each
other (the two runtime agents: a silo never runs server code, nor the reverse).
Every ``import`` in the package, lazy ones inside functions included, is walked
with ``ast``; an import of a room on the same line or above is a failure naming
the file, the line and both rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fedguard"

#: Bottom first. A room may import the rooms on the lines before its own.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("audit",),
    ("privacy",),
    ("runs",),
    ("wire",),
    ("aggregation",),
    ("client", "server"),
    ("trust",),
    ("edge",),
    ("deploy",),
    ("apps",),
    ("simulation",),
    ("cli",),
)
#: Imports the layering would allow but the design forbids: the edge path reads a
#: saved run (runs/) and never the server's code.
FORBIDDEN: dict[str, frozenset[str]] = {"edge": frozenset({"server"})}
#: The package root's __init__ (the public API) may import any room.
TOP = "__init__"


def _level(room: str) -> int:
    for level, rooms in enumerate(LAYERS):
        if room in rooms:
            return level
    raise AssertionError(f"room {room!r} is not declared in LAYERS; add it where it belongs")


def _room(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_rooms(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedguard" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _room(path)
        if room == TOP:
            continue
        for line, target in _imported_rooms(path):
            if target == room:
                continue
            if _level(target) >= _level(room) or target in FORBIDDEN.get(room, ()):
                problems.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {room} imports {target}"
                )
    return problems


def test_no_room_imports_a_room_above_it_or_beside_it() -> None:
    assert upward_imports() == []


def test_no_relative_imports_hide_from_the_check() -> None:
    relative = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The walker itself: a lazy import inside a function is found too.
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedguard.server.app import app\n")
    assert _imported_rooms(module) == [(2, "server")]


def test_the_deployed_silo_app_loads_no_server_code() -> None:
    """A silo runs ``fedguard.apps.silo:client_app``: no server room comes with it."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, sys; import fedguard.apps.silo; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fedguard.'))))"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout
    )
    server_side = (
        "fedguard.server",
        "fedguard.aggregation",
        "fedguard.deploy",
        "fedguard.apps.server",
    )
    assert [m for m in loaded if m.startswith(server_side)] == []
    assert "fedguard.trust.silo_statistics" in loaded  # the trust layer's silo side is wired in
