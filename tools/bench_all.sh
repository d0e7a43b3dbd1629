#!/usr/bin/env bash
# `make bench`: the benchmark tables of docs/benchmarks.md (sections 1 and 3-7; the Partial FC, reader, training
# and backbone runs took about 25 minutes on 2 cores, the FFC, id-loader and resume runs add to that). Every run's full
# output goes to $BENCH_OUT (default bench_output/); the JSON line each benchmark ends with is collected in
# $BENCH_OUT/summary.jsonl. BENCH_10M=1 adds the out-of-core 10M-class runs (disk bank, sparse files under
# $BENCH_DISK_DIR, default /var/tmp/pfcbank; ratio 0.1 takes about 30 minutes).
# BENCH_ONLY=REGEX runs only the benchmarks whose name matches (e.g. BENCH_ONLY='^train').
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-bench_output}
mkdir -p "$OUT"
[ -n "${BENCH_ONLY:-}" ] || : > "$OUT/summary.jsonl"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MXNET_CPU_WORKER_NTHREADS=1 OPENBLAS_NUM_THREADS=1
HVD="horovodrun -np 2 -H localhost:2 --gloo"

run() {   # run NAME COMMAND...: log to $OUT/NAME.log, keep its JSON lines
    local name=$1; shift
    if [ -n "${BENCH_ONLY:-}" ] && ! [[ $name =~ $BENCH_ONLY ]]; then return 0; fi
    echo "bench: $name: $*"
    # horovodrun prefixes rank output with "[R]<stdout>:"
    if ! "$@" 2>&1 | sed -u 's/^\[[0-9]*\]<std[a-z]*>://' > "$OUT/$name.log"; then
        tail -n 20 "$OUT/$name.log"; echo "bench: $name FAILED (log: $OUT/$name.log)"; exit 1
    fi
    grep -E '^step|^\{' "$OUT/$name.log" | tail -n 3 | cut -c1-300
    grep -E '^\{' "$OUT/$name.log" | python -c "import json, sys
for line in sys.stdin:
    print(json.dumps(dict(bench='$name', **json.loads(line))))" >> "$OUT/summary.jsonl"
}

# head vs the independent product floor (a separate process per rank, the fastest kernel of each product; beside
# it the bank floor: the sampled rows' gather and SGD pass) and vs the head's own chosen products: 3 rounds of
# interleaved step / floor timings, median ratios with min and max
run pfc_100k_r0.1 $HVD python tools/benchmark_pfc.py --num-classes 100000 --sample-ratio 0.1 --steps 21 --rounds 3
run pfc_1m_r0.1 $HVD python tools/benchmark_pfc.py --num-classes 1000000 --sample-ratio 0.1 --steps 21 --rounds 3
run pfc_1m_r1.0 $HVD python tools/benchmark_pfc.py --num-classes 1000000 --sample-ratio 1.0 --steps 9 --rounds 3
run pfc_4m_r0.1 $HVD python tools/benchmark_pfc.py --num-classes 4000000 --sample-ratio 0.1 --steps 9 --rounds 3
run data_reader python tools/benchmark_data.py --images 8192 --epochs 2
run train_mbf $HVD python tools/benchmark_train.py --backbone mbf --act-type prelu_conv --batch-size 64 \
    --num-classes 1000000 --sample-ratio 0.1 --steps 4 --warmup 1
run train_r50 $HVD python tools/benchmark_train.py --backbone r50 --act-type prelu_conv --batch-size 64 \
    --num-classes 1000000 --sample-ratio 0.1 --steps 2 --warmup 1
run backbones python tools/count_flops.py --throughput mbf r18 --act-type prelu_conv --batch-size 32 --iters 3
# FFC's id loader against RecordReader on the demo-sized set (section 4)
if [ -z "${BENCH_ONLY:-}" ] || [[ id_loader =~ $BENCH_ONLY ]]; then
    [ -f "$OUT/id_loader_data/train_iter.rec" ] ||
        python tools/make_synthetic.py "$OUT/id_loader_data" --identities 300 --images 20 > /dev/null
fi
run id_loader python tools/benchmark_id_loader.py "$OUT/id_loader_data" --rounds 3
# time to the first batch after resuming at 0 / 50 / 90 % of a 20k-image epoch, 2 ranks (section 6)
run resume python tools/benchmark_resume.py --data-dir "$OUT/resume_data"
# FFC's head at 1M / 10M / 100M identities beside Partial FC at 1M, in the same rounds (section 7)
run ffc_head $HVD python tools/benchmark_ffc.py --num-identities 1000000 10000000 100000000 --pfc-classes 1000000 \
    --steps 32
if [ "${BENCH_10M:-0}" = 1 ]; then
    DISK=${BENCH_DISK_DIR:-/var/tmp/pfcbank}
    run pfc_10m_disk_r0.01 $HVD python tools/benchmark_pfc.py --num-classes 10000000 --sample-ratio 0.01 \
        --bank-location disk --disk-dir "$DISK" --no-floor --warmup 2 --steps 20 --rounds 1
    rm -rf "$DISK"
    # the full step with the 10M disk bank against 1M in memory, interleaved in the same processes
    run train_mbf_10m_disk_vs_1m $HVD python tools/benchmark_train.py --backbone mbf --act-type prelu_conv \
        --batch-size 64 --num-classes 1000000 --sample-ratio 0.01 --bank-location device \
        --versus 10000000,0.01,disk --disk-dir "$DISK" --rounds 3 --steps 2 --warmup 1
    rm -rf "$DISK"
    # I/O bound: 30 s to 100 s a step here (about 1 GB of scattered row reads and writes per rank and step)
    run pfc_10m_disk_r0.1 $HVD python tools/benchmark_pfc.py --num-classes 10000000 --sample-ratio 0.1 \
        --bank-location disk --disk-dir "$DISK" --no-floor --warmup 2 --steps 20 --rounds 1
    rm -rf "$DISK"
fi
echo "bench: summary in $OUT/summary.jsonl"
cat "$OUT/summary.jsonl"
