"""The layer contract of docs/architecture.md, checked on every import in the library.

Imports are read from the source (AST), so the check sees module-level and function-level
imports, ``TYPE_CHECKING`` blocks, relative imports and ``importlib.import_module("…")`` /
``__import__("…")`` strings alike. The folder → module mapping comes from ``pyproject.toml``.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "anygpt"
#: Names the folders used to install under before they became subpackages of ``anygpt``.
STALE_TOP_LEVEL = ("decoders", "alignment", "app")


@dataclass(frozen=True)
class Contract:
    """Layer rows from the top (index 0) down; ``independent`` rows use ``|``."""

    rows: tuple[tuple[str, ...], ...]
    independent: tuple[bool, ...]

    def row_of(self, name: str) -> int | None:
        return next((i for i, row in enumerate(self.rows) if name in row), None)


def read_contract(root: Path) -> Contract:
    """The ```layers``` block of ``docs/architecture.md`` under ``root``."""
    text = (root / "docs" / "architecture.md").read_text()
    match = re.search(r"```layers\n(.*?)```", text, re.S)
    assert match, "docs/architecture.md has no ```layers block"
    rows, independent = [], []
    for line in match.group(1).strip().splitlines():
        separator = "|" if "|" in line else ":"
        rows.append(tuple(part.strip() for part in line.split(separator)))
        independent.append(separator == "|")
    return Contract(tuple(rows), tuple(independent))


def package_dirs(root: Path) -> dict[str, Path]:
    """Installed package name → its folder, from ``[tool.setuptools] package-dir``."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: root / folder for name, folder in config["package-dir"].items()}


def library_modules(root: Path) -> dict[str, Path]:
    """Every module of the installed package → its file."""
    mapping = package_dirs(root)
    mapped_folders = {folder.resolve() for folder in mapping.values()}
    modules = {}
    for package, folder in mapping.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            # A nested folder that is itself mapped is walked under its own name.
            if any((folder / Path(*parts[:i])).resolve() in mapped_folders for i in range(1, len(parts))):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported_names(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of everything ``module`` imports, however it is written."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((node.lineno, child if child in known else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                target = node.args[0].value
                if target.startswith("."):
                    target = package + target
                found.append((node.lineno, target))
    return found


def _layer_key(module: str) -> str:
    """``anygpt.decoders.base`` → ``decoders``; the package itself → ``""`` (the facade)."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _target(name: str, known: set[str]) -> str:
    """The longest known module that ``name`` names or lies in."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return name


def find_violations(root: Path) -> list[str]:
    """Every import under ``root`` that breaks the contract, as ``file:line: message``."""
    contract = read_contract(root)
    modules = library_modules(root)
    known = set(modules)
    problems = []
    for module, path in sorted(modules.items()):
        where = path.relative_to(root)
        own_key = _layer_key(module)
        own_row = contract.row_of(own_key)
        if own_key and own_row is None:
            problems.append(f"{where}: layer {own_key!r} is not in the contract of docs/architecture.md")
            continue
        for line, name in _imported_names(module, path, known):
            top = name.split(".")[0]
            if top in STALE_TOP_LEVEL:
                problems.append(f"{where}:{line}: imports {name!r}; it installs as {PACKAGE}.{name}")
                continue
            if top != PACKAGE or not own_key:  # third-party, or the facade's own lazy exports
                continue
            target = _target(name, known)
            key = _layer_key(target)
            if not key:
                problems.append(f"{where}:{line}: imports the {PACKAGE!r} facade; import the defining "
                                f"module instead (e.g. {PACKAGE}.errors)")
                continue
            if key == own_key:
                continue
            row = contract.row_of(key)
            if row is None:
                problems.append(f"{where}:{line}: imports {target}, whose layer {key!r} is not in the contract")
            elif row < own_row:
                problems.append(f"{where}:{line}: {own_key} imports {target}, a higher layer ({key})")
            elif row == own_row and contract.independent[row]:
                problems.append(f"{where}:{line}: {own_key} imports {target}; {own_key} and {key} are "
                                f"independent siblings")
    return problems


def test_the_library_keeps_the_layer_contract():
    assert find_violations(ROOT) == []


def test_every_library_module_is_in_a_layer():
    contract = read_contract(ROOT)
    keys = {_layer_key(m) for m in library_modules(ROOT)} - {""}
    assert {k for k in keys if contract.row_of(k) is None} == set()


def _copy_library(destination: Path) -> Path:
    for name in ("pyproject.toml", "docs"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, destination / name)
    for folder in {p.relative_to(ROOT).parts[0] for p in package_dirs(ROOT).values()}:
        shutil.copytree(ROOT / folder, destination / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


@pytest.mark.parametrize("file,line,expected", [
    ("anygpt/config.py", "def _sneak():\n    import anygpt.pipeline\n",
     "config imports anygpt.pipeline, a higher layer (pipeline)"),
    ("anygpt/registry.py", "import importlib\n_app = importlib.import_module('anygpt.app.chat')\n",
     "registry imports anygpt.app.chat, a higher layer (app)"),
    ("decoders/base.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from anygpt.model import AnyGPTModel\n",
     "decoders imports anygpt.model, a higher layer (model)"),
    ("app/chat.py", "from ..alignment import recipe\n",
     "app imports anygpt.alignment.recipe; app and alignment are independent siblings"),
    ("anygpt/pipeline.py", "import app\n", "imports 'app'; it installs as anygpt.app"),
    ("alignment/data.py", "from anygpt import AnyGPTPipeline\n", "imports the 'anygpt' facade"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, file, line, expected):
    root = _copy_library(tmp_path)
    assert find_violations(root) == []
    target = root / file
    target.write_text(target.read_text() + "\n" + line)
    problems = find_violations(root)
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith(file)
