// One token per row of a step's logits, in one launch: temperature, top-k, top-p and the inverse-transform draw.
// The draw is defined on integer weights q = floor(exp(x - max) * 2^40) (sampling_reference.py, the twin): sums are
// exact and order-free, so the kernel and the twin agree bit for bit, and nothing is sorted. One cluster of kCluster
// CTAs per row (8 at a few rows, down to 1 from ~66 rows), each CTA a slice of it; every sum, max and histogram is
// combined across the cluster through distributed shared memory, so all CTAs take the same decisions (one CTA per
// row was ~3x slower at a few rows, clusters ~1.3x slower at 256):
//   pass 0  the row's max (and first argmax: greedy rows stop here)
//   pass 1  Q = sum q, and a histogram of q over 328 log-spaced buckets (count and mass) when top-k / top-p is on
//   select  the threshold theta (largest q value with count(q >= theta) >= k, or mass(q >= theta) >= P) by radix
//           descent over the 46-bit monotone key of q; the bucket that holds theta is refined by the next pass over
//           the row, which also gathers that bucket's tokens into shared memory when they fit, so the remaining
//           levels read shared memory (a peaked row: 3 passes over the logits in all, plus the draw)
//   draw    the slices' kept weights find the slice; in it, tiles of 16 tokens a thread and a block scan find the token
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace ringlinear {
namespace {

namespace cg = cooperative_groups;
typedef unsigned long long u64;

constexpr int kMaxCluster = 8;  // CTAs per row at few rows (the portable cluster size); 1 from ~one row per SM
constexpr int kThreads = 512;
constexpr int kCandidates = 8192;  // tokens of one bucket gathered into shared memory (64 KB)
constexpr int kLoads = 4;         // float4 loads in flight per thread in a pass over the row
constexpr int kTile = 16;          // draw: consecutive tokens per thread per tile
constexpr int kLevels = 6;         // radix levels over the 46-bit key: 9 + 8 + 8 + 8 + 8 + 5 bits
constexpr int kBuckets = 512;
constexpr float kWeightScale = 1099511627776.0f;  // 2^40 (sampling_reference.WEIGHT_BITS)

RL_DEVICE int level_shift(int l) { return l == 0 ? 37 : (l == kLevels - 1 ? 0 : 37 - 8 * l); }
RL_DEVICE int level_width(int l) { return l == 0 ? 9 : (l == kLevels - 1 ? 5 : 8); }

// q > 0 -> a key monotone in q: the position of q's leading bit (6 bits), then the 40 bits below it.
RL_DEVICE u64 weight_key(u64 q) {
  const int e = 63 - __clzll(q);
  return ((u64)e << 40) | ((q << (40 - e)) & ((1ull << 40) - 1));
}
RL_DEVICE u64 key_weight(u64 key) {
  const int e = (int)(key >> 40);
  return ((key & ((1ull << 40) - 1)) | (1ull << 40)) >> (40 - e);
}

// Floats in an order-preserving unsigned form (the argmax packs it above the token index).
RL_DEVICE uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return b ^ ((b >> 31) ? 0xffffffffu : 0x80000000u);
}
RL_DEVICE float order_value(uint32_t k) { return __uint_as_float(k ^ ((k >> 31) ? 0x80000000u : 0xffffffffu)); }

struct Hist {
  u64 mass[kBuckets];
  unsigned count[kBuckets];
};

struct Row {
  const float* p;
  int lo, hi;  // this CTA's slice of the row
  float t;  // temperature (1 for greedy rows: x / 1 is x)
  float max_x;
  bool vec;  // 16-byte aligned: float4 loads

  // x as the twin computes it: fp32 division, NaN -> -inf (and -0 -> +0, so the packed argmax keeps the first of equal
  // maxima as torch's argmax does)
  RL_DEVICE float x(float v) const {
    float x = t == 1.f ? v : v / t;
    if (isnan(x)) x = -INFINITY;
    if (x == 0.f) x = 0.f;
    return x;
  }
  RL_DEVICE u64 q(float v) const {
    const float w = expf(x(v) - max_x);
    return w > 0.f ? (u64)(w * kWeightScale) : 0ull;  // NaN (max_x infinite) -> 0
  }
  // f(i, raw logit) for every token, each thread's in increasing i; kLoads float4 loads in flight per thread.
  template <typename F>
  RL_DEVICE void for_each(F&& f) const {
    int tail = lo;
    if (vec) {
      const int nv = (hi - lo) >> 2;
      const float4* p4 = reinterpret_cast<const float4*>(p + lo);
      for (int j0 = threadIdx.x; j0 < nv; j0 += kLoads * kThreads) {
        float4 v[kLoads];
#pragma unroll
        for (int s = 0; s < kLoads; ++s)
          if (j0 + s * kThreads < nv) v[s] = __ldg(p4 + j0 + s * kThreads);
#pragma unroll
        for (int s = 0; s < kLoads; ++s) {
          const int j = j0 + s * kThreads;
          if (j < nv) {
            f(lo + 4 * j, v[s].x);
            f(lo + 4 * j + 1, v[s].y);
            f(lo + 4 * j + 2, v[s].z);
            f(lo + 4 * j + 3, v[s].w);
          }
        }
      }
      tail = lo + (nv << 2);
    }
    for (int i = tail + threadIdx.x; i < hi; i += kThreads) f(i, __ldg(p + i));
  }
};

using Reduce = cub::BlockReduce<u64, kThreads>;
struct MaxOp {  // (cub::Max is gone from recent CCCL)
  RL_DEVICE u64 operator()(u64 a, u64 b) const { return a > b ? a : b; }
};
using Scan = cub::BlockScan<u64, kThreads>;

struct Shared {
  Hist local;  // this CTA's histogram of a level, before the cluster's are summed into top / level
  Hist top;    // pass 1's histogram (level 0) over the whole row, kept for a second selection
  Hist level;
  union {
    Reduce::TempStorage reduce;
    Scan::TempStorage scan;
  } tmp;
  u64 bcast[6];
  u64 xchg[1];  // this CTA's value for the cluster (read by every CTA of it)
  int n;
};

// One value per CTA (the same in all of its threads) from every CTA of the cluster, in rank order, into `all`. The
// trailing sync keeps xchg from being rewritten, or the CTA from exiting, while another CTA still reads it.
template <int kCluster>
RL_DEVICE void cluster_gather(Shared& sh, cg::cluster_group& cl, u64 v, u64* all) {
  if (threadIdx.x == 0) sh.xchg[0] = v;
  cl.sync();
  for (int c = 0; c < kCluster; ++c) all[c] = cl.map_shared_rank(&sh.xchg[0], c)[0];
  cl.sync();
}

// The cluster's sum (or max) of one value per CTA.
template <int kCluster, bool kMax>
RL_DEVICE u64 cluster_combine(Shared& sh, cg::cluster_group& cl, u64 v) {
  u64 all[kCluster], out = 0;
  cluster_gather<kCluster>(sh, cl, v, all);
  for (int c = 0; c < kCluster; ++c) out = kMax ? (all[c] > out ? all[c] : out) : out + all[c];
  return out;
}

// The cluster's sum of the CTAs' `local` histograms (nb buckets) into `out`, in every CTA.
template <int kCluster>
RL_DEVICE void cluster_hist(Shared& sh, cg::cluster_group& cl, Hist& out, int nb) {
  cl.sync();  // every CTA's local histogram is complete
  for (int d = threadIdx.x; d < nb; d += kThreads) {
    u64 m = 0;
    unsigned c = 0;
    for (int r = 0; r < kCluster; ++r) {
      const Hist* h = cl.map_shared_rank(&sh.local, r);
      m += h->mass[d], c += h->count[d];
    }
    out.mass[d] = m, out.count[d] = c;
  }
  cl.sync();  // no CTA rewrites its local histogram while another reads it; `out` is complete
}

RL_DEVICE u64 block_sum(Shared& sh, u64 v) {
  v = Reduce(sh.tmp.reduce).Sum(v);
  if (threadIdx.x == 0) sh.bcast[0] = v;
  __syncthreads();
  v = sh.bcast[0];
  __syncthreads();
  return v;
}

// Warp 0: the largest digit d of h (nb digits) with above + sum over digits >= d of f >= target, f = count or mass.
// Writes d, the count and mass of the digits above d, and d's count and mass to sh.bcast[0..4].
RL_DEVICE void choose_digit(Shared& sh, const Hist& h, int nb, bool by_mass, u64 need) {
  const int lane = threadIdx.x & 31;
  const int per = nb / 32, hi = nb - lane * per, lo = hi - per;  // lane 0 holds the top digits
  u64 c = 0, m = 0;
  for (int d = lo; d < hi; ++d) c += h.count[d], m += h.mass[d];
  u64 ci = c, mi = m;  // inclusive scans over lanes, top first
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 c2 = __shfl_up_sync(0xffffffffu, ci, o), m2 = __shfl_up_sync(0xffffffffu, mi, o);
    if (lane >= o) ci += c2, mi += m2;
  }
  const unsigned hit = __ballot_sync(0xffffffffu, (by_mass ? mi : ci) >= need);
  const int owner = hit ? __ffs(hit) - 1 : 31;  // always hit: the histogram holds the crossing
  if (lane == owner) {
    u64 ca = ci - c, ma = mi - m;  // above this lane's digits
    int d = hi - 1;
    for (; d > lo; --d) {
      if ((by_mass ? ma + h.mass[d] : ca + h.count[d]) >= need) break;
      ca += h.count[d], ma += h.mass[d];
    }
    sh.bcast[0] = (u64)d, sh.bcast[1] = ca, sh.bcast[2] = ma, sh.bcast[3] = h.count[d], sh.bcast[4] = h.mass[d];
  }
}

