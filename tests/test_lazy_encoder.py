"""The pipeline's encoder is built on the first media item (anygpt.encoders.LazyEncoder): a
text-only turn never imports ImageBind, and a media turn afterwards is exactly what an encoder
built up front gives."""

import subprocess
import sys

import pytest
import torch

from anygpt.config import AnyGPTConfig
from anygpt.encoders import LazyEncoder, build_encoder


def _tiny_encoder_config():
    return AnyGPTConfig.from_name("tiny").encoder


def test_a_text_only_turn_does_not_import_imagebind():
    code = ("import os, sys; os.environ['HF_HUB_OFFLINE'] = '1'\n"
            "from anygpt import AnyGPTPipeline\n"
            "pipe = AnyGPTPipeline.from_pretrained('tiny')\n"
            "pipe.set_progress_bar_config(disable=True)\n"
            "pipe('What is the capital of France?', max_new_tokens=4, seed=0)\n"
            "print([m for m in ('imagebind', 'imagebind.models', 'timm', 'einops') if m in sys.modules],"
            " pipe.model.encoder.is_built)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[] False"


def test_a_media_turn_after_a_text_turn_matches_an_encoder_built_up_front(media_files):
    from anygpt import AnyGPTPipeline
    from anygpt.model import AnyGPTModel

    lazy = AnyGPTPipeline.from_pretrained("tiny")
    eager = AnyGPTPipeline(AnyGPTModel.from_config(AnyGPTConfig.from_name("tiny")))
    assert isinstance(lazy.model.encoder, LazyEncoder) and not isinstance(eager.model.encoder, LazyEncoder)
    for pipe in (lazy, eager):
        pipe.set_progress_bar_config(disable=True)
    lazy("Hello", max_new_tokens=4, seed=0)
    assert not lazy.model.encoder.is_built
    kwargs = dict(images=[media_files["image"]], audios=[media_files["audio"]], max_new_tokens=6, seed=3)
    a, b = lazy("What is this?", **kwargs), eager("What is this?", **kwargs)
    assert lazy.model.encoder.is_built
    assert a.text == b.text
    for modality in ("image", "audio"):
        assert torch.equal(lazy.model.encode_items(modality, [media_files[modality]]),
                           eager.model.encode_items(modality, [media_files[modality]]))


def test_moves_before_the_build_are_replayed_in_order():
    eager = build_encoder(_tiny_encoder_config())
    eager.to(dtype=torch.float16)
    eager.float()  # the float16 rounding stays, as in a module moved twice
    lazy = LazyEncoder(_tiny_encoder_config())
    parent = torch.nn.ModuleDict({"encoder": lazy})
    parent.to(dtype=torch.float16)  # a parent's .to() reaches the unbuilt encoder
    assert lazy.dtype == torch.float16 and not lazy.is_built
    lazy.float()
    built = lazy.build()
    assert built.dtype == torch.float32 and parent["encoder"].module is built
    for (name, p), q in zip(built.model.state_dict().items(), eager.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_to_a_dtype_before_the_build_is_honoured():
    lazy = LazyEncoder(_tiny_encoder_config()).to("cpu", torch.float64)
    assert lazy.output_dim == 16 and not lazy.is_built  # the width comes from the config
    images = torch.rand(2, 3, 224, 224)
    reference = build_encoder(_tiny_encoder_config()).to(torch.float64)
    assert torch.equal(lazy.encode("vision", images), reference.encode("vision", images))
    assert lazy.dtype == torch.float64 and next(lazy.module.parameters()).dtype == torch.float64


def test_the_memory_plan_measures_an_unbuilt_encoder_without_building_it():
    from anygpt import memory

    lazy = LazyEncoder(_tiny_encoder_config())
    skeleton = lazy.skeleton()
    assert not lazy.is_built and all(p.is_meta for p in skeleton.parameters())
    built = lazy.build()
    for dtype in (None, torch.float16):
        assert memory._bytes(skeleton, dtype) == memory._bytes(built, dtype)
        assert memory._largest_layer(skeleton, dtype) == memory._largest_layer(built, dtype)


def test_saving_builds_the_encoder_and_reloads_it_exactly(tmp_path):
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("tiny")
    assert not pipe.model.encoder.is_built
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = AnyGPTPipeline.from_pretrained(tmp_path / "saved")
    images = torch.rand(1, 3, 224, 224)
    assert torch.equal(pipe.model.encoder.encode("vision", images), reloaded.model.encoder.encode("vision", images))


@pytest.mark.parametrize("attribute", ["arch", "num_parameters", "encoder_inputs"])
def test_attributes_that_need_the_weights_build_it(attribute):
    lazy = LazyEncoder(_tiny_encoder_config())
    assert getattr(lazy, attribute) == getattr(build_encoder(_tiny_encoder_config()), attribute)
    assert lazy.is_built
