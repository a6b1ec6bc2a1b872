// Sparse MoE pieces for the Ring-linear router and experts (sigmoid scores, expert bias for selection only,
// group-limited top-k), plus the decode-path expert kernels that read only the experts a batch selected.
//
//   moe_route_kernel     one warp per token: scores, group top-2 sums, kept groups, top-k, normalised weights
//   moe_align_kernel     one block: per-expert counts, offsets, assignment indices sorted by expert, active experts
//   moe_gate_up_kernel   per (expert, row tile): h = silu(x Wg^T) * (x Wu^T) for the expert's assignments
//   moe_down_kernel      per (expert, row tile): y[a] = w_a * (h Wd^T), written at the assignment's own row
// Every per-assignment result is computed with one fixed reduction order, so outputs do not depend on how the
// align kernel's atomics ordered assignments inside an expert.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace ringlinear {

// ---------------------------------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------------------------------
constexpr int kRouteWarps = 4;

__global__ void __launch_bounds__(kRouteWarps * 32) moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                                                             int N, int E, int n_group, int topk_group, int topk,
                                                             bool renormalize, float scaling, int32_t* __restrict__ ids,
                                                             float* __restrict__ weights) {
  extern __shared__ float rsm[];
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * kRouteWarps + w;
  if (n >= N) return;
  float* sc = rsm + w * 2 * E;  // sigmoid scores
  float* bs = sc + E;           // biased scores (selection only), masked to -inf as groups/experts drop out
  const float* lg = logits + (int64_t)n * E;
  for (int e = lane; e < E; e += 32) {
    const float p = 1.f / (1.f + expf(-lg[e]));
    sc[e] = p;
    bs[e] = p + (bias != nullptr ? bias[e] : 0.f);
  }
  __syncwarp();
  if (topk_group < n_group) {
    const int gs = E / n_group;
    float gscore = -INFINITY;
    if (lane < n_group) {
      float m1 = -INFINITY, m2 = -INFINITY;
      for (int e = lane * gs; e < (lane + 1) * gs; ++e) {
        const float x = bs[e];
        if (x > m1) { m2 = m1; m1 = x; } else if (x > m2) { m2 = x; }
      }
      gscore = m1 + m2;
    }
    unsigned keep = 0;
    for (int r = 0; r < topk_group; ++r) {
      float bv = (keep >> lane) & 1u ? -INFINITY : gscore;
      int bi = lane < n_group && !((keep >> lane) & 1u) ? lane : 0x7fffffff;
      if (lane >= n_group) bv = -INFINITY;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
      }
      keep |= 1u << bi;
    }
    for (int e = lane; e < E; e += 32)
      if (!((keep >> (e / gs)) & 1u)) bs[e] = -INFINITY;
    __syncwarp();
  }
  float sel_w[32];
  int sel_i[32];
  float sum = 0.f;
  for (int r = 0; r < topk; ++r) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int e = lane; e < E; e += 32) {
      const float x = bs[e];
      if (x > bv || (x == bv && e < bi)) { bv = x; bi = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    bi = min(bi, E - 1);
    __syncwarp();
    if (lane == (bi & 31)) bs[bi] = -INFINITY;
    __syncwarp();
    const float p = sc[bi];
    if (r < 32) { sel_w[r] = p; sel_i[r] = bi; }
    sum += p;
  }
  if (lane == 0) {
    const float norm = renormalize ? scaling / (sum + 1e-20f) : scaling;
    for (int r = 0; r < topk; ++r) {
      ids[(int64_t)n * topk + r] = sel_i[r];
      weights[(int64_t)n * topk + r] = sel_w[r] * norm;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Assignment sort by expert
// ---------------------------------------------------------------------------------------------------------------
constexpr int kMaxExperts = 1024;

// offsets [E+1]: start of each expert's rows in sorted order; sorted [A]: assignment ids grouped by expert;
// active [E+1]: the experts with at least one assignment, their count in active[E] (the expert kernels' grid walks it).
__global__ void __launch_bounds__(1024) moe_align_kernel(const int32_t* __restrict__ ids, int A, int E,
                                                         int32_t* __restrict__ offsets, int32_t* __restrict__ sorted,
                                                         int32_t* __restrict__ active) {
  __shared__ int cnt[kMaxExperts + 1];
  for (int e = threadIdx.x; e <= E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int a = threadIdx.x; a < A; a += blockDim.x) {
    const int e = ids[a];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0, n_active = 0;
    for (int e = 0; e < E; ++e) {
      const int c = cnt[e];
      if (c > 0) active[n_active++] = e;
      cnt[e] = run; offsets[e] = run; run += c;
    }
    offsets[E] = run;
    active[E] = n_active;
  }
  __syncthreads();
  for (int a = threadIdx.x; a < A; a += blockDim.x) {
    const int e = ids[a];
    if (e >= 0 && e < E) sorted[atomicAdd(&cnt[e], 1)] = a;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Decode-path experts: weight-streaming GEMV over the assignments of one expert (MT tokens per pass)
// ---------------------------------------------------------------------------------------------------------------
constexpr int kMoeWarps = 8;
constexpr int kMoeMT = 8;          // assignments per pass (activations held in shared memory)
constexpr int kGateUpRowsPerWarp = 2;
constexpr int kDownRowsPerWarp = 4;

RL_DEVICE void dot8_acc(float& acc, const uint4& w, const uint4& x) {
  const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&w);
  const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 a = __bfloat1622float2(wp[e]);
    const float2 b = __bfloat1622float2(xp[e]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

// x: [N, Dm] bf16; wg, wu: [E, I, Dm]; h: [A, I] bf16 (row = sorted position). grid.y walks the active experts.
// Each lane issues the loads of all its rows for one 16-byte column step before any arithmetic (bytes in flight).
__global__ void __launch_bounds__(kMoeWarps * 32) moe_gate_up_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ wg,
                                                             const __nv_bfloat16* __restrict__ wu, const int32_t* __restrict__ offsets,
                                                             const int32_t* __restrict__ sorted, const int32_t* __restrict__ active,
                                                             int E, int topk, int Dm, int I, __nv_bfloat16* __restrict__ h) {
  extern __shared__ __align__(16) __nv_bfloat16 xs[];  // [kMoeMT, Dm]
  if ((int)blockIdx.y >= active[E]) return;
  const int e = active[blockIdx.y];
  const int p0 = offsets[e], p1 = offsets[e + 1];
  constexpr int R = kGateUpRowsPerWarp;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kMoeWarps + w) * R;
  const __nv_bfloat16* Wg = wg + (int64_t)e * I * Dm;
  const __nv_bfloat16* Wu = wu + (int64_t)e * I * Dm;
  const uint4* g4[R];
  const uint4* u4[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int row = min(row0 + rr, I - 1);  // rows past I compute a duplicate and store nothing
    g4[rr] = reinterpret_cast<const uint4*>(Wg + (int64_t)row * Dm);
    u4[rr] = reinterpret_cast<const uint4*>(Wu + (int64_t)row * Dm);
  }
  for (int pb = p0; pb < p1; pb += kMoeMT) {
    const int m = min(kMoeMT, p1 - pb);
    __syncthreads();
    for (int idx = threadIdx.x; idx < m * (Dm / 8); idx += blockDim.x) {
      const int r = idx / (Dm / 8), c = idx % (Dm / 8);
      const int tok = sorted[pb + r] / topk;
      reinterpret_cast<uint4*>(xs)[idx] = reinterpret_cast<const uint4*>(x + (int64_t)tok * Dm)[c];
    }
    __syncthreads();
    float ga[R][kMoeMT], ua[R][kMoeMT];
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
      for (int t = 0; t < kMoeMT; ++t) ga[rr][t] = ua[rr][t] = 0.f;
#pragma unroll 2
    for (int c = lane; c < Dm / 8; c += 32) {
      uint4 gv[R], uv[R];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) { gv[rr] = __ldg(g4[rr] + c); uv[rr] = __ldg(u4[rr] + c); }
#pragma unroll
      for (int t = 0; t < kMoeMT; ++t) {
        if (t < m) {
          const uint4 xv = reinterpret_cast<const uint4*>(xs + t * Dm)[c];
#pragma unroll
          for (int rr = 0; rr < R; ++rr) { dot8_acc(ga[rr][t], gv[rr], xv); dot8_acc(ua[rr][t], uv[rr], xv); }
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
#pragma unroll
      for (int t = 0; t < kMoeMT; ++t) {
        if (t < m) {
          const float gsum = warp_sum(ga[rr][t]), usum = warp_sum(ua[rr][t]);
          if (lane == 0 && row0 + rr < I)
            h[(int64_t)(pb + t) * I + row0 + rr] = __float2bfloat16(gsum / (1.f + expf(-gsum)) * usum);
        }
      }
    }
  }
}

// h: [A, I] bf16 (sorted rows); wd: [E, Dm, I]; y: [A, Dm] fp32 indexed by assignment id a = token * topk + j.
__global__ void __launch_bounds__(kMoeWarps * 32) moe_down_kernel(const __nv_bfloat16* __restrict__ h, const __nv_bfloat16* __restrict__ wd,
                                                          const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted,
                                                          const int32_t* __restrict__ active, int E, const float* __restrict__ weights,
                                                          int Dm, int I, float* __restrict__ y) {
  extern __shared__ __align__(16) __nv_bfloat16 hs[];  // [kMoeMT, I]
  if ((int)blockIdx.y >= active[E]) return;
  const int e = active[blockIdx.y];
  const int p0 = offsets[e], p1 = offsets[e + 1];
  constexpr int R = kDownRowsPerWarp;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kMoeWarps + w) * R;
  const __nv_bfloat16* W = wd + (int64_t)e * Dm * I;
  const uint4* w4[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) w4[rr] = reinterpret_cast<const uint4*>(W + (int64_t)min(row0 + rr, Dm - 1) * I);
  for (int pb = p0; pb < p1; pb += kMoeMT) {
    const int m = min(kMoeMT, p1 - pb);
    __syncthreads();
    for (int idx = threadIdx.x; idx < m * (I / 8); idx += blockDim.x)
      reinterpret_cast<uint4*>(hs)[idx] = reinterpret_cast<const uint4*>(h + (int64_t)pb * I)[idx];
    __syncthreads();
    float acc[R][kMoeMT];
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
      for (int t = 0; t < kMoeMT; ++t) acc[rr][t] = 0.f;
#pragma unroll 2
    for (int c = lane; c < I / 8; c += 32) {
      uint4 wv[R];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) wv[rr] = __ldg(w4[rr] + c);
#pragma unroll
      for (int t = 0; t < kMoeMT; ++t) {
        if (t < m) {
          const uint4 hv = reinterpret_cast<const uint4*>(hs + t * I)[c];
#pragma unroll
          for (int rr = 0; rr < R; ++rr) dot8_acc(acc[rr][t], wv[rr], hv);
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
#pragma unroll
      for (int t = 0; t < kMoeMT; ++t) {
        if (t < m) {
          const float s = warp_sum(acc[rr][t]);
          if (lane == 0 && row0 + rr < Dm) {
            const int a = sorted[pb + t];
            y[(int64_t)a * Dm + row0 + rr] = s * weights[a];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host entry points
// ---------------------------------------------------------------------------------------------------------------
void moe_route(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
               int64_t topk, bool renormalize, double scaling, at::Tensor& ids, at::Tensor& weights) {
  TORCH_CHECK(logits.is_contiguous() && logits.scalar_type() == at::kFloat, "moe_route: logits must be contiguous fp32");
  const int N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(topk >= 1 && topk <= 32, "moe_route: top-k must be in 1..32");
  TORCH_CHECK(n_group >= 1 && n_group <= 32 && E % n_group == 0, "moe_route: n_group must divide the experts and be <= 32");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(logits.device());
  const size_t smem = (size_t)kRouteWarps * 2 * E * sizeof(float);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(moe_route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  moe_route_kernel<<<(N + kRouteWarps - 1) / kRouteWarps, kRouteWarps * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, N, E, (int)n_group, (int)topk_group, (int)topk,
      renormalize, (float)scaling, ids.data_ptr<int32_t>(), weights.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moe_align(const at::Tensor& ids, int64_t E, at::Tensor& offsets, at::Tensor& sorted, at::Tensor& active) {
  TORCH_CHECK(ids.is_contiguous() && ids.scalar_type() == at::kInt, "moe_align: ids must be contiguous int32");
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "moe_align: at most ", kMaxExperts, " experts");
  const at::cuda::CUDAGuard guard(ids.device());
  moe_align_kernel<<<1, 1024, 0, at::cuda::getCurrentCUDAStream()>>>(ids.data_ptr<int32_t>(), ids.numel(), (int)E,
                                                                      offsets.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(),
                                                                      active.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moe_experts_decode(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
                        const at::Tensor& offsets, const at::Tensor& sorted, const at::Tensor& active,
                        const at::Tensor& weights, int64_t topk, at::Tensor& h, at::Tensor& y) {
  const int E = wg.size(0), I = wg.size(1), Dm = wg.size(2);
  const int grid_e = (int)std::min<int64_t>(E, sorted.numel());  // distinct experts can not exceed assignments
  TORCH_CHECK(Dm % 8 == 0 && I % 8 == 0, "moe_experts_decode: hidden and expert sizes must be multiples of 8");
  if (sorted.numel() == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  auto bf = [](const at::Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()); };
  const int smem1 = kMoeMT * Dm * 2, smem2 = kMoeMT * I * 2;
  if (smem1 > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(moe_gate_up_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem1));
  if (smem2 > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(moe_down_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem2));
  const int rows1 = kMoeWarps * kGateUpRowsPerWarp, rows2 = kMoeWarps * kDownRowsPerWarp;
  moe_gate_up_kernel<<<dim3((I + rows1 - 1) / rows1, grid_e), kMoeWarps * 32, smem1, stream>>>(
      bf(x), bf(wg), bf(wu), offsets.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(), active.data_ptr<int32_t>(), E,
      (int)topk, Dm, I,
      reinterpret_cast<__nv_bfloat16*>(h.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  moe_down_kernel<<<dim3((Dm + rows2 - 1) / rows2, grid_e), kMoeWarps * 32, smem2, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(h.data_ptr()), bf(wd), offsets.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(),
      active.data_ptr<int32_t>(), E, weights.data_ptr<float>(), Dm, I, y.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ringlinear
