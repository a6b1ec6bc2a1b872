// Lightning-attention prefill on Hopper tensor cores (wgmma, bf16 operands, fp32 accumulate), varlen.
//
// Math per sequence and head (gamma = per-head decay, chunk of C = 64 tokens, incoming state S [d_k, d_v]):
//   O[t]  = d^-1/2 ( gamma^{t+1} q_t S  +  sum_{s<=t} gamma^{t-s} (q_t . k_s) v_s )
//   S    <- gamma^{C} S + sum_s gamma^{C-1-s} k_s^T v_s
//
// A single sequence is cut into blocks of L tokens (a multiple of C) so that batch 1 fills the GPU:
//   pass 1 (state kernel, STATE_ONLY): every block but the last computes its local state delta from zero (walking
//           its chunks last to first, so that pass 3 finds its first chunks' k and v still in L2);
//   pass 2 (scan kernel): walks the blocks of a sequence in order, turning deltas into the state entering each
//           block (the initial state comes from the request's slot, or zeros);
//   pass 3 (output kernel): every block starts from its entering state and walks its chunks, writing outputs;
//           the last block of a sequence writes the final state back into the request's slot.
//
// Fused QK prologue (PRO): q and k may come raw from the qkv projection; the kernel then applies the lightning
// layers' per-head RMSNorm (fp32, * weight) and NeoX RoPE on the first 64 of 128 dims to each chunk's tiles in shared
// memory, the qkv_prologue kernel's arithmetic with its sum of squares in the same order: bitwise what that kernel
// would have written, without its pass over q and k (which wrote them for this kernel to read back: 0.8 ms a
// layer at 128k on the H200, against 0.45 ms the fusion adds here).
//
// Register layout of one CTA (D/16 warps = D/64 warpgroups): warp w owns rows j = 16w..16w+15 of S^T (v index j,
// k index i) as wgmma accumulators, so S^T doubles as the register A operand of O^T = S^T Q^T.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace ringlinear {

constexpr int kChunk = 64;

// One CTA's work: tokens [start, start+len) of one sequence (all heads share the item, grid.y = head).
struct PrefillItem {
  int32_t start, len;  // token range in the packed [T_total, H, D] tensors
  int32_t ws;          // workspace index: pass 1 writes its delta there, pass 3 reads its entering state there
  int32_t slot_out;    // pass 3 only: >= 0 -> write the final state to state[slot_out] (last block of a sequence)
};

// q, k, v, o as bf16 tensor maps of [T_total, H, D] (each with its own token stride: v may be read in place from the
// qkv projection), with the 128-byte swizzle. The output pass reads whole chunk tiles, both 64-column halves in one box
// of a 4-d view [64 columns][T][halves][H] (its halves land one after the other, as swz lays them out), and stores o's
// whole chunks from swizzled staging the same way. Each TMA instruction holds its issuing thread ~60 cycles, on the
// critical path of its warpgroup: one box per tile instead of one per half took the first warpgroup's loads and store
// from ~570 to ~390 cycles of a chunk (-DRL_PREFILL_STAMPS clocks, H200). The state pass reads k and v as 3-d boxes of
// one half each (64 tokens x 1 head x 64 columns): the 4-d boxes measured no faster there.
struct PrefillMaps {
  CUtensorMap k_half, v_half;  // state pass
  CUtensorMap q, k, v, o;      // output pass
};

struct PrefillArgs {
  __nv_bfloat16* o;                                                        // [T_total, H, D] contiguous (also a map)
  float* ws;                                                               // [n_ws, H, D, D]
  float* state;                                                            // [slots, H, D, D]
  const PrefillItem* items;
  const float* gamma;  // [H] per-head decay in (0, 1]
  int H; float scale;
  // PRO only: QK-norm weights [D] (fp32), eps, and the rope tables [T_total, tab_stride] (fp32, halves duplicated:
  // columns 0..31 are read) of the packed tokens
  const float* q_w; const float* k_w; float eps;
  const float* cos; const float* sin; int64_t tab_stride;
};

// Every chunk GEMM is a warpgroup MMA that reads its shared-memory operand once per 64 rows (the previous kernel's
// per-warp mma.sync re-read it for every 16 rows and was shared-memory bound: 1.43 ms at T=128k vs 1.01 ms, H200).
// Warpgroup wg owns rows j = 64 wg .. 64 wg + 63 of the CTA's S^T; the wgmma accumulator layout per warp is the
// mma.sync m16n8 one (csrc/wgmma.cuh). Per chunk:
//   scores  P = Q K^T           SS, split over the warpgroups along s; decay mask in registers -> P tile (bf16)
//   inter   O^T = S^T Q^T        RS (S^T from registers, rounded to bf16), then scaled by gamma^{t+1} per column t
//   intra   O^T += V^T P^T       RS (V^T fragments from ldmatrix.trans)
//   state   S^T = g^C S^T + (V^T diag(gamma^{Lc-1-s})) K   RS, the decay folded into the A fragments (no Kd tile)
// Tiles are [64, D] bf16 in 128-byte-swizzled halves of 64 columns (swz), loaded NBUF - 1 chunks ahead as TMA boxes
// that one thread issues (an mbarrier per stage). The per-thread cp.async copies this replaced cost the compute warps
// issue slots: the output pass was 7-11% slower at 16k-128k, the state pass 3-8% (H200, bitwise the same results).
RL_DEVICE int swz(int r, int c) { return (c >> 6) * (kChunk * 64) + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7); }

