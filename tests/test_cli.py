"""The `anygpt` command line."""

import json
import os
import subprocess
import sys

import pytest

from anygpt.cli import main


@pytest.mark.slow
def test_generate_writes_media_and_reports_paths(media_files, tmp_path):
    out_dir = tmp_path / "answer"
    cmd = [sys.executable, "-m", "anygpt", "generate", "--preset", "tiny", "Look <image> and draw",
           "--image", str(media_files["image"]), "--audio", str(media_files["audio"]),
           "--video", str(media_files["video"]), "--outputs", "image,audio,video", "--seed", "0",
           "--out", str(out_dir), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("image_0.png", "audio_0.wav", "video_0.mp4", "answer.json"):
        assert f"wrote {out_dir / name}" in proc.stdout
        assert (out_dir / name).stat().st_size > 0
    answer = json.loads((out_dir / "answer.json").read_text())
    assert [s["type"] for s in answer["segments"] if s["type"] != "text"] == ["image", "audio", "video"]


@pytest.mark.slow
def test_stdout_holds_only_the_answer_and_stderr_no_library_warnings(tmp_path):
    """By default the libraries' warnings stay off stderr, the decoder's bar is labelled, and the
    answer's line is ended before any bar could overwrite it; --verbose shows the warnings."""
    out_dir = tmp_path / "answer"
    cmd = [sys.executable, "-m", "anygpt", "generate", "--preset", "tiny", "Draw", "--outputs", "image",
           "--seed", "0", "--max-new-tokens", "6", "--out", str(out_dir)]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads((out_dir / "answer.json").read_text())
    files = "".join(f"wrote {out_dir / n}\n" for n in ("image_0.png", "answer.json"))
    assert proc.stdout.endswith("\n" + files) or proc.stdout == files
    assert proc.stdout[:-len(files)].strip() == answer["text"].strip()
    for text in ("Warning", "warn", "deprecated", "W1202", "torchao", "site-packages"):
        assert text not in proc.stderr, proc.stderr[-2000:]
    assert "image 1/1 · steps" in proc.stderr


def test_version_prints_the_package_version(capsys):
    import anygpt

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"anygpt {anygpt.__version__}"


def test_errors_print_one_line_and_exit_nonzero(capsys, tmp_path):
    assert main(["generate", "--preset", "nope", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown preset 'nope'; valid names: mini, nextgpt-7b, tiny")
    assert "Traceback" not in err and err.count("\n") == 1

    assert main(["generate", "--preset", "tiny", "hi", "--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "Traceback" not in err and err.count("\n") == 1

    bad = tmp_path / "broken.yaml"
    bad.write_text("llm: {arch: {model_type: llama}}\n")
    assert main(["generate", "--model", str(bad), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_presets_lists_components(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "nextgpt-7b:" in out and "stable-diffusion-v1-5/stable-diffusion-v1-5" in out and "tiny:" in out
    assert main(["presets", "--show", "tiny"]) == 0
    assert "name: tiny" in capsys.readouterr().out


def test_generate_has_one_flag_per_declared_setting_and_modality(monkeypatch):
    from anygpt import cli
    from anygpt.config import DECODE_OPTIONS, SAMPLING_OPTIONS
    from anygpt.modalities import MODALITIES
    from anygpt.options import Option

    def generate_flags() -> set[str]:
        sub = next(a for a in cli.build_parser()._actions if a.dest == "command")  # noqa: SLF001
        return {flag for action in sub.choices["generate"]._actions for flag in action.option_strings}

    flags = generate_flags()
    for opt in (*SAMPLING_OPTIONS, *DECODE_OPTIONS):
        assert (opt.false_flag or opt.cli_flag) in flags, opt.name
    assert {f"--{m}" for m in MODALITIES} <= flags
    extra = Option(name="shift", type=float, default=None, help="a new decoder setting", nullable=True)
    monkeypatch.setattr(cli, "DECODE_OPTIONS", (*DECODE_OPTIONS, extra))
    assert "--shift" in generate_flags()
    args = cli.build_parser().parse_args(["generate", "hi", "--shift", "0.5", "--greedy", "--audio-length", "2"])
    assert (args.shift, args.do_sample, args.audio_length_s, args.temperature) == (0.5, False, 2.0, None)
