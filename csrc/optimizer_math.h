// The per-element and per-tensor math of LAMB and LARS (docs/design.md sections 2 and 3), shared by
// the C++ CPU operators (lamb_cpu.cpp, lars_cpu.cpp) and the CUDA kernels (cuda/): one definition, so
// the CPU test suites exercise the arithmetic the GPU runs.
//
// fp32 throughout, IEEE division and square root on both sides: the CPU build has no fast-math, and
// nvcc's defaults (-prec-div=true, -prec-sqrt=true, no --use_fast_math) give div.rn and sqrt.rn,
// which the CUDA build check reads in the PTX. Per-tensor scalars (1 / bc1, 1 / bc2, 1 / c) are
// inverted once per chunk and multiplied in, where the Triton kernels divide: each element already
// needs one division and one square root for u, and the results stay within one rounding of dividing.
#pragma once

#include "hyper_columns.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LAMB_KERNELS_HD __host__ __device__ __forceinline__
#else
#define LAMB_KERNELS_HD inline
#endif

namespace lamb_kernels {

LAMB_KERNELS_HD float square_root(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);  // explicit round-to-nearest, whatever the flags
#else
  return std::sqrt(x);
#endif
}

LAMB_KERNELS_HD float divide(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LAMB_KERNELS_HD bool is_nan(float x) { return x != x; }

// -- Stochastic rounding to bfloat16, for states kept in bf16 (lamb_kernels/rounding.py) -----------

LAMB_KERNELS_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  return x ^ (x >> 16);
}

// A tensor's key for this step, from its two hyperparameter columns (16-bit halves, exact in fp32).
LAMB_KERNELS_HD uint32_t rounding_key(const float* h, int low_column) {
  return static_cast<uint32_t>(h[low_column]) | (static_cast<uint32_t>(h[low_column + 1]) << 16);
}

LAMB_KERNELS_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

LAMB_KERNELS_HD float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// The 32 random bits of element `index` of a tensor: the low 16 round m (or a momentum buffer), the
// high 16 round v.
LAMB_KERNELS_HD uint32_t element_random(uint32_t key, int64_t index) {
  return mix32(key ^ (static_cast<uint32_t>(index) * 0x9e3779b9U));
}

// x rounded to a bfloat16 value (returned as the float it is exactly), up or down at random with the
// probabilities that make it unbiased, from 16 random bits. An infinity or NaN is kept; a finite value
// does not round to inf. No branch: the element loops stay vectorized.
LAMB_KERNELS_HD float round_bf16_stochastic(float x, uint32_t random16) {
  const uint32_t pattern = float_bits(x);
  const uint32_t rounded = (pattern + random16) & 0xffff0000U;
  const uint32_t kept = (rounded & 0x7f800000U) == 0x7f800000U ? (pattern & 0x80000000U) | 0x7f7f0000U : rounded;
  return bits_float((pattern & 0x7f800000U) == 0x7f800000U ? pattern : kept);
}

// -- LAMB ------------------------------------------------------------------------------------------

// Steps 1-3 for one element, the grad already unscaled: clip by c, L2 decay, moments.
struct LambMoments {
  float beta1, beta2, beta3, one_minus_beta2, wd_l2, inv_clip;

  // 1. c = G / max_grad_norm when the global grad norm G exceeds it (a NaN G clips nothing, as in
  // the reference); `grad_norm` is 0 when no group clips.
  LAMB_KERNELS_HD LambMoments(const float* h, float grad_norm)
      : beta1(h[kLambBeta1]), beta2(h[kLambBeta2]), beta3(h[kLambBeta3]), one_minus_beta2(h[kLambOneMinusBeta2]),
        wd_l2(h[kLambWdL2]),
        inv_clip(h[kLambMaxGradNorm] > 0 && grad_norm > h[kLambMaxGradNorm]
                     ? divide(1.0f, divide(grad_norm, h[kLambMaxGradNorm]))
                     : 1.0f) {}

  // The loss scale comes off first (the caller's product), then the clip, as two products: with a
  // power-of-two scale the first is exact, and a scaled step has the bits of the unscaled one.
  LAMB_KERNELS_HD void operator()(float param, float grad, float& m, float& v) const {
    grad = grad * inv_clip;
    if (wd_l2 != 0) grad = grad + wd_l2 * param;  // 2. L2 mode (wd_l2 is 0 in AdamW mode)
    m = beta1 * m + beta3 * grad;                 // 3.
    v = beta2 * v + one_minus_beta2 * grad * grad;
  }
};

// Steps 4-5: u = (m / bc1) / (sqrt(v / bc2) + eps) + wd_decoupled * p. A weight decay of 0 adds
// nothing, not 0 * p: an infinite p stays infinite, as in the torch backend and torch.optim.
struct LambUpdate {
  float inv_bc1, inv_bc2, eps, wd_decoupled;

  LAMB_KERNELS_HD explicit LambUpdate(const float* h)
      : inv_bc1(divide(1.0f, h[kLambBc1])), inv_bc2(divide(1.0f, h[kLambBc2])), eps(h[kLambEps]),
        wd_decoupled(h[kLambWdDecoupled]) {}

  LAMB_KERNELS_HD float operator()(float p, float m, float v) const {
    const float u = divide(m * inv_bc1, square_root(v * inv_bc2) + eps);
    return wd_decoupled != 0 ? u + wd_decoupled * p : u;
  }
};

// 6. The step size lr * r, with the trust ratio r = ||p|| / ||u|| from `norms` (||p||^2, ||u||^2),
// 1 unless the tensor adapts and both norms are > 0; bounds clamp only then. They clamp an infinite
// ratio; a NaN one (both norms overflowed fp32) stays NaN, as on every backend.
LAMB_KERNELS_HD float lamb_step_size(const float* h, const float* norms) {
  const float param_norm = square_root(norms[0]), update_norm = square_root(norms[1]);
  const bool adapt = h[kLambAdapt] != 0 && param_norm > 0 && update_norm > 0;
  const float raw = divide(param_norm, update_norm);
  const float at_least = raw < h[kLambRatioLo] ? h[kLambRatioLo] : raw;
  const float ratio = !adapt ? 1.0f : is_nan(raw) ? raw : (h[kLambRatioHi] < at_least ? h[kLambRatioHi] : at_least);
  return h[kLambLr] * ratio;
}

// -- LARS ------------------------------------------------------------------------------------------

enum class Momentum { kNone, kFirstStep, kLater };

// 1. r = trust_coeff ||p|| / (||g|| + wd ||p|| + eps), 1 unless both norms are > 0; then, with
// LARC, min(r / lr, 1) whatever r is (so r = 1 with lr > 1 still clips to 1 / lr), a NaN propagating
// as in torch.minimum (lr = 0 with r = 0 gives 0 / 0). norms[1] sums the still-scaled grads, so
// ||g|| = sqrt(norms[1]) / scale.
LAMB_KERNELS_HD float lars_trust_ratio(const float* h, const float* norms, float inv_scale) {
  const float param_norm = square_root(norms[0]);
  const float decay_norm = h[kLarsWeightDecay] * param_norm;  // before the scale product: see LarsStep
  const float grad_norm = square_root(norms[1]) * inv_scale;
  const float ratio = param_norm > 0 && grad_norm > 0
                          ? divide(h[kLarsTrustCoeff] * param_norm, grad_norm + decay_norm + h[kLarsEps])
                          : 1.0f;
  if (h[kLarsTrustClip] == 0) return ratio;
  const float clipped = divide(ratio, h[kLarsLr]);
  return is_nan(clipped) ? clipped : (1.0f < clipped ? 1.0f : clipped);
}

// The per-tensor scalars of a LARS step.
struct LarsScalars {
  float lr, ratio, weight_decay, momentum, one_minus_dampening, inv_scale;
};

// Steps 1-3 for one element: returns the new param; `buf` is the momentum buffer's element, read
// only for kLater (a new buffer becomes d). The grad is still scaled; kScaled multiplies it by
// 1 / scale before any other use. kRound: the buffer is kept in bf16; its new value is rounded
// stochastically with `random16` (the low 16 bits of element_random), and the step uses the rounded value.
template <bool kScaled, bool kAdapt, Momentum kMomentum, bool kNesterov, bool kRound = false>
LAMB_KERNELS_HD float lars_element(float param, float grad, float& buf, const LarsScalars& s, uint32_t random16 = 0) {
  // The weight-decay product comes before the loss-scale product on purpose: GCC's -ffp-contract
  // fuses the first product it meets into the add, so this order keeps fma(wd, p, g) as before the
  // grads were scaled, and g * (1 / scale) rounds on its own (exactly, for a power-of-two scale).
  const float decay = s.weight_decay * param;
  if (kScaled) grad = grad * s.inv_scale;
  // 1. A weight decay of 0 adds nothing, not 0 * p (an infinite p stays infinite).
  const float d = kAdapt ? (s.weight_decay != 0 ? grad + decay : grad) * s.ratio : grad;
  float step = d;
  if (kMomentum != Momentum::kNone) {  // 2.
    buf = kMomentum == Momentum::kFirstStep ? d : s.momentum * buf + s.one_minus_dampening * d;
    if (kRound) buf = round_bf16_stochastic(buf, random16);
    step = kNesterov ? d + s.momentum * buf : buf;
  }
  return param - s.lr * step;  // 3.
}

}  // namespace lamb_kernels
