// The operators' schemas (what each reads and mutates) and their CPU kernels. Fake kernels for
// torch.compile and opcheck are registered from Python (lamb_kernels/extension.py).
#include <torch/library.h>

#include <optional>

namespace lamb_kernels {

at::Tensor sums_of_squares_cpu(at::TensorList tensors, std::optional<at::TensorList> paired, int64_t chunk_size);
at::Tensor lamb_moments_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                            at::TensorList exp_avg_sq_scales, const at::Tensor& hyper,
                            const std::optional<at::Tensor>& grad_sumsq, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, int64_t chunk_size);
void lamb_apply_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, const at::Tensor& hyper, const at::Tensor& norms, const std::optional<at::Tensor>& found_inf,
                    at::TensorList copies, int64_t chunk_size);
void lars_apply_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList buffer_scales, const at::Tensor& hyper, const std::optional<at::Tensor>& norms,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    at::TensorList copies, int64_t chunk_size);
void lamb_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                     const at::Tensor& hyper, const std::optional<at::Tensor>& grad_sumsq,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     at::TensorList copies, int64_t chunk_size, int64_t cache_bytes);
void lars_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList buffer_scales, const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, at::TensorList copies, bool adaptive,
                     int64_t chunk_size, int64_t cache_bytes);

// Element types: params, grads and the lists of sums_of_squares may be float32, bfloat16 or float16,
// one dtype per list (fp32 master weights with bf16 grads, say); the optimizer states are float32,
// bfloat16, or 8-bit codes (m and momentum buffers int8, v uint8) with their float32 block scales in the
// *_scales lists (empty for float states; csrc/optimizer_math.h); hyper, norms and the one-element
// tensors are float32. Arithmetic is fp32; a value stored in bf16 or fp16 is rounded to the nearest even.
//
// grad_scale (one element, or None): the grads arrive multiplied by it (a GradScaler's loss scale);
// every grad element, and every grad norm, is multiplied by 1 / grad_scale before use.
// found_inf (one element, or None): when nonzero, the op writes nothing (lamb_moments returns zeros).
// copies: empty, or one bfloat16 or float16 tensor per param, laid out as the param, into which the
// updated fp32 params (master weights) are also written, rounded.
TORCH_LIBRARY(lamb_kernels, m) {
  // Per tensor, the sum of squares of its elements: float32 [n_tensors]; with `paired` (a list like
  // `tensors`, possibly of another dtype), [n_tensors, 2], the second column for `paired`, both read
  // in one pass.
  m.def("sums_of_squares(Tensor[] tensors, Tensor[]? paired, int chunk_size) -> Tensor");
  // LAMB steps 1-5 (docs/design.md section 2): moments in place; returns float32 [n_tensors, 2], per tensor
  // ||p||^2 (before the update) and ||u||^2. hyper: float32 [n_tensors, 16] (lamb_kernels/hyper_table.py).
  // grad_sumsq: the sum of squares of every (still scaled) grad, for clipping; None when no group clips.
  m.def("lamb_moments(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
        "Tensor(c!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_scales, Tensor hyper, Tensor? grad_sumsq, "
        "Tensor? grad_scale, Tensor? found_inf, int chunk_size) -> Tensor");
  // LAMB steps 6-7: p <- p - lr * r * u, the trust ratio r from `norms` (lamb_moments' result).
  m.def("lamb_apply(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] exp_avg_scales, "
        "Tensor[] exp_avg_sq_scales, Tensor hyper, Tensor norms, Tensor? found_inf, Tensor(d!)[] copies, "
        "int chunk_size) -> ()");
  // LARS (docs/design.md section 3): trust ratio from `norms` ([n_tensors, 2]: ||p||^2, ||g||^2 of the still
  // scaled grads; None when no tensor adapts), weight decay, momentum, update. A tensor without
  // momentum has an empty placeholder in momentum_buffers.
  m.def("lars_apply(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(e!)[] buffer_scales, Tensor hyper, Tensor? norms, Tensor? grad_scale, Tensor? found_inf, "
        "Tensor(c!)[] copies, int chunk_size) -> ()");
  // The update operators: a whole step of a bucket whose tensors are not sharded (no all-reduce of
  // norms between its passes), lamb_moments then lamb_apply (LAMB steps 2-7), or the norms and
  // lars_apply (LARS), with the bits of those operators. On CPU they run by cache groups: per group
  // of tensors of at most `cache_bytes` (multi_tensor_cpu.h), the first pass, the group's norms,
  // then the second pass while the group is still in cache; elsewhere the two passes in turn.
  // lars_update's `adaptive`: some tensor adapts (else its norms pass is skipped).
  m.def("lamb_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(e!)[] exp_avg_scales, Tensor(f!)[] exp_avg_sq_scales, Tensor hyper, Tensor? grad_sumsq, "
        "Tensor? grad_scale, Tensor? found_inf, Tensor(d!)[] copies, int chunk_size, int cache_bytes) -> ()");
  m.def("lars_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(e!)[] buffer_scales, Tensor hyper, Tensor? grad_scale, Tensor? found_inf, Tensor(c!)[] copies, "
        "bool adaptive, int chunk_size, int cache_bytes) -> ()");
}

TORCH_LIBRARY_IMPL(lamb_kernels, CPU, m) {
  m.impl("sums_of_squares", &sums_of_squares_cpu);
  m.impl("lamb_moments", &lamb_moments_cpu);
  m.impl("lamb_apply", &lamb_apply_cpu);
  m.impl("lars_apply", &lars_apply_cpu);
  m.impl("lamb_update", &lamb_update_cpu);
  m.impl("lars_update", &lars_update_cpu);
}

}  // namespace lamb_kernels
