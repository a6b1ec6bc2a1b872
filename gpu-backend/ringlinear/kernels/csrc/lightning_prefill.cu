// Lightning-attention prefill on tensor cores (mma.sync m16n8k16, bf16 operands, fp32 accumulate), varlen.
//
// Math per sequence and head (gamma = per-head decay, chunk of C = 64 tokens, incoming state S [d_k, d_v]):
//   O[t]  = d^-1/2 ( gamma^{t+1} q_t S  +  sum_{s<=t} gamma^{t-s} (q_t . k_s) v_s )
//   S    <- gamma^{C} S + sum_s gamma^{C-1-s} k_s^T v_s
//
// A single sequence is cut into blocks of L tokens (a multiple of C) so that batch 1 fills the GPU:
//   pass 1 (state kernel, STATE_ONLY): every block but the last computes its local state delta from zero;
//   pass 2 (scan kernel): walks the blocks of a sequence in order, turning deltas into the state entering each
//           block (the initial state comes from the request's slot, or zeros);
//   pass 3 (output kernel): every block starts from its entering state and walks its chunks, writing outputs;
//           the last block of a sequence writes the final state back into the request's slot.
//
// Register layout of one CTA (D/16 warps): warp w owns rows j = 16w..16w+15 of S^T (v index j, k index i) as
// mma accumulators, so S^T doubles as the A operand of O^T = S^T Q^T without touching shared memory.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace ringlinear {

constexpr int kChunk = 64;
constexpr int kPRow = kChunk + 8;  // padded shared-memory row of the score tile (bank-conflict-free ldmatrix)

// One CTA's work: tokens [start, start+len) of one sequence (all heads share the item, grid.y = head).
struct PrefillItem {
  int32_t start, len;  // token range in the packed [T_total, H, D] tensors
  int32_t ws;          // workspace index: pass 1 writes its delta there, pass 3 reads its entering state there
  int32_t slot_out;    // pass 3 only: >= 0 -> write the final state to state[slot_out] (last block of a sequence)
};

struct PrefillArgs {
  const __nv_bfloat16* q; const __nv_bfloat16* k; const __nv_bfloat16* v;  // [T_total, H, D] contiguous
  __nv_bfloat16* o;                                                        // [T_total, H, D]
  float* ws;                                                               // [n_ws, H, D, D]
  float* state;                                                            // [slots, H, D, D]
  const PrefillItem* items;
  const float* gamma;  // [H] per-head decay in (0, 1]
  int H; float scale;
};

// JS = CTAs that share one (block, head), each owning D/JS rows j of S^T; NBUF = Q/K/V buffers (2: next chunk's
// cp.async overlaps this chunk; 1: the output pass with JS = 2 fits two CTAs per SM instead).
template <int D, bool STATE_ONLY, int JS>
struct PrefillSmem {
  static constexpr int NBUF = (STATE_ONLY || JS == 1) ? 2 : 1;
  static constexpr int ROW = D + 8;
  static constexpr int TILE = kChunk * ROW;  // elements of one [C, D] tile
  // Tile slots: [Q x NBUF] K x NBUF, V x NBUF, Kd, [Os, P]; the state pass has no Q, Os or P.
  static constexpr int K_AT = STATE_ONLY ? 0 : NBUF, V_AT = K_AT + NBUF, KD_AT = V_AT + NBUF, OS_AT = KD_AT + 1,
                       P_AT = OS_AT + 1;
  static constexpr int BYTES = STATE_ONLY ? (KD_AT + 1) * TILE * 2 : (P_AT * TILE + kChunk * kPRow) * 2;
  static constexpr int THREADS = D * 2 / JS;  // D / 16 / JS warps
  static constexpr int MIN_BLOCKS = (STATE_ONLY || JS > 1) ? 2 : 1;
};

template <int D>
RL_DEVICE void load_chunk_async(__nv_bfloat16* dst, const __nv_bfloat16* src, int64_t tok_stride, int first_valid_row_end,
                                int tid, int nthreads) {
  constexpr int ROW = D + 8;
  constexpr int PIECES = D / 8;
  for (int idx = tid; idx < kChunk * PIECES; idx += nthreads) {
    const int r = idx / PIECES, p = idx % PIECES;
    const bool ok = r < first_valid_row_end;
    cp_async_16(dst + r * ROW + p * 8, ok ? src + (int64_t)r * tok_stride + p * 8 : src, ok ? 16 : 0);
  }
}

