// Sparse MoE pieces for the Ring-linear router and experts (sigmoid scores, expert bias for selection only,
// group-limited top-k), plus the decode-path expert kernels that read only the experts a batch selected.
//
//   moe_route_kernel     one warp per token: scores, group top-2 sums, kept groups, top-k, normalised weights
//   moe_route256_kernel  the same for 256 experts with the scores in registers (8 per lane)
//   moe_align_kernel     one block: per-expert counts, offsets, assignment indices sorted by expert, active experts
//   moe_gate_up_kernel   per (expert, row tile): h = silu(x Wg^T) * (x Wu^T) for the expert's assignments
//   moe_down_kernel      per (expert, row tile): y[a] = w_a * (h Wd^T), written at the assignment's own row; the
//                        weight rows stay in registers across its passes over the tokens
//   moe_sort_*_kernel    grouped path: stable counting sort of the N*k assignments by expert over many blocks
//                        (count -> scan -> scatter), giving sorted ids, their inverse and the gather token of each row
//   moe_swiglu_kernel    h = bf16(silu(g) * u) in fp32 from gate/up rows (one [M, 2I] buffer or two [M, I])
//   moe_combine_kernel   out[n] = bf16(sum_j w[n,j] * ys[row(n,j)] + shared[n]), fixed j order, fp32 accumulation;
//                        optionally followed by the residual add and the next RMSNorm (add_rms_norm's arithmetic)
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

// ids / weights rows hold topk + (append >= 0) entries: with append >= 0 the last one is expert `append` with weight 1
// (the shared expert stored as one more expert, see moe.pack_moe).
__global__ void __launch_bounds__(kRouteWarps * 32) moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                                                             int N, int E, int n_group, int topk_group, int topk,
                                                             bool renormalize, float scaling, int append,
                                                             int32_t* __restrict__ ids, float* __restrict__ weights) {
  extern __shared__ float rsm[];
  pdl_wait();  // the logits are the router GEMM's, just before this kernel
  pdl_launch_dependents();
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
      for (int i = 0; i < gs; ++i) {  // rotated start: lane l reads bank (l * gs + i + l) % 32, not all one bank
        const float x = bs[lane * gs + (i + lane) % gs];
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
    const int kout = topk + (append >= 0);
    for (int r = 0; r < topk; ++r) {
      ids[(int64_t)n * kout + r] = sel_i[r];
      weights[(int64_t)n * kout + r] = sel_w[r] * norm;
    }
    if (append >= 0) {
      ids[(int64_t)n * kout + topk] = append;
      weights[(int64_t)n * kout + topk] = 1.f;
    }
  }
}

// The same selection for 256 experts with the scores in registers: lane l holds experts 8l .. 8l + 7, so a group of
// gs experts is gs / 8 adjacent lanes (group top-2 by xor shuffles), groups are kept by rank, and each top-k round is
// one warp max (__reduce_max_sync) over order-preserving integer keys, ties to the lowest expert (lowest lane, then
// lowest slot) as moe_route_kernel's argmax rounds break them. moe_route_kernel spent ~1 000 instructions per token
// walking shared memory (the router step was ~0.6 ms of a 128k-token prefill layer); this is the path for 256 experts.
constexpr int kRoute256Warps = 8;

RL_DEVICE uint32_t order_key(float x) {  // a < b as floats (no NaN) <=> key(a) < key(b) as unsigned
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kRoute256Warps * 32) moe_route256_kernel(
    const float* __restrict__ logits, const float* __restrict__ bias, int N, int n_group, int topk_group, int topk,
    bool renormalize, float scaling, int append, int32_t* __restrict__ ids, float* __restrict__ weights) {
  constexpr int EPL = 8;  // experts per lane
  pdl_wait();  // the logits are the router GEMM's, just before this kernel
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kRoute256Warps + (threadIdx.x >> 5);
  if (n >= N) return;
  float sc[EPL], key_src[EPL];
  {
    const float4* lg = reinterpret_cast<const float4*>(logits + (int64_t)n * 256 + EPL * lane);
    const float4 a = lg[0], b = lg[1];
    const float l8[EPL] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    float b8[EPL] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (bias != nullptr) {
      const float4 c = __ldg(reinterpret_cast<const float4*>(bias + EPL * lane));
      const float4 d = __ldg(reinterpret_cast<const float4*>(bias + EPL * lane + 4));
      b8[0] = c.x, b8[1] = c.y, b8[2] = c.z, b8[3] = c.w, b8[4] = d.x, b8[5] = d.y, b8[6] = d.z, b8[7] = d.w;
    }
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      sc[j] = __frcp_rn(1.f + expf(-l8[j]));  // == 1 / (1 + exp(-x)) of moe_route_kernel: both correctly rounded
      key_src[j] = sc[j] + b8[j];
    }
  }
  if (topk_group < n_group) {  // keep the topk_group groups with the largest top-2 sums
    const int lanes_per_group = 32 / n_group;  // 256 / n_group experts per group, 8 per lane (n_group | 32)
    float m1 = -INFINITY, m2 = -INFINITY;
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      const float x = key_src[j];
      if (x > m1) { m2 = m1; m1 = x; } else if (x > m2) { m2 = x; }
    }
    for (int o = 1; o < lanes_per_group; o <<= 1) {
      const float a1 = __shfl_xor_sync(0xffffffffu, m1, o), a2 = __shfl_xor_sync(0xffffffffu, m2, o);
      const float hi = fmaxf(m1, a1), lo = fmaxf(fminf(m1, a1), fmaxf(m2, a2));
      m1 = hi, m2 = lo;
    }
    const float mine = m1 + m2;
    const int g = lane / lanes_per_group;
    int rank = 0;
    for (int gg = 0; gg < n_group; ++gg) {
      const float other = __shfl_sync(0xffffffffu, mine, gg * lanes_per_group);
      rank += other > mine || (other == mine && gg < g);
    }
    if (rank >= topk_group) {
#pragma unroll
      for (int j = 0; j < EPL; ++j) key_src[j] = -INFINITY;
    }
  }
  uint32_t key[EPL];
#pragma unroll
  for (int j = 0; j < EPL; ++j) key[j] = order_key(key_src[j]);  // >= 1 for any non-NaN score: 0 marks a pick
  float sum = 0.f, my_p = 0.f;
  int my_id = 0;
  for (int r = 0; r < topk; ++r) {
    uint32_t best = key[0];
    int jb = 0;
#pragma unroll
    for (int j = 1; j < EPL; ++j)
      if (key[j] > best) best = key[j], jb = j;
    const uint32_t top = __reduce_max_sync(0xffffffffu, best);
    const int win = __ffs(__ballot_sync(0xffffffffu, best == top)) - 1;
    float p = 0.f;
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      if (j == jb) p = sc[j];
      if (lane == win && j == jb) key[j] = 0u;
    }
    p = __shfl_sync(0xffffffffu, p, win);
    const int e = EPL * win + __shfl_sync(0xffffffffu, jb, win);
    if (lane == r) my_p = p, my_id = e;
    sum += p;
  }
  const int kout = topk + (append >= 0);
  const float norm = renormalize ? scaling / (sum + 1e-20f) : scaling;
  if (lane < topk) {
    ids[(int64_t)n * kout + lane] = my_id;
    weights[(int64_t)n * kout + lane] = my_p * norm;
  }
  if (lane == 0 && append >= 0) {
    ids[(int64_t)n * kout + topk] = append;
    weights[(int64_t)n * kout + topk] = 1.f;
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

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, <= 1024); total = the block's sum.
RL_DEVICE int block_exclusive_scan(int v, int* warp_tot, int& total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_tot[w] = x;
  __syncthreads();
  int base = 0;
  total = 0;
  for (int i = 0; i < nw; ++i) {
    const int t = warp_tot[i];
    base += i < w ? t : 0;
    total += t;
  }
  __syncthreads();  // warp_tot may be reused
  return base + x - v;
}

