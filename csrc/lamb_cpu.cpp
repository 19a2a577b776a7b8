// LAMB on CPU tensors: docs/design.md section 2 in the Triton kernels' three passes over memory.
//
// 1. sums_of_squares over the grads (multi_tensor_cpu.cpp), for the global grad norm (reads g: 4 bytes/param);
// 2. lamb_moments: steps 1-5, moments in place, per-tensor ||p||^2 and ||u||^2 with p taken before the
//    update (reads p g m v, writes m v: 24 bytes/param);
// 3. lamb_apply: steps 6-7, u recomputed from m and v (reads p m v, writes p: 16 bytes/param).
//
// The math of each element is in optimizer_math.h, shared with the CUDA kernels.
//
// The element loops are templates on the storage types of params (P), grads (G) and the params'
// low-precision copies (C, NoCopy when there are none): elements are converted to float on load and
// rounded to the nearest even on store (multi_tensor_cpu.h). Moments (S) are float32, or bfloat16
// written with stochastic rounding (optimizer_math.h), the norms taken from the rounded values that
// the apply pass will read. A loop that reads
// grads is also a template on kScaled (a grad_scale was given), so that the fp32 loop without one is
// the loop of before grad scaling.
#include "multi_tensor_cpu.h"
#include "optimizer_math.h"

#include <cmath>
#include <optional>

namespace lamb_kernels {
namespace {

// A float that is a bfloat16 value exactly (round_bf16_stochastic's result), stored as one: its high
// 16 bits, with no rounding step (which would also cost the loop its vectorization).
inline at::BFloat16 bf16_of_exact(float x) {
  return at::BFloat16(static_cast<uint16_t>(float_bits(x) >> 16), at::BFloat16::from_bits());
}

template <typename P, typename G, typename S, bool kScaled>
void moments_chunk(const Chunk& chunk, const P* __restrict__ p, const G* __restrict__ g, S* __restrict__ m,
                   S* __restrict__ v, const float* h, float grad_norm, float inv_scale, float* partial) {
  const LambMoments moments(h, grad_norm);
  const LambUpdate update(h);
  [[maybe_unused]] const uint32_t key = rounding_key(h, kLambKeyLo);
  float acc_p[kLanes] = {}, acc_u[kLanes] = {};
  auto element = [&](int64_t i, int64_t lane) {
    const float param = static_cast<float>(p[i]);
    float grad = static_cast<float>(g[i]);
    if constexpr (kScaled) grad = grad * inv_scale;
    float exp_avg = static_cast<float>(m[i]), exp_avg_sq = static_cast<float>(v[i]);
    moments(param, grad, exp_avg, exp_avg_sq);  // 1-3.
    if constexpr (std::is_same_v<S, at::BFloat16>) {
      const uint32_t random = element_random(key, chunk.begin + i);
      exp_avg = round_bf16_stochastic(exp_avg, random & 0xffffU);
      exp_avg_sq = round_bf16_stochastic(exp_avg_sq, random >> 16);
      m[i] = bf16_of_exact(exp_avg);
      v[i] = bf16_of_exact(exp_avg_sq);
    } else {
      m[i] = exp_avg;
      v[i] = exp_avg_sq;
    }
    const float u = update(param, exp_avg, exp_avg_sq);  // 4-5.
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

// 8-bit states (S = int8_t: m int8, v uint8 codes with block scales): each block of kCodeBlock
// elements is updated in fp32 into local arrays, its new scales taken (the largest magnitudes), and
// its codes written with stochastic rounding; u and its norm come from the decoded codes, the values
// the apply pass will read. Plain element loops, and sums in lanes (for_each_lane), so that each
// vectorizes.
template <typename P, typename G, bool kScaled>
void moments_chunk_codes(const Chunk& chunk, const P* __restrict__ p, const G* __restrict__ g, int8_t* __restrict__ m,
                         uint8_t* __restrict__ v, float* __restrict__ m_scales, float* __restrict__ v_scales,
                         const float* h, float grad_norm, float inv_scale, float* partial) {
  const LambMoments moments(h, grad_norm);
  const LambUpdate update(h);
  const uint32_t key = rounding_key(h, kLambKeyLo);
  float acc_p[kLanes] = {}, acc_u[kLanes] = {};
  alignas(64) float new_m[kCodeBlock], new_v[kCodeBlock], u[kCodeBlock];
  for (int64_t first = 0; first < chunk.size; first += kCodeBlock) {
    const int64_t n = std::min(kCodeBlock, chunk.size - first);
    const int64_t block = first / kCodeBlock;
    const float m_scale = m_scales[block], v_scale = v_scales[block];
    const P* __restrict__ pb = p + first;
    const G* __restrict__ gb = g + first;
    int8_t* __restrict__ mb = m + first;
    uint8_t* __restrict__ vb = v + first;
    for (int64_t i = 0; i < n; ++i) {
      float grad = static_cast<float>(gb[i]);
      if constexpr (kScaled) grad = grad * inv_scale;
      float exp_avg = decode_signed(mb[i], m_scale), exp_avg_sq = decode_unsigned(vb[i], v_scale);
      moments(static_cast<float>(pb[i]), grad, exp_avg, exp_avg_sq);  // 1-3.
      new_m[i] = exp_avg;
      new_v[i] = exp_avg_sq;
    }
    const float m_largest = block_scale(block_absmax(new_m, n)), v_largest = block_scale(block_absmax(new_v, n));
    m_scales[block] = m_largest;
    v_scales[block] = v_largest;
    const uint32_t first_index = static_cast<uint32_t>(chunk.begin + first);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t random = element_random(key, first_index + static_cast<uint32_t>(i));
      const int8_t m_code = encode_signed(new_m[i], m_largest, (random & 0xffffU) << 4);
      const uint8_t v_code = encode_unsigned(new_v[i], v_largest, (random >> 16) << 4);
      mb[i] = m_code;
      vb[i] = v_code;
      u[i] = update(static_cast<float>(pb[i]), decode_signed(m_code, m_largest),
                    decode_unsigned(v_code, v_largest));  // 4-5.
    }
    for_each_lane(n, [&](int64_t i, int64_t lane) {
      const float param = static_cast<float>(pb[i]);
      acc_p[lane] += param * param;
      acc_u[lane] += u[i] * u[i];
    });
  }
  partial[0] = lane_total(acc_p);
  partial[1] = lane_total(acc_u);
}

template <typename P, typename C>
void apply_chunk_codes(const Chunk& chunk, P* __restrict__ p, const int8_t* __restrict__ m,
                       const uint8_t* __restrict__ v, const float* m_scales, const float* v_scales,
                       C* __restrict__ copy, const float* h, const float* norms) {
  const float step_size = lamb_step_size(h, norms);  // 6.
  const LambUpdate update(h);
  for (int64_t first = 0; first < chunk.size; first += kCodeBlock) {
    const int64_t n = std::min(kCodeBlock, chunk.size - first);
    const float m_scale = m_scales[first / kCodeBlock], v_scale = v_scales[first / kCodeBlock];
    for (int64_t e = first; e < first + n; ++e) {
      const float param = static_cast<float>(p[e]);
      const float next = param - step_size * update(param, decode_signed(m[e], m_scale),
                                                    decode_unsigned(v[e], v_scale));  // 7.
      p[e] = static_cast<P>(next);
      if constexpr (kWritesCopy<C>) copy[e] = static_cast<C>(next);
    }
  }
}

// The new value of a param goes to the param and, rounded, to its low-precision copy: the copy is
// the fp32 master weight's value, not an update of the copy's own value.
template <typename P, typename C, typename S>
void apply_chunk(const Chunk& chunk, P* __restrict__ p, const S* __restrict__ m, const S* __restrict__ v,
                 C* __restrict__ copy, const float* h, const float* norms) {
  const float step_size = lamb_step_size(h, norms);  // 6.
  const LambUpdate update(h);
  const int64_t n = chunk.size;
  for (int64_t i = 0; i < n; ++i) {
    const float param = static_cast<float>(p[i]);
    const float next = param - step_size * update(param, static_cast<float>(m[i]), static_cast<float>(v[i]));  // 7.
    p[i] = static_cast<P>(next);
    if constexpr (kWritesCopy<C>) copy[i] = static_cast<C>(next);
  }
}

}  // namespace

at::Tensor lamb_moments_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                            at::TensorList exp_avg_sq_scales, const at::Tensor& hyper,
                            const std::optional<at::Tensor>& grad_sumsq, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, int64_t chunk_size) {
  const char* op = "lamb_moments";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_lists(op, {{"params", params},
                   {"grads", grads},
                   {"exp_avgs", exp_avgs, Storage::kState},
                   {"exp_avg_sqs", exp_avg_sqs, Storage::kUnsignedState}});
  check_same_dtype(op, "exp_avg_sqs", exp_avg_sqs, "exp_avgs", exp_avgs);
  check_lamb_scales(op, exp_avgs, exp_avg_scales, exp_avg_sq_scales, chunk_size, at::kCPU);
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
  dispatch_element(element_type(params), [&](auto param_type) {
    using P = typename decltype(param_type)::type;
    dispatch_element(element_type(grads), [&](auto grad_type) {
      using G = typename decltype(grad_type)::type;
      dispatch_state(element_type(exp_avgs), [&](auto state_type) {
        using S = typename decltype(state_type)::type;
        dispatch_bool(grad_scale.has_value(), [&](auto scaled) {
          const std::vector<const P*> p = const_pointers<P>(params);
          const std::vector<const G*> g = const_pointers<G>(grads);
          if constexpr (std::is_same_v<S, int8_t>) {
            const std::vector<int8_t*> m = mutable_pointers<int8_t>(exp_avgs);
            const std::vector<uint8_t*> v = mutable_pointers<uint8_t>(exp_avg_sqs);
            const std::vector<float*> ms = mutable_pointers(exp_avg_scales), vs = mutable_pointers(exp_avg_sq_scales);
            parallel_over_chunks(chunks, [&](int64_t c, const Chunk& chunk) {
              const int64_t t = chunk.tensor, b = chunk.begin;
              moments_chunk_codes<P, G, decltype(scaled)::value>(
                  chunk, p[t] + b, g[t] + b, m[t] + b, v[t] + b, ms[t] + b / kCodeBlock, vs[t] + b / kCodeBlock,
                  h + t * kLambColumns, grad_norm, inv_scale, &partials[2 * c]);
            });
            return;
          } else {
          const std::vector<S*> m = mutable_pointers<S>(exp_avgs), v = mutable_pointers<S>(exp_avg_sqs);
          parallel_over_chunks(chunks, [&](int64_t c, const Chunk& chunk) {
            const int64_t t = chunk.tensor, b = chunk.begin;
            moments_chunk<P, G, S, decltype(scaled)::value>(chunk, p[t] + b, g[t] + b, m[t] + b, v[t] + b,
                                                           h + t * kLambColumns, grad_norm, inv_scale,
                                                           &partials[2 * c]);
          });
          }
        });
      });
    });
  });
  return per_tensor_sums(partials, chunks, n_tensors, 2);
}

void lamb_apply_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, const at::Tensor& hyper, const at::Tensor& norms, const std::optional<at::Tensor>& found_inf,
                    at::TensorList copies, int64_t chunk_size) {
  const char* op = "lamb_apply";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_lists(op, {{"params", params},
                   {"exp_avgs", exp_avgs, Storage::kState},
                   {"exp_avg_sqs", exp_avg_sqs, Storage::kUnsignedState}});
  check_same_dtype(op, "exp_avg_sqs", exp_avg_sqs, "exp_avgs", exp_avgs);
  check_lamb_scales(op, exp_avgs, exp_avg_scales, exp_avg_sq_scales, chunk_size, at::kCPU);
  check_copies(op, params, copies);
  check_hyper(op, hyper, n_tensors, kLambColumns);
  check_norms(op, norms, n_tensors);
  if (skips_step(op, found_inf)) return;
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  const float* h = hyper.const_data_ptr<float>();
  const float* norm_data = norms.const_data_ptr<float>();
  dispatch_params_and_copies(params, copies, [&](auto param_type, auto copy_type) {
    using P = typename decltype(param_type)::type;
    using C = typename decltype(copy_type)::type;
    dispatch_state(element_type(exp_avgs), [&](auto state_type) {
      using S = typename decltype(state_type)::type;
      const std::vector<P*> p = mutable_pointers<P>(params);
      const std::vector<C*> copy = copy_pointers<C>(copies);
      if constexpr (std::is_same_v<S, int8_t>) {
        const std::vector<const int8_t*> m = const_pointers<int8_t>(exp_avgs);
        const std::vector<const uint8_t*> v = const_pointers<uint8_t>(exp_avg_sqs);
        const std::vector<const float*> ms = const_pointers(exp_avg_scales), vs = const_pointers(exp_avg_sq_scales);
        parallel_over_chunks(chunks, [&](int64_t, const Chunk& chunk) {
          const int64_t t = chunk.tensor, b = chunk.begin;
          C* copy_chunk = nullptr;
          if constexpr (kWritesCopy<C>) copy_chunk = copy[t] + b;
          apply_chunk_codes(chunk, p[t] + b, m[t] + b, v[t] + b, ms[t] + b / kCodeBlock, vs[t] + b / kCodeBlock,
                            copy_chunk, h + t * kLambColumns, norm_data + 2 * t);
        });
        return;
      } else {
      const std::vector<const S*> m = const_pointers<S>(exp_avgs), v = const_pointers<S>(exp_avg_sqs);
      parallel_over_chunks(chunks, [&](int64_t, const Chunk& chunk) {
        const int64_t t = chunk.tensor, b = chunk.begin;
        C* copy_chunk = nullptr;
        if constexpr (kWritesCopy<C>) copy_chunk = copy[t] + b;
        apply_chunk(chunk, p[t] + b, m[t] + b, v[t] + b, copy_chunk, h + t * kLambColumns, norm_data + 2 * t);
      });
      }
    });
  });
}

}  // namespace lamb_kernels
