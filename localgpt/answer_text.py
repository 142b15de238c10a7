"""What a generator writes, checked as it streams: the parts that are the prompt's layout, not an answer.

A small model (the embedded 135M SmolLM2 above all) often continues the prompt instead of answering it: it
copies a passage header (``[5] (retrieval.md, page 2)``, numbered like the context's but for a passage that
does not exist), writes the prompt's next ``Question:`` line, or repeats one line until the token budget runs
out. ``AnswerGuard`` sits between the generator and the reader (CLI, web page, API, the stored answer):

- a line that is a passage header in the prompt's own format is dropped;
- a citation ``[n]`` outside the passages the model was shown is dropped (the rest of the text stays);
- a line that starts with the prompt's labels (``Question:``, ``Context:``) ends the answer there;
- a line that repeats an earlier line of the answer (list numbering aside) ends the answer there, and so does
  a run of the same few words three times over inside a line.

It holds back only the text that may still turn out to be one of those (the start of a line that could be a
header, a label or a repeat; an unclosed ``[``), so the answer streams as before. Nothing here judges what the
answer says: the supporting sentences and their citations do that for the reader.
"""

from __future__ import annotations

import re

LABELS = ("Question:", "Context:")
_NUMBERING = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*•])\s*")
_HEADER = re.compile(r"\[\d{1,3}\]\s*\([^()\n]*\)")  # the prompt's "[i] (file, page p)" line
_HEADER_START = re.compile(r"\[\d{0,3}(?:\]\s*(?:\([^()\n]*\)?)?)?")  # what may still become one
CITATION = re.compile(r"(?<!\w)\[(\d{1,3})\]")  # "[2]" citing passage 2; not x[1] in code
_MIN_REPEAT = 8  # characters a line needs before its repeat ends the answer ("Yes." twice is not a loop)
# A loop at the end of a line: (pattern, letters the repeated unit needs): the same 6-40 characters with words in
# them three times, 20-400 twice, or a short run of digits and dots ("1. 1. 1.") five times. Units without any
# letter or digit (a table's "|---") never count.
_LOOPS = ((6, 40, 3, 3), (20, 400, 2, 3), (2, 40, 5, 0))  # (shortest, longest unit, copies, letters in it)
_CODE_REPEATS = 3  # inside a ``` block lines may repeat, but not the same line three times running