// Decode steps (a few tokens): moe_route_kernel's selection and moe_align_kernel's sort in one launch of one block
// (each was ~5-10 us of a 1-token step for a few hundred cycles of work: one warp walking the experts serially).
// Selection by ranks: expert e is picked r-th when r experts beat it (higher biased score, or equal and lower index) -
// the order moe_route_kernel's argmax rounds give, so both kernels pick the same experts with the same weights
// (the weight sum is taken in the same pick order). NaN scores rank last. The sort is deterministic: an expert's
// assignments in ascending order, the active experts ascending.
constexpr int kSmallRouteThreads = 256;
constexpr int kSmallRouteMaxTokens = 4;
constexpr int kSmallRouteMaxK = 33;  // top-k <= 32, + the appended shared expert

struct SmallRouteArgs {
  const float* bias;
  int N, E, n_group, topk_group, topk;
  bool renormalize;
  float scaling;
  int append, E_out;
  int32_t* ids; float* weights; int32_t* offsets; int32_t* sorted; int32_t* active;
};

// The whole routing + sort of a.N tokens by one block; logits [N, E] fp32 (read through L2: another block may have
// just written them). bias_tid: expert threadIdx.x's bias when the caller loaded it already (bias_ready).
RL_DEVICE void route_align_block(const float* logits, const SmallRouteArgs& a, float bias_tid = 0.f, bool bias_ready = false) {
  const float* __restrict__ bias = a.bias;
  const int N = a.N, E = a.E, n_group = a.n_group, topk_group = a.topk_group, topk = a.topk, append = a.append;
  const int E_out = a.E_out;
  const bool renormalize = a.renormalize;
  const float scaling = a.scaling;
  int32_t* __restrict__ ids = a.ids;
  float* __restrict__ weights = a.weights;
  int32_t* __restrict__ offsets = a.offsets;
  int32_t* __restrict__ sorted = a.sorted;
  int32_t* __restrict__ active = a.active;
  __shared__ float sc[kMaxExperts];
  __shared__ __align__(16) float bs[kMaxExperts];  // biased scores (selection only); read as float4 by the rank loop
  __shared__ int cnt[kMaxExperts + 1];
  __shared__ float gscore[32];
  __shared__ int kept[32];  // the kept groups, best first
  __shared__ float sel_w[32];
  __shared__ int sel_i[32];
  __shared__ int aid[kSmallRouteMaxTokens * kSmallRouteMaxK];
  __shared__ int warp_tot[kSmallRouteThreads / 32];
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
  const int kout = topk + (append >= 0), gs = E / n_group;
  const bool limited = topk_group < n_group;
  const bool warp_groups = gs == 32 && E <= nt;  // Ring's 8 x 32: warp w holds group w, one expert per thread
  for (int n = 0; n < N; ++n) {
    const float* lg = logits + (int64_t)n * E;
    float b_own = -INFINITY;
    for (int e = tid; e < E; e += nt) {
      const float p = 1.f / (1.f + expf(-__ldcg(lg + e)));
      const float b = p + (bias_ready && e == tid ? bias_tid : bias != nullptr ? bias[e] : 0.f);
      sc[e] = p;
      bs[e] = b_own = isnan(b) ? -INFINITY : b;
    }
    if (limited && warp_groups) {  // group score = the sum of its two best (a tie counts twice), by shuffles
      float m1 = b_own;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, o));
      float m2 = b_own == m1 ? -INFINITY : b_own;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m2 = fmaxf(m2, __shfl_xor_sync(0xffffffffu, m2, o));
      if (__popc(__ballot_sync(0xffffffffu, b_own == m1)) > 1) m2 = m1;
      if (lane == 0 && tid < E) gscore[tid >> 5] = m1 + m2;
    }
    __syncthreads();
    if (limited && !warp_groups && tid < n_group) {
      float m1 = -INFINITY, m2 = -INFINITY;
      for (int i = 0, e = tid * gs + tid % gs; i < gs; ++i) {  // rotated start: distinct banks across threads
        const float x = bs[e];
        if (x > m1) { m2 = m1; m1 = x; } else if (x > m2) { m2 = x; }
        if (++e == (tid + 1) * gs) e = tid * gs;
      }
      gscore[tid] = m1 + m2;
    }
    if (limited && !warp_groups) __syncthreads();
    if (tid < n_group) {  // group tid's place among the groups (ties: the lower index first)
      int rank = tid;
      if (limited) {
        const float s = gscore[tid];
        rank = 0;
        for (int g2 = 0; g2 < n_group; ++g2) {
          const float o = gscore[g2];
          rank += (o > s) || (o == s && g2 < tid);
        }
      }
      if (rank < topk_group) kept[rank] = tid;
    }
    __syncthreads();
    // Expert e's place among the kept groups' experts (the others are never picked).
    const int n_kept = limited ? topk_group : n_group;
    for (int e = tid; e < E; e += nt) {
      const int g = e / gs;
      bool mine = !limited;
      for (int j = 0; j < n_kept && !mine; ++j) mine = kept[j] == g;
      if (!mine) continue;
      const float s = bs[e];
      int rank = 0;
      for (int j = 0; j < n_kept; ++j) {
        const int e0 = kept[j] * gs;
        if (gs % 4 == 0) {
          for (int e2 = e0; e2 < e0 + gs; e2 += 4) {
            const float4 o = *reinterpret_cast<const float4*>(bs + e2);
            rank += (o.x > s) || (o.x == s && e2 < e);
            rank += (o.y > s) || (o.y == s && e2 + 1 < e);
            rank += (o.z > s) || (o.z == s && e2 + 2 < e);
            rank += (o.w > s) || (o.w == s && e2 + 3 < e);
          }
        } else {
          for (int e2 = e0; e2 < e0 + gs; ++e2) {
            const float o = bs[e2];
            rank += (o > s) || (o == s && e2 < e);
          }
        }
      }
      if (rank < topk) { sel_i[rank] = e; sel_w[rank] = sc[e]; }
    }
    __syncthreads();
    if (tid < 32) {  // warp 0: the weight sum in pick order (as moe_route_kernel), then one entry per lane
      float sum = 0.f;
      for (int r = 0; r < topk; ++r) sum += sel_w[r];
      const float norm = renormalize ? scaling / (sum + 1e-20f) : scaling;
      if (lane < topk) {
        ids[(int64_t)n * kout + lane] = aid[n * kout + lane] = sel_i[lane];
        weights[(int64_t)n * kout + lane] = sel_w[lane] * norm;
      }
      if (append >= 0 && lane == 0) {
        ids[(int64_t)n * kout + topk] = aid[n * kout + topk] = append;
        weights[(int64_t)n * kout + topk] = 1.f;
      }
    }
    __syncthreads();
  }
  if (N == 1) {  // one token's kout experts are distinct: an expert's first row is the number of smaller ids
    for (int e = tid; e <= E_out; e += nt) {
      int below = 0;
      for (int j = 0; j < kout; ++j) below += aid[j] < e;
      offsets[e] = below;
    }
    if (tid < kout) {
      const int me = aid[tid];
      int pos = 0;
      for (int j = 0; j < kout; ++j) pos += aid[j] < me;
      active[pos] = me;
      sorted[pos] = tid;
    }
    if (tid == 0) active[E_out] = kout;
    return;
  }
  // The sort (moe_align_kernel's outputs): counts, then one scan gives both the experts' starts (low 16 bits) and
  // the active experts' places (high 16 bits); each thread owns a run of `per` consecutive experts.
  const int A = N * kout;
  for (int e = tid; e <= E_out; e += nt) cnt[e] = 0;
  __syncthreads();
  for (int a = tid; a < A; a += nt) atomicAdd(&cnt[aid[a]], 1);
  __syncthreads();
  const int per = (E_out + nt - 1) / nt, e0 = tid * per;
  int rows = 0, used = 0;
  for (int i = 0; i < per; ++i) {
    const int e = e0 + i;
    if (e < E_out) { rows += cnt[e]; used += cnt[e] > 0; }
  }
  int total;
  const int ex = block_exclusive_scan(rows | (used << 16), warp_tot, total);
  int run = ex & 0xffff, place = ex >> 16;
  for (int i = 0; i < per; ++i) {
    const int e = e0 + i;
    if (e < E_out) {
      const int c = cnt[e];
      offsets[e] = run;
      cnt[e] = run;  // from here: the expert's first row
      if (c > 0) active[place++] = e;
      run += c;
    }
  }
  if (tid == 0) {
    offsets[E_out] = total & 0xffff;
    active[E_out] = total >> 16;
  }
  __syncthreads();
  for (int a = tid; a < A; a += nt) {
    const int e = aid[a];
    int pos = cnt[e];
    for (int a2 = 0; a2 < a; ++a2) pos += aid[a2] == e;
    sorted[pos] = a;
  }
}

