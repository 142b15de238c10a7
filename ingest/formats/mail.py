"""E-mail (.eml) with the standard library: the subject as title, the sender/date line, then the
plain-text body (or the HTML one when there is no plain part). Attachments are named in a note."""

from __future__ import annotations

import re

from .elements import ElementList


def read_eml(data: bytes) -> tuple[ElementList, list[str]]:
    from email import policy
    from email.parser import BytesParser

    from .html import read_html
    from .text import decode_bytes

    msg = BytesParser(policy=policy.default).parsebytes(data)
    out = ElementList()
    subject = str(msg.get("subject", "") or "").strip()
    if subject:
        out.title(subject)
    header = "; ".join(f"{name}: {msg[name]}" for name in ("From", "To", "Cc", "Date") if msg.get(name))
    out.add(header)
    body = msg.get_body(preferencelist=("plain", "html"))
    if body is not None:
        payload = body.get_payload(decode=True) or b""
        charset = body.get_content_charset()
        if body.get_content_subtype() == "html":
            read_html(payload, out)
        else:
            text = decode_bytes(payload, declared=charset) if payload.strip() else ""
            for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
                if not para.lstrip().startswith(">"):  # quoted replies repeat earlier mails
                    out.add(para)
    names = [part.get_filename() or part.get_content_type() for part in msg.iter_attachments()]
    notes = [f"attachments not read: {', '.join(names)}"] if names else []
    return out, notes
