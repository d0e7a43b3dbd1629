#!/usr/bin/env bash
# The main job (`make demo`), end to end on CPU in about 8 minutes on 2 cores:
#   1. draw synthetic identities and pack them as InsightFace RecordIO (train.rec/.idx/property) plus
#      holdout.bin, pairs of identities that training never sees (tools/make_synthetic.py);
#   2. train a MobileFaceNet with Partial FC (2 Horovod ranks over Gloo, half the centres sampled per step),
#      verifying on holdout.bin as it goes;
#   3. evaluate the exported legacy checkpoint (symbol json + params) with eval/verification.py;
#   4. plot the log (tools/plot_log.py).
# Everything goes to $DEMO_OUT (default demo_output/). Sizes can be changed through the variables below.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUT:-demo_output}
IDENTITIES=${DEMO_IDENTITIES:-300}
IMAGES=${DEMO_IMAGES:-20}
EPOCHS=${DEMO_EPOCHS:-1}
RANKS=${DEMO_RANKS:-2}
BATCH=${DEMO_BATCH:-32}
MIN_ACCURACY=${DEMO_MIN_ACCURACY:-0.90}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MXNET_CPU_WORKER_NTHREADS=1

start=$(date +%s)
if [ ! -f "$OUT/data/holdout.bin" ]; then
    echo "demo [1/4]: $IDENTITIES synthetic identities x $IMAGES images -> $OUT/data"
    python tools/make_synthetic.py "$OUT/data" --identities "$IDENTITIES" --images "$IMAGES" \
        --holdout 100 --pairs 400
else
    echo "demo [1/4]: reusing $OUT/data"
fi

echo "demo [2/4]: training on $RANKS ranks (horovodrun --gloo), $EPOCHS epochs"
rm -rf "$OUT/model"
horovodrun -np "$RANKS" -H "localhost:$RANKS" --gloo \
    python recognition/train.py --dataset synthetic --data-dir "$OUT/data" --output "$OUT/model" \
        --batch-size "$BATCH" --num-epochs "$EPOCHS" --lr 0.2 --warmup-epochs 0.1 \
        --preprocess-threads 1 --frequent 10 --verbose 47 --checkpoint-every 47

echo "demo [3/4]: verification of the exported checkpoint"
last=$(ls "$OUT"/model/model-*.params | sort | tail -n 1)
epoch=$((10#$(basename "$last" .params | sed 's/^model-//')))
OMP_NUM_THREADS=2 python eval/verification.py --model "$OUT/model/model,$epoch" --data-dir "$OUT/data" --target holdout \
    --json > "$OUT/verification.json"

echo "demo [4/4]: plot -> $OUT/training.png"
python tools/plot_log.py "$OUT/model/train_log.jsonl" "$OUT/training.png"

python - "$OUT/verification.json" "$MIN_ACCURACY" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
accuracy = results["sets"]["holdout"]["accuracy"]
print("demo: holdout verification accuracy %.4f (10-fold) after %s s" % (accuracy, sys.argv[3]))
if accuracy < float(sys.argv[2]):
    sys.exit("demo: accuracy below %s: training did not learn the identities" % sys.argv[2])
EOF
