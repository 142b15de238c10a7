"""The one interface every generator backend implements: stream text, report stats.

A backend turns a finished prompt string into a stream of text pieces. Prompt formats
live in ``localgpt.models`` (the family registry), not here.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol, Sequence


@dataclass
class GenerationStats:
    """What ``--stats`` prints and what the UI shows under an answer (seed users know it as measure_perf)."""

    backend: str = ""
    model: str = ""
    device: str = "cpu"
    load_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float | None = None  # time to first token of the last call
    decode_tokens_per_s: float | None = None
    total_s: float = 0.0
    peak_gpu_mib: float | None = None
    rss_mib: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def process_rss_mib() -> float:
    """Peak resident set size of this process, in MiB."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 1024.0 if os.uname().sysname != "Darwin" else peak_kib / (1024.0 * 1024.0)


class Generator(Protocol):
    """``stream(prompt)`` yields text pieces; ``stats`` describes the last call."""

    name: str
    context_window: int
    stats: GenerationStats

    def stream(
        self, prompt: str | Sequence[dict], *, max_new_tokens: int | None = None, stop: list[str] | None = None
    ) -> Iterator[str]:
        """A finished prompt string (raw completion) or chat messages the backend formats."""
        ...

    def count_tokens(self, text: str) -> int:
        ...


# What a generator that can be asked "do these passages answer the question?" offers besides
# ``stream``: ``yes_probability(messages)`` (None where the backend cannot read its logits, e.g. an
# OpenAI-compatible server) and ``n_params``. The chain uses them for its answer check.
YES_WORDS = ("yes", "Yes", "YES", " yes", " Yes")
NO_WORDS = ("no", "No", "NO", " no", " No")


def single_token_ids(encode, words: Sequence[str]) -> list[int]:
    """The ids of those ``words`` that ``encode`` (text -> ids, no special tokens) makes one token."""
    ids: set[int] = set()
    for word in words:
        tokens = list(encode(word))
        if len(tokens) == 1:
            ids.add(int(tokens[0]))
    return sorted(ids)


def reply_yes_share(logits, encode) -> float | None:
    """``yes_share`` for the yes / no words that ``encode`` (text -> ids) makes single tokens."""
    return yes_share(logits, single_token_ids(encode, YES_WORDS), single_token_ids(encode, NO_WORDS))


def yes_share(logits, yes_ids: Sequence[int], no_ids: Sequence[int]) -> float | None:
    """P(yes) / (P(yes) + P(no)) of the next token, from its logits; None when either word is no token."""
    import numpy as np

    if not yes_ids or not no_ids:
        return None
    row = np.asarray(logits, dtype=np.float64)
    ids = np.asarray(list(yes_ids) + list(no_ids))
    picked = row[ids] - row.max()
    weights = np.exp(picked)
    yes = float(weights[: len(yes_ids)].sum())
    total = float(weights.sum())
    return yes / total if total > 0 else None


class StreamTimer:
    """Measures TTFT and decode speed around a token stream; backends share it."""

    def __init__(self, stats: GenerationStats, prompt_tokens: int):
        self.stats = stats
        self.stats.prompt_tokens = prompt_tokens
        self.stats.new_tokens = 0
        self.stats.ttft_s = None
        self.stats.decode_tokens_per_s = None
        self._start = time.perf_counter()
        self._first: float | None = None

    def token(self, n: int = 1) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self.stats.ttft_s = now - self._start
        self.stats.new_tokens += n

    def finish(self) -> None:
        end = time.perf_counter()
        self.stats.total_s = end - self._start
        if self._first is not None and self.stats.new_tokens > 1 and end > self._first:
            self.stats.decode_tokens_per_s = (self.stats.new_tokens - 1) / (end - self._first)
        self.stats.rss_mib = process_rss_mib()