template <int D, bool STATE_ONLY, int JS>
__global__ void __launch_bounds__(PrefillSmem<D, STATE_ONLY, JS>::THREADS, PrefillSmem<D, STATE_ONLY, JS>::MIN_BLOCKS)
    lightning_prefill_kernel(PrefillArgs a) {
  using SM = PrefillSmem<D, STATE_ONLY, JS>;
  constexpr int NT = SM::THREADS, NW = NT / 32, NBUF = SM::NBUF;
  constexpr int ROW = SM::ROW, TILE = SM::TILE;
  constexpr int JW = D / JS;  // rows j of S^T owned by this CTA
  constexpr int NI = D / 8;  // n8 tiles of S^T along i
  extern __shared__ __align__(16) __nv_bfloat16 smem[];
  // Q, K, V double buffers at smem + (slot + buf) * TILE (computed, not indexed, to stay out of local memory).
  __nv_bfloat16* Kd = smem + SM::KD_AT * TILE;
  __nv_bfloat16* Os = smem + SM::OS_AT * TILE;  // unused by the state pass
  __nv_bfloat16* Ps = smem + SM::P_AT * TILE;   // unused by the state pass

  const PrefillItem it = a.items[blockIdx.x];
  const int h = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, tig = lane & 3;
  const int jbase = blockIdx.z * JW;
  const float lg = log2f(a.gamma[h]);
  const int64_t tok_stride = (int64_t)a.H * D;
  const int64_t base = (int64_t)it.start * tok_stride + (int64_t)h * D;

  // S^T accumulators: st[n][.] covers j = 16w + g (+8), i = 8n + 2tig (+1).
  float st[NI][4];
  const int j0 = jbase + 16 * w + g;
  if constexpr (STATE_ONLY) {
#pragma unroll
    for (int n = 0; n < NI; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
  } else {
    const float* S = a.ws + ((int64_t)it.ws * a.H + h) * D * D;
#pragma unroll
    for (int n = 0; n < NI; ++n) {
      const int i = 8 * n + 2 * tig;
      st[n][0] = S[i * D + j0]; st[n][1] = S[(i + 1) * D + j0];
      st[n][2] = S[i * D + j0 + 8]; st[n][3] = S[(i + 1) * D + j0 + 8];
    }
  }

  const int nchunks = (it.len + kChunk - 1) / kChunk;
  auto issue = [&](int c) {
    const int buf = c % NBUF;
    const int rows = min(kChunk, it.len - c * kChunk);
    const int64_t off = base + (int64_t)c * kChunk * tok_stride;
    if constexpr (!STATE_ONLY) load_chunk_async<D>(smem + buf * TILE, a.q + off, tok_stride, rows, tid, NT);
    // (the whole V tile is loaded even when JS > 1: the intra-chunk product only reads this CTA's columns)
    load_chunk_async<D>(smem + (SM::K_AT + buf) * TILE, a.k + off, tok_stride, rows, tid, NT);
    load_chunk_async<D>(smem + (SM::V_AT + buf) * TILE, a.v + off, tok_stride, rows, tid, NT);
    cp_async_commit();
  };
  if (nchunks > 0) issue(0);

  for (int c = 0; c < nchunks; ++c) {
    const int buf = c % NBUF;
    if (NBUF == 2 && c + 1 < nchunks) { issue(c + 1); cp_async_wait<1>(); } else { cp_async_wait<0>(); }
    __syncthreads();
    const int Lc = min(kChunk, it.len - c * kChunk);
    const __nv_bfloat16* Q = smem + buf * TILE;
    const __nv_bfloat16* K = smem + (SM::K_AT + buf) * TILE;
    const __nv_bfloat16* V = smem + (SM::V_AT + buf) * TILE;

    // Kd[s] = gamma^{Lc-1-s} k_s (rows past Lc are already zero).
    for (int idx = tid; idx < kChunk * (D / 8); idx += NT) {
      const int s = idx / (D / 8), p = idx % (D / 8);
      const float f = s < Lc ? exp2f((float)(Lc - 1 - s) * lg) : 0.f;
      uint4 raw = *reinterpret_cast<const uint4*>(K + s * ROW + p * 8);
      __nv_bfloat162* x = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float2 fx = __bfloat1622float2(x[e]);
        x[e] = __floats2bfloat162_rn(fx.x * f, fx.y * f);
      }
      *reinterpret_cast<uint4*>(Kd + s * ROW + p * 8) = raw;
    }

    if constexpr (!STATE_ONLY) {
      // Scores P[t][s] = gamma^{t-s} (q_t . k_s) for s <= t; 32 m16n8 tiles shared among the warps.
      constexpr int TPW = 32 / NW;
#pragma unroll
      for (int x = 0; x < TPW; x += 2) {
        const int idx = w * TPW + x;
        const int mt = idx >> 3, nt = idx & 7;  // tiles (mt, nt) and (mt, nt+1)
        float pc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        if (8 * nt <= 16 * mt + 15) {
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a0, a1, a2, a3, b0, b1, b2, b3;
            ldmatrix_x4(a0, a1, a2, a3, Q + (16 * mt + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW + 16 * kk + (lane >> 4) * 8);
            ldmatrix_x4(b0, b1, b2, b3, K + (8 * nt + (lane & 7) + (lane >> 4) * 8) * ROW + 16 * kk + ((lane >> 3) & 1) * 8);
            mma_bf16_16816(pc[0], a0, a1, a2, a3, b0, b1);
            mma_bf16_16816(pc[1], a0, a1, a2, a3, b2, b3);
          }
        }
#pragma unroll
        for (int y = 0; y < 2; ++y) {
          const int s = 8 * (nt + y) + 2 * tig;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int t = 16 * mt + g + 8 * half;
            const float p0 = s <= t ? pc[y][2 * half] * exp2f((float)(t - s) * lg) : 0.f;
            const float p1 = s + 1 <= t ? pc[y][2 * half + 1] * exp2f((float)(t - s - 1) * lg) : 0.f;
            *reinterpret_cast<uint32_t*>(Ps + t * kPRow + s) = pack_bf16(p0, p1);
          }
        }
      }
    }
    __syncthreads();

    // A fragments of V^T (m = j of this warp, k = s), reused by the output and the state update.
    uint32_t va[kChunk / 16][4];
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk)
      ldmatrix_x4_trans(va[kk][0], va[kk][1], va[kk][2], va[kk][3],
                        V + (16 * kk + (lane & 7) + (lane >> 4) * 8) * ROW + jbase + 16 * w + ((lane >> 3) & 1) * 8);

    if constexpr (!STATE_ONLY) {
      float acc[kChunk / 8][4];
#pragma unroll
      for (int n = 0; n < kChunk / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
      // Inter-chunk: O^T += S^T Q^T (S^T from registers, rounded to bf16).
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t a0 = pack_bf16(st[2 * kk][0], st[2 * kk][1]);
        const uint32_t a1 = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
        const uint32_t a2 = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        const uint32_t a3 = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
#pragma unroll
        for (int p = 0; p < kChunk / 16; ++p) {
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4(b0, b1, b2, b3, Q + (16 * p + (lane & 7) + (lane >> 4) * 8) * ROW + 16 * kk + ((lane >> 3) & 1) * 8);
          mma_bf16_16816(acc[2 * p], a0, a1, a2, a3, b0, b1);
          mma_bf16_16816(acc[2 * p + 1], a0, a1, a2, a3, b2, b3);
        }
      }
#pragma unroll
      for (int n = 0; n < kChunk / 8; ++n) {
        const int t = 8 * n + 2 * tig;
        const float f0 = exp2f((float)(t + 1) * lg), f1 = exp2f((float)(t + 2) * lg);
        acc[n][0] *= f0; acc[n][1] *= f1; acc[n][2] *= f0; acc[n][3] *= f1;
      }
      // Intra-chunk: O^T += V^T P^T (blocks entirely above the diagonal are skipped).
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
#pragma unroll
        for (int p = 0; p < kChunk / 16; ++p) {
          if (kk > p) continue;
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4(b0, b1, b2, b3, Ps + (16 * p + (lane & 7) + (lane >> 4) * 8) * kPRow + 16 * kk + ((lane >> 3) & 1) * 8);
          mma_bf16_16816(acc[2 * p], va[kk][0], va[kk][1], va[kk][2], va[kk][3], b0, b1);
          mma_bf16_16816(acc[2 * p + 1], va[kk][0], va[kk][1], va[kk][2], va[kk][3], b2, b3);
        }
      }
