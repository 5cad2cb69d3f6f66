"""The package root's public API: every name resolves, and importing it is cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fedguard

INIT = Path(fedguard.__file__)


@pytest.mark.parametrize("name", fedguard.__all__)
def test_every_public_name_resolves_to_its_home(name: str) -> None:
    value = getattr(fedguard, name)
    assert getattr(value, "__name__", name) == name


def test_all_lists_exactly_the_served_names() -> None:
    assert sorted(fedguard.__all__) == sorted(fedguard._HOMES)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'strategies'"):
        fedguard.strategies  # noqa: B018


def test_the_type_checking_imports_list_the_same_names() -> None:
    """Type checkers see the names the lazy loader serves, from the same modules."""
    tree = ast.parse(INIT.read_text())
    typed = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedguard.")
        for alias in node.names
    }
    assert typed == fedguard._HOMES


def test_import_fedguard_loads_no_heavy_dependency() -> None:
    code = "import sys, fedguard; print(sorted({'torch', 'flwr', 'opacus'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
