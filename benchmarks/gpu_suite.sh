#!/usr/bin/env bash
# The GPU checks, in one short run on a CUDA machine (from the repository root). STAGES names the stages, run in the
# order given (default: tests sao decoder sa3 embedded compile):
#   tests    the tests that need CUDA, marked gpu (tests/test_gpu_options.py: graphs against eager, the runtime's
#            latents with guidance; tests/test_decoder_fast_path.py: the compiled snake kernel, the runtime's 16-bit
#            decode; whole-generation and text-encoder graphs against eager; tick graphs against the step path, their
#            replays under torch's sync debug mode, as are the steps of a device-resident batch); up to TESTS_S=120 s;
#   sao      latency of the Stable-Audio-Open-Small-sized checkpoint (tta sized sao-small: random weights, written to
#            SAO_DIR once, up to WRITE_S=150 s) at the ARC paper's scale: 256 latent frames (11.9 s), 8 steps, batches
#            1, 4, 16, under the whole generation as one CUDA graph with a float16 decoder, each tick as one CUDA
#            graph, bfloat16 with CUDA graphs, eager torch float32 (its run also measures the floor) and bfloat16
#            (SAO_RUNTIMES, the targets' candidates first; a runtime name ending in -whole times end to end through
#            models.generation_graph, one ending in -ticks step by step through models.tick_graph: compare it with
#            torch-bf16-cudagraphs, whose decoder it shares); up to SAO_S=270 s;
#   decoder  its Oobleck decoder alone (benchmarks.decoder_precision): decode time at batches 1 and 16 and the SNR of
#            the bfloat16 and float16 decoders against float32 (target 40 dB), beside the decoder as loaded; up to
#            DECODER_S=90 s;
#   load     Poisson arrivals at LOAD_RATES through the real server on the SAO-small-sized checkpoint, continuous
#            batching against none (benchmarks.load; goodput within a 0.5 s objective, p99); up to LOAD_S=180 s;
#   sa3      latency of the Stable-Audio-3-Small-sized checkpoint (tta sized sa3-small: random weights, diffusers'
#            layout) for 30 s clips (the target's), then 3 s, 8 steps, batches 1, 4, 16, 32 (SA3_RUNTIMES, default
#            whole-generation graphs with a float16 decoder, bfloat16 with graphs, and eager, whose run also
#            measures the floor); up to SA3_S=150 s each;
#   embedded latency of the embedded models' architectures (EMBEDDED_MODELS, default tta-arc; random weights, the text
#            encoder's too) under eager torch float32 / bfloat16 and CUDA graphs (EMBEDDED_RUNTIMES), batches 1, 4,
#            16, 10 s clips at each model's default steps; up to EMBEDDED_S=90 s;
#   compile  each block of the denoiser compiled (regional torch.compile, TTA_COMPILE_BLOCKS) and captured in CUDA
#            graphs: its CUDA test against eager (up to COMPILE_TESTS_S=120 s), then the SAO-small-sized checkpoint
#            with whole-generation graphs and per-forward graphs (COMPILE_RUNTIMES; COMPILE=0 skips the stage); up to
#            COMPILE_S=180 s.
# 15 minutes of device time hold the machine's start and two calls of at most 10 minutes: STAGES="tests sao decoder"
# (at its stages' limits 630 s, so a timeout_s of 590; in practice about 300-450 s), then, on the same warm machine
# (the SAO checkpoint is still in /tmp), STAGES="load sa3 compile" with a timeout from status' budget_left_s. Then
# python -m benchmarks.gpu_summary, whose verdicts name what did not run.
# A benchmark stopped at its stage's limit, or by the call's, keeps what it measured: results are rewritten as each
# runtime, batch size, decoder or rate finishes, and a stopped run marks its files incomplete, naming what was cut off
# and what never ran.
# SUFFIX is appended to the result names. Each stage runs whatever the others did; the benchmarks' JSON and Markdown
# go to $OUT (default runs/gpu), and the whole output to standard output and $OUT/gpu-suite.log.
# Every stage runs on random weights (models/random_weights.py; the CUDA tests, marked gpu, too), so the machine needs
# the models' configs and the text encoder's tokenizer, not the weights: benchmarks/gpu_pack.sh packs the checkout
# to fit the device tool's 64 MiB (the weights stay behind; .gpu holds the tokenizer's package and wheels of the web
# packages the GPU image lacks). Carry .gpu: the suite installs its wheels into /tmp/site and puts both on
# PYTHONPATH. Afterwards, bash benchmarks/gpu_pack.sh --restore.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu-suite.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
stage() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
# a stage's whole output goes to the log; standard output gets its last $1 lines, without progress bars
shown() { tee -a "$LOG" | grep -v "it/s\]" | tail -n "$1"; }