template <int D, bool STATE_ONLY, int JS, bool PRO = false>
struct PrefillSmem {
  static constexpr int JW = D / JS;  // S^T rows per CTA
  static constexpr int NWG = JW / 64;
  static constexpr int THREADS = NWG * 128;
  static constexpr int NBUF = 3;
  static constexpr int TILES = STATE_ONLY ? 2 : 3;  // per stage: (Q,) K, V
  static constexpr int TILE = kChunk * D;
  static constexpr int P_AT = NBUF * TILES * TILE;  // score tile [C, C], one swizzled half
  static constexpr int OS_AT = P_AT + kChunk * kChunk;  // output staging [C, JW] in swizzled halves, double-buffered
  static constexpr int OS_SIZE = kChunk * JW;
  static constexpr int POW_AT = STATE_ONLY ? P_AT : OS_AT + 2 * OS_SIZE;  // gamma^k and scale gamma^k, k <= C
  // PRO: the rope tables of two chunks ([buf][4 float4][THREADS]: each thread's own cos / sin pieces), then the
  // q and k norm weights [2][D] (bytes from the aligned start)
  static constexpr int TAB_B = (POW_AT * 2 + 2 * (kChunk + 1) * 4 + 15) / 16 * 16;
  static constexpr int NW_B = TAB_B + (PRO ? 2 * 4 * THREADS * 16 : 0);
  static constexpr int BAR_B = (NW_B + (PRO ? 2 * D * 4 : 0) + 7) / 8 * 8;  // NBUF mbarriers: stage b's tiles landed
  static constexpr int BYTES = BAR_B + 8 * NBUF + 1024;                       // + alignment slack
  static constexpr int MIN_BLOCKS = STATE_ONLY && !PRO ? 2 : 1;
  static_assert(BYTES <= 227 * 1024, "shared memory");
};

RL_DEVICE uint32_t scale_bf16x2(uint32_t x, float f0, float f1) {
  __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&x);
  const float2 fx = __bfloat1622float2(v);
  return pack_bf16(fx.x * f0, fx.y * f1);
}

// The fused QK prologue's share of one thread (PRO; D = 128, 256 threads, the rotary dims 0..63): thread (row, j)
// normalises 16-byte pieces j, j + 4 (dims e < 32 and their RoPE partners e + 32), 8 + j and 12 + j of one row of a
// chunk's q / k tile, once the stage's mbarrier says the tile landed. It copies its rows' cos / sin pieces itself
// (cp.async), so it reads them after its own wait, without a barrier. The 4 threads of a row are adjacent lanes; the 8
// threads of a 16-byte shared-memory phase take rows r and r + 4, whose swizzled pieces fall in different banks.
struct QkPrologue {
  int row, j;
  RL_DEVICE explicit QkPrologue(int tid) {
    const int g4 = (tid & 31) >> 2;
    row = (tid >> 5) * 8 + ((g4 >> 1) | ((g4 & 1) << 2));
    j = tid & 3;
  }
  // cos[8j .. 8j+7], sin[8j .. 8j+7] of the row's token into tab[4][THREADS] float4 (tab + tid). Through L1 (.ca): a
  // thread's two 16-byte pieces share a 32-byte sector, which the second copy then finds there instead of in L2 (the
  // 16 heads' CTAs read every table row: 0.11 ms of 1.63 a layer at 128k on the H200 went to those second reads).
  RL_DEVICE void load_tables(float4* tab, int tid, int nt, const float* cos, const float* sin, int64_t tok,
                             int64_t stride, int rows) const {
    const bool ok = row < rows;
    const int64_t off = ok ? (tok + row) * stride + 8 * j : 0;
    const int bytes = ok ? 16 : 0;
    cp_async_16_ca(tab + tid, cos + off, bytes);
    cp_async_16_ca(tab + nt + tid, cos + off + 4, bytes);
    cp_async_16_ca(tab + 2 * nt + tid, sin + off, bytes);
    cp_async_16_ca(tab + 3 * nt + tid, sin + off + 4, bytes);
  }
  // In place: x -> w * (x * rsqrt(mean(x^2) + eps)) per head row, then RoPE; rows past `rows` stay zero.
  RL_DEVICE void apply(__nv_bfloat16* tile, const float* w, const float4* tab, int tid, int nt, float eps,
                       int rows) const {
    if (row >= rows) return;  // the row's 4 lanes skip together
    float f[4][8];
    uint4 raw[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      raw[i] = *reinterpret_cast<const uint4*>(tile + swz(row, 8 * (j + 4 * i)));
      const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&raw[i]);
#pragma unroll
      for (int x = 0; x < 8; ++x) f[i][x] = __bfloat162float(e[x]);
    }
    // qkv_prologue sums its lane's 8 elements (piece p), then shuffles over the head's 16 lanes with xor 8, 4, 2, 1:
    // ((s_j + s_j+8) + (s_j+4 + s_j+12)), then xor 2 and 1 over j - the same additions here.
    float s[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[i] = 0.f;
#pragma unroll
      for (int x = 0; x < 8; ++x) s[i] += f[i][x] * f[i][x];
    }
    float ss = (s[0] + s[2]) + (s[1] + s[3]);
    const unsigned mask = 0xFu << (threadIdx.x & 28);
    ss += __shfl_xor_sync(mask, ss, 2);
    ss += __shfl_xor_sync(mask, ss, 1);
    const float rs = rsqrtf(__fmul_rn(ss, 1.f / 128) + eps);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 w0 = *reinterpret_cast<const float4*>(w + 8 * (j + 4 * i));
      const float4 w1 = *reinterpret_cast<const float4*>(w + 8 * (j + 4 * i) + 4);
      const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
      for (int x = 0; x < 8; ++x) f[i][x] = __fmul_rn(wv[x], __fmul_rn(f[i][x], rs));
    }
    const float4 c0 = tab[tid], c1 = tab[nt + tid], s0 = tab[2 * nt + tid], s1 = tab[3 * nt + tid];
    const float cs[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
    const float sn[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
    for (int x = 0; x < 8; ++x) {  // dims e = 8j + x and e + 32 (the tables repeat over the halves)
      const float a = f[0][x], b = f[1][x];
      f[0][x] = __fadd_rn(__fmul_rn(a, cs[x]), __fmul_rn(-b, sn[x]));
      f[1][x] = __fadd_rn(__fmul_rn(b, cs[x]), __fmul_rn(a, sn[x]));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint4 o;
      o.x = pack_bf16(f[i][0], f[i][1]); o.y = pack_bf16(f[i][2], f[i][3]);
      o.z = pack_bf16(f[i][4], f[i][5]); o.w = pack_bf16(f[i][6], f[i][7]);
      *reinterpret_cast<uint4*>(tile + swz(row, 8 * (j + 4 * i))) = o;
    }
  }
};

