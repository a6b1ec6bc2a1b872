// Shared device helpers for the ringlinear CUDA kernels (sm_90a build; mma.sync / ldmatrix / cp.async are plain sm_80+).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

#define RL_DEVICE __device__ __forceinline__

// Argument checks of the host entry points: RL_CHECK(cond, message parts...) throws std::invalid_argument (Python
// ValueError) whose message joins the parts (strings, integers, floats). Not TORCH_CHECK, and no std::ostream: on the
// GPU machine (torch 2.11) a failing check whose message formats a number - TORCH_CHECK's c10::str, or an
// std::ostringstream here - killed the process with a segfault instead of raising, while literal-only messages
// raised (H200, 2026-11-28); so numbers are formatted by hand below.
#define RL_CHECK(cond, ...)                                   \
  do {                                                        \
    if (!(cond)) ::ringlinear::check_failed(__VA_ARGS__);     \
  } while (0)

namespace ringlinear {

inline void append_part(std::string& s, const char* p) { s += p; }
inline void append_part(std::string& s, const std::string& p) { s += p; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append_part(std::string& s, T v) {
  char digits[24];
  int n = 0;
  bool negative = false;
  if constexpr (std::is_signed_v<T>) negative = v < 0;
  unsigned long long u = negative ? 0ull - (unsigned long long)v : (unsigned long long)v;
  do { digits[n++] = char('0' + u % 10); u /= 10; } while (u);
  if (negative) s += '-';
  while (n) s += digits[--n];
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append_part(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", (double)v);
  s += buf;
}

template <typename... Parts>
[[noreturn]] inline void check_failed(const Parts&... parts) {
  std::string msg;
  (append_part(msg, parts), ...);
  throw std::invalid_argument(msg);
}

RL_DEVICE float to_float(float x) { return x; }
RL_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
RL_DEVICE float to_float(__half x) { return __half2float(x); }

template <typename T> RL_DEVICE T from_float(float x);
template <> RL_DEVICE float from_float<float>(float x) { return x; }
template <> RL_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> RL_DEVICE __half from_float<__half>(float x) { return __float2half(x); }

RL_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// An RMSNorm's scale rsqrt(sum / D + eps) for a row whose threads each hold a partial sum of squares, reduced in one
// fixed order (each warp by shuffles, then the warps' sums in warp order): kernels that share it agree bitwise
// (add_rms_norm and moe_combine's add + norm). warp_ss: shared [blockDim / 32]; every thread of the block calls it.
RL_DEVICE float block_rms_scale(float ss, float* warp_ss, int D, float eps) {
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) warp_ss[threadIdx.x / 32] = ss;
  __syncthreads();
  ss = 0.f;
  for (int w = 0; w < (int)(blockDim.x / 32); ++w) ss += warp_ss[w];
  return rsqrtf(__fadd_rn(__fdiv_rn(ss, (float)D), eps));
}

// The fp32 SwiGLU of the grouped GEMMs' fused epilogues (moe_stream.cu, moe_wide.cu, moe_tma.cu): silu(bf16 g) *
// bf16 u, with g and u rounded to bf16 first - the rounding of the grouped path, which writes g and u before
// moe_swiglu - so every path's h is bitwise the same (tested).
RL_DEVICE float round_bf16(float v) { return __bfloat162float(__float2bfloat16(v)); }
RL_DEVICE float swiglu_rounded(float g, float u) {
  g = round_bf16(g);
  return g / (1.f + expf(-g)) * round_bf16(u);
}

// Two floats -> one register of two bf16 (low half = first element), the operand format of mma.sync.
RL_DEVICE uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

RL_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l/8.
RL_DEVICE void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_addr(p)));
}
RL_DEVICE void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_addr(p)));
}

// Four 8x8 b16 matrices to a shared-memory address (sm_90): lane l supplies the row address of matrix l/8, register i
// holds this thread's fragment of matrix i (row lane/4, columns 2 (lane%4) + {0, 1}: the mma / wgmma C layout).
RL_DEVICE void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3) : "memory");
}
// Four 8x8 b16 matrices stored transposed (sm_90): lane l supplies the row address of matrix l/8, register i holds
// this thread's fragment of matrix i (the mma.sync C/A fragment layout: row lane/4, columns 2 (lane%4) + {0, 1}).
RL_DEVICE void stmatrix_x4_trans(void* p, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(smem_addr(p)), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3) : "memory");
}

// D = A(16x16 bf16, row) * B(16x8 bf16, col) + D (fp32).
RL_DEVICE void mma_bf16_16816(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// fp32 dot product of 8 bf16 pairs (one 16-byte load of each side), accumulated into acc.
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

// 16-byte global->shared copy to a shared-memory address; src_bytes < 16 zero-fills the rest (0 reads nothing: rows
// past the end of a sequence).
RL_DEVICE void cp_async_16_s(uint32_t smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));
}
RL_DEVICE void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  cp_async_16_s(smem_addr(smem), gmem, src_bytes);
}
// The same through L1 (.ca): data several copies of a block (or of the same 32-byte sector) read again. Without
// src_bytes: always 16 bytes.
RL_DEVICE void cp_async_16_ca(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
RL_DEVICE void cp_async_16_ca(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
// Fire-and-forget read of `bytes` (a multiple of 16, 16-byte aligned) from global memory into L2 (sm_90).
RL_DEVICE void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}
RL_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> RL_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ---------------------------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90). A kernel launched by launch_dependent may start while the kernel before it
// in the stream is still running (its blocks become resident once every block of that kernel has passed its own
// pdl_wait), so its launch, its prologue and the loads it issues before pdl_wait overlap the previous kernel's tail.
// A B=1 decode step is ~200 kernels of a few microseconds each (docs/kernels.md, "Dependent launches").
// The contract every such kernel keeps, in every block:
//  - pdl_wait() before it reads anything the previous kernel may write, and before its first global write;
//  - pdl_launch_dependents() only after its pdl_wait(), so that when a kernel starts, the kernel two launches back
//    has completed: before its pdl_wait a kernel may read the weights (written by no kernel of a step) and the
//    outputs of that kernel or older ones, nothing else.
// Launched without the attribute (set_programmatic_launch(false), or any other launcher) pdl_wait and
// pdl_launch_dependents do nothing and the stream order is the plain one.
RL_DEVICE void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
RL_DEVICE void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

inline std::atomic<bool>& programmatic_launch_flag() {
  static std::atomic<bool> on{true};
  return on;
}

// kernel<<<grid, block, smem, stream>>>(args...) with the programmatic-serialization attribute while the process-wide
// switch is on (read at each launch, so a CUDA graph keeps what was set when it was captured).
template <typename... Params, typename... Args>
inline cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                    Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic_launch_flag().load(std::memory_order_relaxed) ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(std::forward<Args>(args))...);
}

}  // namespace ringlinear
