// LARS on CPU tensors: docs/design.md section 3 in the Triton kernels' two passes over memory.
//
// 1. per-tensor ||p||^2 and ||g||^2: sums_of_squares on the params and on the grads (reads p g:
//    8 bytes/param), skipped when no param group adapts;
// 2. lars_apply: trust ratio, weight decay, momentum and the update (reads p g b, writes p b:
//    20 bytes/param).
//
// The element loops are templates on the storage types of params (P), grads (G) and the params'
// low-precision copies (C, NoCopy when there are none), the buffers (B: float, or bfloat16 written with
// stochastic rounding), and on kScaled (a grad_scale was given), as in lamb_cpu.cpp. The math of
// each element is in optimizer_math.h, shared with the CUDA kernels.
#include "multi_tensor_cpu.h"
#include "optimizer_math.h"

#include <cmath>
#include <optional>
#include <utility>

namespace lamb_kernels {
namespace {

// 8-bit buffers (int8 codes with block scales): each block of kCodeBlock elements gets its d and new
// buffer values in fp32, its new scale (their largest magnitude) and its codes, written with
// stochastic rounding; the step uses the decoded codes, as the next step will read them.
template <typename P, typename G, typename C, bool kScaled, bool kAdapt, Momentum kMomentum, bool kNesterov>
void apply_chunk_codes(int64_t begin, int64_t n, P* __restrict__ p, const G* __restrict__ g, int8_t* __restrict__ buf,
                       float* __restrict__ scales, C* __restrict__ copy, const LarsScalars& s, uint32_t key) {
  alignas(64) float d[kCodeBlock], next_buf[kCodeBlock];
  for (int64_t first = 0; first < n; first += kCodeBlock) {
    const int64_t len = std::min(kCodeBlock, n - first);
    const float scale = scales[first / kCodeBlock];
    P* __restrict__ pb = p + first;
    const G* __restrict__ gb = g + first;
    int8_t* __restrict__ bb = buf + first;
    for (int64_t i = 0; i < len; ++i) {  // vectorized: tests/test_vectorization.py
      d[i] = lars_direction<kScaled, kAdapt>(static_cast<float>(pb[i]), static_cast<float>(gb[i]), s);  // 1.
      // 2. (a new buffer is not read)
      const float old = kMomentum == Momentum::kLater ? decode_signed(bb[i], scale) : 0.0f;
      next_buf[i] = lars_buffer<kMomentum>(d[i], old, s);
    }
    const float new_scale = block_scale(block_absmax(next_buf, len));
    scales[first / kCodeBlock] = new_scale;
    const uint32_t first_index = static_cast<uint32_t>(begin + first);
    for (int64_t i = 0; i < len; ++i) {  // vectorized: tests/test_vectorization.py
      const uint32_t random16 = element_random(key, first_index + static_cast<uint32_t>(i)) & 0xffffU;
      const int8_t code = encode_signed(next_buf[i], new_scale, random16 << 4);
      bb[i] = code;
      const float stored = decode_signed(code, new_scale);
      const float step = kNesterov ? d[i] + s.momentum * stored : stored;
      const float next = static_cast<float>(pb[i]) - s.lr * step;  // 3.
      pb[i] = static_cast<P>(next);
      if constexpr (kWritesCopy<C>) copy[first + i] = static_cast<C>(next);
    }
  }
}

// The element loop with the per-tensor choices made at compile time, so each variant vectorises
// as one straight loop.
template <typename P, typename G, typename C, typename B, bool kScaled, bool kAdapt, Momentum kMomentum,
          bool kNesterov>
void apply_chunk(int64_t begin, int64_t n, P* __restrict__ p, const G* __restrict__ g, B* __restrict__ buf,
                 float* __restrict__ scales, C* __restrict__ copy, const LarsScalars& s, uint32_t key) {
  if constexpr (std::is_same_v<B, int8_t> && kMomentum != Momentum::kNone) {
    apply_chunk_codes<P, G, C, kScaled, kAdapt, kMomentum, kNesterov>(begin, n, p, g, buf, scales, copy, s, key);
    return;
  }
  constexpr bool kRound = std::is_same_v<B, at::BFloat16> && kMomentum != Momentum::kNone;
  for (int64_t i = 0; i < n; ++i) {  // vectorized: tests/test_vectorization.py
    float b = 0.0f;
    if constexpr (kMomentum == Momentum::kLater) b = static_cast<float>(buf[i]);  // a new buffer is not read
    uint32_t random16 = 0;
    if constexpr (kRound) random16 = element_random(key, begin + i) & 0xffffU;
    const float next = lars_element<kScaled, kAdapt, kMomentum, kNesterov, kRound>(
        static_cast<float>(p[i]), static_cast<float>(g[i]), b, s, random16);
    if constexpr (kMomentum != Momentum::kNone) {
      if constexpr (std::is_same_v<B, at::BFloat16>) {
        buf[i] = at::BFloat16(static_cast<uint16_t>(float_bits(b) >> 16), at::BFloat16::from_bits());  // exact
      } else {
        buf[i] = b;
      }
    }
    p[i] = static_cast<P>(next);
    if constexpr (kWritesCopy<C>) copy[i] = static_cast<C>(next);  // the fp32 master weight, rounded
  }
}

template <typename P, typename G, typename C, typename B, bool kScaled, bool kAdapt, Momentum kMomentum>
void apply_chunk(bool nesterov, int64_t begin, int64_t n, P* p, const G* g, B* buf, float* scales, C* copy,
                 const LarsScalars& s, uint32_t key) {
  auto run = nesterov ? apply_chunk<P, G, C, B, kScaled, kAdapt, kMomentum, true>
                      : apply_chunk<P, G, C, B, kScaled, kAdapt, kMomentum, false>;
  run(begin, n, p, g, buf, scales, copy, s, key);
}

template <typename P, typename G, typename C, typename B, bool kScaled, bool kAdapt>
void apply_chunk(Momentum mode, bool nesterov, int64_t begin, int64_t n, P* p, const G* g, B* buf, float* scales,
                 C* copy, const LarsScalars& s, uint32_t key) {
  auto run = mode == Momentum::kNone        ? apply_chunk<P, G, C, B, kScaled, kAdapt, Momentum::kNone>
             : mode == Momentum::kFirstStep ? apply_chunk<P, G, C, B, kScaled, kAdapt, Momentum::kFirstStep>
                                            : apply_chunk<P, G, C, B, kScaled, kAdapt, Momentum::kLater>;
  run(nesterov, begin, n, p, g, buf, scales, copy, s, key);
}

// The apply pass's task (multi_tensor_cpu.h): per chunk, its tensor's trust ratio from `norms` (two
// floats per tensor, ||p||^2 and ||g||^2, read when the task runs: lars_update fills a group's first),
// then the element loop of that tensor's choices.
ChunkTask apply_task(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList buffer_scales, at::TensorList copies, at::ScalarType buffer_type, bool codes,
                     const float* h, const float* norms, const std::optional<at::Tensor>& grad_scale,
                     float inv_scale) {
  ChunkTask task;
  dispatch_params_and_copies(params, copies, [&](auto param_type, auto copy_type) {
    using P = typename decltype(param_type)::type;
    using C = typename decltype(copy_type)::type;
    dispatch_element(element_type(grads), [&](auto grad_type) {
      using G = typename decltype(grad_type)::type;
      dispatch_state(buffer_type, [&](auto buffer_element) {
        using B = typename decltype(buffer_element)::type;
        std::vector<B*> b_data;
        for (const at::Tensor& b : momentum_buffers) b_data.push_back(b.numel() ? b.mutable_data_ptr<B>() : nullptr);
        std::vector<float*> s_data;
        for (const at::Tensor& scale : buffer_scales) {
          s_data.push_back(scale.numel() ? scale.mutable_data_ptr<float>() : nullptr);
        }
        dispatch_bool(grad_scale.has_value(), [&](auto scaled) {
          constexpr bool kScaled = decltype(scaled)::value;
          task = [=, p_data = mutable_pointers<P>(params), g_data = const_pointers<G>(grads),
                  c_data = copy_pointers<C>(copies)](int64_t, const Chunk& chunk) {
            const int64_t t = chunk.tensor;
            const float* ht = h + t * kLarsColumns;
            const bool adapt = ht[kLarsAdapt] != 0;
            const float ratio = adapt ? lars_trust_ratio(ht, norms + 2 * t, inv_scale) : 1.0f;
            const Momentum mode = ht[kLarsHasMomentum] == 0 ? Momentum::kNone
                                  : ht[kLarsFirstStep] != 0 ? Momentum::kFirstStep
                                                            : Momentum::kLater;
            P* p = p_data[t] + chunk.begin;
            const G* g = g_data[t] + chunk.begin;
            B* buf = mode == Momentum::kNone ? nullptr : b_data[t] + chunk.begin;
            float* scales = mode == Momentum::kNone || !codes ? nullptr : s_data[t] + chunk.begin / kCodeBlock;
            C* copy = nullptr;
            if constexpr (kWritesCopy<C>) copy = c_data[t] + chunk.begin;
            const LarsScalars scalars{ht[kLarsLr], ratio, ht[kLarsWeightDecay], ht[kLarsMomentum],
                                      ht[kLarsOneMinusDampening], inv_scale};
            auto run = adapt ? apply_chunk<P, G, C, B, kScaled, true> : apply_chunk<P, G, C, B, kScaled, false>;
            run(mode, ht[kLarsNesterov] != 0, chunk.begin, chunk.size, p, g, buf, scales, copy, scalars,
                rounding_key(ht, kLarsKeyLo));
          };
        });
      });
    });
  });
  return task;
}

// The checks of lars_apply's and lars_update's arguments; returns the buffers' dtype and whether they
// are 8-bit codes.
std::pair<at::ScalarType, bool> check_lars(const char* op, at::TensorList params, at::TensorList grads,
                                           at::TensorList momentum_buffers, at::TensorList buffer_scales,
                                           const at::Tensor& hyper, at::TensorList copies, int64_t chunk_size) {
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  check_lists(op, {{"params", params}, {"grads", grads}});
  check_copies(op, params, copies);
  check_hyper(op, hyper, n_tensors, kLarsColumns);
  const float* h = hyper.const_data_ptr<float>();
  TORCH_CHECK(static_cast<int64_t>(momentum_buffers.size()) == n_tensors, op, ": momentum_buffers has ",
              momentum_buffers.size(), " tensors, params has ", n_tensors);
  // A tensor without momentum has an empty placeholder in momentum_buffers.
  auto has_buffer = [&](int64_t t) { return h[t * kLarsColumns + kLarsHasMomentum] != 0; };
  const at::ScalarType buffer_type = check_momentum_buffers(op, params, momentum_buffers, at::kCPU, has_buffer);
  const bool codes =
      check_scales(op, "buffer_scales", momentum_buffers, buffer_scales, at::kCPU, chunk_size, has_buffer);
  return {buffer_type, codes};
}

bool adapts(const float* h, int64_t t) { return h[t * kLarsColumns + kLarsAdapt] != 0; }

// A tensor that adapts needs its norms: `given` says whether this call has them, `missing` why not.
void check_norms_for_adapting(const char* op, const float* h, int64_t n_tensors, bool given, const char* missing) {
  for (int64_t t = 0; t < n_tensors; ++t) {
    TORCH_CHECK(!adapts(h, t) || given, op, ": params[", t, "] adapts, but ", missing);
  }
}

}  // namespace

void lars_apply_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList buffer_scales, const at::Tensor& hyper, const std::optional<at::Tensor>& norms,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    at::TensorList copies, int64_t chunk_size) {
  const char* op = "lars_apply";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  const auto [buffer_type, codes] =
      check_lars(op, params, grads, momentum_buffers, buffer_scales, hyper, copies, chunk_size);
  if (norms.has_value()) check_norms(op, *norms, n_tensors);
  const float* h = hyper.const_data_ptr<float>();
  check_norms_for_adapting(op, h, n_tensors, norms.has_value(), "no norms were given");
  const float inv_scale = inverse_grad_scale(op, grad_scale);
  if (skips_step(op, found_inf)) return;
  parallel_over_chunks(chunk_map(params, chunk_size),
                       apply_task(params, grads, momentum_buffers, buffer_scales, copies, buffer_type, codes, h,
                                  norms.has_value() ? norms->const_data_ptr<float>() : nullptr, grad_scale,
                                  inv_scale));
}

