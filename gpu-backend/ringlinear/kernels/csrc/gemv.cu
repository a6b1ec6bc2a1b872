// Dense projections of a decode step of a few tokens: y[n, m] = sum_k x[n, k] W[m, k] (bf16 in, fp32 accumulation,
// bf16 out), the nn.Linear the runner would call through cuBLAS. dense_gemv takes one row, skinny_gemm (below) two to
// eight.
//
// At one token a projection is a weight stream (8-644 MB for Ring-mini) and cuBLAS's GEMV already runs near its
// latency (docs/benchmarks.md, eleventh session). What it cannot do is start early: launched as a programmatic
// dependent (common.cuh), this kernel issues each warp's first weight loads before griddepcontrol.wait, while the norm
// or gate kernel before it still runs, and only then stages x. One warp per output row, a block per 8 rows: each lane
// keeps kGemvChunks 16-byte chunks of its row in flight (a whole 2 048-wide row at once), the x rows sit in shared
// memory. (A grid of resident blocks whose warps walk rows with the next row's loads double-buffered measured slower
// on the H200: 102 registers, half the blocks per SM, half the bytes in flight - lm_head 195 vs 147 us.) The router's
// GEMV in moe.cu has the same loop; one helper for both, taking the staged rows through a pointer or a lambda, made
// nvcc compute generic 64-bit addresses per shared load and measured 0.3-1 us slower per projection, so each keeps
// its own.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace ringlinear {

constexpr int kGemvWarps = 8;
constexpr int kGemvChunks = 8;     // 16-byte chunks per lane in flight: 32 x 8 x 8 = 2 048 bf16 of a row
constexpr int kGemvMaxTokens = 4;  // accumulators per lane

