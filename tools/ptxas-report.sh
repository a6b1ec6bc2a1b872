#!/usr/bin/env bash
# Compiles one CUDA source of the extension for sm_90a on a machine without a GPU and prints, per kernel, its
# registers and spills and any ptxas performance advisory (C75xx: e.g. a wgmma.wait_group it injected). The CUDA 13.2
# compiler comes from PyPI wheels (nvcc, nvvm, crt, cccl, runtime, cuobjdump, nvdisasm), unpacked once into a cache;
# the torch headers from the project's .venv.
#   bash tools/ptxas-report.sh [lightning_prefill.cu] [--sass]     # --sass: also the kernels' SASS in $CACHE/out.sass
#   NVCC_EXTRA=-DRL_PREFILL_STAMPS bash tools/ptxas-report.sh     # extra nvcc flags (here: the profiling build)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-lightning_prefill.cu}
PY=${PYTHON:-$PWD/.venv/bin/python}
CACHE=${PTXAS_CACHE:-$HOME/.cache/ringlinear-nvcc}
TK=$CACHE/nvidia/cu13
if [ ! -x "$TK/bin/nvcc" ] || [ ! -x "$TK/bin/nvdisasm" ]; then  # (nvdisasm: cuobjdump -sass needs it)
  mkdir -p "$CACHE/wheels"
  "$PY" -m pip download -q --no-deps -d "$CACHE/wheels" "nvidia-cuda-nvcc==13.2.*" "nvidia-nvvm==13.2.*" \
    "nvidia-cuda-crt==13.2.*" "nvidia-cuda-cccl==13.2.*" "nvidia-cuda-runtime==13.2.*" "nvidia-cuda-cuobjdump==13.2.*" \
    "nvidia-cuda-nvdisasm==13.2.*"
  for w in "$CACHE"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$CACHE"; done
  chmod +x "$TK"/bin/* "$TK"/nvvm/bin/*
fi
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
INC=$(CUDA_HOME=$TK "$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))" 2>/dev/null)
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cd gpu-backend/ringlinear/kernels/csrc
# -std=c++20: recent torch headers need it (the GPU machine's build uses torch's own flags). The math libraries'
# headers that torch includes (cusparse, cublas) come from torch's own nvidia wheels, searched last.
PATH=$TK/bin:$PATH "$TK/bin/nvcc" -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -std=c++20 -cubin \
  -Xptxas -v ${NVCC_EXTRA:-} $INC "-I$PYINC" -I. -Xcompiler -idirafter -Xcompiler "$SITE/nvidia/cu13/include" \
  -o "$CACHE/out.cubin" "$SRC" > "$CACHE/ptxas.log" 2>&1 || { tail -30 "$CACHE/ptxas.log"; exit 1; }
grep -E "C75[0-9]{2}" "$CACHE/ptxas.log" | sed -E 's/ in function .*//' | sort | uniq -c || true
# "Compiling entry function 'NAME'", then its stack / spill line, then its register line
grep -E "Compiling entry|bytes spill|Used [0-9]+ registers" "$CACHE/ptxas.log" |
  sed -E "s/.*Compiling entry function '([^']+)'.*/\1/; s/ptxas info *: //" | paste - - - |
  awk -F'\t' '{ printf "%-100s %s | %s\n", substr($1, 1, 100), $3, $2 }'
if [ "${2:-}" = "--sass" ]; then
  PATH=$TK/bin:$PATH "$TK/bin/cuobjdump" -sass "$CACHE/out.cubin" > "$CACHE/out.sass" && echo "SASS: $CACHE/out.sass"
  # per kernel: the highest register the code names (past the launch count where setmaxnreg raises it), the
  # setmaxnreg, wgmma and local-memory store instructions
  "$PY" - "$CACHE/out.sass" <<'PYEOF'
import re, sys


def loop_size(body):
    """Instructions (every path) of the innermost loop around the first HGMMA: the first backward branch past it
    whose target lies before it. The chunk loop's size is a CPU-side measure of a thread's work per chunk."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,5})\*/\s+([^;]*);", body)]
    hg = [a for a, t in ins if "HGMMA" in t]
    if not hg:
        return None
    for a, t in ins:
        m = re.search(r"BRA (?:\S+ )?0x([0-9a-f]+)", t)
        if a > hg[0] and m and int(m.group(1), 16) <= hg[0]:
            top = int(m.group(1), 16)
            return sum(1 for b, _ in ins if top <= b <= a)
    return None


for f in re.split(r"\n\s*Function : ", open(sys.argv[1]).read())[1:]:
    name, body = f.split("\n", 1)
    regs = [int(r) for r in re.findall(r"\bR(\d+)\b", body)]
    stl = len(re.findall(r"\bSTL", body))
    loop = loop_size(body)
    print(f"{name[:100]:<100} max R{max(regs, default=0)} | SETMAXREG {body.count('SETMAXREG')} "
          f"HGMMA {body.count('HGMMA')} STL {stl}" + (f" | loop {loop} instructions" if loop else ""))
PYEOF
fi
