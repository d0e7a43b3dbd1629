#!/usr/bin/env bash
# The main job (`make demo`), end to end on CPU in about 8 minutes on 2 cores:
#   1. draw synthetic identities and pack them as InsightFace RecordIO (train.rec/.idx/property) plus
#      holdout.bin, pairs of identities that training never sees (tools/make_synthetic.py);
#   2. train a MobileFaceNet with Partial FC (2 Horovod ranks over Gloo, half the centres sampled per step),
#      or with METHOD=ffc (`make demo METHOD=ffc`) with FFC (a queue of a third of the identities, an EMA
#      gallery net, id + instance loaders), verifying on holdout.bin as it goes;
#   3. evaluate the exported legacy checkpoint (symbol json + params) with eval/verification.py;
#   4. evaluate it on a synthetic IJB-C-layout set of 100 more unseen identities (tools/make_synthetic_ijb.py,
#      eval/ijb.py: template verification, TAR@FAR);
#   5. plot the log (tools/plot_log.py).
# Everything goes to $DEMO_OUT (default demo_output/). Sizes can be changed through the variables below.
set -euo pipefail
cd "$(dirname "$0")/.."

METHOD=${METHOD:-pfc}                 # pfc (Partial FC) | ffc (FFC: dynamic class queue + EMA gallery net)
OUT=${DEMO_OUT:-demo_output}
IDENTITIES=${DEMO_IDENTITIES:-300}
IMAGES=${DEMO_IMAGES:-20}
RANKS=${DEMO_RANKS:-2}
MIN_ACCURACY=${DEMO_MIN_ACCURACY:-0.90}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MXNET_CPU_WORKER_NTHREADS=1
# per method: preset, output folder, epochs, batch per rank, steps between verifications / checkpoints
case "$METHOD" in
    pfc) DATASET=synthetic; MODEL="$OUT/model"; TAG=""; EPOCHS=${DEMO_EPOCHS:-1}; BATCH=${DEMO_BATCH:-32}
         EVERY=47 ;;
    # an FFC step costs about 4 PFC steps (two probe passes of 1.5 B rows, two gallery forwards): a third of an
    # epoch of the instance loader, whose 32 steps show the probe 3 x 2 x 32 x 32 = 6144 images
    ffc) DATASET=synthetic_ffc; MODEL="$OUT/model_ffc"; TAG="_ffc"; EPOCHS=${DEMO_EPOCHS:-0.35}
         BATCH=${DEMO_BATCH:-32}; EVERY=16 ;;
    *) echo "demo: METHOD must be pfc or ffc, got $METHOD" >&2; exit 2 ;;
esac

start=$(date +%s)
if [ ! -f "$OUT/data/holdout.bin" ]; then
    echo "demo [1/5]: $IDENTITIES synthetic identities x $IMAGES images -> $OUT/data"
    python tools/make_synthetic.py "$OUT/data" --identities "$IDENTITIES" --images "$IMAGES" \
        --holdout 100 --pairs 400
else
    echo "demo [1/5]: reusing $OUT/data"
fi

echo "demo [2/5]: training with $METHOD on $RANKS ranks (horovodrun --gloo), $EPOCHS epochs -> $MODEL"
rm -rf "$MODEL"
horovodrun -np "$RANKS" -H "localhost:$RANKS" --gloo \
    python recognition/train.py --dataset "$DATASET" --data-dir "$OUT/data" --output "$MODEL" \
        --batch-size "$BATCH" --num-epochs "$EPOCHS" --lr 0.2 --warmup-epochs 0.1 \
        --preprocess-threads 1 --frequent 10 --verbose "$EVERY" --checkpoint-every "$EVERY"

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
