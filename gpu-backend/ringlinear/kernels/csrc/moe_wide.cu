// Grouped GEMM for MoE steps of ~1k-4k tokens (prompt chunks, mixed steps), on Hopper warpgroup MMA: per expert e,
// Y[rows_e, F] = X[rows_e, K] . W_e[F, K]^T, the same contract as moe_stream_gemm (moe_stream.cu).
//
// Between the stream kernel (<= 32 rows per pass, mma.sync) and the CUTLASS grouped GEMM (128-row token tiles padded
// per expert, a scattered copy of x in, gate|up out to a separate SwiGLU pass) an expert holds ~30-500 rows. Here a
// CTA owns 128 weight rows of one expert (the wgmma M side, 64 per warpgroup) and takes the expert's rows in passes of
// up to BN = 128 or 256 as the N side, with N = 32 / 64 / 128 (/ 256) picked per pass so a short last pass does not
// pay for a full tile. Once an expert holds a few hundred rows the bound is the warps that issue both the copies and
// the MMAs (Nsight Compute: 2 warps per scheduler, tensor pipe ~45% busy, L2 ~50%): each k-step's barrier and copy
// instructions are paid once per 64 columns, so a 256-row pass does twice the MMA work for them (docs/benchmarks.md).
// An expert's passes run in neighbouring CTAs (grid x), so its weight slice comes from HBM about once per step.
//   - x rows are gathered through `gather` while they are copied into shared memory: no scattered copy of x;
//   - GATE_UP: a warp's 16 weight rows are 8 gate rows then the 8 up rows of the same features, so the wgmma
//     accumulator layout puts g and u of one (feature, token) in the same thread, and the epilogue writes
//     h = bf16(silu(bf16(g)) * bf16(u)) (the grouped path's rounding) without a round trip;
//   - both operands K-major in 128-byte-swizzled tiles (the layout wgmma's descriptors read), filled by a cp.async
//     ring STAGES deep with one wgmma group in flight; the outputs leave through a shared-memory tile as 16-byte
//     row stores.
// Each output element is one fp32 dot product in a fixed k order: results do not depend on the other experts or on
// the pass split.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"
#include "moe_grouped.h"
#include "wgmma.cuh"

namespace ringlinear {

namespace {
constexpr int kWideThreads = 256;                  // 2 warpgroups
constexpr int kWideBM = 128;                       // weight rows per CTA: 64 per warpgroup
constexpr int kWideTileBytes = 128 * 128;          // weight tile [128 rows][64 bf16]: one 128-byte swizzle row per row
// A ring slot: the weight tile, then the activation tile [BN rows][64 bf16] (BN = expert rows per pass).
template <int BN> constexpr int wide_stage_bytes() { return kWideTileBytes + BN * 128; }


// Keeps a value the pass sets up once in a register: without it the compiler recomputes addresses in every k-step.
template <typename T> RL_DEVICE T opaque(T v) {
  if constexpr (sizeof(T) == 8) asm volatile("" : "+l"(v));
  else asm volatile("" : "+r"(v));
  return v;
}

// One k step (64 columns = 4 wgmma k16 steps) of a pass: D[64 x N] (+)= W rows of this warpgroup x tokens^T. da / db:
// the descriptors of the warpgroup's weight tile and of the token tile in ring slot 0; off: the slot's offset, in the
// descriptors' 16-byte units (the start-address field is the low 14 bits: shared memory < 256 KB never carries out).
template <int N>
RL_DEVICE void wide_mma(float (&acc)[N / 2], uint64_t da0, uint64_t db0, uint32_t off, bool first) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t da = da0 + off + kk * 2, db = db0 + off + kk * 2;
    const int scale = first && kk == 0 ? 0 : 1;
    if constexpr (N == 256) wgmma_m64n256k16_ss(acc, da, db, scale);
    else if constexpr (N == 128) wgmma_m64n128k16_ss(acc, da, db, scale);
    else if constexpr (N == 64) wgmma_m64n64k16_ss(acc, da, db, scale);
    else wgmma_m64n32k16_ss(acc, da, db, scale);
  }
}
}  // namespace

// What a CTA's pass needs: its tiles, its rows and where they go.
struct WidePass {
  uint8_t* smem; uint32_t sbase;
  const __nv_bfloat16* wrow; int64_t wstep;    // this thread's weight rows: wrow + i * wstep (i < 4) ...
  unsigned wok;                                // ... where bit i is set (the row is < F)
  const __nv_bfloat16* x; const int32_t* gather; const __nv_bfloat16* w;
  int row0, K, KT, F, f0;
  __nv_bfloat16* y;
};

