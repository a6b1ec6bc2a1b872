// Python bindings of the ringlinear CUDA extension (built lazily by ringlinear.kernels._build).
#include <torch/extension.h>

namespace ringlinear {
void lightning_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& state,
                      const at::Tensor& slots, const at::Tensor& gamma, at::Tensor& out, double scale,
                      const c10::optional<at::Tensor>& q_norm_w, const c10::optional<at::Tensor>& k_norm_w,
                      double eps, const c10::optional<at::Tensor>& positions, const c10::optional<at::Tensor>& inv_freq,
                      int64_t cols, int64_t ahead);
at::Tensor prefill_stamps();
at::Tensor prefill_chunk_clocks();
void lightning_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& state,
                       at::Tensor& ws, const at::Tensor& items_state, const at::Tensor& items_out,
                       const at::Tensor& scan_seqs, const at::Tensor& gamma, double scale, int64_t jsplit,
                       const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w,
                       const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, double eps);
void moe_route(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
               int64_t topk, bool renormalize, double scaling, int64_t append, at::Tensor& ids, at::Tensor& weights);
void moe_route_align_small(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t n_group,
                           int64_t topk_group, int64_t topk, bool renormalize, double scaling, int64_t append,
                           at::Tensor& ids, at::Tensor& weights, at::Tensor& offsets, at::Tensor& sorted,
                           at::Tensor& active);
void moe_align(const at::Tensor& ids, int64_t E, at::Tensor& offsets, at::Tensor& sorted, at::Tensor& active);
void moe_router_decode(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t n_group,
                       int64_t topk_group, int64_t topk, bool renormalize, double scaling, int64_t append,
                       at::Tensor& logits, at::Tensor& counter, at::Tensor& ids, at::Tensor& weights,
                       at::Tensor& offsets, at::Tensor& sorted, at::Tensor& active);
void moe_experts_decode(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
                        const at::Tensor& offsets, const at::Tensor& sorted, const at::Tensor& active,
                        const at::Tensor& weights, int64_t topk, at::Tensor& h, at::Tensor& y, bool small_passes);
void moe_sort(const at::Tensor& ids, int64_t E, int64_t topk, at::Tensor& counts, at::Tensor& offsets, at::Tensor& ends,
              at::Tensor& sorted, at::Tensor& inv, at::Tensor& tok);
void moe_stream_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& gather, const at::Tensor& w,
                     const c10::optional<at::Tensor>& w_up, const at::Tensor& offsets, at::Tensor& y, int64_t stages,
                     bool early);
void moe_wide_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& gather, const at::Tensor& w,
                   const c10::optional<at::Tensor>& w_up, const at::Tensor& offsets, at::Tensor& y, int64_t stages,
                   int64_t pass_rows);
void moe_tma_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& gather, const at::Tensor& w,
                  const c10::optional<at::Tensor>& w_up, const at::Tensor& offsets, at::Tensor& y, int64_t stages);
void moe_swiglu(const at::Tensor& g, const at::Tensor& u, at::Tensor& h);
void moe_scatter_rows(const at::Tensor& x, const at::Tensor& inv, int64_t topk, at::Tensor& xs);
void moe_combine(const at::Tensor& ys, const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& w,
                 const c10::optional<at::Tensor>& shared, int64_t topk, at::Tensor& out,
                 const c10::optional<at::Tensor>& res, const c10::optional<at::Tensor>& norm_w, double eps,
                 const c10::optional<at::Tensor>& y_out);
void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& lengths, int64_t block_size,
                            double scale, int64_t cap, int64_t split_len, int64_t num_splits, at::Tensor& out,
                            at::Tensor& ws_acc, at::Tensor& ws_ml);
void qkv_prologue(const at::Tensor& qkv, const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w,
                  at::Tensor& q_out, at::Tensor& k_out, const c10::optional<at::Tensor>& v_opt, bool silu,
                  int64_t norm_code, double eps, int64_t rot, const c10::optional<at::Tensor>& cos_tab,
                  const c10::optional<at::Tensor>& sin_tab, const c10::optional<at::Tensor>& kv_rows);
