"""The one cache-folder rule and the one relative-path rule, and the components that follow them."""

from pathlib import Path

import pytest

from anygpt.paths import cache_dir, resolve_path


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ANYGPT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_cache_defaults_to_the_home_cache(clean_env, tmp_path):
    assert cache_dir() == tmp_path / "home" / ".cache" / "anygpt"


def test_anygpt_cache_wins_then_xdg(clean_env, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "anygpt"
    clean_env.setenv("ANYGPT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("value", ["", "relative/cache", "."])
def test_empty_or_relative_values_never_mean_the_current_directory(clean_env, tmp_path, value):
    clean_env.setenv("ANYGPT_CACHE", value)
    clean_env.setenv("XDG_CACHE_HOME", value)
    assert cache_dir() == tmp_path / "home" / ".cache" / "anygpt"
    assert cache_dir().is_absolute()


def test_every_component_uses_the_same_cache(clean_env, tmp_path):
    from anygpt import llm
    from anygpt.config import LLMConfig
    from anygpt.encoders import imagebind_cache_path

    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "anygpt"
    assert imagebind_cache_path() == root / "imagebind" / "imagebind_huge.pth"
    package = tmp_path / "pkg" / "fake_llm_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"GGUF")
    clean_env.syspath_prepend(str(package.parent))
    converted = []
    clean_env.setattr(llm, "_convert_gguf", lambda gguf, folder: converted.append(folder))
    folder = llm._converted_package_folder(LLMConfig(local_package="fake_llm_pkg", gguf_file="model.gguf"))
    assert converted == [folder] and folder.parent == root / "llm"


def test_relative_paths_resolve_against_the_naming_file(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir("/")
    assert resolve_path("mine", tmp_path / "models") == str(tmp_path / "models" / "mine")
    assert resolve_path("./not-yet/there", tmp_path) == str(tmp_path / "not-yet" / "there")
    # A hub id stays a hub id.
    assert resolve_path("stable-diffusion-v1-5/stable-diffusion-v1-5", tmp_path) == \
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve_path(str(tmp_path / "abs"), Path("/elsewhere")) == str(tmp_path / "abs")


def test_the_cache_placeholder(clean_env, tmp_path):
    clean_env.setenv("ANYGPT_CACHE", str(tmp_path / "c"))
    assert resolve_path("{cache}/weights/vicuna", None) == str(tmp_path / "c" / "weights" / "vicuna")
