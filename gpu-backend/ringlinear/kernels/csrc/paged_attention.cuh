// Paged-KV GQA decode attention (flash-decoding with split-K), reading the pod's paged cache in place.
//   o[b, h] = softmax(scale * q[b, h] . K_b^T) V_b,   K_b / V_b = the len_b keys of request b, found through its
//   block table: position p lives at cache row table[b, p / bs] * bs + p % bs; cache rows are [rows, Hkv, D].
//
// Pass 1 (paged_decode_split_kernel): one CTA per (split, KV head, request) owns a contiguous range of keys and all
// REP query heads of its KV head, so every K/V row is read once per KV head. Lanes form groups of G = D / E lanes;
// a group owns one key at a time (lane = E consecutive dims, one 16/8/4-byte load per row), each thread issues the
// K and V loads of U keys before using any of them. Scores are reduced inside the group with shuffles, the online
// softmax (running max in the log2 domain, exp2f, fp32 sum and accumulator) runs per group and the groups are folded
// in shared memory at the end. With a single split the CTA writes the normalised output directly; otherwise it
// writes an unnormalised partial (m, l, acc) and pass 2 (paged_decode_combine_kernel) folds the splits.
//
// CUDA cores, not tensor cores: per key the CTA does REP*D FMAs for q.k and REP*D for p.v against 2*D*sizeof(T)
// bytes, i.e. 2 FMA/byte at REP=4 bf16 - well under the SM's FMA/byte ratio, so the kernel stays memory-bound.
// lengths / tables are only read on the device and nothing is allocated: capturable in a CUDA graph.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <type_traits>

#include "common.cuh"

namespace ringlinear {

constexpr int kPagedThreads = 128;  // 4 warps per CTA
constexpr int kPagedWarps = kPagedThreads / 32;
constexpr int kRowChunk = 512;  // keys whose cache rows are staged in shared memory at a time
constexpr float kLog2e = 1.4426950408889634f;

struct PagedArgs {
  const void* q; int64_t q_sb, q_sh;         // [B, H, D], last dim contiguous
  const void* k; const void* v;              // [rows, Hkv, D] contiguous
  int64_t num_blocks;                        // rows / bs: table entries outside [0, num_blocks) give NaN
  const void* table; int64_t t_sb, t_sj;     // [B, max_blocks] int32 or int64
  const void* lengths;                       // [B] int32 or int64
  bool table64, len64;
  int bs;                                    // block size (keys per cache block)
  int cap;                                   // lengths are clamped to [0, cap] (cap = min(max_len, max_blocks * bs))
  int split_len;                             // keys per split, a multiple of bs
  int num_splits;
  int H, Hkv;
  float scale_log2;                          // scale * log2(e): scores live in the log2 domain
  void* out;                                 // [B, H, D] contiguous, q's dtype
  float* ws_acc;                             // [B, H, S, D] unnormalised partial outputs (num_splits > 1)
  float* ws_ml;                              // [B, H, S, 2] partial (max, sum)
};

RL_DEVICE int load_length(const PagedArgs& a, int b) {
  const int64_t n = a.len64 ? static_cast<const int64_t*>(a.lengths)[b] : static_cast<const int32_t*>(a.lengths)[b];
  return n <= 0 ? 0 : (n >= a.cap ? a.cap : static_cast<int>(n));
}

// E elements of T as raw 32-bit words: one vector load per key row.
template <typename T, int E> struct RawVec {
  static constexpr int kBytes = E * static_cast<int>(sizeof(T));
  static constexpr int kWords = kBytes / 4;
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "row slice must be 4, 8 or 16 bytes");
  uint32_t w[kWords];

  RL_DEVICE void load(const T* p) {
    if constexpr (kBytes == 16) {
      const uint4 x = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
    } else if constexpr (kBytes == 8) {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = x.x; w[1] = x.y;
    } else {
      w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    }
  }
  RL_DEVICE void fill(uint32_t x) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = x;
  }
  RL_DEVICE void to_float(float (&f)[E]) const {
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      if constexpr (sizeof(T) == 4) {
        f[i] = __uint_as_float(w[i]);
      } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        f[2 * i] = __uint_as_float(w[i] << 16);  // bf16 -> fp32 is a shift
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else {
        __half2 h;
        memcpy(&h, &w[i], 4);
        const float2 x = __half22float2(h);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
      }
    }
  }
};

