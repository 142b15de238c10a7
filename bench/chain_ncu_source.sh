#!/bin/bash
# Where the chain's consumer warps wait, instruction by instruction: Nsight Compute's source counters (warp-state
# samples a SASS instruction) for one layer launch of gemv_chain's int4 bulk-copy kernel, with the words' loads
# and without them (DIAG 32). Run on the GPU machine: bash bench/chain_ncu_source.sh [shape] [outdir]
# Writes OUT/chain_<diag>.ncu-rep, OUT/chain_<diag>_source.csv (per-instruction samples) and prints the stall
# summary and bench/ncu_source_summary.py's reading of the samples (the loop's share, stalls, bank conflicts).
set -u
SHAPE=${1:-"15,4,2,1"}
OUT=${2:-/tmp/chain_ncu}
mkdir -p "$OUT"
for diag in 0 32; do
  ncu --clock-control none -k regex:gemv_chain --launch-skip 6 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    -o "$OUT/chain_$diag" -f \
    python bench/gemv_cuda.py --chain --kinds int4 --layers 4 --chain-shapes "$SHAPE" --chain-diags $diag \
    > "$OUT/chain_${diag}_run.txt" 2>&1
  ncu -i "$OUT/chain_$diag.ncu-rep" --page details > "$OUT/chain_${diag}_details.txt" 2>&1
  ncu -i "$OUT/chain_$diag.ncu-rep" --page source --csv --print-source sass > "$OUT/chain_${diag}_source.csv" 2>&1
  echo "=== diag $diag"; grep -E "Duration|Issue Slots Busy|Warp Cycles Per Issued|Active Warps|No Eligible|Stall" \
    "$OUT/chain_${diag}_details.txt" | head -30
  python bench/ncu_source_summary.py "$OUT/chain_${diag}_source.csv" --top 15
done
