// LARS on CUDA tensors: docs/design.md section 3 in the Triton kernels' two passes over memory.
//
// 1. per-tensor ||p||^2 and ||g||^2: sums_of_squares on the params and on the grads (reads p g:
//    8 bytes/param), skipped when no param group adapts;
// 2. lars_apply: trust ratio, weight decay, momentum and the update (reads p g b, writes p b:
//    20 bytes/param).
//
// The math of each element is optimizer_math.h, shared with the CPU operators. A block runs one
// chunk of one tensor, so the tensor's choices (trust ratio, momentum, first step, nesterov, grad
// scale) are the same for the whole block: the kernel branches once to a loop with them fixed.
#include "kernels.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

namespace lamb_kernels {
namespace cuda {
namespace {

// Twenty loop variants in one kernel need more registers than the LAMB kernels: at least two blocks
// per SM (at most 128 registers a thread), under which ptxas allocates every variant without spills.
constexpr int kLarsMinBlocksPerSm = 2;

// Lists of the table: p g b, and the low-precision copies when C is not NoCopy. A tensor without
// momentum has an empty placeholder as its buffer, never read or written.
// B: the buffers' storage, float or bfloat16 (written with stochastic rounding: `key` and the chunk's
// first element `begin` give each element its random bits); int8_t (8-bit codes) takes
// lars_codes_chunk where the tensor has momentum.
template <bool kScaled, bool kAdapt, Momentum kMomentum, bool kNesterov, bool kAligned, typename P, typename G,
          typename C, typename B>
__device__ __forceinline__ void lars_chunk(int64_t n, P* p, const G* g, B* buf, C* copy, const LarsScalars& s,
                                           uint32_t key, int64_t begin) {
  constexpr bool kRound = std::is_same_v<B, c10::BFloat16> && kMomentum != Momentum::kNone;
  for_each_element<kAligned>(n, [&](auto count, int64_t i) {
    constexpr int k_n = decltype(count)::value;
    float param[k_n], grad[k_n], b[k_n] = {};
    load<k_n>(p, i, param);
    load<k_n>(g, i, grad);
    if constexpr (kMomentum == Momentum::kLater) load<k_n>(buf, i, b);  // a new buffer is not read
#pragma unroll
    for (int k = 0; k < k_n; ++k) {
      if constexpr (kScaled) grad[k] = unscale(grad[k], s.inv_scale);
      uint32_t random16 = 0;
      if constexpr (kRound) random16 = element_random(key, begin + i + k) & 0xffffU;
      param[k] = lars_element<false, kAdapt, kMomentum, kNesterov, kRound>(param[k], grad[k], b[k], s, random16);
    }
    if constexpr (kMomentum != Momentum::kNone) store<k_n>(buf, i, b);
    store<k_n>(p, i, param);
    if constexpr (kWritesCopy<C>) store<k_n>(copy, i, param);  // the fp32 master weight, rounded
  });
}

// 8-bit buffers (int8 codes, their block scales from `scales`): one warp per block of kCodeBlock
// elements takes the new values' scale (warp_absmax) and writes the codes, with stochastic rounding;
// the step uses the decoded codes, as the next step will read them.
template <bool kScaled, bool kAdapt, Momentum kMomentum, bool kNesterov, bool kAligned, typename P, typename G,
          typename C>
__device__ __forceinline__ void lars_codes_chunk(int64_t n, P* p, const G* g, int8_t* buf, float* scales, C* copy,
                                                 const LarsScalars& s, uint32_t key, int64_t begin) {
  for_each_code_block(n, [&](int64_t b, int64_t i, int valid) {
    float param[kCodesPerLane], grad[kCodesPerLane], d[kCodesPerLane], next[kCodesPerLane];
    int32_t codes[kCodesPerLane];
    load_lane<kAligned>(p, i, valid, param);
    load_lane<kAligned>(g, i, valid, grad);
    load_code_lane<kAligned>(buf, i, valid, codes);
    const float scale = scales[b];
    float largest = 0.0f;
#pragma unroll
    for (int k = 0; k < kCodesPerLane; ++k) {
      if constexpr (kScaled) grad[k] = unscale(grad[k], s.inv_scale);
      d[k] = lars_direction<false, kAdapt>(param[k], grad[k], s);  // 1.
      // 2. (a new buffer is not read; 0 where no element is)
      const float old = kMomentum == Momentum::kLater && k < valid ? decode_signed(static_cast<int8_t>(codes[k]), scale)
                                                                   : 0.0f;
      next[k] = k < valid ? lars_buffer<kMomentum>(d[k], old, s) : 0.0f;
      largest = absmax(largest, next[k]);
    }
    largest = block_scale(warp_absmax(largest));
    if (threadIdx.x % 32 == 0) scales[b] = largest;
#pragma unroll
    for (int k = 0; k < kCodesPerLane; ++k) {
      codes[k] = encode_signed(next[k], largest, (element_random(key, begin + i + k) & 0xffffU) << 4);
      const float stored = decode_signed(static_cast<int8_t>(codes[k]), largest);
      param[k] = param[k] - s.lr * (kNesterov ? d[k] + s.momentum * stored : stored);  // 3.
    }
    store_code_lane<kAligned>(buf, i, valid, codes);
    store_lane<kAligned>(p, i, valid, param);
    if constexpr (kWritesCopy<C>) store_lane<kAligned>(copy, i, valid, param);
  });
}

template <bool kScaled, bool kAdapt, bool kAligned, typename P, typename G, typename C, typename B>
__device__ __forceinline__ void lars_chunk(Momentum mode, bool nesterov, int64_t n, P* p, const G* g, B* buf,
                                           float* scales, C* copy, const LarsScalars& s, uint32_t key,
                                           int64_t begin) {
  if constexpr (std::is_same_v<B, int8_t>) {
    if (mode == Momentum::kNone) {
      lars_chunk<kScaled, kAdapt, Momentum::kNone, false, kAligned>(n, p, g, buf, copy, s, key, begin);
    } else if (mode == Momentum::kFirstStep) {
      if (nesterov) {
        lars_codes_chunk<kScaled, kAdapt, Momentum::kFirstStep, true, kAligned>(n, p, g, buf, scales, copy, s, key,
                                                                               begin);
      } else {
        lars_codes_chunk<kScaled, kAdapt, Momentum::kFirstStep, false, kAligned>(n, p, g, buf, scales, copy, s, key,
                                                                                begin);
      }
    } else if (nesterov) {
      lars_codes_chunk<kScaled, kAdapt, Momentum::kLater, true, kAligned>(n, p, g, buf, scales, copy, s, key, begin);
    } else {
      lars_codes_chunk<kScaled, kAdapt, Momentum::kLater, false, kAligned>(n, p, g, buf, scales, copy, s, key, begin);
    }
  } else if (mode == Momentum::kNone) {
    lars_chunk<kScaled, kAdapt, Momentum::kNone, false, kAligned>(n, p, g, buf, copy, s, key, begin);
  } else if (mode == Momentum::kFirstStep) {
    if (nesterov) {
      lars_chunk<kScaled, kAdapt, Momentum::kFirstStep, true, kAligned>(n, p, g, buf, copy, s, key, begin);
    } else {
      lars_chunk<kScaled, kAdapt, Momentum::kFirstStep, false, kAligned>(n, p, g, buf, copy, s, key, begin);
    }
  } else if (nesterov) {
    lars_chunk<kScaled, kAdapt, Momentum::kLater, true, kAligned>(n, p, g, buf, copy, s, key, begin);
  } else {
    lars_chunk<kScaled, kAdapt, Momentum::kLater, false, kAligned>(n, p, g, buf, copy, s, key, begin);
  }
}

template <typename P, typename G, typename C, typename B, bool kAligned>
__global__ void __launch_bounds__(kThreads, kLarsMinBlocksPerSm)
    lars_apply_kernel(TensorTable table, const float* __restrict__ hyper, const float* norms, const float* grad_scale,
                      const float* found_inf, int scales_list) {
  if (skips_step(found_inf)) return;
  const ChunkView chunk(table);
  const float* h = hyper + chunk.tensor * kLarsColumns;
  const float inv_scale = inverse_grad_scale(grad_scale);
  const bool adapt = h[kLarsAdapt] != 0;
  // The host cannot see the hyperparameter table without a sync, so the arguments it implies are
  // checked here: norms for a tensor that adapts, a buffer for a tensor with momentum. A failed check
  // stops the kernel with a device-side assertion, which the next synchronising call reports.
  CUDA_KERNEL_ASSERT(!adapt || norms != nullptr);
  CUDA_KERNEL_ASSERT(h[kLarsHasMomentum] == 0 || chunk.has_memory(table, 2));
  // 1. The trust ratio, from the per-tensor norms (none are given when no tensor adapts).
  const float ratio = adapt ? lars_trust_ratio(h, norms + 2 * chunk.tensor, inv_scale) : 1.0f;
  const Momentum mode = h[kLarsHasMomentum] == 0 ? Momentum::kNone
                        : h[kLarsFirstStep] != 0 ? Momentum::kFirstStep
                                                 : Momentum::kLater;
  const LarsScalars s{h[kLarsLr], ratio, h[kLarsWeightDecay], h[kLarsMomentum], h[kLarsOneMinusDampening], inv_scale};
  P* p = chunk.pointer<P>(table, 0);
  const G* g = chunk.pointer<const G>(table, 1);
  B* buf = mode == Momentum::kNone ? nullptr : chunk.pointer<B>(table, 2);
  const uint32_t key = rounding_key(h, kLarsKeyLo);
  float* scales = nullptr;
  if constexpr (std::is_same_v<B, int8_t>) scales = mode == Momentum::kNone ? nullptr : chunk.scales(table, scales_list);
  C* copy = nullptr;
  if constexpr (kWritesCopy<C>) copy = chunk.pointer<C>(table, 3);
  const bool nesterov = h[kLarsNesterov] != 0;
  if (grad_scale != nullptr) {
    if (adapt) {
      lars_chunk<true, true, kAligned>(mode, nesterov, chunk.size, p, g, buf, scales, copy, s, key, chunk.begin);
    } else {
      lars_chunk<true, false, kAligned>(mode, nesterov, chunk.size, p, g, buf, scales, copy, s, key, chunk.begin);
    }
  } else if (adapt) {
    lars_chunk<false, true, kAligned>(mode, nesterov, chunk.size, p, g, buf, scales, copy, s, key, chunk.begin);
  } else {
    lars_chunk<false, false, kAligned>(mode, nesterov, chunk.size, p, g, buf, scales, copy, s, key, chunk.begin);
  }
}

}  // namespace

void lars_apply_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList buffer_scales, const at::Tensor& hyper, const std::optional<at::Tensor>& norms,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     at::TensorList copies, int64_t chunk_size) {
  const char* op = "lars_apply";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  const at::Device device = hyper.device();
  check_chunk_size(op, chunk_size);
  check_lists(op, {{"params", params}, {"grads", grads}}, device);
  check_copies(op, params, copies, device);
  check_table_argument(op, "hyper", hyper, device, n_tensors, kLarsColumns);
  if (norms.has_value()) check_table_argument(op, "norms", *norms, device, n_tensors, 2);
  TORCH_CHECK(static_cast<int64_t>(momentum_buffers.size()) == n_tensors, op, ": momentum_buffers has ",
              momentum_buffers.size(), " tensors, params has ", n_tensors);
  // Which tensors adapt and have momentum is in the hyperparameter table, on the device, so the
  // kernel checks that those have norms and buffers; here a buffer is an empty placeholder or laid
  // out as its parameter.
  // (An empty buffer is a placeholder, or a tensor with no element.)
  const at::ScalarType buffer_type = check_momentum_buffers(
      op, params, momentum_buffers, device, [&](int64_t t) { return momentum_buffers[t].numel() != 0; });
  const bool codes = check_scales(op, "buffer_scales", momentum_buffers, buffer_scales, device, chunk_size,
                                  [&](int64_t t) { return momentum_buffers[t].numel() != 0; });
  const float* norm_data = norms.has_value() ? norms->const_data_ptr<float>() : nullptr;
  const float* scale = scalar_pointer(op, "grad_scale", grad_scale, device);
  const float* found = scalar_pointer(op, "found_inf", found_inf, device);
  if (n_tensors == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  // (8-bit buffers: their scales are the last list, after the copies when there are any)
  const TensorTable table =
      copies.empty() ? (codes ? tensor_table({params, grads, momentum_buffers, buffer_scales}, chunk_size)
                              : tensor_table({params, grads, momentum_buffers}, chunk_size))
                     : (codes ? tensor_table({params, grads, momentum_buffers, copies, buffer_scales}, chunk_size)
                              : tensor_table({params, grads, momentum_buffers, copies}, chunk_size));
  const int scales_list = copies.empty() ? 3 : 4;
  if (table.n_chunks == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_params_and_copies(params, copies, [&](auto param_type, auto copy_type) {
    using P = typename decltype(param_type)::type;
    using C = typename decltype(copy_type)::type;
    dispatch_element(element_type(grads), [&](auto grad_type) {
      using G = typename decltype(grad_type)::type;
      dispatch_state(buffer_type, [&](auto buffer_element) {
        using B = typename decltype(buffer_element)::type;
        dispatch_bool(table.aligned, [&](auto aligned) {
          lars_apply_kernel<P, G, C, B, decltype(aligned)::value><<<table.n_chunks, kThreads, 0, stream>>>(
              table, hyper.const_data_ptr<float>(), norm_data, scale, found, scales_list);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace lamb_kernels
