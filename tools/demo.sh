#!/usr/bin/env bash
# The main job (`make demo`), end to end on CPU in about 8 minutes on 2 cores (`make demo METHOD=ffc`: 6):
#   1. draw synthetic identities and pack them as InsightFace RecordIO (train.rec/.idx/property) plus
#      holdout.bin, pairs of identities that training never sees (tools/make_synthetic.py);
#   2. train a MobileFaceNet with Partial FC (2 Horovod ranks over Gloo, half the centres sampled per step),
#      or with METHOD=ffc (`make demo METHOD=ffc`) with FFC (a queue of a third of the identities, an EMA
#      gallery net, id + instance loaders); every training setting comes from the method's demo preset;
#   3. evaluate the exported legacy checkpoint (symbol json + params) with eval/verification.py;
#   4. evaluate it on a synthetic IJB-C-layout set of 100 more unseen identities (tools/make_synthetic_ijb.py,
#      eval/ijb.py: template verification, TAR@FAR);
#   5. plot the log (tools/plot_log.py).
# Everything goes to $DEMO_OUT (default demo_output/). Sizes can be changed through the variables below.
set -euo pipefail
cd "$(dirname "$0")/.."

METHOD=${METHOD:-pfc}                 # a training method: pfc (Partial FC) | ffc (FFC) | any registered one
OUT=${DEMO_OUT:-demo_output}
IDENTITIES=${DEMO_IDENTITIES:-300}
IMAGES=${DEMO_IMAGES:-20}
RANKS=${DEMO_RANKS:-2}
MIN_ACCURACY=${DEMO_MIN_ACCURACY:-0.90}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MXNET_CPU_WORKER_NTHREADS=1
# Every training setting of a method's demo lives in its demo preset: recognition/configs/synthetic.py for
# Partial FC, recognition/configs/synthetic_<method>.py for any other method (which also names the outputs:
# model_<method>, verification_<method>.json, ...). A new method needs a preset, no edit here.
if [ "$METHOD" = pfc ]; then PRESET=synthetic; TAG=""; else PRESET="synthetic_$METHOD"; TAG="_$METHOD"; fi
if [ ! -f "recognition/configs/$PRESET.py" ]; then
    echo "demo: METHOD=$METHOD has no demo preset recognition/configs/$PRESET.py" >&2; exit 2
fi
MODEL="$OUT/model$TAG"
OVERRIDES=()                          # optional: DEMO_EPOCHS, DEMO_BATCH (per rank) replace the preset's
if [ -n "${DEMO_EPOCHS:-}" ]; then OVERRIDES+=(--num-epochs "$DEMO_EPOCHS"); fi
if [ -n "${DEMO_BATCH:-}" ]; then OVERRIDES+=(--batch-size "$DEMO_BATCH"); fi

start=$(date +%s)
if [ ! -f "$OUT/data/holdout.bin" ]; then
    echo "demo [1/5]: $IDENTITIES synthetic identities x $IMAGES images -> $OUT/data"
    python tools/make_synthetic.py "$OUT/data" --identities "$IDENTITIES" --images "$IMAGES" \
        --holdout 100 --pairs 400
else
    echo "demo [1/5]: reusing $OUT/data"
fi

echo "demo [2/5]: training with $METHOD (preset $PRESET) on $RANKS ranks (horovodrun --gloo) -> $MODEL"
rm -rf "$MODEL"
horovodrun -np "$RANKS" -H "localhost:$RANKS" --gloo \
    python recognition/train.py --dataset "$PRESET" --method "$METHOD" --data-dir "$OUT/data" --output "$MODEL" \
        "${OVERRIDES[@]}"

echo "demo [3/5]: verification of the exported checkpoint"
last=$(ls "$MODEL"/model-*.params | sort | tail -n 1)
epoch=$((10#$(basename "$last" .params | sed 's/^model-//')))
OMP_NUM_THREADS=2 python eval/verification.py --model "$MODEL/model,$epoch" --data-dir "$OUT/data" --target holdout \
    --json > "$OUT/verification$TAG.json"

echo "demo [4/5]: IJB-C-style template verification on synthetic identities never trained on"
if [ ! -f "$OUT/ijb/meta/ijbc_template_pair_label.txt" ]; then
    python tools/make_synthetic_ijb.py "$OUT/ijb" --first-identity $((IDENTITIES + 100)) --identities 100 \
        --media 2
fi
OMP_NUM_THREADS=2 python eval/ijb.py --model "$MODEL/model,$epoch" --data-dir "$OUT/ijb" --target IJBC \
    --result-dir "$OUT/ijb_result$TAG" --json > "$OUT/ijb$TAG.json"

echo "demo [5/5]: plot -> $OUT/training$TAG.png"
python tools/plot_log.py "$MODEL/train_log.jsonl" "$OUT/training$TAG.png"

python - "$OUT/verification$TAG.json" "$MIN_ACCURACY" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
accuracy = results["sets"]["holdout"]["accuracy"]
print("demo: holdout verification accuracy %.4f (10-fold) after %s s" % (accuracy, sys.argv[3]))
if accuracy < float(sys.argv[2]):
    sys.exit("demo: accuracy below %s: training did not learn the identities" % sys.argv[2])
EOF
