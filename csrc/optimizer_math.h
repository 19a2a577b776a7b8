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

LAMB_KERNELS_HD float magnitude(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return std::fabs(x);
#endif
}

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

// -- 8-bit blockwise states (lamb_kernels/quantization.py) -------------------------------------------
//
// Blocks of kCodeBlock elements in memory order, one fp32 scale each (the block's largest magnitude),
// and per element an 8-bit code of |x| / scale: code c > 0 is the float with bit pattern
// (c + offset) << 20 (4 bits of exponent and 3 of fraction for signed states, 5 and 3 for unsigned
// ones). The encoding rounds with r in [0, 2^20): stochastically with (random16 << 4), to the nearest
// with 2^19.

constexpr int64_t kCodeBlock = 256;

struct CodeFormat {
  uint32_t offset;   // code c is the float of bits (c + offset) << 20
  int32_t largest;   // the code of 1.0
  float smallest;    // the smallest nonzero code's value (2^-15, 2^-31)
  float below;       // 2^20 / smallest: below it, t = y * below (linear)
  float least;       // unsigned: the smallest code's value, which a nonzero y below it takes (a nonzero v
                     // never rounds to 0); signed: 0
};

// (functions, not constants: device code may not refer to a host constant of class type)
LAMB_KERNELS_HD constexpr CodeFormat signed_codes() { return {895u, 121, 0x1p-15f, 0x1p35f, 0.0f}; }
LAMB_KERNELS_HD constexpr CodeFormat unsigned_codes() { return {767u, 249, 0x1p-31f, 0x1p51f, 0x1p-31f}; }

// A block's scale as stored: its largest magnitude, or 0 below the smallest normal float (the block is
// then stored as zeros: the reciprocal of a subnormal scale overflows).
LAMB_KERNELS_HD float block_scale(float largest) { return largest < 0x1p-126f ? 0.0f : largest; }

// The magnitude code of |x| in a block of scale `scale` (its largest magnitude, NaN or infinite when
// the block holds such a value): y = |x| * (1 / scale), the reciprocal one IEEE division per block (a
// loop over a block hoists it). Selects only, and the division always done (by 1 where the scale is
// 0 or NaN): a branch around a floating-point operation keeps the CPU loops from vectorizing.
LAMB_KERNELS_HD int32_t encode_magnitude(float x, float scale, CodeFormat f, uint32_t r) {
  const bool scaled = scale > 0;
  const float inverse = divide(1.0f, scaled ? scale : 1.0f);
  const float quotient = scaled ? magnitude(x) * inverse : 0.0f;
  const float y = quotient > 0 && quotient < f.least ? f.least : quotient;
  const bool small = y < f.smallest;
  const uint32_t below = static_cast<uint32_t>(static_cast<int32_t>((small ? y : 0.0f) * f.below));
  const uint32_t t = small ? below : float_bits(y) - (f.offset << 20);
  const int32_t c = static_cast<int32_t>((t + r) >> 20);
  const int32_t capped = c < f.largest ? c : f.largest;
  return y <= 1.0f ? capped : f.largest;  // NaN y: the largest code
}

LAMB_KERNELS_HD float decode_magnitude(int32_t c, float scale, CodeFormat f) {
  return (c == 0 ? 0.0f : bits_float((static_cast<uint32_t>(c) + f.offset) << 20)) * scale;
}

// Signed codes (m, momentum buffers): int8, the sign of the value (x < 0) and its magnitude code.
LAMB_KERNELS_HD int8_t encode_signed(float x, float scale, uint32_t r) {
  const int32_t c = encode_magnitude(x, scale, signed_codes(), r);
  return static_cast<int8_t>(x < 0 ? -c : c);
}

LAMB_KERNELS_HD float decode_signed(int8_t q, float scale) {
  const float v = decode_magnitude(q < 0 ? -static_cast<int32_t>(q) : static_cast<int32_t>(q), scale, signed_codes());
  return q < 0 ? -v : v;
}

LAMB_KERNELS_HD uint8_t encode_unsigned(float x, float scale, uint32_t r) {
  return static_cast<uint8_t>(encode_magnitude(x, scale, unsigned_codes(), r));
}

LAMB_KERNELS_HD float decode_unsigned(uint8_t q, float scale) {
  return decode_magnitude(static_cast<int32_t>(q), scale, unsigned_codes());
}

// The largest magnitude, a NaN kept once met (as torch's amax).
LAMB_KERNELS_HD float absmax(float running, float x) {
  const float a = magnitude(x);
  return (a > running) | is_nan(a) ? a : running;
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
// Step 1 for one element: d, from the still-scaled grad.
template <bool kScaled, bool kAdapt>
LAMB_KERNELS_HD float lars_direction(float param, float grad, const LarsScalars& s) {
  // The weight-decay product comes before the loss-scale product on purpose: GCC's -ffp-contract
  // fuses the first product it meets into the add, so this order keeps fma(wd, p, g) as before the
  // grads were scaled, and g * (1 / scale) rounds on its own (exactly, for a power-of-two scale).
  const float decay = s.weight_decay * param;
  if (kScaled) grad = grad * s.inv_scale;
  // 1. A weight decay of 0 adds nothing, not 0 * p (an infinite p stays infinite).
  return kAdapt ? (s.weight_decay != 0 ? grad + decay : grad) * s.ratio : grad;
}

// Step 2's new buffer value (kFirstStep: d; kLater: from the buffer's value `buf`).
template <Momentum kMomentum>
LAMB_KERNELS_HD float lars_buffer(float d, float buf, const LarsScalars& s) {
  return kMomentum == Momentum::kFirstStep ? d : s.momentum * buf + s.one_minus_dampening * d;
}

template <bool kScaled, bool kAdapt, Momentum kMomentum, bool kNesterov, bool kRound = false>
LAMB_KERNELS_HD float lars_element(float param, float grad, float& buf, const LarsScalars& s, uint32_t random16 = 0) {
  const float d = lars_direction<kScaled, kAdapt>(param, grad, s);
  float step = d;
  if (kMomentum != Momentum::kNone) {  // 2.
    buf = lars_buffer<kMomentum>(d, buf, s);
    if (kRound) buf = round_bf16_stochastic(buf, random16);
    step = kNesterov ? d + s.momentum * buf : buf;
  }
  return param - s.lr * step;  // 3.
}

}  // namespace lamb_kernels
