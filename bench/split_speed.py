"""Splitting speed by shape of file: what a parser process does with a file (read it, split it into
chunks counted in e5-small tokens), in MB/s, for ordinary prose and for the shapes that once hung
ingest (one line without a sentence end, minified JSON, an e-mail carrying a base64 blob, Chinese
without punctuation), each at two sizes. Linear splitting shows as MB/s that stay about the same
from the small size to the large one; the old splitter's fell with every doubling (quadratic).

Prints a table and appends it to bench/RESULTS.md with date, machine and commit.
Usage: python bench/split_speed.py [--sizes 0.25,1] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Running as a script puts bench/ first on sys.path, where bench/ingest.py would shadow the
# ingest package: take it off, and load the neighbours this script needs by their path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))


def _neighbour(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown CPU")


def measure(path: Path, count) -> tuple[float, int]:
    """CPU seconds to load and split one file (this process alone), and the chunks it gave."""
    from ingest.load import load_file
    from ingest.split import split_document

    start = time.process_time()
    doc = load_file(path)
    chunks = split_document(doc, hashlib.sha256(path.read_bytes()).hexdigest(), count)
    return time.process_time() - start, len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.25,1", help="file sizes in MB, comma-separated (default 0.25,1)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]

    from localgpt.embeddings import token_counter

    shapes = _neighbour("pathological")
    record = _neighbour("record")
    count = token_counter("e5-small")
    header = "| file | " + " | ".join(f"{s:g} MB: s | chunks | MB/s" for s in sizes) + " |"
    lines = [
        f"### Splitting speed by shape of file — {datetime.date.today()} — commit {record.commit()} — "
        f"{cpu_model()}, 1 process",
        "",
        "Load + split of one file in a parser's place (e5-small tokens, chunk 200/32), CPU seconds of this "
        f"process. Files from `bench/pathological.py`. Command: `python bench/split_speed.py --sizes {args.sizes}`.",
        "",
        header,
        "|---|" + "---:|---:|---:|" * len(sizes),
    ]
    with tempfile.TemporaryDirectory(prefix="split-speed-") as tmp:
        for kind, (name, make) in shapes.KINDS.items():
            cells = []
            for size in sizes:
                path = Path(tmp) / name
                path.write_bytes(make(int(size * 1e6)))
                seconds, chunks = measure(path, count)
                mb = path.stat().st_size / 1e6
                cells.append(f"{seconds:.1f} | {chunks} | {mb / seconds:.2f}")
                print(f"{kind} {mb:.2f} MB: {seconds:.1f} s, {chunks} chunks", file=sys.stderr, flush=True)
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    record.publish(lines, record=not args.no_record)


if __name__ == "__main__":
    main()
