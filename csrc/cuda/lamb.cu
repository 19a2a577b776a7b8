// LAMB on CUDA tensors: docs/design.md section 2 in the Triton kernels' three passes over memory.
//
// 1. sums_of_squares over the grads (sums_of_squares.cu), for the global grad norm (reads g: 4
//    bytes/param);
// 2. lamb_moments: steps 1-5, moments in place, per-tensor ||p||^2 and ||u||^2 with p taken before
//    the update (reads p g m v, writes m v: 24 bytes/param), then the per-tensor sums;
// 3. lamb_apply: steps 6-7, u recomputed from m and v (reads p m v, writes p: 16 bytes/param).
//
// The math of each element is optimizer_math.h, shared with the CPU operators. The kernels are
// templates on the storage types of params (P), grads (G), the moments (S: float, or bfloat16 written
// with stochastic rounding, optimizer_math.h; 8-bit codes have kernels of their own) and the params' low-precision copies (C, NoCopy when
// there are none), and on kAligned (the vectorized path). The grad scale, the global
// grad norm and found_inf are read on the device: no host sync, and a CUDA graph replays them.
#include "kernels.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

namespace lamb_kernels {
namespace cuda {
namespace {

// What both moments kernels start and end with. A step a GradScaler skips writes nothing, and its
// norms are 0 (returns true).
__device__ __forceinline__ bool moments_skipped(const float* found_inf, float* partials) {
  if (!skips_step(found_inf)) return false;
  if (threadIdx.x == 0) partials[2 * blockIdx.x] = partials[2 * blockIdx.x + 1] = 0.0f;
  return true;
}

// grad_sumsq sums the still-scaled grads: G = sqrt(grad_sumsq) / scale; without clipping, 0 never
// exceeds a max_grad_norm.
__device__ __forceinline__ float global_grad_norm(const float* grad_sumsq, float inv_scale) {
  return grad_sumsq != nullptr ? square_root(*grad_sumsq) * inv_scale : 0.0f;
}

// The chunk's ||p||^2 and ||u||^2, summed over the block, to its partials.
__device__ __forceinline__ void write_partials(float (&sums)[2], float* partials) {
  block_sum<2>(sums);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = sums[0];
    partials[2 * blockIdx.x + 1] = sums[1];
  }
}

// Lists of the moments table: p g m v.
template <typename P, typename G, typename S, bool kAligned>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lamb_moments_kernel(TensorTable table, const float* __restrict__ hyper, const float* grad_sumsq,
                        const float* grad_scale, const float* found_inf, float* __restrict__ partials) {
  if (moments_skipped(found_inf, partials)) return;
  float sums[2] = {0.0f, 0.0f};  // ||p||^2, ||u||^2 of this chunk
  const ChunkView chunk(table);
  const float* h = hyper + chunk.tensor * kLambColumns;
  const float inv_scale = inverse_grad_scale(grad_scale);
  const LambMoments moments(h, global_grad_norm(grad_sumsq, inv_scale));
  const LambUpdate update(h);
  const P* p = chunk.pointer<const P>(table, 0);
  const G* g = chunk.pointer<const G>(table, 1);
  S* m = chunk.pointer<S>(table, 2);
  S* v = chunk.pointer<S>(table, 3);
  [[maybe_unused]] const uint32_t key = rounding_key(h, kLambKeyLo);
  for_each_element<kAligned>(chunk.size, [&](auto count, int64_t i) {
    constexpr int n = decltype(count)::value;
    float param[n], grad[n], exp_avg[n], exp_avg_sq[n];
    load<n>(p, i, param);
    load<n>(g, i, grad);
    load<n>(m, i, exp_avg);
    load<n>(v, i, exp_avg_sq);
#pragma unroll
    for (int k = 0; k < n; ++k) {
      if (grad_scale != nullptr) grad[k] = unscale(grad[k], inv_scale);
      moments(param[k], grad[k], exp_avg[k], exp_avg_sq[k]);  // 1-3.
      if constexpr (std::is_same_v<S, c10::BFloat16>) {  // the values the apply pass will read
        const uint32_t random = element_random(key, chunk.begin + i + k);
        exp_avg[k] = round_bf16_stochastic(exp_avg[k], random & 0xffffU);
        exp_avg_sq[k] = round_bf16_stochastic(exp_avg_sq[k], random >> 16);
      }
      const float u = update(param[k], exp_avg[k], exp_avg_sq[k]);  // 4-5.
      sums[0] += param[k] * param[k];
      sums[1] += u * u;
    }
    store<n>(m, i, exp_avg);
    store<n>(v, i, exp_avg_sq);
  });
  write_partials(sums, partials);
}

// 8-bit states (lists of the moments table: p g m v, m's scales, v's scales): one warp per block of
// kCodeBlock elements takes the block's new scales (warp_absmax) and writes its codes, with stochastic
// rounding; u and its norm come from the decoded codes, the values the apply pass will read. A lane
// holds its 8 elements of p, g, m, v and both codes at once: at least two blocks per SM (at most 128
// registers a thread), under which ptxas allocates them without spills (at four, 36 to 76 bytes spill).
constexpr int kCodesMinBlocksPerSm = 2;

template <typename P, typename G, bool kAligned>
__global__ void __launch_bounds__(kThreads, kCodesMinBlocksPerSm)
    lamb_moments_codes_kernel(TensorTable table, const float* __restrict__ hyper, const float* grad_sumsq,
                              const float* grad_scale, const float* found_inf, float* __restrict__ partials) {
  if (moments_skipped(found_inf, partials)) return;
  float sums[2] = {0.0f, 0.0f};
  const ChunkView chunk(table);
  const float* h = hyper + chunk.tensor * kLambColumns;
  const float inv_scale = inverse_grad_scale(grad_scale);
  const LambMoments moments(h, global_grad_norm(grad_sumsq, inv_scale));
  const LambUpdate update(h);
  const P* p = chunk.pointer<const P>(table, 0);
  const G* g = chunk.pointer<const G>(table, 1);
  int8_t* m = chunk.pointer<int8_t>(table, 2);
  uint8_t* v = chunk.pointer<uint8_t>(table, 3);
  float* m_scales = chunk.scales(table, 4);
  float* v_scales = chunk.scales(table, 5);
  const uint32_t key = rounding_key(h, kLambKeyLo);
  for_each_code_block(chunk.size, [&](int64_t b, int64_t i, int valid) {
    float param[kCodesPerLane], grad[kCodesPerLane], exp_avg[kCodesPerLane], exp_avg_sq[kCodesPerLane];
    int32_t m_codes[kCodesPerLane], v_codes[kCodesPerLane];
    load_lane<kAligned>(p, i, valid, param);
    load_lane<kAligned>(g, i, valid, grad);
    load_code_lane<kAligned>(m, i, valid, m_codes);
    load_code_lane<kAligned>(v, i, valid, v_codes);
    const float m_scale = m_scales[b], v_scale = v_scales[b];
    float m_max = 0.0f, v_max = 0.0f;
#pragma unroll
    for (int k = 0; k < kCodesPerLane; ++k) {
      if (grad_scale != nullptr) grad[k] = unscale(grad[k], inv_scale);
      exp_avg[k] = k < valid ? decode_signed(static_cast<int8_t>(m_codes[k]), m_scale) : 0.0f;
      exp_avg_sq[k] = k < valid ? decode_unsigned(static_cast<uint8_t>(v_codes[k]), v_scale) : 0.0f;
      moments(param[k], grad[k], exp_avg[k], exp_avg_sq[k]);  // 1-3 (0 where no element is)
      m_max = absmax(m_max, exp_avg[k]);
      v_max = absmax(v_max, exp_avg_sq[k]);
    }
    m_max = block_scale(warp_absmax(m_max));
    v_max = block_scale(warp_absmax(v_max));
    if (threadIdx.x % 32 == 0) {
      m_scales[b] = m_max;
      v_scales[b] = v_max;
    }
#pragma unroll
    for (int k = 0; k < kCodesPerLane; ++k) {
      const uint32_t random = element_random(key, chunk.begin + i + k);
      m_codes[k] = encode_signed(exp_avg[k], m_max, (random & 0xffffU) << 4);
      v_codes[k] = encode_unsigned(exp_avg_sq[k], v_max, (random >> 16) << 4);
      if (k < valid) {
        const float u = update(param[k], decode_signed(static_cast<int8_t>(m_codes[k]), m_max),
                               decode_unsigned(static_cast<uint8_t>(v_codes[k]), v_max));  // 4-5.
        sums[0] += param[k] * param[k];
        sums[1] += u * u;
      }
    }
    store_code_lane<kAligned>(m, i, valid, m_codes);
    store_code_lane<kAligned>(v, i, valid, v_codes);
  });
  write_partials(sums, partials);
}

// What both apply kernels start with: the chunk, the step size lr * r (6.), the update (4-5), and the
// chunk's p (list 0) and low-precision copy (list 3, when C is not NoCopy).
template <typename P, typename C>
struct ApplyChunk {
  ChunkView chunk;
  const float* h;
  float step_size;
  LambUpdate update;
  P* p;
  C* copy = nullptr;

