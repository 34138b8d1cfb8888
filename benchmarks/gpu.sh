#!/usr/bin/env bash
# One device call: install the wheels the GPU image lacks, then run the named stages, logging under $OUT.
#   bash benchmarks/gpu.sh tests bench reference     (stages run in the order given)
# Wheels: .whl/ (see docs/gpu-tests.md); the reference script: .bench/reference/ (a copy of ../shared/reference/).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
WHL=${WHL:-.whl}  # another folder for a call that carries other wheels (WHL=.whl-ray: Ray's, no face models)
if [ -d "$WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
# .face/face_recognition_models/models/: dlib's two model files, found as the installed package (docs/gpu-tests.md)
[ -d .face ] && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/.face
BASE=data/_cache/sdxl-random
JSONL=$OUT/bench.jsonl
bench() { timeout 300 python3 -m dreambooth_pl benchmark --base $BASE --out "$JSONL" "$@" 2>&1 | tail -n 4; }
# one whole run (gpu.sh e2e's) on fresh Triton and CUDA driver caches (CUDA_CACHE_PATH holds the driver's JIT
# results), as a fresh machine's first: ARM on, prefetch-off (DREAMBOOTH_PL_PREFETCH=0) or warm-off (no kernel warm-ups)
fresh_run() {
  local o=''
  [ "$1" = warm-off ] && o='["--model.perf.warm_kernels=false","--data.priors.generation.warm_kernels=false"]'
  DREAMBOOTH_PL_PREFETCH=$([ "$1" = prefetch-off ] && echo 0 || echo 1) TRITON_CACHE_DIR=$(mktemp -d) \
    CUDA_CACHE_PATH=$(mktemp -d) timeout 200 python3 -m dreambooth_pl benchmark --base $BASE --out "$JSONL" \
    --preset end-to-end --priors ${E2E_PRIORS:-16} --steps ${E2E_STEPS:-60} ${o:+--overrides "$o"} 2>&1 | tail -n 1
}
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
    pyc)  # the bytecode a user's pip install writes (pip compiles by default; the image's venv and our --no-compile
      # install ship none, and PYTHONDONTWRITEBYTECODE keeps imports from writing it): without it every process
      # compiles ~4,400 modules from source, ~8 s of the fit's start on 2026-12-06 (benchmarks/2026-12-06-h100.jsonl)
      python3 -c "import sys, os; print('dont_write_bytecode', sys.flags.dont_write_bytecode, os.environ.get('PYTHONDONTWRITEBYTECODE'))"
      t0=$(date +%s)
      python3 -m compileall -q -j 0 /tmp/site dreambooth_pl $(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
        > "$OUT/compileall.txt" 2>&1; rc=$?
      echo "pyc: compileall $(( $(date +%s) - t0 )) s, rc=$rc" ;;
    importtime)  # where the fit's imports go on this host (the end-to-end run's "imports and config" phase)
      t0=$(date +%s%N)
      python3 -X importtime -c "import dreambooth_pl.cli" 2> "$OUT/importtime.txt"
      echo "import dreambooth_pl.cli: $(( ($(date +%s%N) - t0) / 1000000 )) ms (under -X importtime)"
      awk -F'|' '/import time:/ {gsub(/ /, "", $2); print $2 "|" $3}' "$OUT/importtime.txt" | sort -n | tail -n 25 ;;
    cold-start) TRITON_CACHE_DIR=$(mktemp -d) timeout 120 python3 benchmarks/cold_start.py $BASE "$OUT" 2>&1 | tail -n 2 ;;  # a fresh process's one-time GPU costs
    base) python3 -c "from dreambooth_pl.tools.benchmark import build_base; build_base('$BASE', 'sdxl')" ;;
    tests|tests-core)  # separate processes: a capture that fails leaves CUDA's RNG in capture state for the rest of its process
      : > "$OUT/pytest-gpu.txt"
      # the 2-GPU test alone and first: its fit hung in two sessions, and a hang must not cost the other tests
      timeout 320 python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s tests/test_gpu_acceptance.py -k ddp \
        >> "$OUT/pytest-gpu.txt" 2>&1
      pkill -9 -f "python3 -m dreambooth_pl" || true
      timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s --durations=10 tests/test_gpu_acceptance.py \
        -k "not ddp" >> "$OUT/pytest-gpu.txt" 2>&1
      if [ "$stage" = tests ]; then  # tests-core: the acceptance file only
        timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s --durations=10 tests/test_graphs.py \
          tests/test_sample_grid.py tests/test_sampling.py tests/test_smoke.py tests/test_fused_lora.py \
          tests/test_block_ops.py tests/test_cache.py tests/test_kernel_warmup.py >> "$OUT/pytest-gpu.txt" 2>&1
      fi
      pkill -9 -f "python3 -m dreambooth_pl" || true  # a hung DDP test's other rank would hold a GPU for later stages
      grep -E "passed|failed|rel=|Error|^FAILED|^E " "$OUT/pytest-gpu.txt" | tail -n 40 ;;
    tests-rest)  # every GPU test file but the acceptance file and warm-tests' three, in one process (~400 s on an
      # H100, 2026-12-07 session 12): with `tests-core warm-tests` (~230 s) the whole `pytest -m gpu` in two calls
      timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider -rs --durations=8 tests/test_graphs.py \
        tests/test_sample_grid.py tests/test_sampling.py tests/test_smoke.py tests/test_fused_lora.py tests/test_cache.py \
        tests/test_prior_sampler.py tests/test_base_handoff.py tests/test_gpu_face.py tests/test_pivotal_gpu.py \
        tests/test_quant.py tests/test_fp8_gemm.py tests/test_fp8_block.py > "$OUT/pytest-gpu-rest.txt" 2>&1
      grep -E "passed|failed|skipped|^FAILED|^E |^SKIPPED" "$OUT/pytest-gpu-rest.txt" | tail -n 30 ;;
    tests-fast)  # the fast preset's kernels: compiled GEGLU, fused LoRA, graphed = eager with them on
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s tests/test_block_ops.py tests/test_fused_lora.py tests/test_fused_norms.py \
        tests/test_graphs.py 2>&1 | grep -E "passed|failed|rel=|FUSED_NORMS|Error|^FAILED|^E " | tail -n 30 ;;
    norms)  # fused_norms.py's kernels against PyTorch's GroupNorm at SDXL's shapes, NCHW and NHWC, timed
      timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s tests/test_fused_norms.py 2>&1 \
        | grep -E "passed|failed|FUSED_NORMS|Error|^FAILED|^E " | tail -n 12 ;;
    tests-new)  # this round's GPU tests in one process: face identity + held-out loss, pivotal tuning, the recipe's console
      timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s --durations=8 tests/test_gpu_face.py \
        tests/test_pivotal_gpu.py tests/test_gpu_acceptance.py::test_the_recipes_console_prints_only_the_allowed_lines \
        ${NEW_EXTRA:-} > "$OUT/pytest-gpu-new.txt" 2>&1
      grep -E "passed|failed|s/step|PIVOTAL_GPU|prior sampler|Error|^FAILED|^E " "$OUT/pytest-gpu-new.txt" | tail -n 30 ;;
    face)  # issue 23: the recipe with SubjectMetrics' face identity and the held-out loss (needs .face/, .whl/)
      timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s tests/test_gpu_face.py 2>&1 \
        | grep -E "passed|failed|s/step|Error|^FAILED|^E " | tail -n 20 ;;
    resume-test) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_acceptance.py -k resume 2>&1 | tail -n 3 ;;
    graphs) timeout 300 python3 -m pytest -q -x tests/test_graphs.py -m gpu -p no:cacheprovider 2>&1 | tail -n 15 ;;
    recipe) bench --preset recipe --steps 15 --warmup 4 ;;
    recipe-split)  # the recipe (16-mixed, fused AdamW, clipping) with one choice changed, against fast.yaml's
      bench --preset recipe --steps 15 --warmup 4 --overrides '["--model.optim.name=adamw8bit"]'
      bench --preset recipe --steps 15 --warmup 4 --overrides '["--trainer.precision=bf16-mixed"]'
      bench --preset recipe --steps 15 --warmup 4 --overrides '["--trainer.gradient_clip_val=null"]'
      bench --preset recipe --steps 15 --warmup 4 --overrides '["--trainer.precision=bf16-mixed","--trainer.gradient_clip_val=null"]' ;;
    cudnn-ab)  # cuDNN's benchmark mode (convolution algorithms timed per shape) for the recipe and fast steps
      bench --preset recipe --steps 15 --warmup 4 --overrides '["--trainer.benchmark=true"]'
      bench --preset fast --steps 15 --warmup 4 --overrides '["--trainer.benchmark=true"]' ;;
    recipe-16gb) bench --preset recipe --steps 12 --warmup 3 --overrides '["--model.perf.memory_budget_gib=15"]' ;;
    prior-check)  # no full base: graph = eager and fp16 = the pipeline on the tiny base (tests/test_prior_sampler.py)
      timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -s tests/test_prior_sampler.py tests/test_base_handoff.py 2>&1 \
        | grep -E "prior sampler on GPU|passed|failed|Error|^E " | tail -n 12 ;;
    fp8-check) timeout 120 python3 benchmarks/fp8_check.py 2>&1 | grep -v Warning ;;  # fp8_gemm.py: codes, error, GEMM ms
    prior-profile)  # one prior batch's kernels by kind, default and diffusers' GEGLU (eager, under the profiler)
      timeout 300 python3 benchmarks/prior_profile.py $BASE "$OUT" ${PROFILE_STEPS:-5} 2>&1 | grep -v Warning ;;
    cache-ab)  # the cache's encoding: fp32 with mirrored latents, fp32 and bf16 plain (after e2e: its class folder), then
      # the bf16 VAE's own encode at batch 1, 2, 4, 8 (prior_profile.vae_batches)
      timeout 200 python3 benchmarks/prior_profile.py $BASE "$OUT" --cache-only 2>&1 | grep -v Warning ;;
    priors)  # the sampler, its switches (bench_user.VARIANTS, each with its own load, capture and compile) and the pipeline
      timeout 560 python3 -m dreambooth_pl benchmark --base $BASE --out "$JSONL" --preset priors --steps ${PRIORS_N:-16} \
        ${PRIOR_VARIANTS:+--variants "$PRIOR_VARIANTS"} \
        2>&1 | tail -n 4 ;;  # PriorSampler against diffusers' pipeline, same seeds
    e2e)  # the recipe's fit with data.priors.generate, from process start to the LoRA; extrapolated to 197/1000
      # (E2E_OVERRIDES: fit arguments as a JSON list, e.g. '["--data.priors.generation.fp8_gemms=true"]')
      timeout ${E2E_TIMEOUT:-300} python3 -m dreambooth_pl benchmark --base $BASE --out "$JSONL" --preset end-to-end \
        --priors ${E2E_PRIORS:-16} --steps ${E2E_STEPS:-60} --again_steps ${E2E_AGAIN:-0} \
        ${E2E_OVERRIDES:+--overrides "$E2E_OVERRIDES"} 2>&1 | tail -n 3 ;;
    warm-ab)  # kernel_warmup.py: the whole run on a cold Triton cache (a fresh machine's), with and without building
      # the kernels ahead (the step's on a thread while the cache encodes, the prior draw's in a pool before its
      # first batch): the first step, start -> first step and the priors' first batch of each
      for arm in on warm-off; do fresh_run $arm; done ;;
    cold-ab)  # a fresh machine's first run, three ways, each on the CUDA libraries evicted from the page cache
      # (benchmarks/page_cache.py): everything on, then without reading the libraries ahead (prefetch.py), then
      # without building the kernels ahead (kernel_warmup.py); first the disk's cold rate, read in order and read
      # ahead by prefetch.advise (queued readahead; mincore says when the files are resident)
      timeout 60 python3 benchmarks/page_cache.py read
      timeout 90 python3 benchmarks/page_cache.py prefetch
      for arm in ${COLD_ARMS:-on prefetch-off warm-off}; do
        python3 benchmarks/page_cache.py evict
        fresh_run $arm
      done ;;
    first-pass)  # the fused plan's first forward and backward at 1024², Triton built ahead, profiled on the host: on
      # fresh Triton and driver caches, then on the driver cache the first run left (benchmarks/first_pass.py)
      d=$(mktemp -d)
      for run in fresh driver-cache-warm; do
        echo "-- $run"
        TRITON_CACHE_DIR=$(mktemp -d) CUDA_CACHE_PATH=$d timeout 200 python3 benchmarks/first_pass.py $BASE "$OUT" 2>&1 \
          | grep -v Warning | tail -n 20
        mv "$OUT/first-pass-profile.txt" "$OUT/first-pass-profile-$run.txt" 2>/dev/null
      done ;;
    warm-tests) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_kernel_warmup.py \
      tests/test_fused_norms.py tests/test_block_ops.py 2>&1 | tail -n 15 ;;
    recipe-variants)  # the memory plans' rows: every 2nd block, and no checkpointing
      bench --preset recipe --steps 12 --warmup 3 --overrides '["--model.perf.checkpoint_every=2"]'
      bench --preset recipe --steps 12 --warmup 3 --overrides '["--model.perf.gradient_checkpointing=false"]' ;;
    recipe-eager) bench --preset recipe --steps 12 --warmup 4 --overrides '["--model.perf.cuda_graph=false"]' ;;
    graph-memory) timeout 200 python3 benchmarks/graph_memory.py $BASE 1 2 2>&1 | grep -v Warning ;;
    adapters)  # issue 16's rows: DoRA and LoKr on the t4-16gb recipe
      bench --preset t4-16gb --steps 10 --warmup 3 --overrides '["--model.lora.adapter=dora"]'
      bench --preset t4-16gb --steps 10 --warmup 3 --overrides '["--model.lora.adapter=lokr","--export.format=kohya"]' ;;
    fast) bench --preset fast --steps 15 --warmup 4 ;;
    norms-steps)  # training with the Triton GroupNorms (fused_norms.py), NCHW and NHWC, fast and the recipe
      for extra in '' ',"--model.perf.channels_last=true"'; do
        bench --preset fast --steps 15 --warmup 4 --overrides "[\"--model.perf.fused_norms=true\"$extra]"
      done
      bench --preset recipe --steps 15 --warmup 4 --overrides '["--model.perf.fused_norms=true","--model.perf.channels_last=true"]' ;;
    fast-flops) bench --preset fast --steps 15 --warmup 4 --count_flops true ;;  # TFLOP/s; warm-up and memory inflated
    fused-variants)  # experimental fused_lora on the fast preset and on the recipe
      bench --preset fast --steps 15 --warmup 4 --overrides '["--model.perf.fused_lora=true"]'
      bench --preset recipe --steps 15 --warmup 4 --overrides '["--model.perf.fused_lora=true"]' ;;
    fast-no-qkv) bench --preset fast --steps 15 --warmup 4 --overrides '["--model.perf.group_qkv=false"]' ;;
    rank-gemms) timeout 120 python3 benchmarks/rank_gemms.py 2>&1 | tee "$OUT/rank-gemms.txt" ;;  # no base needed
    fast2) bench --preset fast --steps 15 --warmup 4 --devices 2 ;;  # DDP scaling: images/s against fast
    ddp-probe)  # 2-GPU recipe and fast fits that dump every rank's Python stacks if one has not finished in 150 s
      for preset in ${DDP_PRESETS:-recipe fast}; do
        ( sleep 150; pkill -ABRT -f "dreambooth_pl benchmark" ) & watchdog=$!
        PYTHONFAULTHANDLER=1 NCCL_DEBUG=WARN python3 -m dreambooth_pl benchmark --base $BASE --out "$JSONL" \
          --preset $preset --steps 15 --warmup 4 --devices 2 > "$OUT/ddp-probe-$preset.txt" 2>&1; echo "rc=$?"
        kill $watchdog 2>/dev/null; tail -n 5 "$OUT/ddp-probe-$preset.txt"
      done ;;
    recipe2) bench --preset recipe --steps 15 --warmup 4 --devices 2 ;;
    fast-ab)  # the fast preset without each of its newest switches, in the same call
      bench --preset fast --steps 15 --warmup 4 --overrides '["--model.perf.fused_blocks=false"]'
      bench --preset fast --steps 15 --warmup 4 --overrides '["--model.perf.channels_last=true"]' ;;
    profile-eager)  # the same step eagerly: F.ops.txt names the op and shapes behind each kernel
      bench --preset fast --steps 2 --warmup 3 --overrides '["--model.perf.cuda_graph=false"]' \
        --profile "$OUT/profile-fast-eager.txt" ;;
    profile)  # where a steady graphed step's time goes: kernels by kind, GPU idle gaps, Python hot spots, a trace
      bench --preset fast --steps 2 --warmup 4 --profile "$OUT/profile-fast-graph.txt" ;;
    t4) bench --preset t4-16gb --steps 12 --warmup 4 ;;
    quant|quant-bench)  # issue 24: whole-run peak (class-prior generation, caching, steps) of the 8gb preset with the
      # card capped to 8 GiB, float8 and nf4, beside the fp16 recipe (uncapped; it draws its priors as shipped)
      GEN='"--data.priors.generate=true","--data.priors.num_images=2","--data.priors.generation.sampler.steps=4"'
      bench --preset recipe --steps 12 --warmup 4 --overrides "[$GEN,\"--data.priors.dir=$OUT/cls-fp16\"]"
      for dt in float8 nf4; do
        bench --preset 8gb --steps 12 --warmup 4 --memory_cap_gib 8 \
          --overrides "[$GEN,\"--data.priors.dir=$OUT/cls-$dt\",\"--model.base_dtype=$dt\",\"--data.priors.generation.base_dtype=$dt\"]"
      done
      [ "$stage" = quant ] && timeout 240 python3 -c "from dreambooth_pl.tools.quant_quality import quant_quality as q; \
print(q('$BASE', out='$OUT/quant-quality.jsonl'))" 2>&1 | tail -n 2 ;;
    setup-memory)  # issue 24: what is alive at the 8gb preset's allocation peak, float8 against nf4
      for dt in float8 nf4; do
        timeout 240 python3 benchmarks/setup_memory.py $BASE "$OUT/setup-memory-$dt" --model.base_dtype=$dt 2>&1 \
          | grep -A17 "allocated peak" | tee "$OUT/setup-memory-$dt.txt"
      done ;;
    setup-memory-draw)  # the same with the prior draw in the run (2 priors at 4 steps on the quantized base)
      for dt in ${SMD_DTYPES:-float8 nf4}; do
        timeout 240 python3 benchmarks/setup_memory.py $BASE "$OUT/setup-memory-draw-$dt" --model.base_dtype=$dt \
          --data.priors.generation.base_dtype=$dt --data.priors.generate=true --data.priors.num_images=2 \
          --data.priors.dir="$OUT/setup-memory-draw-$dt/cls" --data.priors.generation.sampler.steps=4 \
          > "$OUT/setup-memory-draw-$dt.log" 2>&1; echo "rc=$?"
        grep -E -A17 "allocated peak|Error|error:" "$OUT/setup-memory-draw-$dt.log" | tail -n 20
      done ;;
    quant-quality) timeout 240 python3 -c "from dreambooth_pl.tools.quant_quality import quant_quality as q; \
print(q('$BASE', out='$OUT/quant-quality.jsonl'))" 2>&1 | tail -n 2 ;;
    quant-tests) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s tests/test_quant.py 2>&1 \
      | grep -E "passed|failed|relative|peak|cosine|Error|^FAILED|^E " | tail -n 30 ;;
    t4-te) bench --preset t4-16gb-te --steps 10 --warmup 3 ;;
    reference) bench --reference .bench/reference/train_dreambooth_lora_sdxl.py --steps 16 --warmup 4 ;;
    reference-bf16) bench --reference .bench/reference/train_dreambooth_lora_sdxl.py --reference_precision bf16 --steps 16 --warmup 4 ;;
    ray-grid)  # issue 25: a 4-cell recipe grid through Ray (one cell per GPU) against the 4 fits one after another
      if python3 -c "import ray" 2>/dev/null; then
        timeout 580 python3 benchmarks/ray_grid.py $BASE "$OUT" ${RAY_GRID_STEPS:-60} 2>&1 | tee "$OUT/ray-grid.txt" \
          | grep -E '^\{"bench"|Error|error:' | tail -n 5  # the JSON line stays in ray-grid.txt, not bench.jsonl
      else
        echo "ray-grid: ray is not importable here: put benchmarks/slim_wheel.py's 40 MiB repack of Ray and its small dependencies in .whl-ray/ (docs/gpu-tests.md), carry it and set WHL=.whl-ray"
      fi ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "== done $(date +%T)"
python3 - "$JSONL" <<'PY'
import json, sys, os
if os.path.exists(sys.argv[1]):
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if r["preset"] in ("priors", "end-to-end"):
            print(json.dumps(r)[:1500])
            continue
        print(f"{r['preset']:>22} {r.get('overrides',''):>60} {r['s_per_step']:.3f} s/step  "
              + (f"cap {r['memory_cap_gib']} GiB  " if r.get('memory_cap_gib') else "")
              + f"steady {r.get('peak_reserved_gib', 0):.2f}  run-peak {r.get('run_peak_reserved_gib', 0):.2f} GiB "
              f"(allocated {r.get('run_peak_alloc_gib', 0):.2f})  "
              f"ttl {r.get('time_to_lora_min', 0):.1f} min  warmup {r.get('warmup_s', '')}  "
              f"step median/max {r.get('step_s_median', 0):.3f}/{r.get('step_s_max', 0):.3f}"
              + (f"  {r['tflop_per_step']:.2f} TFLOP/step, {r['tflops']:.0f} TFLOP/s" if r.get('tflops') else ""))
PY
