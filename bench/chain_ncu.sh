#!/bin/bash
# Hardware counters of gemv_chain's layer launch (4 phases) under Nsight Compute, for the ring kernel and the
# bulk-copy one, whole and without the words' loads (DIAG 32: the warps' own cost): issue slots, stall reasons,
# tensor-pipe and DRAM use. Run on the GPU machine (Firecracker kinds have ncu): bash bench/chain_ncu.sh [shapes]
# (bench/gpu_notes.md round 11 has what it showed.)
set -u
SHAPES=${1:-"16,2,2 16,4,1,1"}
METRICS="gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum"
METRICS+=",sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
METRICS+=",dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__warps_active.avg.per_cycle_active"
METRICS+=",regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"
for shape in $SHAPES; do
  for diag in 0 32; do
    echo "=== shape $shape diag $diag"
    ncu --clock-control none -k regex:gemv_chain --launch-skip 6 --launch-count 1 --metrics "$METRICS" \
      python bench/gemv_cuda.py --chain --kinds int4 --layers 4 --chain-shapes "$shape" --chain-diags $diag 2>&1 \
      | grep -E "gemv_chain|duration|issue_active|inst_executed|hmma|dram__|warps_active|stalled" \
      | awk '{ if ($0 ~ /stalled/) { if ($NF+0 > 0.05) print } else print }'
  done
done
