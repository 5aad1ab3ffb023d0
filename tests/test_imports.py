"""Importing the package stays light: heavy libraries load only when a model is built."""

import subprocess
import sys


def _loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    probe = f"import sys; {code}; print([m for m in {modules!r} if m in sys.modules])"
    return eval(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)


def test_import_anygpt_is_light():
    heavy = ("torch", "diffusers", "gradio", "imagebind", "transformers")
    assert _loaded_after("import anygpt, anygpt.config, anygpt.modalities, anygpt.types", heavy) == []


def test_import_pipeline_does_not_load_diffusers_gradio_or_imagebind():
    code = "from anygpt import AnyGPTPipeline; import anygpt.pipeline, anygpt.decoders"
    assert _loaded_after(code, ("diffusers", "gradio", "imagebind")) == []


def test_every_name_in_all_imports_from_the_package():
    """The README names these types; each must import from `anygpt` itself."""
    import anygpt

    for name in anygpt.__all__:
        assert getattr(anygpt, name) is not None, name
    code = "from anygpt import TextDelta, MediaStarted, MediaSegment, TextSegment"
    assert _loaded_after(code, ("torch", "diffusers", "gradio")) == []


def test_the_training_recipe_loads_plotting_and_tensorboard_only_when_it_draws_or_logs():
    code = "import anygpt.alignment.recipe, anygpt.alignment.plots, anygpt.alignment.tracking"
    assert _loaded_after(code, ("matplotlib", "tensorboard", "torch.utils.tensorboard")) == []
