// Argument checks shared by the two grouped-GEMM entry points with the same contract (moe_stream_gemm in
// moe_stream.cu, moe_wide_gemm in moe_wide.cu): x [R, K], optional gather [A], w / w_up [E, F, K], offsets [E+1],
// y [A, F]. Raises ValueError (RL_CHECK) naming `fn` and the argument.
#pragma once
#include <torch/extension.h>

namespace ringlinear {
void check_grouped_args(const char* fn, const at::Tensor& x, const c10::optional<at::Tensor>& gather,
                        const at::Tensor& w, const c10::optional<at::Tensor>& w_up, const at::Tensor& offsets,
                        const at::Tensor& y);
}  // namespace ringlinear
