"""DESIGN.md's layering rules, checked by reading imports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Packages in data-flow order: a package may import only itself and those before it.
ORDER = ["anygpt", "decoders", "alignment", "app"]
ALLOWED = {"anygpt": set(), "decoders": {"anygpt"}, "alignment": {"anygpt", "decoders"},
           "app": {"anygpt"}}


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in (tree.body if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ORDER)
def test_packages_import_only_earlier_stages(package):
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        # anygpt reaches decoders by registry name at run time, inside functions (tested below).
        found = _imports(path, module_level_only=True) | (_imports(path) - {"decoders"}) \
            if package == "anygpt" else _imports(path)
        bad = (found & set(ORDER)) - {package} - ALLOWED[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, offenders


def test_decoders_only_use_anygpt_types_and_config():
    allowed = {"anygpt.types", "anygpt.config", "anygpt.errors", "anygpt.registry"}
    for path in (ROOT / "decoders").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("anygpt"):
                assert node.module in allowed, f"{path.name} imports {node.module}"


def test_anygpt_imports_decoders_only_inside_functions():
    for path in (ROOT / "anygpt").rglob("*.py"):
        assert "decoders" not in _imports(path, module_level_only=True), f"{path.name} imports decoders at module level"


def test_import_anygpt_is_light():
    code = ("import sys, anygpt, anygpt.config, anygpt.modalities, anygpt.types; "
            "heavy = [m for m in ('torch', 'diffusers', 'gradio', 'imagebind', 'transformers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_pipeline_does_not_load_diffusers_gradio_or_imagebind():
    code = ("import sys; from anygpt import AnyGPTPipeline; import anygpt.pipeline, decoders; "
            "print([m for m in ('diffusers', 'gradio', 'imagebind') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