// One pass over the expert's rows p0 .. p0 + prow - 1 (prow <= N <= BN) with a wgmma of width N: the K loop through
// the cp.async ring, then the epilogue through shared memory.
template <int N, int BN, int STAGES, bool GATE_UP>
RL_DEVICE void wide_pass(const WidePass& a, int p0, int prow) {
  constexpr int kFeatures = GATE_UP ? kWideBM / 2 : kWideBM;  // output features per CTA
  constexpr int kStageBytes = wide_stage_bytes<BN>();
  constexpr int kXRows = (N + 31) / 32;  // activation rows per thread
  const int tid = threadIdx.x, wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31;
  // Copies: thread tid always moves 16-byte chunk c = tid % 8 of tile rows rb + 32 i (rb = tid / 8), in both tiles:
  // all its source addresses are set up once per pass, so a k-step's copies are a pointer offset and a cp.async each
  // (the warps that issue them also issue the MMAs: their instruction count per k-step bounds the kernel). Rows the
  // pass does not fill (past prow, or past F) are zero-filled from row 0 of their matrix.
  const int c = tid & 7, rb = tid >> 3;
  const __nv_bfloat16* wsrc[4];  // advanced by 64 columns per k-step loaded
  const __nv_bfloat16* xsrc[kXRows];
  bool wok[4], xok[kXRows];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    wok[i] = (a.wok >> i) & 1;
    wsrc[i] = (wok[i] ? a.wrow + i * a.wstep : a.w) + c * 8;
  }
#pragma unroll
  for (int i = 0; i < kXRows; ++i) {  // rb + 32 i < N always: kXRows = N / 32
    const int r = rb + 32 * i;
    xok[i] = r < prow;
    const int64_t src = xok[i] ? (a.gather ? a.gather[a.row0 + p0 + r] : a.row0 + p0 + r) : 0;
    xsrc[i] = a.x + src * a.K + c * 8;
  }
  const uint32_t sdst = opaque(a.sbase + swz128(rb, c));  // row rb + 32 i is 4 KB further: (rb + 32 i) % 8 == rb % 8
  int kleft = a.K - c * 8;  // columns left from this thread's chunk at the next k-step loaded
  auto load = [&](int slot) {
    const bool kin = kleft > 0;
    const uint32_t wt = sdst + slot * kStageBytes, xt = wt + kWideTileBytes;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      cp_async_16_s(wt + 4096 * i, wsrc[i], wok[i] && kin ? 16 : 0);
      wsrc[i] += 64;
    }
#pragma unroll
    for (int i = 0; i < kXRows; ++i) {
      cp_async_16_s(xt + 4096 * i, xsrc[i], xok[i] && kin ? 16 : 0);
      xsrc[i] += 64;
    }
    kleft -= 64;
  };
  const uint64_t da0 = opaque(smem_desc(a.sbase + wg * 64 * 128, 16, 1024));
  const uint64_t db0 = opaque(smem_desc(a.sbase + kWideTileBytes, 16, 1024));

  // The ring: STAGES slots, loads run STAGES - 2 steps ahead, and one step's wgmma group stays in flight while the
  // next step's barrier and copies are issued, so the slot a copy overwrites (read by step kt - 2) is free.
  float acc[N / 2];
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < a.KT) load(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < a.KT; ++kt) {
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();  // this thread's cp.async writes, visible to the async proxy (wgmma) ...
    __syncthreads();      // ... of every thread; and every warpgroup's wgmma of step kt - 2 has completed
    if (kt + STAGES - 2 < a.KT) load((kt + STAGES - 2) % STAGES);
    cp_async_commit();
    const uint32_t off = (kt % STAGES) * (kStageBytes / 16);
    wgmma_fence();
    wide_mma<N>(acc, da0, db0, off, kt == 0);
    wgmma_commit();
    wgmma_wait<1>();  // step kt - 1's group is done: its slot may be refilled after the next barrier
  }
  wgmma_wait<0>();
  fence_regs(acc);
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done with the stages: the output tile reuses them

  // Output tile [N tokens][kFeatures] bf16 (row pitch padded by 16 bytes), then 16-byte stores of whole rows.
  constexpr int kPitch = kFeatures + 8;
  __nv_bfloat16* ot = reinterpret_cast<__nv_bfloat16*>(a.smem);
  const int g4 = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
    const int t = n * 8 + 2 * tig;
    if constexpr (GATE_UP) {  // acc[4n + 0/1]: gate of feature fl, tokens t / t+1; acc[4n + 2/3]: up of the same
      const int fl = 32 * wg + 8 * wq + g4;
      ot[t * kPitch + fl] = __float2bfloat16(swiglu_rounded(acc[4 * n], acc[4 * n + 2]));
      ot[(t + 1) * kPitch + fl] = __float2bfloat16(swiglu_rounded(acc[4 * n + 1], acc[4 * n + 3]));
    } else {
      const int fl = 64 * wg + 16 * wq + g4;
      ot[t * kPitch + fl] = __float2bfloat16(acc[4 * n]);
      ot[(t + 1) * kPitch + fl] = __float2bfloat16(acc[4 * n + 1]);
      ot[t * kPitch + fl + 8] = __float2bfloat16(acc[4 * n + 2]);
      ot[(t + 1) * kPitch + fl + 8] = __float2bfloat16(acc[4 * n + 3]);
    }
  }
  __syncthreads();
  constexpr int kChunks = kFeatures / 8;  // 16-byte chunks per output row
  for (int idx = tid; idx < prow * kChunks; idx += kWideThreads) {
    const int t = idx / kChunks, ch = idx % kChunks, f = a.f0 + ch * 8;
    if (f < a.F)
      *reinterpret_cast<uint4*>(a.y + (int64_t)(a.row0 + p0 + t) * a.F + f) =
          *reinterpret_cast<const uint4*>(ot + t * kPitch + ch * 8);
  }
  __syncthreads();  // the next pass's copies overwrite the output tile
}

