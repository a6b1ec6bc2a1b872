#!/usr/bin/env python3
"""How fast do the prefill's wgmma shapes run on their own (H200)? A scratch kernel (not the extension, though it
includes the extension's wgmma wrappers) keeps 1, 2 or 3 warpgroups of one CTA an SM issuing batches of 8 k16-steps
(a K = 128 product, like the output pass's batches) of one shape, each batch committed and waited for before the
next, as the chunk loop does; operands are zeros in 128-byte-swizzled tiles, laid out as the kernel lays them. Prints
MACs per SM cycle for each shape and warpgroup count, as a share of the bf16 dense peak (2 048 MACs a cycle an SM:
989 TFLOP/s at 1.83 GHz on 132 SMs), and the cycles a warpgroup takes to issue a batch (fence to commit). Tells a
chunk loop bound by its wgmma from one whose tensor cores idle.

    python3 bench/probe_wgmma_rate.py [--out DIR]

Shapes: m64n64k16 with A and B from shared memory (the scores), m64n64k16 with A from registers (the inter and
intra products), m64n128k16 with A from registers and B MN-major (the state update), m64n256k16 from shared memory
(a GEMM's shape, for reference); and two warpgroups of the inter product's shape while a third streams 16-byte
shared-memory reads (does the output pass's other shared-memory traffic slow its wgmma?). Figures in
docs/benchmarks.md ("Fortieth session").

Then the premise of ping-pong turns (FA3's): does one warpgroup's CUDA-core work run at full speed under the other's
wgmma? A warpgroup repeats a state warpgroup's preparation (decay 64 fp32 accumulators, pack them to bf16 pairs,
optionally store the pairs to shared memory) alone, and beside a warpgroup issuing each of the chunk's wgmma shapes;
prints its cycles a round against alone, and the wgmma warpgroup's share of peak ("Forty-second session")."""
import argparse
import json
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