struct Threshold {
  u64 theta, mass_ge;
};

// The largest q value theta with count(q >= theta) >= target (by_mass false) or mass(q >= theta) >= target, over
// the row's positive weights; `target` must be reachable (<= the positive count, or <= Q). sh.top holds the whole
// row's level-0 histogram.
template <int kCluster>
RL_DEVICE Threshold select_threshold(Shared& sh, cg::cluster_group& cl, u64* cand, const Row& row, bool by_mass,
                                     u64 target) {
  u64 prefix = 0, above_c = 0, above_m = 0;
  int n_cand = 0;
  bool from_cand = false, gather = false;
  for (int l = 0;; ++l) {
    const Hist* h = &sh.top;
    const int nb = l == 0 ? kBuckets : 1 << level_width(l);
    if (l > 0) {  // this level's histogram of the tokens under the prefix (gathering them when `gather`)
      for (int d = threadIdx.x; d < nb; d += kThreads) sh.local.count[d] = 0, sh.local.mass[d] = 0;
      if (threadIdx.x == 0) sh.n = 0;
      __syncthreads();
      const int up = level_shift(l - 1), sh_l = level_shift(l);
      const u64 mask = (1ull << level_width(l)) - 1;
      auto add = [&](u64 key, u64 q) {
        if ((key >> up) != prefix) return;
        const int d = (int)((key >> sh_l) & mask);
        atomicAdd(&sh.local.count[d], 1u);
        atomicAdd(&sh.local.mass[d], q);
        if (gather) cand[atomicAdd(&sh.n, 1)] = key;
      };
      if (from_cand) {
        for (int j = threadIdx.x; j < n_cand; j += kThreads) add(cand[j], key_weight(cand[j]));
      } else {
        row.for_each([&](int, float v) {
          const u64 q = row.q(v);
          if (q) add(weight_key(q), q);
        });
      }
      __syncthreads();
      if (gather) n_cand = sh.n, from_cand = true;
      cluster_hist<kCluster>(sh, cl, sh.level, nb);
      h = &sh.level;
    }
    if (threadIdx.x < 32) choose_digit(sh, *h, nb, by_mass, target - (by_mass ? above_m : above_c));
    __syncthreads();
    const u64 d = sh.bcast[0];
    above_c += sh.bcast[1], above_m += sh.bcast[2];
    const u64 count_d = sh.bcast[3], mass_d = sh.bcast[4];
    __syncthreads();
    prefix = (prefix << level_width(l)) | d;
    if (l == kLevels - 1) return {key_weight(prefix), above_m + mass_d};
    // the next pass over the slice gathers this bucket's tokens when the whole row's fit in one CTA's candidates
    gather = !from_cand && count_d <= (u64)kCandidates;
  }
}

