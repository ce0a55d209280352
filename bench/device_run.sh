#!/usr/bin/env bash
# One phase of the H100 measurements (the device tool runs this from the repo root; $OUT comes back).
#   bash bench/device_run.sh recipe      # MiniLM recipe (accuracy), DistilBERT-base recipe (time) with the trainer's
#                                        # step (the parameters in groups), PyTorch recipe anchor
#   bash bench/device_run.sh throughput  # PyTorch throughput anchors, flaxsst train steps
#   bash bench/device_run.sh inference   # batch sweep, inference throughput, Classifier latency
#   bash bench/device_run.sh accuracy    # MiniLM recipe over seeds (SEEDS, default 42 1 2 3), then seed 42 in float32
#   bash bench/device_run.sh variants    # the trainer's step against the candidates of bench/step_variants.py (one
#                                        # array per tensor, flat, stacked and scanned, k steps per dispatch) and the
#                                        # packed Classifier, profiled: per-step kernels and device busy time; anchors
#   bash bench/device_run.sh lastblock   # [CLS]-only last block (grouped) against the last block over every position
#                                        # (allrows): train batch 256 and 32, inference batch 1024; PyTorch anchors
#   bash bench/device_run.sh coldstart   # a replica's start on the GPU (bench/serve_coldstart.py, ~5 min): empty home,
#                                        # --prepare, prepared restarts, a minute at 64 clients; the pipeline anchor on cuda
#   bash bench/device_run.sh serve       # flaxsst.serve under load on the GPU (bench/serve_load.py, ~4 min; the Azure
#                                        # anchor is a CPU measurement and stays on the CPU machine); .whl/ also needs
#                                        # starlette, uvicorn, h11, anyio, click, prometheus_client, httpx, httpcore
# Needs .devdata/ (sst2, minilm-l6, distilbert-tok, the anchor scripts) and .whl/ (datasets, omegaconf, tensorboardX, pycountry)
# carried along; see bench/RESULTS.md.
set -uo pipefail
phase=$1
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
log() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
run() {  # run NAME TIMEOUT CMD...: JSON lines to results.jsonl, everything to NAME.log
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  timeout "$limit" "$@" > >(tee "$out/$name.log" | grep '^{' >> "$out/results.jsonl") 2> "$out/$name.err"
  log "$name exit $?"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c 'import jax, flax, optax, orbax.checkpoint as o, torch, transformers, datasets; print(jax.__version__, flax.__version__, optax.__version__, torch.__version__, transformers.__version__, datasets.__version__, jax.devices())'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
case $phase in
recipe)  # extra trainer overrides in RECIPE_OVERRIDES
  run minilm_recipe 330 python3 -m bench.recipe --config conf/sst2_minilm.yaml --workdir /tmp/minilm \
      model.pretrained=.devdata/minilm-l6 data.path=.devdata/sst2 train.checkpoint_every_steps=100000 ${RECIPE_OVERRIDES:-}
  cp /tmp/minilm/eval_results.json "$out/minilm_eval_results.json" 2>/dev/null
  cp /tmp/minilm/curves.png "$out/minilm_curves.png" 2>/dev/null
  run distilbert_recipe 330 python3 -m bench.recipe --config conf/sst2.yaml --workdir /tmp/distil --tokenizer .devdata/distilbert-tok \
      model.pretrained= model.dtype=bfloat16 data.path=.devdata/sst2 'data.length_buckets=[16,32,64,128]' \
      train.checkpoint_every_steps=100000 ${RECIPE_OVERRIDES:-}
  [ -n "${SKIP_ANCHOR:-}" ] || run torch_recipe_anchor 200 python3 .devdata/anchor_torch_finetune.py --data .devdata/sst2 \
      --tokenizer .devdata/minilm-l6/tokenizer.json --bf16 --epochs 1
  ;;
throughput)  # PyTorch anchors, then flaxsst train steps
  run torch_anchor 240 python3 .devdata/anchor_torch.py --compile
  run flax_train 180 python3 -m bench.throughput --mode train --batch 32 256 --seq 128
  run flax_short 150 python3 -m bench.throughput --mode train --batch 32 --seq 16 64
  ;;
