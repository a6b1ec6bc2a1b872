// Fused per-token fp32 elementwise steps of the attention layers (twins: kernels/elementwise_reference.py).
//
//   qkv_prologue          qkv row -> [silu] -> round to the norm dtype -> per-head RMSNorm of q, k (* weight)
//                         -> partial NeoX RoPE of q, k -> q, k, v in the output dtype
//   gated_group_rmsnorm   o row -> RMSNorm per contiguous group (* weight) * sigmoid(gate) -> output dtype
//   add_rms_norm          s = x [+ delta] (rounded to x's dtype) -> ops.rms_norm(s, weight) in x's dtype
//
// Memory-bound, so the aim is one pass over each row with 16-byte accesses: one CTA per row for the norms; the
// prologue's warps each walk many tokens of one head group through their own cp.async ring. Products and sums that the eager reference rounds separately use __fmul_rn / __fadd_rn so nvcc cannot contract them into FMAs:
// RoPE then matches torch bit for bit given the same inputs. RoPE angles are ops.rope_cos_sin's tables (pos *
// theta^(-2i/r) in double, cos/sin in double, rounded to fp32; an fp32 angle at position 1e6 would be off by up to
// 0.03 rad), which the caller passes (elementwise.py builds them when its own caller has none).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <map>
#include <mutex>
#include <numeric>
#include <tuple>

#include "common.cuh"

namespace ringlinear {
namespace {

constexpr int kPrologueThreads = 256;
constexpr int kPrologueWarps = kPrologueThreads / 32;
constexpr int kPrologueMinBlocks = 4;  // <= 64 registers: 4 CTAs (1024 threads) per SM
constexpr int kPrologueStages = 4;     // slots of a warp's ring: 3 tokens loading while 1 computes
constexpr int kGateThreads = 256;
constexpr int kGateWarps = kGateThreads / 32;
constexpr int kGateMaxVec = 8;  // float4 vectors per thread: rows of up to 8192 channels
constexpr int kAddNormThreads = 256;
constexpr int kAddNormWarps = kAddNormThreads / 32;
constexpr int kAddNormMaxDim = 8192;  // 16-byte vectors per thread: <= 4 (16-bit) or 8 (fp32) at 256 threads

// Codes of the dtype the QK-norm rounds to (ops.rms_norm works in its input's dtype). Keep in sync with elementwise.py.
constexpr int kNormF32 = 0, kNormBF16 = 1, kNormF16 = 2;

template <int CODE>
RL_DEVICE float round_to(float x) {
  if constexpr (CODE == kNormBF16) return __bfloat162float(__float2bfloat16_rn(x));
  if constexpr (CODE == kNormF16) return __half2float(__float2half_rn(x));
  return x;
}

// Global->shared copies through L1 (.ca, also cp_async_16_ca in common.cuh): the RoPE tables of a token, read by every
// warp of the block that takes it.
RL_DEVICE void cp_async_4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}

// 16 bytes of T (V = 16 / sizeof(T) elements) -> floats.
template <typename T, int V>
RL_DEVICE void unpack16(const uint4& u, float* f) {
  static_assert(V * sizeof(T) == 16, "one 16-byte vector");
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < V; ++i) f[i] = to_float(e[i]);
}
// The same from global memory through the read-only path; p must be 16-byte aligned.
template <typename T, int V>
RL_DEVICE void load16(const T* p, float* f) {
  unpack16<T, V>(__ldg(reinterpret_cast<const uint4*>(p)), f);
}

// Four elements of T -> floats (8 or 16 bytes; p aligned to that).
template <typename T>
RL_DEVICE void load4(const T* p, float* f) {
  if constexpr (sizeof(T) == 4) {
    const float4 u = __ldg(reinterpret_cast<const float4*>(p));
    f[0] = u.x, f[1] = u.y, f[2] = u.z, f[3] = u.w;
  } else {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = to_float(e[i]);
  }
}

