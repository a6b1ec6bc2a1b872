// Weight-streaming grouped GEMM for MoE batches of a few rows per expert (decode batches of ~16..1k tokens), on
// tensor cores: per expert e, Y[rows_e, F] = X[rows_e, K] . W_e[F, K]^T.
//
// The CUTLASS grouped GEMM tiles the token side by 64..128 rows, so with ~2..8 rows per expert it streams each
// expert's weights at ~3 TB/s. Here the roles are swapped ("swap AB"): the weight rows are the MMA's M side (16-row
// tiles, 128 weight rows per CTA) and the expert's tokens the narrow N side (8-row tiles, up to 32 rows per pass), so
// a CTA's work is one pass over its weight slice, streamed through a multi-stage cp.async pipeline with ~100 KB in
// flight per SM; the activations are a few KB per stage and stay in L2.
//
//   moe_stream_kernel<GATE_UP>  GATE_UP: the CTA's 128 weight rows are 64 gate rows and the 64 up rows of the same
//                               features, so each thread holds matching gate/up accumulators and writes
//                               h = bf16(silu(bf16(g)) * bf16(u)) (the grouped path's rounding); x rows are gathered
//                               through `gather` (the sorted row -> token map), so no gathered copy of x is made.
//                               Otherwise: 128 output features, y = bf16(acc).
// Rows are the expert's rows in sorted order (offsets[e] .. offsets[e+1]); each output element is one fp32 dot product
// in a fixed k order, so results do not depend on the batch's other experts.
// Launched as a programmatic dependent (common.cuh). With `early` (the MoE's down GEMM: its offsets come from the sort
// two launches back, before gate/up) a CTA reads its expert's rows and issues its first weight stages before
// griddepcontrol.wait, while gate/up still runs; otherwise it waits first.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"
#include "moe_grouped.h"