// NaN bit pattern for every T (a corrupt table entry poisons its row's output instead of reading out of bounds).
template <typename T> RL_DEVICE uint32_t nan_word() {
  if constexpr (sizeof(T) == 4) return 0x7fc00000u;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 0x7fc07fc0u;
  else return 0x7e007e00u;
}

template <typename T, int D, int REP, int E> struct PagedConfig {
  static constexpr int G = D / E;                // lanes per key
  static constexpr int KPW = 32 / G;             // keys per warp step
  static constexpr int NG = kPagedWarps * KPW;   // key groups per CTA
  static constexpr int U = REP * E >= 64 ? 2 : 4;  // keys per group per tile (loads in flight per thread: 2U)
  static constexpr int TILE = NG * U;
  static_assert(G >= 1 && G <= 32 && 32 % G == 0, "bad lane grouping");
  static_assert(kRowChunk % TILE == 0, "row chunk must hold whole tiles");
};

template <typename T, int D, int REP, int E>
__global__ void __launch_bounds__(kPagedThreads) paged_decode_split_kernel(PagedArgs a) {
  using C = PagedConfig<T, D, REP, E>;
  constexpr int G = C::G, NG = C::NG, U = C::U;
  __shared__ int s_rows[kRowChunk];
  __shared__ __align__(16) float s_acc[NG][REP][D];
  __shared__ float s_m[NG][REP], s_l[NG][REP];

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const int gi = tid / G;                // key group of this thread (groups never straddle warps)
  const int dim0 = (tid % G) * E;        // first of this lane's E dims
  pdl_wait();  // q and the step's own k / v row come from the prologue just before this kernel (common.cuh)
  pdl_launch_dependents();
  const int len = load_length(a, b);
  const int k0 = split * a.split_len;
  const bool direct = a.num_splits == 1;

  if (k0 >= len) {  // nothing to read; the combine pass skips this split (or writes zeros for a padding row)
    if (direct) {
      T* o = static_cast<T*>(a.out) + ((int64_t)b * a.H + kvh * REP) * D;
      for (int i = tid; i < REP * D; i += kPagedThreads) o[i] = from_float<T>(0.f);
    }
    return;
  }
  const int kend = min(k0 + a.split_len, len);

  float q[REP][E];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    RawVec<T, E> raw;
    raw.load(static_cast<const T*>(a.q) + b * a.q_sb + (int64_t)(kvh * REP + r) * a.q_sh + dim0);
    raw.to_float(q[r]);
#pragma unroll
    for (int e = 0; e < E; ++e) q[r][e] *= a.scale_log2;
  }

  float m[REP], l[REP], acc[REP][E];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] = 0.f;
  }

  const T* kbase = static_cast<const T*>(a.k) + (int64_t)kvh * D + dim0;
  const T* vbase = static_cast<const T*>(a.v) + (int64_t)kvh * D + dim0;
  const int64_t row_stride = (int64_t)a.Hkv * D;

  for (int c0 = k0; c0 < kend; c0 += kRowChunk) {
    const int cend = min(c0 + kRowChunk, kend);
    __syncthreads();  // the previous chunk's rows are no longer in use
    for (int i = tid; i < cend - c0; i += kPagedThreads) {
      const int p = c0 + i;
      const int j = p / a.bs;
      const int64_t blk = a.table64 ? static_cast<const int64_t*>(a.table)[b * a.t_sb + j * a.t_sj]
                                    : static_cast<const int32_t*>(a.table)[b * a.t_sb + j * a.t_sj];
      s_rows[i] = (blk >= 0 && blk < a.num_blocks) ? (int)(blk * a.bs + (p - j * a.bs)) : -1;
    }
    __syncthreads();

    for (int t0 = c0; t0 < cend; t0 += C::TILE) {
      RawVec<T, E> kr[U], vr[U];
      bool valid[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int p = t0 + u * NG + gi;
        valid[u] = p < cend;
        const int row = valid[u] ? s_rows[p - c0] : -1;
        if (row >= 0) {
          kr[u].load(kbase + row * row_stride);
          vr[u].load(vbase + row * row_stride);
        } else {
          kr[u].fill(valid[u] ? nan_word<T>() : 0u);
          vr[u].fill(valid[u] ? nan_word<T>() : 0u);
        }
      }

      float s[REP][U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kf[E];
        kr[u].to_float(kf);
#pragma unroll
        for (int r = 0; r < REP; ++r) {
          float x = 0.f;
#pragma unroll
          for (int e = 0; e < E; ++e) x = fmaf(q[r][e], kf[e], x);
          s[r][u] = x;
        }
      }
      // Sum over the G lanes of each group (xor offsets below G stay inside the group).
#pragma unroll
      for (int o = G / 2; o > 0; o >>= 1) {
#pragma unroll
        for (int r = 0; r < REP; ++r)
#pragma unroll
          for (int u = 0; u < U; ++u) s[r][u] += __shfl_xor_sync(0xffffffffu, s[r][u], o);
      }

      float p[REP][U];
#pragma unroll
      for (int r = 0; r < REP; ++r) {
        float mt = m[r];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!valid[u]) s[r][u] = -INFINITY;
          mt = fmaxf(mt, s[r][u]);
        }
        const float mu = mt == -INFINITY ? 0.f : mt;  // no valid key yet: keep every exponent at exp2(-inf) = 0
        const float corr = exp2f(m[r] - mu);
        m[r] = mt;
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          p[r][u] = exp2f(s[r][u] - mu);
          sum += p[r][u];
        }
        l[r] = l[r] * corr + sum;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] *= corr;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float vf[E];
        vr[u].to_float(vf);
