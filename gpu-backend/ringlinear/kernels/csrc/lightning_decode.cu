// Lightning-attention decode: one token for each of B requests, fp32 state updated in place in a slot pool.
//   S[slot,h] = gamma_h * S[slot,h] + k^T v        (S: [d_k, d_v] fp32)
//   o         = (d^-1/2 q) S                       (uses the updated state)
// Optional prologue: per-head RMSNorm of q and k (fp32) and NeoX partial RoPE on the first rotary_dim dims.
//
// Memory-bound: each request moves its d*d*4 state bytes in and out once. A block owns (request, head, 64 state
// columns); a warp reads two full 256-byte row segments per load, and every thread keeps D/16 independent 16-byte
// loads in flight before the first use. Plain loads and stores: the streaming hints (__ldcs/__stcs) measured 4-5%
// slower on the H200 at 256 requests (3.63 vs 3.80 TB/s; bench/results/decode_bandwidth.json).
// L2 read-ahead: each block also prefetches its share of the state `ahead` (request, head) pairs further in launch
// order (cp.async.bulk.prefetch.L2), so the DRAM reads run ahead of the blocks' own load / compute / store phases.
// H200, 256 requests in slot order: 3.88 -> 4.02-4.04 TB/s at 6-8 MB ahead (a served step: 133.6 -> 130.3 us); 16 MB
// ahead thrash the L2 (3.48 TB/s). bench/results/decode_bandwidth_prefetch*.json, decode_prefetch_probe.json,
// decode_variants*.json.
// No allocation, no host sync: capturable in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>

#include "common.cuh"

