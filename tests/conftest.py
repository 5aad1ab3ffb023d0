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
    import av
    import numpy as np
    import soundfile as sf
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    image = folder / "square.png"
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[8:40, 16:48] = (220, 30, 30)
    Image.fromarray(pixels).save(image)
    audio = folder / "tone.wav"
    t = np.arange(22050) / 22050.0
    sf.write(audio, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    video = folder / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return {"image": image, "audio": audio, "video": video}
