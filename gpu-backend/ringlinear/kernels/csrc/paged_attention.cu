// Host entry of the paged-KV decode attention; the kernels are in paged_attention.cuh.
#include "paged_attention.cuh"

namespace ringlinear {

// Shapes and dtypes are validated by the Python wrapper; here only what the kernel relies on.
void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& lengths, int64_t block_size,
                            double scale, int64_t cap, int64_t split_len, int64_t num_splits, at::Tensor& out,
                            at::Tensor& ws_acc, at::Tensor& ws_ml) {
  const int B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  RL_CHECK(D == 64 || D == 128, "paged_decode_attention: head dim must be 64 or 128, got ", D);
  RL_CHECK(Hkv > 0 && H % Hkv == 0, "paged_decode_attention: H must be a multiple of Hkv");
  RL_CHECK(q.stride(2) == 1, "paged_decode_attention: q's last dim must be contiguous");
  RL_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous(),
              "paged_decode_attention: caches and out must be contiguous");
  RL_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(), "paged_decode_attention: q, caches and out dtypes differ");
  RL_CHECK(block_size > 0 && split_len > 0 && split_len % block_size == 0 && num_splits > 0,
              "paged_decode_attention: bad split plan");
  RL_CHECK((int64_t)split_len * num_splits >= cap, "paged_decode_attention: splits do not cover max_len");
  const auto tt = block_tables.scalar_type(), lt = lengths.scalar_type();
  RL_CHECK((tt == at::kInt || tt == at::kLong) && (lt == at::kInt || lt == at::kLong),
              "paged_decode_attention: block_tables and lengths must be int32 or int64");
  RL_CHECK(num_splits == 1 || (ws_acc.scalar_type() == at::kFloat && ws_ml.scalar_type() == at::kFloat &&
                                  ws_acc.numel() >= (int64_t)B * H * num_splits * D &&
                                  ws_ml.numel() >= (int64_t)B * H * num_splits * 2),
              "paged_decode_attention: workspace too small");
  RL_CHECK(num_splits <= INT32_MAX && cap <= INT32_MAX && k_cache.size(0) <= INT32_MAX,
              "paged_decode_attention: sizes exceed 32-bit key/row indices");
  if (B == 0) return;
  const at::cuda::CUDAGuard guard(q.device());
  PagedArgs a{};
  a.q = q.data_ptr(); a.q_sb = q.stride(0); a.q_sh = q.stride(1);
  a.k = k_cache.data_ptr(); a.v = v_cache.data_ptr();
  a.num_blocks = k_cache.size(0) / block_size;
  a.table = block_tables.data_ptr(); a.t_sb = block_tables.stride(0); a.t_sj = block_tables.stride(1);
  a.lengths = lengths.data_ptr();
  a.table64 = tt == at::kLong; a.len64 = lt == at::kLong;
  a.bs = (int)block_size; a.cap = (int)cap; a.split_len = (int)split_len; a.num_splits = (int)num_splits;
  a.H = H; a.Hkv = Hkv; a.scale_log2 = (float)scale * kLog2e;
  a.out = out.data_ptr();
  a.ws_acc = num_splits > 1 ? ws_acc.data_ptr<float>() : nullptr;
  a.ws_ml = num_splits > 1 ? ws_ml.data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (q.scalar_type()) {
    case at::kFloat: paged_launch_f32(a, D, H / Hkv, B, stream); break;
    case at::kBFloat16: paged_launch_bf16(a, D, H / Hkv, B, stream); break;
    case at::kHalf: paged_launch_f16(a, D, H / Hkv, B, stream); break;
    default: RL_CHECK(false, "paged_decode_attention: dtype must be float32, bfloat16 or float16");
  }
}

}  // namespace ringlinear