// V floats -> V elements of T at p (aligned to V * sizeof(T), which is 8, 16 or 32 bytes).
template <typename T, int V>
RL_DEVICE void store(T* p, const float* f) {
  constexpr int kBytes = V * sizeof(T);
  static_assert(kBytes == 8 || kBytes % 16 == 0, "8-byte or 16-byte multiple stores");
  alignas(16) T tmp[V];
#pragma unroll
  for (int i = 0; i < V; ++i) tmp[i] = from_float<T>(f[i]);
  if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(tmp);
  } else {
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) reinterpret_cast<uint4*>(p)[c] = reinterpret_cast<const uint4*>(tmp)[c];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// qkv prologue
// ---------------------------------------------------------------------------------------------------------------
// A head's D elements are spread over LPH = D / V lanes (V elements of 16 bytes each), so a warp covers HPW = 32 / LPH
// heads - one "head group" - and the per-head RMS is a shuffle reduction inside an aligned group of LPH lanes. Every
// warp keeps one head group (the grid holds a whole number of warps per group: see the launch) and walks tokens
// n0, n0 + TS, ... through its own ring of kPrologueStages shared-memory slots: each lane cp.asyncs its 16 bytes of the
// row and the lanes together the token's RoPE tables, kPrologueStages - 1 tokens ahead of the one being computed.
// Only __syncwarp orders a warp's slots, so warps never wait for each other. The version before this one (a whole
// token per block behind two __syncthreads) ran at 33-55% of the copy rate at 32k tokens, issue-bound; what paid was
// fewer instructions per token - the norm's rounding at compile time, one RoPE form per lane, addresses by adds -
// more than the barriers removed (docs/benchmarks.md, nineteenth session).
// RoPE partners (element e and e +- r/2) sit in lane sub +- r/(2V) at the same index when V divides r/2 (a shuffle);
// otherwise they are exchanged through a per-warp shared buffer. ROT > 0: the rotary dim (and 16-byte aligned tables)
// at compile time - the models' 64 of 128 - so the table copy and the RoPE form are fixed; 0: both from the arguments.
template <typename Tin, typename Tout, int D, int NORM, int ROT = 0>
__global__ void __launch_bounds__(kPrologueThreads, kPrologueMinBlocks)
    qkv_prologue_kernel(const Tin* __restrict__ qkv, int64_t row_stride, int N, const float* __restrict__ q_w,
                        const float* __restrict__ k_w, Tout* __restrict__ q_out, Tout* __restrict__ k_out,
                        Tout* __restrict__ v_out, const int64_t* __restrict__ kv_rows, int Hq, int Hkv, int Hv, int silu,
                        float eps, int rot_arg, const float* __restrict__ cos_tab,
                        const float* __restrict__ sin_tab, int vec_tables_arg) {
  const int rot = ROT > 0 ? ROT : rot_arg, vec_tables = ROT > 0 ? 1 : vec_tables_arg;
  constexpr int V = 16 / sizeof(Tin);
  constexpr int LPH = D / V;
  constexpr int HPW = 32 / LPH;
  constexpr int S = kPrologueStages;
  static_assert(D % V == 0 && LPH >= 1 && LPH <= 32 && 32 % LPH == 0, "head must split evenly over lanes");
  extern __shared__ uint4 ring[];  // per warp: S slots of [32 x 16 bytes of the row][cos[rot]][sin[rot]]
  __shared__ alignas(16) float xch[kPrologueWarps][HPW * D];  // RoPE partners when V does not divide r/2

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane % LPH, hslot = lane / LPH;
  const int H = Hq + Hkv + Hv, P = (H + HPW - 1) / HPW, half = rot / 2;  // Hv = 0: v is read in place by the caller
  const int64_t gw = (int64_t)blockIdx.x * kPrologueWarps + warp;
  const int64_t TS = (int64_t)gridDim.x * kPrologueWarps / P;  // tokens walked side by side per head group
  const int group = (int)(gw % P), h = group * HPW + hslot;      // this lane's head (>= H: idle, still shuffles)
  const bool is_q = h < Hq, is_k = h >= Hq && h < Hq + Hkv, live = h < H;
  const bool warp_roped = rot > 0 && group * HPW < Hq + Hkv;     // the warp holds a q or k head: it needs the tables
  const int e0 = sub * V;                                        // first element of the lane's head vector
  const bool roped = (is_q || is_k) && e0 < rot;
  const bool shfl_rope = half % V == 0, vec_rope = rot % V == 0;  // warp-uniform
  const int partner = e0 < half ? lane + half / V : lane - half / V;
  const float* w = is_q ? q_w : (is_k ? k_w : nullptr);          // the lane's norm weight (L1-resident)

  // Per-lane addresses of token n0 and their step per TS tokens: the walk below only adds (the 64-bit index products
  // of every token were a good part of the kernel's instructions, which bound it).
  const int64_t n0 = gw / P;
  const int slot_u4 = 32 + rot / 2;  // 16-byte units of a slot (2 * rot floats of tables; rot is even)
  uint4* const my_ring = ring + warp * S * slot_u4;
  const Tin* fetch_src = qkv + n0 * row_stride + (live ? h * D + e0 : 0);
  const int64_t src_step = TS * row_stride;
  // The table chunks this lane copies in the vector case: chunk c < rot / 4 is cos[4c..], else sin[4(c - rot/4)..];
  // chunks lane and lane + 32 (rot <= 128: at most 64 chunks).
  const int tab_chunks = vec_tables ? rot / 2 : 0;
  const float* tab_src0 = lane < rot / 4 ? cos_tab + 4 * lane : sin_tab + 4 * (lane - rot / 4);
  const float* tab_src1 = sin_tab + 4 * (lane + 32 - rot / 4);
  const int64_t tab_off0 = n0 * rot, tab_step = TS * rot;
  int64_t fetch_m = n0, fetch_tab = tab_off0;
  int fetch_slot = 0;
  auto fetch = [&]() {
    if (fetch_m < N) {
      uint4* slot = my_ring + fetch_slot * slot_u4;
      if (live) cp_async_16(slot + lane, fetch_src, 16);
      if (warp_roped) {
        float* tab = reinterpret_cast<float*>(slot + 32);
        if (tab_chunks) {  // rot % 4 == 0, 16-byte aligned tables: rot / 4 vectors of cos, then of sin
          if (lane < tab_chunks) cp_async_16_ca(tab + 4 * lane, tab_src0 + fetch_tab);
          if (lane + 32 < tab_chunks) cp_async_16_ca(tab + 4 * (lane + 32), tab_src1 + fetch_tab);
        } else {
          for (int c = lane; c < 2 * rot; c += 32)
            cp_async_4(tab + c, c < rot ? cos_tab + fetch_tab + c : sin_tab + fetch_tab + (c - rot));
        }
      }
    }
    cp_async_commit();  // possibly empty: one group per token keeps the wait count uniform
    fetch_m += TS, fetch_src += src_step, fetch_tab += tab_step, fetch_slot = fetch_slot == S - 1 ? 0 : fetch_slot + 1;
  };
  // Where the lane's head vector of token m goes: dst0 + (m, or k/v's cache row) * dst_step.
  Tout* const dst0 = (is_q ? q_out + h * D : (is_k ? k_out + (h - Hq) * D : v_out + (h - Hq - Hkv) * D)) + e0;
  const int64_t dst_step = (int64_t)(is_q ? Hq : Hkv) * D;
  const bool cache_row = kv_rows != nullptr && !is_q;
  pdl_wait();  // qkv is the projection just before this kernel (common.cuh: dependent launches)
  pdl_launch_dependents();
  for (int j = 0; j < S - 1; ++j) fetch();

  float* xs = xch[warp] + hslot * D;
  int slot_i = 0;
  for (int64_t m = n0; m < N; m += TS) {  // warp-uniform
    fetch();  // S - 1 tokens ahead, into the slot read in the iteration before (released by its closing __syncwarp)
    const int64_t row = cache_row && live ? kv_rows[m] : m;  // k/v's cache row: loaded early
    cp_async_wait<S - 1>();  // this lane's copies of token m have landed
    __syncwarp();            // and the other lanes' (the tables)
    const uint4* slot = my_ring + slot_i * slot_u4;
    slot_i = slot_i == S - 1 ? 0 : slot_i + 1;
    const float* cs = reinterpret_cast<const float*>(slot + 32);
    const float* sn = cs + rot;
    float f[V];
    if (live) {
      unpack16<Tin, V>(slot[lane], f);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) f[i] = 0.f;
    }
    if (silu) {
#pragma unroll
      for (int i = 0; i < V; ++i) f[i] = f[i] / (1.f + expf(-f[i]));  // torch's silu: x / (1 + exp(-x))
    }
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = round_to<NORM>(f[i]);
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) ss += f[i] * f[i];
#pragma unroll
    for (int o = LPH / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (w != nullptr) {
      // ops.rms_norm: normed = (x * rsqrt(mean(x^2) + eps)) in the norm dtype, then weight(norm dtype) * normed.
      const float rs = rsqrtf(__fmul_rn(ss, 1.f / D) + eps);  // = ss / D exactly: D is a power of two
      float wv[V];
#pragma unroll
      for (int c = 0; c < V / 4; ++c) load4<float>(w + e0 + 4 * c, wv + 4 * c);
#pragma unroll
      for (int i = 0; i < V; ++i) f[i] = round_to<NORM>(__fmul_rn(round_to<NORM>(wv[i]), round_to<NORM>(__fmul_rn(f[i], rs))));
    }
    if (rot > 0 && shfl_rope && vec_rope) {  // warp-uniform; the usual shapes (rot = 64 or 32 of 128 / 64)
      // ops.apply_partial_rope: y = x * cos + rotate_half(x) * sin over the first rot dims, products rounded. Here a
      // lane's V elements all sit on one side: partner lane sub +- r/(2V), rotate_half's sign the same for all V
      // (x - y == x + (-y) exactly, so one form serves both halves).
      float o[V];
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = __shfl_sync(0xffffffffu, f[i], partner);
      if (roped) {
        const float sign = e0 < half ? -1.f : 1.f;
        float c[V], sv[V];
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          *reinterpret_cast<float4*>(c + 4 * q) = *reinterpret_cast<const float4*>(cs + e0 + 4 * q);
          *reinterpret_cast<float4*>(sv + 4 * q) = *reinterpret_cast<const float4*>(sn + e0 + 4 * q);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) f[i] = __fadd_rn(__fmul_rn(f[i], c[i]), __fmul_rn(sign * o[i], sv[i]));
      }
    } else if (rot > 0) {  // any even rot: partners through the warp's exchange buffer, per element
#pragma unroll
      for (int c = 0; c < V / 4; ++c)
        *reinterpret_cast<float4*>(xs + e0 + 4 * c) = make_float4(f[4 * c], f[4 * c + 1], f[4 * c + 2], f[4 * c + 3]);
      __syncwarp();
      float o[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int e = e0 + i;
        o[i] = e < half ? xs[e + half] : (e < rot ? xs[e - half] : 0.f);
      }
      __syncwarp();  // the buffer is rewritten by the next token
      if (roped) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const int e = e0 + i;
          if (e < half) f[i] = __fsub_rn(__fmul_rn(f[i], cs[e]), __fmul_rn(o[i], sn[e]));
          else if (e < rot) f[i] = __fadd_rn(__fmul_rn(f[i], cs[e]), __fmul_rn(o[i], sn[e]));
        }
      }
    }
    if (live) store<Tout, V>(dst0 + row * dst_step, f);  // k/v straight into their KV-cache rows with kv_rows
    __syncwarp();  // this slot is free for the next iteration's fetch
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the warp exits
}

