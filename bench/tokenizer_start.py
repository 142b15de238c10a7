"""The tokenizer's part of a fast-engine start, in fresh processes: AutoTokenizer against the direct path.

A start of the fast engine needs the model's tokenizer. Before a tokenizer cache exists (the first start after
copying a model), it came from transformers' ``AutoTokenizer`` for every tokenizer class but the plain
``PreTrainedTokenizerFast`` one, which costs transformers' import chain (~5 s on the H200 image). Llama-2's files
name ``LlamaTokenizer``; ``tokenizer.direct_state`` now builds that one with ``tokenizers`` alone. This script
times, in fresh processes, the wall time from interpreter start to a loaded tokenizer through
``tokenizer.load_tokenizer`` as a start calls it:

- ``AutoTokenizer``: the direct path off (``LOCALGPT_DIRECT_TOKENIZER=0``), no cache yet: what a first start did
  before (AutoTokenizer, then the checked cache write);
- ``direct``: no cache yet, the direct path on (this change for Llama-2's files);
- ``cache``: a later start, the checked cache written by the AutoTokenizer run.

over Llama-2's kind of tokenizer files (LlamaTokenizer, 32000-token BPE with byte fallback, chat template:
``tests/tiny_models.save_llama2_tokenizer``) and bench/gpu_load.py's word-level tokenizer. The same process
imports nothing else (no torch): the numbers are the tokenizer's own. Prints a table; --results appends it.

    python bench/tokenizer_start.py --reps 3 --results bench/RESULTS.md --commit $(git rev-parse --short HEAD)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import json, sys, time
t0 = time.time()
from pathlib import Path
from localgpt.generation.fast.tokenizer import load_tokenizer
tok, note = load_tokenizer(Path(sys.argv[1]), Path(sys.argv[2]))
ids = tok("Where does localgpt keep the database it builds? 東京", add_special_tokens=True)["input_ids"]
print("RESULT " + json.dumps({"in_process_s": time.time() - t0, "note": note, "ids": list(ids)[:16],
                              "transformers_modules": sum(m.startswith("transformers") for m in sys.modules)}))
"""


def run(folder: Path, cache: Path, direct: bool) -> dict:
    env = os.environ | {"LOCALGPT_DIRECT_TOKENIZER": "1" if direct else "0", "PYTHONPATH": str(ROOT)}
    before = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(cache)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    wall = time.time() - before
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1][7:]) | {"wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "localgpt-tokenizer-start"))
    parser.add_argument("--results")
    parser.add_argument("--commit", default="")
    args = parser.parse_args()

    import gpu_load
    from tiny_models import save_llama2_tokenizer

    root = Path(args.dir)
    folders = {"Llama-2 files (LlamaTokenizer, 32000 BPE)": root / "llama2",
               "word-level (PreTrainedTokenizerFast, 32000)": root / "wordlevel"}
    for label, folder in folders.items():
        if not (folder / "tokenizer.json").is_file():
            if "llama2" in folder.name:
                save_llama2_tokenizer(folder, vocab_size=32000)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                gpu_load.write_tokenizer(folder, 32000)
    rows = []
    for label, folder in folders.items():
        times: dict[str, list[float]] = {"AutoTokenizer": [], "direct": [], "cache": []}
        notes, ids = {}, set()
        for rep in range(args.reps):
            cache = Path(tempfile.mkdtemp(prefix="tok-cache-", dir=root))
            for path, direct in (("direct", True), ("AutoTokenizer", False), ("cache", True)):
                r = run(folder, cache, direct)  # "cache" runs after the AutoTokenizer run wrote it
                times[path].append(r["wall_s"])
                notes[path] = f"{r['note'].split(';')[0]}, transformers modules {r['transformers_modules']}"
                ids.add(tuple(r["ids"]))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((label, med, notes, len(ids) == 1))
    header = ("| tokenizer files | AutoTokenizer (s) | direct (s) | cache (s) | AutoTokenizer / direct | "
              "same ids | how each loaded |")
    table = [header, "|---|---:|---:|---:|---:|---|---|"]
    for label, med, notes, same in rows:
        table.append(f"| {label} | {med['AutoTokenizer']:.2f} | {med['direct']:.2f} | {med['cache']:.2f} | "
                     f"{med['AutoTokenizer'] / med['direct']:.1f}× | {same} | "
                     + "; ".join(f"{k}: {v}" for k, v in notes.items()) + " |")
    print("\n".join(table))
    if args.results:
        with open(args.results, "a") as fh:
            fh.write(f"\n### Tokenizer part of a first start (issue 17): Llama-2's LlamaTokenizer files read "
                     f"directly — {datetime.date.today().isoformat()} — commit {args.commit or '?'} — "
                     f"{platform.machine()}, {os.cpu_count()} CPUs\n\n"
                     f"`python bench/tokenizer_start.py --reps {args.reps}`: wall time of a fresh process from "
                     f"its start to a loaded tokenizer (`tokenizer.load_tokenizer`, median of {args.reps}); "
                     f"'AutoTokenizer' is a first start with the direct path off (then the checked cache write), "
                     f"'direct' a first start now, 'cache' a later start.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