inference)  # the batch sweep, inference, Classifier latency (second process: persistent compile cache)
  run flax_sweep 150 python3 -m bench.throughput --mode train --batch 64 128 512 --seq 128
  run flax_infer 150 python3 -m bench.throughput --mode infer --batch 64 256 1024 2048 --seq 128
  run flax_classifier 80 python3 -m bench.throughput --mode infer --batch 1 --seq 128 --classifier .devdata/distilbert-tok
  run flax_classifier_cached 80 python3 -m bench.throughput --mode infer --batch 1 --seq 128 --classifier .devdata/distilbert-tok
  ;;
accuracy)  # the recipe's spread over seeds; the persistent compile cache makes runs after the first compile fast
  for seed in ${SEEDS:-42 1 2 3}; do
    run minilm_seed$seed 200 python3 -m bench.recipe --config conf/sst2_minilm.yaml --workdir /tmp/minilm$seed \
        model.pretrained=.devdata/minilm-l6 data.path=.devdata/sst2 data.cache_dir=/tmp/tokcache train.seed=$seed \
        train.checkpoint_every_steps=100000 ${RECIPE_OVERRIDES:-}
  done
  [ -n "${SKIP_FP32:-}" ] || run minilm_fp32 240 python3 -m bench.recipe --config conf/sst2_minilm.yaml --workdir /tmp/minilm_fp32 \
      model.pretrained=.devdata/minilm-l6 data.path=.devdata/sst2 data.cache_dir=/tmp/tokcache model.dtype=float32 \
      train.checkpoint_every_steps=100000
  ;;
variants)  # candidates against the trainer's step in the same process; per-step kernel counts from a trace
  run torch_anchor 150 python3 .devdata/anchor_torch.py
  run flax_variants_short 300 python3 -m bench.throughput --mode train --batch 32 --seq 16 64 --steps 40 \
      --variant grouped tree flat stacked scan4 --profile /tmp/prof
  run flax_variants_b256 150 python3 -m bench.throughput --mode train --batch 256 --seq 128 --variant grouped tree --profile /tmp/prof
  run flax_fp32_short 120 python3 -m bench.throughput --mode train --dtype fp32 --batch 32 --seq 16 --variant grouped tree
  run flax_classifier 90 python3 -m bench.throughput --mode infer --batch 1 --seq 16 --classifier .devdata/distilbert-tok
  ;;
lastblock)  # the [CLS]-only last block's before/after (~6 min): same process per pair, PyTorch anchors in the same call
  run torch_anchor 240 python3 .devdata/anchor_torch.py --compile
  run flax_lastblock_train 150 python3 -m bench.throughput --mode train --batch 256 32 --seq 128 --variant grouped allrows
  run flax_lastblock_infer 120 python3 -m bench.throughput --mode infer --batch 1024 --seq 128 --variant grouped allrows
  ;;
serve)  # a random-weight DistilBERT-base export, then concurrency 1 to 256 against the GPU defaults of flaxsst.serve
  run serve_model 120 python3 -m bench.serve_load --make-model /tmp/distilbert-random --tokenizer .devdata/distilbert-tok
  run serve_load 420 python3 -m bench.serve_load --model /tmp/distilbert-random --servers flaxsst \
      --data .devdata/sst2/dev.tsv --concurrency 1 8 32 64 256 --seconds 20 --client-processes 8 --logs "$out/serve" \
      --plot "$out/serve.png"
  ;;
coldstart)  # flaxsst.serve's start-up on the GPU against a transformers pipeline on the same GPU, then load levels
  run serve_model 120 python3 -m bench.serve_load --make-model /tmp/distilbert-random --tokenizer .devdata/distilbert-tok
  run coldstart 330 python3 -m bench.serve_coldstart --model /tmp/distilbert-random --data .devdata/sst2/dev.tsv \
      --restarts 2 --load-seconds 30 --load-concurrency 64 --pipeline-device cuda --logs "$out/coldstart"
  run serve_load 150 python3 -m bench.serve_load --model /tmp/distilbert-random --servers flaxsst \
      --data .devdata/sst2/dev.tsv --concurrency 1 32 256 --seconds 10 --client-processes 8 --logs "$out/serve"
  ;;
esac
log done