template <int kCluster>
__global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kThreads, 1)
sample_rows_kernel(const float* __restrict__ logits, int64_t stride, int V, const double* __restrict__ spec, int m,
                   int64_t* __restrict__ out) {
  extern __shared__ u64 cand[];
  __shared__ Shared sh;
  cg::cluster_group cl = cg::this_cluster();
  const int r = blockIdx.x / kCluster, rank = (int)cl.block_rank();
  const double temperature = spec[m + r], top_p = spec[3 * m + r], u = spec[4 * m + r];
  const int64_t top_k = (int64_t)spec[2 * m + r];
  const bool greedy = !(temperature > 0.0);
  const int slice = ((V + kCluster - 1) / kCluster + 3) & ~3;  // a multiple of 4: slices stay 16-byte aligned
  Row row;
  row.p = logits + (int64_t)spec[r] * stride;
  row.lo = min(V, rank * slice);
  row.hi = min(V, row.lo + slice);
  row.t = greedy ? 1.f : (float)temperature;
  row.vec = (reinterpret_cast<uintptr_t>(row.p) & 15) == 0;

  // pass 0: max x and its first index, packed (order key << 32 | ~index) so one max reduction gives both
  u64 best = 0;
  row.for_each([&](int i, float v) {
    const u64 k = ((u64)order_key(row.x(v)) << 32) | (u64)(0xffffffffu - (unsigned)i);
    best = k > best ? k : best;
  });
  best = Reduce(sh.tmp.reduce).Reduce(best, MaxOp());
  if (threadIdx.x == 0) sh.bcast[0] = best;
  __syncthreads();
  best = cluster_combine<kCluster, true>(sh, cl, sh.bcast[0]);
  const int64_t first_max = (int64_t)(0xffffffffu - (unsigned)(best & 0xffffffffu));
  if (greedy) {
    if (rank == 0 && threadIdx.x == 0) out[r] = first_max;
    return;
  }
  row.max_x = order_value((uint32_t)(best >> 32));

  // pass 1: the total weight, the positive count and (when a threshold is needed) the level-0 histogram
  const bool by_k = top_k > 0, nucleus = top_p < 1.0;
  if (by_k || nucleus) {
    for (int d = threadIdx.x; d < kBuckets; d += kThreads) sh.local.count[d] = 0, sh.local.mass[d] = 0;
    __syncthreads();
  }
  u64 q_sum = 0, n_pos = 0;
  row.for_each([&](int, float v) {
    const u64 q = row.q(v);
    if (!q) return;
    q_sum += q, ++n_pos;
    if (by_k || nucleus) {
      const int d = (int)(weight_key(q) >> 37);
      atomicAdd(&sh.local.count[d], 1u);
      atomicAdd(&sh.local.mass[d], q);
    }
  });
  if (by_k || nucleus) {
    __syncthreads();
    cluster_hist<kCluster>(sh, cl, sh.top, kBuckets);
  }
  q_sum = cluster_combine<kCluster, false>(sh, cl, block_sum(sh, q_sum));
  n_pos = cluster_combine<kCluster, false>(sh, cl, block_sum(sh, n_pos));
  if (q_sum == 0) {  // no positive weight (a row of -inf or NaN, or an infinite logit): the greedy answer
    if (rank == 0 && threadIdx.x == 0) out[r] = first_max;
    return;
  }

  u64 theta = 1, kept = q_sum;
  if (by_k && (u64)top_k < n_pos) {
    const Threshold t = select_threshold<kCluster>(sh, cl, cand, row, false, (u64)top_k);
    theta = t.theta, kept = t.mass_ge;
  }
  if (nucleus) {
    u64 P = (u64)ceil(top_p * (double)kept);
    P = P < kept ? P : kept;
    if (P < 1) P = 1;
    const Threshold t = select_threshold<kCluster>(sh, cl, cand, row, true, P);  // >= theta: mass(q >= theta) = kept >= P
    theta = t.theta, kept = t.mass_ge;
  }

  // draw: the first token whose cumulative kept weight exceeds target. The slices' kept weights find the slice;
  // in it, tile by tile, a block scan finds the token.
  u64 target = (u64)(u * (double)kept);
  target = target < kept - 1 ? target : kept - 1;
  u64 running = 0;
  if constexpr (kCluster > 1) {  // (one CTA owns the whole row: no pass to find the slice)
    u64 mine = 0;
    row.for_each([&](int, float v) {
      const u64 q = row.q(v);
      mine += q >= theta ? q : 0;
    });
    u64 slices[kCluster];
    cluster_gather<kCluster>(sh, cl, block_sum(sh, mine), slices);
    for (int c = 0; c < rank; ++c) running += slices[c];
    if (!(running <= target && target < running + slices[rank])) return;
  }
  for (int base = row.lo; base < row.hi; base += kThreads * kTile) {
    const int i0 = base + threadIdx.x * kTile;
    float v[kTile];
    if (row.vec && i0 + kTile <= row.hi) {
      const float4* p4 = reinterpret_cast<const float4*>(row.p + i0);
#pragma unroll
      for (int s = 0; s < kTile / 4; ++s) {
        const float4 a = __ldg(p4 + s);
        v[4 * s] = a.x, v[4 * s + 1] = a.y, v[4 * s + 2] = a.z, v[4 * s + 3] = a.w;
      }
    } else {
#pragma unroll
      for (int s = 0; s < kTile; ++s) v[s] = i0 + s < row.hi ? __ldg(row.p + i0 + s) : -INFINITY;
    }
    u64 tile = 0;
#pragma unroll
    for (int s = 0; s < kTile; ++s) {
      const u64 q = row.q(v[s]);
      tile += q >= theta ? q : 0;
    }
    u64 before, total;
    Scan(sh.tmp.scan).ExclusiveSum(tile, before, total);
    before += running;
    if (before <= target && target < before + tile) {
      for (int s = 0; s < kTile; ++s) {
        const u64 q = row.q(v[s]);
        before += q >= theta ? q : 0;
        if (before > target) {
          out[r] = i0 + s;
          break;
        }
      }
    }
    running += total;
    if (running > target) break;  // block-uniform: total is the whole tile's
    __syncthreads();              // the scan's storage is reused by the next tile
  }
}

}  // namespace

