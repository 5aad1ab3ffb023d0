"""Helpers for tests, benchmarks and examples: small media files written on the fly."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_sample_media", "write_llama_shaped_tokenizer"]

#: LLaMA's special tokens, in the order of their ids (0, 1, 2).
_LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


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


def write_llama_shaped_tokenizer(folder: str | Path, vocab_size: int = 32000) -> Path:
    """Write a tokenizer with LLaMA's (and so Vicuna's) shape into ``folder`` and return it.

    LLaMA's SentencePiece model cannot be rebuilt offline; what a random-weights model needs of
    it is its size and its special ids: ``<unk>`` = 0, ``<s>`` = 1 (BOS), ``</s>`` = 2 (EOS), then
    the 256 byte symbols (every string round-trips), then reserved tokens up to ``vocab_size``,
    so that tokens added after it get LLaMA's ids (NExT-GPT's ``<Img>`` = 32000). Loads with
    ``AutoTokenizer.from_pretrained(folder)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = [*_LLAMA_SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet())]
    if vocab_size < len(symbols):
        raise ValueError(f"vocab_size must be at least {len(symbols)}, got {vocab_size}")
    symbols += [f"<|reserved_{i}|>" for i in range(vocab_size - len(symbols))]
    model = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[], unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    unk, bos, eos = _LLAMA_SPECIALS
    # Vicuna's training code pads with <unk> (LLaMA has no pad token).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token=unk, bos_token=bos, eos_token=eos,
                                        pad_token=unk)
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder
