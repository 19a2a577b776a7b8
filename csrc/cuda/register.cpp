// The CUDA implementations of the operators that csrc/ops.cpp declares: the same schemas, dispatched
// by device. This library is loaded after the CPU one, which defines the schemas.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

namespace lamb_kernels {
namespace cuda {

at::Tensor sums_of_squares_cuda(at::TensorList tensors, std::optional<at::TensorList> paired, int64_t chunk_size);
at::Tensor lamb_moments_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                             at::TensorList exp_avg_sq_scales, const at::Tensor& hyper,
                             const std::optional<at::Tensor>& grad_sumsq, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, int64_t chunk_size);
void lamb_apply_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, const at::Tensor& hyper, const at::Tensor& norms, const std::optional<at::Tensor>& found_inf,
                     at::TensorList copies, int64_t chunk_size);
void lars_apply_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList buffer_scales, const at::Tensor& hyper, const std::optional<at::Tensor>& norms,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     at::TensorList copies, int64_t chunk_size);

// The update operators (csrc/ops.cpp): on a GPU the two passes in turn, the same kernels as the
// streaming operators; `cache_bytes` orders the CPU operators' passes (docs/design.md section 7 says
// how an L2-sized schedule would map here).
void lamb_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                      const at::Tensor& hyper, const std::optional<at::Tensor>& grad_sumsq,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      at::TensorList copies, int64_t chunk_size, int64_t /*cache_bytes*/) {
  const at::Tensor norms = lamb_moments_cuda(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                                             hyper, grad_sumsq, grad_scale, found_inf, chunk_size);
  lamb_apply_cuda(params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, norms, found_inf, copies,
                  chunk_size);
}

void lars_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                      at::TensorList buffer_scales, const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, at::TensorList copies, bool adaptive,
                      int64_t chunk_size, int64_t /*cache_bytes*/) {
  std::optional<at::Tensor> norms;
  if (adaptive) norms = sums_of_squares_cuda(params, std::optional<at::TensorList>(grads), chunk_size);
  lars_apply_cuda(params, grads, momentum_buffers, buffer_scales, hyper, norms, grad_scale, found_inf, copies,
                  chunk_size);
}

TORCH_LIBRARY_IMPL(lamb_kernels, CUDA, m) {
  m.impl("sums_of_squares", &sums_of_squares_cuda);
  m.impl("lamb_moments", &lamb_moments_cuda);
  m.impl("lamb_apply", &lamb_apply_cuda);
  m.impl("lars_apply", &lars_apply_cuda);
  m.impl("lamb_update", &lamb_update_cuda);
  m.impl("lars_update", &lars_update_cuda);
}

}  // namespace cuda
}  // namespace lamb_kernels

// An importable module for the ahead-of-time build (`import lamb_kernels._C_cuda` loads the kernels
// above); the just-in-time build loads the same library with torch.ops.load_library.
extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C_cuda", "lamb_kernels' CUDA kernels", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
