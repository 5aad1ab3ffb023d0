"""The exceptions AnyGPT raises for problems a user can fix.

Every error names what was wrong (a file, a config field, a preset) and how to fix it. They
all derive from :class:`AnyGPTError`, so callers (the CLI, the chat app) can catch one type
and show the message without a traceback.
"""

from __future__ import annotations

__all__ = [
    "AnyGPTError",
    "ConfigError",
    "UnknownNameError",
    "MediaError",
    "ContextLengthError",
    "WeightsNotFoundError",
    "CheckpointError",
    "Cancelled",
]


class AnyGPTError(Exception):
    """Base class of every error AnyGPT raises on purpose."""


class ConfigError(AnyGPTError, ValueError):
    """A config file or value is malformed: wrong type, out of range, missing field."""


class UnknownNameError(AnyGPTError, KeyError):
    """A name (preset, modality, decoder, projector kind) is not registered.

    The message lists the valid names.
    """

    def __init__(self, kind: str, name: str, valid: "list[str] | tuple[str, ...]", hint: str = ""):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        msg = f"unknown {kind} {name!r}; valid names: {', '.join(self.valid) or '(none)'}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class MediaError(AnyGPTError, ValueError):
    """A media file is missing, unreadable, corrupt, empty, too large or of an unsupported format."""


class ContextLengthError(AnyGPTError, ValueError):
    """A prompt does not fit into the LLM's context window."""


class WeightsNotFoundError(AnyGPTError, OSError):
    """Weights named by a config (hub id or local path) could not be found or loaded."""


class CheckpointError(AnyGPTError, OSError):
    """A training checkpoint could not be written (disk full, no permission, read-only disk) or
    read back on resume (a missing or corrupt file).

    The message names the file or folder and says what to do: free space, choose another
    ``output_dir``, or resume from the newest earlier checkpoint that loads.
    """


class Cancelled(Exception):
    """Raised by a generation call whose ``cancel`` event was set: it stopped at the next token
    or denoising step. Not an :class:`AnyGPTError`, as nothing went wrong; a conversation the
    call was answering is left as it was before the call."""