namespace ringlinear {

namespace {
constexpr int kStreamThreads = 128;  // 4 warps
constexpr int kStreamBM = 128;       // weight rows per CTA: 4 warps x 2 m16 tiles
constexpr int kStreamBK = 64;        // k per stage: 128 bytes = 8 16-byte chunks per row
constexpr int kStreamRows = 32;      // expert rows per pass: 4 n8 tiles
constexpr int kStreamWTile = kStreamBM * kStreamBK;    // bf16 elements of a stage's weight tile (16 KB)
constexpr int kStreamXTile = kStreamRows * kStreamBK;  // bf16 elements of a stage's activation tile (4 KB)

// Row r's 16-byte chunk c of a [rows][64] bf16 tile, XOR-swizzled so that ldmatrix's 8 rows hit 8 distinct banks.
RL_DEVICE int swz(int r, int c) { return r * kStreamBK + ((c ^ (r & 7)) << 3); }

}  // namespace

// x: [*, K] bf16 rows (row stride K); gather [A] (x row of sorted row p) or null (x row p itself).
// w: expert weights with rows of K contiguous, expert stride sw; GATE_UP: gate rows in w, up rows in w2 (stride sw2).
// offsets [E+1]: sorted-row range of each expert. y: [A, F] bf16 (F = I for GATE_UP).
template <int STAGES, bool GATE_UP>
__global__ void __launch_bounds__(kStreamThreads, 2) moe_stream_kernel(
    const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ gather, const __nv_bfloat16* __restrict__ w,
    int64_t sw, const __nv_bfloat16* __restrict__ w2, int64_t sw2, const int32_t* __restrict__ offsets, int K, int F,
    __nv_bfloat16* __restrict__ y, bool early) {
  extern __shared__ __align__(16) __nv_bfloat16 smem[];
  __nv_bfloat16* ws = smem;                             // [STAGES][kStreamBM * kStreamBK]
  __nv_bfloat16* xs = smem + STAGES * kStreamWTile;     // [STAGES][kStreamRows * kStreamBK]
  const int e = blockIdx.y;
  bool waited = !early;
  if (waited) {
    pdl_wait();  // the offsets (and x) come from the kernel just before this one
    pdl_launch_dependents();
  }
  const int row0 = offsets[e], rows = offsets[e + 1] - row0;
  if (rows <= 0) {
    if (!waited) {
      pdl_wait();
      pdl_launch_dependents();
    }
    return;
  }
  constexpr int kFeatures = GATE_UP ? kStreamBM / 2 : kStreamBM;  // output features per CTA
  const int f0 = blockIdx.x * kFeatures;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const __nv_bfloat16* we = w + (int64_t)e * sw;
  const __nv_bfloat16* we2 = GATE_UP ? w2 + (int64_t)e * sw2 : nullptr;
  const int KT = (K + kStreamBK - 1) / kStreamBK;

  for (int p0 = 0; p0 < rows; p0 += kStreamRows) {  // passes of 32 rows (more than one only for crowded experts)
    const int prow = min(kStreamRows, rows - p0);
    const int nt = (prow + 7) >> 3;  // n8 tiles in use

    // Stage loaders: the 128 x 64 weight tile (8 chunks per thread) and the pass's 32 x 64 activation tile (2 each).
    auto load_w = [&](int slot, int kt) {
      const int k0 = kt * kStreamBK;
      __nv_bfloat16* wt = ws + slot * kStreamWTile;
#pragma unroll
      for (int i = 0; i < kStreamBM * 8 / kStreamThreads; ++i) {
        const int idx = tid + i * kStreamThreads, r = idx >> 3, c = idx & 7;
        const int kc = k0 + c * 8;
        int f;
        const __nv_bfloat16* src;
        if (GATE_UP) {
          f = f0 + (r & 63);
          src = (r < 64 ? we : we2) + (int64_t)min(f, F - 1) * K;
        } else {
          f = f0 + r;
          src = we + (int64_t)min(f, F - 1) * K;
        }
        const bool ok = f < F && kc < K;
        cp_async_16(wt + swz(r, c), ok ? src + kc : we, ok ? 16 : 0);
      }
    };
    auto load_x = [&](int slot, int kt) {
      const int k0 = kt * kStreamBK;
      __nv_bfloat16* xt = xs + slot * kStreamXTile;
#pragma unroll
      for (int i = 0; i < kStreamRows * 8 / kStreamThreads; ++i) {
        const int idx = tid + i * kStreamThreads, r = idx >> 3, c = idx & 7;
        const int kc = k0 + c * 8;
        const bool ok = r < prow && kc < K;
        const int64_t src_row = ok ? (gather ? gather[row0 + p0 + r] : row0 + p0 + r) : 0;
        cp_async_16(xt + swz(r, c), ok ? x + src_row * K + kc : x, ok ? 16 : 0);
      }
    };

    float acc[2][4][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][t][i] = 0.f;

    // The first stages' weights, then (once per CTA, under a dependent launch) the wait, then their activations:
    // the prologue's weight copies all land in the first commit group, which only makes that group larger.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
      if (s < KT) load_w(s, s);
    if (!waited) {
      pdl_wait();  // x (gate/up's h) is the output of the kernel just before this one
      pdl_launch_dependents();
      waited = true;
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < KT) load_x(s, s);
      cp_async_commit();
    }
    // m16 tile j of this warp: smem weight rows mrow[j] .. +15 (GATE_UP: j = 0 gate, j = 1 up, same features).
    const int mrow0 = GATE_UP ? warp * 16 : warp * 32;
    const int mrow1 = GATE_UP ? 64 + warp * 16 : warp * 32 + 16;
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // stage kt is in smem for every thread; the slot read at kt - 1 is free again
      if (kt + STAGES - 1 < KT) {
        load_w((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        load_x((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
      }
      cp_async_commit();
      const __nv_bfloat16* wt = ws + (kt % STAGES) * kStreamWTile;
      const __nv_bfloat16* xt = xs + (kt % STAGES) * kStreamXTile;
#pragma unroll
      for (int kk = 0; kk < kStreamBK / 16; ++kk) {
        uint32_t a[2][4];
        ldmatrix_x4(a[0][0], a[0][1], a[0][2], a[0][3], wt + swz(mrow0 + (lane & 15), kk * 2 + (lane >> 4)));
        ldmatrix_x4(a[1][0], a[1][1], a[1][2], a[1][3], wt + swz(mrow1 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
        for (int t = 0; t < 4; t += 2) {
          if (t >= nt) break;
          // B fragments of n-tiles t and t+1: matrices (t, k0-7), (t, k8-15), (t+1, k0-7), (t+1, k8-15)
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4(b0, b1, b2, b3, xt + swz(t * 8 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            mma_bf16_16816(acc[j][t], a[j][0], a[j][1], a[j][2], a[j][3], b0, b1);
            if (t + 1 < nt) mma_bf16_16816(acc[j][t + 1], a[j][0], a[j][1], a[j][2], a[j][3], b2, b3);
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the smem stages before the next pass reloads them

    // Epilogue. Accumulator i of (j, t): feature row (lane >> 2) + 8 * (i >> 1), token column t*8 + 2*(lane & 3) + (i & 1).
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (t >= nt) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = t * 8 + 2 * (lane & 3) + (i & 1);
        if (r >= prow) continue;
        __nv_bfloat16* out = y + (int64_t)(row0 + p0 + r) * F;
        if (GATE_UP) {
          const int f = f0 + warp * 16 + (lane >> 2) + 8 * (i >> 1);
          if (f < F) out[f] = __float2bfloat16(swiglu_rounded(acc[0][t][i], acc[1][t][i]));
        } else {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int f = f0 + warp * 32 + j * 16 + (lane >> 2) + 8 * (i >> 1);
            if (f < F) out[f] = __float2bfloat16(acc[j][t][i]);
          }
        }
      }
    }
  }
}

template <int STAGES, bool GATE_UP>
static void launch_stream(const at::Tensor& x, const int32_t* gather, const at::Tensor& w, const at::Tensor* w2,
                          const at::Tensor& offsets, int K, int F, at::Tensor& y, bool early, cudaStream_t stream) {
  const int smem = STAGES * (kStreamWTile + kStreamXTile) * 2;
  auto kernel = moe_stream_kernel<STAGES, GATE_UP>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  constexpr int features = GATE_UP ? kStreamBM / 2 : kStreamBM;
  const int E = offsets.numel() - 1;
  auto bf = [](const at::Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()); };
  C10_CUDA_CHECK(launch_dependent(kernel, dim3((F + features - 1) / features, E), kStreamThreads, (size_t)smem, stream,
                                  bf(x), gather, bf(w), w.stride(0), w2 ? bf(*w2) : nullptr, w2 ? w2->stride(0) : 0,
                                  offsets.data_ptr<int32_t>(), K, F, reinterpret_cast<__nv_bfloat16*>(y.data_ptr()),
                                  early));
}

static void check_weights(const char* fn, const at::Tensor& w, int E, int F, int K, const char* name) {
  RL_CHECK(w.dim() == 3 && w.size(0) == E && w.size(1) == F && w.size(2) == K && w.scalar_type() == at::kBFloat16,
              fn, ": ", name, " must be bf16 [", E, ", ", F, ", ", K, "]");
  RL_CHECK(w.stride(2) == 1 && w.stride(1) == K && w.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              fn, ": ", name, " needs contiguous 16-byte aligned [F, K] rows per expert");
}

void check_grouped_args(const char* fn, const at::Tensor& x, const c10::optional<at::Tensor>& gather,
                        const at::Tensor& w, const c10::optional<at::Tensor>& w_up, const at::Tensor& offsets,
                        const at::Tensor& y) {
  RL_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              fn, ": x must be contiguous 16-byte aligned bf16 [R, K]");
  const int K = x.size(1);
  RL_CHECK(K % 8 == 0, fn, ": K must be a multiple of 8");
  RL_CHECK(offsets.dim() == 1 && offsets.numel() >= 2 && offsets.is_contiguous() && offsets.scalar_type() == at::kInt,
              fn, ": offsets must be int32 [E+1]");
  const int E = offsets.numel() - 1;
  RL_CHECK(E <= 65535, fn, ": at most 65535 experts");
  const int F = w.size(1);
  check_weights(fn, w, E, F, K, w_up ? "w_gate" : "w");
  if (w_up) check_weights(fn, *w_up, E, F, K, "w_up");
  const int64_t A = y.size(0);
  RL_CHECK(y.dim() == 2 && y.size(1) == F && y.is_contiguous() && y.scalar_type() == at::kBFloat16,
              fn, ": y must be contiguous bf16 [A, F]");
  if (gather) {
    RL_CHECK(gather->dim() == 1 && gather->numel() == A && gather->is_contiguous() && gather->scalar_type() == at::kInt,
                fn, ": gather must be int32 [A]");
  } else {
    RL_CHECK(x.size(0) == A, fn, ": without gather, x and y must have the same rows");
  }
}

// x [R, K] bf16 contiguous; gather [A] int32 (x row of each sorted row) or none (R == A); w [E, F, K] (gate when w_up
// is given: then y = bf16(silu(x Wg^T) * (x Wu^T)), the SwiGLU of the two); offsets [E+1] int32; y [A, F] bf16.
// stages: 3 or 4 (pipeline depth; 2 CTAs per SM either way). early: offsets were written two launches back or
// earlier (the MoE's down GEMM), so the weights may stream before the dependent-launch wait.
void moe_stream_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& gather, const at::Tensor& w,
                     const c10::optional<at::Tensor>& w_up, const at::Tensor& offsets, at::Tensor& y, int64_t stages,
                     bool early) {
  check_grouped_args("moe_stream_gemm", x, gather, w, w_up, offsets, y);
  const int K = x.size(1), F = w.size(1);
  const int64_t A = y.size(0);
  RL_CHECK(stages == 3 || stages == 4, "moe_stream_gemm: stages must be 3 or 4");
  if (A == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* g = gather ? gather->data_ptr<int32_t>() : nullptr;
  const at::Tensor* up = w_up ? &*w_up : nullptr;
  if (up) {
    if (stages == 3) launch_stream<3, true>(x, g, w, up, offsets, K, F, y, early, stream);
    else launch_stream<4, true>(x, g, w, up, offsets, K, F, y, early, stream);
  } else {
    if (stages == 3) launch_stream<3, false>(x, g, w, nullptr, offsets, K, F, y, early, stream);
    else launch_stream<4, false>(x, g, w, nullptr, offsets, K, F, y, early, stream);
  }
}

}  // namespace ringlinear
