// __half instantiations of the paged-KV decode attention kernels (see paged_attention.cuh).
#include "paged_attention.cuh"

namespace ringlinear {
void paged_launch_f16(const PagedArgs& a, int D, int rep, int B, cudaStream_t stream) {
  launch_dim<__half>(a, D, rep, B, stream);
}
}  // namespace ringlinear
