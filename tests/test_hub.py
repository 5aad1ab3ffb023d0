"""Hugging Face conventions: ``from_pretrained("owner/name")`` through ``huggingface_hub`` and
``save_pretrained(push_to_hub=True)``.

The hub cannot be reached here (and tests run with ``HF_HUB_OFFLINE=1``), so downloads are
served from a local hub cache written in the real layout
(``models--owner--name/{blobs,refs,snapshots}``), which ``snapshot_download`` reads as it would
after a download; only the upload's transport (``HfApi.create_repo`` / ``upload_folder``) is
replaced by a recorder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from anygpt import AnyGPTPipeline, ConfigError, UnknownNameError, WeightsNotFoundError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """Put ``folder`` into the hub cache ``cache`` as ``snapshot_download`` leaves a download:
    content-addressed blobs, a snapshot of relative symbolic links, and ``refs/main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tiny_pipe, tmp_path_factory):
    """A hub cache holding the saved `tiny` as `someone/tiny-anygpt`, and tiny's answer to compare."""
    root = tmp_path_factory.mktemp("hub")
    folder = tiny_pipe.save_pretrained(root / "saved")
    cache = root / "cache"
    populate_hub_cache(folder, cache, "someone/tiny-anygpt")
    shutil.rmtree(folder)  # only the cache holds it now
    expected = tiny_pipe("Draw a red square", outputs=("image",), seed=0, max_new_tokens=8, steps=2)
    return cache, expected


def test_a_hub_id_loads_from_the_hub_cache_and_answers(hub_cache):
    cache, expected = hub_cache
    pipe = AnyGPTPipeline.from_pretrained("someone/tiny-anygpt", cache_dir=cache)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.base_dir == (cache / "models--someone--tiny-anygpt" / "snapshots" / COMMIT).resolve()
    out = pipe("Draw a red square", outputs=("image",), seed=0, max_new_tokens=8, steps=2)
    assert out.raw_text == expected.raw_text
    assert out.images and out.images[0].size == expected.images[0].size
    assert out.images[0].tobytes() == expected.images[0].tobytes()


def test_the_default_hub_cache_and_a_revision_are_respected(hub_cache, monkeypatch):
    """HF_HUB_CACHE (read by huggingface_hub into ``constants``) and ``revision=`` a commit."""
    from huggingface_hub import constants

    cache, _ = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    pipe = AnyGPTPipeline.from_pretrained("someone/tiny-anygpt", revision=COMMIT, local_files_only=True)
    assert pipe.base_dir.name == COMMIT
    with pytest.raises(WeightsNotFoundError, match="at revision 'v2'"):
        AnyGPTPipeline.from_pretrained("someone/tiny-anygpt", revision="v2")


def test_a_model_loaded_from_the_hub_saves_a_folder_that_holds_its_files(hub_cache, tmp_path):
    """The snapshot's files are links into the cache's blobs/: they are still brought into the
    new folder (no path into the cache is written)."""
    cache, expected = hub_cache
    folder = AnyGPTPipeline.from_pretrained("someone/tiny-anygpt", cache_dir=cache).save_pretrained(tmp_path / "m")
    config = (folder / "anygpt_config.yaml").read_text()
    assert str(cache) not in config and "blobs" not in config
    assert (folder / "encoder.safetensors").is_file() and not (folder / "encoder.safetensors").is_symlink()
    assert AnyGPTPipeline.from_pretrained(folder)("Draw a red square", outputs=("image",), seed=0,
                                                  max_new_tokens=8, steps=2).raw_text == expected.raw_text