// x [N, K] (row stride x_ld), W [M, K] (row stride w_ld), y [N, M] (row stride y_ld); K % 8 == 0, strides % 8 == 0.
__global__ void __launch_bounds__(kGemvWarps * 32) dense_gemv_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_ld,
                                                                     const __nv_bfloat16* __restrict__ W, int64_t w_ld,
                                                                     int N, int M, int K, __nv_bfloat16* __restrict__ y,
                                                                     int64_t y_ld) {
  extern __shared__ uint4 xs[];  // [N, K / 8]
  const int lane = threadIdx.x & 31, m = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const int K8 = K / 8;
  const uint4* row = reinterpret_cast<const uint4*>(W + (int64_t)min(m, M - 1) * w_ld);  // rows past M: no store
  uint4 wv[kGemvChunks];
  auto load = [&](int base) {
#pragma unroll
    for (int i = 0; i < kGemvChunks; ++i) {
      const int c = base + lane + 32 * i;
      wv[i] = c < K8 ? __ldg(row + c) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load(0);     // the weights: no kernel of the step writes them
  pdl_wait();  // x is the output of the kernel just before this one
  pdl_launch_dependents();
  for (int i = threadIdx.x; i < N * K8; i += blockDim.x) {
    const int n = i / K8, c = i - n * K8;
    xs[i] = reinterpret_cast<const uint4*>(x + (int64_t)n * x_ld)[c];
  }
  __syncthreads();
  float acc[kGemvMaxTokens] = {0.f, 0.f, 0.f, 0.f};
  for (int base = 0; base < K8; base += 32 * kGemvChunks) {
    if (base > 0) load(base);
#pragma unroll
    for (int i = 0; i < kGemvChunks; ++i) {
      const int c = base + lane + 32 * i;
      if (c < K8) {
#pragma unroll
        for (int n = 0; n < kGemvMaxTokens; ++n)
          if (n < N) dot8_acc(acc[n], wv[i], xs[n * K8 + c]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < kGemvMaxTokens; ++n) {
    if (n < N) {
      const float v = warp_sum(acc[n]);
      if (lane == 0 && m < M) y[(int64_t)n * y_ld + m] = __float2bfloat16(v);
    }
  }
}

// Two to eight rows: the weights as the 16-row A operand of mma.sync m16n8k16 and the x rows as its n = 8 columns
// ("swap AB"), so a 16-byte weight load feeds a tensor-core instruction instead of 8 FMAs per row of x, whatever the
// row count. Each lane loads 16 consecutive bytes of weight rows g and g + 8 and of x row g (g = lane / 4, t = lane
// % 4: columns 8t .. 8t + 7 of a 32-wide block); the mma's k order is permuted so these are exactly its fragments
// (A: rows g / g + 8, k 2t, 2t + 1 and 2t + 8, 2t + 9; B: column g, the same k) - a dot product does not care in
// which order its k run, as long as both operands use the same one. A warp owns 16 output rows and a 1 / KSPLIT slice
// of K; the KSPLIT warps of a row group add their partial sums through shared memory.
constexpr int kMmaWarps = 8;
constexpr int kMmaTokens = 8;  // the mma's n
constexpr int kMmaSteps = 8;   // 32-wide k blocks per lane in flight: 16 16-byte weight loads

template <int KSPLIT, typename OutT>
__global__ void __launch_bounds__(kMmaWarps * 32) skinny_gemm_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_ld,
                                                                     const __nv_bfloat16* __restrict__ W, int64_t w_ld,
                                                                     int N, int M, int K, OutT* __restrict__ y,
                                                                     int64_t y_ld) {
  __shared__ float4 partial[KSPLIT > 1 ? kMmaWarps : 1][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rg = blockIdx.x * (kMmaWarps / KSPLIT) + warp / KSPLIT, ks = warp % KSPLIT;
  const int K8 = K / 8, blocks = (K8 + 3) / 4, per = (blocks + KSPLIT - 1) / KSPLIT;
  const int kb0 = ks * per, kb1 = min(blocks, kb0 + per);
  // rows past M load row M - 1 and store nothing
  const uint4* w0 = reinterpret_cast<const uint4*>(W + (int64_t)min(16 * rg + g, M - 1) * w_ld);
  const uint4* w1 = reinterpret_cast<const uint4*>(W + (int64_t)min(16 * rg + g + 8, M - 1) * w_ld);
  uint4 a[kMmaSteps], b[kMmaSteps];
  auto load = [&](int kb) {
#pragma unroll
    for (int i = 0; i < kMmaSteps; ++i) {
      const int c = 4 * (kb + i) + t;
      const bool in = kb + i < kb1 && c < K8;
      a[i] = in ? __ldg(w0 + c) : make_uint4(0u, 0u, 0u, 0u);
      b[i] = in ? __ldg(w1 + c) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load(kb0);   // the weights: no kernel of the step writes them
  pdl_wait();  // x is the output of the kernel just before this one
  pdl_launch_dependents();
  const uint4* xr = reinterpret_cast<const uint4*>(x + (int64_t)min(g, N - 1) * x_ld);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int kb = kb0; kb < kb1; kb += kMmaSteps) {
    if (kb > kb0) load(kb);
    uint4 xv[kMmaSteps];
#pragma unroll
    for (int i = 0; i < kMmaSteps; ++i) {
      const int c = 4 * (kb + i) + t;
      xv[i] = g < N && kb + i < kb1 && c < K8 ? xr[c] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < kMmaSteps; ++i) {
      mma_bf16_16816(acc, a[i].x, b[i].x, a[i].y, b[i].y, xv[i].x, xv[i].y);
      mma_bf16_16816(acc, a[i].z, b[i].z, a[i].w, b[i].w, xv[i].z, xv[i].w);
    }
  }
  if constexpr (KSPLIT > 1) {
    partial[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    __syncthreads();
    if (ks != 0) return;
#pragma unroll
    for (int j = 1; j < KSPLIT; ++j) {
      const float4 p = partial[warp + j][lane];
      acc[0] += p.x, acc[1] += p.y, acc[2] += p.z, acc[3] += p.w;
    }
  }
  // acc: (row g, x rows 2t and 2t + 1), then the same for row g + 8
  const int m0 = 16 * rg + g, n0 = 2 * t;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + 8 * (i >> 1), n = n0 + (i & 1);
    if (m < M && n < N) y[(int64_t)n * y_ld + m] = from_float<OutT>(acc[i]);
  }
}

// The K split: 4 warps per row group. Measured on the H200 at Ring-mini's six projections, 1 to 8 rows, launched as
// dependents (bench/gpu_kernels.py --only gemv sweeps 1, 2, 4 and 8): 4 was the fastest at every shape, the lm_head's
// 157 184 rows included (152 vs 162 us at 1 row with no split, at 8 rows 154 vs 163), and 8 the second at most.
constexpr int kMmaDefaultKSplit = 4;

// Shapes, dtypes and strides are validated by gemv.py; here only what the kernels rely on. Both entry points:
// x [N <= max_rows, K], w [M, K], y [N, M], rows of x and w 16-byte vectors.
static void check_rows(const char* fn, const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, int max_rows) {
  RL_CHECK(x.dim() == 2 && w.dim() == 2 && y.dim() == 2, fn, ": x [N, K], w [M, K], y [N, M]");
  RL_CHECK(x.size(0) <= max_rows, fn, ": at most ", max_rows, " rows, got ", x.size(0));
  RL_CHECK(w.size(1) == x.size(1) && y.size(0) == x.size(0) && y.size(1) == w.size(0), fn, ": shapes do not match");
  RL_CHECK(x.size(1) % 8 == 0 && x.stride(1) == 1 && w.stride(1) == 1 && y.stride(1) == 1 && x.stride(0) % 8 == 0 &&
               w.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
               reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
           fn, ": rows of x and w must be 16-byte aligned with unit column stride");
}

void dense_gemv(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  RL_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && y.scalar_type() == at::kBFloat16,
           "dense_gemv: x, w and y must be bfloat16");
  check_rows("dense_gemv", x, w, y, kGemvMaxTokens);
  const int64_t N = x.size(0), K = x.size(1), M = w.size(0);
  RL_CHECK(N * K * 2 <= 96 * 1024, "dense_gemv: the x rows must fit in 96 KB of shared memory");
  if (N == 0 || M == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  const int smem = (int)(N * K * 2);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(dense_gemv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  C10_CUDA_CHECK(launch_dependent(dense_gemv_kernel, (unsigned)((M + kGemvWarps - 1) / kGemvWarps), kGemvWarps * 32,
                                  (size_t)smem, at::cuda::getCurrentCUDAStream(),
                                  reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), x.stride(0),
                                  reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()), w.stride(0), (int)N, (int)M,
                                  (int)K, reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), y.stride(0)));
}

template <typename OutT>
static void launch_skinny(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, int ks) {
  const int64_t N = x.size(0), K = x.size(1), M = w.size(0);
  const unsigned grid = (unsigned)(((M + 15) / 16 * ks + kMmaWarps - 1) / kMmaWarps);
  auto kernel = ks == 1 ? skinny_gemm_kernel<1, OutT> : ks == 2 ? skinny_gemm_kernel<2, OutT>
              : ks == 4 ? skinny_gemm_kernel<4, OutT> : skinny_gemm_kernel<8, OutT>;
  C10_CUDA_CHECK(launch_dependent(kernel, grid, kMmaWarps * 32, 0, at::cuda::getCurrentCUDAStream(),
                                  reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), x.stride(0),
                                  reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()), w.stride(0), (int)N, (int)M,
                                  (int)K, reinterpret_cast<OutT*>(y.data_ptr()), y.stride(0)));
}

// y: bf16, or fp32 (the MoE router's logits: bf16 products are exact in fp32, so these are the fp32 GEMM's up to the
// order of the sums).
void skinny_gemm(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, int64_t ksplit) {
  RL_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
               (y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kFloat),
           "skinny_gemm: x and w must be bfloat16, y bfloat16 or float32");
  check_rows("skinny_gemm", x, w, y, kMmaTokens);
  const int64_t N = x.size(0), M = w.size(0);
  RL_CHECK(ksplit == 0 || ksplit == 1 || ksplit == 2 || ksplit == 4 || ksplit == 8,
           "skinny_gemm: ksplit must be 0 (the default, 4), 1, 2, 4 or 8, got ", ksplit);
  if (N == 0 || M == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  const int ks = ksplit ? (int)ksplit : kMmaDefaultKSplit;
  if (y.scalar_type() == at::kFloat) launch_skinny<float>(x, w, y, ks);
  else launch_skinny<__nv_bfloat16>(x, w, y, ks);
}

}  // namespace ringlinear
