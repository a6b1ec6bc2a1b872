// Grouped GEMMs of the MoE at many rows per expert (long prompt steps), the contract of moe_wide_gemm (per expert e,
// Y[rows_e, F] = X[rows_e, K] . W_e[F, K]^T; twin: stream_gemm_reference in moe_reference.py) in its two uses:
//   gate+up: x rows gathered through `gather`, w = w_gate with w_up, Y = SwiGLU (moe_wide_gemm's rounding);
//   down:    x rows already in expert order (h from gate+up), no gather.
// From a few hundred rows per expert the work is compute-bound, and the wide kernel (moe_wide.cu), whose warps issue
// both the cp.async copies and the MMAs, stays behind CUTLASS there (docs/benchmarks.md). This is the layout of a
// Hopper GEMM that keeps the tensor cores fed:
//   - warp specialisation: warpgroup 0 fills a STAGES-deep ring of shared-memory slots (full / empty mbarriers),
//     warpgroups 1 and 2 only wait, multiply and store. Weight tiles (and the down GEMM's x tile) come as TMA boxes
//     issued by one thread, 64 columns wide with the 128-byte swizzle (the K-major layout wgmma reads); gate+up's
//     gathered x rows as 16-byte cp.async copies by all 128 producer threads into the same layout, each thread's
//     completion arriving on the slot's barrier;
//   - tiles of 128 x rows (64 per consumer warpgroup: the wgmma M side) by 256 B columns (m64n256k16): 256 output
//     features for down; for gate+up 128 gate rows then the 128 up rows of the same features, so a thread holds g and
//     u of the same outputs;
//   - persistent CTAs (one per SM) walk the tiles in order (tile -> expert, x tile, feature tile through a per-CTA
//     table of each expert's first tile), so the producer loads the next tile while the consumers store this one,
//     and the CTAs running together share an x tile across its feature tiles and an expert's weights across its x
//     tiles (both from L2);
//   - the epilogue: a token row is an output row, so the accumulators go by stmatrix into 128-byte-swizzled boxes and
//     leave by TMA stores the warpgroup does not wait for; an expert's last, partial x tile is stored from registers
//     with rows past the expert's end (the next expert's) masked.
// Each output element is one fp32 dot product in k order: a row's result does not depend on the tile that carries it
// or on the ring depth (tested).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"
#include "moe_grouped.h"
#include "tma.cuh"
#include "wgmma.cuh"

