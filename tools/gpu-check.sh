#!/usr/bin/env bash
# The GPU machine's checks (issue 6), run from the repo root on the H200 in one call:
#   bash tools/gpu-check.sh OUTDIR [build] [tests] [kernels] [elementwise] [e2e] [e2e-prefill] [e2e-decode] [chunked]
#                                  [mixed] [sampling] [latency] [overlap] [sampler] [snapshots] [launch] [gemv]
#                                  [moe-tests] [moe-mid] [moe-wide-e2e] [moe-profile] [prefill-v] [e2e-v-ab]
#                                  [prefill-profile] [prefill-phases]
# Wheels not on that machine (fla for the kernel benchmarks) are carried in .whl/ (see docs/kernels.md).
# Each step writes OUTDIR/<step>.log; a failing step does not stop the next.
set -u
OUT=${1:?usage: gpu-check.sh OUTDIR STEP...}; shift
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/gpu-backend PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
run() { local name=$1; shift; echo "== $name: $*"; local t0=$SECONDS; "$@" >"$OUT/$name.log" 2>&1; local rc=$?
        echo "   rc=$rc in $((SECONDS - t0)) s; last lines:"; tail -n "${TAIL:-6}" "$OUT/$name.log"; }
for step in "$@"; do
  case $step in
    build) run build python3 -c "import time; t=time.time(); from ringlinear.kernels import _build; _build.extension(); print(f'built in {time.time()-t:.0f} s')" ;;
    tests) TAIL=25 run tests python3 -m pytest -q -rf -p no:cacheprovider --import-mode=importlib gpu-backend/tests/kernels \
             gpu-backend/tests/engine/test_kernel_path.py gpu-backend/tests/engine/test_sampling.py \
             gpu-backend/tests/engine/test_overlap.py gpu-backend/tests/engine/test_snapshot_arena.py \
             gpu-backend/tests/engine/test_last_layer_rows.py \
             gpu-backend/tests/model/test_chunk_attention.py \
             "gpu-backend/tests/model/test_model.py::test_f32_reference_meets_golden_tolerance" ;;
    kernels) TAIL=40 run kernels sh -c "python3 bench/gpu_paged_attention.py --out $OUT && python3 bench/gpu_elementwise.py --out $OUT && python3 bench/gpu_kernels.py --only ceilings,decode,prefill,moe --out $OUT" ;;
    elementwise) TAIL=25 run elementwise python3 bench/gpu_elementwise.py --out "$OUT" ;;
    e2e) TAIL=45 run e2e python3 bench/pod_e2e.py --device cuda --batches 1,8,32,64,128,256 --decode-steps 6 \
             --time-budget 200 --json "$OUT/e2e.json" --plot "$OUT/pod_e2e.png" ;;
    e2e-prefill) TAIL=30 run e2e_prefill python3 bench/pod_e2e.py --device cuda --decode-contexts "" --time-budget 150 --json "$OUT/e2e_prefill.json" ;;
    e2e-decode) TAIL=40 run e2e_decode python3 bench/pod_e2e.py --device cuda --prefill-contexts "" --decode-contexts 65536,16384,4096 \
             --batches 1,8,32,64,128,256 --decode-steps 4 --time-budget 150 --json "$OUT/e2e_decode.json" ;;
    chunked) TAIL=70 run chunked python3 bench/pod_chunked_prefill.py --json "$OUT/chunked.json" ;;
    mixed) TAIL=30 run mixed sh -c "python3 bench/profile_pod.py --prefill '' --decode '' --variants graphs,eager --rows 20 \
             --mixed 32x4096+300@2048,32x4096+32768@512,32x4096+32768@2048 > $OUT/mixed_full.log 2>&1; \
             grep -A1 '=== mixed' $OUT/mixed_full.log" ;;
    sampling) TAIL=12 run sampling python3 bench/pod_sampling.py --device cuda --json "$OUT/sampling.json" ;;
    latency) TAIL=8 run latency python3 bench/pod_e2e.py --device cuda --models ours --prefill-contexts "" \
             --decode-contexts 4096,65536 --batches 1,8,256 --decode-steps 4 --time-budget 80 --json "$OUT/latency.json" ;;
    overlap) TAIL=20 run overlap python3 bench/pod_e2e.py --device cuda --models ours --prefill-contexts "" \
             --decode-contexts 4096,65536 --batches 1,8,64,256 --decode-steps 32 --overlap ab --time-budget 200 \
             --json "$OUT/overlap.json" ;;
    sampler) TAIL=20 run sampler python3 bench/pod_e2e.py --device cuda --models ours --prefill-contexts "" \
             --decode-contexts 4096 --batches 1,64,256 --decode-steps 32 --sampler ab --temperature 0.7 --top-p 0.9 \
             --time-budget 200 --json "$OUT/sampler.json" ;;
    snapshots) TAIL=4 run snapshots sh -c "for gib in 6 0 6 0; do python3 bench/pod_e2e.py --device cuda --models ours \
             --prefill-contexts '' --decode-contexts 4096 --batches 256 --decode-steps 64 --prefix-cache-gib \$gib \
             --json $OUT/snapshots_\$gib.json | grep 'ms/step'; done" ;;
    launch) TAIL=16 run launch python3 bench/pod_e2e.py --device cuda --models ours --prefill-contexts "" \
             --decode-contexts 4096,65536 --batches 1,2,4,8 --decode-steps 32 --decode-launch ab --time-budget 200 \
             --json "$OUT/launch.json" ;;
    prefill-v) TAIL=6 run prefill_v python3 bench/gpu_kernels.py --only prefill-v --out "$OUT" ;;
    e2e-v-ab) TAIL=30 run e2e_v_ab python3 bench/pod_e2e.py --device cuda --decode-contexts "" \
             --v-in-place ab --time-budget 200 --json "$OUT/e2e_v_ab.json" ;;
    gemv) TAIL=20 run gemv python3 bench/gpu_kernels.py --only gemv --out "$OUT" ;;
    moe-tests) TAIL=15 run moe_tests python3 -m pytest -q -rf -p no:cacheprovider --import-mode=importlib \
             gpu-backend/tests/kernels/test_moe_cuda.py ;;
    moe-mid) TAIL=16 run moe_mid python3 bench/gpu_kernels.py --only moe-mid --out "$OUT" ;;
    moe-wide-e2e) TAIL=20 run moe_wide_e2e python3 bench/pod_e2e.py --device cuda --models ours --decode-contexts "" \
             --prefill-contexts 1024,2048,3072,4096 --prefill-reps 3 --moe-wide ab --json "$OUT/moe_wide_e2e.json" ;;
    moe-profile) TAIL=12 run moe_profile sh -c "ncu --clock-control none --profile-from-start off --set full \
             -o $OUT/moe_wide python3 bench/profile_moe_wide.py --tokens 16384 && \
             ncu --import $OUT/moe_wide.ncu-rep --page details > $OUT/moe_wide_details.txt" ;;
    prefill-profile) TAIL=12 run prefill_profile sh -c "ncu --clock-control none --profile-from-start off --set full \
             -o $OUT/prefill python3 bench/profile_prefill.py --T 4096,16384,131072 && \
             ncu --import $OUT/prefill.ncu-rep --page details > $OUT/prefill_details.txt" ;;
    prefill-phases) TAIL=30 run prefill_phases sh -c "python3 bench/profile_prefill_phases.py --T 4096,16384,131072 \
             --out $OUT && python3 bench/profile_prefill_phases.py --T 4096,131072 --fused --out $OUT" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