ROOT = Path(__file__).resolve().parents[1]
SRC = r'''
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include "wgmma.cuh"
using namespace ringlinear;

// 96 KB of zeros, 1024-aligned, visible to the async proxy: the operand tiles (a at 0, b at 32 KB) and scratch.
RL_DEVICE uint8_t* zeroed_operands(uint8_t* raw) {
  uint8_t* sm = raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u);
  for (int i = threadIdx.x; i < 96 * 1024 / 16; i += blockDim.x)
    reinterpret_cast<uint4*>(sm)[i] = make_uint4(0, 0, 0, 0);
  fence_proxy_async();
  __syncthreads();
  return sm;
}
RL_DEVICE unsigned clock_now() { unsigned t; asm volatile("mov.u32 %0, %%clock;" : "=r"(t)::"memory"); return t; }

// One batch of 8 k16-steps (a K = 128 product) of a shape, issued, not committed: 0 m64n64k16 ss, 1 m64n64k16 rs,
// 2 m64n128k16 rs with B MN-major (as the state update reads K), 3 m64n256k16 ss. Operands are the zeroed tiles.
template <int SHAPE> constexpr int batch_n() { return SHAPE == 3 ? 256 : SHAPE == 2 ? 128 : 64; }
template <int SHAPE> RL_DEVICE void issue_batch(float (&d)[batch_n<SHAPE>() / 2], uint32_t a_addr, uint32_t b_addr) {
  const uint32_t z = 0;
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const uint32_t koff = (kk >> 2) * (64 * 128) + (kk & 3) * 32;  // k-steps through the 64-column atoms
    const uint64_t a_desc = smem_desc(a_addr + koff, 16, 1024), b_desc = smem_desc(b_addr + koff, 16, 1024);
    if constexpr (SHAPE == 0) wgmma_m64n64k16_ss(d, a_desc, b_desc, 1);
    if constexpr (SHAPE == 1) wgmma_m64n64k16_rs<0>(d, z, z, z, z, b_desc, 1);
    if constexpr (SHAPE == 2)
      wgmma_m64n128k16_rs<1>(d, z, z, z, z, smem_desc(b_addr + (kk & 3) * 2048, 64 * 128, 1024), 1);
    if constexpr (SHAPE == 3)
      wgmma_m64n256k16_ss(d, a_desc, smem_desc(b_addr + (kk >> 2) * (256 * 128) + (kk & 3) * 32, 16, 1024), 1);
  }
}

// SHAPE: 0 m64n64k16 ss, 1 m64n64k16 rs, 2 m64n128k16 rs (B MN-major), 3 m64n256k16 ss, 4 as 1 beside warpgroup 2
// streaming shared-memory reads.
template <int SHAPE>
__global__ void __launch_bounds__(384, 1) rate_kernel(unsigned* cycles, float* sink, int nwg, int iters) {
  extern __shared__ __align__(16) uint8_t raw[];
  uint8_t* sm = zeroed_operands(raw);
  const int wg = threadIdx.x >> 7;
  if (wg >= nwg) return;
  // (in global memory, zeroed by the host: with the flag in shared memory the stream stopped at once from the
  // second launch on, H200, cause not found)
  volatile int* done = reinterpret_cast<volatile int*>(sink) + 384 + gridDim.x + blockIdx.x;
  if (SHAPE == 4 && wg == 2) {  // streams 16-byte shared-memory reads (conflict-free) until warpgroup 0 is done
    const uint32_t base = smem_addr(sm + 32 * 1024);
    uint32_t x = 0;
    unsigned n = 0;
    const unsigned s0 = clock();
    while (*done == 0) {
#pragma unroll
      for (int j = 0; j < 64; ++j) {
        uint32_t r0, r1, r2, r3;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                     : "r"(base + ((threadIdx.x & 127) * 16 + (j & 15) * 2048) % (32 * 1024)));
        x ^= r0 ^ r1 ^ r2 ^ r3;
      }
      n += 64;
    }
    const unsigned s1 = clock();
    if ((threadIdx.x & 127) == 0) {
      cycles[blockIdx.x * 6 + 2] = s1 - s0;
      reinterpret_cast<unsigned*>(sink)[384 + blockIdx.x] = n;
    }
    if (x == 12345u) sink[threadIdx.x] = 1.f;
    return;
  }
  const uint32_t a_addr = smem_addr(sm), b_addr = smem_addr(sm + 32 * 1024);  // a [64 x 128], b [up to 256 x 128]
  constexpr int BATCH = SHAPE == 4 ? 1 : SHAPE;  // (4: as 1, beside the stream)
  constexpr int N = batch_n<BATCH>();
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
  unsigned issue = 0;  // cycles from the fence to the commit: does issuing wait for the tensor cores?
  const unsigned t0 = clock_now();
  for (int it = 0; it < iters; ++it) {
    const unsigned i0 = clock_now();
    wgmma_fence();
    issue_batch<BATCH>(d, a_addr, b_addr);
    wgmma_commit();
    issue += clock_now() - i0;
    wgmma_wait<0>();
    fence_regs(d);
  }
  const unsigned t1 = clock_now();
  if ((threadIdx.x & 127) == 0) cycles[blockIdx.x * 6 + wg] = t1 - t0, cycles[blockIdx.x * 6 + 3 + wg] = issue;
  if (SHAPE == 4 && threadIdx.x == 0) *done = 1;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) s += d[i];
  if (s != 0.f) sink[threadIdx.x] = s;  // zeros in, zeros out: never stored, but d stays live
}

torch::Tensor rate(int shape, int nwg, int iters, int ctas) {
  auto cyc = torch::zeros({ctas * 6}, torch::dtype(torch::kInt32).device(torch::kCUDA));
  auto sink = torch::zeros({384 + 2 * ctas}, torch::dtype(torch::kFloat32).device(torch::kCUDA));
  const int bytes = 97 * 1024;
  auto go = [&](auto kern) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    kern<<<ctas, 384, bytes>>>(reinterpret_cast<unsigned*>(cyc.data_ptr<int>()), sink.data_ptr<float>(), nwg, iters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (shape == 0) go(rate_kernel<0>);
  if (shape == 1) go(rate_kernel<1>);
  if (shape == 2) go(rate_kernel<2>);
  if (shape == 3) go(rate_kernel<3>);
  if (shape == 4) go(rate_kernel<4>);
  // [CTA]: each warpgroup's span, its issue cycles (summed over batches), and (4) the stream's 16-byte reads
  if (shape == 4) {
    const auto reads = sink.slice(0, 384, 384 + ctas).view(torch::kInt32).view({ctas, 1});
    return torch::cat({cyc.view({ctas, 6}), reads}, 1).cpu();
  }
  return cyc.view({ctas, 6}).cpu();
}
// Do one warpgroup's CUDA-core work and another's wgmma slow each other? (The premise of ping-pong turns is that one
// warpgroup's preparation runs under the other's batch; on the H200 dense work cuts the wgmma rate 3-5x.)
// Warpgroup 1 runs ITERS rounds of a state warpgroup's preparation: decay 64 fp32 accumulators, pack them to 32 bf16
// pairs (WORK 1: and store the pairs to shared memory, 16 bytes a store, conflict-free; WORK 2: as many FMAs as one
// dependent chain, the same instruction count at a quarter of the issue rate). Warpgroup 0 meanwhile issues batches
// of 8 k16-steps until warpgroup 1 is done: BESIDE 0 nothing, 1 m64n64k16 ss (the scores), 2 m64n64k16 rs (inter,
// intra), 3 m64n128k16 rs with B MN-major (the update). SWAP trades the two warpgroups' roles (does the scheduler
// favour the lower warps?). NMMA 2: two warpgroups issue (0 and 1, as the scores-warpgroup pass's state warpgroups)
// beside the working warpgroup 2 (its scores warpgroup's mask).
template <int WORK, int BESIDE, int SWAP = 0, int NMMA = 1>
__global__ void __launch_bounds__(384, 1) beside_kernel(unsigned* cycles, float* sink, int iters, int fixed) {
  extern __shared__ __align__(16) uint8_t raw[];
  uint8_t* sm = zeroed_operands(raw);
  const int wg = NMMA == 2 ? (threadIdx.x >> 7 == 2 ? 1 : 0) : (threadIdx.x >> 7) ^ SWAP;  // 1: the worker
  const uint32_t done = smem_addr(sm + 95 * 1024);  // zeroed above; past the operands and the stores
  if (wg == 1) {
    const float g = sink[0] + 0.999f;  // (0.999: not known to the compiler)
    float a[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) a[i] = float(threadIdx.x + i);
    uint32_t x = 0;
    const uint32_t base = smem_addr(sm + 64 * 1024);  // past the wgmma operands
    const unsigned t0 = clock_now();
    for (int it = 0; it < iters; ++it) {
      if constexpr (WORK == 2) {
#pragma unroll
        for (int i = 0; i < 96; ++i) a[0] = fmaf(a[0], g, 1.f);
        continue;
      }
#pragma unroll
      for (int i = 0; i < 64; ++i) a[i] *= g;
      uint32_t p[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) p[i] = pack_bf16(a[2 * i], a[2 * i + 1]);
      if constexpr (WORK == 1) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
          asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(base + (threadIdx.x & 127) * 16 + j * 2048),
                       "r"(p[4 * j]), "r"(p[4 * j + 1]), "r"(p[4 * j + 2]), "r"(p[4 * j + 3]) : "memory");
      } else {
#pragma unroll
        for (int i = 0; i < 32; ++i) x ^= p[i];
      }
    }
    const unsigned t1 = clock_now();
    if ((threadIdx.x & 127) == 0) {
      cycles[blockIdx.x * 6 + 0] = t1 - t0;
      asm volatile("st.volatile.shared.u32 [%0], %1;" ::"r"(done), "r"(1) : "memory");
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 64; ++i) s += a[i];
    if (s == 12345.f || x == 12345u) sink[threadIdx.x] = 1.f;
    return;
  }
  if (BESIDE == 0) return;
  const uint32_t a_addr = smem_addr(sm), b_addr = smem_addr(sm + 32 * 1024);
  constexpr int BATCH = BESIDE ? BESIDE - 1 : 0, N = batch_n<BATCH>();
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
  unsigned batches = 0, stop = 0;
  const unsigned t0 = clock_now();
  while (fixed ? batches < unsigned(fixed) : !stop) {
    wgmma_fence();
    issue_batch<BATCH>(d, a_addr, b_addr);
    wgmma_commit();
    // the poll, under the batch: every thread reads the flag, and an OR over the warpgroup's barrier makes the exit
    // the same for all of them (a thread leaving the loop alone would leave its warpgroup's wgmma half-issued)
    if (!fixed)
      asm volatile("{\n .reg .pred p, q;\n ld.volatile.shared.u32 %0, [%1];\n setp.ne.u32 p, %0, 0;\n"
                   " bar.red.or.pred q, %2, 128, p;\n selp.u32 %0, 1, 0, q;\n}"
                   : "=r"(stop) : "r"(done), "r"(1 + (threadIdx.x >> 7)) : "memory");
    wgmma_wait<0>();
    fence_regs(d);
    ++batches;
  }
  const unsigned t1 = clock_now();
  const int slot = blockIdx.x * 6 + 1 + 2 * (NMMA == 2 ? threadIdx.x >> 7 : 0);
  if ((threadIdx.x & 127) == 0) cycles[slot] = t1 - t0, cycles[slot + 1] = batches;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) s += d[i];
  if (s != 0.f) sink[threadIdx.x] = s;
}

torch::Tensor beside(int work, int beside_shape, int iters, int ctas, int fixed) {
  auto cyc = torch::zeros({ctas * 6}, torch::dtype(torch::kInt32).device(torch::kCUDA));
  auto sink = torch::zeros({256}, torch::dtype(torch::kFloat32).device(torch::kCUDA));
  const int bytes = 97 * 1024;
  auto go = [&](auto kern, int threads = 256) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    kern<<<ctas, threads, bytes>>>(reinterpret_cast<unsigned*>(cyc.data_ptr<int>()), sink.data_ptr<float>(), iters,
                                   fixed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const int k = work * 4 + beside_shape;
  if (k == 0) go(beside_kernel<0, 0>);
  if (k == 1) go(beside_kernel<0, 1>);
  if (k == 2) go(beside_kernel<0, 2>);
  if (k == 3) go(beside_kernel<0, 3>);
  if (k == 4) go(beside_kernel<1, 0>);
  if (k == 5) go(beside_kernel<1, 1>);
  if (k == 6) go(beside_kernel<1, 2>);
  if (k == 7) go(beside_kernel<1, 3>);
  if (k == 8) go(beside_kernel<2, 0>);
  if (k == 9) go(beside_kernel<2, 1>);
  if (k == 10) go(beside_kernel<2, 2>);
  if (k == 11) go(beside_kernel<2, 3>);
  if (k == 13) go(beside_kernel<0, 1, 1>);
  if (k == 14) go(beside_kernel<0, 2, 1>);
  if (k == 15) go(beside_kernel<0, 3, 1>);
  if (k == 17) go(beside_kernel<0, 1, 0, 2>, 384);
  if (k == 18) go(beside_kernel<0, 2, 0, 2>, 384);
  if (k == 19) go(beside_kernel<0, 3, 0, 2>, 384);
  // [CTA]: the worker's cycles, then each wgmma warpgroup's cycles and batches
  return cyc.view({ctas, 6}).cpu();
}
'''
SHAPES = {0: ("m64n64k16 ss (scores)", 64), 1: ("m64n64k16 rs (inter, intra)", 64),
          2: ("m64n128k16 rs, B MN-major (state update)", 128), 3: ("m64n256k16 ss (reference)", 256),
          4: ("m64n64k16 rs beside a shared-memory read stream", 64)}
