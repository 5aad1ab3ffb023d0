"""A real browser drives the chat UI: type, attach an image, send, and find the media in the reply.

Needs Debian's Chromium and Playwright's Python package (no browser download):
    apt-get install -y chromium
    pip install playwright        # or: pip install -e '.[test]'
Skipped with a reason when either is missing.
"""

import contextlib
import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("ANYGPT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,  # a browser plus its own app server: ~20 s
    pytest.mark.skipif(not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)),
                       reason=f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="Playwright's Python package is missing (pip install playwright)"),
]

# Screenshots go to $ANYGPT_TEST_ARTIFACTS (CI can upload it), else to pytest's temp folder.
ARTIFACTS_ENV = "ANYGPT_TEST_ARTIFACTS"


@contextlib.contextmanager
def _serving(pipe, output_dir):
    """The chat app on ``pipe``, served on a free local port; yields its URL."""
    from anygpt.app.chat import build_app
    from anygpt.app.server import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(pipe, output_dir=output_dir)
    launch(demo, host="127.0.0.1", port=port, block=False)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def ui_url(tiny_pipe, tmp_path_factory):
    with _serving(tiny_pipe, tmp_path_factory.mktemp("ui_out")) as url:
        yield url


def _artifacts(tmp_path):
    folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _chat_page(url, artifacts, name):
    """A Chromium page on the app at ``url``, ready for a message. On a failure inside the block
    the page is saved as ``<name>_failure.png`` and ``.html`` in ``artifacts``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector("#message textarea", timeout=60_000)
            yield page
        except Exception:
            page.screenshot(path=str(artifacts / f"{name}_failure.png"), full_page=True)
            (artifacts / f"{name}_failure.html").write_text(page.content())
            raise
        finally:
            browser.close()


def _send(page, text, files, output):
    page.get_by_label(output, exact=True).check()
    box = page.locator("#message textarea")
    box.fill(text)
    if files:
        page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_timeout(500)
    page.locator("#message button.submit-button").click()


def test_browser_chat_turns_show_image_and_audio(ui_url, media_files, tmp_path):
    artifacts = _artifacts(tmp_path)
    with _chat_page(ui_url, artifacts, "app_chat") as page:
        assert "tiny" in page.locator("#header").inner_text()
        bot = page.locator("#chatbot [data-testid='bot']")
        _send(page, "What is in this picture? Draw one.", [media_files["image"]], "image")
        bot.locator("img").first.wait_for(timeout=60_000)
        _send(page, "Now make a sound.", [], "audio")
        bot.locator("audio, [data-testid='waveform-Audio'], .waveform-container, .audio-player").first \
            .wait_for(state="attached", timeout=60_000)
        page.screenshot(path=str(artifacts / "app_chat.png"), full_page=True)
        assert page.locator("#chatbot [data-testid='user'] img").count() >= 1  # the upload is shown


@pytest.fixture(scope="module")
def mini_app(mini_pipe, tmp_path_factory):
    """The chat app on the shipped `mini` (the trained miniature): its URL and output folder."""
    out = tmp_path_factory.mktemp("mini_out")
    with _serving(mini_pipe, out) as url:
        yield url, out


def test_browser_image_request_to_mini_is_answered_with_a_picture(mini_app, tmp_path):
    """What a new user does after `make demo`: ask the miniature for a picture in the default
    `auto` mode. The screenshot, and what the world's detectors read off the picture, are kept
    as test artefacts (how often the picture is right is `anygpt eval world`'s job)."""
    import json

    from PIL import Image

    from anygpt.alignment.world import detect_image

    url, out = mini_app
    artifacts = _artifacts(tmp_path)
    with _chat_page(url, artifacts, "app_mini_world") as page:
        assert "circle" in page.locator("#header").inner_text()  # it says what it knows
        _send(page, "Show me a picture of a red circle on a white background.", [], "auto")
        page.locator("#chatbot [data-testid='bot'] img").first.wait_for(timeout=120_000)
        page.screenshot(path=str(artifacts / "app_mini_world.png"), full_page=True)
    drawn = [p for p in out.rglob("*.png") if "examples" not in p.parts]
    assert len(drawn) == 1
    found = {name: d.value for name, d in detect_image(Image.open(drawn[0])).items()}
    (artifacts / "app_mini_world.json").write_text(json.dumps({"asked": "red circle on white", "detected": found}))


def test_browser_refuses_an_empty_message_in_place_and_keeps_the_output_choice(ui_url, tmp_path):
    """Sending an empty box posts nothing; after a turn the chosen output mode is still selected."""
    artifacts = _artifacts(tmp_path)
    with _chat_page(ui_url, artifacts, "app_empty") as page:
        page.get_by_label("image", exact=True).check()
        page.locator("#message textarea").press("Enter")
        page.wait_for_timeout(1500)
        assert page.locator("#chatbot [data-testid='user']").count() == 0
        _send(page, "Draw a square.", [], "image")
        page.locator("#chatbot [data-testid='bot'] img").first.wait_for(timeout=60_000)
        assert page.get_by_label("image", exact=True).is_checked()
        page.screenshot(path=str(artifacts / "app_empty.png"), full_page=True)


class SlowSteps:
    """The tiny pipeline, except that a message asking to draw "slowly" decodes in 40 steps of at
    least a quarter second each (from the pipeline's own step callback), so a person (or this
    test) has time to watch the progress and press stop."""

    def __init__(self, pipe):
        self.pipe, self.config, self.device = pipe, pipe.config, pipe.device

    def stream(self, conversation, message=None, *, on_progress=None, **kwargs):
        import time

        if "slowly" in (message or ""):
            kwargs["steps"] = 40

            def slow(step, report=on_progress):
                if report is not None:
                    report(step)
                time.sleep(0.25)

            on_progress = slow
        return self.pipe.stream(conversation, message, on_progress=on_progress, **kwargs)


@pytest.fixture(scope="module")
def slow_url(tiny_pipe, tmp_path_factory):
    with _serving(SlowSteps(tiny_pipe), tmp_path_factory.mktemp("slow_out")) as url:
        yield url


def test_browser_shows_decoder_steps_and_stop_ends_the_answer_cleanly(slow_url, tmp_path):
    """While the decoder runs, the answer shows its step count and ETA; stop ends it at the next
    step, marked as stopped; the box is usable again, the next turn is answered, and a 64-px
    image is shown at a sensible size rather than at the chat's width."""
    import re

    artifacts = _artifacts(tmp_path)
    with _chat_page(slow_url, artifacts, "app_stop") as page:
        bot = page.locator("#chatbot [data-testid='bot']")
        stop = page.locator("#stop")
        assert stop.is_disabled()  # nothing to stop yet
        _send(page, "Draw a square, slowly.", [], "image")
        progress = bot.filter(has_text=re.compile(r"step \d+/40 · ETA \d+ s"))
        progress.first.wait_for(timeout=60_000)
        page.screenshot(path=str(artifacts / "app_progress.png"), full_page=True)
        assert stop.is_enabled() and page.locator("#message textarea").is_disabled()

        stop.click()
        bot.filter(has_text="Stopped.").first.wait_for(timeout=30_000)
        page.wait_for_function("!document.querySelector('#message textarea').disabled", timeout=30_000)
        page.screenshot(path=str(artifacts / "app_stopped.png"), full_page=True)
        last = bot.last
        assert last.locator("img").count() == 0 and "making" not in last.inner_text()
        assert stop.is_disabled()

        _send(page, "Now draw it.", [], "image")
        image = page.locator("#chatbot [data-testid='bot'] img").first
        image.wait_for(timeout=60_000)
        page.wait_for_function("!document.querySelector('#message textarea').disabled", timeout=30_000)
        page.screenshot(path=str(artifacts / "app_after_stop.png"), full_page=True)
        assert page.locator("#chatbot").inner_text().count("Stopped.") == 1  # the stopped turn stays
        shown = image.bounding_box()
        chat_width = page.locator("#chatbot").bounding_box()["width"]
        assert 150 <= shown["width"] <= 520 and shown["width"] < chat_width / 2, (shown, chat_width)
