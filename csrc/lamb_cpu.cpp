// LAMB on CPU tensors: docs/design.md section 2 in the Triton kernels' three passes over memory.
//
// 1. sums_of_squares over the grads (multi_tensor_cpu.cpp), for the global grad norm (reads g: 4 bytes/param);
// 2. lamb_moments: steps 1-5, moments in place, per-tensor ||p||^2 and ||u||^2 with p taken before the
//    update (reads p g m v, writes m v: 24 bytes/param);
// 3. lamb_apply: steps 6-7, u recomputed from m and v (reads p m v, writes p: 16 bytes/param).
//
// fp32 arithmetic, IEEE square root and division per element, no fast-math. Per-tensor scalars
// (1 / bc1, 1 / bc2, 1 / c) are inverted once per chunk and multiplied in, where the Triton kernels
// divide: on data that sits in cache the divide unit bounds these loops, and each element already
// needs one division and one square root for u. The results stay within one rounding of dividing.
//
// The element loops are templates on the storage types of params (P), grads (G) and the params'
// low-precision copies (C, NoCopy when there are none): elements are converted to float on load and
// rounded to the nearest even on store (multi_tensor_cpu.h). Moments stay float32. A loop that reads
// grads is also a template on kScaled (a grad_scale was given), so that the fp32 loop without one is
// the loop of before grad scaling.
#include "hyper_columns.h"
#include "multi_tensor_cpu.h"

#include <cmath>
#include <optional>

namespace lamb_kernels {
namespace {

// Steps 4-5: u = (m / bc1) / (sqrt(v / bc2) + eps) + wd_decoupled * p. A weight decay of 0 adds
// nothing, not 0 * p: an infinite p stays infinite, as in the torch backend and torch.optim.
struct LambUpdate {
  float inv_bc1, inv_bc2, eps, wd_decoupled;

  explicit LambUpdate(const float* h)
      : inv_bc1(1.0f / h[kLambBc1]), inv_bc2(1.0f / h[kLambBc2]), eps(h[kLambEps]),
        wd_decoupled(h[kLambWdDecoupled]) {}

  float operator()(float p, float m, float v) const {
    const float u = (m * inv_bc1) / (std::sqrt(v * inv_bc2) + eps);
    return wd_decoupled != 0 ? u + wd_decoupled * p : u;
  }
};

template <typename P, typename G, bool kScaled>
void moments_chunk(const Chunk& chunk, const P* __restrict__ p, const G* __restrict__ g, float* __restrict__ m,
                   float* __restrict__ v, const float* h, float grad_norm, float inv_scale, float* partial) {
  const float beta1 = h[kLambBeta1], beta2 = h[kLambBeta2], beta3 = h[kLambBeta3];
  const float one_minus_beta2 = h[kLambOneMinusBeta2], wd_l2 = h[kLambWdL2];
  // 1. c = G / max_grad_norm when G exceeds it (a NaN G clips nothing, as in the reference).
  const float max_norm = h[kLambMaxGradNorm];
  const float inv_clip = (max_norm > 0 && grad_norm > max_norm) ? 1.0f / (grad_norm / max_norm) : 1.0f;
  const LambUpdate update(h);
  float acc_p[kLanes] = {}, acc_u[kLanes] = {};
  auto element = [&](int64_t i, int64_t lane) {
    const float param = static_cast<float>(p[i]);
    // The loss scale comes off first, then the clip, as two products: with a power-of-two scale the
    // first is exact, and a scaled step has the bits of the unscaled one.
    float grad = static_cast<float>(g[i]);
    if constexpr (kScaled) grad = grad * inv_scale;
    grad = grad * inv_clip;
    if (wd_l2 != 0) grad = grad + wd_l2 * param;  // 2. L2 mode (wd_l2 is 0 in AdamW mode)
    const float exp_avg = beta1 * m[i] + beta3 * grad;  // 3.
    const float exp_avg_sq = beta2 * v[i] + one_minus_beta2 * grad * grad;
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
    const float u = update(param, exp_avg, exp_avg_sq);
    acc_p[lane] += param * param;
    acc_u[lane] += u * u;
  };
  const int64_t n = chunk.size;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) element(i + lane, lane);
  }
  for (int64_t lane = 0; i + lane < n; ++lane) element(i + lane, lane);
  partial[0] = lane_total(acc_p);
  partial[1] = lane_total(acc_u);
}

