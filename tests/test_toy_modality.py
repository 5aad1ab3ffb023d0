"""Adding a modality is one registration: a toy ``sketch`` modality, defined in a temporary module
(its spec and, since it can be generated, its decoder), runs through the pipeline, the CLI and the
app without any other file changing. And one suffix list feeds the loaders, the CLI and the app."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import textwrap

import numpy as np
import pytest
import yaml
from PIL import Image

TOY_MODULE = '''
"""A toy modality: greyscale sketches, stored as PNG data in `.sketch` files."""

from anygpt.decoders.base import register
from anygpt.decoders.image import StableDiffusionDecoder
from anygpt.media.image import image_to_encoder_input, load_image, write_image
from anygpt.modalities import ModalitySpec, register_modality

SPEC = register_modality(ModalitySpec(
    name="sketch", plural="sketches", noun="a sketch", signal_prefix="SKT", default_signal_tokens=2,
    encoder_input="vision", input_suffixes=(".sketch",), output_suffix=".sketch",
    default_decoder="sketch-diffusion", ui_component="Image", rank=10,
    loader=load_image, preprocessor=image_to_encoder_input,
    writer=lambda image, path: write_image(image.convert("L"), path),
))


@register
class SketchDecoder(StableDiffusionDecoder):
    """Stable Diffusion, drawing sketches."""

    name = "sketch-diffusion"
    modality = "sketch"
'''


@pytest.fixture
def toy_modality(tmp_path, monkeypatch):
    """Import the toy module from a temporary folder; unregister it afterwards."""
    from anygpt.decoders.base import DECODERS
    from anygpt.modalities import unregister_modality

    (tmp_path / "toy_sketch.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_sketch")
    try:
        yield module
    finally:
        unregister_modality("sketch")
        DECODERS.remove("sketch-diffusion")
        sys.modules.pop("toy_sketch", None)


@pytest.fixture
def toy_config(tmp_path, toy_modality):
    """The tiny preset plus a sketch modality (input and output), as a config file."""
    from anygpt.config import PRESET_DIR

    data = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    data["modalities"]["sketch"] = {
        "input_projector": {"kind": "linear", "num_tokens": 1},
        "num_signal_tokens": 2,
        "output_projector": data["modalities"]["image"]["output_projector"],
        "decoder": {"arch": {}, "steps": 2, "dtype": "float32"},  # name: the modality's default
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sketch_file(tmp_path):
    path = tmp_path / "cat.sketch"
    pixels = np.full((48, 48), 255, dtype=np.uint8)
    pixels[10:38, 10:38] = 0
    Image.fromarray(pixels).save(path, format="PNG")
    return path


@pytest.mark.slow
def test_a_toy_modality_runs_through_the_pipeline(toy_config, sketch_file, tmp_path):
    from anygpt import AnyGPTPipeline
    from anygpt.export import save_output

    pipe = AnyGPTPipeline.from_pretrained(toy_config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.modalities["sketch"].decoder.name == "sketch-diffusion"
    assert pipe.model.lm.signal_tokens["sketch"] == ["[SKT0]", "[SKT1]"]
    out = pipe("Redraw <sketch> bolder.", sketches=[sketch_file], outputs=("sketch",), seed=0, max_new_tokens=4)
    (segment,) = [s for s in out.segments if s.kind == "media"]
    assert segment.modality == "sketch" and isinstance(segment.value, Image.Image)
    written = save_output(out, tmp_path / "answer")
    assert (tmp_path / "answer" / "sketch_0.sketch") in written
    with Image.open(tmp_path / "answer" / "sketch_0.sketch") as saved:
        assert saved.format == "PNG" and saved.mode == "L"


@pytest.mark.slow
def test_a_toy_modality_gets_cli_flags(toy_config, sketch_file, tmp_path, capsys):
    from anygpt.cli import main

    assert "--sketch FILE" in _subcommand_help("generate")
    code = main(["generate", "--model", str(toy_config), "--sketch", str(sketch_file), "--outputs", "sketch",
                 "--seed", "0", "--max-new-tokens", "4", "--quiet", "--out", str(tmp_path / "out"),
                 "What is <sketch>?"])
    assert code == 0
    assert (tmp_path / "out" / "sketch_0.sketch").is_file()
    assert "sketch_0.sketch" in capsys.readouterr().out


def _subcommand_help(name: str) -> str:
    from anygpt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001 - argparse has no API for it
    return sub.choices[name].format_help()


@pytest.mark.slow
def test_a_toy_modality_appears_in_the_app(toy_config, tmp_path):
    from anygpt import AnyGPTPipeline
    from anygpt.app.chat import build_app

    demo = build_app(AnyGPTPipeline.from_pretrained(toy_config), output_dir=tmp_path / "app")
    assert "sketch" in _output_choices(demo)
    assert ".sketch" in _upload_types(demo)


def _output_choices(demo) -> list[str]:
    import gradio as gr

    radios = [b for b in demo.blocks.values() if isinstance(b, gr.Radio)]
    return [value for radio in radios for _, value in radio.choices]


def _upload_types(demo) -> list[str]:
    import gradio as gr

    boxes = [b for b in demo.blocks.values() if isinstance(b, gr.MultimodalTextbox) and b.file_types]
    return [t for box in boxes for t in box.file_types]


def test_the_suffix_list_feeds_loaders_cli_and_app(tmp_path, tiny_pipe):
    from anygpt.app.chat import build_app
    from anygpt.errors import MediaError
    from anygpt.modalities import get_modality, modality_for_suffix

    picture = tmp_path / "picture.img"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(picture, format="PNG")
    with pytest.raises(MediaError, match=r"unsupported image file type \.img"):
        get_modality("image").load(picture)
    assert ".img" not in _subcommand_help("generate")

    with _suffix_added("image", ".img"):
        assert get_modality("image").load(picture).size == (8, 8)
        assert modality_for_suffix(".img").name == "image"
        assert ".img" in _subcommand_help("generate")
        assert ".img" in _upload_types(build_app(tiny_pipe, output_dir=tmp_path / "app"))


@contextlib.contextmanager
def _suffix_added(modality: str, suffix: str):
    """The modality's spec with one more accepted suffix, changed in its one place."""
    from anygpt.modalities import get_modality, register_modality, unregister_modality

    original = get_modality(modality)
    unregister_modality(modality)
    register_modality(dataclasses.replace(original, input_suffixes=(*original.input_suffixes, suffix)))
    try:
        yield
    finally:
        unregister_modality(modality)
        register_modality(original)
