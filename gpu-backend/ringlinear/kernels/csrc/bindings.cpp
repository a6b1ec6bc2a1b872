// Python bindings of the ringlinear CUDA extension (built lazily by ringlinear.kernels._build).
#include <torch/extension.h>

namespace ringlinear {
void lightning_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& state,
                      const at::Tensor& slots, const at::Tensor& gamma, at::Tensor& out, double scale,
                      const c10::optional<at::Tensor>& q_norm_w, const c10::optional<at::Tensor>& k_norm_w,
                      double eps, const c10::optional<at::Tensor>& positions, const c10::optional<at::Tensor>& inv_freq,
                      int64_t cols);
void lightning_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& state,
                       at::Tensor& ws, const at::Tensor& items_state, const at::Tensor& items_out,
                       const at::Tensor& scan_seqs, const at::Tensor& gamma, double scale, int64_t jsplit);
void moe_route(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
               int64_t topk, bool renormalize, double scaling, at::Tensor& ids, at::Tensor& weights);
void moe_align(const at::Tensor& ids, int64_t E, at::Tensor& offsets, at::Tensor& sorted, at::Tensor& active);
void moe_experts_decode(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
                        const at::Tensor& offsets, const at::Tensor& sorted, const at::Tensor& active,
                        const at::Tensor& weights, int64_t topk, at::Tensor& h, at::Tensor& y);
}  // namespace ringlinear

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lightning_decode", &ringlinear::lightning_decode, "lightning decode step (in-place slot state)");
  m.def("lightning_prefill", &ringlinear::lightning_prefill, "lightning varlen prefill (three passes)");
  m.def("moe_route", &ringlinear::moe_route, "sigmoid group-limited top-k routing");
  m.def("moe_align", &ringlinear::moe_align, "sort assignments by expert");
  m.def("moe_experts_decode", &ringlinear::moe_experts_decode, "selected-expert SwiGLU (decode path)");
}