// The new value of a param goes to the param and, rounded, to its low-precision copy: the copy is
// the fp32 master weight's value, not an update of the copy's own value.
template <typename P, typename C>
void apply_chunk(const Chunk& chunk, P* __restrict__ p, const float* __restrict__ m, const float* __restrict__ v,
                 C* __restrict__ copy, const float* h, const float* norms) {
  // 6. Trust ratio ||p|| / ||u||, 1 unless both norms are > 0; bounds clamp only then. They clamp an
  // infinite ratio; a NaN one (both norms overflowed fp32) stays NaN, as on every backend.
  const float param_norm = std::sqrt(norms[0]), update_norm = std::sqrt(norms[1]);
  const bool adapt = h[kLambAdapt] != 0 && param_norm > 0 && update_norm > 0;
  const float raw_ratio = param_norm / update_norm;
  const float ratio = !adapt ? 1.0f
                      : std::isnan(raw_ratio) ? raw_ratio
                                              : std::min(std::max(raw_ratio, h[kLambRatioLo]), h[kLambRatioHi]);
  const float step_size = h[kLambLr] * ratio;
  const LambUpdate update(h);
  const int64_t n = chunk.size;
  for (int64_t i = 0; i < n; ++i) {
    const float param = static_cast<float>(p[i]);
    const float next = param - step_size * update(param, m[i], v[i]);  // 7.
    p[i] = static_cast<P>(next);
    if constexpr (kWritesCopy<C>) copy[i] = static_cast<C>(next);
  }
}

}  // namespace

at::Tensor lamb_moments_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, const at::Tensor& hyper,
                            const std::optional<at::Tensor>& grad_sumsq, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, int64_t chunk_size) {
  const char* op = "lamb_moments";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_lists(op, {{"params", params},
                   {"grads", grads},
                   {"exp_avgs", exp_avgs, Storage::kFloat32},
                   {"exp_avg_sqs", exp_avg_sqs, Storage::kFloat32}});
  check_hyper(op, hyper, n_tensors, kLambColumns);
  const float inv_scale = inverse_grad_scale(op, grad_scale);
  // grad_sumsq sums the still-scaled grads: G = sqrt(grad_sumsq) / scale. Without clipping, 0 never
  // exceeds a max_grad_norm.
  const std::optional<float> sumsq = read_scalar(op, "grad_sumsq", grad_sumsq);
  const float grad_norm = sumsq.has_value() ? std::sqrt(*sumsq) * inv_scale : 0.0f;
  if (skips_step(op, found_inf)) return at::zeros({n_tensors, 2}, at::TensorOptions().dtype(at::kFloat));
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  std::vector<float> partials(2 * chunks.size());
  const float* h = hyper.const_data_ptr<float>();
  const std::vector<float*> m = mutable_pointers(exp_avgs), v = mutable_pointers(exp_avg_sqs);
  dispatch_element(element_type(params), [&](auto param_type) {
    using P = typename decltype(param_type)::type;
    dispatch_element(element_type(grads), [&](auto grad_type) {
      using G = typename decltype(grad_type)::type;
      dispatch_bool(grad_scale.has_value(), [&](auto scaled) {
        const std::vector<const P*> p = const_pointers<P>(params);
        const std::vector<const G*> g = const_pointers<G>(grads);
        parallel_over_chunks(chunks, [&](int64_t c, const Chunk& chunk) {
          const int64_t t = chunk.tensor, b = chunk.begin;
          moments_chunk<P, G, decltype(scaled)::value>(chunk, p[t] + b, g[t] + b, m[t] + b, v[t] + b,
                                                      h + t * kLambColumns, grad_norm, inv_scale, &partials[2 * c]);
        });
      });
    });
  });
  return per_tensor_sums(partials, chunks, n_tensors, 2);
}

void lamb_apply_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    const at::Tensor& hyper, const at::Tensor& norms, const std::optional<at::Tensor>& found_inf,
                    at::TensorList copies, int64_t chunk_size) {
  const char* op = "lamb_apply";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_lists(op, {{"params", params},
                   {"exp_avgs", exp_avgs, Storage::kFloat32},
                   {"exp_avg_sqs", exp_avg_sqs, Storage::kFloat32}});
  check_copies(op, params, copies);
  check_hyper(op, hyper, n_tensors, kLambColumns);
  check_norms(op, norms, n_tensors);
  if (skips_step(op, found_inf)) return;
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  const float* h = hyper.const_data_ptr<float>();
  const float* norm_data = norms.const_data_ptr<float>();
  const std::vector<const float*> m = const_pointers(exp_avgs), v = const_pointers(exp_avg_sqs);
  dispatch_params_and_copies(params, copies, [&](auto param_type, auto copy_type) {
    using P = typename decltype(param_type)::type;
    using C = typename decltype(copy_type)::type;
    const std::vector<P*> p = mutable_pointers<P>(params);
    const std::vector<C*> copy = copy_pointers<C>(copies);
    parallel_over_chunks(chunks, [&](int64_t, const Chunk& chunk) {
      const int64_t t = chunk.tensor, b = chunk.begin;
      C* copy_chunk = nullptr;
      if constexpr (kWritesCopy<C>) copy_chunk = copy[t] + b;
      apply_chunk(chunk, p[t] + b, m[t] + b, v[t] + b, copy_chunk, h + t * kLambColumns, norm_data + 2 * t);
    });
  });
}

}  // namespace lamb_kernels
