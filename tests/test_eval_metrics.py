"""Real-data metrics (FID, CLIP score, FAD, CLAP score, CLIPSIM) and `anygpt eval --metrics`.

The extractors are tiny random CLIP/CLAP models built from transformers configs, saved to a tmp
folder and loaded from there, as a downloaded model would be; or a hand-made colour extractor
where a metric must rank captions.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anygpt.errors import ConfigError, UnknownNameError, WeightsNotFoundError
from anygpt.types import Audio

from anygpt.alignment.metrics import (EXTRACTORS, METRICS, ClapEmbedder, ClipEmbedder, caption_similarity,
                                      frechet_distance, load_extractor, media_metrics)


# Tiny extractors --------------------------------------------------------------------------------


def _tokenizer(folder: Path):
    """A byte-level BPE tokenizer that frames each text in <s> ... </s> (CLIP pools at </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = ["<pad>", "<s>", "</s>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    model = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[], unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    model.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", model_max_length=32)
    tokenizer.save_pretrained(folder)
    return len(symbols)


def _text_config(vocab: int, positions: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=positions, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    vocab = _tokenizer(folder)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=_text_config(vocab, 32), projection_dim=16,
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> Path:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    folder = tmp_path_factory.mktemp("clap")
    vocab = _tokenizer(folder)
    torch.manual_seed(0)
    audio = dict(spec_size=64, patch_size=4, patch_stride=[4, 4], num_mel_bins=16, window_size=4, depths=[1, 1],
                 num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32, enable_fusion=False)
    config = ClapConfig(text_config={**_text_config(vocab, 40), "type_vocab_size": 1}, audio_config=audio,
                        projection_dim=16)
    ClapModel(config).save_pretrained(folder)
    ClapFeatureExtractor(feature_size=16, sampling_rate=8000, max_length_s=1, hop_length=160,
                         fft_window_size=512, frequency_max=4000).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from anygpt.alignment.synthetic import make_synthetic_dataset

    # 6 caption rows cycle image, audio, video: two real files of each
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=1, num_val=6, seed=0)


class ColourEmbedder:
    """A constructed CLIP-like extractor: an image is the mean colour of its non-background
    pixels, a caption the colour it names (both centred on grey)."""

    def embed_images(self, images):
        rows = []
        for image in images:
            pixels = image.reshape(-1, 3).astype(np.float64)
            shape = pixels[np.abs(pixels - pixels[0]).sum(1) > 30]
            rows.append(shape.mean(0) if len(shape) else pixels.mean(0))
        return (torch.tensor(np.stack(rows)) - 128) / 128

    def embed_texts(self, texts):
        from anygpt.alignment.world import COLOURS

        named = [next(COLOURS[w] for w in text.split() if w in COLOURS) for text in texts]
        return (torch.tensor(named, dtype=torch.float64) - 128) / 128


# The measures -----------------------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form():
    # 1-D: (m_a - m_b)^2 + v_a + v_b - 2 sqrt(v_a v_b); [0, 2]: mean 1, var 2; [1, 5]: mean 3, var 8
    assert frechet_distance(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [5.0]])) == pytest.approx(6.0)
    # b = 2a + c: S_b = 4 S_a, so the trace terms leave tr(S_a), plus |mean shift|^2
    a = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.arange(6, dtype=torch.float64)
    expected = float((a.mean(0) + shift).square().sum() + torch.cov(a.T).trace())
    assert frechet_distance(a, 2 * a + shift) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_zero_for_a_set_against_itself_and_grows_as_the_sets_part():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(8, 32, generator=generator)  # fewer items than features: singular covariances
    noise = torch.randn(8, 32, generator=generator)
    distances = [frechet_distance(a, a + step * noise) for step in (0.0, 0.5, 1.0, 2.0)]
    assert distances[0] == pytest.approx(0.0, abs=1e-6)
    assert distances == sorted(distances) and distances[-1] > 1


def test_frechet_distance_refuses_sets_it_cannot_fit():
    with pytest.raises(ConfigError, match="at least 2 items"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="one width"):
        frechet_distance(torch.zeros(3, 4), torch.zeros(3, 5))