void gated_group_rmsnorm(const at::Tensor& o, const at::Tensor& gate, const at::Tensor& weight, at::Tensor& out,
                         int64_t groups, double eps);
void add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& s_out, at::Tensor& y_out, double eps);
void sample_rows(const at::Tensor& logits, const at::Tensor& spec, at::Tensor& out);
void dense_gemv(const at::Tensor& x, const at::Tensor& w, at::Tensor& y);
void skinny_gemm(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, int64_t ksplit);
void set_programmatic_launch(bool on);
bool programmatic_launch();
}  // namespace ringlinear

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lightning_decode", &ringlinear::lightning_decode, "lightning decode step (in-place slot state)");
  m.def("lightning_prefill", &ringlinear::lightning_prefill, "lightning varlen prefill (three passes)");
  m.def("prefill_stamps", &ringlinear::prefill_stamps,
        "the prefill passes' per-CTA phase stamps since the last call (a -DRL_PREFILL_STAMPS build; else empty)");
  m.def("prefill_chunk_clocks", &ringlinear::prefill_chunk_clocks,
        "the prefill chunk loop's per-phase cycle stamps since the last call (a -DRL_PREFILL_STAMPS build; else empty)");
  m.def("moe_route", &ringlinear::moe_route, "sigmoid group-limited top-k routing");
  m.def("moe_align", &ringlinear::moe_align, "sort assignments by expert");
  m.def("moe_route_align_small", &ringlinear::moe_route_align_small,
        "routing + sort by expert of a few tokens in one block (decode path)");
  m.def("moe_router_decode", &ringlinear::moe_router_decode,
        "bf16 router GEMV + routing + sort of a few tokens in one launch (decode path)");
  m.def("moe_experts_decode", &ringlinear::moe_experts_decode, "selected-expert SwiGLU (decode path)");
  m.def("moe_sort", &ringlinear::moe_sort, "stable multi-block sort of assignments by expert (grouped path)");
  m.def("moe_stream_gemm", &ringlinear::moe_stream_gemm, "weight-streaming grouped GEMM, few rows per expert (+ SwiGLU)");
  m.def("moe_wide_gemm", &ringlinear::moe_wide_gemm, "wgmma grouped GEMM, ~30-500 rows per expert, gathered x (+ SwiGLU)");
  m.def("moe_tma_gemm", &ringlinear::moe_tma_gemm,
        "persistent TMA + warp-specialised wgmma grouped GEMM, many rows per expert (gathered x + SwiGLU, or x in expert order)");
  m.def("moe_swiglu", &ringlinear::moe_swiglu, "bf16 silu(g) * u computed in fp32");
  m.def("moe_scatter_rows", &ringlinear::moe_scatter_rows, "token rows to their k expert-sorted positions");
  m.def("moe_combine", &ringlinear::moe_combine, "weighted sum of each token's expert rows + shared expert -> bf16");
  m.def("paged_decode_attention", &ringlinear::paged_decode_attention, "paged-KV GQA decode attention (split-K)");
  m.def("qkv_prologue", &ringlinear::qkv_prologue, "fused qkv split + silu + QK RMSNorm + partial RoPE");
  m.def("gated_group_rmsnorm", &ringlinear::gated_group_rmsnorm, "fused group RMSNorm * sigmoid(gate)");
  m.def("add_rms_norm", &ringlinear::add_rms_norm, "fused residual add + RMSNorm (s = x + delta; rms_norm(s))");
  m.def("dense_gemv", &ringlinear::dense_gemv, "y = x W^T for a few bf16 rows (decode projections; dependent launch)");
  m.def("skinny_gemm", &ringlinear::skinny_gemm, "y = x W^T for <= 8 bf16 rows on mma.sync (ksplit 0: the default)");
  m.def("set_programmatic_launch", &ringlinear::set_programmatic_launch,
        "launch the decode path's kernels as programmatic dependents (sm_90) from now on (captured graphs keep theirs)");
  m.def("programmatic_launch", &ringlinear::programmatic_launch, "whether kernels are launched as programmatic dependents");
  m.def("sample_rows", &ringlinear::sample_rows, "one token per row: temperature, top-k, top-p and the draw, no sort");
}