def test_offline_with_nothing_cached_is_a_clean_error_listing_the_presets(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        AnyGPTPipeline.from_pretrained("someone/not-there", cache_dir=tmp_path / "empty")
    message = str(info.value)
    assert "'someone/not-there' is not a preset, nor a local folder, nor in the Hugging Face cache" in message
    assert str(tmp_path / "empty") in message
    assert "HF_HUB_OFFLINE" in message and "mini, nextgpt-7b, tiny" in message
    assert "give the path of a model directory" in message
    assert "\n" not in message  # one line, no traceback text of huggingface_hub's


def test_a_name_that_is_no_preset_path_or_hub_id_lists_the_presets():
    with pytest.raises(UnknownNameError, match="unknown preset 'tinyy'; valid names: mini, nextgpt-7b, tiny. "
                                               "Or pass a model directory, a .yaml config path, or the hub id"):
        AnyGPTPipeline.from_pretrained("tinyy")


def test_a_cached_repository_without_an_anygpt_config_is_refused(tmp_path):
    source = tmp_path / "other"
    source.mkdir()
    (source / "config.json").write_text("{}")
    populate_hub_cache(source, tmp_path / "cache", "someone/not-anygpt")
    with pytest.raises(ConfigError, match="the cached copy of hub repository 'someone/not-anygpt' holds no "
                                          "anygpt_config.yaml, so it is not an AnyGPT model directory"):
        AnyGPTPipeline.from_pretrained("someone/not-anygpt", cache_dir=tmp_path / "cache")


class HubRecorder:
    """Stands in for the hub's side of ``HfApi.create_repo`` and ``HfApi.upload_folder``: records
    the calls and keeps a copy of each uploaded folder, as the hub would hold it."""

    def __init__(self, store: Path, user: str = "someone"):
        self.store, self.user, self.calls = store, user, []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "HubRecorder":
        from huggingface_hub import HfApi, RepoUrl

        recorder = self

        def create_repo(api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            full = repo_id if "/" in repo_id else f"{recorder.user}/{repo_id}"
            recorder.calls.append(("create_repo", {"repo_id": repo_id, "token": token, "private": private,
                                                   "exist_ok": exist_ok}))
            return RepoUrl(f"https://huggingface.co/{full}")

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, token=None, create_pr=None, **kwargs):
            recorder.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": Path(folder_path),
                                                     "commit_message": commit_message, "token": token,
                                                     "create_pr": create_pr}))
            target = recorder.store / repo_id
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder_path, target)  # what the hub now holds
            return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_uploads_the_saved_complete_folder(tiny_pipe, tmp_path, monkeypatch):
    hub = HubRecorder(tmp_path / "hub").install(monkeypatch)
    folder = tiny_pipe.save_pretrained(tmp_path / "my-model", push_to_hub=True, repo_id="someone/my-model",
                                       private=True, token="hf_test", commit_message="first model")

    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    create, upload = hub.calls[0][1], hub.calls[1][1]
    assert create == {"repo_id": "someone/my-model", "token": "hf_test", "private": True, "exist_ok": True}
    assert upload["folder_path"] == folder and upload["repo_id"] == "someone/my-model"
    assert upload["commit_message"] == "first model" and upload["token"] == "hf_test"
    uploaded = hub.store / "someone/my-model"
    for name in ("anygpt_config.yaml", "README.md", "projectors.safetensors", "encoder.safetensors", "llm"):
        assert (uploaded / name).exists(), name
    assert sorted(p.relative_to(uploaded) for p in uploaded.rglob("*")) == \
        sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert 'from_pretrained("someone/my-model")' in (uploaded / "README.md").read_text()

    # What was uploaded loads by its hub id once downloaded (here: put in a hub cache).
    populate_hub_cache(uploaded, tmp_path / "cache", "someone/my-model")
    pipe = AnyGPTPipeline.from_pretrained("someone/my-model", cache_dir=tmp_path / "cache")
    assert pipe("hello", seed=0, max_new_tokens=6).raw_text == tiny_pipe("hello", seed=0, max_new_tokens=6).raw_text


def test_push_names_the_repository_after_the_folder_by_default(tiny_pipe, tmp_path, monkeypatch):
    hub = HubRecorder(tmp_path / "hub").install(monkeypatch)
    tiny_pipe.save_pretrained(tmp_path / "tiny-copy", push_to_hub=True)
    assert hub.calls[0][1]["repo_id"] == "tiny-copy" and hub.calls[1][1]["repo_id"] == "someone/tiny-copy"
    assert hub.calls[1][1]["commit_message"] == "Upload AnyGPT model"
    card = (hub.store / "someone/tiny-copy" / "README.md").read_text()
    assert 'from_pretrained("someone/tiny-copy")' in card  # the full id the hub gave it


def test_push_to_hub_keeps_no_local_copy(tiny_pipe, tmp_path, monkeypatch):
    hub = HubRecorder(tmp_path / "hub").install(monkeypatch)
    url = tiny_pipe.push_to_hub("someone/pushed")
    assert url.startswith("https://huggingface.co/someone/pushed/commit/")
    assert not hub.calls[1][1]["folder_path"].exists()
    assert (hub.store / "someone/pushed" / "anygpt_config.yaml").is_file()


def test_a_folder_naming_local_files_outside_itself_is_not_uploaded(tiny_pipe, tmp_path, monkeypatch):
    import yaml

    folder = tiny_pipe.save_pretrained(tmp_path / "m")
    outside = tmp_path / "my-decoders" / "image"
    shutil.move(str(folder / "decoders" / "image"), str(outside))
    data = yaml.safe_load((folder / "anygpt_config.yaml").read_text())
    data["modalities"]["image"]["decoder"]["pretrained"] = str(outside)
    (folder / "anygpt_config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    hub = HubRecorder(tmp_path / "hub").install(monkeypatch)
    with pytest.raises(ConfigError, match="names local files outside the folder.*my-decoders"):
        AnyGPTPipeline.from_pretrained(folder).save_pretrained(tmp_path / "again", push_to_hub=True,
                                                               repo_id="someone/again")
    assert hub.calls == []  # refused before anything reached the hub
    assert (tmp_path / "again" / "anygpt_config.yaml").is_file()  # saved locally all the same


def test_a_failed_upload_says_how_to_fix_it(tiny_pipe, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from anygpt import CheckpointError

    def refuse(api, repo_id, **kwargs):
        raise OSError("Invalid user token.")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(CheckpointError, match=r"could not upload .* 'someone/x': OSError: Invalid user token.*"
                                              r"hf auth login"):
        tiny_pipe.save_pretrained(tmp_path / "x", push_to_hub=True, repo_id="someone/x")
    assert (tmp_path / "x" / "anygpt_config.yaml").is_file()
