"""Every per-call setting is validated up front (issue 11): a bad value raises a ConfigError that
names the setting, the value and the valid range, before anything is encoded or generated."""

import math
import random

import pytest

from anygpt.cli import main
from anygpt.config import DECODE_OPTIONS, MAX_SEED, SAMPLING_OPTIONS, DecoderConfig, GenerationConfig
from anygpt.errors import ConfigError
from anygpt.options import check_options, check_value

ALL_OPTIONS = (*SAMPLING_OPTIONS, *DECODE_OPTIONS)
INF, NAN = float("inf"), float("nan")

# (settings, the setting the error names, a fragment of the valid range it states)
BAD = [
    ({"steps": 0}, "steps", ">= 1"),
    ({"steps": 10_000}, "steps", "<= 1000"),
    ({"num_frames": 0}, "num_frames", ">= 1"),
    ({"num_frames": 10_000}, "num_frames", "<= 128"),
    ({"audio_length_s": -1.0}, "audio_length_s", "> 0"),
    ({"audio_length_s": 0.0}, "audio_length_s", "> 0"),
    ({"audio_length_s": INF}, "audio_length_s", "finite"),
    ({"audio_length_s": NAN}, "audio_length_s", "finite"),
    ({"height": 100, "width": 64}, "height", "a multiple of 8"),
    ({"height": 64, "width": 60}, "width", "a multiple of 8"),
    ({"height": 0, "width": 64}, "height", ">= 8"),
    ({"height": -64, "width": -64}, "height", ">= 8"),
    ({"height": 8192, "width": 8192}, "height", "<= 2048"),
    ({"height": 64}, "height", "together with width"),
    ({"width": 64}, "width", "together with height"),
    ({"seed": 2**70}, "seed", "<= 9223372036854775807"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"temperature": INF}, "temperature", "finite"),
    ({"temperature": NAN}, "temperature", "finite"),
    ({"temperature": 0.0}, "temperature", ">= 0.01"),
    ({"temperature": -1.0}, "temperature", ">= 0.01"),
    ({"temperature": 1e-300}, "temperature", ">= 0.01"),  # logits / 1e-300 overflow: NaN probabilities
    ({"top_p": 0.0}, "top_p", "> 0 and <= 1"),
    ({"top_p": 1.5}, "top_p", "<= 1"),
    ({"top_p": NAN}, "top_p", "finite"),
    ({"top_k": -1}, "top_k", ">= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens", ">= 1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", ">= 0.01"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", ">= 0.01"),
    ({"repetition_penalty": INF}, "repetition_penalty", "finite"),
    ({"guidance": -1.0}, "guidance", ">= 0"),
    ({"guidance": INF}, "guidance", "finite"),
    ({"fps": 0.0}, "fps", "> 0"),
    ({"fps": INF}, "fps", "finite"),
    ({"do_sample": "yes"}, "do_sample", "true or false"),
    ({"stop_strings": "###"}, "stop_strings", "list of non-empty strings"),
]


def _ids(case):
    return "-".join(f"{k}={v!r}" for k, v in case.items()) if isinstance(case, dict) else None


@pytest.fixture
def no_generation(tiny_pipe, monkeypatch):
    """Fail the test if the pipeline encodes media or starts the LLM."""
    import anygpt.pipeline

    calls = []

    def refuse(*args, **kwargs):
        calls.append("called")
        raise AssertionError("generation started before the settings were validated")

    monkeypatch.setattr(anygpt.pipeline, "generate_stream", refuse)
    monkeypatch.setattr(tiny_pipe, "_encode_pending", refuse)
    monkeypatch.setattr(tiny_pipe.model.lm, "tokenize_prompt", refuse)
    return calls


@pytest.mark.parametrize("settings, name, valid", BAD, ids=[_ids(c[0]) for c in BAD])
def test_bad_setting_raises_config_error_before_generation(tiny_pipe, no_generation, settings, name, valid):
    outputs = ("video",) if any(n in settings for n in ("num_frames", "fps", "height", "width")) else ()
    with pytest.raises(ConfigError) as info:
        tiny_pipe("Draw a cat", outputs=outputs, **settings)
    message = str(info.value)
    assert f"settings.{name}:" in message and valid in message, message
    assert repr(settings[name]) in message or name in ("stop_strings",), message
    assert not no_generation


@pytest.mark.parametrize("settings, name, valid", BAD[:6], ids=[_ids(c[0]) for c in BAD[:6]])
def test_chat_and_stream_validate_first_too(tiny_pipe, no_generation, settings, name, valid):
    from anygpt.conversation import Conversation

    conversation = Conversation()
    with pytest.raises(ConfigError, match=f"settings.{name}"):
        tiny_pipe.chat(conversation, "hi", **settings)
    with pytest.raises(ConfigError, match=f"settings.{name}"):
        next(tiny_pipe.stream(conversation, "hi", **settings))
    assert not conversation.turns and not no_generation


@pytest.mark.parametrize("settings", [
    {"seed": 0}, {"seed": MAX_SEED}, {"temperature": 0.01}, {"repetition_penalty": 0.01}, {"top_p": 1.0}, {"top_k": 0},
    {"height": 8, "width": 2048}, {"height": 64, "width": 64, "num_frames": 1, "fps": 0.5},
    {"audio_length_s": 0.25}, {"guidance": 0.0}, {"steps": 1}, {"steps": 1000},
    {"do_sample": False, "temperature": 1.0}, {"seed": None, "height": None},
], ids=_ids)
def test_valid_settings_pass(tiny_pipe, settings):
    sampling, decode = tiny_pipe._settings((), settings)  # noqa: SLF001 (the validation alone)
    for name, value in settings.items():
        if value is not None:
            assert (decode[name] if name in decode else getattr(sampling, name)) == value


