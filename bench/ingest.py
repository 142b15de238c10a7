"""Ingest benchmark: localgpt against a localGPT-style baseline on the same generated corpus.

Measures, on this machine: cold ingest (files/s, MB/s, chunks/s, peak RSS), re-ingest with
nothing changed, re-ingest with 1 % of files changed, peak RSS at a third of the corpus
(flat memory as the corpus grows), and the baseline's cold ingest, all in one run. Prints a
table and appends it to bench/RESULTS.md with date, machine and commit.
Usage: python bench/ingest.py [--files 300] [--work bench/out/ingest] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_corpus import make_corpus  # noqa: E402
from record import commit, publish  # noqa: E402


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run through /usr/bin/time-like accounting: a tiny Python wrapper that reports wait4 rusage."""
    wrapper = (
        "import os,subprocess,sys,time,json;t=time.perf_counter();p=subprocess.Popen(sys.argv[1:],stdout=subprocess.PIPE);"
        "out=p.stdout.read();_,st,ru=os.wait4(p.pid,0);"
        "print(json.dumps({'wall':time.perf_counter()-t,'rss':ru.ru_maxrss/1024,'rc':os.waitstatus_to_exitcode(st),'out':out.decode(errors='replace')}))"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {res['rc']}:\n{done.stderr[-3000:]}")
    return res["wall"], res["rss"], res["out"]


def localgpt_ingest(corpus: Path, data: Path) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "localgpt.cli", "ingest", str(corpus), "--data-dir", str(data), "--json"]
    wall, rss, out = run_measured(cmd)
    return wall, rss, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--work", type=Path, default=HERE / "out" / "ingest")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="Do not append to bench/RESULTS.md.")
    a = ap.parse_args()
    if not a.skip_baseline:  # fail now, not after ten minutes of measuring
        import importlib.util

        missing = [m for m in ("langchain_chroma", "langchain_community", "langchain_text_splitters", "pdfminer", "docx2txt")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(f"the baseline needs {', '.join(missing)}: run ./install.sh bench (or pass --skip-baseline)")

    work = a.work
    corpus = work / f"corpus_{a.files}"
    if not corpus.exists():
        info = make_corpus(corpus, a.files)
        print(f"generated corpus: {info}")
    small = work / f"corpus_{a.files // 3}"
    if not small.exists():
        make_corpus(small, a.files // 3)
    files = [p for p in corpus.rglob("*") if p.is_file()]
    mb = sum(p.stat().st_size for p in files) / 1e6

    rows = []
    data = work / "data_ours"
    shutil.rmtree(data, ignore_errors=True)
    cold, cold_rss, rep = localgpt_ingest(corpus, data)
    chunks = rep["chunks_added"]
    rows.append(("localgpt cold", cold, cold_rss, len(files), chunks, rep))
    again, again_rss, rep2 = localgpt_ingest(corpus, data)
    rows.append(("localgpt nothing changed", again, again_rss, len(files), rep2["chunks_added"], rep2))
    # 1 % of the files change: append a sentence to text-like ones.
    changed = [p for p in sorted(files) if p.suffix in (".txt", ".md", ".html", ".rst") and "bad" not in p.parts]
    changed = changed[: max(1, len(files) // 100)]
    for p in changed:
        with open(p, "a", encoding="utf-8") as fh:
            fh.write("\n\nAn added closing remark about the maintenance schedule.\n")
    one, one_rss, rep3 = localgpt_ingest(corpus, data)
    rows.append((f"localgpt {len(changed)} files changed", one, one_rss, len(files), rep3["chunks_added"], rep3))
    data_small = work / "data_small"
    shutil.rmtree(data_small, ignore_errors=True)
    small_wall, small_rss, rep4 = localgpt_ingest(small, data_small)
    rows.append((f"localgpt cold, 1/3 corpus", small_wall, small_rss, sum(1 for p in small.rglob('*') if p.is_file()), rep4["chunks_added"], rep4))

    base = {}
    if not a.skip_baseline:
        for runtime, label in (("localgpt", "baseline (localGPT-style, its embedding runtime) cold"),
                               ("ours", "baseline (localGPT-style pipeline, our embedding runtime) cold")):
            bdata = work / f"data_baseline_{runtime}"
            shutil.rmtree(bdata, ignore_errors=True)
            cmd = [sys.executable, str(HERE / "baseline_localgpt.py"), str(corpus), str(bdata), "--runtime", runtime]
            bwall, brss, bout = run_measured(cmd)
            bchunks = int(bout.strip().split()[-2]) if bout.strip() else 0
            base[runtime] = bwall
            rows.append((label, bwall, brss, len(files), bchunks, None))

    lines = [
        f"### Ingest benchmark — {datetime.date.today()} — commit {commit()} — {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "",
        f"Corpus: {len(files)} files ({mb:.1f} MB, {len(list(corpus.rglob('bad/*')))} bad), generated by `bench/make_corpus.py`; "
        f"embedder multilingual-e5-small everywhere (localgpt: `LOCALGPT_E5_RUNTIME={os.environ.get('LOCALGPT_E5_RUNTIME', 'auto')}`; "
        f"the localGPT-style baseline runs it as sentence-transformers would, torch fp32, 32 a batch). "
        f"Load average at start {os.getloadavg()[0]:.1f}. Command: `python bench/ingest.py --files {a.files}`.",
        "",
        "| run | seconds | files/s | MB/s | chunks | chunks/s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, wall, rss, nfiles, nchunks, _ in rows:
        lines.append(f"| {name} | {wall:.1f} | {nfiles / wall:.1f} | {mb / wall:.2f} | {nchunks} | {nchunks / wall:.1f} | {rss:.0f} |")
    lines.append("")
    lines.append(f"- nothing-changed re-ingest = {100 * again / cold:.1f} % of cold (target ≤ 2 %)")
    lines.append(f"- {len(changed)} files (1 %) changed = {100 * one / cold:.1f} % of cold (target ≤ 5 %)")
    lines.append(f"- peak RSS at 1/3 of the corpus {small_rss:.0f} MiB vs full {cold_rss:.0f} MiB (flat = streaming)")
    if base:
        lines.append(f"- cold ingest speed-up over the localGPT-style baseline: {base['localgpt'] / cold:.2f}× (target ≥ 2×)")
        lines.append(f"- over the same baseline given our embedding runtime (the pipeline alone): {base['ours'] / cold:.2f}×")
    lines.append(f"- skipped by localgpt (reported with reasons): {len(rep['skipped'])}")
    publish(lines, record=not a.no_record)


if __name__ == "__main__":
    main()
