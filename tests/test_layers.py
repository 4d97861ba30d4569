"""The import graph points one way: cli -> api -> serving -> engine -> models, settings below all.

Every `import` and `from … import` in src/innkeeper, at module level or inside a function, is
read with `ast` (a lazy import is still a dependency). A package may import only the packages
its row allows; serving/ imports no web framework. An upward arrow fails with file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "innkeeper"

# package -> the innkeeper packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "settings": {"models", "engine", "serving", "api", "cli", "web"},
    "models": {"engine", "serving", "api", "cli", "web"},
    "engine": {"serving", "api", "cli", "web"},
    "serving": {"api", "cli", "web"},
    "api": {"cli"},
    "web": {"engine", "serving", "api", "cli", "models"},
}
FRAMEWORKS = {"fastapi", "starlette", "uvicorn"}  # HTTP belongs to api/ (and cli's runner)


def package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def imports(source: str, module: list[str]) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in `source`, the text of module `module`
    (e.g. ["innkeeper", "models", "memory"]), relative imports resolved."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module[: len(module) - node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            if name == "innkeeper":  # `from innkeeper import api` names a package
                out += [(node.lineno, f"innkeeper.{a.name}") for a in node.names]
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = package_of(path)
        banned = FORBIDDEN.get(pkg, set())
        module_parts = ["innkeeper", *path.relative_to(SRC).with_suffix("").parts]
        for line, module in imports(path.read_text(), module_parts):
            parts = module.split(".")
            target = parts[1] if parts[0] == "innkeeper" and len(parts) > 1 else None
            where = f"{path.relative_to(SRC)}:{line}"
            if target in banned:
                found.append(f"{where}: {pkg}/ imports innkeeper.{target}")
            if pkg in ("serving", "engine", "models", "settings") and parts[0] in FRAMEWORKS:
                found.append(f"{where}: {pkg}/ imports {parts[0]}")
    return found


def test_no_upward_imports() -> None:
    assert violations() == []


def test_the_check_sees_lazy_and_relative_imports() -> None:
    source = "def f():\n    from innkeeper.engine import backend\n    from ..api import app\n"
    found = [m for _, m in imports(source, ["innkeeper", "models", "memory"])]
    assert found == ["innkeeper.engine", "innkeeper.api"]