#pragma unroll
      for (int n = 0; n < kChunk / 8; ++n) {
        const int t = 8 * n + 2 * tig;
        Os[t * ROW + j0] = __float2bfloat16(acc[n][0] * a.scale);
        Os[(t + 1) * ROW + j0] = __float2bfloat16(acc[n][1] * a.scale);
        Os[t * ROW + j0 + 8] = __float2bfloat16(acc[n][2] * a.scale);
        Os[(t + 1) * ROW + j0 + 8] = __float2bfloat16(acc[n][3] * a.scale);
      }
    }

    // State update: S^T = gamma^{Lc} S^T + V^T Kd.
    const float fc = exp2f((float)Lc * lg);
#pragma unroll
    for (int n = 0; n < NI; ++n) { st[n][0] *= fc; st[n][1] *= fc; st[n][2] *= fc; st[n][3] *= fc; }
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
#pragma unroll
      for (int p = 0; p < D / 16; ++p) {
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4_trans(b0, b1, b2, b3, Kd + (16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW + 16 * p + (lane >> 4) * 8);
        mma_bf16_16816(st[2 * p], va[kk][0], va[kk][1], va[kk][2], va[kk][3], b0, b1);
        mma_bf16_16816(st[2 * p + 1], va[kk][0], va[kk][1], va[kk][2], va[kk][3], b2, b3);
      }
    }
    __syncthreads();
    if (NBUF == 1 && c + 1 < nchunks) issue(c + 1);  // single buffer: refill only once every warp is done with it

    if constexpr (!STATE_ONLY) {
      __nv_bfloat16* o = a.o + base + (int64_t)c * kChunk * tok_stride + jbase;
      for (int idx = tid; idx < Lc * (JW / 8); idx += NT) {
        const int t = idx / (JW / 8), p = idx % (JW / 8);
        *reinterpret_cast<uint4*>(o + (int64_t)t * tok_stride + p * 8) =
            *reinterpret_cast<const uint4*>(Os + t * ROW + jbase + p * 8);
      }
    }
  }

  float* dst = nullptr;
  if constexpr (STATE_ONLY) {
    dst = a.ws + ((int64_t)it.ws * a.H + h) * D * D;
  } else {
    if (it.slot_out >= 0) dst = a.state + ((int64_t)it.slot_out * a.H + h) * D * D;
  }
  if (dst != nullptr) {
#pragma unroll
    for (int n = 0; n < NI; ++n) {
      const int i = 8 * n + 2 * tig;
      dst[i * D + j0] = st[n][0]; dst[(i + 1) * D + j0] = st[n][1];
      dst[i * D + j0 + 8] = st[n][2]; dst[(i + 1) * D + j0 + 8] = st[n][3];
    }
  }
}