void lars_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList buffer_scales, const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, at::TensorList copies, bool adaptive,
                     int64_t chunk_size, int64_t cache_bytes) {
  const char* op = "lars_update";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  const auto [buffer_type, codes] =
      check_lars(op, params, grads, momentum_buffers, buffer_scales, hyper, copies, chunk_size);
  const float* h = hyper.const_data_ptr<float>();
  check_norms_for_adapting(op, h, n_tensors, adaptive, "adaptive is false");
  const float inv_scale = inverse_grad_scale(op, grad_scale);
  if (skips_step(op, found_inf)) return;
  const std::vector<Chunk> chunks = chunk_map(params, chunk_size);
  std::vector<float> partials(2 * chunks.size()), norms(2 * n_tensors);
  // The norms pass reads the tensors that adapt only (none without `adaptive`).
  const ChunkTask squares = sums_of_squares_task(params, grads, partials.data());
  ChunkTask norms_of_adapting;
  if (adaptive) {
    norms_of_adapting = [&](int64_t c, const Chunk& chunk) {
      if (adapts(h, chunk.tensor)) squares(c, chunk);
    };
  }
  const ChunkTask apply = apply_task(params, grads, momentum_buffers, buffer_scales, copies, buffer_type, codes, h,
                                     norms.data(), grad_scale, inv_scale);
  run_in_cache_groups(
      chunks, cache_groups(chunks, {params, grads}, cache_bytes), norms_of_adapting,
      [&](ChunkRange group) { range_sums(partials, chunks, group, 2, norms.data()); }, apply);
}

}  // namespace lamb_kernels
