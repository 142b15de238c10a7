"""What every benchmark does with its table: print it and append it to bench/RESULTS.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commit() -> str:
    """The short commit the numbers belong to, or 'unknown' outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def publish(lines: list[str], *, record: bool = True) -> None:
    table = "\n".join(lines) + "\n"
    print(table)
    if record:
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write("\n" + table)