// Timestamps of a CTA's phases, in a profiling build only (-DRL_PREFILL_STAMPS; bench/profile_prefill_phases.py):
// thread 0 reads the GPU's ns timer at each STAMP and, when the CTA ends, stores them in prefill_stamps' buffer
// [pass: state, scan, output][CTA][stamp] (read back by prefill_stamps(); a device buffer, not printf, so that the
// gaps between the launches are the real ones).
constexpr int kStampCtas = 4096;
#ifdef RL_PREFILL_STAMPS
__device__ unsigned long long g_prefill_stamps[3][kStampCtas][8];
#define STAMP(i) do { if (threadIdx.x == 0) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(stamps[i])); } while (0)
#define STAMPS_STORE(pass)                                                                                          \
  do {                                                                                                              \
    const unsigned cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);                           \
    if (threadIdx.x == 0 && cta < kStampCtas)                                                                       \
      for (int i_ = 0; i_ < 8; ++i_) g_prefill_stamps[pass][cta][i_] = stamps[i_];                                \
  } while (0)
// Inside the chunk loop, the first warp of each warpgroup also reads the SM's cycle counter at the loop's phase
// boundaries (CLK) for the first kClockChunks chunks: [pass: state, output][CTA][warpgroup][chunk][phase], read back
// by prefill_chunk_clocks(). Cycles, not ns: the phases of a chunk last tens to hundreds of cycles.
constexpr int kClockChunks = 8, kClockPhases = 12;
__device__ unsigned g_prefill_chunk_clocks[2][kStampCtas][2][kClockChunks][kClockPhases];
#define CLK_ROW(pass)                                                                                               \
  const unsigned clk_cta_ = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);                        \
  unsigned* clk_row = clk_cta_ < kStampCtas && threadIdx.x < 256                                                    \
                          ? &g_prefill_chunk_clocks[pass][clk_cta_][threadIdx.x >> 7][0][0]                        \
                          : nullptr
#define CLK(c, i)                                                                                                   \
  do {                                                                                                              \
    if ((threadIdx.x & 127) == 0 && clk_row != nullptr && (c) < kClockChunks) {                                     \
      unsigned t_;                                                                                                  \
      asm volatile("mov.u32 %0, %%clock;" : "=r"(t_)::"memory");                                                   \
      clk_row[(c) * kClockPhases + (i)] = t_;                                                                       \
    }                                                                                                               \
  } while (0)
#else
#define STAMP(i) do { } while (0)
#define STAMPS_STORE(pass) do { } while (0)
#define CLK_ROW(pass) do { } while (0)
#define CLK(c, i) do { } while (0)
#endif