namespace ringlinear {

constexpr int kDecodeThreads = 256;  // COLS/4 threads per row (one float4 each), 1024/COLS rows per pass

struct DecodeArgs {
  const void* q; const void* k; const void* v;
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;  // element strides of [B, H, d] (last dim contiguous)
  float* state; int64_t num_slots;
  const int64_t* slots;     // [B]; < 0: padding row (output zeros, state untouched); >= num_slots: output NaN
  const float* gamma;       // [H]
  float* out;               // [B, H, d] fp32 contiguous
  int H; float scale;
  int ahead;                // L2 read-ahead distance in (request, head) pairs; 0: none
  int first_wave;           // pairs the launch's first wave of blocks holds: their state is not prefetched
  const float* q_norm_w; const float* k_norm_w; float eps;   // fused prologue (may be null)
  const int64_t* positions; const float* inv_freq; int rot_half;  // rot_half = rotary_dim / 2 (0: no RoPE)
};

// COLS = state columns per block (64: 2 blocks per (request, head) at d=128; 32: 4 smaller blocks, a shorter tail).
template <int D, int COLS, bool FUSE, typename in_t>
__global__ void __launch_bounds__(kDecodeThreads) lightning_decode_kernel(DecodeArgs a) {
  constexpr int TPR = COLS / 4;                  // threads per row
  constexpr int RPP = kDecodeThreads / TPR;      // rows per pass
  constexpr int PASSES = D / RPP;
  constexpr int kDecodeCols = COLS;
  static_assert(TPR >= 1 && TPR <= 32 && 32 % TPR == 0 && D % RPP == 0, "bad decode tiling");
  __shared__ __align__(16) float sq[D], sk[D], sv[COLS];
  __shared__ __align__(16) float red[kDecodeThreads / 32][COLS];

  const int col0 = blockIdx.x * COLS;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  float* out = a.out + ((int64_t)b * a.H + h) * D + col0;

  // The slots and the state were written by earlier steps (or the step's input copies), not by the kernel before
  // this one (the prologue that makes q, k, v): under a dependent launch the state loads are issued before pdl_wait,
  // so their latency overlaps the prologue's tail.
  const int64_t slot = a.slots[b];
  if (slot < 0 || slot >= a.num_slots) {
    pdl_wait();
    pdl_launch_dependents();
    if (tid < kDecodeCols) out[tid] = slot < 0 ? 0.f : __int_as_float(0x7fc00000);
    return;
  }
  const int c4 = tid % TPR, r0 = tid / TPR;
  float* S = a.state + ((int64_t)slot * a.H + h) * D * D + col0 + c4 * 4;
  float4 st[PASSES];
#pragma unroll
  for (int p = 0; p < PASSES; ++p) st[p] = *reinterpret_cast<const float4*>(S + (int64_t)(r0 + RPP * p) * D);
  // The read-ahead's target slot is read only now: the prefetch then leaves one slot read after the block's own
  // loads, which gives those the DRAM first. Targets in the first wave are skipped: those blocks are already
  // loading their state themselves. (H200, both together: +0.4-0.5% at 256 rows, +2.5-3% at 64;
  // bench/results/decode_first_wave_ab*.json.)
  if (a.ahead > 0 && tid == 0) {
    const int n = b * a.H + h + a.ahead;
    if (n < (int)gridDim.z * a.H && n >= a.first_wave) {
      const int b2 = n / a.H;
      const int64_t ahead_slot = a.slots[b2];
      const int ahead_h = n - b2 * a.H;
      if (ahead_slot >= 0 && ahead_slot < a.num_slots)
        prefetch_l2(a.state + (ahead_slot * a.H + ahead_h) * D * D + (int64_t)blockIdx.x * D * COLS, D * COLS * 4);
    }
  }
  pdl_wait();
  pdl_launch_dependents();

  const in_t* q = static_cast<const in_t*>(a.q) + b * a.q_sb + h * a.q_sh;
  const in_t* k = static_cast<const in_t*>(a.k) + b * a.k_sb + h * a.k_sh;
  const in_t* v = static_cast<const in_t*>(a.v) + b * a.v_sb + h * a.v_sh;
  for (int i = tid; i < D; i += kDecodeThreads) { sq[i] = to_float(q[i]); sk[i] = to_float(k[i]); }
  if (tid < kDecodeCols) sv[tid] = to_float(v[col0 + tid]);
  __syncthreads();

  if constexpr (FUSE) {
    const int w = tid >> 5, lane = tid & 31;
    if (w < 2) {
      float* x = w == 0 ? sq : sk;
      const float* wt = w == 0 ? a.q_norm_w : a.k_norm_w;
      if (wt != nullptr) {
        float ss = 0.f;
        for (int i = lane; i < D; i += 32) ss += x[i] * x[i];
        const float r = rsqrtf(warp_sum(ss) / D + a.eps);
        __syncwarp();
        for (int i = lane; i < D; i += 32) x[i] = wt[i] * (x[i] * r);
        __syncwarp();
      }
      if (a.rot_half > 0) {
        const float pos = (float)a.positions[b];
        for (int i = lane; i < a.rot_half; i += 32) {
          float s, c;
          sincosf(pos * a.inv_freq[i], &s, &c);
          const float x1 = x[i], x2 = x[i + a.rot_half];
          x[i] = x1 * c - x2 * s;
          x[i + a.rot_half] = x2 * c + x1 * s;
        }
      }
    }
    __syncthreads();
  }

  const float g = a.gamma[h];
  const float4 vv = reinterpret_cast<const float4*>(sv)[c4];
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int p = 0; p < PASSES; ++p) {
    const int i = r0 + RPP * p;
    const float ki = sk[i], qi = sq[i];
    float4 s = st[p];
    s.x = fmaf(g, s.x, ki * vv.x); s.y = fmaf(g, s.y, ki * vv.y);
    s.z = fmaf(g, s.z, ki * vv.z); s.w = fmaf(g, s.w, ki * vv.w);
    acc.x = fmaf(qi, s.x, acc.x); acc.y = fmaf(qi, s.y, acc.y);
    acc.z = fmaf(qi, s.z, acc.z); acc.w = fmaf(qi, s.w, acc.w);
    *reinterpret_cast<float4*>(S + (int64_t)i * D) = s;
  }
  // A warp holds 32/TPR rows of the same columns: fold them with shuffles, then fold the 8 warps in shared memory.
#pragma unroll
  for (int o = TPR; o < 32; o <<= 1) {
    acc.x += __shfl_xor_sync(0xffffffffu, acc.x, o); acc.y += __shfl_xor_sync(0xffffffffu, acc.y, o);
    acc.z += __shfl_xor_sync(0xffffffffu, acc.z, o); acc.w += __shfl_xor_sync(0xffffffffu, acc.w, o);
  }
  if ((tid & 31) < TPR) reinterpret_cast<float4*>(red[tid >> 5])[c4] = acc;
  __syncthreads();
  if (tid < kDecodeCols) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeThreads / 32; ++w) o += red[w][tid];
    out[tid] = o * a.scale;
  }
}

// (request, head) pairs that the first wave of blocks covers: SMs x resident blocks per SM / blocks per pair. Queried
// once per kernel and device into `cache` (by device index; 0 = not yet known): the occupancy call would otherwise
// cost host time on every eager decode step.
static int first_wave_pairs(const void* kernel, int blocks_per_pair, std::atomic<int> (&cache)[64]) {
  const int dev = at::cuda::current_device();
  int pairs = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (pairs == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kDecodeThreads, 0));
    pairs = std::max(1, at::cuda::getCurrentDeviceProperties()->multiProcessorCount * per_sm / blocks_per_pair);
    if (dev < 64) cache[dev].store(pairs, std::memory_order_relaxed);
  }
  return pairs;
}