namespace ringlinear {

namespace {
constexpr int kTmaThreads = 384;   // warpgroup 0: the copies; warpgroups 1 and 2: MMAs and stores
constexpr int kTmaBM = 128;        // x rows per tile, 64 per consumer warpgroup
constexpr int kTmaBN = 256;        // output features per tile
constexpr int kTmaABytes = kTmaBM * 128, kTmaBBytes = kTmaBN * 128;  // 64 bf16 columns = one 128-byte row each
constexpr int kTmaStageBytes = kTmaABytes + kTmaBBytes;                // a ring slot: 48 KB
constexpr int kTmaMaxSmem = 227 * 1024;                                // per block on sm_90

// Dynamic shared memory: the ring (STAGES slots), the two consumer warpgroups' output tiles ([64 rows][kOut] bf16 as
// boxes of [64][64]), the ring's mbarriers, each expert's first tile; + slack to align the start to 1 KB.
template <bool GATE_UP, int STAGES> struct TmaSmem {
  static constexpr int kOut = GATE_UP ? kTmaBN / 2 : kTmaBN;  // output features per tile
  static constexpr int kOutBytes = 64 * kOut * 2;
  static constexpr int kBars = STAGES * kTmaStageBytes + 2 * kOutBytes;
  static constexpr int kFirst = kBars + 2 * STAGES * 8;
  static constexpr int bytes(int E) { return kFirst + 4 * (E + 1) + 1024; }
};
constexpr int kTmaConsumerWarps = 8;  // arrivals that free a slot
constexpr int kTmaMaxExperts = 1024;

RL_DEVICE void warpgroup_sync(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

// The tiles of the step: expert e's x tiles are numbers first[e] .. first[e+1] - 1, each with `nt_count` feature tiles.
struct TmaTiles {
  const int* first; int E, nt_count;
  RL_DEVICE int count() const { return first[E] * nt_count; }
  // tile t -> expert e, x tile m of that expert, feature tile nt
  RL_DEVICE void locate(int t, int& e, int& m, int& nt) const {
    const int mg = t / nt_count;
    nt = t - mg * nt_count;
    int lo = 0, hi = E - 1;  // the last expert whose first tile is <= mg (experts without rows share their first)
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (first[mid] <= mg) lo = mid;
      else hi = mid - 1;
    }
    e = lo;
    m = mg - first[e];
  }
};
}  // namespace

// Two output elements: the down GEMM's accumulators, or (GATE_UP) h = bf16(swiglu_rounded(g, u)), as the other paths.
template <bool GATE_UP> RL_DEVICE uint32_t tma_out_pair(const float (&acc)[128], int i) {
  if constexpr (GATE_UP)  // i < 64: gate of the tile's feature block; i + 64: up of the same features
    return pack_bf16(swiglu_rounded(acc[i], acc[i + 64]), swiglu_rounded(acc[i + 1], acc[i + 65]));
  else return pack_bf16(acc[i], acc[i + 1]);
}

// Down (GATE_UP false): tx = x [A, K] in expert order (box 64 x 128), tw = w [E, F, K] (box 64 x 256 x 1).
// Gate+up (GATE_UP): x [N, K] rows gathered by cp.async from the producer warpgroup through `gather` [A]; tw / tw2 =
// w_gate / w_up [E, F, K] (boxes 64 x 128 x 1: the B tile is 128 gate rows then the 128 up rows of the same features,
// so a thread's accumulators hold g and u of the same outputs). ty: y [A, F] (box 64 x 64). offsets [E+1].
template <bool GATE_UP, int STAGES>
__global__ void __launch_bounds__(kTmaThreads, 1) moe_tma_kernel(
    const __grid_constant__ CUtensorMap tx, const __grid_constant__ CUtensorMap tw,
    const __grid_constant__ CUtensorMap tw2, const __grid_constant__ CUtensorMap ty,
    const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ gather, const int32_t* __restrict__ offsets,
    int E, int K, int F, __nv_bfloat16* __restrict__ y) {
  using L = TmaSmem<GATE_UP, STAGES>;
  constexpr int kOut = L::kOut;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);  // 128-byte swizzle: 1 KB atoms
  const uint32_t sbase = smem_addr(smem);
  const uint32_t full0 = sbase + L::kBars, empty0 = full0 + 8 * STAGES;  // mbarriers: full[s], then empty[s]
  int* first = reinterpret_cast<int*>(smem + L::kFirst);
  const int32_t* row0 = offsets;  // expert e's rows start at offsets[e]
  const int tid = threadIdx.x;
  pdl_wait();  // offsets and x come from the kernels just before this one
  pdl_launch_dependents();
  if (tid < 32) {  // each expert's first tile: a warp scan of the per-expert tile counts
    const int per = (E + 31) / 32, e0 = min(E, tid * per), e1 = min(E, e0 + per);
    int sum = 0;
    for (int e = e0; e < e1; ++e) sum += (offsets[e + 1] - offsets[e] + kTmaBM - 1) / kTmaBM;
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (tid >= o) incl += v;
    }
    int run = incl - sum;
    for (int e = e0; e < e1; ++e) {
      first[e] = run;
      run += (offsets[e + 1] - offsets[e] + kTmaBM - 1) / kTmaBM;
    }
    if (tid == 31) first[E] = incl;
  } else if (tid == 32) {
    for (int s = 0; s < STAGES; ++s) {
      // the producer's expect-tx arrive (+ the weight boxes' bytes), and with GATE_UP one cp.async completion
      // arrive of each producer thread (the gathered x rows)
      mbar_init(full0 + 8 * s, GATE_UP ? 1 + 128 : 1);
      mbar_init(empty0 + 8 * s, kTmaConsumerWarps);  // one arrive per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const TmaTiles tiles{first, E, (F + kOut - 1) / kOut};
  const int total = tiles.count(), KT = (K + 63) / 64;

  if (tid < 128) {  // producer warpgroup: thread 0 issues the TMA boxes; with GATE_UP all 128 gather x rows
    if (!GATE_UP && tid != 0) return;
    const int A = row0[E];
    const int c = tid & 7, rb = tid >> 3;  // GATE_UP: 16-byte chunk c of x tile rows rb + 16 i
    int s = 0;
    uint32_t phase = 0;
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
      int e, m, nt;
      tiles.locate(t, e, m, nt);
      const int xr = row0[e] + m * kTmaBM;
      const __nv_bfloat16* src[8];
      bool ok[8];
      if constexpr (GATE_UP) {  // rows past the expert's end are the next expert's (not stored); past A: zero-filled
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int r = xr + rb + 16 * i;
          ok[i] = r < A;
          src[i] = x + (ok[i] ? (int64_t)gather[r] * K : 0) + c * 8;
        }
      }
      for (int kt = 0; kt < KT; ++kt) {
        mbar_wait(empty0 + 8 * s, phase ^ 1);  // the consumers freed the slot (the first round passes at once)
        const uint32_t dst = sbase + s * kTmaStageBytes;
        if (tid == 0) {
          // boxes partly out of bounds still deliver their full size
          mbar_expect_tx(full0 + 8 * s, GATE_UP ? kTmaBBytes : kTmaStageBytes);
          if constexpr (GATE_UP) {
            tma_load_3d(dst + kTmaABytes, &tw, full0 + 8 * s, kt * 64, nt * kOut, e);
            tma_load_3d(dst + kTmaABytes + kTmaBBytes / 2, &tw2, full0 + 8 * s, kt * 64, nt * kOut, e);
          } else {
            tma_load_2d(dst, &tx, full0 + 8 * s, kt * 64, xr);
            tma_load_3d(dst + kTmaABytes, &tw, full0 + 8 * s, kt * 64, nt * kOut, e);
          }
        }
        if constexpr (GATE_UP) {  // the x tile in the layout a TMA box would give: row r at r * 128, 128-byte swizzle
          const bool kin = kt * 64 + c * 8 < K;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int r = rb + 16 * i;
            cp_async_16_s(dst + swz128(r, c), src[i], ok[i] && kin ? 16 : 0);
            src[i] += 64;
          }
          asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full0 + 8 * s) : "memory");
        }
        if (++s == STAGES) { s = 0; phase ^= 1; }
      }
    }
    return;
  }

  // consumers: warpgroup wg takes x rows 64 wg .. 64 wg + 63 of the tile
  const int wg = (tid >> 7) - 1, wq = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const uint64_t da0 = smem_desc(sbase + wg * 64 * 128, 16, 1024), db0 = smem_desc(sbase + kTmaABytes, 16, 1024);
  const uint32_t out0 = sbase + STAGES * kTmaStageBytes + wg * L::kOutBytes;  // this warpgroup's output tile
  float acc[128];
  int s = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    int e, m, nt;
    tiles.locate(t, e, m, nt);
    int prev = 0;
    for (int kt = 0; kt < KT; ++kt) {
      mbar_wait(full0 + 8 * s, phase);
      if constexpr (GATE_UP) fence_proxy_async();  // the cp.async (generic proxy) rows, visible to wgmma
      const uint32_t off = s * (kTmaStageBytes / 16);  // descriptor units
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_ss(acc, da0 + off + kk * 2, db0 + off + kk * 2, kt == 0 && kk == 0 ? 0 : 1);
      wgmma_commit();
      wgmma_wait<1>();  // step kt - 1's MMAs are done: its slot goes back to the producer
      if (kt > 0 && lane == 0) mbar_arrive(empty0 + 8 * prev);
      prev = s;
      if (++s == STAGES) { s = 0; phase ^= 1; }
    }
    wgmma_wait<0>();
    fence_regs(acc);
    if (lane == 0) mbar_arrive(empty0 + 8 * prev);

    // acc[4n + 0/1]: row 16 wq + g of the half, columns 8n + 2 tig + 0/1 of the tile; acc[4n + 2/3]: 8 rows down.
    // Output column block n (8 features) of kOut / 8 comes from accumulator block n (GATE_UP: and n + 16).
    const int xr = row0[e] + m * kTmaBM, rows = row0[e + 1] - xr - wg * 64;  // rows of this warpgroup's half
    if (rows >= 64) {
      // A whole half: through shared memory (the 128-byte-swizzled boxes the output map reads) and TMA stores, so
      // the warpgroup goes on to the next tile's MMAs while the copy engine writes this one (columns past F are
      // clipped by the map).
      if (tid == 128 + wg * 128) bulk_wait_read();  // this warpgroup's previous stores have read the tile
      warpgroup_sync(1 + wg);
      // stmatrix: lane l gives row l % 8 of matrix l / 8 = (top / bottom 8 rows) x (column block n / n + 1)
      const int mrow = wq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, mblk = lane >> 4;
#pragma unroll
      for (int n = 0; n < kOut / 8; n += 2) {
        const int blk = n + mblk;  // 8-column block: box blk / 8, 16-byte chunk blk % 8 of its row
        const uint32_t addr = out0 + (blk >> 3) * (64 * 128) + swz128(mrow, blk & 7);
        stmatrix_x4(addr, tma_out_pair<GATE_UP>(acc, 4 * n), tma_out_pair<GATE_UP>(acc, 4 * n + 2),
                    tma_out_pair<GATE_UP>(acc, 4 * n + 4), tma_out_pair<GATE_UP>(acc, 4 * n + 6));
      }
      fence_proxy_async();  // the generic-proxy writes, visible to the copy engine
      warpgroup_sync(1 + wg);
      if (tid == 128 + wg * 128) {
#pragma unroll
        for (int j = 0; j < kOut / 64; ++j)
          if (nt * kOut + 64 * j < F) tma_store_2d(&ty, out0 + j * (64 * 128), nt * kOut + 64 * j, xr + wg * 64);
        bulk_commit();
      }
    } else if (rows > 0) {  // the expert's last, partial tile: rows past its end belong to the next expert
      const int f0 = nt * kOut + 2 * tig, rl = wq * 16 + g;
      const bool lo_ok = rl < rows, hi_ok = rl + 8 < rows;
      __nv_bfloat16* out = y + (int64_t)(xr + wg * 64 + rl) * F + f0;
#pragma unroll
      for (int n = 0; n < kOut / 8; ++n) {
        if (f0 + 8 * n < F) {  // F % 8 == 0: both features of the pair are in or out
          if (lo_ok) *reinterpret_cast<uint32_t*>(out + 8 * n) = tma_out_pair<GATE_UP>(acc, 4 * n);
          if (hi_ok) *reinterpret_cast<uint32_t*>(out + 8 * F + 8 * n) = tma_out_pair<GATE_UP>(acc, 4 * n + 2);
        }
      }
    }
  }
  if (tid == 128 + wg * 128) bulk_wait();  // the stores have landed before the CTA (and its shared memory) ends
}

