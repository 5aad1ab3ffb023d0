"""How the `anygpt` command line reports failures: exit codes and one-line messages."""

import pytest

from anygpt import __version__, cli
from anygpt.cli import main
from anygpt.errors import ConfigError


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture
def load_raises(monkeypatch):
    """`generate` runs for real up to loading the model, which raises the given exception."""
    monkeypatch.delenv("ANYGPT_DEBUG", raising=False)

    def install(exc: BaseException) -> None:
        def load(args, progress=True):
            raise exc
        monkeypatch.setattr(cli, "_load_pipeline", load)
    return install


def test_an_unexpected_exception_is_one_line_naming_a_bug(load_raises, capsys):
    load_raises(RuntimeError("boom\nsecond line"))
    assert main(["generate", "hi"]) == 1
    err = capsys.readouterr().err
    lines = _lines(err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"internal error (a bug in anygpt {__version__}): RuntimeError: boom second line")
    assert "bug" in line and "--debug" in line and "report" in line
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--debug", "generate", "hi"], ["generate", "hi", "--debug"]])
def test_debug_prints_the_traceback(load_raises, capsys, argv):
    load_raises(RuntimeError("boom"))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert _lines(err)[-1].startswith("internal error (a bug in anygpt")


def test_debug_from_the_environment(load_raises, capsys, monkeypatch):
    load_raises(RuntimeError("boom"))
    monkeypatch.setenv("ANYGPT_DEBUG", "1")
    assert main(["generate", "hi"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ANYGPT_DEBUG", "0")
    assert main(["generate", "hi"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_debug_flag_is_off_by_default_and_survives_the_subcommand():
    parser = cli.build_parser()
    assert parser.parse_args(["presets"]).debug is False
    assert parser.parse_args(["--debug", "presets"]).debug is True
    assert parser.parse_args(["presets", "--debug"]).debug is True


def test_an_anygpt_error_exits_2_in_one_line(load_raises, capsys):
    load_raises(ConfigError("bad field\nfix it"))
    assert main(["generate", "hi"]) == 2
    err = capsys.readouterr().err
    assert _lines(err) == ["error: bad field fix it"] and err.count("\n") == 1

    assert main(["--debug", "generate", "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and _lines(err)[-1] == "error: bad field fix it"


def test_interrupt_exits_130_without_a_traceback(load_raises, capsys):
    load_raises(KeyboardInterrupt())
    assert main(["generate", "hi"]) == 130
    err = capsys.readouterr().err
    assert _lines(err) == ["interrupted"]


def test_usage_errors_still_exit_2_through_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_the_report_address_comes_from_the_package_metadata(monkeypatch):
    import importlib.metadata

    class Meta:
        def __init__(self, urls):
            self.urls = urls

        def get_all(self, key):
            return self.urls if key == "Project-URL" else None

    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: Meta(
        ["Homepage, https://example.org/anygpt", "Issues, https://example.org/anygpt/issues"]))
    assert cli._issues_url() == "https://example.org/anygpt/issues"  # noqa: SLF001
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: Meta(["Repository, https://example.org/r"]))
    assert cli._issues_url() == "https://example.org/r"  # noqa: SLF001
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: Meta([]))
    assert cli._issues_url() == "the AnyGPT issue tracker"  # noqa: SLF001