void sample_rows(const at::Tensor& logits, const at::Tensor& spec, at::Tensor& out) {
  RL_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1,
           "sample_rows: logits must be a CUDA float32 [n, V] tensor with contiguous rows");
  RL_CHECK(spec.is_cuda() && spec.scalar_type() == at::kDouble && spec.dim() == 2 && spec.size(0) == 5 &&
               spec.is_contiguous() && spec.device() == logits.device(),
           "sample_rows: spec must be a contiguous float64 [5, m] tensor on the logits' device");
  const int64_t m = spec.size(1), V = logits.size(1);
  RL_CHECK(out.is_cuda() && out.scalar_type() == at::kLong && out.dim() == 1 && out.size(0) == m && out.is_contiguous(),
           "sample_rows: out must be a contiguous int64 [m] CUDA tensor, m = ", m);
  RL_CHECK(V >= 1 && V < (1 << 22), "sample_rows: the vocabulary must hold 1 .. 4194303 tokens (weights sum in 64 bits), got ", V);
  if (m == 0) return;
  // A row per cluster of CTAs, the cluster as large as keeps the step's CTAs within about one per SM: a few rows
  // spread over many SMs, many rows one CTA each (fewer passes' fixed costs and no cluster syncs).
  const int cluster = m <= 16 ? 8 : m <= 33 ? 4 : m <= 66 ? 2 : 1;
  static bool configured[4] = {};  // the candidates' 64 KB are above the default 48 KB of dynamic shared memory
  auto launch = [&](auto kernel, int c) {
    const int slot = c == 8 ? 3 : c == 4 ? 2 : c == 2 ? 1 : 0;
    if (!configured[slot]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)(kCandidates * sizeof(u64))));
      configured[slot] = true;
    }
    kernel<<<(unsigned)(m * c), kThreads, kCandidates * sizeof(u64), at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<float>(), logits.stride(0), (int)V, spec.data_ptr<double>(), (int)m, out.data_ptr<int64_t>());
  };
  if (cluster == 8) launch(sample_rows_kernel<8>, 8);
  else if (cluster == 4) launch(sample_rows_kernel<4>, 4);
  else if (cluster == 2) launch(sample_rows_kernel<2>, 2);
  else launch(sample_rows_kernel<1>, 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ringlinear