GPU_DIR=${GPU_DIR:-.gpu}
if compgen -G "$GPU_DIR/wheels/*.whl" > /dev/null; then
  stage "installing the packed wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$GPU_DIR"/wheels/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -n "${GIT_COMMIT:-}" ] || [ ! -f "$GPU_DIR/commit" ] || export GIT_COMMIT=$(cat "$GPU_DIR/commit")
[ -d "$GPU_DIR/site" ] && export PYTHONPATH="$(cd "$GPU_DIR/site" && pwd)${PYTHONPATH:+:$PYTHONPATH}"

stage versions
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | shown 20

SAO=${SAO_DIR:-/tmp/sao-small-sized} SA3=${SA3_DIR:-/tmp/sa3-small-sized} TRIED=" "
checkpoint() {  # $1 directory, $2 model (tta sized's names): random weights, written once and reused by later stages
  # and calls on the same machine; written into $1.part and renamed, so a write cut off leaves no broken checkpoint,
  # and tried once per call
  [ -d "$1" ] || [[ "$TRIED" == *" $1 "* ]] && return 0
  TRIED+="$1 "
  rm -rf "$1.part"
  timeout "${WRITE_S:-150}" $PY -c "from models.checkpoints.sized import write_random_checkpoint as w
w('$1.part', '$2')" 2>&1 | shown 10
  [ "${PIPESTATUS[0]}" = 0 ] && [ -d "$1.part" ] && mv "$1.part" "$1"
  return 0
}
sao_checkpoint() { checkpoint "$SAO" sao-small; }

run_tests() {
  stage "tests needing CUDA"
  timeout "${TESTS_S:-120}" $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_options.py \
    tests/test_decoder_fast_path.py tests/test_generation_graph.py tests/test_encoder_graphs.py \
    tests/test_pipeline_device.py tests/test_forward_clock.py tests/test_tick_graph.py 2>&1 | shown 40
}

run_sao() {
  stage "SAO-small-sized"
  sao_checkpoint
  timeout "${SAO_S:-270}" $PY -m benchmarks.latency --device cuda --model "$SAO" \
    --runtimes "${SAO_RUNTIMES:-torch-bf16-cudagraphs-vae-fp16-whole,torch-bf16-cudagraphs-ticks,torch-bf16-cudagraphs,torch,torch-bf16}" \
    --batches 1,4,16 --duration 11.888 --repeats 20 --e2e-repeats 5 \
    --name "latency-gpu-sao-small-sized${SUFFIX:-}" --results-dir "$OUT" 2>&1 | shown 60
}

run_decoder() {
  stage "SAO-small-sized decoder: precision and decode time"
  sao_checkpoint
  local decoder=(--sized sao-small)
  [ -d "$SAO" ] && decoder=(--model "$SAO")
  timeout "${DECODER_S:-90}" $PY -m benchmarks.decoder_precision --device cuda "${decoder[@]}" --batches 1,16 \
    --duration 11.888 --repeats 10 --name "decoder-precision-gpu-sao-small-sized${SUFFIX:-}" --results-dir "$OUT" \
    2>&1 | shown 30
}