// Down: x [A, K] bf16 rows in expert order, no gather / w_up. Gate+up: x [N, K], gather [A], w = w_gate and w_up,
// y = SwiGLU. w / w_up [E, F, K] (contiguous 16-byte aligned K rows; any expert stride that is a multiple of 8),
// offsets [E+1] (E <= 1024), y [A, F] bf16. The checks of moe_wide_gemm (check_grouped_args), plus: gather and w_up
// together or neither. stages: the ring's slots (below).
void moe_tma_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& gather, const at::Tensor& w,
                  const c10::optional<at::Tensor>& w_up, const at::Tensor& offsets, at::Tensor& y, int64_t stages) {
  check_grouped_args("moe_tma_gemm", x, gather, w, w_up, offsets, y);
  const bool gate_up = w_up.has_value();
  RL_CHECK(gather.has_value() == gate_up,
           "moe_tma_gemm: gather and w_up go together (the gate+up GEMM) or not at all (the down GEMM)");
  const int K = x.size(1), F = w.size(1), E = offsets.numel() - 1;
  RL_CHECK(F % 8 == 0, "moe_tma_gemm: F (w's rows per expert) must be a multiple of 8, got ", F);
  RL_CHECK(E <= kTmaMaxExperts, "moe_tma_gemm: at most ", kTmaMaxExperts, " experts, got ", E);
  RL_CHECK(reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0, "moe_tma_gemm: y must be 16-byte aligned");
  // ring slots: 3, or 4 for gate+up (its output tiles are half the down GEMM's) while the expert table fits beside
  // them (E <= 495); 0: the most that fit
  const bool four_fit = gate_up && TmaSmem<true, 4>::bytes(E) <= kTmaMaxSmem;
  RL_CHECK(stages == 0 || stages == 3 || (stages == 4 && four_fit),
           "moe_tma_gemm: stages must be 0 (the most that fit), 3, or 4 (gate+up with at most 495 experts); got ",
           stages);
  const int64_t A = y.size(0);
  if (A == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  const int out_tile = gate_up ? kTmaBN / 2 : kTmaBN;
  const int64_t wd[3] = {K, F, E}, ws[2] = {w.stride(1), w.stride(0)};
  const uint32_t wb[3] = {64, (uint32_t)out_tile, 1};
  const int64_t yd[2] = {F, A}, ys[1] = {F};
  const uint32_t yb[2] = {64, 64};
  const CUtensorMap tw = bf16_map(w.data_ptr(), 3, wd, ws, wb);
  // the kernel reads tx only for down (gate+up gathers its x rows) and tw2 only for gate+up: tw stands in otherwise
  CUtensorMap tx = tw, tw2 = tw;
  if (gate_up) {
    const int64_t us[2] = {w_up->stride(1), w_up->stride(0)};
    tw2 = bf16_map(w_up->data_ptr(), 3, wd, us, wb);
  } else {
    const int64_t xd[2] = {K, x.size(0)}, xs[1] = {K};
    const uint32_t xb[2] = {64, kTmaBM};
    tx = bf16_map(x.data_ptr(), 2, xd, xs, xb);
  }
  const CUtensorMap ty = bf16_map(y.data_ptr(), 2, yd, ys, yb);
  auto kernel = moe_tma_kernel<false, 3>;
  int smem = TmaSmem<false, 3>::bytes(E);
  if (gate_up && four_fit && stages != 3) {
    kernel = moe_tma_kernel<true, 4>;
    smem = TmaSmem<true, 4>::bytes(E);
  } else if (gate_up) {
    kernel = moe_tma_kernel<true, 3>;
    smem = TmaSmem<true, 3>::bytes(E);
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  // Tiles without a host sync: at most ceil(A / 128) + E x tiles (one partial tile per expert) by the feature tiles.
  const int64_t bound = ((A + kTmaBM - 1) / kTmaBM + E) * ((F + out_tile - 1) / out_tile);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int grid = (int)std::min<int64_t>(sms, bound);
  C10_CUDA_CHECK(launch_dependent(kernel, dim3(grid), kTmaThreads, (size_t)smem, at::cuda::getCurrentCUDAStream(), tx,
                                  tw, tw2, ty, reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
                                  gate_up ? gather->data_ptr<int32_t>() : nullptr, offsets.data_ptr<int32_t>(), E, K,
                                  F, reinterpret_cast<__nv_bfloat16*>(y.data_ptr())));
}

}  // namespace ringlinear
