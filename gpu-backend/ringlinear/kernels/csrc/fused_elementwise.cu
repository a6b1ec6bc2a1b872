// Fused per-token fp32 elementwise steps of the attention layers (twins: kernels/elementwise_reference.py).
//
//   qkv_prologue          qkv row -> [silu] -> round to the norm dtype -> per-head RMSNorm of q, k (* weight)
//                         -> partial NeoX RoPE of q, k -> q, k, v in the output dtype
//   gated_group_rmsnorm   o row -> RMSNorm per contiguous group (* weight) * sigmoid(gate) -> output dtype
//   add_rms_norm          s = x [+ delta] (rounded to x's dtype) -> ops.rms_norm(s, weight) in x's dtype
//
// Memory-bound, so the aim is one pass over each row with 16-byte accesses: one CTA per row for the norms; the
// prologue's CTAs each walk many rows through a 3-deep cp.async ring so loads overlap the arithmetic. Products and
// sums that the eager reference rounds separately use __fmul_rn / __fadd_rn so nvcc cannot contract them into FMAs:
// RoPE then matches torch bit for bit given the same inputs. RoPE angles are ops.rope_cos_sin's (pos *
// theta^(-2i/r) in double, cos/sin in double, rounded to fp32; an fp32 angle at position 1e6 would be off by up to
// 0.03 rad): read from its tables when the caller passes them, else computed the same way per token.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"