run_load() {
  # continuous batching against none through the real server (HTTP, engine, device-resident batches), on the
  # SAO-small-sized checkpoint: bfloat16, CUDA graphs per forward and per tick, whole-generation graphs when a set
  # runs alone. Each server first gets 5 s of unmeasured arrivals at the highest rate, so that the graphs it captures
  # for the batch shapes it meets are not in the measured runs (their captures are reported apart). The lowest rate
  # leaves the batch-1 pipeline (none) unloaded: gpu_summary takes its median there as the batch-1 latency the load
  # target is measured against
  stage "load: continuous batching vs none, SAO-small-sized 11.9 s, 8 steps"
  sao_checkpoint
  TTA_DEVICE=cuda TTA_PRECISION=bfloat16 TTA_DECODE_PRECISION=float16 TTA_CUDA_GRAPHS=true TTA_WHOLE_GENERATION=true \
  TTA_TICK_GRAPHS=true TTA_MAX_PADDING=10 timeout "${LOAD_S:-180}" $PY -m benchmarks.load --model-dir "$SAO" \
    --model "$(basename "$SAO")" --policies continuous,none --rates "${LOAD_RATES:-2,20,80}" --seconds 10 \
    --audio-seconds 11.888 --slo 0.5 --warmup-seconds "${LOAD_WARMUP_S:-5}" \
    --max-batch 32 --timeout 10 --out "$OUT" --name "load-gpu-sao-small-sized${SUFFIX:-}" 2>&1 | shown 30
}

run_sa3() {
  stage "SA3-small-sized"
  local seconds
  checkpoint "$SA3" sa3-small
  for seconds in 30 3; do
    timeout "${SA3_S:-150}" $PY -m benchmarks.latency --device cuda --model "$SA3" \
      --runtimes "${SA3_RUNTIMES:-torch-bf16-cudagraphs-vae-fp16-whole,torch-bf16-cudagraphs,torch-bf16}" \
      --batches 1,4,16,32 --duration "$seconds" --repeats 20 --e2e-repeats 5 --floor-runtime torch-bf16 \
      --name "latency-gpu-sa3-small-sized-${seconds}s${SUFFIX:-}" --results-dir "$OUT" 2>&1 | shown 60
  done
}

run_embedded() {
  local model
  for model in ${EMBEDDED_MODELS:-tta-arc}; do
    stage "embedded $model architecture"
    timeout "${EMBEDDED_S:-90}" $PY -m benchmarks.latency --device cuda --model "models/zoo/$model" --random-weights \
      --runtimes "${EMBEDDED_RUNTIMES:-torch,torch-bf16,torch-cudagraphs,torch-bf16-cudagraphs}" --batches 1,4,16 \
      --repeats 20 --e2e-repeats 5 --name "latency-gpu-$model${SUFFIX:-}" --results-dir "$OUT" 2>&1 | shown 60
  done
}

run_compile() {
  [ "${COMPILE:-1}" = 1 ] || return 0
  stage "compiled denoiser blocks: the test against eager under CUDA graphs, then SAO-small-sized"
  timeout "${COMPILE_TESTS_S:-120}" $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_compile_blocks.py 2>&1 \
    | shown 30
  sao_checkpoint
  timeout "${COMPILE_S:-180}" $PY -m benchmarks.latency --device cuda --model "$SAO" \
    --runtimes "${COMPILE_RUNTIMES:-torch-bf16-cudagraphs-blocks-vae-fp16-whole,torch-bf16-cudagraphs-blocks}" \
    --batches 1,16 --duration 11.888 --repeats 20 --e2e-repeats 5 \
    --name "latency-gpu-sao-small-sized-compile${SUFFIX:-}" --results-dir "$OUT" 2>&1 | shown 40
}

for name in ${STAGES:-tests sao decoder sa3 embedded compile}; do
  if declare -F "run_$name" > /dev/null; then "run_$name"; else stage "no stage named $name (skipped)"; fi
  rm -f "$OUT"/*.part  # a write cut off by a stage's limit: the device tool returns at most 8 files
done
stage done
