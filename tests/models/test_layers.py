"""Import layers point one way: models/ and settings/ never import the layers above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "innkeeper"
ABOVE_MODELS = ("innkeeper.engine", "innkeeper.api", "innkeeper.serving", "innkeeper.cli")


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, lazy imports inside functions included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((SRC / "models").rglob("*.py")), ids=lambda p: p.name)
def test_models_import_no_engine_api_or_cli(path: Path) -> None:
    bad = {m for m in imports_of(path) if m.startswith(ABOVE_MODELS) or m == "innkeeper.server"}
    assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((SRC / "settings").rglob("*.py")), ids=lambda p: p.name)
def test_settings_import_only_settings(path: Path) -> None:
    """The neutral declarations: every layer imports them, they import no other layer."""
    ours = {m for m in imports_of(path) if m.startswith("innkeeper")}
    assert all(m.startswith("innkeeper.settings") for m in ours), sorted(ours)