def test_caption_similarity_is_the_mean_per_item_of_its_frames_scaled_cosines():
    frames = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])]
    texts = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    # item 1: cos 1; item 2: frames cos 1/sqrt(2) and -1
    raw = (1 + (2 ** -0.5 - 1) / 2) / 2
    assert caption_similarity(frames, texts) == pytest.approx(raw)
    clamped = 100 * (1 + (2 ** -0.5 + 0) / 2) / 2  # CLIP score floors each cosine at 0
    assert caption_similarity(frames, texts, scale=100, clamp=True) == pytest.approx(clamped)


def test_clip_score_prefers_the_matching_caption(data):
    from anygpt.alignment.data import read_manifest

    rows = [s for s in read_manifest(data["captions_val"]) if "image" in s.media or "video" in s.media]
    embedder = ColourEmbedder()
    media = [embedder.embed_images([np.array(_load(s))]) if "image" in s.media else
             embedder.embed_images(list(_load(s).frames)) for s in rows]
    captions = [s.caption for s in rows]
    shuffled = captions[1:] + captions[:1]
    assert len({c.split()[1] for c in captions}) == len(captions)  # every row names another colour
    matching = caption_similarity(media, embedder.embed_texts(captions), scale=100, clamp=True)
    assert matching > 90 > caption_similarity(media, embedder.embed_texts(shuffled), scale=100, clamp=True)


def _load(sample):
    from anygpt.modalities import get_modality

    (modality, paths), = sample.media.items()
    return get_modality(modality).load(paths[0])


# Extractors -------------------------------------------------------------------------------------


def test_a_clip_folder_loads_and_its_features_tell_real_images_from_noise(clip_dir, data):
    from anygpt.alignment.data import read_manifest

    clip = load_extractor("clip", clip_dir)
    assert isinstance(clip, ClipEmbedder)
    images = [np.array(_load(s)) for s in read_manifest(data["captions_val"]) if "image" in s.media]
    noise = list(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    real, fake = clip.embed_images(images), clip.embed_images(noise)
    assert real.shape == (2, 16) and clip.embed_texts(["a", "a red square"]).shape == (2, 16)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, fake) > 1e-3


def test_clap_features_ignore_how_the_audio_is_stored_and_leave_the_global_rng_alone(clap_dir):
    clap = load_extractor("clap", clap_dir)
    assert isinstance(clap, ClapEmbedder)
    t = np.arange(24000) / 8000.0  # 3 s at the extractor's rate: longer than its 1 s input
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    state = np.random.get_state()[1].copy()
    mono = clap.embed_audio([Audio(wave, 8000)])
    stereo = clap.embed_audio([Audio(np.stack([wave, wave]), 8000)])
    assert np.array_equal(np.random.get_state()[1], state)
    assert mono.shape == (1, 16) and torch.allclose(mono, stereo, atol=1e-6)
    assert torch.allclose(clap.embed_audio([Audio(wave, 8000)]), mono)  # cut, not cropped at random


def test_an_extractor_is_an_object_a_name_or_a_folder_and_nothing_else(tmp_path):
    embedder = ColourEmbedder()
    assert load_extractor("clip", embedder) is embedder
    with pytest.raises(ConfigError, match="embed_audio and embed_texts"):
        load_extractor("clap", embedder)
    with pytest.raises(UnknownNameError, match="clap, clip"):
        load_extractor("inception", embedder)
    with pytest.raises(WeightsNotFoundError, match="--clip-model DIR"):
        load_extractor("clip", tmp_path / "missing")