template <int D, bool STATE_ONLY, int JS, bool PRO>
__global__ void __launch_bounds__(PrefillSmem<D, STATE_ONLY, JS, PRO>::THREADS,
                                  PrefillSmem<D, STATE_ONLY, JS, PRO>::MIN_BLOCKS)
    lightning_prefill_kernel(PrefillArgs a, const __grid_constant__ PrefillMaps maps) {
  using SM = PrefillSmem<D, STATE_ONLY, JS, PRO>;
  static_assert(!PRO || (D == 128 && SM::THREADS == 256), "the fused QK prologue: head dim 128, one CTA per state");
  constexpr int NT = SM::THREADS, NBUF = SM::NBUF, JW = SM::JW, NWG = SM::NWG;
  constexpr int NS = D / 2;       // S^T accumulators per thread: [64, D] per warpgroup
  constexpr int SCN = 64 / NWG;   // score columns s per warpgroup
  constexpr int KI = STATE_ONLY ? 0 : 1, VI = KI + 1;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u));
  __nv_bfloat16* Ps = smem + SM::P_AT;
  // gamma^k and scale * gamma^k (k = 0..C): every decay factor of a chunk is one of these; the output scale rides on
  // the factors of P and of the inter-chunk term.
  float* pw = reinterpret_cast<float*>(smem + SM::POW_AT);
  float* pws = pw + kChunk + 1;
  uint8_t* smem_b = reinterpret_cast<uint8_t*>(smem);
  float4* tabs = reinterpret_cast<float4*>(smem_b + SM::TAB_B);  // PRO: [2][4][THREADS]
  float* qk_w = reinterpret_cast<float*>(smem_b + SM::NW_B);      // PRO: q weights [D], k weights [D]

  [[maybe_unused]] unsigned long long stamps[8] = {};
  STAMP(0);
  CLK_ROW(STATE_ONLY ? 0 : 1);
  const PrefillItem it = a.items[blockIdx.x];
  const int h = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, tig = lane & 3;
  const int jbase = blockIdx.z * JW;
  const int jl = 16 * w + g;  // this thread's S^T rows jl, jl + 8 (CTA-local)
  const int64_t tok_stride = (int64_t)a.H * D;  // of o
  const int64_t base = (int64_t)it.start * tok_stride + (int64_t)h * D;
  const float log2_gamma = log2f(a.gamma[h]);
  if (tid <= kChunk) {  // visible after the loop's first barrier
    pw[tid] = exp2f((float)tid * log2_gamma);
    pws[tid] = pw[tid] * a.scale;
  }
  if constexpr (PRO) {  // read by every thread's first prologue: this block's barrier below
    if (tid < D) qk_w[tid] = a.q_w[tid];
    else if (tid < 2 * D) qk_w[tid] = a.k_w[tid - D];
  }
  const QkPrologue pro(tid);

  // st[4n + x]: S^T[jbase + jl + 8 (x >> 1)][8n + 2 tig + (x & 1)]
  float st[NS];
  if constexpr (STATE_ONLY) {
    // Launched plainly: what it reads is complete. Letting the scan launch now puts its blocks on the idle SMs, where
    // they wait for this pass to finish (common.cuh's contract: pdl_wait, then pdl_launch_dependents).
    pdl_wait();
    pdl_launch_dependents();
#pragma unroll
    for (int i = 0; i < NS; ++i) st[i] = 0.f;
  }
  // Output pass, a dependent of the scan: its entering state is the scan's output, read after pdl_wait.
  auto load_entering_state = [&]() {
    const float* S = a.ws + ((int64_t)it.ws * a.H + h) * D * D + jbase + jl;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int i = 8 * n + 2 * tig;
      st[4 * n] = S[i * D]; st[4 * n + 1] = S[(i + 1) * D];
      st[4 * n + 2] = S[i * D + 8]; st[4 * n + 3] = S[(i + 1) * D + 8];
    }
  };

  const int nchunks = (it.len + kChunk - 1) / kChunk;
  // The state pass walks its block backwards (its delta is a sum, each chunk's term scaled by the decay to the block's
  // end), so the chunks it read last are the ones the output pass reads first: still in L2 when that pass starts.
  auto chunk_at = [&](int c) { return STATE_ONLY ? nchunks - 1 - c : c; };
  auto rows_of = [&](int c) { return min(kChunk, it.len - chunk_at(c) * kChunk); };
  auto tile = [&](int buf, int which) { return smem + (buf * SM::TILES + which) * SM::TILE; };
  const uint32_t bar0 = smem_addr(smem_b + SM::BAR_B);
  auto stage_bar = [&](int c) { return bar0 + 8 * (c % NBUF); };
  // Chunk c into stage c % NBUF: thread 0 issues the tiles' TMA boxes (rows past the tensor's end arrive as zeros);
  // PRO: every thread copies its share of the chunk's rope tables (cp.async, one group per chunk).
  auto issue = [&](int c) {
    if (c < nchunks) {
      const int buf = c % NBUF, t0 = it.start + chunk_at(c) * kChunk;
      if (tid == 0) {
        mbar_expect_tx(stage_bar(c), SM::TILES * SM::TILE * 2);
#pragma unroll
        for (int which = 0; which < SM::TILES; ++which) {
          if constexpr (STATE_ONLY) {
            const CUtensorMap* map = which == VI ? &maps.v_half : &maps.k_half;
#pragma unroll
            for (int hf = 0; hf < D / 64; ++hf)
              tma_load_3d(smem_addr(tile(buf, which)) + hf * kChunk * 128, map, stage_bar(c), 64 * hf, h, t0);
          } else {
            const CUtensorMap* map = which == VI ? &maps.v : which == KI ? &maps.k : &maps.q;
            tma_load_4d(smem_addr(tile(buf, which)), map, stage_bar(c), 0, t0, 0, h);
          }
        }
      }
      if constexpr (PRO)
        pro.load_tables(tabs + (c & 1) * 4 * NT, tid, NT, a.cos, a.sin, t0, a.tab_stride, rows_of(c));
    }
    if constexpr (PRO) cp_async_commit();  // empty groups keep the wait count uniform
  };
  // Rows past the block's end in chunk c's k and v tiles: zeros (TMA brought whatever follows; with zero decay
  // factors those rows add nothing to the state unless they hold inf or nan).
  auto zero_tail = [&](int c) {
    const int rows = rows_of(c);
    if (rows == kChunk) return;
    const int pieces = (kChunk - rows) * (D / 8);
    for (int i = tid; i < 2 * pieces; i += NT) {
      const int p = i % pieces;
      *reinterpret_cast<uint4*>(tile(c % NBUF, i < pieces ? KI : VI) + swz(rows + p / (D / 8), 8 * (p % (D / 8)))) =
          make_uint4(0, 0, 0, 0);
    }
  };
  // PRO: chunk c's q / k tiles through the prologue, once they have landed (the stage's mbarrier; this thread's table
  // copies by its own cp.async wait before the call). Chunk c's tables sit in buffer c % 2: loaded with the chunk's
  // tiles, two chunks ahead of use at most (the loop issues chunk c + 2 after chunk c - 1's prologue, past a barrier).
  auto prologue = [&](int c) {
    if constexpr (PRO) {
      mbar_wait(stage_bar(c), (c / NBUF) & 1);
      const int buf = c % NBUF, rows = rows_of(c);
      const float4* tab = tabs + (c & 1) * 4 * NT;
      if constexpr (!STATE_ONLY) pro.apply(tile(buf, 0), qk_w, tab, tid, NT, a.eps, rows);
      pro.apply(tile(buf, KI), qk_w + D, tab, tid, NT, a.eps, rows);
    }
  };
  if (tid == 0) {
    for (int i = 0; i < NBUF; ++i) mbar_init(bar0 + 8 * i, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the barriers (and with PRO the norm weights)
  STAMP(1);  // (the decays read: pw needed them)
  // The decay factors of this thread's score fragments (scale * gamma^{t-s}, 0 where s > t), of its inter-product
  // columns t (scale * gamma^{t+1}) and of its V^T fragments' rows s in a full chunk (gamma^{C-1-s}, the state update):
  // the same every chunk, so read once. Looked up per chunk, with the comparisons, the mask's made the mask phase ~660
  // cycles of a ~3 470-cycle chunk, the tensor cores idle meanwhile (-DRL_PREFILL_STAMPS chunk clocks, H200); held in
  // registers it takes ~250. The V^T factors in registers took ~70 cycles more off a chunk; the jsplit-2 kernel still
  // looks them up (with 16 more registers it spilled).
  constexpr bool VF = !STATE_ONLY && JS == 1;
  [[maybe_unused]] float mf[STATE_ONLY ? 1 : SCN / 2], af[STATE_ONLY ? 1 : 16], vf[VF ? 16 : 1];
  if constexpr (!STATE_ONLY) {
    const int s0 = (w >> 2) * SCN;
#pragma unroll
    for (int n = 0; n < SCN / 8; ++n)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int t = 16 * (w & 3) + g + 8 * (x >> 1), s = s0 + 8 * n + 2 * tig + (x & 1);
        mf[4 * n + x] = s <= t ? pws[t - s] : 0.f;
      }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      af[2 * n] = pws[8 * n + 2 * tig + 1];
      af[2 * n + 1] = pws[8 * n + 2 * tig + 2];
    }
  }
  if constexpr (VF) {
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {  // s = 16 kk + 2 tig + {0, 1, 8, 9}
      const int s = 16 * kk + 2 * tig;
      vf[4 * kk] = pw[kChunk - 1 - s]; vf[4 * kk + 1] = pw[kChunk - 2 - s];
      vf[4 * kk + 2] = pw[kChunk - 9 - s]; vf[4 * kk + 3] = pw[kChunk - 10 - s];
    }
  }
