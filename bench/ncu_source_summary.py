"""Summarise Nsight Compute's per-instruction source counters of a gemv_chain kernel (bench/chain_ncu_source.sh's
``chain_<diag>_source.csv``): the share of the warps' stall samples in the multiply loop (the backward branch that
spans the HMMA instructions) and outside it, the stall reasons of each, the instructions with the most samples, and
the shared-memory loads with excess wavefronts (bank conflicts). No GPU needed.

    python bench/ncu_source_summary.py OUT/chain_0_source.csv [--top 25] [--loop]
"""

from __future__ import annotations

import argparse
import collections
import csv
import re


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read(path: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(open(path, newline="")))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    return rows[start], [r for r in rows[start + 1:] if r and r[0].startswith("0x")]


def loop_span(data: list[list[str]]) -> tuple[int, int] | None:
    """(first, last) row of the loop whose backward branch spans the HMMAs, or None."""
    addr = [int(r[0], 16) for r in data]
    hmma = [i for i, r in enumerate(data) if "HMMA" in r[1]]
    if not hmma:
        return None
    for i in range(hmma[-1], len(data)):
        m = re.search(r"BRA (0x[0-9a-f]+)", data[i][1])
        if m and int(m.group(1), 16) <= addr[hmma[0]] and int(m.group(1), 16) in addr:
            return addr.index(int(m.group(1), 16)), i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=25, help="instructions with the most samples to list")
    parser.add_argument("--loop", action="store_true", help="list every instruction of the loop with its samples")
    args = parser.parse_args()
    head, data = read(args.csv)
    col = {c: i for i, c in enumerate(head)}
    stalls = [c for c in head if c.startswith("stall_") and "Not Issued" not in c]
    samples = col["Warp Stall Sampling (All Samples)"]
    total = sum(number(r[samples]) for r in data) or 1.0
    base = int(data[0][0], 16)

    def mix(rows: list[list[str]]) -> str:
        c = collections.Counter()
        for r in rows:
            for s in stalls:
                c[s] += number(r[col[s]])
        return ", ".join(f"{k[6:]} {v / total * 100:.1f}" for k, v in c.most_common(8) if v)

    span = loop_span(data)
    if span:
        lo, hi = span
        inside = data[lo:hi + 1]
        share = sum(number(r[samples]) for r in inside) / total * 100
        print(f"multiply loop {int(data[lo][0], 16) - base:#x}-{int(data[hi][0], 16) - base:#x} "
              f"({hi - lo + 1} instructions): {share:.1f} % of the samples")
        print(f"  in it (% of all samples): {mix(inside)}")
        print(f"  outside: {mix(data[:lo] + data[hi + 1:])}")
    print(f"\ninstructions with the most samples ({total:.0f} in all):")
    for r in sorted(data, key=lambda r: -number(r[samples]))[:args.top]:
        reasons = sorted(((number(r[col[s]]), s[6:]) for s in stalls), reverse=True)[:2]
        print(f"  {int(r[0], 16) - base:6x} {number(r[samples]) / total * 100:5.2f} %  "
              f"x{number(r[col['Instructions Executed']]):>8.0f}  {r[1][:52]:52s} "
              + " ".join(f"{n}:{v / total * 100:.2f}" for v, n in reasons if v))
    if "L1 Wavefronts Shared Excessive" in col:
        wf = sum(number(r[col["L1 Wavefronts Shared"]]) for r in data) or 1.0
        excess = [r for r in data if number(r[col["L1 Wavefronts Shared Excessive"]]) > 0]
        print(f"\nshared-memory wavefronts {wf:.0f}, excess "
              f"{sum(number(r[col['L1 Wavefronts Shared Excessive']]) for r in excess) / wf * 100:.1f} %:")
        for r in sorted(excess, key=lambda r: -number(r[col["L1 Wavefronts Shared Excessive"]]))[:10]:
            print(f"  {int(r[0], 16) - base:6x} {r[1][:52]:52s} wavefronts {number(r[col['L1 Wavefronts Shared']]):.0f}"
                  f" (ideal {number(r[col['L1 Wavefronts Shared Ideal']]):.0f})")
    if args.loop and span:
        print("\nthe loop:")
        for r in data[span[0]:span[1] + 1]:
            print(f"  {int(r[0], 16) - base:6x} {number(r[samples]) / total * 100:5.2f} %  {r[1][:60]}")


if __name__ == "__main__":
    main()