def _tail_loop(line: str, shortest: int, longest: int, copies: int) -> tuple[int, str] | None:
    """(start, unit) of ``copies`` copies of one unit ending ``line``, the longest such unit: what the regex
    ``(.{shortest,longest}?)\\1{copies-1}$`` finds searched from the left, checked from the line's end only (the
    regex tries every start of the line on every piece: seconds on a long paragraph)."""
    n = len(line)
    for size in range(min(longest, n // copies), shortest - 1, -1):
        unit = line[n - size:]
        if line[n - copies * size:] == unit * copies:
            return n - copies * size, unit
    return None


def _norm(line: str) -> str:
    return " ".join(_NUMBERING.sub("", line).split()).casefold()


class AnswerGuard:
    """Feed it the generator's pieces; it returns the text to show now. ``stopped`` names why ("label",
    "repeat") once the rest of the generation should be dropped; ``finish`` returns what it still held back;
    ``dropped`` lists what it removed."""

    def __init__(self, passages: int, enabled: bool = True):
        self.passages = passages
        self.enabled = enabled  # off (setting answer_guard = false): every piece passes as it is
        self.lines: list[str] = []  # completed answer lines, normalised, for the repeat check
        self.line = ""  # the current line as written so far
        self.shown = 0  # characters of ``line`` already returned
        self.stopped: str | None = None
        self.dropped: list[str] = []
        self.code = False  # inside a ``` block: no label checks there, and repeats only of the line before
        self.code_lines: list[str] = []  # the block's lines so far
        self.text = ""  # everything returned so far
        self.cut: int | None = None  # where a loop's second copy began in ``text``
        self.unit = 0  # the loop's length

    def _may_become_special(self, line: str) -> bool:
        """Whether a line begun like this may still turn out to be a header, a label or a repeat."""
        if self.code:  # only a third copy of the line before
            recent = self.code_lines[-(_CODE_REPEATS - 1):]
            return len(recent) == _CODE_REPEATS - 1 and all(r.startswith(line.strip()) for r in recent) \
                and len(set(recent)) == 1
        if re.fullmatch(r"\s*(?:\d{1,3}[.)]?|[-*•])?\s*", line):
            return True  # empty, or list numbering alone so far
        body = _NUMBERING.sub("", line).lstrip()
        if any(label.startswith(body[: len(label)]) for label in LABELS):
            return True
        if _HEADER_START.fullmatch(body.rstrip()):
            return True
        norm = _norm(line)
        return any(previous.startswith(norm) for previous in self.lines)

    def _kind(self, line: str) -> str | None:
        """What a completed line that was held whole is: "header", "label", "repeat", or None (an answer line)."""
        if self.code:
            norm = line.strip()
            recent = self.code_lines[-(_CODE_REPEATS - 1):]
            if len(norm) >= _MIN_REPEAT and len(recent) == _CODE_REPEATS - 1 and all(r == norm for r in recent):
                return "repeat"
            return None
        body = _NUMBERING.sub("", line).strip()
        if _HEADER.fullmatch(body):
            return "header"
        if any(body.startswith(label) for label in LABELS):
            return "label"
        norm = _norm(line)
        if len(norm) >= _MIN_REPEAT and norm in self.lines:
            return "repeat"
        return None

    def _citations(self, text: str) -> str:
        """``text`` without citations of passages the model was not shown (read after what was returned)."""
        def keep(m: re.Match) -> str:
            if m.start() == 0 or 1 <= int(m.group(1)) <= self.passages:
                return m.group(0)
            self.dropped.append(m.group(0))
            return ""

        before = self.text[-1:] or " "
        return CITATION.sub(keep, before + text)[1:]

    @staticmethod
    def _releasable(text: str) -> int:
        """How much of ``text`` can go out now: all but an unclosed "[12" at its end."""
        cut = text.rfind("[")
        if cut != -1 and "]" not in text[cut:] and len(text) - cut <= 4:
            return cut
        return len(text)

    def feed(self, piece: str) -> str:
        if not self.enabled:
            self.text += piece
            return piece
        out: list[str] = []
        for part in re.split(r"(\n)", piece):
            if self.stopped:
                break
            text = self._complete() if part == "\n" else self._extend(part) if part else ""
            self.text += text
            out.append(text)
        return "".join(out)

    @property
    def answer(self) -> str:
        """The text returned, a loop's repeated copies cut to one (they may have streamed already)."""
        text = self.text if self.cut is None else self.text[:self.cut]
        if self.stopped != "repeat":
            return text.rstrip()
        # the loop was found at some rotation of the repeated words: end at the last sentence end in its reach
        ends = [m.end() for m in re.finditer(r"[.!?。！？\n]", text) if m.end() >= len(text) - self.unit]
        return (text[:ends[-1]] if ends else text).rstrip()

    def _extend(self, part: str) -> str:
        self.line += part
        if not self.code:
            for shortest, longest, copies, letters in _LOOPS:
                found = _tail_loop(self.line, shortest, longest, copies)
                if found and len(re.findall(r"[^\W\d_]", found[1])) >= letters and re.search(r"[^\W_]", found[1]):
                    return self._stop_loop(*found)
        if self.shown == 0 and self._may_become_special(self.line):
            return ""  # hold the line's start until it is clearly an answer line
        if self.shown == 0:  # a passage header opening the line: drop it, keep what follows
            head = _HEADER.match(_NUMBERING.sub("", self.line).lstrip())
            if head:
                self.dropped.append(head.group(0))
                self.line = _NUMBERING.sub("", self.line).lstrip()[head.end():].lstrip()
                if not self.line:
                    return ""
        rest = self.line[self.shown:]
        n = self._releasable(rest)
        self.shown += n
        return self._citations(rest[:n])

    def _stop_loop(self, start: int, unit: str) -> str:
        """End the answer after the first copy of the repeated words: return what of it was not shown yet (a
        loop found in one long piece); copies already shown are cut from ``answer``."""
        root = next(unit[:k] for k in range(1, len(unit) + 1) if len(unit) % k == 0 and unit[:k] * (len(unit) // k) == unit)
        while start >= len(root) and self.line[start - len(root):start] == root:
            start -= len(root)
        end = start + len(root)  # the first copy's end, in the line
        self.stopped, self.unit = "repeat", len(root)
        self.dropped.append(self.line[max(end, self.shown):])
        if end > self.shown:
            text = self._citations(self.line[self.shown:end])
            self.shown = end
            return text
        line_start = len(self.text) - self.shown  # where the line began in ``text`` (dropped citations aside)
        self.cut = max(0, line_start + end)
        return ""

    def _complete(self) -> str:
        line, shown = self.line, self.shown
        self.line, self.shown = "", 0
        kind = self._kind(line) if shown == 0 else None
        if kind == "header" or (kind == "label" and not self.lines):
            self.dropped.append(line)  # a header, or the question echoed before any answer: skip the line
            return ""
        if kind is not None:
            self.stopped = kind
            self.dropped.append(line)
            return ""
        if line.lstrip().startswith("```"):
            self.code = not self.code
            self.code_lines = []
        elif self.code:
            self.code_lines.append(line.strip())
        elif _norm(line):
            self.lines.append(_norm(line))
        return self._citations(line[shown:]) + "\n"

    def finish(self) -> str:
        """The held-back end of the last line (the generation ended without a newline)."""
        if self.stopped or not self.line or not self.enabled:
            return ""
        text = self._complete()
        text = text[:-1] if text.endswith("\n") else text
        self.text += text
        return text