def test_greedy_decoding_is_do_sample_false_not_temperature_zero(tiny_pipe):
    greedy = [tiny_pipe("hi", do_sample=False, max_new_tokens=4, seed=s).raw_text for s in (0, 1)]
    assert greedy[0] == greedy[1]


def test_a_valid_seed_near_the_top_decodes_every_item(tiny_pipe):
    out = tiny_pipe("Draw it and film it", outputs=("image", "video"), seed=MAX_SEED, max_new_tokens=2,
                    steps=2, height=32, width=32, num_frames=2)
    assert len(out.media()) == 2


def test_decoder_configs_take_the_bounds_too():
    with pytest.raises(ConfigError, match=r"decoder.height: must be >= 8 and <= 2048, a multiple of 8, got 8192"):
        DecoderConfig(arch={}, height=8192).validate("decoder")
    with pytest.raises(ConfigError, match=r"generation.temperature: must be a finite number >= 0.01, got inf"):
        GenerationConfig(temperature=INF).validate("generation")
    DecoderConfig(arch={}, height=32).validate("decoder")  # a config may set one size: the other is native


def test_every_float_option_refuses_non_finite_values():
    for opt in ALL_OPTIONS:
        if opt.type is float:
            for value in (INF, -INF, NAN):
                with pytest.raises(ConfigError, match=rf"{opt.name}: must be a finite number"):
                    check_value(opt, value, opt.name)


def test_the_ranges_are_stated_in_the_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ">= 8 and <= 2048, a multiple of 8" in help_text
    assert ">= 0 and <= 9223372036854775807" in help_text


@pytest.mark.parametrize("argv, name", [
    (["--steps", "0"], "steps"),
    (["--height", "100", "--width", "64"], "height"),
    (["--height", "64"], "height"),
    (["--seed", str(2**70)], "seed"),
    (["--temperature", "inf"], "temperature"),
    (["--temperature", "0"], "temperature"),
    (["--audio-length", "-1"], "audio_length_s"),
])
def test_cli_bad_setting_prints_one_line_and_exits_2(capsys, monkeypatch, argv, name):
    from anygpt import cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were validated")

    monkeypatch.setattr(cli, "_load_pipeline", refuse)
    assert main(["generate", "--preset", "tiny", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: settings.{name}: must be") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_app_sliders_start_at_valid_values():
    """Each app control's lowest value is a valid setting (or, for decoder options, 0: the preset's)."""
    pytest.importorskip("gradio")
    from anygpt.app.chat import _setting, control_options

    for opt in control_options():
        if opt.ui is None:
            continue
        low, high, _ = opt.ui
        for value in (low, high):
            setting = _setting(opt, value)
            if setting is not None:
                check_value(opt, setting, opt.name)


# Property: the validation raises ConfigError or nothing, never another exception --------------
_WILD = [0, 1, -1, 7, 8, 64, 2048, 2056, 2**31, 2**63 - 1, 2**63, 2**70, -(2**70), 0.0, 0.5, 1.0, -0.5,
         1e-300, 1e300, INF, -INF, NAN, True, False, None, "8", [], 3 + 0j]


def _check(tiny_pipe, settings):
    try:
        tiny_pipe._settings((), settings)  # noqa: SLF001 (the validation alone, no generation)
        check_options(ALL_OPTIONS, settings)
    except ConfigError:
        return False
    return True


def _passes_declared_bounds(settings) -> bool:
    """What a value that passed must satisfy, restated from the declarations."""
    by_name = {o.name: o for o in ALL_OPTIONS}
    for name, value in settings.items():
        opt = by_name[name]
        if value is None or opt.type is bool:
            continue
        assert not isinstance(value, bool) and (opt.type is float or isinstance(value, int))
        assert not isinstance(value, float) or math.isfinite(value)
        assert opt.minimum is None or value >= opt.minimum
        assert opt.maximum is None or value <= opt.maximum
        assert opt.above is None or value > opt.above
        assert opt.multiple_of is None or value % opt.multiple_of == 0
    return True


def test_seeded_random_settings_pass_or_raise_config_error(tiny_pipe):
    rng = random.Random(11)
    names = [o.name for o in ALL_OPTIONS]
    for _ in range(2000):
        settings = {name: rng.choice(_WILD) for name in rng.sample(names, rng.randint(1, 4))}
        if _check(tiny_pipe, settings):
            assert _passes_declared_bounds(settings)


def test_hypothesis_settings_pass_or_raise_config_error(tiny_pipe):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=3), st.sampled_from(_WILD))
    settings = st.dictionaries(st.sampled_from([o.name for o in ALL_OPTIONS]), value, max_size=6)

    @hypothesis.settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @hypothesis.given(settings)
    def prop(values):
        if _check(tiny_pipe, values):
            assert _passes_declared_bounds(values)

    prop()


def test_the_lowest_temperature_and_penalty_still_sample_finite_probabilities(tiny_pipe):
    out = tiny_pipe("hi", temperature=0.01, repetition_penalty=0.01, max_new_tokens=6, seed=0)
    assert out.num_generated_tokens > 0  # a NaN distribution makes torch.multinomial raise