// x: [*, K] bf16 rows; gather [A] (x row of sorted row p) or null (x row p itself); w / w2 (GATE_UP: gate / up):
// [E, F, K] with contiguous K rows, expert strides sw / sw2; offsets [E+1]; y [A, F] bf16 (F = I for GATE_UP).
template <int BN, int STAGES, bool GATE_UP>
__global__ void __launch_bounds__(kWideThreads, 1) moe_wide_kernel(
    const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ gather, const __nv_bfloat16* __restrict__ w,
    int64_t sw, const __nv_bfloat16* __restrict__ w2, int64_t sw2, const int32_t* __restrict__ offsets, int K, int F,
    __nv_bfloat16* __restrict__ y) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  WidePass a;
  a.smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  a.sbase = smem_addr(a.smem);
  pdl_wait();  // offsets and x come from the kernels just before this one
  pdl_launch_dependents();
  const int e = blockIdx.z;
  const int row0 = offsets[e], rows = offsets[e + 1] - row0;
  if (rows <= (int)blockIdx.x * BN) return;  // the expert has fewer passes than this CTA's first
  constexpr int kFeatures = GATE_UP ? kWideBM / 2 : kWideBM;
  a.x = x; a.gather = gather; a.w = w; a.row0 = row0; a.K = K; a.KT = (K + 63) / 64; a.F = F; a.y = y;
  a.f0 = blockIdx.y * kFeatures;
  // Tile row r = rb + 32 i of this thread. GATE_UP: warpgroup r/64, warp (r/16)%4, row j = r%16 -> gate (j < 8) or up
  // (j >= 8) of feature 32 (r/64) + 8 ((r/16)%4) + j%8, i.e. feature f_0 + 16 i of one matrix; else feature r.
  const int rb = threadIdx.x >> 3;
  const int fb = GATE_UP ? a.f0 + 8 * ((rb >> 4) & 1) + (rb & 7) : a.f0 + rb;
  const int fstep = GATE_UP ? 16 : 32;
  const __nv_bfloat16* base = GATE_UP && (rb & 8) ? w2 + (int64_t)e * sw2 : w + (int64_t)e * sw;
  a.wrow = base + (int64_t)fb * K;
  a.wstep = (int64_t)fstep * K;
  a.wok = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) a.wok |= (fb + fstep * i < F ? 1u : 0u) << i;
  // Passes blockIdx.x, + gridDim.x, ... of the expert: the CTAs of one weight slice are neighbours in launch order,
  // so they run together and read the slice from HBM about once; a crowded expert's extra passes run in turn.
  for (int p0 = blockIdx.x * BN; p0 < rows; p0 += gridDim.x * BN) {  // a short pass: a narrower wgmma
    const int prow = min(BN, rows - p0);
    if constexpr (BN == 256) {  // only two widths here: with all four inlined, ptxas spills the 256-row pass
      if (prow > 128) wide_pass<256, BN, STAGES, GATE_UP>(a, p0, prow);
      else wide_pass<128, BN, STAGES, GATE_UP>(a, p0, prow);
    } else {
      if (prow > 64) wide_pass<128, BN, STAGES, GATE_UP>(a, p0, prow);
      else if (prow > 32) wide_pass<64, BN, STAGES, GATE_UP>(a, p0, prow);
      else wide_pass<32, BN, STAGES, GATE_UP>(a, p0, prow);
    }
  }
}