#pragma unroll
        for (int r = 0; r < REP; ++r)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[r][e] = fmaf(p[r][u], vf[e], acc[r][e]);
      }
    }
  }

  // Fold the NG groups of the CTA.
#pragma unroll
  for (int r = 0; r < REP; ++r) {
#pragma unroll
    for (int e = 0; e < E; ++e) s_acc[gi][r][dim0 + e] = acc[r][e];
    if (tid % G == 0) {
      s_m[gi][r] = m[r];
      s_l[gi][r] = l[r];
    }
  }
  __syncthreads();
  for (int i = tid; i < REP * D; i += kPagedThreads) {
    const int r = i / D, dim = i % D;
    float M = -INFINITY;
#pragma unroll
    for (int g = 0; g < NG; ++g) M = fmaxf(M, s_m[g][r]);
    // M is finite: the split holds at least one valid key (a NaN row makes everything NaN, as intended).
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      const float w = exp2f(s_m[g][r] - M);  // a group without valid keys has m = -inf: weight 0
      L = fmaf(s_l[g][r], w, L);
      A = fmaf(s_acc[g][r][dim], w, A);
    }
    const int h = kvh * REP + r;
    if (direct) {
      static_cast<T*>(a.out)[((int64_t)b * a.H + h) * D + dim] = from_float<T>(A / L);
    } else {
      const int64_t slot = ((int64_t)b * a.H + h) * a.num_splits + split;
      a.ws_acc[slot * D + dim] = A;
      if (dim == 0) {
        a.ws_ml[slot * 2] = M;
        a.ws_ml[slot * 2 + 1] = L;
      }
    }
  }
}

RL_DEVICE float paged_warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Pass 2: one CTA per (query head, request) folds the splits that hold keys of the request. A long row at B=1 has
// ~num_SMs splits, so the CTA reads them in parallel: SR split rows at a time, D/4 threads (a float4 each) per row.
constexpr int kCombineThreads = 256;