// ---------------------------------------------------------------------------------------------------------------
// gated group RMSNorm
// ---------------------------------------------------------------------------------------------------------------
// Each thread keeps its VEC-element vectors of the row (and of the gate, loaded with them so both streams are in
// flight before the first barrier) in registers; per-vector sums of squares go to shared memory and one warp per
// group sums its group's in a fixed order (deterministic, no atomics). MAXV = vectors per thread.
//   VEC 4, THREADS 256: any dtypes (fp32 o is 16 bytes a vector); MAXV 2 for rows of up to 2048 channels (few
//     registers: 8 blocks per SM), kGateMaxVec above.
//   VEC 8, THREADS 128 (16-bit o and gate, 16-byte aligned rows: the prefill kernel's bf16 output): 16-byte loads, a
//     row per 128 threads. One block per row: the bytes the SM's blocks have in flight bound the rate, and the float4
//     layout ran this case at 64% of the copy rate against 84% for fp32 o; this one 78% (56 registers: 9 blocks an SM,
//     the row held in registers across the norm's barrier caps it there).
template <typename To, typename Tg, typename Tout, int MAXV, int VEC, int THREADS>
__global__ void __launch_bounds__(THREADS)
    gated_group_rmsnorm_kernel(const To* __restrict__ o, int64_t o_stride, const Tg* __restrict__ gate,
                               int64_t gate_stride, const float* __restrict__ weight, Tout* __restrict__ out, int C,
                               int groups, float eps, int gshift) {
  static_assert(VEC == 4 || (VEC == 8 && sizeof(To) == 2 && sizeof(Tg) == 2), "16-byte vectors of 16-bit o and gate");
  constexpr int kWarps = THREADS / 32;
  extern __shared__ float smem[];
  const int nvec = C / VEC, gsize = C / groups, gvec = gsize / VEC;
  float* part = smem;          // [nvec] sum of squares of each vector
  float* scale = smem + nvec;  // [groups] rsqrt(mean + eps)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const To* orow = o + (int64_t)blockIdx.x * o_stride;
  const Tg* grow = gate + (int64_t)blockIdx.x * gate_stride;
  Tout* yrow = out + (int64_t)blockIdx.x * C;

  float x[MAXV][VEC], gv[MAXV][VEC];
  pdl_wait();  // o comes from the attention kernel just before this one
  pdl_launch_dependents();
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int v = threadIdx.x + i * THREADS;
    if (v < nvec) {
      if constexpr (VEC == 8) {
        load16<To, 8>(orow + 8 * v, x[i]);
        load16<Tg, 8>(grow + 8 * v, gv[i]);
      } else {
        load4<To>(orow + 4 * v, x[i]);
        load4<Tg>(grow + 4 * v, gv[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int v = threadIdx.x + i * THREADS;
    if (v < nvec) {
      float ss = x[i][0] * x[i][0];
#pragma unroll
      for (int j = 1; j < VEC; ++j) ss += x[i][j] * x[i][j];
      part[v] = ss;
    }
  }
  __syncthreads();
  for (int g = warp; g < groups; g += kWarps) {
    float s = 0.f;
    for (int v = lane; v < gvec; v += 32) s += part[g * gvec + v];
    s = warp_sum(s);
    if (lane == 0) scale[g] = rsqrtf(__fdiv_rn(s, (float)gsize) + eps);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int v = threadIdx.x + i * THREADS;
    if (v < nvec) {
      const float rs = scale[gshift >= 0 ? v >> gshift : v / gvec];  // a vector never straddles groups
      float w[VEC], y[VEC];
      const float* g = gv[i];
#pragma unroll
      for (int j = 0; j < VEC; j += 4) load4<float>(weight + VEC * v + j, w + j);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        // ops.group_rms_norm then * torch.sigmoid (1 / (1 + exp(-g))), each product rounded as in eager torch.
        const float sig = __frcp_rn(1.f + expf(-g[j]));  // == 1.f / (...): both correctly rounded, rcp is cheaper
        y[j] = __fmul_rn(__fmul_rn(w[j], __fmul_rn(x[i][j], rs)), sig);
      }
      store<Tout, VEC>(yrow + VEC * v, y);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// residual add + RMSNorm
// ---------------------------------------------------------------------------------------------------------------
// The residual stream's per-layer step (runner._forward): s = x + delta, then ops.rms_norm(s, weight, eps), in one
// pass. Each thread holds VPT 16-byte vectors of s in registers (vector v = threadIdx.x + i * blockDim.x); the sum of
// squares is reduced by warp shuffles, then across warps through shared memory in a fixed order (deterministic).
// Every rounding of the eager sequence is kept: s rounded to T (torch's x + delta), s * r rounded to T, then
// weight(T) * that in fp32 rounded to T; __fmul_rn / __fadd_rn keep nvcc from contracting them into FMAs.
template <typename T, int VPT>
__global__ void __launch_bounds__(kAddNormThreads)
    add_rms_norm_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ delta, int64_t d_stride,
                        const T* __restrict__ weight, T* __restrict__ s_out, T* __restrict__ y_out, int D,
                        float eps) {
  constexpr int V = 16 / sizeof(T);
  __shared__ float warp_ss[kAddNormWarps];
  const int nvec = D / V;
  const int64_t n = blockIdx.x;
  const T* xrow = x + n * x_stride;
  const T* drow = delta != nullptr ? delta + n * d_stride : nullptr;

  float f[VPT][V];
  float ss = 0.f;
  pdl_wait();  // delta is the output of the kernel just before this one
  pdl_launch_dependents();
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < nvec) {
      load16<T, V>(xrow + v * V, f[i]);
      if (drow != nullptr) {
        float d[V];
        load16<T, V>(drow + v * V, d);
#pragma unroll
        for (int j = 0; j < V; ++j) f[i][j] = to_float(from_float<T>(__fadd_rn(f[i][j], d[j])));
        store<T, V>(s_out + n * D + v * V, f[i]);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) ss += f[i][j] * f[i][j];
    }
  }
  const float r = block_rms_scale(ss, warp_ss, D, eps);

#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < nvec) {
      float w[V], y[V];
      load16<T, V>(weight + v * V, w);
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] = __fmul_rn(w[j], to_float(from_float<T>(__fmul_rn(f[i][j], r))));
      store<T, V>(y_out + n * D + v * V, y);
    }
  }
}