namespace ringlinear {
namespace {

constexpr int kPrologueThreads = 256;
constexpr int kPrologueWarps = kPrologueThreads / 32;
constexpr int kPrologueRounds = 4;  // head vectors a lane takes from the ring per pass (64 heads at bf16)
constexpr int kPrologueMinBlocks = 4;  // <= 64 registers: 4 CTAs (1024 threads) per SM
constexpr int kPrologueStages = 3;     // tokens of a block in flight: 2 loading while 1 computes
constexpr int kPrologueMaxRing = 200 * 1024;  // bytes of that ring (3 fp32 rows of 16K elements)
constexpr int kGateThreads = 256;
constexpr int kGateWarps = kGateThreads / 32;
constexpr int kGateMaxVec = 8;  // float4 vectors per thread: rows of up to 8192 channels
constexpr int kAddNormThreads = 256;
constexpr int kAddNormWarps = kAddNormThreads / 32;
constexpr int kAddNormMaxDim = 8192;  // 16-byte vectors per thread: <= 4 (16-bit) or 8 (fp32) at 256 threads

// Codes of the dtype the QK-norm rounds to (ops.rms_norm works in its input's dtype). Keep in sync with elementwise.py.
constexpr int kNormF32 = 0, kNormBF16 = 1, kNormF16 = 2;

RL_DEVICE float round_to(float x, int code) {
  if (code == kNormBF16) return __bfloat162float(__float2bfloat16_rn(x));
  if (code == kNormF16) return __half2float(__float2half_rn(x));
  return x;
}

// 4-byte global->shared copy (cp.async's smallest size, .ca: the 16-byte form alone may bypass L1).
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
// heads per pass and the per-head RMS is a shuffle reduction inside an aligned group of LPH lanes. RoPE partners
// (element e and e +- r/2) may sit in other lanes: they are exchanged through a per-warp shared buffer.
// grid.y splits a token's heads: block y takes heads [y * heads_per_block, ...) (all of them when grid.y == 1). A
// step of a few tokens (decode) would otherwise leave one block per token walking every head in turn (~6 us at one
// token; split, the token's heads run side by side on several SMs).
template <typename Tin, typename Tout, int D>
__global__ void __launch_bounds__(kPrologueThreads, kPrologueMinBlocks)
    qkv_prologue_kernel(const Tin* __restrict__ qkv, int64_t row_stride, int N, const int64_t* __restrict__ positions,
                        const float* __restrict__ q_w, const float* __restrict__ k_w, Tout* __restrict__ q_out,
                        Tout* __restrict__ k_out, Tout* __restrict__ v_out, const int64_t* __restrict__ kv_rows,
                        int Hq, int Hkv, int silu, int norm_code,
                        float eps, int rot, double theta, const float* __restrict__ cos_tab,
                        const float* __restrict__ sin_tab, int heads_per_block) {
  constexpr int V = 16 / sizeof(Tin);
  constexpr int LPH = D / V;
  constexpr int HPW = 32 / LPH;
  static_assert(D % V == 0 && LPH >= 1 && LPH <= 32 && 32 % LPH == 0, "head must split evenly over lanes");
  constexpr int kHeadsPerPass = kPrologueWarps * HPW;
  constexpr int S = kPrologueStages;

  extern __shared__ uint4 ring[];  // [S][row16]: the raw rows of this block's next tokens
  __shared__ float cos_s[S][D / 2], sin_s[S][D / 2];
  __shared__ float xch[kPrologueWarps][HPW * D];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane % LPH, hslot = lane / LPH;
  const int H = Hq + 2 * Hkv, half = rot / 2;
  const int row16 = H * D * (int)sizeof(Tin) / 16;
  const int hlo = blockIdx.y * heads_per_block, hhi = min(H, hlo + heads_per_block);  // this block's heads
  constexpr int kHead16 = D * (int)sizeof(Tin) / 16;  // 16-byte pieces of one head
  const bool tables = cos_tab != nullptr;

  // The block walks tokens blockIdx.x, + gridDim.x, ...; token j of its walk lands in stage j % S through cp.async,
  // S - 1 tokens ahead of the one being computed, so loads stay in flight while the arithmetic runs. The rope
  // tables (ops.rope_cos_sin's output, computed once per step for every layer) ride along; without them the angles
  // are ops.rope_cos_sin's fp64 arithmetic, per token.
  auto fetch = [&](int j) {
    const int n = blockIdx.x + j * gridDim.x;
    if (n < N) {
      const int st = j % S;
      const uint4* src = reinterpret_cast<const uint4*>(qkv + (int64_t)n * row_stride);
      for (int c = hlo * kHead16 + threadIdx.x; c < hhi * kHead16; c += kPrologueThreads)
        cp_async_16(ring + st * row16 + c, src + c, 16);
      if (tables && (int)threadIdx.x < half) {
        cp_async_4(&cos_s[st][threadIdx.x], cos_tab + (int64_t)n * rot + threadIdx.x);
        cp_async_4(&sin_s[st][threadIdx.x], sin_tab + (int64_t)n * rot + threadIdx.x);
      }
    }
    cp_async_commit();  // possibly empty: one group per token keeps the wait count uniform
  };
  pdl_wait();  // qkv is the projection just before this kernel (common.cuh: dependent launches)
  pdl_launch_dependents();
  for (int j = 0; j < S - 1; ++j) fetch(j);

  float* xs = xch[warp] + hslot * D;
  for (int j = 0;; ++j) {
    const int n = blockIdx.x + j * gridDim.x;
    if (n >= N) break;  // block-uniform
    const int st = j % S;
    fetch(j + S - 1);  // into the stage read in iteration j - 1 (released by its closing barrier)
    if (!tables && (int)threadIdx.x < half) {
      const double inv_freq = 1.0 / pow(theta, (double)(2 * threadIdx.x) / (double)rot);
      double sn, cs;
      sincos((double)positions[n] * inv_freq, &sn, &cs);
      cos_s[st][threadIdx.x] = (float)cs;
      sin_s[st][threadIdx.x] = (float)sn;
    }
    cp_async_wait<S - 1>();  // this thread's copies of token n have landed
    __syncthreads();         // everyone's
    const Tin* row = reinterpret_cast<const Tin*>(ring + st * row16);
    const float* cs_ = cos_s[st];
    const float* sn_ = sin_s[st];
    for (int h0 = hlo; h0 < hhi; h0 += kHeadsPerPass * kPrologueRounds) {  // block-uniform loop
      float x[kPrologueRounds][V];
#pragma unroll
      for (int r = 0; r < kPrologueRounds; ++r) {
        const int h = h0 + r * kHeadsPerPass + warp * HPW + hslot;
        if (h < hhi) {
          unpack16<Tin, V>(*reinterpret_cast<const uint4*>(row + h * D + sub * V), x[r]);  // from the ring
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) x[r][i] = 0.f;
        }
      }
#pragma unroll
      for (int r = 0; r < kPrologueRounds; ++r) {
        if (h0 + r * kHeadsPerPass >= hhi) break;  // block-uniform
        // Lanes whose head is past the block's last (h >= hhi) still run the shuffles and __syncwarp below, then
        // store nothing.
        const int h = h0 + r * kHeadsPerPass + warp * HPW + hslot;
        float* f = x[r];
        if (silu) {
#pragma unroll
          for (int i = 0; i < V; ++i) f[i] = f[i] / (1.f + expf(-f[i]));  // torch's silu: x / (1 + exp(-x))
        }
#pragma unroll
        for (int i = 0; i < V; ++i) f[i] = round_to(f[i], norm_code);
        const bool is_q = h < Hq, is_k = h >= Hq && h < Hq + Hkv;
        const float* w = is_q ? q_w : (is_k ? k_w : nullptr);

        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) ss += f[i] * f[i];
#pragma unroll
        for (int o = LPH / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (w != nullptr) {
          // ops.rms_norm: normed = (x * rsqrt(mean(x^2) + eps)) in the norm dtype, then weight(norm dtype) * normed.
          const float rs = rsqrtf(__fdiv_rn(ss, (float)D) + eps);
          float wv[V];
#pragma unroll
          for (int c = 0; c < V / 4; ++c) load4<float>(w + sub * V + 4 * c, wv + 4 * c);
#pragma unroll
          for (int i = 0; i < V; ++i)
            f[i] = round_to(__fmul_rn(round_to(wv[i], norm_code), round_to(__fmul_rn(f[i], rs), norm_code)), norm_code);
        }

        if (rot > 0) {  // block-uniform
#pragma unroll
          for (int i = 0; i < V; ++i) xs[sub * V + i] = f[i];
          __syncwarp();
          if (is_q || is_k) {
            // ops.apply_partial_rope: y = x * cos + rotate_half(x) * sin over the first rot dims, products rounded.
#pragma unroll
            for (int i = 0; i < V; ++i) {
              const int e = sub * V + i;
              if (e < half) {
                f[i] = __fsub_rn(__fmul_rn(f[i], cs_[e]), __fmul_rn(xs[e + half], sn_[e]));
              } else if (e < rot) {
                f[i] = __fadd_rn(__fmul_rn(f[i], cs_[e - half]), __fmul_rn(xs[e - half], sn_[e - half]));
              }
            }
          }
          __syncwarp();  // the buffer is rewritten by the next round
        }

        if (h < hhi) {
          const int64_t kv_row = kv_rows != nullptr ? kv_rows[n] : n;  // k/v straight into their KV-cache rows
          Tout* dst = is_q ? q_out + ((int64_t)n * Hq + h) * D
                           : (is_k ? k_out + (kv_row * Hkv + (h - Hq)) * D
                                   : v_out + (kv_row * Hkv + (h - Hq - Hkv)) * D);
          store<Tout, V>(dst + sub * V, f);
        }
      }
    }
    __syncthreads();  // stage st and its cos/sin are free for the fetch of iteration j + 1
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits
}

// ---------------------------------------------------------------------------------------------------------------
// gated group RMSNorm
// ---------------------------------------------------------------------------------------------------------------
// Each thread keeps its float4 vectors of the row (and of the gate, loaded with them so both streams are in flight
// before the first barrier) in registers; per-vector sums of squares go to shared memory and one warp per group sums
// its group's in a fixed order (deterministic, no atomics). MAXV = float4 vectors per thread: 2 for rows of up to
// 2048 channels (few registers: 8 blocks per SM), kGateMaxVec above.
template <typename To, typename Tg, typename Tout, int MAXV>
__global__ void __launch_bounds__(kGateThreads)
    gated_group_rmsnorm_kernel(const To* __restrict__ o, int64_t o_stride, const Tg* __restrict__ gate,
                               int64_t gate_stride, const float* __restrict__ weight, Tout* __restrict__ out, int C,
                               int groups, float eps) {
  extern __shared__ float smem[];
  const int nvec = C / 4, gsize = C / groups, gvec = gsize / 4;
  float* part = smem;          // [nvec] sum of squares of each float4
  float* scale = smem + nvec;  // [groups] rsqrt(mean + eps)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const To* orow = o + (int64_t)blockIdx.x * o_stride;
  const Tg* grow = gate + (int64_t)blockIdx.x * gate_stride;
  Tout* yrow = out + (int64_t)blockIdx.x * C;

  float x[MAXV][4], gv[MAXV][4];
  pdl_wait();  // o comes from the attention kernel just before this one
  pdl_launch_dependents();
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int v = threadIdx.x + i * kGateThreads;
    if (v < nvec) {
      load4<To>(orow + 4 * v, x[i]);
      load4<Tg>(grow + 4 * v, gv[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int v = threadIdx.x + i * kGateThreads;
    if (v < nvec) part[v] = x[i][0] * x[i][0] + x[i][1] * x[i][1] + x[i][2] * x[i][2] + x[i][3] * x[i][3];
  }
  __syncthreads();
  for (int g = warp; g < groups; g += kGateWarps) {
    float s = 0.f;
    for (int v = lane; v < gvec; v += 32) s += part[g * gvec + v];
    s = warp_sum(s);
    if (lane == 0) scale[g] = rsqrtf(__fdiv_rn(s, (float)gsize) + eps);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int v = threadIdx.x + i * kGateThreads;
    if (v < nvec) {
      const float rs = scale[(4 * v) / gsize];  // a float4 never straddles groups: gsize % 4 == 0
      float w[4], y[4];
      const float* g = gv[i];
      load4<float>(weight + 4 * v, w);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // ops.group_rms_norm then * torch.sigmoid (1 / (1 + exp(-g))), each product rounded as in eager torch.
        const float sig = 1.f / (1.f + expf(-g[j]));
        y[j] = __fmul_rn(__fmul_rn(w[j], __fmul_rn(x[i][j], rs)), sig);
      }
      store<Tout, 4>(yrow + 4 * v, y);
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
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) warp_ss[threadIdx.x / 32] = ss;
  __syncthreads();
  ss = 0.f;
  for (int w = 0; w < (int)(blockDim.x / 32); ++w) ss += warp_ss[w];
  const float r = rsqrtf(__fadd_rn(__fdiv_rn(ss, (float)D), eps));

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
  if (smem > 48 * 1024)
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
void qkv_prologue(const at::Tensor& qkv, const at::Tensor& positions, const c10::optional<at::Tensor>& q_w,
                  const c10::optional<at::Tensor>& k_w, at::Tensor& q_out, at::Tensor& k_out, at::Tensor& v_out,
                  bool silu, int64_t norm_code, double eps, int64_t rot, double theta,
                  const c10::optional<at::Tensor>& cos_tab, const c10::optional<at::Tensor>& sin_tab,
                  const c10::optional<at::Tensor>& kv_rows) {
  RL_CHECK(q_out.dim() == 3 && k_out.dim() == 3 && v_out.dim() == 3, "qkv_prologue: outputs must be [N, H, d]");
  const int64_t N = q_out.size(0), Hq = q_out.size(1), Hkv = k_out.size(1), D = q_out.size(2);
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
  RL_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == N,
              "qkv_prologue: positions must be contiguous int64 [N]");
  for (const auto* w : {&q_w, &k_w}) {
    if (w->has_value()) {
      RL_CHECK((*w)->scalar_type() == at::kFloat && (*w)->is_contiguous() && (*w)->numel() == D && aligned16(**w),
                  "qkv_prologue: norm weights must be contiguous, 16-byte aligned float32 [d]");
    }
  }
  RL_CHECK(D == 64 || D == 128, "qkv_prologue: head_dim must be 64 or 128");
  RL_CHECK(rot >= 0 && rot <= D && rot % 2 == 0, "qkv_prologue: rotary_dim must be even and <= head_dim");
  RL_CHECK(norm_code >= kNormF32 && norm_code <= kNormF16, "qkv_prologue: bad norm dtype code");
  RL_CHECK(cos_tab.has_value() == sin_tab.has_value(), "qkv_prologue: pass both rope tables or neither");
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
  dispatch_float(qkv.scalar_type(), "qkv_prologue: qkv", [&](auto in_tag) {
    using Tin = decltype(in_tag);
    dispatch_float(q_out.scalar_type(), "qkv_prologue: out_dtype", [&](auto out_tag) {
      using Tout = decltype(out_tag);
      auto launch = [&](auto kernel) {
        // Enough blocks to fill the SMs at the occupancy the ring allows; each walks its share of the tokens. With
        // fewer tokens than block slots, a token's heads are split over up to one block per pass of heads.
        const int smem = kPrologueStages * (int)((Hq + 2 * Hkv) * D * sizeof(Tin));
        RL_CHECK(smem <= kPrologueMaxRing, "qkv_prologue: (q + 2 kv heads) x head_dim = ", (Hq + 2 * Hkv) * D,
                 " elements per token is too wide for the kernel's shared-memory ring");
        const int64_t slots = prologue_resident_blocks(kernel, smem, qkv.get_device());
        const int H = (int)(Hq + 2 * Hkv), pass = kPrologueWarps * 32 / ((int)D * (int)sizeof(Tin) / 16);
        const int64_t passes = (H + pass - 1) / pass;
        const int64_t split = std::max<int64_t>(1, std::min<int64_t>(passes, slots / N));
        const int heads_per_block = (int)(pass * ((passes + split - 1) / split));
        const unsigned grid_y = (unsigned)((H + heads_per_block - 1) / heads_per_block);
        const int64_t grid = std::min<int64_t>(N, std::max<int64_t>(1, slots / grid_y));
        C10_CUDA_CHECK(launch_dependent(kernel, dim3((unsigned)grid, grid_y), kPrologueThreads, smem, stream,
            reinterpret_cast<const Tin*>(qkv.data_ptr()), qkv.stride(0), (int)N, positions.data_ptr<int64_t>(),
            q_w ? q_w->data_ptr<float>() : nullptr, k_w ? k_w->data_ptr<float>() : nullptr,
            reinterpret_cast<Tout*>(q_out.data_ptr()), reinterpret_cast<Tout*>(k_out.data_ptr()),
            reinterpret_cast<Tout*>(v_out.data_ptr()), kv_rows ? kv_rows->data_ptr<int64_t>() : nullptr,
            (int)Hq, (int)Hkv, (int)silu, (int)norm_code, (float)eps,
            (int)rot, theta, cos_tab ? cos_tab->data_ptr<float>() : nullptr,
            sin_tab ? sin_tab->data_ptr<float>() : nullptr, heads_per_block));
      };
      if (D == 64) launch(qkv_prologue_kernel<Tin, Tout, 64>);
      else launch(qkv_prologue_kernel<Tin, Tout, 128>);
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
  const size_t smem = (size_t)(C / 4 + groups) * sizeof(float);  // <= (2048 + 2048) * 4 bytes
  dispatch_float(o.scalar_type(), "gated_group_rmsnorm: o", [&](auto o_tag) {
    using To = decltype(o_tag);
    dispatch_float(gate.scalar_type(), "gated_group_rmsnorm: gate", [&](auto g_tag) {
      using Tg = decltype(g_tag);
      dispatch_float(out.scalar_type(), "gated_group_rmsnorm: out_dtype", [&](auto out_tag) {
        using Tout = decltype(out_tag);
        auto kernel = C <= 4 * kGateThreads * 2 ? gated_group_rmsnorm_kernel<To, Tg, Tout, 2>
                                                : gated_group_rmsnorm_kernel<To, Tg, Tout, kGateMaxVec>;
        C10_CUDA_CHECK(launch_dependent(kernel, (unsigned)N, kGateThreads, smem, stream,
            reinterpret_cast<const To*>(o.data_ptr()), o.stride(0), reinterpret_cast<const Tg*>(gate.data_ptr()),
            gate.stride(0), weight.data_ptr<float>(), reinterpret_cast<Tout*>(out.data_ptr()), (int)C, (int)groups,
            (float)eps));
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
