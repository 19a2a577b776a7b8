// LARS on CPU tensors: SPEC section 3 in the Triton kernels' two passes over memory.
//
// 1. per-tensor ||p||^2 and ||g||^2: sums_of_squares on the params and on the grads (reads p g:
//    8 bytes/param), skipped when no param group adapts;
// 2. lars_apply: trust ratio, weight decay, momentum and the update (reads p g b, writes p b:
//    20 bytes/param).
#include "hyper_columns.h"
#include "multi_tensor_cpu.h"

#include <cmath>
#include <optional>

namespace lamb_kernels {
namespace {

enum class Momentum { kNone, kFirstStep, kLater };

// The element loop with the per-tensor choices made at compile time, so each variant vectorises
// as one straight loop.
template <bool kAdapt, Momentum kMomentum, bool kNesterov>
void apply_chunk(int64_t n, float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                 float lr, float ratio, float weight_decay, float momentum, float one_minus_dampening) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = kAdapt ? (g[i] + weight_decay * p[i]) * ratio : g[i];  // 1.
    float step = d;
    if constexpr (kMomentum != Momentum::kNone) {  // 2. a new buffer is not read: it becomes d
      const float b = kMomentum == Momentum::kFirstStep ? d : momentum * buf[i] + one_minus_dampening * d;
      buf[i] = b;
      step = kNesterov ? d + momentum * b : b;
    }
    p[i] = p[i] - lr * step;  // 3.
  }
}

template <bool kAdapt, Momentum kMomentum>
void apply_chunk(bool nesterov, int64_t n, float* p, const float* g, float* buf, float lr, float ratio,
                 float weight_decay, float momentum, float one_minus_dampening) {
  auto run = nesterov ? apply_chunk<kAdapt, kMomentum, true> : apply_chunk<kAdapt, kMomentum, false>;
  run(n, p, g, buf, lr, ratio, weight_decay, momentum, one_minus_dampening);
}

template <bool kAdapt>
void apply_chunk(Momentum mode, bool nesterov, int64_t n, float* p, const float* g, float* buf, float lr,
                 float ratio, float weight_decay, float momentum, float one_minus_dampening) {
  auto run = mode == Momentum::kNone        ? apply_chunk<kAdapt, Momentum::kNone>
             : mode == Momentum::kFirstStep ? apply_chunk<kAdapt, Momentum::kFirstStep>
                                            : apply_chunk<kAdapt, Momentum::kLater>;
  run(nesterov, n, p, g, buf, lr, ratio, weight_decay, momentum, one_minus_dampening);
}

// 1. r = trust_coeff ||p|| / (||g|| + wd ||p|| + eps), 1 unless both norms are > 0; then, with
// LARC, min(r / lr, 1) whatever r is (so r = 1 with lr > 1 still clips to 1 / lr), a NaN propagating
// as in torch.minimum (lr = 0 with r = 0 gives 0 / 0).
float trust_ratio(const float* h, const float* norms) {
  const float param_norm = std::sqrt(norms[0]), grad_norm = std::sqrt(norms[1]);
  const float ratio = param_norm > 0 && grad_norm > 0
                          ? h[kLarsTrustCoeff] * param_norm / (grad_norm + h[kLarsWeightDecay] * param_norm + h[kLarsEps])
                          : 1.0f;
  if (h[kLarsTrustClip] == 0) return ratio;
  const float clipped = ratio / h[kLarsLr];
  return std::isnan(clipped) ? clipped : std::min(clipped, 1.0f);
}

}  // namespace

void lars_apply_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const at::Tensor& hyper, const std::optional<at::Tensor>& norms, int64_t chunk_size) {
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_lists("lars_apply", {{"params", params}, {"grads", grads}});
  check_hyper("lars_apply", hyper, n_tensors, kLarsColumns);
  if (norms.has_value()) check_norms("lars_apply", *norms, n_tensors);
  const float* h = hyper.const_data_ptr<float>();
  TORCH_CHECK(static_cast<int64_t>(momentum_buffers.size()) == n_tensors, "lars_apply: momentum_buffers has ",
              momentum_buffers.size(), " tensors, params has ", n_tensors);
  for (int64_t t = 0; t < n_tensors; ++t) {
    TORCH_CHECK(h[t * kLarsColumns + kLarsAdapt] == 0 || norms.has_value(), "lars_apply: params[", t,
                "] adapts, but no norms were given");
    // A tensor without momentum has an empty placeholder in momentum_buffers.
    if (h[t * kLarsColumns + kLarsHasMomentum] == 0) continue;
    check_lists("lars_apply", {{"params", params.slice(t, 1)}, {"momentum_buffers", momentum_buffers.slice(t, 1)}});
  }
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  const float* norm_data = norms.has_value() ? norms->const_data_ptr<float>() : nullptr;
  const std::vector<float*> p_data = mutable_pointers(params), b_data = mutable_pointers(momentum_buffers);
  const std::vector<const float*> g_data = const_pointers(grads);
  parallel_over_chunks(chunks, [&](int64_t, const Chunk& chunk) {
    const int64_t t = chunk.tensor;
    const float* ht = h + t * kLarsColumns;
    const bool adapt = ht[kLarsAdapt] != 0;
    const float ratio = adapt ? trust_ratio(ht, norm_data + 2 * t) : 1.0f;
    const Momentum mode = ht[kLarsHasMomentum] == 0 ? Momentum::kNone
                          : ht[kLarsFirstStep] != 0 ? Momentum::kFirstStep
                                                    : Momentum::kLater;
    float* p = p_data[t] + chunk.begin;
    const float* g = g_data[t] + chunk.begin;
    float* buf = mode == Momentum::kNone ? nullptr : b_data[t] + chunk.begin;
    auto run = adapt ? apply_chunk<true> : apply_chunk<false>;
    run(mode, ht[kLarsNesterov] != 0, chunk.size, p, g, buf, ht[kLarsLr], ratio, ht[kLarsWeightDecay],
        ht[kLarsMomentum], ht[kLarsOneMinusDampening]);
  });
}

}  // namespace lamb_kernels