template <int D, int COLS, bool FUSE, typename in_t>
static void launch_decode(DecodeArgs a, int B, cudaStream_t stream) {
  static std::atomic<int> first_wave[64];  // one cache per kernel instantiation
  const auto kernel = lightning_decode_kernel<D, COLS, FUSE, in_t>;
  if (a.ahead > 0) a.first_wave = first_wave_pairs(reinterpret_cast<const void*>(kernel), D / COLS, first_wave);
  C10_CUDA_CHECK(launch_dependent(kernel, dim3(D / COLS, a.H, B), kDecodeThreads, 0, stream, a));
}

template <int D, int COLS, bool FUSE>
static void launch_decode_typed(const DecodeArgs& a, at::ScalarType dt, int B, cudaStream_t stream) {
  switch (dt) {
    case at::kFloat: launch_decode<D, COLS, FUSE, float>(a, B, stream); break;
    case at::kBFloat16: launch_decode<D, COLS, FUSE, __nv_bfloat16>(a, B, stream); break;
    case at::kHalf: launch_decode<D, COLS, FUSE, __half>(a, B, stream); break;
    default: RL_CHECK(false, "lightning_decode: q/k/v dtype must be float32, bfloat16 or float16");
  }
}

// Validation of shapes and dtypes happens in the Python wrapper; here only what the kernel relies on.
void lightning_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& state,
                      const at::Tensor& slots, const at::Tensor& gamma, at::Tensor& out, double scale,
                      const c10::optional<at::Tensor>& q_norm_w, const c10::optional<at::Tensor>& k_norm_w,
                      double eps, const c10::optional<at::Tensor>& positions,
                      const c10::optional<at::Tensor>& inv_freq, int64_t cols, int64_t ahead) {
  const int B = q.size(0), H = q.size(1), D = q.size(2);
  RL_CHECK(D == 64 || D == 128, "lightning_decode: head dim must be 64 or 128, got ", D);
  RL_CHECK(cols == 64 || cols == 32, "lightning_decode: cols per block must be 64 or 32");
  RL_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "lightning_decode: last dim must be contiguous");
  RL_CHECK(state.is_contiguous() && state.scalar_type() == at::kFloat, "lightning_decode: state must be contiguous fp32");
  RL_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat, "lightning_decode: out must be contiguous fp32");
  RL_CHECK(slots.scalar_type() == at::kLong && gamma.scalar_type() == at::kFloat, "lightning_decode: slots int64, gamma fp32");
  if (B == 0) return;
  const at::cuda::CUDAGuard guard(q.device());
  DecodeArgs a{};
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr();
  a.q_sb = q.stride(0); a.q_sh = q.stride(1); a.k_sb = k.stride(0); a.k_sh = k.stride(1);
  a.v_sb = v.stride(0); a.v_sh = v.stride(1);
  a.state = state.data_ptr<float>(); a.num_slots = state.size(0);
  a.slots = slots.data_ptr<int64_t>(); a.gamma = gamma.data_ptr<float>(); a.out = out.data_ptr<float>();
  a.H = H; a.scale = (float)scale; a.eps = (float)eps;
  RL_CHECK(ahead >= 0, "lightning_decode: prefetch distance must be >= 0");
  a.ahead = (int)std::min<int64_t>(ahead, (int64_t)B * H);  // farther targets are past the batch's end
  a.q_norm_w = q_norm_w ? q_norm_w->data_ptr<float>() : nullptr;
  a.k_norm_w = k_norm_w ? k_norm_w->data_ptr<float>() : nullptr;
  a.positions = positions ? positions->data_ptr<int64_t>() : nullptr;
  a.inv_freq = inv_freq ? inv_freq->data_ptr<float>() : nullptr;
  a.rot_half = inv_freq ? (int)inv_freq->numel() : 0;
  const bool fuse = a.q_norm_w != nullptr || a.k_norm_w != nullptr || a.rot_half > 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto dt = q.scalar_type();
  if (D == 128 && cols == 64) {
    fuse ? launch_decode_typed<128, 64, true>(a, dt, B, stream) : launch_decode_typed<128, 64, false>(a, dt, B, stream);
  } else if (D == 128) {
    fuse ? launch_decode_typed<128, 32, true>(a, dt, B, stream) : launch_decode_typed<128, 32, false>(a, dt, B, stream);
  } else if (cols == 64) {
    fuse ? launch_decode_typed<64, 64, true>(a, dt, B, stream) : launch_decode_typed<64, 64, false>(a, dt, B, stream);
  } else {
    fuse ? launch_decode_typed<64, 32, true>(a, dt, B, stream) : launch_decode_typed<64, 32, false>(a, dt, B, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ringlinear