#pragma unroll
  for (int c = 0; c < NBUF - 1; ++c) issue(c);
  STAMP(2);  // thread 0's first boxes issued (the item row read)
  if constexpr (PRO) {
    if (nchunks > 0) {
      cp_async_wait<NBUF - 2>();  // chunk 0's rope tables (this thread's copies)
      prologue(0);
    }
  }
  if constexpr (!STATE_ONLY) {
    // Everything above reads q, k, v, the tables and weights: made before the state pass (two launches back), so
    // under a dependent launch it overlaps the scan. The entering states and every global write wait for the scan.
    pdl_wait();
    STAMP(3);
    pdl_launch_dependents();
    load_entering_state();
    STAMP(4);
  }
  // Output chunk c: staging buffer c % 2 ([C, JW] in swizzled halves, as swz) -> the JW columns of this CTA in o.
  // A whole chunk leaves as JW / 64 TMA boxes that thread 0 stores (a bulk group; before the buffer is written again,
  // two chunks later, thread 0 waits for the group's reads). A partial chunk is the last of its block, and the rows
  // past it belong to the next sequence or block: every thread stores its 16-byte pieces of the chunk's rows. The
  // per-thread stores of whole chunks that the boxes replaced made the output pass 1-7% slower at 16k-128k (H200).
  auto out_stage = [&](int c) { return smem + SM::OS_AT + (c & 1) * SM::OS_SIZE; };
  // (each thread always stores the same 16-byte piece of every OUT_ROWS-th row)
  constexpr int OUT_PIECES = JW / 8, OUT_ROWS = NT / OUT_PIECES;
  static_assert(NT % OUT_PIECES == 0 && kChunk % OUT_ROWS == 0, "output copy shape");
  const int out_t0 = tid / OUT_PIECES, out_p = 8 * (tid % OUT_PIECES);
  auto store_out = [&](int c) {
    const int rows = min(kChunk, it.len - c * kChunk);
    if (rows == kChunk) {
      if (tid == 0) {
        tma_store_4d(&maps.o, smem_addr(out_stage(c)), 0, it.start + c * kChunk, jbase / 64, h);
        bulk_commit();
      }
      return;
    }
    const __nv_bfloat16* Os = out_stage(c);
    __nv_bfloat16* o = a.o + base + (int64_t)(c * kChunk + out_t0) * tok_stride + jbase + out_p;
#pragma unroll
    for (int i = 0; i < kChunk / OUT_ROWS; ++i)
      if (out_t0 + i * OUT_ROWS < rows)
        *reinterpret_cast<uint4*>(o + (int64_t)i * OUT_ROWS * tok_stride) =
            *reinterpret_cast<const uint4*>(Os + swz(out_t0 + i * OUT_ROWS, out_p));
  };

  for (int c = 0; c < nchunks; ++c) {
    CLK(c, 0);
    mbar_wait(stage_bar(c), (c / NBUF) & 1);
    CLK(c, 1);
    if (c == 0) STAMP(5);
    zero_tail(c);
    if constexpr (!STATE_ONLY) if (tid == 0) bulk_wait_read();  // chunk c - 2's boxes have left staging buffer c % 2
    fence_proxy_async();  // zero_tail's and chunk c - 1's staging writes, before wgmma / TMA (async proxy) read them
    __syncthreads();  // chunk c landed everywhere; every warp is done with chunk c - 1's buffers, P and Os
    CLK(c, 2);
    issue(c + NBUF - 1);
    if constexpr (!STATE_ONLY) if (c > 0) store_out(c - 1);  // its staging buffer is complete (the barrier above)
    CLK(c, 3);
    const int buf = c % NBUF;
    const int Lc = rows_of(c);
    const uint32_t k_addr = smem_addr(tile(buf, KI));
    const __nv_bfloat16* V = tile(buf, VI);

    // A fragments of V^T (rows j of this warp, k = s), shared by the intra-chunk product and the state update.
    uint32_t va[kChunk / 16][4];
    auto load_va = [&]() {
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk)
        ldmatrix_x4_trans(va[kk][0], va[kk][1], va[kk][2], va[kk][3],
                          V + swz(16 * kk + (lane & 7) + (lane >> 4) * 8, jbase + 16 * w + ((lane >> 3) & 1) * 8));
    };

    float acc[32];  // O^T [64 j, 64 t] of this warpgroup: acc[4n + x] = (jl + 8 (x >> 1), t = 8n + 2 tig + (x & 1))
    if constexpr (!STATE_ONLY) {
      const uint32_t q_addr = smem_addr(tile(buf, 0));
      const int s0 = (w >> 2) * SCN;
      float sc[SCN / 2];  // P [64 t, SCN s]: sc[4n + x] = (t = 16 (w & 3) + g + 8 (x >> 1), s = s0 + 8n + 2 tig + (x & 1))
      // S^T as bf16 A fragments, all packed before the batch: reading accumulator registers between the wgmmas of a
      // batch makes ptxas drain the pipeline before each read.
      uint32_t sa[D / 16][4];
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        sa[kk][0] = pack_bf16(st[8 * kk], st[8 * kk + 1]); sa[kk][1] = pack_bf16(st[8 * kk + 2], st[8 * kk + 3]);
        sa[kk][2] = pack_bf16(st[8 * kk + 4], st[8 * kk + 5]); sa[kk][3] = pack_bf16(st[8 * kk + 6], st[8 * kk + 7]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t koff = (kk >> 2) * (kChunk * 128) + (kk & 3) * 32;  // 16 columns of i: half, then 32 bytes
        const uint64_t dq = smem_desc(q_addr + koff, 16, 1024);
        if constexpr (SCN == 32) wgmma_m64n32k16_ss(sc, dq, smem_desc(k_addr + s0 * 128 + koff, 16, 1024), kk > 0);
        else wgmma_m64n64k16_ss(sc, dq, smem_desc(k_addr + s0 * 128 + koff, 16, 1024), kk > 0);
        wgmma_m64n64k16_rs<0>(acc, sa[kk][0], sa[kk][1], sa[kk][2], sa[kk][3], dq, kk > 0);
      }
      wgmma_commit();
      CLK(c, 4);
      load_va();
      wgmma_wait<0>();
      CLK(c, 5);
      fence_regs(sc);
      fence_regs(acc);
#pragma unroll
      for (int n = 0; n < SCN / 8; ++n) {
        const int s = s0 + 8 * n + 2 * tig;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int t = 16 * (w & 3) + g + 8 * half;
          *reinterpret_cast<uint32_t*>(Ps + swz(t, s)) =
              pack_bf16(sc[4 * n + 2 * half] * mf[4 * n + 2 * half], sc[4 * n + 2 * half + 1] * mf[4 * n + 2 * half + 1]);
        }
      }
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        acc[4 * n] *= af[2 * n]; acc[4 * n + 1] *= af[2 * n + 1];
        acc[4 * n + 2] *= af[2 * n]; acc[4 * n + 3] *= af[2 * n + 1];
      }
      CLK(c, 6);
      fence_proxy_async();
      __syncthreads();  // the whole score tile is in P
      CLK(c, 7);
      const uint32_t p_addr = smem_addr(Ps);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk)
        wgmma_m64n64k16_rs<0>(acc, va[kk][0], va[kk][1], va[kk][2], va[kk][3], smem_desc(p_addr + kk * 32, 16, 1024), 1);
      wgmma_commit();
    }

    // State update with the per-row decay gamma^{Lc-1-s} applied to the V^T fragments (0 past the chunk's end); the
    // state pass scales them by the decay over the tokens after the chunk instead of decaying the sum.
    float fb = 1.f;
    if constexpr (STATE_ONLY) {
      fb = exp2f((float)(it.len - chunk_at(c) * kChunk - Lc) * log2_gamma);
      load_va();
    } else {
      const float fc = pw[Lc];
#pragma unroll
      for (int i = 0; i < NS; ++i) st[i] *= fc;
    }
    uint32_t vd_own[STATE_ONLY ? 1 : kChunk / 16][4];  // the state pass scales va in place
    auto& vd = *reinterpret_cast<uint32_t(*)[kChunk / 16][4]>(STATE_ONLY ? &va[0][0] : &vd_own[0][0]);
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      const int s = 16 * kk + 2 * tig;
      auto f = [&](int x) { return x < Lc ? fb * pw[Lc - 1 - x] : 0.f; };
      float f0, f1, f8, f9;
      if (VF && Lc == kChunk) {
        f0 = vf[4 * kk]; f1 = vf[4 * kk + 1]; f8 = vf[4 * kk + 2]; f9 = vf[4 * kk + 3];
      } else {
        f0 = f(s); f1 = f(s + 1); f8 = f(s + 8); f9 = f(s + 9);
      }
      vd[kk][0] = scale_bf16x2(va[kk][0], f0, f1); vd[kk][1] = scale_bf16x2(va[kk][1], f0, f1);
      vd[kk][2] = scale_bf16x2(va[kk][2], f8, f9); vd[kk][3] = scale_bf16x2(va[kk][3], f8, f9);
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      const uint64_t dk = smem_desc(k_addr + kk * 2048, kChunk * 128, 1024);  // K as MN-major B: rows s, i contiguous
      if constexpr (D == 128) wgmma_m64n128k16_rs<1>(st, vd[kk][0], vd[kk][1], vd[kk][2], vd[kk][3], dk, 1);
      else wgmma_m64n64k16_rs<1>(st, vd[kk][0], vd[kk][1], vd[kk][2], vd[kk][3], dk, 1);
    }
    wgmma_commit();
    CLK(c, 8);

    if constexpr (!STATE_ONLY) {
      wgmma_wait<1>();  // the intra-chunk product is done (the state update may still run)
      CLK(c, 9);
      fence_regs(acc);
      // O^T fragments -> staging rows t (stmatrix.trans: each 8x8 block of (j, t) lands as 8 rows t of 8 columns j).
      __nv_bfloat16* Os = out_stage(c);
      const int r = lane & 7, m = lane >> 3;
#pragma unroll
      for (int pp = 0; pp < 4; ++pp) {
        const float* x = acc + 8 * pp;
        stmatrix_x4_trans(Os + swz(16 * pp + (m >> 1) * 8 + r, 16 * w + (m & 1) * 8), pack_bf16(x[0], x[1]),
                          pack_bf16(x[2], x[3]), pack_bf16(x[4], x[5]), pack_bf16(x[6], x[7]));
      }
      CLK(c, 10);
    }
    if constexpr (PRO) {  // the next chunk's prologue while the state update runs on the tensor cores
      if (c + 1 < nchunks) {
        cp_async_wait<NBUF - 2>();  // chunk c + 1's rope tables (issued before c + 2's)
        prologue(c + 1);
      }
    }
    wgmma_wait<0>();
    CLK(c, 11);
    fence_regs(st);
  }
  STAMP(6);
  if constexpr (!STATE_ONLY) {
    if (nchunks > 0) {
      fence_proxy_async();
      __syncthreads();
      store_out(nchunks - 1);
      if (tid == 0) bulk_wait_read();  // shared memory must outlive the boxes' reads
    }
  }

  float* dst = nullptr;
  if constexpr (STATE_ONLY) {
    dst = a.ws + ((int64_t)it.ws * a.H + h) * D * D;
  } else {
    if (it.slot_out >= 0) dst = a.state + ((int64_t)it.slot_out * a.H + h) * D * D;
  }
  if (dst != nullptr) {
    dst += jbase + jl;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int i = 8 * n + 2 * tig;
      dst[i * D] = st[4 * n]; dst[(i + 1) * D] = st[4 * n + 1];
      dst[i * D + 8] = st[4 * n + 2]; dst[(i + 1) * D + 8] = st[4 * n + 3];
    }
  }
  STAMP(7);
  STAMPS_STORE(STATE_ONLY ? 0 : 2);
}