template <typename F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: RL_CHECK(false, what, " must be float32, bfloat16 or float16, got ", c10::toString(t));
  }
}

// Blocks of `kernel` that fit on the whole GPU at once with `smem` bytes of dynamic shared memory. Cached: the
// attribute and occupancy queries cost tens of microseconds of host time, once per layer otherwise.
template <typename K>
int64_t prologue_resident_blocks(K* kernel, int smem, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int>, int64_t> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), smem, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  // Past 48 KB with the static exchange buffer the kernel must opt in (a full rotary dim of 128: 48 KB of ring + 8 KB).
  cudaFuncAttributes attr{};
  RL_CHECK(cudaFuncGetAttributes(&attr, kernel) == cudaSuccess, "qkv_prologue: kernel attributes");
  if (smem + attr.sharedSizeBytes > 48 * 1024)
    RL_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess,
             "qkv_prologue: shared memory size refused");
  int per_sm = 0, sms = 0;
  RL_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
               cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPrologueThreads, smem) == cudaSuccess,
           "qkv_prologue: occupancy query failed");
  return cache[key] = (int64_t)std::max(per_sm, 1) * sms;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Host entry points (shapes and dtypes are validated by elementwise.py; the checks here guard the raw pointers)
// ---------------------------------------------------------------------------------------------------------------
// v_out None: no v is written (the caller reads qkv's v columns in place); not with kv_rows.
void qkv_prologue(const at::Tensor& qkv, const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w,
                  at::Tensor& q_out, at::Tensor& k_out, const c10::optional<at::Tensor>& v_opt, bool silu,
                  int64_t norm_code, double eps, int64_t rot, const c10::optional<at::Tensor>& cos_tab,
                  const c10::optional<at::Tensor>& sin_tab, const c10::optional<at::Tensor>& kv_rows) {
  RL_CHECK(v_opt.has_value() || !kv_rows.has_value(), "qkv_prologue: kv_rows needs v_out (the V cache)");
  const at::Tensor& v_out = v_opt.has_value() ? *v_opt : k_out;  // (only shapes and dtypes checked without v)
  RL_CHECK(q_out.dim() == 3 && k_out.dim() == 3 && v_out.dim() == 3, "qkv_prologue: outputs must be [N, H, d]");
  const int64_t N = q_out.size(0), Hq = q_out.size(1), Hkv = k_out.size(1), D = q_out.size(2);
  const int64_t Hv = v_opt.has_value() ? Hkv : 0;
  RL_CHECK(q_out.is_contiguous() && k_out.is_contiguous() && v_out.is_contiguous(), "qkv_prologue: outputs must be contiguous");
  // with kv_rows, k_out / v_out are KV caches [rows, Hkv, d] and token n's k/v go to row kv_rows[n] (the caller keeps
  // the rows in range, as for the index_put this replaces)
  RL_CHECK(k_out.sizes() == v_out.sizes() && (kv_rows ? k_out.size(0) >= 1 : k_out.size(0) == N) && k_out.size(2) == D,
           "qkv_prologue: k/v output shapes");
  if (kv_rows) {
    RL_CHECK(kv_rows->scalar_type() == at::kLong && kv_rows->is_contiguous() && kv_rows->numel() == N,
             "qkv_prologue: kv_rows must be contiguous int64 [N]");
  }
  RL_CHECK(qkv.dim() == 2 && qkv.size(0) == N && qkv.size(1) == (Hq + 2 * Hkv) * D && qkv.stride(1) == 1,
              "qkv_prologue: qkv must be [N, (Hq + 2 Hkv) d] with unit column stride");
  RL_CHECK(aligned16(qkv) && (qkv.stride(0) * qkv.element_size()) % 16 == 0, "qkv_prologue: qkv rows must be 16-byte aligned");
  for (const auto* w : {&q_w, &k_w}) {
    if (w->has_value()) {
      RL_CHECK((*w)->scalar_type() == at::kFloat && (*w)->is_contiguous() && (*w)->numel() == D && aligned16(**w),
                  "qkv_prologue: norm weights must be contiguous, 16-byte aligned float32 [d]");
    }
  }
  RL_CHECK(D == 64 || D == 128, "qkv_prologue: head_dim must be 64 or 128");
  RL_CHECK(rot >= 0 && rot <= D && rot % 2 == 0, "qkv_prologue: rotary_dim must be even and <= head_dim");
  RL_CHECK(norm_code >= kNormF32 && norm_code <= kNormF16, "qkv_prologue: bad norm dtype code");
  RL_CHECK(cos_tab.has_value() == sin_tab.has_value() && (rot == 0 || cos_tab.has_value()),
           "qkv_prologue: rotary_dim > 0 needs both rope tables");
  for (const auto* t : {&cos_tab, &sin_tab}) {
    if (t->has_value()) {
      RL_CHECK((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() && (*t)->numel() == N * rot,
               "qkv_prologue: rope tables must be contiguous float32 [N, rotary_dim]");
    }
  }
  RL_CHECK(q_out.scalar_type() == k_out.scalar_type() && k_out.scalar_type() == v_out.scalar_type(),
              "qkv_prologue: outputs must share a dtype");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(qkv.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool vec_tables = rot > 0 && rot % 4 == 0 && aligned16(*cos_tab) && aligned16(*sin_tab);
  dispatch_float(qkv.scalar_type(), "qkv_prologue: qkv", [&](auto in_tag) {
    using Tin = decltype(in_tag);
    dispatch_float(q_out.scalar_type(), "qkv_prologue: out_dtype", [&](auto out_tag) {
      using Tout = decltype(out_tag);
      auto launch = [&](auto kernel) {
        // Each warp keeps one group of heads (P groups per token), so the grid is a whole number of warps per group:
        // blocks a multiple of P / gcd(P, warps per block). As many as the tokens need, at most one wave.
        const int64_t V = 16 / (int64_t)sizeof(Tin), hpw = 32 / (D / V);
        const int64_t P = (Hq + Hkv + Hv + hpw - 1) / hpw;
        const int smem = kPrologueWarps * kPrologueStages * (int)(32 + rot / 2) * 16;
        const int64_t step = P / std::gcd(P, (int64_t)kPrologueWarps);
        const int64_t needed = (N * P + kPrologueWarps - 1) / kPrologueWarps;
        const int64_t resident = prologue_resident_blocks(kernel, smem, qkv.get_device());
        const int64_t wave = std::max<int64_t>(step, resident / step * step);
        const int64_t grid = std::min<int64_t>(wave, (needed + step - 1) / step * step);
        C10_CUDA_CHECK(launch_dependent(kernel, dim3((unsigned)grid), kPrologueThreads, smem, stream,
            reinterpret_cast<const Tin*>(qkv.data_ptr()), qkv.stride(0), (int)N,
            q_w ? q_w->data_ptr<float>() : nullptr, k_w ? k_w->data_ptr<float>() : nullptr,
            reinterpret_cast<Tout*>(q_out.data_ptr()), reinterpret_cast<Tout*>(k_out.data_ptr()),
            v_opt ? reinterpret_cast<Tout*>(v_out.data_ptr()) : nullptr, kv_rows ? kv_rows->data_ptr<int64_t>() : nullptr,
            (int)Hq, (int)Hkv, (int)Hv, (int)silu, (float)eps, (int)rot,
            cos_tab ? cos_tab->data_ptr<float>() : nullptr, sin_tab ? sin_tab->data_ptr<float>() : nullptr,
            (int)vec_tables));
      };
      // The QK-norm rounds to fp32 (lightning layers) or to the input's dtype (softmax layers): elementwise.py
      // sends any other norm dtype to the twin.
      auto by_norm = [&](auto norm_tag) {
        constexpr int NORM = decltype(norm_tag)::value;
        if (D == 64) launch(qkv_prologue_kernel<Tin, Tout, 64, NORM>);
        else if constexpr (sizeof(Tin) == 2) {  // the models' rotary dim: 64 of 128 (two table vectors a lane)
          if (rot == 64 && vec_tables) launch(qkv_prologue_kernel<Tin, Tout, 128, NORM, 64>);
          else launch(qkv_prologue_kernel<Tin, Tout, 128, NORM>);
        } else {
          launch(qkv_prologue_kernel<Tin, Tout, 128, NORM>);
        }
      };
      constexpr int kNormIn = std::is_same_v<Tin, __nv_bfloat16> ? kNormBF16
                              : (std::is_same_v<Tin, __half> ? kNormF16 : kNormF32);
      RL_CHECK(norm_code == kNormF32 || norm_code == kNormIn, "qkv_prologue: the norm dtype must be fp32 or qkv's dtype");
      if (norm_code == kNormF32) by_norm(std::integral_constant<int, kNormF32>{});
      else if constexpr (kNormIn != kNormF32) by_norm(std::integral_constant<int, kNormIn>{});
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gated_group_rmsnorm(const at::Tensor& o, const at::Tensor& gate, const at::Tensor& weight, at::Tensor& out,
                         int64_t groups, double eps) {
  RL_CHECK(o.dim() == 2 && o.stride(1) == 1, "gated_group_rmsnorm: o must be [N, C] with unit column stride");
  const int64_t N = o.size(0), C = o.size(1);
  RL_CHECK(C % 4 == 0 && C <= 4 * kGateThreads * kGateMaxVec, "gated_group_rmsnorm: C must be a multiple of 4 and <= ",
              4 * kGateThreads * kGateMaxVec);
  RL_CHECK(groups >= 1 && C % groups == 0 && (C / groups) % 4 == 0,
              "gated_group_rmsnorm: groups must divide C into groups of a multiple of 4 channels");
  RL_CHECK(gate.dim() == 2 && gate.size(0) == N && gate.size(1) == C && gate.stride(1) == 1,
              "gated_group_rmsnorm: gate must be [N, C] with unit column stride");
  RL_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == C && aligned16(weight),
              "gated_group_rmsnorm: weight must be contiguous, 16-byte aligned float32 [C]");
  RL_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == N && out.size(1) == C, "gated_group_rmsnorm: out must be contiguous [N, C]");
  RL_CHECK(aligned16(o) && o.stride(0) % 4 == 0, "gated_group_rmsnorm: o rows must be aligned to 4 elements");
  RL_CHECK(aligned16(gate) && gate.stride(0) % 4 == 0, "gated_group_rmsnorm: gate rows must be aligned to 4 elements");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(o.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  // 16-byte vectors for 16-bit o and gate whose rows allow them (VEC 8, above); float4 vectors otherwise
  const bool wide = o.element_size() == 2 && gate.element_size() == 2 && C % 8 == 0 && (C / groups) % 8 == 0 &&
                    o.stride(0) % 8 == 0 && gate.stride(0) % 8 == 0;
  const int vec = wide ? 8 : 4;
  const size_t smem = (size_t)(C / vec + groups) * sizeof(float);  // <= (2048 + 2048) * 4 bytes
  // vectors per group: a shift instead of a division when a power of two (5% of the kernel at 32k-128k rows)
  const int64_t gvec = C / groups / vec;
  const int gshift = (gvec & (gvec - 1)) == 0 ? __builtin_ctzll((unsigned long long)gvec) : -1;
  dispatch_float(o.scalar_type(), "gated_group_rmsnorm: o", [&](auto o_tag) {
    using To = decltype(o_tag);
    dispatch_float(gate.scalar_type(), "gated_group_rmsnorm: gate", [&](auto g_tag) {
      using Tg = decltype(g_tag);
      dispatch_float(out.scalar_type(), "gated_group_rmsnorm: out_dtype", [&](auto out_tag) {
        using Tout = decltype(out_tag);
        auto launch = [&](auto kernel, int threads) {
          C10_CUDA_CHECK(launch_dependent(kernel, (unsigned)N, threads, smem, stream,
              reinterpret_cast<const To*>(o.data_ptr()), o.stride(0), reinterpret_cast<const Tg*>(gate.data_ptr()),
              gate.stride(0), weight.data_ptr<float>(), reinterpret_cast<Tout*>(out.data_ptr()), (int)C, (int)groups,
              (float)eps, gshift));
        };
        if constexpr (sizeof(To) == 2 && sizeof(Tg) == 2) {
          if (wide) {
            constexpr int kT = kGateThreads / 2;
            if (C <= 8 * kT * 2) launch(gated_group_rmsnorm_kernel<To, Tg, Tout, 2, 8, kT>, kT);
            else launch(gated_group_rmsnorm_kernel<To, Tg, Tout, kGateMaxVec, 8, kT>, kT);
            return;
          }
        }
        if (C <= 4 * kGateThreads * 2) launch(gated_group_rmsnorm_kernel<To, Tg, Tout, 2, 4, kGateThreads>, kGateThreads);
        else launch(gated_group_rmsnorm_kernel<To, Tg, Tout, kGateMaxVec, 4, kGateThreads>, kGateThreads);
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& s_out, at::Tensor& y_out, double eps) {
  RL_CHECK(x.dim() == 2 && x.stride(1) == 1, "add_rms_norm: x must be [N, D] with unit column stride");
  const int64_t N = x.size(0), D = x.size(1);
  const int64_t V = 16 / x.element_size();
  RL_CHECK(D % V == 0 && D <= kAddNormMaxDim, "add_rms_norm: D must be a multiple of ", V, " and <= ", kAddNormMaxDim);
  RL_CHECK(aligned16(x) && x.stride(0) % V == 0, "add_rms_norm: x rows must be 16-byte aligned");
  RL_CHECK(delta.has_value() == s_out.has_value(), "add_rms_norm: delta and s_out go together");
  if (delta) {
    RL_CHECK(delta->dim() == 2 && delta->size(0) == N && delta->size(1) == D && delta->stride(1) == 1 &&
                    delta->scalar_type() == x.scalar_type(),
                "add_rms_norm: delta must be [N, D] of x's dtype with unit column stride");
    RL_CHECK(aligned16(*delta) && delta->stride(0) % V == 0, "add_rms_norm: delta rows must be 16-byte aligned");
    RL_CHECK(s_out->is_contiguous() && s_out->sizes() == x.sizes() && s_out->scalar_type() == x.scalar_type() &&
                    aligned16(*s_out),
                "add_rms_norm: s_out must be contiguous, 16-byte aligned [N, D] of x's dtype");
  }
  RL_CHECK(weight.is_contiguous() && weight.numel() == D && weight.scalar_type() == x.scalar_type() && aligned16(weight),
              "add_rms_norm: weight must be contiguous, 16-byte aligned [D] of x's dtype");
  RL_CHECK(y_out.is_contiguous() && y_out.sizes() == x.sizes() && y_out.scalar_type() == x.scalar_type() &&
                  aligned16(y_out),
              "add_rms_norm: out must be contiguous, 16-byte aligned [N, D] of x's dtype");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int nvec = (int)(D / V);
  int vpt = 1;  // smallest power of two with kAddNormThreads * vpt >= nvec
  while (vpt * kAddNormThreads < nvec) vpt *= 2;
  const int per = (nvec + vpt - 1) / vpt;
  const int threads = (int)std::min<int64_t>(kAddNormThreads, (per + 31) / 32 * 32);  // threads * vpt >= nvec
  dispatch_float(x.scalar_type(), "add_rms_norm: x", [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      C10_CUDA_CHECK(launch_dependent(kernel, (unsigned)N, threads, 0, stream,
          reinterpret_cast<const T*>(x.data_ptr()), x.stride(0),
          delta ? reinterpret_cast<const T*>(delta->data_ptr()) : nullptr, delta ? delta->stride(0) : 0,
          reinterpret_cast<const T*>(weight.data_ptr()), s_out ? reinterpret_cast<T*>(s_out->data_ptr()) : nullptr,
          reinterpret_cast<T*>(y_out.data_ptr()), (int)D, (float)eps));
    };
    if (vpt == 1) launch(add_rms_norm_kernel<T, 1>);
    else if (vpt == 2) launch(add_rms_norm_kernel<T, 2>);
    else if (vpt == 4) launch(add_rms_norm_kernel<T, 4>);
    else if constexpr (sizeof(T) == 4) launch(add_rms_norm_kernel<T, 8>);  // 16-bit rows of <= 8192 need <= 4
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ringlinear
