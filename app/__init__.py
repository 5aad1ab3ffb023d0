"""The Gradio chat app. It loads no model: :func:`build_app` takes a pipeline.

    from anygpt import AnyGPTPipeline
    from anygpt.app import build_app, launch

    launch(build_app(AnyGPTPipeline.from_pretrained("mini"), output_dir="outputs/app"))
"""

from __future__ import annotations

__all__ = ["build_app", "launch"]


def __getattr__(name):  # gradio is imported on first use, not by ``import app``
    if name == "build_app":
        from anygpt.app.chat import build_app

        return build_app
    if name == "launch":
        from anygpt.app.server import launch

        return launch
    raise AttributeError(name)