template <int BN, int STAGES, bool GATE_UP>
static void launch_wide(const at::Tensor& x, const int32_t* gather, const at::Tensor& w, const at::Tensor* w2,
                        const at::Tensor& offsets, int K, int F, at::Tensor& y, cudaStream_t stream) {
  const int smem = STAGES * wide_stage_bytes<BN>() + 1024;  // + alignment slack for the 1024-byte swizzle atoms
  auto kernel = moe_wide_kernel<BN, STAGES, GATE_UP>;
  // Concurrent passes per expert: the host knows only the mean rows per expert (no sync), so 1.75x the mean covers
  // the experts of a balanced router in one wave of passes; a crowded expert's CTAs take its extra passes in turn.
  const int E = offsets.numel() - 1;
  const double mean_rows = (double)y.size(0) / E;
  const int passes = std::max(1, std::min(64, (int)std::ceil(1.75 * mean_rows / BN)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  constexpr int features = GATE_UP ? kWideBM / 2 : kWideBM;
  auto bf = [](const at::Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()); };
  C10_CUDA_CHECK(launch_dependent(kernel, dim3(passes, (F + features - 1) / features, E), kWideThreads, (size_t)smem,
                                  stream, bf(x), gather, bf(w), w.stride(0), w2 ? bf(*w2) : nullptr, w2 ? w2->stride(0) : 0,
                                  offsets.data_ptr<int32_t>(), K, F, reinterpret_cast<__nv_bfloat16*>(y.data_ptr())));
}

// Same arguments and checks as moe_stream_gemm (shared: check_grouped_args in moe_stream.cu), plus F % 8 == 0 (the
// output rows leave as 16-byte chunks). stages: 4 or 5 slots in the ring (loads 2 or 3 k-steps ahead; one CTA per SM);
// pass_rows: 128 or 256 expert rows per pass (256 only with 4 stages: five 48 KB slots do not fit).
void moe_wide_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& gather, const at::Tensor& w,
                   const c10::optional<at::Tensor>& w_up, const at::Tensor& offsets, at::Tensor& y, int64_t stages,
                   int64_t pass_rows) {
  check_grouped_args("moe_wide_gemm", x, gather, w, w_up, offsets, y);
  const int K = x.size(1), F = w.size(1);
  RL_CHECK(F % 8 == 0, "moe_wide_gemm: F (w's rows per expert) must be a multiple of 8, got ", F);
  RL_CHECK(reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0, "moe_wide_gemm: y must be 16-byte aligned");
  RL_CHECK(stages == 4 || stages == 5, "moe_wide_gemm: stages must be 4 or 5");
  RL_CHECK(pass_rows == 128 || (pass_rows == 256 && stages == 4),
           "moe_wide_gemm: pass_rows must be 128, or 256 with stages 4; got ", pass_rows, " with stages ", stages);
  if (y.size(0) == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* g = gather ? gather->data_ptr<int32_t>() : nullptr;
  const at::Tensor* up = w_up ? &*w_up : nullptr;
  if (up) {
    if (pass_rows == 256) launch_wide<256, 4, true>(x, g, w, up, offsets, K, F, y, stream);
    else if (stages == 4) launch_wide<128, 4, true>(x, g, w, up, offsets, K, F, y, stream);
    else launch_wide<128, 5, true>(x, g, w, up, offsets, K, F, y, stream);
  } else {
    if (pass_rows == 256) launch_wide<256, 4, false>(x, g, w, nullptr, offsets, K, F, y, stream);
    else if (stages == 4) launch_wide<128, 4, false>(x, g, w, nullptr, offsets, K, F, y, stream);
    else launch_wide<128, 5, false>(x, g, w, nullptr, offsets, K, F, y, stream);
  }
}

}  // namespace ringlinear
