"""Launch a built app with safe defaults (localhost, no share link, only the output folder
served), alone or mounted under the OpenAI-compatible API of :func:`serve`."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["launch", "serve", "build_server"]


def launch(demo: Any, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           block: bool = True, max_queue: int = 64, **kwargs: Any) -> Any:
    """Queue and launch ``demo`` (from :func:`app.chat.build_app`).

    Only the app's output folder is added to ``allowed_paths``. Uploads above four times the
    app's own limit are refused by the server before they are written; smaller ones over the
    limit are refused in the chat with a message.
    """
    output_dir = getattr(demo, "anygpt_output_dir", None)
    limit_mb = getattr(demo, "anygpt_max_upload_mb", None)
    demo.queue(max_size=max_queue)
    kwargs.setdefault("css", getattr(demo, "anygpt_css", None))
    logger.info("serving on http://%s:%s (share=%s, files from %s)", host, port, share, output_dir)
    return demo.launch(server_name=host, server_port=port, share=share,
                       allowed_paths=[str(output_dir)] if output_dir else None,
                       max_file_size=f"{int(limit_mb * 4)}mb" if limit_mb else None,
                       prevent_thread_lock=not block, **kwargs)


def build_server(pipe: Any, *, app: bool = True, output_dir: str = "outputs/app", max_upload_mb: float = 50.0,
                 concurrency: int = 1, max_queue: int = 64, api_key: str | None = None,
                 media_dir: str | None = None, max_request_mb: float = 64.0) -> Any:
    """The OpenAI-compatible API (:func:`app.openai_api.build_api`) with the chat app mounted at
    ``/``; both take their model calls from one :class:`~app.gate.ModelGate` of ``concurrency``
    slots and ``max_queue`` waiting places."""
    from anygpt.app.gate import ModelGate
    from anygpt.app.openai_api import build_api

    gate = ModelGate(concurrency, max_waiting=max_queue)
    api = build_api(pipe, api_key=api_key, media_dir=media_dir, max_request_mb=max_request_mb, gate=gate)
    if not app:
        return api
    import gradio as gr

    from anygpt.app.chat import build_app

    demo = build_app(pipe, output_dir=output_dir, max_upload_mb=max_upload_mb, concurrency=concurrency, gate=gate)
    demo.queue(max_size=max_queue)
    return gr.mount_gradio_app(api, demo, path="/", allowed_paths=[str(demo.anygpt_output_dir)],
                               max_file_size=f"{int(max_upload_mb * 4)}mb", css=demo.anygpt_css)


def serve(pipe: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          **kwargs: Any) -> None:
    """Serve :func:`build_server`'s app with uvicorn until interrupted."""
    import uvicorn

    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key: anyone who can reach the port can use the model "
                       "(set --api-key or ANYGPT_API_KEY)", host)
    server = build_server(pipe, api_key=api_key, **kwargs)
    logger.info("OpenAI-compatible API on http://%s:%s/v1%s", host, port,
                " and the chat app on /" if kwargs.get("app", True) else "")
    uvicorn.run(server, host=host, port=port, log_level="warning")