  __device__ ApplyChunk(const TensorTable& table, const float* hyper, const float* norms)
      : chunk(table), h(hyper + chunk.tensor * kLambColumns),
        step_size(lamb_step_size(h, norms + 2 * chunk.tensor)), update(h), p(chunk.pointer<P>(table, 0)) {
    if constexpr (kWritesCopy<C>) copy = chunk.pointer<C>(table, 3);
  }
};

// Lists of the apply table with 8-bit states: p m v, the copies when C is not NoCopy, m's and v's
// scales (lists `scales_list` and the next).
template <typename P, typename C, bool kAligned>
__global__ void __launch_bounds__(kThreads, kCodesMinBlocksPerSm)
    lamb_apply_codes_kernel(TensorTable table, const float* __restrict__ hyper, const float* __restrict__ norms,
                            const float* found_inf, int scales_list) {
  if (skips_step(found_inf)) return;
  const ApplyChunk<P, C> a(table, hyper, norms);
  const int8_t* m = a.chunk.template pointer<const int8_t>(table, 1);
  const uint8_t* v = a.chunk.template pointer<const uint8_t>(table, 2);
  const float* m_scales = a.chunk.scales(table, scales_list);
  const float* v_scales = a.chunk.scales(table, scales_list + 1);
  for_each_code_block(a.chunk.size, [&](int64_t b, int64_t i, int valid) {
    float param[kCodesPerLane];
    int32_t m_codes[kCodesPerLane], v_codes[kCodesPerLane];
    load_lane<kAligned>(a.p, i, valid, param);
    load_code_lane<kAligned>(m, i, valid, m_codes);
    load_code_lane<kAligned>(v, i, valid, v_codes);
    const float m_scale = m_scales[b], v_scale = v_scales[b];
#pragma unroll
    for (int k = 0; k < kCodesPerLane; ++k) {
      param[k] = param[k] - a.step_size * a.update(param[k], decode_signed(static_cast<int8_t>(m_codes[k]), m_scale),
                                                   decode_unsigned(static_cast<uint8_t>(v_codes[k]), v_scale));  // 7.
    }
    store_lane<kAligned>(a.p, i, valid, param);
    if constexpr (kWritesCopy<C>) store_lane<kAligned>(a.copy, i, valid, param);
  });
}

// Lists of the apply table: p m v, and the low-precision copies when C is not NoCopy. The new value
// of a param goes to the param and, rounded, to its copy: the fp32 master weight's value.
template <typename P, typename C, typename S, bool kAligned>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lamb_apply_kernel(TensorTable table, const float* __restrict__ hyper, const float* __restrict__ norms,
                      const float* found_inf) {
  if (skips_step(found_inf)) return;
  const ApplyChunk<P, C> a(table, hyper, norms);
  const S* m = a.chunk.template pointer<const S>(table, 1);
  const S* v = a.chunk.template pointer<const S>(table, 2);
  for_each_element<kAligned>(a.chunk.size, [&](auto count, int64_t i) {
    constexpr int n = decltype(count)::value;
    float param[n], exp_avg[n], exp_avg_sq[n];
    load<n>(a.p, i, param);
    load<n>(m, i, exp_avg);
    load<n>(v, i, exp_avg_sq);
#pragma unroll
    for (int k = 0; k < n; ++k) {
      param[k] = param[k] - a.step_size * a.update(param[k], exp_avg[k], exp_avg_sq[k]);  // 7.
    }
    store<n>(a.p, i, param);
    if constexpr (kWritesCopy<C>) store<n>(a.copy, i, param);
  });
}

}  // namespace

at::Tensor lamb_moments_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                             at::TensorList exp_avg_sq_scales, const at::Tensor& hyper,
                             const std::optional<at::Tensor>& grad_sumsq, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, int64_t chunk_size) {
  const char* op = "lamb_moments";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  const at::Device device = hyper.device();
  check_chunk_size(op, chunk_size);
  check_lists(op,
              {{"params", params},
               {"grads", grads},
               {"exp_avgs", exp_avgs, Storage::kState},
               {"exp_avg_sqs", exp_avg_sqs, Storage::kUnsignedState}},
              device);
  check_same_dtype(op, "exp_avg_sqs", exp_avg_sqs, "exp_avgs", exp_avgs);
  check_lamb_scales(op, exp_avgs, exp_avg_scales, exp_avg_sq_scales, chunk_size, device);
  check_table_argument(op, "hyper", hyper, device, n_tensors, kLambColumns);
  const float* sumsq = scalar_pointer(op, "grad_sumsq", grad_sumsq, device);
  const float* scale = scalar_pointer(op, "grad_scale", grad_scale, device);
  const float* found = scalar_pointer(op, "found_inf", found_inf, device);
  if (n_tensors == 0) return at::zeros({0, 2}, hyper.options());
  const c10::cuda::CUDAGuard guard(device);
  const bool codes = !exp_avg_scales.empty();
  const TensorTable table =
      codes ? tensor_table({params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales}, chunk_size)
            : tensor_table({params, grads, exp_avgs, exp_avg_sqs}, chunk_size);
  at::Tensor partials = at::empty({table.n_chunks, 2}, hyper.options());
  if (table.n_chunks > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_element(element_type(params), [&](auto param_type) {
      using P = typename decltype(param_type)::type;
      dispatch_element(element_type(grads), [&](auto grad_type) {
        using G = typename decltype(grad_type)::type;
        dispatch_state(element_type(exp_avgs), [&](auto state_type) {
          using S = typename decltype(state_type)::type;
          dispatch_bool(table.aligned, [&](auto aligned) {
            constexpr bool kAligned = decltype(aligned)::value;
            if constexpr (std::is_same_v<S, int8_t>) {
              lamb_moments_codes_kernel<P, G, kAligned><<<table.n_chunks, kThreads, 0, stream>>>(
                  table, hyper.const_data_ptr<float>(), sumsq, scale, found, partials.mutable_data_ptr<float>());
            } else {
              lamb_moments_kernel<P, G, S, kAligned><<<table.n_chunks, kThreads, 0, stream>>>(
                  table, hyper.const_data_ptr<float>(), sumsq, scale, found, partials.mutable_data_ptr<float>());
            }
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  }
  return per_tensor_sums(partials, table, 2);
}

void lamb_apply_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, const at::Tensor& hyper, const at::Tensor& norms, const std::optional<at::Tensor>& found_inf,
                     at::TensorList copies, int64_t chunk_size) {
  const char* op = "lamb_apply";
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  const at::Device device = hyper.device();
  check_chunk_size(op, chunk_size);
  check_lists(op,
              {{"params", params},
               {"exp_avgs", exp_avgs, Storage::kState},
               {"exp_avg_sqs", exp_avg_sqs, Storage::kUnsignedState}},
              device);
  check_same_dtype(op, "exp_avg_sqs", exp_avg_sqs, "exp_avgs", exp_avgs);
  check_lamb_scales(op, exp_avgs, exp_avg_scales, exp_avg_sq_scales, chunk_size, device);
  check_copies(op, params, copies, device);
  check_table_argument(op, "hyper", hyper, device, n_tensors, kLambColumns);
  check_table_argument(op, "norms", norms, device, n_tensors, 2);
  const float* found = scalar_pointer(op, "found_inf", found_inf, device);
  if (n_tensors == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  // (8-bit states: their scales are the last two lists, after the copies when there are any)
  const bool codes = !exp_avg_scales.empty();
  const TensorTable table =
      copies.empty()
          ? (codes ? tensor_table({params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales}, chunk_size)
                   : tensor_table({params, exp_avgs, exp_avg_sqs}, chunk_size))
          : (codes ? tensor_table({params, exp_avgs, exp_avg_sqs, copies, exp_avg_scales, exp_avg_sq_scales},
                                  chunk_size)
                   : tensor_table({params, exp_avgs, exp_avg_sqs, copies}, chunk_size));
  const int scales_list = copies.empty() ? 3 : 4;
  if (table.n_chunks == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_params_and_copies(params, copies, [&](auto param_type, auto copy_type) {
    using P = typename decltype(param_type)::type;
    using C = typename decltype(copy_type)::type;
    dispatch_state(element_type(exp_avgs), [&](auto state_type) {
      using S = typename decltype(state_type)::type;
      dispatch_bool(table.aligned, [&](auto aligned) {
        constexpr bool kAligned = decltype(aligned)::value;
        if constexpr (std::is_same_v<S, int8_t>) {
          lamb_apply_codes_kernel<P, C, kAligned><<<table.n_chunks, kThreads, 0, stream>>>(
              table, hyper.const_data_ptr<float>(), norms.const_data_ptr<float>(), found, scales_list);
        } else {
          lamb_apply_kernel<P, C, S, kAligned><<<table.n_chunks, kThreads, 0, stream>>>(
              table, hyper.const_data_ptr<float>(), norms.const_data_ptr<float>(), found);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace cuda
}  // namespace lamb_kernels
