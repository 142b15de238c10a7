"""Typed errors raised inside localgpt.

The CLI and the UI turn each of these into one line that names the file or the
setting and says what to do; nothing here prints.
"""

from __future__ import annotations


class LocalGPTError(Exception):
    """Base class: every error meant for a person derives from it."""


class UnsupportedFile(LocalGPTError):
    """The file's type is not one localgpt can read."""


class BadFile(LocalGPTError):
    """The file has a supported type but cannot be read (corrupt, encrypted, empty...).

    ``transient``: the cause may pass without the file changing (memory, a concurrent write),
    so the file is tried again next run rather than remembered as unreadable."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ModelNotFound(LocalGPTError):
    """A model was asked for that is not on this machine; the message says how to provide it."""


class EmbedderMismatch(LocalGPTError):
    """A collection was built with another embedding model than the one configured."""


class StoreError(LocalGPTError):
    """The vector store or its manifest cannot be opened or written."""


class ConfigError(LocalGPTError):
    """A setting has a value localgpt cannot use."""


class NativeCrash(LocalGPTError):
    """A native library (llama.cpp, an embedding engine) crashed or failed when tried in a child process."""