// One sequence of the scan: blocks b = 0..nblk-1 at workspace [ws_begin, ws_begin + nblk); every block but the last
// has exactly blk_len tokens.
struct ScanSeq {
  int32_t ws_begin, nblk, blk_len, use_init;
  int64_t slot;
};

// Pass 2: ws[b] <- state entering block b (reading the delta it held); empty sequences set their final state.
// after_state_pass: the state pass ran just before (this kernel is its dependent), so everything but the deltas was
// made two launches back or earlier (common.cuh's contract) and is read before pdl_wait: the plan row, the decay and
// the slot's initial state. After the wait only the deltas are left to load: all of a thread's at once when the
// sequence has at most U blocks (the one-wave plans have 8 a head at H=16). Hoisting the reads and loading the
// deltas in one round took two dependent memory round trips off the path between the passes (10.1 -> 6.5 us
// standalone, 1.02-1.045x the whole prefill: H200).
__global__ void __launch_bounds__(256) lightning_prefill_scan_kernel(float* ws, float* state, const ScanSeq* seqs,
                                                                     const float* gamma, int H, int DD,
                                                                     bool after_state_pass) {
  constexpr int U = 8;  // deltas in flight per thread
  [[maybe_unused]] unsigned long long stamps[8] = {};
  STAMP(0);
  if (!after_state_pass) pdl_wait();  // the slot states may be the previous kernel's outputs
  const ScanSeq sq = seqs[blockIdx.z];
  const int h = blockIdx.y;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;  // float4 index inside one [D, D] state
  const bool live = e * 4 < DD;
  float4* slot_state = reinterpret_cast<float4*>(state + (sq.slot * H + h) * (int64_t)DD) + e;
  float4 S = live && sq.use_init ? *slot_state : make_float4(0.f, 0.f, 0.f, 0.f);
  const float gL = exp2f((float)sq.blk_len * log2f(gamma[h]));
  if (after_state_pass) pdl_wait();  // the state pass's deltas
  pdl_launch_dependents();
  STAMP(1);
  if (!live) return;
  if (sq.nblk == 0) {
    if (!sq.use_init) *slot_state = S;
    STAMP(7);
    STAMPS_STORE(1);
    return;
  }
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
  STAMP(7);
  STAMPS_STORE(1);
}

