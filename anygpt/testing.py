"""Helpers for tests, benchmarks and examples: small media files written on the fly, and a
pipeline wrapper that holds a stream until it is cancelled."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator

__all__ = ["write_sample_media", "write_llama_shaped_tokenizer", "HoldingPipe"]

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


class HoldingPipe:
    """A pipeline whose first stream is held after its first event until its ``cancel`` event
    is set (at most ``hold_s`` seconds), then goes on as the wrapped pipeline's.

    For tests of cancelling front ends: while held, only the front end's cancelling can end the
    call early, and the real pipeline, let go on, must stop at its next token or denoising
    step. Later streams are not held.

    Attributes:
        cancels: the ``cancel`` event of each stream, in call order.
        raised: what the first stream raised (a :class:`~anygpt.errors.Cancelled` once cancelled).
        first_event: set once the first stream has produced its first event (it is then held).
        ended: set once the first stream has ended, however it ended.
    """

    def __init__(self, pipe: Any, hold_s: float = 120.0):
        self.pipe, self.config, self.device, self.hold_s = pipe, pipe.config, pipe.device, hold_s
        self.base_dir = getattr(pipe, "base_dir", None)
        self.cancels: list[threading.Event | None] = []
        self.raised: list[BaseException] = []
        self.first_event, self.ended = threading.Event(), threading.Event()

    def stream(self, conversation: Any, *args: Any, cancel: threading.Event | None = None,
               **kwargs: Any) -> Iterator[Any]:
        """The wrapped pipeline's ``stream``, held after its first event if it is the first."""
        self.cancels.append(cancel)
        events = self.pipe.stream(conversation, *args, cancel=cancel, **kwargs)
        if len(self.cancels) > 1:
            return events
        if cancel is None:
            raise ValueError("HoldingPipe holds a stream until it is cancelled: pass cancel=threading.Event()")
        return self._held(events, cancel)

    def _held(self, events: Iterator[Any], cancel: threading.Event) -> Iterator[Any]:
        try:
            with contextlib.closing(events):
                for i, event in enumerate(events):
                    yield event
                    if i == 0:
                        self.first_event.set()
                        cancel.wait(timeout=self.hold_s)
        except BaseException as exc:
            self.raised.append(exc)
            raise
        finally:
            self.ended.set()
