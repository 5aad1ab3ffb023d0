"""A model directory holds what it needs: moved or shared on its own, it loads and answers."""

import shutil

from anygpt import AnyGPTPipeline


def test_a_directory_saved_from_another_one_moves_on_its_own(tiny_pipe, tmp_path):
    first = tiny_pipe.save_pretrained(tmp_path / "stage1")
    second = AnyGPTPipeline.from_pretrained(first).save_pretrained(tmp_path / "stage2")
    expected = AnyGPTPipeline.from_pretrained(second)("hello", seed=0, max_new_tokens=6)

    shutil.rmtree(first)  # the earlier stage is gone
    moved = shutil.move(str(second), str(tmp_path / "elsewhere" / "model"))
    config = (tmp_path / "elsewhere" / "model" / "anygpt_config.yaml").read_text()
    assert str(tmp_path) not in config  # nothing outside the folder is named
    answer = AnyGPTPipeline.from_pretrained(moved)("hello", seed=0, max_new_tokens=6)
    assert answer.raw_text == expected.raw_text


def test_components_from_another_model_directory_are_hard_linked(tiny_pipe, tmp_path):
    first = tiny_pipe.save_pretrained(tmp_path / "a")
    second = AnyGPTPipeline.from_pretrained(first).save_pretrained(tmp_path / "b")
    for name in ("encoder.safetensors",):
        assert (second / name).stat().st_ino == (first / name).stat().st_ino  # same file, no extra space


def test_a_users_own_folder_stays_referenced_by_path(tiny_pipe, tmp_path):
    """A component outside any model directory (a download cache, a user's folder) is not copied."""
    from anygpt.checkpoint import _model_directory_of

    assert _model_directory_of(tmp_path / "cache" / "weights.bin") is None
    folder = tiny_pipe.save_pretrained(tmp_path / "m")
    assert _model_directory_of(folder / "decoders" / "image" / "model_index.json") == folder.resolve()
