"""Helpers for tests, benchmarks and examples: small media files written on the fly."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_sample_media"]


def write_sample_media(folder: str | Path) -> dict[str, Path]:
    """Write a 64×48 PNG (a red square), a 1 s 440 Hz WAV at 22.05 kHz and a 6-frame 64×48 MP4
    at 8 fps into ``folder``; returns their paths keyed by modality. Deterministic."""
    import av
    import numpy as np
    import soundfile as sf
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