template <typename T, int D>
__global__ void __launch_bounds__(kCombineThreads) paged_decode_combine_kernel(PagedArgs a) {
  constexpr int DG = D / 4;                 // threads per split row
  constexpr int SR = kCombineThreads / DG;  // split rows in flight
  __shared__ float s_max[kCombineThreads / 32];
  __shared__ __align__(16) float s_acc[SR][D];
  __shared__ float s_l[SR];
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  pdl_wait();  // the split pass just before this kernel
  pdl_launch_dependents();
  const int len = load_length(a, b);
  T* o = static_cast<T*>(a.out) + ((int64_t)b * a.H + h) * D;
  if (len == 0) {
    for (int i = tid; i < D; i += kCombineThreads) o[i] = from_float<T>(0.f);
    return;
  }
  const int n = min((len + a.split_len - 1) / a.split_len, a.num_splits);  // splits that hold keys
  const int64_t base = ((int64_t)b * a.H + h) * a.num_splits;
  const float* ml = a.ws_ml + base * 2;

  float M = -INFINITY;
  for (int s = tid; s < n; s += kCombineThreads) M = fmaxf(M, ml[2 * s]);
  M = paged_warp_max(M);
  if ((tid & 31) == 0) s_max[tid >> 5] = M;
  __syncthreads();
  M = s_max[0];
#pragma unroll
  for (int w = 1; w < kCombineThreads / 32; ++w) M = fmaxf(M, s_max[w]);

  const int row = tid / DG, c4 = tid % DG;
  const float4* acc = reinterpret_cast<const float4*>(a.ws_acc + base * D) + c4;
  float4 A = make_float4(0.f, 0.f, 0.f, 0.f);
  float L = 0.f;
#pragma unroll 4
  for (int s = row; s < n; s += SR) {
    const float w = exp2f(ml[2 * s] - M);
    const float4 x = acc[(int64_t)s * DG];
    L = fmaf(ml[2 * s + 1], w, L);
    A.x = fmaf(x.x, w, A.x); A.y = fmaf(x.y, w, A.y);
    A.z = fmaf(x.z, w, A.z); A.w = fmaf(x.w, w, A.w);
  }
  reinterpret_cast<float4*>(s_acc[row])[c4] = A;
  if (c4 == 0) s_l[row] = L;
  __syncthreads();
  for (int i = tid; i < D; i += kCombineThreads) {
    float sa = 0.f, sl = 0.f;
#pragma unroll
    for (int r = 0; r < SR; ++r) {
      sa += s_acc[r][i];
      sl += s_l[r];
    }
    o[i] = from_float<T>(sa / sl);
  }
}

// Elements per lane: 16-byte loads, but at most 64 accumulator floats per thread (q and acc are REP*E each).
template <typename T, int D, int REP> constexpr int lane_elems() {
  constexpr int vec = 16 / static_cast<int>(sizeof(T));
  constexpr int by_regs = 64 / REP > D / 32 ? 64 / REP : D / 32;
  return vec < by_regs ? vec : by_regs;
}

template <typename T, int D, int REP>
static void launch_split(const PagedArgs& a, int B, cudaStream_t stream) {
  constexpr int E = lane_elems<T, D, REP>();
  dim3 grid(a.num_splits, a.Hkv, B);
  C10_CUDA_CHECK(launch_dependent(paged_decode_split_kernel<T, D, REP, E>, grid, kPagedThreads, 0, stream, a));
}

template <typename T, int D>
static void launch_typed(const PagedArgs& a, int rep, int B, cudaStream_t stream) {
  switch (rep) {
    case 1: launch_split<T, D, 1>(a, B, stream); break;
    case 2: launch_split<T, D, 2>(a, B, stream); break;
    case 4: launch_split<T, D, 4>(a, B, stream); break;
    case 8: launch_split<T, D, 8>(a, B, stream); break;
    case 16: launch_split<T, D, 16>(a, B, stream); break;
    default: RL_CHECK(false, "paged_decode_attention: query heads per KV head must be 1, 2, 4, 8 or 16, got ", rep);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.num_splits > 1) {
    C10_CUDA_CHECK(launch_dependent(paged_decode_combine_kernel<T, D>, dim3(a.H, B), kCombineThreads, 0, stream, a));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_dim(const PagedArgs& a, int D, int rep, int B, cudaStream_t stream) {
  if (D == 128) launch_typed<T, 128>(a, rep, B, stream);
  else launch_typed<T, 64>(a, rep, B, stream);
}

// One translation unit per dtype (paged_attention_{f32,bf16,f16}.cu) so nvcc builds them in parallel.
void paged_launch_f32(const PagedArgs& a, int D, int rep, int B, cudaStream_t stream);
void paged_launch_bf16(const PagedArgs& a, int D, int rep, int B, cudaStream_t stream);
void paged_launch_f16(const PagedArgs& a, int D, int rep, int B, cudaStream_t stream);

}  // namespace ringlinear
