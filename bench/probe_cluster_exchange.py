#!/usr/bin/env python3
"""Could the prefill's hand-off between its state and output passes go through a thread-block cluster (H200)? Two
facts decide it, measured here with a scratch kernel (not the extension): how many clusters of 2 / 4 / 8 / 16 CTAs
of 256 threads with the output pass's ~197 KB of shared memory the GPU holds at once (cudaOccupancyMaxActiveClusters;
the 4k one-wave plan needs 16 clusters of 8: one per head), and how long the exchange itself takes: each CTA's 64 KB
fp32 state into its own shared memory, a cluster barrier, CTA r scanning slice r of the states of all blocks through
distributed shared memory (reads the others' deltas, writes their entering states), a barrier, each reading its own.

    python3 bench/probe_cluster_exchange.py

Figures in docs/benchmarks.md ("Thirty-ninth session")."""
import json

import torch
from torch.utils.cpp_extension import load_inline

# The scratch kernel: CS CTAs a cluster, timestamps t0..t4 at the phases the docstring names (CTA's thread 0).
src = r'''
#include <torch/extension.h>
#include <cooperative_groups.h>
#include <c10/cuda/CUDAException.h>
namespace cg = cooperative_groups;
template <int CS>
__global__ void __launch_bounds__(256, 1) xk(float* out, long long* t) {
  extern __shared__ float4 X[];
  cg::cluster_group cl = cg::this_cluster();
  const int tid = threadIdx.x;
  float st[64];
  for (int k = 0; k < 64; ++k) st[k] = blockIdx.x * 1.0f + k * 0.01f + tid * 1e-4f;
  long long t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  #pragma unroll
  for (int k4 = 0; k4 < 16; ++k4) X[k4 * 256 + tid] = make_float4(st[4*k4], st[4*k4+1], st[4*k4+2], st[4*k4+3]);
  cl.sync();
  long long t1; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  const int r = cl.block_rank();
  constexpr int Q = 16 / CS;  // float4 granules per block per thread
  float4 d[CS - 1][Q];
  #pragma unroll
  for (int b = 0; b < CS - 1; ++b)
    #pragma unroll
    for (int q = 0; q < Q; ++q) d[b][q] = *cl.map_shared_rank(&X[(Q * r + q) * 256 + tid], b);
  float4 S[Q];
  #pragma unroll
  for (int q = 0; q < Q; ++q) S[q] = make_float4(0, 0, 0, 0);
  #pragma unroll
  for (int b = 0; b < CS; ++b)
    #pragma unroll
    for (int q = 0; q < Q; ++q) {
      *cl.map_shared_rank(&X[(Q * r + q) * 256 + tid], b) = S[q];
      if (b < CS - 1) { S[q].x = fmaf(0.9f, S[q].x, d[b][q].x); S[q].y = fmaf(0.9f, S[q].y, d[b][q].y);
                        S[q].z = fmaf(0.9f, S[q].z, d[b][q].z); S[q].w = fmaf(0.9f, S[q].w, d[b][q].w); }
    }
  long long t2; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t2));
  cl.sync();
  long long t3; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t3));
  float acc = 0;
  #pragma unroll
  for (int k4 = 0; k4 < 16; ++k4) { float4 v = X[k4 * 256 + tid]; acc += v.x + v.y + v.z + v.w; }
  long long t4; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t4));
  out[blockIdx.x * 256 + tid] = acc;
  if (tid == 0) {
    const long long ts[5] = {t0, t1, t2, t3, t4};
    for (int i = 0; i < 5; ++i) t[blockIdx.x * 5 + i] = ts[i];
  }
}
template <int CS>
std::vector<int64_t> run(torch::Tensor out, torch::Tensor t, int64_t smem, int64_t nclusters) {
  auto k = xk<CS>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  C10_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(CS * (nclusters > 0 ? nclusters : 1), 1, 1);  // (a zero grid is invalid)
  cfg.blockDim = dim3(256); cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CS; attr[0].val.clusterDim.y = 1; attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr; cfg.numAttrs = 1;
  int n = 0; C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, k, &cfg));
  if (nclusters > 0)
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, k, out.data_ptr<float>(), (long long*)t.data_ptr<int64_t>()));
  return {n};
}
std::vector<int64_t> run_cs(int64_t cs, torch::Tensor out, torch::Tensor t, int64_t smem, int64_t ncl) {
  if (cs == 8) return run<8>(out, t, smem, ncl);
  if (cs == 4) return run<4>(out, t, smem, ncl);
  if (cs == 16) return run<16>(out, t, smem, ncl);
  return run<2>(out, t, smem, ncl);
}
'''


def main():
    decl = "std::vector<int64_t> run_cs(int64_t cs, torch::Tensor out, torch::Tensor t, int64_t smem, int64_t ncl);"
    m = load_inline("cluster_probe", cpp_sources=decl, cuda_sources=src, functions=["run_cs"],
                    extra_cuda_cflags=["-gencode", "arch=compute_90a,code=sm_90a", "-O3"], verbose=False)
    res = {}
    out = torch.zeros(16 * 16 * 256, device="cuda"); t = torch.zeros(16 * 16 * 5, dtype=torch.int64, device="cuda")
    for smem in (197 * 1024, 100 * 1024):
        for cs in (2, 4, 8, 16):
            key = f"max_active_clusters cs={cs} smem={smem//1024}K"
            try:
                res[key] = m.run_cs(cs, out, t, smem, 0)[0]
            except Exception as e:
                res[key] = str(e)[:200]
    print(json.dumps(res, indent=1))  # clusters the GPU holds at once
    for cs, ncl in ((8, 16), (4, 32)):
        meds = []
        for rep in range(20):
            m.run_cs(cs, out, t, 197 * 1024, ncl); torch.cuda.synchronize()
            tt = t[: cs * ncl * 5].view(-1, 5).cpu().double()
            tt = tt - tt[:, :1].min()
            starts = tt[:, 0].view(ncl, cs).min(1).values  # each cluster's first start
            late = int((starts > tt[:, 4].min()).sum())  # clusters that started after the first CTA had ended
            meds.append([float(tt[:, i].median()) for i in range(5)] + [float(tt[:, 4].max()), late])
        meds = torch.tensor(meds[5:]).median(0).values.tolist()
        print(f"{ncl} clusters of {cs}: median us from the first start: started {meds[0]/1e3:.2f}, states stored + "
              f"barrier {meds[1]/1e3:.2f}, scan done {meds[2]/1e3:.2f}, barrier {meds[3]/1e3:.2f}, own state read "
              f"{meds[4]/1e3:.2f}; last end {meds[5]/1e3:.2f}; clusters that started after the first CTA had ended: "
              f"{meds[6]:.0f}")


if __name__ == "__main__":
    main()
