"""Messages with typed content parts, as transformers' any-to-any pipeline takes them."""

import pytest
from PIL import Image

from anygpt.errors import ConfigError


def test_typed_parts_answer_as_the_media_keywords_do(tiny_pipe, media_files):
    parts = [{"type": "text", "text": "What is in"}, {"type": "image", "path": str(media_files["image"])},
             {"type": "text", "text": "and in"}, {"type": "audio", "url": f"file://{media_files['audio']}"}]
    typed = tiny_pipe([{"role": "user", "content": parts}], seed=0, max_new_tokens=6)
    keywords = tiny_pipe("What is in\n<image>\nand in\n<audio>", images=[media_files["image"]],
                         audios=[media_files["audio"]], seed=0, max_new_tokens=6)
    assert typed.num_prompt_tokens == keywords.num_prompt_tokens
    assert typed.raw_text == keywords.raw_text


def test_a_part_may_hold_a_loaded_value(tiny_pipe, media_files):
    image = Image.open(media_files["image"]).convert("RGB")
    by_value = tiny_pipe([{"role": "user", "content": [{"type": "image", "image": image}]}], seed=0,
                         max_new_tokens=4)
    by_path = tiny_pipe([{"role": "user", "content": [{"type": "image", "path": str(media_files["image"])}]}],
                        seed=0, max_new_tokens=4)
    assert by_value.num_prompt_tokens == by_path.num_prompt_tokens


@pytest.mark.parametrize("part, message", [
    ({"type": "smell", "path": "x"}, "unknown part type 'smell'"),
    ({"type": "image", "url": "https://example.com/a.png"}, "remote URLs are not fetched"),
    ({"type": "image", "path": "a.png", "url": "b.png"}, "exactly one of path, url or image"),
    ({"type": "image"}, "got none"),
])
def test_a_bad_part_is_one_clear_error(tiny_pipe, part, message):
    with pytest.raises(ConfigError, match=message):
        tiny_pipe([{"role": "user", "content": [part]}], max_new_tokens=2)
