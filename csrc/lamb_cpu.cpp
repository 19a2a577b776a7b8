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

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace lamb_kernels {
namespace {

// A float that is a bfloat16 value exactly (round_bf16_stochastic's result), stored as one: its high
// 16 bits, with no rounding step (which would also cost the loop its vectorization).
inline at::BFloat16 bf16_of_exact(float x) {
  return at::BFloat16(static_cast<uint16_t>(float_bits(x) >> 16), at::BFloat16::from_bits());
}

template <typename P, typename G, typename S, bool kScaled>
void moments_chunk(const Chunk& chunk, const P* __restrict__ p, const G* __restrict__ g, S* __restrict__ m,
                   S* __restrict__ v, float* __restrict__ u_out, const float* h, float grad_norm, float inv_scale,
                   float* partial) {
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
    u_out[i] = u;
    acc_p[lane] += param * param;
    acc_u[lane] += u * u;
  };
  const int64_t n = chunk.size;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) element(i + lane, lane);  // vectorized: tests/test_vectorization.py
  }
  for (int64_t lane = 0; i + lane < n; ++lane) element(i + lane, lane);
  partial[0] = lane_total(acc_p);
  partial[1] = lane_total(acc_u);
}

// 8-bit states (S = int8_t: m int8, v uint8 codes with block scales): each block of kCodeBlock
// elements is updated in fp32 into local arrays, its new scales taken (the largest magnitudes), and
// its codes written with stochastic rounding; u and its norm come from the decoded codes, the values
// the apply pass will read. Plain element loops, and sums in lanes (for_each_lane), so that each
// vectorizes. u is computed in the loop that sums it: a separate loop of loads, stores and sums alone
// made GCC vectorize the sums as in-order reductions across the lanes (scalar adds, a third of the
// pass's time; 30% faster from cache without it, same codes and u).
template <typename P, typename G, bool kScaled>
void moments_chunk_codes(const Chunk& chunk, const P* __restrict__ p, const G* __restrict__ g, int8_t* __restrict__ m,
                         uint8_t* __restrict__ v, float* __restrict__ m_scales, float* __restrict__ v_scales,
                         float* __restrict__ u_out, const float* h, float grad_norm, float inv_scale, float* partial) {
  const LambMoments moments(h, grad_norm);
  const LambUpdate update(h);
  const uint32_t key = rounding_key(h, kLambKeyLo);
  float acc_p[kLanes] = {}, acc_u[kLanes] = {};
  alignas(64) float new_m[kCodeBlock], new_v[kCodeBlock];
  for (int64_t first = 0; first < chunk.size; first += kCodeBlock) {
    const int64_t n = std::min(kCodeBlock, chunk.size - first);
    const int64_t block = first / kCodeBlock;
    const float m_scale = m_scales[block], v_scale = v_scales[block];
    const P* __restrict__ pb = p + first;
    const G* __restrict__ gb = g + first;
    int8_t* __restrict__ mb = m + first;
    uint8_t* __restrict__ vb = v + first;
    float* __restrict__ u_kept = u_out + first;
    for (int64_t i = 0; i < n; ++i) {  // vectorized: tests/test_vectorization.py
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
    for (int64_t i = 0; i < n; ++i) {  // vectorized: tests/test_vectorization.py
      const uint32_t random = element_random(key, first_index + static_cast<uint32_t>(i));
      const int8_t m_code = encode_signed(new_m[i], m_largest, (random & 0xffffU) << 4);
      const uint8_t v_code = encode_unsigned(new_v[i], v_largest, (random >> 16) << 4);
      mb[i] = m_code;
      vb[i] = v_code;
      new_m[i] = decode_signed(m_code, m_largest);
      new_v[i] = decode_unsigned(v_code, v_largest);
    }
    // (u goes to u_out here, not in the loop above: a store through a pointer there costs that
    // loop its vectorization)
    for_each_lane(n, [&](int64_t i, int64_t lane) {
      const float param = static_cast<float>(pb[i]);
      const float u = update(param, new_m[i], new_v[i]);  // 4-5.
      u_kept[i] = u;
      acc_p[lane] += param * param;
      acc_u[lane] += u * u;
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
    for (int64_t e = first; e < first + n; ++e) {  // vectorized: tests/test_vectorization.py
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
  for (int64_t i = 0; i < n; ++i) {  // vectorized: tests/test_vectorization.py
    const float param = static_cast<float>(p[i]);
    const float next = param - step_size * update(param, static_cast<float>(m[i]), static_cast<float>(v[i]));  // 7.
    p[i] = static_cast<P>(next);
    if constexpr (kWritesCopy<C>) copy[i] = static_cast<C>(next);
  }
}

// Step 7 from the u that the moments pass kept (lamb_update, a group in cache): the same value the
// apply loops recompute, so the same bits, without the division and square root per element that
// make an apply pass from cache compute-bound.
template <typename P, typename C>
void apply_chunk_from_u(const Chunk& chunk, P* __restrict__ p, const float* __restrict__ u, C* __restrict__ copy,
                        const float* h, const float* norms) {
  const float step_size = lamb_step_size(h, norms);  // 6.
  for (int64_t i = 0; i < chunk.size; ++i) {  // vectorized: tests/test_vectorization.py
    const float next = static_cast<float>(p[i]) - step_size * u[i];  // 7.
    p[i] = static_cast<P>(next);
    if constexpr (kWritesCopy<C>) copy[i] = static_cast<C>(next);
  }
}

// Where the moments pass writes chunk c's u: `kept[c]` when given and not null (lamb_update's scratch
// for a group in cache), else a buffer of the thread's, rewritten by every chunk.
inline float* u_target(float* const* kept, int64_t c, int64_t size) {
  if (kept != nullptr && kept[c] != nullptr) return kept[c];
  thread_local std::vector<float> discarded;
  if (static_cast<int64_t>(discarded.size()) < size) discarded.resize(size);
  return discarded.data();
}

// The tasks of the two passes (multi_tensor_cpu.h), each dispatched on its own element types: the
// streaming operators run one pass each over every chunk, lamb_update runs both by cache groups.
// `partials`: two floats per chunk, ||p||^2 and ||u||^2; `norms`: two per tensor, read by the apply
// task when it runs (lamb_update fills a group's before applying it); `kept`: see u_target.
ChunkTask moments_task(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                       const float* h, float grad_norm, float inv_scale, bool scaled, float* partials,
                       float* const* kept = nullptr) {
  ChunkTask task;
  dispatch_element(element_type(params), [&](auto param_type) {
    using P = typename decltype(param_type)::type;
    dispatch_element(element_type(grads), [&](auto grad_type) {
      using G = typename decltype(grad_type)::type;
      dispatch_state(element_type(exp_avgs), [&](auto state_type) {
        using S = typename decltype(state_type)::type;
        dispatch_bool(scaled, [&](auto scaled_type) {
          constexpr bool kScaled = decltype(scaled_type)::value;
          const std::vector<const P*> p = const_pointers<P>(params);
          const std::vector<const G*> g = const_pointers<G>(grads);
          if constexpr (std::is_same_v<S, int8_t>) {
            task = [=, m = mutable_pointers<int8_t>(exp_avgs), v = mutable_pointers<uint8_t>(exp_avg_sqs),
                    ms = mutable_pointers(exp_avg_scales), vs = mutable_pointers(exp_avg_sq_scales)](
                       int64_t c, const Chunk& chunk) {
              const int64_t t = chunk.tensor, b = chunk.begin;
              moments_chunk_codes<P, G, kScaled>(chunk, p[t] + b, g[t] + b, m[t] + b, v[t] + b,
                                                 ms[t] + b / kCodeBlock, vs[t] + b / kCodeBlock,
                                                 u_target(kept, c, chunk.size), h + t * kLambColumns, grad_norm,
                                                 inv_scale, partials + 2 * c);
            };
          } else {
            task = [=, m = mutable_pointers<S>(exp_avgs), v = mutable_pointers<S>(exp_avg_sqs)](
                       int64_t c, const Chunk& chunk) {
              const int64_t t = chunk.tensor, b = chunk.begin;
              moments_chunk<P, G, S, kScaled>(chunk, p[t] + b, g[t] + b, m[t] + b, v[t] + b,
                                              u_target(kept, c, chunk.size), h + t * kLambColumns, grad_norm,
                                              inv_scale, partials + 2 * c);
            };
          }
        });
      });
    });
  });
  return task;
}

ChunkTask apply_task(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, at::TensorList copies,
                     const float* h, const float* norms, float* const* kept = nullptr) {
  ChunkTask task;
  dispatch_params_and_copies(params, copies, [&](auto param_type, auto copy_type) {
    using P = typename decltype(param_type)::type;
    using C = typename decltype(copy_type)::type;
    dispatch_state(element_type(exp_avgs), [&](auto state_type) {
      using S = typename decltype(state_type)::type;
      const std::vector<P*> p = mutable_pointers<P>(params);
      const std::vector<C*> copy = copy_pointers<C>(copies);
      auto copy_at = [copy](int64_t t, int64_t b) {
        C* at = nullptr;
        if constexpr (kWritesCopy<C>) at = copy[t] + b;
        return at;
      };
      auto from_u = [=](int64_t c, const Chunk& chunk) {
        if (kept == nullptr || kept[c] == nullptr) return false;
        const int64_t t = chunk.tensor, b = chunk.begin;
        apply_chunk_from_u(chunk, p[t] + b, kept[c], copy_at(t, b), h + t * kLambColumns, norms + 2 * t);
        return true;
      };
      if constexpr (std::is_same_v<S, int8_t>) {
        task = [=, m = const_pointers<int8_t>(exp_avgs), v = const_pointers<uint8_t>(exp_avg_sqs),
                ms = const_pointers(exp_avg_scales), vs = const_pointers(exp_avg_sq_scales)](int64_t c,
                                                                                             const Chunk& chunk) {
          if (from_u(c, chunk)) return;
          const int64_t t = chunk.tensor, b = chunk.begin;
          apply_chunk_codes(chunk, p[t] + b, m[t] + b, v[t] + b, ms[t] + b / kCodeBlock, vs[t] + b / kCodeBlock,
                            copy_at(t, b), h + t * kLambColumns, norms + 2 * t);
        };
      } else {
        task = [=, m = const_pointers<S>(exp_avgs), v = const_pointers<S>(exp_avg_sqs)](int64_t c, const Chunk& chunk) {
          if (from_u(c, chunk)) return;
          const int64_t t = chunk.tensor, b = chunk.begin;
          apply_chunk(chunk, p[t] + b, m[t] + b, v[t] + b, copy_at(t, b), h + t * kLambColumns, norms + 2 * t);
        };
      }
    });
  });
  return task;
}

// The checks of each pass's arguments, shared by the streaming operators and lamb_update.
void check_moments(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                   const at::Tensor& hyper, int64_t chunk_size) {
  check_lists(op, {{"params", params},
                   {"grads", grads},
                   {"exp_avgs", exp_avgs, Storage::kState},
                   {"exp_avg_sqs", exp_avg_sqs, Storage::kUnsignedState}});
  check_same_dtype(op, "exp_avg_sqs", exp_avg_sqs, "exp_avgs", exp_avgs);
  check_lamb_scales(op, exp_avgs, exp_avg_scales, exp_avg_sq_scales, chunk_size, at::kCPU);
  check_hyper(op, hyper, static_cast<int64_t>(params.size()), kLambColumns);
}

void check_apply(const char* op, at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, const at::Tensor& hyper,
                 at::TensorList copies, int64_t chunk_size) {
  check_lists(op, {{"params", params},
                   {"exp_avgs", exp_avgs, Storage::kState},
                   {"exp_avg_sqs", exp_avg_sqs, Storage::kUnsignedState}});
  check_same_dtype(op, "exp_avg_sqs", exp_avg_sqs, "exp_avgs", exp_avgs);
  check_lamb_scales(op, exp_avgs, exp_avg_scales, exp_avg_sq_scales, chunk_size, at::kCPU);
  check_copies(op, params, copies);
  check_hyper(op, hyper, static_cast<int64_t>(params.size()), kLambColumns);
}

// The global grad norm G = sqrt(grad_sumsq) / scale: grad_sumsq sums the still-scaled grads. Without
// clipping, 0 never exceeds a max_grad_norm.
float global_grad_norm(const char* op, const std::optional<at::Tensor>& grad_sumsq, float inv_scale) {
  const std::optional<float> sumsq = read_scalar(op, "grad_sumsq", grad_sumsq);
  return sumsq.has_value() ? std::sqrt(*sumsq) * inv_scale : 0.0f;
}

}  // namespace

at::Tensor lamb_moments_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                            at::TensorList exp_avg_sq_scales, const at::Tensor& hyper,
                            const std::optional<at::Tensor>& grad_sumsq, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, int64_t chunk_size) {
  const char* op = "lamb_moments";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_moments(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, chunk_size);
  const float inv_scale = inverse_grad_scale(op, grad_scale);
  const float grad_norm = global_grad_norm(op, grad_sumsq, inv_scale);
  if (skips_step(op, found_inf)) return at::zeros({n_tensors, 2}, at::TensorOptions().dtype(at::kFloat));
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  std::vector<float> partials(2 * chunks.size());
  parallel_over_chunks(chunks, moments_task(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                                            hyper.const_data_ptr<float>(), grad_norm, inv_scale,
                                            grad_scale.has_value(), partials.data()));
  return per_tensor_sums(partials, chunks, n_tensors, 2);
}

void lamb_apply_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, const at::Tensor& hyper,
                    const at::Tensor& norms, const std::optional<at::Tensor>& found_inf, at::TensorList copies,
                    int64_t chunk_size) {
  const char* op = "lamb_apply";
  check_apply(op, params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, copies, chunk_size);
  check_norms(op, norms, static_cast<int64_t>(params.size()));
  if (skips_step(op, found_inf)) return;
  parallel_over_chunks(chunk_map(params, chunk_size),
                       apply_task(params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, copies,
                                  hyper.const_data_ptr<float>(), norms.const_data_ptr<float>()));
}

void lamb_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                     const at::Tensor& hyper, const std::optional<at::Tensor>& grad_sumsq,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     at::TensorList copies, int64_t chunk_size, int64_t cache_bytes) {
  const char* op = "lamb_update";
  check_moments(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, chunk_size);
  check_apply(op, params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, copies, chunk_size);
  const float inv_scale = inverse_grad_scale(op, grad_scale);
  const float grad_norm = global_grad_norm(op, grad_sumsq, inv_scale);
  if (skips_step(op, found_inf)) return;
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  const std::vector<ChunkRange> groups = cache_groups(chunks, {params, grads, exp_avgs, exp_avg_sqs}, cache_bytes);
  // The u of a group whose elements' u take at most half of cache_bytes is kept in a scratch
  // buffer by the moments pass, for the apply pass to read from cache: kept[c], chunk c's place in
  // it (null for the chunks of larger groups, whose apply pass recomputes u).
  auto elements = [&](ChunkRange group) {
    int64_t n = 0;
    for (int64_t c = group.first; c < group.last; ++c) n += chunks[c].size;
    return n;
  };
  auto keeps_u = [&](ChunkRange group) {
    return 2 * elements(group) * static_cast<int64_t>(sizeof(float)) <= cache_bytes;
  };
  int64_t largest = 0;
  for (const ChunkRange& group : groups) {
    if (keeps_u(group)) largest = std::max(largest, elements(group));
  }
  std::vector<float> scratch(largest);
  std::vector<float*> kept(chunks.size(), nullptr);
  for (const ChunkRange& group : groups) {
    if (!keeps_u(group)) continue;
    float* next = scratch.data();
    for (int64_t c = group.first; c < group.last; ++c) {
      kept[c] = next;
      next += chunks[c].size;
    }
  }
  std::vector<float> partials(2 * chunks.size()), norms(2 * params.size());
  const float* h = hyper.const_data_ptr<float>();
  const ChunkTask moments = moments_task(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, h,
                                         grad_norm, inv_scale, grad_scale.has_value(), partials.data(), kept.data());
  const ChunkTask apply = apply_task(params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, copies, h,
                                     norms.data(), kept.data());
  run_in_cache_groups(
      chunks, groups, moments, [&](ChunkRange group) { range_sums(partials, chunks, group, 2, norms.data()); }, apply);
}

}  // namespace lamb_kernels