WORK = {0: "decay 64 fp32 + pack 32 bf16 pairs", 1: "the same + 8 16-byte shared stores",
        2: "96 FMAs as one dependent chain", 3: "decay + pack, the roles' warpgroups swapped",
        4: "decay + pack, two issuing warpgroups"}
BESIDE = {0: ("nothing", 0), 1: ("m64n64k16 ss (scores)", 64), 2: ("m64n64k16 rs (inter, intra)", 64),
          3: ("m64n128k16 rs (update)", 128)}
PEAK = 2048  # bf16 dense MACs a cycle an SM


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    ext = load_inline("probe_wgmma_rate", cpp_sources="torch::Tensor rate(int shape, int nwg, int iters, int ctas);\n"
                                  "torch::Tensor beside(int work, int beside_shape, int iters, int ctas, int fixed);",
                      cuda_sources=SRC, functions=["rate", "beside"],
                      extra_include_paths=[str(ROOT / "gpu-backend" / "ringlinear" / "kernels" / "csrc")],
                      extra_cuda_cflags=["-O3", "-gencode", "arch=compute_90a,code=sm_90a"])
    ctas = torch.cuda.get_device_properties(0).multi_processor_count
    res = []
    for shape, (name, n) in SHAPES.items():
        for nwg in (1, 2, 3) if shape < 4 else (2,):
            ext.rate(shape, nwg + (shape == 4), 50, ctas)  # warm-up
            raw = ext.rate(shape, nwg + (shape == 4), args.iters, ctas)
            cyc = raw[:, :nwg].float()
            span = float(cyc.max(dim=1).values.median())  # the CTA's slowest warpgroup, median over SMs
            macs = nwg * args.iters * 8 * 64 * n * 16
            issue = float(raw[:, 3:3 + nwg].float().mean(dim=1).median()) / args.iters
            r = {"shape": name, "warpgroups": nwg, "cycles per batch": span / args.iters,
                 "issue cycles per batch": issue, "MAC per cycle": macs / span, "share of peak": macs / span / PEAK}
            if shape == 4:  # the stream's 16-byte reads over its cycles, 128 threads
                r["stream bytes per cycle"] = float((raw[:, 6].double() * 128 * 16 / raw[:, 2].double()).median())
            res.append(r)
            print(f"{name:<42} x{nwg}: {r['cycles per batch']:7.1f} cycles a batch of 8, {r['MAC per cycle']:6.0f} "
                  f"MAC/cycle, {r['share of peak']:.0%} of peak, {issue:5.0f} cycles to issue"
                  + (f"; stream {r['stream bytes per cycle']:.0f} B/cycle" if shape == 4 else ""), flush=True)
    alone = {}
    for work in (0, 1, 2, 3, 4):
        for shape, (name, n) in BESIDE.items():
            if work >= 3 and shape == 0:
                continue
            ext.beside(work, shape, 50, ctas, 0)  # warm-up
            raw = ext.beside(work, shape, args.iters, ctas, 0).double()
            per_round = float((raw[:, 0] / args.iters).median())
            kind = work if work < 3 else 0  # (3 and 4 repeat work 0's rounds: measured alone with it)
            alone.setdefault(kind, per_round)
            two = work == 4
            r = {"work": WORK[work], "beside": name, "work cycles per round": per_round,
                 "work slowdown": per_round / alone[kind]}
            if shape:
                mac = raw[:, 2] * 8 * 64 * n * 16 / raw[:, 1]
                if two:  # both issuing warpgroups' rates
                    mac = mac + raw[:, 4] * 8 * 64 * n * 16 / raw[:, 3]
                r["beside MAC per cycle"] = float(mac.median())
                r["beside share of peak"] = r["beside MAC per cycle"] / PEAK
            res.append(r)
            share = (f"; the wgmma warpgroup{'s' if two else ''} at {r['beside share of peak']:.0%} of peak"
                     if shape else "")
            print(f"{WORK[work]:<34} beside {name:<30}: {per_round:6.1f} cycles a round "
                  f"({r['work slowdown']:.2f}x alone){share}", flush=True)
    # The same without the poll (its barrier could be what slows the wgmma warpgroup): it issues a fixed number of
    # batches, as many as take as long alone as the other's rounds do alone; both spans are printed against alone.
    batch_alone = {shape: next(r["cycles per batch"] for r in res if r.get("shape") == SHAPES[k][0]
                               and r.get("warpgroups") == 1) for shape, k in ((1, 0), (2, 1), (3, 2))}
    for work in (0, 1):
        for shape, (name, n) in list(BESIDE.items())[1:]:
            fixed = int(args.iters * alone[work] / batch_alone[shape])
            raw = ext.beside(work, shape, args.iters, ctas, fixed).double()
            work_span, mma_span = float(raw[:, 0].median()), float(raw[:, 1].median())
            r = {"work": WORK[work], "beside (fixed batches)": name, "batches": fixed,
                 "work span vs alone": work_span / (args.iters * alone[work]),
                 "wgmma span vs alone": mma_span / (fixed * batch_alone[shape])}
            res.append(r)
            print(f"{WORK[work]:<34} beside {name:<30}, {fixed} batches, no poll: its span "
                  f"{r['work span vs alone']:.2f}x alone, the wgmma warpgroup's {r['wgmma span vs alone']:.2f}x",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wgmma_rate.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