// One sequence of the scan: blocks b = 0..nblk-1 at workspace [ws_begin, ws_begin + nblk); every block but the last
// has exactly blk_len tokens.
struct ScanSeq {
  int32_t ws_begin, nblk, blk_len, use_init;
  int64_t slot;
};

// Pass 2: ws[b] <- state entering block b (reading the delta it held); empty sequences set their final state.
__global__ void __launch_bounds__(256) lightning_prefill_scan_kernel(float* ws, float* state, const ScanSeq* seqs,
                                                                     const float* gamma, int H, int DD) {
  constexpr int U = 4;  // deltas in flight per thread
  const ScanSeq sq = seqs[blockIdx.z];
  const int h = blockIdx.y;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;  // float4 index inside one [D, D] state
  if (e * 4 >= DD) return;
  float4* slot_state = reinterpret_cast<float4*>(state + (sq.slot * H + h) * (int64_t)DD) + e;
  float4 S = sq.use_init ? *slot_state : make_float4(0.f, 0.f, 0.f, 0.f);
  if (sq.nblk == 0) {
    if (!sq.use_init) *slot_state = S;
    return;
  }
  const float gL = exp2f((float)sq.blk_len * log2f(gamma[h]));
  auto at = [&](int b) { return reinterpret_cast<float4*>(ws + ((int64_t)(sq.ws_begin + b) * H + h) * DD) + e; };
  for (int b0 = 0; b0 < sq.nblk; b0 += U) {
    float4 d[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (b0 + u < sq.nblk - 1) d[u] = *at(b0 + u);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int b = b0 + u;
      if (b < sq.nblk) {
        *at(b) = S;
        if (b < sq.nblk - 1) {
          S.x = fmaf(gL, S.x, d[u].x); S.y = fmaf(gL, S.y, d[u].y);
          S.z = fmaf(gL, S.z, d[u].z); S.w = fmaf(gL, S.w, d[u].w);
        }
      }
    }
  }
}

