// LAMB on CPU tensors: SPEC section 2 in the Triton kernels' three passes over memory.
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
#include "hyper_columns.h"
#include "multi_tensor_cpu.h"

#include <cmath>
#include <optional>

namespace lamb_kernels {
namespace {

// Steps 4-5: u = (m / bc1) / (sqrt(v / bc2) + eps) + wd_decoupled * p.
struct LambUpdate {
  float inv_bc1, inv_bc2, eps, wd_decoupled;

  explicit LambUpdate(const float* h)
      : inv_bc1(1.0f / h[kLambBc1]), inv_bc2(1.0f / h[kLambBc2]), eps(h[kLambEps]),
        wd_decoupled(h[kLambWdDecoupled]) {}

  float operator()(float p, float m, float v) const {
    return (m * inv_bc1) / (std::sqrt(v * inv_bc2) + eps) + wd_decoupled * p;
  }
};

void moments_chunk(const Chunk& chunk, const float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                   float* __restrict__ v, const float* h, float grad_norm, float* partial) {
  const float beta1 = h[kLambBeta1], beta2 = h[kLambBeta2], beta3 = h[kLambBeta3];
  const float one_minus_beta2 = h[kLambOneMinusBeta2], wd_l2 = h[kLambWdL2];
  // 1. c = G / max_grad_norm when G exceeds it (a NaN G clips nothing, as in the reference).
  const float max_norm = h[kLambMaxGradNorm];
  const float inv_clip = (max_norm > 0 && grad_norm > max_norm) ? 1.0f / (grad_norm / max_norm) : 1.0f;
  const LambUpdate update(h);
  float acc_p[kLanes] = {}, acc_u[kLanes] = {};
  auto element = [&](int64_t i, int64_t lane) {
    const float param = p[i];
    float grad = g[i] * inv_clip;
    grad = grad + wd_l2 * param;  // 2. L2 mode (wd_l2 is 0 in AdamW mode)
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

void apply_chunk(const Chunk& chunk, float* __restrict__ p, const float* __restrict__ m,
                 const float* __restrict__ v, const float* h, const float* norms) {
  // 6. Trust ratio ||p|| / ||u||, 1 unless both norms are > 0; bounds clamp only then.
  const float param_norm = std::sqrt(norms[0]), update_norm = std::sqrt(norms[1]);
  const bool adapt = h[kLambAdapt] != 0 && param_norm > 0 && update_norm > 0;
  const float ratio = adapt ? std::min(std::max(param_norm / update_norm, h[kLambRatioLo]), h[kLambRatioHi]) : 1.0f;
  const float step_size = h[kLambLr] * ratio;
  const LambUpdate update(h);
  const int64_t n = chunk.size;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = p[i] - step_size * update(p[i], m[i], v[i]);  // 7.
  }
}

}  // namespace

at::Tensor lamb_moments_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, const at::Tensor& hyper,
                            const std::optional<at::Tensor>& grad_sumsq, int64_t chunk_size) {
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_lists("lamb_moments",
              {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  check_hyper("lamb_moments", hyper, n_tensors, kLambColumns);
  float grad_norm = 0.0f;  // without clipping, 0 never exceeds a max_grad_norm
  if (grad_sumsq.has_value()) {
    TORCH_CHECK(grad_sumsq->numel() == 1 && grad_sumsq->scalar_type() == at::kFloat && grad_sumsq->device().is_cpu(),
                "lamb_moments: grad_sumsq must be a one-element CPU float32 tensor");
    grad_norm = std::sqrt(grad_sumsq->item<float>());
  }
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  std::vector<float> partials(2 * chunks.size());
  const float* h = hyper.const_data_ptr<float>();
  const std::vector<const float*> p = const_pointers(params), g = const_pointers(grads);
  const std::vector<float*> m = mutable_pointers(exp_avgs), v = mutable_pointers(exp_avg_sqs);
  parallel_over_chunks(chunks, [&](int64_t c, const Chunk& chunk) {
    const int64_t t = chunk.tensor, b = chunk.begin;
    moments_chunk(chunk, p[t] + b, g[t] + b, m[t] + b, v[t] + b, h + t * kLambColumns, grad_norm, &partials[2 * c]);
  });
  return per_tensor_sums(partials, chunks, n_tensors, 2);
}

void lamb_apply_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    const at::Tensor& hyper, const at::Tensor& norms, int64_t chunk_size) {
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_lists("lamb_apply", {{"params", params}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  check_hyper("lamb_apply", hyper, n_tensors, kLambColumns);
  check_norms("lamb_apply", norms, n_tensors);
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  const float* h = hyper.const_data_ptr<float>();
  const float* norm_data = norms.const_data_ptr<float>();
  const std::vector<float*> p = mutable_pointers(params);
  const std::vector<const float*> m = const_pointers(exp_avgs), v = const_pointers(exp_avg_sqs);
  parallel_over_chunks(chunks, [&](int64_t, const Chunk& chunk) {
    const int64_t t = chunk.tensor, b = chunk.begin;
    apply_chunk(chunk, p[t] + b, m[t] + b, v[t] + b, h + t * kLambColumns, norm_data + 2 * t);
  });
}

}  // namespace lamb_kernels
