"""Offline by construction: the switches that keep Hugging Face, Chroma and friends off the network.

``enforce_offline()`` is called by the functions that load models or open stores, never at
import time. It only sets variables that are not set already, so a user can still opt in.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "ANONYMIZED_TELEMETRY": "False",  # chromadb's posthog switch
    "DO_NOT_TRACK": "1",
    "SCARF_NO_ANALYTICS": "true",  # unstructured
    "TOKENIZERS_PARALLELISM": "false",
}


def enforce_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