def test_the_models_own_encoder_embeds_media_and_captions_in_one_space(tiny_pipe, data):
    from anygpt.alignment.data import read_manifest
    from anygpt.alignment.encoder_training import caption_embeddings
    from anygpt.alignment.metrics import OWN_ENCODER, ImageBindEmbedder
    from anygpt.modalities import get_modality

    embedder = load_extractor("clip", OWN_ENCODER, model=tiny_pipe.model)
    assert isinstance(embedder, ImageBindEmbedder) and load_extractor("clap", OWN_ENCODER, model=tiny_pipe.model)
    rows = read_manifest(data["captions_val"])
    images = [s.media["image"][0] for s in rows if "image" in s.media][:3]
    values = [np.asarray(get_modality("image").load(path).convert("RGB")) for path in images]
    got = embedder.embed_images(values)
    torch.testing.assert_close(got, tiny_pipe.model.encode_items("image", images).float())
    sounds = [get_modality("audio").load(s.media["audio"][0]) for s in rows if "audio" in s.media][:2]
    torch.testing.assert_close(embedder.embed_audio(sounds), tiny_pipe.model.encode_items("audio", sounds).float())
    texts = embedder.embed_texts(["a red circle", "a low sine tone"])
    torch.testing.assert_close(texts, caption_embeddings(tiny_pipe.model.encoder, ["a red circle", "a low sine tone"]))
    assert got.shape[1] == texts.shape[1] == tiny_pipe.model.encoder.output_dim
    with pytest.raises(ConfigError, match="the evaluated model's own encoder"):
        load_extractor("clip", OWN_ENCODER)


def test_world_evaluation_reports_the_metrics_beside_the_rates(tiny_pipe):
    from anygpt.alignment.world.evaluate import evaluate_world

    # The 9 world sounds (the 54 images and 72 clips take the same path, at more cost).
    report = evaluate_world(tiny_pipe, sections=("chat",), metrics=["fad", "clap"], max_new_tokens=2, progress=False)
    assert set(report.metrics) == {"fad/audio", "clap/audio"}
    assert report.metrics["fad/audio"] > 0 and -1 <= report.metrics["clap/audio"] <= 1
    assert "metrics       fad/audio" in report.table() and "chat" in report.rates


# Generation and the CLI -------------------------------------------------------------------------


def test_media_metrics_score_what_the_pipeline_generates_from_each_caption(tiny_pipe, data):
    """clip/image is the CLIP score of `pipe(request, outputs=("image",), seed=i)` per row."""
    from anygpt.alignment.data import STAGE2_PROMPTS, read_manifest

    rows = [s for s in read_manifest(data["captions_val"]) if "image" in s.media]
    embedder = ColourEmbedder()
    got = media_metrics(tiny_pipe, rows, ["clip"], extractors={"clip": embedder}, seed=5, max_new_tokens=4)
    images = [tiny_pipe(STAGE2_PROMPTS[0].format(a_modality="an image", caption=s.caption), outputs=("image",),
                        seed=5 + i, max_new_tokens=4).images[0] for i, s in enumerate(rows)]
    expected = caption_similarity([embedder.embed_images([np.asarray(im)]) for im in images],
                                  embedder.embed_texts([s.caption for s in rows]), scale=100, clamp=True)
    # batched and single generation agree up to the rounding of batched matrix products
    assert got == {"clip/image": pytest.approx(expected, abs=0.01)}


def test_media_metrics_name_what_they_cannot_score(tiny_pipe, data):
    from anygpt.alignment.data import read_manifest

    rows = read_manifest(data["captions_val"])
    with pytest.raises(UnknownNameError, match="clipsim, fad, fid"):
        media_metrics(tiny_pipe, rows, ["fvd"])
    images_only = SimpleNamespace(config=SimpleNamespace(output_modalities=["image"]), device="cpu")
    with pytest.raises(ConfigError, match="does not generate audio, which fad, clap"):
        media_metrics(images_only, rows, ["fid", "fad", "clap"], extractors={"clip": ColourEmbedder()})


def test_cli_eval_metrics_prints_and_writes_every_metric(clip_dir, clap_dir, data, tmp_path, capsys):
    from anygpt.cli import main

    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", "tiny", "--data", str(data["captions_val"]), "--decode", "0",
                 "--metrics", ",".join(METRICS), "--clip-model", str(clip_dir), "--clap-model", str(clap_dir),
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    keys = {f"{name}/{spec.modality}" for name, spec in METRICS.items()}
    assert keys <= written.keys() and all(np.isfinite(written[k]) for k in keys)
    assert written["fid/image"] > 0 and written["fad/audio"] > 0 and 0 <= written["clip/image"] <= 100
    printed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert all(printed[k] == f"{written[k]:.4g}" for k in keys)


def test_cli_eval_help_names_the_default_extractors(capsys):
    from anygpt.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in EXTRACTORS.values())
