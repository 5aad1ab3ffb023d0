"""The README's code blocks: JSON examples are valid JSONL, Python examples are valid Python."""

import ast
import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("block", _blocks("json"))
def test_json_examples_are_one_row_per_line(block):
    for line in block.splitlines():
        if line.strip():
            json.loads(line)  # a row split over lines fails here, as it would in a manifest


@pytest.mark.parametrize("block", _blocks("python"))
def test_python_examples_parse(block):
    ast.parse(block)


def test_the_readme_has_examples_of_both_kinds():
    assert _blocks("json") and len(_blocks("python")) >= 3