// The state pass launches plainly (it reads q, k, v as soon as it starts); the output pass as a dependent of the scan.
template <int D, bool STATE_ONLY, int JS, bool PRO = false>
static void launch_prefill(const PrefillArgs& a, const PrefillMaps& maps, int n_items, cudaStream_t stream) {
  if (n_items == 0) return;
  using SM = PrefillSmem<D, STATE_ONLY, JS, PRO>;
  auto kern = lightning_prefill_kernel<D, STATE_ONLY, JS, PRO>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SM::BYTES));
  const dim3 grid(n_items, a.H, JS);
  if constexpr (STATE_ONLY) kern<<<grid, SM::THREADS, SM::BYTES, stream>>>(a, maps);
  else C10_CUDA_CHECK(launch_dependent(kern, grid, SM::THREADS, SM::BYTES, stream, a, maps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#ifdef RL_PREFILL_STAMPS
// A profiling buffer (a __device__ array) as a CPU tensor of `sizes`, and the buffer cleared.
template <typename Buf>
static at::Tensor read_and_clear(const Buf& buf, at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor out = at::empty(sizes, dtype);
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(out.data_ptr(), buf, sizeof(buf)));
  void* dev = nullptr;
  C10_CUDA_CHECK(cudaGetSymbolAddress(&dev, buf));
  C10_CUDA_CHECK(cudaMemset(dev, 0, sizeof(buf)));
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  return out;
}
#endif

// The stamps of the prefill launches since the last call (int64 [3 passes: state, scan, output][CTA][8], ns; 0 where a
// CTA or stamp did not run), and the buffer cleared; empty unless built with -DRL_PREFILL_STAMPS.
at::Tensor prefill_stamps() {
#ifdef RL_PREFILL_STAMPS
  return read_and_clear(g_prefill_stamps, {3, kStampCtas, 8}, at::kLong);
#else
  return at::empty({0}, at::kLong);
#endif
}

// The chunk loop's cycle stamps since the last call (int32 [2 passes: state, output][CTA][warpgroup][chunk][phase]
// holding uint32 cycles; 0 where not run), and the buffer cleared; empty unless built with -DRL_PREFILL_STAMPS.
at::Tensor prefill_chunk_clocks() {
#ifdef RL_PREFILL_STAMPS
  return read_and_clear(g_prefill_chunk_clocks, {2, kStampCtas, 2, kClockChunks, kClockPhases}, at::kInt);
#else
  return at::empty({0}, at::kInt);
#endif
}

static bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// x: bf16 [T, H, D] rows (unit channel stride, head stride D, its own token stride) in boxes of one chunk's half tile.
static CUtensorMap half_tile_map(const at::Tensor& x) {
  const int64_t dims[3] = {x.size(2), x.size(1), x.size(0)}, strides[2] = {x.stride(1), x.stride(0)};
  const uint32_t box[3] = {64, 1, kChunk};
  return bf16_map(x.data_ptr(), 3, dims, strides, box);
}
// The same rows as the 4-d view [64 columns][T][D / 64 halves][H] (a half's stride is 64 columns), in boxes of one
// chunk's `halves` consecutive halves: the box lands half after half, each 64 rows of 128 bytes.
static CUtensorMap tile_map(const at::Tensor& x, int halves) {
  const int64_t dims[4] = {64, x.size(0), x.size(2) / 64, x.size(1)}, strides[3] = {x.stride(0), 64, x.stride(1)};
  const uint32_t box[4] = {64, kChunk, (uint32_t)halves, 1};
  return bf16_map(x.data_ptr(), 4, dims, strides, box);
}

// items_state / items_out: int32 [n, 4] (PrefillItem); scan_seqs: int32 [N, 6] (ScanSeq, slot as two int32 words).
// q, k, v: bf16 [T, H, D] with unit channel stride and head stride D, 16-byte aligned token strides, each its own
// (views of the qkv projection's columns are read in place); o contiguous.
// q_w, k_w, cos, sin (all or none): the fused QK prologue on raw q, k (D = 128, jsplit 1): norm weights fp32 [D],
// rope tables fp32 [T, 64] (ops.rope_cos_sin of the tokens' positions: halves duplicated), eps the norm's.
void lightning_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& state,
                       at::Tensor& ws, const at::Tensor& items_state, const at::Tensor& items_out,
                       const at::Tensor& scan_seqs, const at::Tensor& gamma, double scale, int64_t jsplit,
                       const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w,
                       const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, double eps) {
  const int H = q.size(1), D = q.size(2);
  RL_CHECK(jsplit == 1 || (jsplit == 2 && D == 128), "lightning_prefill: jsplit must be 1, or 2 with head dim 128");
  RL_CHECK(D == 64 || D == 128, "lightning_prefill: head dim must be 64 or 128, got ", D);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v})
    RL_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 3 && t->size(0) == q.size(0) && t->size(1) == H &&
                 t->size(2) == D && t->stride(2) == 1 && t->stride(1) == D && t->stride(0) % 8 == 0 &&
                 t->stride(0) >= (int64_t)H * D && aligned16(t->data_ptr()),
             "lightning_prefill: q/k/v must be bf16 [T, H, D] with unit channel stride, head stride D and a token "
             "stride that is a multiple of 8, 16-byte aligned");
  RL_CHECK(o.is_contiguous() && o.scalar_type() == at::kBFloat16 && o.sizes() == q.sizes() && aligned16(o.data_ptr()),
           "lightning_prefill: o must be contiguous, 16-byte aligned bf16 [T, H, D]");
  RL_CHECK(state.is_contiguous() && state.scalar_type() == at::kFloat, "lightning_prefill: state must be contiguous fp32");
  RL_CHECK(ws.is_contiguous() && ws.scalar_type() == at::kFloat, "lightning_prefill: workspace must be contiguous fp32");
  const at::cuda::CUDAGuard guard(q.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  PrefillArgs a{};
  a.o = reinterpret_cast<__nv_bfloat16*>(o.data_ptr());
  a.ws = ws.data_ptr<float>(); a.state = state.data_ptr<float>();
  RL_CHECK(gamma.is_contiguous() && gamma.scalar_type() == at::kFloat && gamma.numel() == H, "lightning_prefill: gamma must be fp32 [H]");
  a.gamma = gamma.data_ptr<float>(); a.H = H; a.scale = (float)scale;
  const bool pro = q_w.has_value();
  RL_CHECK(k_w.has_value() == pro && cos.has_value() == pro && sin.has_value() == pro,
           "lightning_prefill: the fused QK prologue needs q_w, k_w, cos and sin together");
  if (pro) {
    RL_CHECK(D == 128 && jsplit == 1, "lightning_prefill: the fused QK prologue needs head dim 128 and jsplit 1");
    for (const at::Tensor* t : {&*q_w, &*k_w})
      RL_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == D && aligned16(t->data_ptr()),
               "lightning_prefill: QK-norm weights must be contiguous, 16-byte aligned fp32 [", D, "]");
    for (const at::Tensor* t : {&*cos, &*sin})
      RL_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == q.size(0) && t->size(1) == 64 &&
                   t->stride(1) == 1 && t->stride(0) % 4 == 0 && aligned16(t->data_ptr()),
               "lightning_prefill: rope tables must be fp32 [T, 64] rows with unit column stride, 16-byte aligned");
    RL_CHECK(cos->stride(0) == sin->stride(0), "lightning_prefill: cos and sin must share a row stride");
    a.q_w = q_w->data_ptr<float>(); a.k_w = k_w->data_ptr<float>(); a.eps = (float)eps;
    a.cos = cos->data_ptr<float>(); a.sin = sin->data_ptr<float>(); a.tab_stride = cos->stride(0);
  }

  a.items = reinterpret_cast<const PrefillItem*>(items_state.data_ptr<int32_t>());
  const int n_state = items_state.size(0), n_out = items_out.size(0);
  PrefillMaps maps{};
  if (n_state + n_out > 0)  // o: each CTA of a jsplit stores its own D / jsplit columns
    maps = PrefillMaps{half_tile_map(k), half_tile_map(v), tile_map(q, D / 64), tile_map(k, D / 64),
                       tile_map(v, D / 64), tile_map(o, D / 64 / (int)jsplit)};
  if (pro) launch_prefill<128, true, 1, true>(a, maps, n_state, stream);
  else if (D == 64) launch_prefill<64, true, 1>(a, maps, n_state, stream);
  else if (jsplit == 1) launch_prefill<128, true, 1>(a, maps, n_state, stream);
  else launch_prefill<128, true, 2>(a, maps, n_state, stream);

  const int n_seq = scan_seqs.size(0);
  if (n_seq > 0) {
    const int DD = D * D;
    dim3 grid((DD / 4 + 255) / 256, H, n_seq);
    C10_CUDA_CHECK(launch_dependent(lightning_prefill_scan_kernel, grid, 256, 0, stream, a.ws, a.state,
                                    reinterpret_cast<const ScanSeq*>(scan_seqs.data_ptr<int32_t>()), a.gamma, H, DD,
                                    n_state > 0));
  }
  a.items = reinterpret_cast<const PrefillItem*>(items_out.data_ptr<int32_t>());
  if (pro) launch_prefill<128, false, 1, true>(a, maps, n_out, stream);
  else if (D == 64) launch_prefill<64, false, 1>(a, maps, n_out, stream);
  else if (jsplit == 1) launch_prefill<128, false, 1>(a, maps, n_out, stream);
  else launch_prefill<128, false, 2>(a, maps, n_out, stream);
}

}  // namespace ringlinear
