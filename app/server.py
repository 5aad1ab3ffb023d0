"""Launch a built app with safe defaults: localhost, no share link, only the output folder served."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["launch"]


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
    logger.info("serving on http://%s:%s (share=%s, files from %s)", host, port, share, output_dir)
    return demo.launch(server_name=host, server_port=port, share=share,
                       allowed_paths=[str(output_dir)] if output_dir else None,
                       max_file_size=f"{int(limit_mb * 4)}mb" if limit_mb else None,
                       prevent_thread_lock=not block, **kwargs)
