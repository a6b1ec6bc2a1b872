// Dense projections of a decode step of a few tokens: y[n, m] = sum_k x[n, k] W[m, k] (bf16 in, fp32 accumulation,
// bf16 out), the nn.Linear the runner would call through cuBLAS.
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

// Shapes, dtypes and strides are validated by gemv.py; here only what the kernel relies on.
void dense_gemv(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  RL_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && y.scalar_type() == at::kBFloat16,
           "dense_gemv: x, w and y must be bfloat16");
  RL_CHECK(x.dim() == 2 && w.dim() == 2 && y.dim() == 2, "dense_gemv: x [N, K], w [M, K], y [N, M]");
  const int64_t N = x.size(0), K = x.size(1), M = w.size(0);
  RL_CHECK(N <= kGemvMaxTokens, "dense_gemv: at most ", kGemvMaxTokens, " rows, got ", N);
  RL_CHECK(w.size(1) == K && y.size(0) == N && y.size(1) == M, "dense_gemv: shapes do not match");
  RL_CHECK(K % 8 == 0 && x.stride(1) == 1 && w.stride(1) == 1 && y.stride(1) == 1 && x.stride(0) % 8 == 0 &&
               w.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
               reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
           "dense_gemv: rows of x and w must be 16-byte aligned with unit column stride");
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

}  // namespace ringlinear
