"""Files of the shapes that once made ingest hang, generated at any size: a text file that is one
line with no sentence end, minified JSON, an e-mail carrying a base64 blob, a Chinese paragraph
without punctuation, and ordinary prose to compare them with.

Used by ``bench/split_speed.py`` (MB/s at two sizes) and ``tests/test_pathological_files.py``.
Each text ends with the word ``MARKER``, so a test can check that the end of the file was stored.
Deterministic (seeded), pure standard library, fast enough to write tens of MB.
"""

from __future__ import annotations

import base64
import json
import random
from email.message import EmailMessage

MARKER = "zebraquartz"

_WORDS = (
    "the pump valve pressure reading station operator manual section report shift inspect record anomaly "
    "turbine flow sensor control panel alarm level tank pipe seal filter maintenance schedule procedure "
    "check system water heat cooling power supply line motor bearing gauge limit safety engineer log"
).split()


def _words(rnd: random.Random, n_chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < n_chars:
        word = rnd.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def normal_text(nbytes: int, seed: int = 0) -> bytes:
    """Prose: sentences of 8-24 words, paragraphs of 3-8 sentences."""
    rnd = random.Random(seed)
    paragraphs: list[str] = []
    size = 0
    while size < nbytes:
        sentences = []
        for _ in range(rnd.randint(3, 8)):
            words = [rnd.choice(_WORDS) for _ in range(rnd.randint(8, 24))]
            sentences.append(" ".join(words).capitalize() + ".")
        paragraphs.append(" ".join(sentences))
        size += len(paragraphs[-1]) + 2
    return ("\n\n".join(paragraphs) + f" {MARKER}.\n").encode()


def single_line(nbytes: int, seed: int = 1) -> bytes:
    """One line of words, commas now and then, and no sentence end: one sentence of nbytes."""
    rnd = random.Random(seed)
    text = _words(rnd, nbytes).replace(" the ", ", the ")
    return f"{text} {MARKER}".encode()


def minified_json(nbytes: int, seed: int = 2) -> bytes:
    """A list of records and one string value that is half the file, without a line break."""
    rnd = random.Random(seed)
    records = []
    size = 0
    while size < nbytes // 2:
        record = {"id": len(records), "name": rnd.choice(_WORDS), "note": _words(rnd, 60), "ok": rnd.random() < 0.5}
        records.append(record)
        size += len(json.dumps(record))
    doc = {"records": records, "log": _words(rnd, nbytes // 2) + f" {MARKER}"}
    return json.dumps(doc, separators=(",", ":")).encode()


def email_base64(nbytes: int, seed: int = 3) -> bytes:
    """An e-mail whose plain body pastes a base64 blob as one line (half the file) and that carries a
    base64 attachment (the other half)."""
    rnd = random.Random(seed)
    blob = base64.b64encode(rnd.randbytes(nbytes * 3 // 8)).decode()
    msg = EmailMessage()
    msg["Subject"] = "Pump station image"
    msg["From"] = "operator@example.org"
    msg["To"] = "engineer@example.org"
    msg.set_content(f"Here is the image of the gauge.\n\ndata:image/png;base64,{blob} {MARKER}\n\nRegards\n")
    msg.add_attachment(rnd.randbytes(nbytes * 3 // 8), maintype="application", subtype="octet-stream",
                       filename="gauge.bin")
    return msg.as_bytes()


def cjk_paragraph(nbytes: int, seed: int = 4) -> bytes:
    """Chinese characters without any punctuation or space, one paragraph (3 bytes a character)."""
    rnd = random.Random(seed)
    common = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    text = "".join(rnd.choices(common, k=nbytes // 3))
    return f"{text} {MARKER}".encode()


# name -> (file name, generator)
KINDS = {
    "normal text": ("normal.txt", normal_text),
    "single line": ("single-line.txt", single_line),
    "minified JSON": ("minified.json", minified_json),
    "e-mail, base64 blob": ("blob.eml", email_base64),
    "CJK paragraph": ("cjk.txt", cjk_paragraph),
}