template <int D, bool STATE_ONLY, int JS>
static void launch_prefill(const PrefillArgs& a, int n_items, cudaStream_t stream) {
  if (n_items == 0) return;
  using SM = PrefillSmem<D, STATE_ONLY, JS>;
  auto kern = lightning_prefill_kernel<D, STATE_ONLY, JS>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SM::BYTES));
  kern<<<dim3(n_items, a.H, JS), SM::THREADS, SM::BYTES, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// items_state / items_out: int32 [n, 4] (PrefillItem); scan_seqs: int32 [N, 6] (ScanSeq, slot as two int32 words).
void lightning_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& state,
                       at::Tensor& ws, const at::Tensor& items_state, const at::Tensor& items_out,
                       const at::Tensor& scan_seqs, const at::Tensor& gamma, double scale, int64_t jsplit) {
  const int H = q.size(1), D = q.size(2);
  RL_CHECK(jsplit == 1 || (jsplit == 2 && D == 128), "lightning_prefill: jsplit must be 1, or 2 with head dim 128");
  RL_CHECK(D == 64 || D == 128, "lightning_prefill: head dim must be 64 or 128, got ", D);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &o})
    RL_CHECK(t->is_contiguous() && t->scalar_type() == at::kBFloat16, "lightning_prefill: q/k/v/o must be contiguous bf16");
  RL_CHECK(state.is_contiguous() && state.scalar_type() == at::kFloat, "lightning_prefill: state must be contiguous fp32");
  RL_CHECK(ws.is_contiguous() && ws.scalar_type() == at::kFloat, "lightning_prefill: workspace must be contiguous fp32");
  const at::cuda::CUDAGuard guard(q.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  PrefillArgs a{};
  a.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  a.k = reinterpret_cast<const __nv_bfloat16*>(k.data_ptr());
  a.v = reinterpret_cast<const __nv_bfloat16*>(v.data_ptr());
  a.o = reinterpret_cast<__nv_bfloat16*>(o.data_ptr());
  a.ws = ws.data_ptr<float>(); a.state = state.data_ptr<float>();
  RL_CHECK(gamma.is_contiguous() && gamma.scalar_type() == at::kFloat && gamma.numel() == H, "lightning_prefill: gamma must be fp32 [H]");
  a.gamma = gamma.data_ptr<float>(); a.H = H; a.scale = (float)scale;

  a.items = reinterpret_cast<const PrefillItem*>(items_state.data_ptr<int32_t>());
  const int n_state = items_state.size(0);
  if (D == 64) launch_prefill<64, true, 1>(a, n_state, stream);
  else if (jsplit == 1) launch_prefill<128, true, 1>(a, n_state, stream);
  else launch_prefill<128, true, 2>(a, n_state, stream);

  const int n_seq = scan_seqs.size(0);
  if (n_seq > 0) {
    const int DD = D * D;
    dim3 grid((DD / 4 + 255) / 256, H, n_seq);
    lightning_prefill_scan_kernel<<<grid, 256, 0, stream>>>(a.ws, a.state, reinterpret_cast<const ScanSeq*>(scan_seqs.data_ptr<int32_t>()),
                                                            a.gamma, H, DD);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  a.items = reinterpret_cast<const PrefillItem*>(items_out.data_ptr<int32_t>());
  const int n_out = items_out.size(0);
  if (D == 64) launch_prefill<64, false, 1>(a, n_out, stream);
  else if (jsplit == 1) launch_prefill<128, false, 1>(a, n_out, stream);
  else launch_prefill<128, false, 2>(a, n_out, stream);
}

}  // namespace ringlinear