__global__ void __launch_bounds__(kSmallRouteThreads) moe_route_align_small_kernel(const float* __restrict__ logits,
                                                                                   SmallRouteArgs a) {
  route_align_block(logits, a);
}

// A decode step's whole router in one launch: the bf16 router GEMV x W^T (fp32 accumulation: bf16 products are exact,
// as in the fp32 GEMM of the upcast operands) spread over E/8 blocks, one warp per expert row; the last block to finish
// (a counter, reset by that block for the next launch) routes and sorts. For N <= kSmallRouteMaxTokens tokens.
constexpr int kRouterRowsPerBlock = kSmallRouteThreads / 32;

__global__ void __launch_bounds__(kSmallRouteThreads) moe_router_decode_kernel(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, int D, float* __restrict__ logits,
    int* __restrict__ counter, SmallRouteArgs a) {
  extern __shared__ __align__(16) __nv_bfloat16 xs_router[];  // [N, D]
  constexpr int kChunks = 8;  // 16-byte chunks of the warp's weight row per lane in flight
  const int N = a.N, E = a.E, D8 = D / 8;
  const int lane = threadIdx.x & 31, e = blockIdx.x * kRouterRowsPerBlock + (threadIdx.x >> 5);
  // the bias the last block will need, loaded with the weights (not after the arrival: one L2 round trip less)
  const bool bias_ready = a.bias != nullptr && E <= (int)blockDim.x;
  const float bias_tid = bias_ready && (int)threadIdx.x < E ? __ldg(a.bias + threadIdx.x) : 0.f;
  const uint4* row = reinterpret_cast<const uint4*>(w + (int64_t)min(e, E - 1) * D);
  uint4 wv[kChunks];
  auto load = [&](int base) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = base + lane + 32 * i;
      wv[i] = c < D8 ? __ldg(row + c) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load(0);  // the weights' latency overlaps the staging of x (and, launched dependent, the previous kernel's tail)
  pdl_wait();  // x is the norm just before this kernel
  pdl_launch_dependents();
  for (int i = threadIdx.x; i < N * D8; i += blockDim.x)
    reinterpret_cast<uint4*>(xs_router)[i] = reinterpret_cast<const uint4*>(x)[i];
  __syncthreads();
  float acc[kSmallRouteMaxTokens] = {0.f, 0.f, 0.f, 0.f};
  for (int base = 0; base < D8; base += 32 * kChunks) {
    if (base > 0) load(base);
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = base + lane + 32 * i;
      if (c < D8) {
#pragma unroll
        for (int n = 0; n < kSmallRouteMaxTokens; ++n)
          if (n < N) dot8_acc(acc[n], wv[i], reinterpret_cast<const uint4*>(xs_router + n * D)[c]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < kSmallRouteMaxTokens; ++n) {
    if (n < N) {
      const float v = warp_sum(acc[n]);
      if (lane == 0 && e < E) logits[(int64_t)n * E + e] = v;
    }
  }
  __shared__ bool last;
  __threadfence();  // this block's logits are visible before its arrival is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    if (last) *counter = 0;  // every block has arrived: ready for the next launch (graph replays included)
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  route_align_block(logits, a, bias_tid, bias_ready);
}

// ---------------------------------------------------------------------------------------------------------------
// Decode-path experts: weight-streaming GEMV over the assignments of one expert (MT tokens per pass)
// ---------------------------------------------------------------------------------------------------------------
// One token's step is latency-bound (H200, Ring-mini: 9 experts, 57 MB a layer; with 8-assignment passes the down
// launch ran in 2.2 waves). Steps of <= 2 tokens (the decode path's) take passes of MT = 2 (gate/up) and 1 (down)
// assignments: fewer accumulator registers, more blocks resident (the gate/up grid in one wave, the down grid in
// 1.5 instead of 2.2 for Ring-mini). The gate/up weights stream through a ring of S column steps (32 16-byte chunks
// of the warp's R gate and R up rows) whose first loads are issued before x is staged.
constexpr int kMoeWarps = 8;
constexpr int kMoeDownMaxI = 32 * 8 * 8;  // down kernel: a lane holds at most 8 16-byte chunks of a weight row

// x: [N, Dm] bf16; wg, wu: [E, I, Dm] with rows of Dm contiguous and expert strides sg, su; h: [A, I] bf16
// (row = sorted position). grid.y walks the active experts.
template <int MT, int R, int S>
__global__ void __launch_bounds__(kMoeWarps * 32) moe_gate_up_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ wg,
                                                             const __nv_bfloat16* __restrict__ wu, const int32_t* __restrict__ offsets,
                                                             const int32_t* __restrict__ sorted, const int32_t* __restrict__ active,
                                                             int E, int topk, int Dm, int I, int64_t sg, int64_t su,
                                                             __nv_bfloat16* __restrict__ h) {
  extern __shared__ __align__(16) __nv_bfloat16 xs[];  // [MT, Dm]
  pdl_wait();  // the experts are chosen by the router just before this kernel
  pdl_launch_dependents();
  if ((int)blockIdx.y >= active[E]) return;
  const int e = active[blockIdx.y];
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kMoeWarps + w) * R;
  const __nv_bfloat16* Wg = wg + (int64_t)e * sg;  // sg/su = I*Dm unpacked, 2*I*Dm for views of a packed [E, 2I, Dm]
  const __nv_bfloat16* Wu = wu + (int64_t)e * su;
  const uint4* g4[R];
  const uint4* u4[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int row = min(row0 + rr, I - 1);  // rows past I compute a duplicate and store nothing
    g4[rr] = reinterpret_cast<const uint4*>(Wg + (int64_t)row * Dm);
    u4[rr] = reinterpret_cast<const uint4*>(Wu + (int64_t)row * Dm);
  }
  const int D8 = Dm / 8, steps = (D8 + 31) / 32;
  uint4 gv[S][R], uv[S][R];
  auto load = [&](int s, int st) {  // column step st into ring slot s (zeros past the row: they add nothing)
    const int c = lane + 32 * st;
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      gv[s][rr] = c < D8 ? __ldg(g4[rr] + c) : make_uint4(0u, 0u, 0u, 0u);
      uv[s][rr] = c < D8 ? __ldg(u4[rr] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  const int p0 = offsets[e], p1 = offsets[e + 1];
  for (int pb = p0; pb < p1; pb += MT) {
    const int m = min(MT, p1 - pb);
#pragma unroll
    for (int s = 0; s < S; ++s)
      if (s < steps) load(s, s);  // in flight while x is staged
    __syncthreads();
    for (int idx = threadIdx.x; idx < m * D8; idx += blockDim.x) {
      const int r = idx / D8, c = idx % D8;
      const int tok = sorted[pb + r] / topk;
      reinterpret_cast<uint4*>(xs)[idx] = reinterpret_cast<const uint4*>(x + (int64_t)tok * Dm)[c];
    }
    __syncthreads();
    float ga[R][MT], ua[R][MT];
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
      for (int t = 0; t < MT; ++t) ga[rr][t] = ua[rr][t] = 0.f;
    for (int base = 0; base < steps; base += S) {
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int st = base + s, c = lane + 32 * st;
        if (st < steps) {
          if (c < D8) {
#pragma unroll
            for (int t = 0; t < MT; ++t) {
              if (t < m) {
                const uint4 xv = reinterpret_cast<const uint4*>(xs + t * Dm)[c];
#pragma unroll
                for (int rr = 0; rr < R; ++rr) { dot8_acc(ga[rr][t], gv[s][rr], xv); dot8_acc(ua[rr][t], uv[s][rr], xv); }
              }
            }
          }
          if (st + S < steps) load(s, st + S);
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        if (t < m) {
          const float gsum = warp_sum(ga[rr][t]), usum = warp_sum(ua[rr][t]);
          if (lane == 0 && row0 + rr < I)
            h[(int64_t)(pb + t) * I + row0 + rr] = __float2bfloat16(gsum / (1.f + expf(-gsum)) * usum);
        }
      }
    }
  }
}

// h: [A, I] bf16 (sorted rows); wd: [E, Dm, I] (rows of I contiguous, expert stride sd); y: [A, Dm] fp32 indexed by
// assignment id a = token * topk + j. Each lane loads its CPL 16-byte chunks of the warp's R weight rows into registers
// first (before the activations are staged, so the weight latency overlaps the index loads and the staging), and keeps
// them for every MT-token pass: an expert's weights are read once however many tokens it has. Needs I <= 256 * CPL.
// MINB blocks per SM: 2 for MT = 8 (<= 128 registers: 2 x 256 lanes x R*CPL*16 B = 64 KB of weights in flight per SM),
// 3 for MT = 1 (R accumulators instead of 8R: 96 KB in flight per SM; 4 would spill).
template <int R, int CPL, int MT, int MINB>
__global__ void __launch_bounds__(kMoeWarps * 32, MINB) moe_down_kernel(const __nv_bfloat16* __restrict__ h, const __nv_bfloat16* __restrict__ wd,
                                                          const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted,
                                                          const int32_t* __restrict__ active, int E, const float* __restrict__ weights,
                                                          int Dm, int I, int64_t sd, float* __restrict__ y) {
  extern __shared__ __align__(16) __nv_bfloat16 hs[];  // [MT, I]
  // The router (two launches back: common.cuh) has chosen the experts, so under a dependent launch this block's
  // weights are in flight before pdl_wait, while gate/up still runs; h (gate/up's output) is read after it.
  if ((int)blockIdx.y >= active[E]) {
    pdl_wait();
    pdl_launch_dependents();
    return;
  }
  const int e = active[blockIdx.y];
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kMoeWarps + w) * R;
  const int I8 = I / 8;
  const __nv_bfloat16* W = wd + (int64_t)e * sd;
  uint4 wv[R][CPL];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const uint4* w4 = reinterpret_cast<const uint4*>(W + (int64_t)min(row0 + rr, Dm - 1) * I);  // rows past Dm: dup, no store
#pragma unroll
    for (int i = 0; i < CPL; ++i) {
      const int c = lane + 32 * i;
      wv[rr][i] = c < I8 ? __ldg(w4 + c) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  pdl_wait();
  pdl_launch_dependents();
  const int p0 = offsets[e], p1 = offsets[e + 1];
  for (int pb = p0; pb < p1; pb += MT) {
    const int m = min(MT, p1 - pb);
    __syncthreads();
    for (int idx = threadIdx.x; idx < m * I8; idx += blockDim.x)
      reinterpret_cast<uint4*>(hs)[idx] = reinterpret_cast<const uint4*>(h + (int64_t)pb * I)[idx];
    __syncthreads();
    float acc[R][MT];
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
      for (int t = 0; t < MT; ++t) acc[rr][t] = 0.f;
#pragma unroll
    for (int i = 0; i < CPL; ++i) {
      const int c = lane + 32 * i;
      if (c < I8) {
#pragma unroll
        for (int t = 0; t < MT; ++t) {
          if (t < m) {
            const uint4 hv = reinterpret_cast<const uint4*>(hs + t * I)[c];
#pragma unroll
            for (int rr = 0; rr < R; ++rr) dot8_acc(acc[rr][t], wv[rr][i], hv);
          }
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
#pragma unroll
      for (int t = 0; t < MT; ++t) {
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
// Grouped path: stable counting sort of assignments by expert (deterministic: no order depends on atomics)
// ---------------------------------------------------------------------------------------------------------------
constexpr int kSortWarps = 8;
constexpr int kSortPerWarp = 256;                          // consecutive assignments per warp
constexpr int kSortPerBlock = kSortWarps * kSortPerWarp;  // 2048 assignments per block

// Out-of-range ids (never produced by moe_route) are clamped so that every index stays in bounds.
RL_DEVICE int clamp_expert(int e, int E) { return min(max(e, 0), E - 1); }

// counts [B, E]: assignments of each expert inside block b's 2048-assignment slice.
__global__ void __launch_bounds__(kSortWarps * 32) moe_sort_count_kernel(const int32_t* __restrict__ ids, int A, int E,
                                                                         int32_t* __restrict__ counts) {
  __shared__ int hist[kMaxExperts];
  pdl_wait();  // the ids are the router's, just before this kernel
  pdl_launch_dependents();
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int a0 = blockIdx.x * kSortPerBlock, a1 = min(A, a0 + kSortPerBlock);
  for (int a = a0 + threadIdx.x; a < a1; a += blockDim.x) atomicAdd(&hist[clamp_expert(ids[a], E)], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[(int64_t)blockIdx.x * E + e] = hist[e];
}

// One block of 1024 threads (thread e owns expert e). counts [B, E] becomes each block's exclusive start inside its
// expert; offsets [E+1] = expert starts (offsets[E] = A); ends [E] = inclusive ends (torch._grouped_mm's offs).
__global__ void __launch_bounds__(1024) moe_sort_scan_kernel(int32_t* __restrict__ counts, int B, int E,
                                                             int32_t* __restrict__ offsets, int32_t* __restrict__ ends) {
  __shared__ int warp_tot[32];
  pdl_wait();
  pdl_launch_dependents();
  const int e = threadIdx.x, lane = e & 31, wid = e >> 5;
  int run = 0;
  if (e < E) {
    int b = 0;
    for (; b + 4 <= B; b += 4) {  // four independent loads in flight per step
      const int c0 = counts[(int64_t)b * E + e], c1 = counts[(int64_t)(b + 1) * E + e];
      const int c2 = counts[(int64_t)(b + 2) * E + e], c3 = counts[(int64_t)(b + 3) * E + e];
      counts[(int64_t)b * E + e] = run;
      counts[(int64_t)(b + 1) * E + e] = run + c0;
      counts[(int64_t)(b + 2) * E + e] = run + c0 + c1;
      counts[(int64_t)(b + 3) * E + e] = run + c0 + c1 + c2;
      run += c0 + c1 + c2 + c3;
    }
    for (; b < B; ++b) {
      const int c = counts[(int64_t)b * E + e];
      counts[(int64_t)b * E + e] = run;
      run += c;
    }
  }
  // block-wide inclusive scan of the expert totals
  int incl = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_tot[wid] = incl;
  __syncthreads();
  if (wid == 0) {
    int t = warp_tot[lane];  // blockDim is 1024: all 32 warps wrote
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += v;
    }
    warp_tot[lane] = t;
  }
  __syncthreads();
  if (wid > 0) incl += warp_tot[wid - 1];
  if (e < E) {
    offsets[e] = incl - run;
    ends[e] = incl;
    if (e == E - 1) offsets[E] = incl;
  }
}

// Each warp walks its 256 assignments in order; within a block, warps follow each other through per-warp starting
// cursors, so the result is the stable sort. sorted[p] = assignment at sorted row p, inv[a] = row of assignment a,
// tok[p] = its token (sorted[p] / topk), the gather index of the grouped GEMM's input.
__global__ void __launch_bounds__(kSortWarps * 32) moe_sort_scatter_kernel(const int32_t* __restrict__ ids, int A, int E, int topk,
                                                                           const int32_t* __restrict__ block_start,
                                                                           const int32_t* __restrict__ offsets,
                                                                           int32_t* __restrict__ sorted, int32_t* __restrict__ inv,
                                                                           int32_t* __restrict__ tok) {
  __shared__ int cur[kSortWarps][kMaxExperts];  // per-warp counts, then per-warp cursors
  pdl_wait();
  pdl_launch_dependents();
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < kSortWarps * E; i += blockDim.x) cur[i / E][i % E] = 0;
  __syncthreads();
  const int a0 = blockIdx.x * kSortPerBlock + w * kSortPerWarp;
  const int a1 = min(A, a0 + kSortPerWarp);
  const unsigned lt = (1u << lane) - 1u;
  for (int base = a0; base < a1; base += 32) {  // a0/a1 are warp-uniform, so is this loop
    const int a = base + lane;
    const int e = a < a1 ? clamp_expert(ids[a], E) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && (peers & lt) == 0) cur[w][e] += __popc(peers);  // one leader per expert: no conflict
    __syncwarp();
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = offsets[e] + block_start[(int64_t)blockIdx.x * E + e];
#pragma unroll
    for (int ww = 0; ww < kSortWarps; ++ww) {
      const int c = cur[ww][e];
      cur[ww][e] = run;
      run += c;
    }
  }
  __syncthreads();
  for (int base = a0; base < a1; base += 32) {
    const int a = base + lane;
    const int e = a < a1 ? clamp_expert(ids[a], E) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0) {
      const int p = cur[w][e] + __popc(peers & lt);
      sorted[p] = a;
      inv[a] = p;
      tok[p] = a / topk;
    }
    __syncwarp();
    if (e >= 0 && (peers & lt) == 0) cur[w][e] += __popc(peers);
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Grouped path: SwiGLU between the grouped GEMMs, and the weighted combine back to token order
// ---------------------------------------------------------------------------------------------------------------
RL_DEVICE void load8(const __nv_bfloat16* p, float* v) {
  const uint4 r = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(b[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
RL_DEVICE void load8(const float* p, float* v) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
RL_DEVICE void store8(__nv_bfloat16* p, const float* v) {
  uint4 r;
  r.x = pack_bf16(v[0], v[1]); r.y = pack_bf16(v[2], v[3]); r.z = pack_bf16(v[4], v[5]); r.w = pack_bf16(v[6], v[7]);
  *reinterpret_cast<uint4*>(p) = r;
}

// g, u: [M, I] rows with row stride ld (g = gu, u = gu + I, ld = 2I for one packed gate/up GEMM output); h: [M, I].
__global__ void __launch_bounds__(256) moe_swiglu_kernel(const __nv_bfloat16* __restrict__ g, const __nv_bfloat16* __restrict__ u,
                                                         int64_t ld, int64_t M, int I, __nv_bfloat16* __restrict__ h) {
  const int I8 = I / 8;
  const int64_t total = M * I8;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / I8;
    const int c = (int)(idx - r * I8) * 8;
    float gv[8], uv[8], hv[8];
    load8(g + r * ld + c, gv);
    load8(u + r * ld + c, uv);
#pragma unroll
    for (int i = 0; i < 8; ++i) hv[i] = gv[i] / (1.f + expf(-gv[i])) * uv[i];
    store8(h + r * I + c, hv);
  }
}

// xs[inv[n*k + j], :] = x[n, :] for every token n and j < k: the grouped GEMM's input rows in expert order. Each
// token row is read once and written k times. (Gathering by the sorted token list instead reads every row k times,
// and from HBM: the k experts of a token are far apart in the sorted order.) A warp per token, 16-byte accesses.
constexpr int kScatterWarps = 8;
__global__ void __launch_bounds__(kScatterWarps * 32) moe_scatter_rows_kernel(const uint4* __restrict__ x, int64_t x_ld,
                                                                               const int32_t* __restrict__ inv, int N,
                                                                               int topk, int W, uint4* __restrict__ xs) {
  const int n = blockIdx.x * kScatterWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  const int my_row = lane < topk ? inv[(int64_t)n * topk + lane] : 0;
  const uint4* src = x + (int64_t)n * x_ld;
  constexpr int U = 4;  // 16-byte loads in flight per lane before the stores
  for (int base = 0; base < W; base += 32 * U) {  // warp-uniform: every lane reaches the shuffles
    const int c0 = base + lane;
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (c0 + 32 * u < W) v[u] = src[c0 + 32 * u];
    for (int j = 0; j < topk; ++j) {
      uint4* dst = xs + (int64_t)__shfl_sync(0xffffffffu, my_row, j) * W;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (c0 + 32 * u < W) dst[c0 + 32 * u] = v[u];
    }
  }
}

// out[n, :] = bf16( sum_{j < k} w[n*k + j] * ys[row(n*k + j), :] + shared[n, :] ), j ascending, fp32 accumulation.
// row(a) = rows[a] (the inverse sort permutation) or a when rows is null; w null = all ones; shared optional.
// NORM: then, as add_rms_norm does with that bf16 output as delta, out = s = bf16(res[n] + out) and
// y_out = rms_norm(s, nw, eps), with add_rms_norm's thread layout (the launch's blockDim: vector v of a row in thread
// v % blockDim) and reduction order: bitwise that kernel's s and y, without writing the MoE output and reading it
// back. Rows of <= kCombineNormMaxVec * blockDim 8-element vectors.
constexpr int kCombineNormMaxVec = 4;
template <typename TY, typename TS, bool NORM>
__global__ void __launch_bounds__(256) moe_combine_kernel(const TY* __restrict__ ys, const int32_t* __restrict__ rows,
                                                          const float* __restrict__ w, const TS* __restrict__ shared, int N,
                                                          int topk, int Dm, __nv_bfloat16* __restrict__ out,
                                                          const __nv_bfloat16* __restrict__ res, int64_t res_stride,
                                                          const __nv_bfloat16* __restrict__ nw, float eps,
                                                          __nv_bfloat16* __restrict__ y_out) {
  __shared__ int srow[32];
  __shared__ float sw[32];
  __shared__ float warp_ss[256 / 32];
  const int n = blockIdx.x;
  pdl_wait();  // ys is the output of the expert kernel just before this one
  pdl_launch_dependents();
  if (threadIdx.x < topk) {
    const int a = n * topk + threadIdx.x;
    srow[threadIdx.x] = rows != nullptr ? rows[a] : a;
    sw[threadIdx.x] = w != nullptr ? w[a] : 1.f;
  }
  __syncthreads();
  constexpr int MAXV = NORM ? kCombineNormMaxVec : 1;
  float sv[MAXV][8];  // NORM: this thread's vectors of s
  float ss = 0.f;
  auto combine8 = [&](int c, float* acc) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int j = 0; j < topk; ++j) {
      float v[8];
      load8(ys + (int64_t)srow[j] * Dm + c, v);
      const float wj = sw[j];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(wj, v[i], acc[i]);
    }
    if (shared != nullptr) {
      float s[8];
      load8(shared + (int64_t)n * Dm + c, s);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += s[i];
    }
  };
  if constexpr (!NORM) {
    for (int c = threadIdx.x * 8; c < Dm; c += blockDim.x * 8) {
      float acc[8];
      combine8(c, acc);
      store8(out + (int64_t)n * Dm + c, acc);
    }
    return;
  } else {
#pragma unroll
    for (int it = 0; it < MAXV; ++it) {
      const int c = (threadIdx.x + it * blockDim.x) * 8;
      if (c < Dm) {
        float acc[8], xr[8];
        combine8(c, acc);
        load8(res + (int64_t)n * res_stride + c, xr);
#pragma unroll
        for (int i = 0; i < 8; ++i)  // delta = the combine's bf16 output; s = bf16(x + delta)
          sv[it][i] = __bfloat162float(__float2bfloat16(__fadd_rn(xr[i], __bfloat162float(__float2bfloat16(acc[i])))));
        store8(out + (int64_t)n * Dm + c, sv[it]);
#pragma unroll
        for (int i = 0; i < 8; ++i) ss += sv[it][i] * sv[it][i];
      }
    }
    const float r = block_rms_scale(ss, warp_ss, Dm, eps);
#pragma unroll
    for (int it = 0; it < MAXV; ++it) {
      const int c = (threadIdx.x + it * blockDim.x) * 8;
      if (c < Dm) {
        float wv[8], y[8];
        load8(nw + c, wv);
#pragma unroll
        for (int i = 0; i < 8; ++i) y[i] = __fmul_rn(wv[i], __bfloat162float(__float2bfloat16(__fmul_rn(sv[it][i], r))));
        store8(y_out + (int64_t)n * Dm + c, y);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host entry points
// ---------------------------------------------------------------------------------------------------------------
void moe_route(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
               int64_t topk, bool renormalize, double scaling, int64_t append, at::Tensor& ids, at::Tensor& weights) {
  RL_CHECK(logits.is_contiguous() && logits.scalar_type() == at::kFloat, "moe_route: logits must be contiguous fp32");
  const int N = logits.size(0), E = logits.size(1);
  RL_CHECK(topk >= 1 && topk <= 32, "moe_route: top-k must be in 1..32");
  RL_CHECK(n_group >= 1 && n_group <= 32 && E % n_group == 0, "moe_route: n_group must divide the experts and be <= 32");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(logits.device());
  const bool aligned = reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 &&
                       (!bias || reinterpret_cast<uintptr_t>(bias->data_ptr()) % 16 == 0);
  if (E == 256 && 32 % n_group == 0 && aligned) {  // moe_route256_kernel: 8 experts per lane, a group = 32/n_group lanes
    C10_CUDA_CHECK(launch_dependent(moe_route256_kernel, (N + kRoute256Warps - 1) / kRoute256Warps,
                                    kRoute256Warps * 32, 0, at::cuda::getCurrentCUDAStream(), logits.data_ptr<float>(),
                                    bias ? bias->data_ptr<float>() : nullptr, N, (int)n_group, (int)topk_group,
                                    (int)topk, renormalize, (float)scaling, (int)append, ids.data_ptr<int32_t>(),
                                    weights.data_ptr<float>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const size_t smem = (size_t)kRouteWarps * 2 * E * sizeof(float);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(moe_route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  C10_CUDA_CHECK(launch_dependent(moe_route_kernel, (N + kRouteWarps - 1) / kRouteWarps, kRouteWarps * 32, smem,
                                  at::cuda::getCurrentCUDAStream(), logits.data_ptr<float>(),
                                  bias ? bias->data_ptr<float>() : nullptr, N, E, (int)n_group, (int)topk_group,
                                  (int)topk, renormalize, (float)scaling, (int)append, ids.data_ptr<int32_t>(),
                                  weights.data_ptr<float>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

static SmallRouteArgs small_route_args(const c10::optional<at::Tensor>& bias, int N, int E, int64_t n_group,
                                       int64_t topk_group, int64_t topk, bool renormalize, double scaling, int64_t append,
                                       at::Tensor& ids, at::Tensor& weights, at::Tensor& offsets, at::Tensor& sorted,
                                       at::Tensor& active) {
  const int E_out = offsets.numel() - 1, kout = topk + (append >= 0);
  RL_CHECK(N <= kSmallRouteMaxTokens, "moe_route_align_small: at most ", kSmallRouteMaxTokens, " tokens, got ", N);
  RL_CHECK(topk >= 1 && topk <= 32, "moe_route_align_small: top-k must be in 1..32");
  RL_CHECK(n_group >= 1 && n_group <= 32 && E % n_group == 0, "moe_route_align_small: n_group must divide the experts and be <= 32");
  RL_CHECK(E % 4 == 0 && E <= kMaxExperts && E_out >= E && E_out <= kMaxExperts,
           "moe_route_align_small: experts must be a multiple of 4, at most ", kMaxExperts);
  RL_CHECK(append < E_out, "moe_route_align_small: the appended expert must be below offsets' length - 1");
  RL_CHECK(ids.numel() == (int64_t)N * kout && weights.numel() == ids.numel() && sorted.numel() == ids.numel() &&
               active.numel() == E_out + 1,
           "moe_route_align_small: ids/weights/sorted need N*(topk (+1)) entries and active E_out+1");
  for (const at::Tensor* t : {&ids, &offsets, &sorted, &active})
    RL_CHECK(t->is_contiguous() && t->scalar_type() == at::kInt, "moe_route_align_small: ids/offsets/sorted/active must be contiguous int32");
  RL_CHECK(weights.is_contiguous() && weights.scalar_type() == at::kFloat, "moe_route_align_small: weights must be contiguous fp32");
  if (bias) RL_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == E, "moe_route_align_small: bias must be fp32 [E]");
  return SmallRouteArgs{bias ? bias->data_ptr<float>() : nullptr, N, E, (int)n_group, (int)topk_group, (int)topk,
                        renormalize, (float)scaling, (int)append, E_out, ids.data_ptr<int32_t>(), weights.data_ptr<float>(),
                        offsets.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(), active.data_ptr<int32_t>()};
}

void moe_route_align_small(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t n_group,
                           int64_t topk_group, int64_t topk, bool renormalize, double scaling, int64_t append,
                           at::Tensor& ids, at::Tensor& weights, at::Tensor& offsets, at::Tensor& sorted,
                           at::Tensor& active) {
  RL_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
           "moe_route_align_small: logits must be contiguous fp32 [N, E]");
  const int N = logits.size(0), E = logits.size(1);
  (void)small_route_args(bias, N, E, n_group, topk_group, topk, renormalize, scaling, append, ids, weights, offsets,
                         sorted, active);
  const at::cuda::CUDAGuard guard(logits.device());
  moe_route_align_small_kernel<<<1, kSmallRouteThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), small_route_args(bias, N, E, n_group, topk_group, topk, renormalize, scaling, append,
                                                 ids, weights, offsets, sorted, active));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moe_router_decode(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t n_group,
                       int64_t topk_group, int64_t topk, bool renormalize, double scaling, int64_t append,
                       at::Tensor& logits, at::Tensor& counter, at::Tensor& ids, at::Tensor& weights,
                       at::Tensor& offsets, at::Tensor& sorted, at::Tensor& active) {
  RL_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "moe_router_decode: x must be contiguous bf16 [N, D]");
  RL_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.size(1) == x.size(1),
           "moe_router_decode: the router weight must be contiguous bf16 [E, D]");
  const int N = x.size(0), D = x.size(1), E = w.size(0);
  RL_CHECK(D % 8 == 0 && (int64_t)N * D * 2 <= 48 * 1024, "moe_router_decode: D must be a multiple of 8, N*D*2 <= 48 KB");
  RL_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
           "moe_router_decode: x and the router weight must be 16-byte aligned");
  RL_CHECK(logits.is_contiguous() && logits.scalar_type() == at::kFloat && logits.numel() == (int64_t)N * E,
           "moe_router_decode: logits workspace must be fp32 [N, E]");
  RL_CHECK(counter.is_contiguous() && counter.scalar_type() == at::kInt && counter.numel() >= 1,
           "moe_router_decode: counter must be an int32 tensor (zero between launches)");
  const SmallRouteArgs a = small_route_args(bias, N, E, n_group, topk_group, topk, renormalize, scaling, append, ids,
                                            weights, offsets, sorted, active);
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  const int blocks = (E + kRouterRowsPerBlock - 1) / kRouterRowsPerBlock;
  C10_CUDA_CHECK(launch_dependent(moe_router_decode_kernel, blocks, kSmallRouteThreads, N * D * 2,
                                  at::cuda::getCurrentCUDAStream(), reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
                                  reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()), D, logits.data_ptr<float>(),
                                  counter.data_ptr<int32_t>(), a));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moe_align(const at::Tensor& ids, int64_t E, at::Tensor& offsets, at::Tensor& sorted, at::Tensor& active) {
  RL_CHECK(ids.is_contiguous() && ids.scalar_type() == at::kInt, "moe_align: ids must be contiguous int32");
  RL_CHECK(E >= 1 && E <= kMaxExperts, "moe_align: at most ", kMaxExperts, " experts");
  const at::cuda::CUDAGuard guard(ids.device());
  moe_align_kernel<<<1, 1024, 0, at::cuda::getCurrentCUDAStream()>>>(ids.data_ptr<int32_t>(), ids.numel(), (int)E,
                                                                      offsets.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(),
                                                                      active.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int R, int CPL, int MT, int MINB>
static void launch_down(const __nv_bfloat16* h, const __nv_bfloat16* wd, const at::Tensor& offsets, const at::Tensor& sorted,
                        const at::Tensor& active, int E, const at::Tensor& weights, int Dm, int I, int64_t sd, float* y,
                        int grid_e, cudaStream_t stream) {
  const int smem = MT * I * 2;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(moe_down_kernel<R, CPL, MT, MINB>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  constexpr int rows = kMoeWarps * R;
  C10_CUDA_CHECK(launch_dependent(moe_down_kernel<R, CPL, MT, MINB>, dim3((Dm + rows - 1) / rows, grid_e), kMoeWarps * 32,
                                  smem, stream, h, wd, offsets.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(),
                                  active.data_ptr<int32_t>(), E, weights.data_ptr<float>(), Dm, I, sd, y));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int MT>
static void launch_down_for(int chunks, const __nv_bfloat16* h, const __nv_bfloat16* wd, const at::Tensor& offsets,
                            const at::Tensor& sorted, const at::Tensor& active, int E, const at::Tensor& weights, int Dm,
                            int I, int64_t sd, float* y, int grid_e, cudaStream_t stream) {
  // chunks = 16-byte chunks per weight row; a lane holds CPL = ceil(chunks / 32) of them per row
  constexpr int MINB = MT == 1 ? 3 : 2;  // <= 80 registers with one accumulator per row: 3 blocks per SM
  if (chunks <= 32) launch_down<4, 1, MT, MINB>(h, wd, offsets, sorted, active, E, weights, Dm, I, sd, y, grid_e, stream);
  else if (chunks <= 64) launch_down<4, 2, MT, MINB>(h, wd, offsets, sorted, active, E, weights, Dm, I, sd, y, grid_e, stream);
  else if (chunks <= 128) launch_down<2, 4, MT, MINB>(h, wd, offsets, sorted, active, E, weights, Dm, I, sd, y, grid_e, stream);
  else launch_down<1, 8, MT, MINB>(h, wd, offsets, sorted, active, E, weights, Dm, I, sd, y, grid_e, stream);
}

template <int MT, int R, int S>
static void launch_gate_up(const __nv_bfloat16* x, const __nv_bfloat16* wg, const __nv_bfloat16* wu, const at::Tensor& offsets,
                           const at::Tensor& sorted, const at::Tensor& active, int E, int topk, int Dm, int I, int64_t sg,
                           int64_t su, __nv_bfloat16* h, int grid_e, cudaStream_t stream) {
  const int smem = MT * Dm * 2;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(moe_gate_up_kernel<MT, R, S>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  constexpr int rows = kMoeWarps * R;
  C10_CUDA_CHECK(launch_dependent(moe_gate_up_kernel<MT, R, S>, dim3((I + rows - 1) / rows, grid_e), kMoeWarps * 32, smem,
                                  stream, x, wg, wu, offsets.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(),
                                  active.data_ptr<int32_t>(), E, topk, Dm, I, sg, su, h));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// wg, wu may be views of one packed [E, 2I, Dm] buffer (expert stride 2*I*Dm); every weight needs contiguous rows.
// small_passes: an expert's assignments in passes of 2 (gate/up) and 1 (down) for steps of <= 2 / 1 tokens, else 8.
void moe_experts_decode(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
                        const at::Tensor& offsets, const at::Tensor& sorted, const at::Tensor& active,
                        const at::Tensor& weights, int64_t topk, at::Tensor& h, at::Tensor& y, bool small_passes) {
  const int E = wg.size(0), I = wg.size(1), Dm = wg.size(2);
  const int grid_e = (int)std::min<int64_t>(E, sorted.numel());  // distinct experts can not exceed assignments
  RL_CHECK(Dm % 8 == 0 && I % 8 == 0, "moe_experts_decode: hidden and expert sizes must be multiples of 8");
  RL_CHECK(I <= kMoeDownMaxI, "moe_experts_decode: expert size must be <= ", kMoeDownMaxI);
  RL_CHECK(x.is_contiguous(), "moe_experts_decode: x must be contiguous");
  for (const at::Tensor* t : {&wg, &wu})
    RL_CHECK(t->stride(2) == 1 && t->stride(1) == Dm && t->stride(0) % 8 == 0,
                "moe_experts_decode: w_gate/w_up need contiguous [I, D] rows per expert");
  RL_CHECK(wd.stride(2) == 1 && wd.stride(1) == I && wd.stride(0) % 8 == 0,
              "moe_experts_decode: w_down needs contiguous [D, I] rows per expert");
  if (sorted.numel() == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  auto bf = [](const at::Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()); };
  auto hp = reinterpret_cast<__nv_bfloat16*>(h.data_ptr());
  const int N = x.size(0);
  const int64_t sg = wg.stride(0), su = wu.stride(0), sd = wd.stride(0);
  // (rows per warp, ring steps) of the small passes: (2, 3); an H200 sweep gave 37.0 / 36.5 / 41.2 / 38.6 us a
  // Ring-mini layer for (2, 3) / (2, 2) / (2, 4) / (1, 6) at one token
  if (small_passes && N <= 2)
    launch_gate_up<2, 2, 3>(bf(x), bf(wg), bf(wu), offsets, sorted, active, E, (int)topk, Dm, I, sg, su, hp, grid_e, stream);
  else
    launch_gate_up<8, 2, 2>(bf(x), bf(wg), bf(wu), offsets, sorted, active, E, (int)topk, Dm, I, sg, su, hp, grid_e, stream);
  float* yp = y.data_ptr<float>();
  if (small_passes && N == 1)
    launch_down_for<1>(I / 8, hp, bf(wd), offsets, sorted, active, E, weights, Dm, I, sd, yp, grid_e, stream);
  else
    launch_down_for<8>(I / 8, hp, bf(wd), offsets, sorted, active, E, weights, Dm, I, sd, yp, grid_e, stream);
}

// ids [A] int32 -> stable sort by expert. counts: workspace of >= ceil(A / 2048) * E int32; offsets [E+1], ends [E],
// sorted / inv / tok [A] int32 (see moe_sort_scatter_kernel). Three launches, no host synchronisation.
void moe_sort(const at::Tensor& ids, int64_t E, int64_t topk, at::Tensor& counts, at::Tensor& offsets, at::Tensor& ends,
              at::Tensor& sorted, at::Tensor& inv, at::Tensor& tok) {
  RL_CHECK(ids.is_contiguous() && ids.scalar_type() == at::kInt, "moe_sort: ids must be contiguous int32");
  RL_CHECK(E >= 1 && E <= kMaxExperts, "moe_sort: at most ", kMaxExperts, " experts");
  RL_CHECK(topk >= 1, "moe_sort: top-k must be positive");
  const int64_t A = ids.numel();
  RL_CHECK(A < (int64_t)1 << 31, "moe_sort: too many assignments");
  const int B = (int)((A + kSortPerBlock - 1) / kSortPerBlock);
  RL_CHECK(counts.numel() >= (int64_t)B * E && offsets.numel() == E + 1 && ends.numel() == E && sorted.numel() == A &&
                  inv.numel() == A && tok.numel() == A,
              "moe_sort: workspace / output sizes do not match");
  for (const at::Tensor* t : {&counts, &offsets, &ends, &sorted, &inv, &tok})
    RL_CHECK(t->is_contiguous() && t->scalar_type() == at::kInt, "moe_sort: outputs must be contiguous int32");
  const at::cuda::CUDAGuard guard(ids.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (B > 0)
    C10_CUDA_CHECK(launch_dependent(moe_sort_count_kernel, B, kSortWarps * 32, 0, stream, ids.data_ptr<int32_t>(),
                                    (int)A, (int)E, counts.data_ptr<int32_t>()));
  C10_CUDA_CHECK(launch_dependent(moe_sort_scan_kernel, 1, 1024, 0, stream, counts.data_ptr<int32_t>(), B, (int)E,
                                  offsets.data_ptr<int32_t>(), ends.data_ptr<int32_t>()));
  if (B > 0)
    C10_CUDA_CHECK(launch_dependent(moe_sort_scatter_kernel, B, kSortWarps * 32, 0, stream, ids.data_ptr<int32_t>(),
                                    (int)A, (int)E, (int)topk, counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                                    sorted.data_ptr<int32_t>(), inv.data_ptr<int32_t>(), tok.data_ptr<int32_t>()));
}

static bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// g, u: [M, I] bf16 with unit column stride and one common row stride (e.g. the two halves of a [M, 2I] buffer);
// h: [M, I] bf16 contiguous.
void moe_swiglu(const at::Tensor& g, const at::Tensor& u, at::Tensor& h) {
  RL_CHECK(g.dim() == 2 && u.sizes() == g.sizes() && h.sizes() == g.sizes(), "moe_swiglu: g, u, h must be [M, I] alike");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&g, &u, &h})
    RL_CHECK(t->scalar_type() == at::kBFloat16 && t->stride(1) == 1 && aligned16(*t), "moe_swiglu: bf16, unit column stride, 16-byte aligned");
  const int64_t M = g.size(0);
  const int I = g.size(1);
  RL_CHECK(I % 8 == 0 && g.stride(0) == u.stride(0) && g.stride(0) % 8 == 0 && h.stride(0) == I,
              "moe_swiglu: I and the row stride must be multiples of 8, g/u share the row stride, h contiguous");
  if (M == 0) return;
  const at::cuda::CUDAGuard guard(g.device());
  const int64_t total = M * (I / 8);
  const int grid = (int)std::min<int64_t>((total + 255) / 256, 132 * 16);
  moe_swiglu_kernel<<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(g.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(u.data_ptr()), g.stride(0),
      M, I, reinterpret_cast<__nv_bfloat16*>(h.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x [N, D] (rows 16-byte aligned, D * element size a multiple of 16); inv [N*k] int32 (moe_sort's inverse permutation);
// xs [N*k, D] contiguous, same dtype.
void moe_scatter_rows(const at::Tensor& x, const at::Tensor& inv, int64_t topk, at::Tensor& xs) {
  RL_CHECK(x.dim() == 2 && x.stride(1) == 1 && aligned16(x) && (x.size(1) * x.element_size()) % 16 == 0 &&
               (x.stride(0) * x.element_size()) % 16 == 0,
           "moe_scatter_rows: x must be [N, D] with 16-byte aligned rows of a multiple of 16 bytes");
  const int64_t N = x.size(0);
  RL_CHECK(topk >= 1 && topk <= 32, "moe_scatter_rows: top-k must be in 1..32");
  RL_CHECK(inv.scalar_type() == at::kInt && inv.is_contiguous() && inv.numel() == N * topk, "moe_scatter_rows: inv must be int32 [N*k]");
  RL_CHECK(xs.dim() == 2 && xs.is_contiguous() && aligned16(xs) && xs.size(0) == N * topk && xs.size(1) == x.size(1) &&
               xs.scalar_type() == x.scalar_type(),
           "moe_scatter_rows: xs must be contiguous [N*k, D] in x's dtype");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t row16 = x.element_size() * x.size(1) / 16;
  moe_scatter_rows_kernel<<<(unsigned)((N + kScatterWarps - 1) / kScatterWarps), kScatterWarps * 32, 0,
                            at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(x.data_ptr()), x.stride(0) * x.element_size() / 16, inv.data_ptr<int32_t>(), (int)N,
      (int)topk, (int)row16, reinterpret_cast<uint4*>(xs.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ys [R, D] bf16 or fp32 rows; rows [N*k] int32 (optional: row of assignment a, else a itself); w [N*k] fp32 (optional,
// else 1); shared [N, D] bf16 or fp32 (optional); out [N, D] bf16.
// res, norm_w, y_out (all or none): then out = s = res + the combine (bf16 rows with unit column stride, 16-byte
// aligned) and y_out = rms_norm(s, norm_w [D] bf16, eps), bitwise add_rms_norm(res, combine, norm_w, eps).
void moe_combine(const at::Tensor& ys, const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& w,
                 const c10::optional<at::Tensor>& shared, int64_t topk, at::Tensor& out,
                 const c10::optional<at::Tensor>& res, const c10::optional<at::Tensor>& norm_w, double eps,
                 const c10::optional<at::Tensor>& y_out) {
  RL_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kBFloat16, "moe_combine: out must be contiguous bf16 [N, D]");
  const int N = out.size(0), Dm = out.size(1);
  RL_CHECK(topk >= 1 && topk <= 32, "moe_combine: top-k must be in 1..32");
  RL_CHECK(Dm % 8 == 0 && aligned16(out), "moe_combine: D must be a multiple of 8");
  RL_CHECK(ys.dim() == 2 && ys.size(1) == Dm && ys.is_contiguous() && aligned16(ys) &&
                  (ys.scalar_type() == at::kBFloat16 || ys.scalar_type() == at::kFloat),
              "moe_combine: ys must be contiguous bf16/fp32 [R, D]");
  RL_CHECK(rows || ys.size(0) == (int64_t)N * topk, "moe_combine: without rows, ys must have N*k rows");
  if (rows) RL_CHECK(rows->is_contiguous() && rows->scalar_type() == at::kInt && rows->numel() == (int64_t)N * topk, "moe_combine: rows must be int32 [N*k]");
  if (w) RL_CHECK(w->is_contiguous() && w->scalar_type() == at::kFloat && w->numel() == (int64_t)N * topk, "moe_combine: w must be fp32 [N*k]");
  if (shared)
    RL_CHECK(shared->is_contiguous() && shared->size(0) == N && shared->size(1) == Dm && aligned16(*shared) &&
                    (shared->scalar_type() == at::kBFloat16 || shared->scalar_type() == at::kFloat),
                "moe_combine: shared must be contiguous bf16/fp32 [N, D]");
  const bool norm = res.has_value();
  RL_CHECK(norm_w.has_value() == norm && y_out.has_value() == norm,
           "moe_combine: res, norm_w and y_out go together (the residual add and RMSNorm after the combine)");
  int threads = std::min(256, std::max(32, ((Dm / 8 + 31) / 32) * 32));
  if (norm) {
    RL_CHECK(res->dim() == 2 && res->size(0) == N && res->size(1) == Dm && res->stride(1) == 1 &&
                 res->scalar_type() == at::kBFloat16 && aligned16(*res) && res->stride(0) % 8 == 0,
             "moe_combine: res must be bf16 [N, D] rows with unit column stride, 16-byte aligned");
    RL_CHECK(norm_w->is_contiguous() && norm_w->scalar_type() == at::kBFloat16 && norm_w->numel() == Dm &&
                 aligned16(*norm_w),
             "moe_combine: norm_w must be contiguous, 16-byte aligned bf16 [D]");
    RL_CHECK(y_out->is_contiguous() && y_out->sizes() == out.sizes() && y_out->scalar_type() == at::kBFloat16 &&
                 aligned16(*y_out),
             "moe_combine: y_out must be contiguous bf16 [N, D]");
    // add_rms_norm's layout: the smallest power-of-two vectors per thread with 256 threads, then the fewest warps
    const int nvec = Dm / 8;
    int vpt = 1;
    while (vpt * 256 < nvec) vpt *= 2;
    RL_CHECK(vpt <= kCombineNormMaxVec, "moe_combine: rows of at most ", kCombineNormMaxVec * 256 * 8,
             " channels with the norm, got ", Dm);
    threads = std::min(256, ((nvec + vpt - 1) / vpt + 31) / 32 * 32);
  }
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(out.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* rp = rows ? rows->data_ptr<int32_t>() : nullptr;
  const float* wp = w ? w->data_ptr<float>() : nullptr;
  __nv_bfloat16* op = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  const __nv_bfloat16* resp = norm ? reinterpret_cast<const __nv_bfloat16*>(res->data_ptr()) : nullptr;
  const __nv_bfloat16* nwp = norm ? reinterpret_cast<const __nv_bfloat16*>(norm_w->data_ptr()) : nullptr;
  __nv_bfloat16* yop = norm ? reinterpret_cast<__nv_bfloat16*>(y_out->data_ptr()) : nullptr;
  const int64_t res_stride = norm ? res->stride(0) : 0;
  auto launch = [&](auto* yp, auto* sp) {
    using TY = std::remove_const_t<std::remove_pointer_t<decltype(yp)>>;
    using TS = std::remove_const_t<std::remove_pointer_t<decltype(sp)>>;
    auto kernel = norm ? moe_combine_kernel<TY, TS, true> : moe_combine_kernel<TY, TS, false>;
    C10_CUDA_CHECK(launch_dependent(kernel, N, threads, 0, stream, yp, rp, wp, sp, N, (int)topk, Dm, op, resp,
                                    res_stride, nwp, (float)eps, yop));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto with_shared = [&](auto* yp) {
    if (shared && shared->scalar_type() == at::kFloat) launch(yp, shared->data_ptr<float>());
    else launch(yp, shared ? reinterpret_cast<const __nv_bfloat16*>(shared->data_ptr()) : (const __nv_bfloat16*)nullptr);
  };
  if (ys.scalar_type() == at::kFloat) with_shared(ys.data_ptr<float>());
  else with_shared(reinterpret_cast<const __nv_bfloat16*>(ys.data_ptr()));
}

}  // namespace ringlinear
