// Multi-tensor machinery of the CUDA operators, device side: which chunk a block runs, loads and
// stores of one element or of a pack of kPack elements, and a fixed-order block sum.
//
// Loads convert to fp32 and stores round to the nearest even (c10's BFloat16 and Half), as on the
// CPU. The vectorized path moves each list's pack with 128-bit accesses (two for fp32, one for
// 16-bit types); the host chooses it per launch when every pointer is 16-byte aligned, and chunks
// start at multiples of kPack elements, so every pack is aligned too.
#pragma once

#include "../optimizer_math.h"
#include "multi_tensor.h"

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace lamb_kernels {
namespace cuda {

// The chunk this block runs: its tensor, its first element in the tensor, its length.
struct ChunkView {
  int64_t tensor, begin, size;

  __device__ explicit ChunkView(const TensorTable& table) {
    const int64_t chunk = blockIdx.x;
    const int64_t* numels = table.data + table.n_lists * table.n_tensors;
    const int64_t* first_chunk = numels + table.n_tensors;
    const int64_t* chunk_tensor = first_chunk + table.n_tensors + 1;
    tensor = chunk_tensor[chunk];
    begin = (chunk - first_chunk[tensor]) * table.chunk_size;
    const int64_t rest = numels[tensor] - begin;
    size = rest < table.chunk_size ? rest : table.chunk_size;
  }

  // Whether the chunk's tensor in list `list` has memory (a placeholder has none).
  __device__ bool has_memory(const TensorTable& table, int list) const {
    return table.data[list * table.n_tensors + tensor] != 0;
  }

  // The scale of the chunk's first block of 8-bit codes, in list `list` (block scales, float32).
  __device__ float* scales(const TensorTable& table, int list) const {
    return reinterpret_cast<float*>(table.data[list * table.n_tensors + tensor]) + begin / kCodeBlock;
  }

  // The chunk's first element in list `list` of the table, as a T*.
  template <typename T>
  __device__ T* pointer(const TensorTable& table, int list) const {
    return reinterpret_cast<T*>(table.data[list * table.n_tensors + tensor]) + begin;
  }
};

// An element's value from its bits, and its bits from a value rounded to the nearest even.
template <typename T>
__device__ __forceinline__ float from_bits(uint32_t bits) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(bits);
  } else {
    return static_cast<float>(T(static_cast<uint16_t>(bits), T::from_bits()));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t to_bits(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(value);
  } else {
    return static_cast<T>(value).x;
  }
}

// The bits of one element as the global-memory intrinsics take them.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, unsigned int, unsigned short>;

// kCount elements from x[i]: one scalar access, or a pack through 128-bit accesses (each a uint4,
// unpacked with bit operations, so the compiler keeps the access whole). The pointers come from the
// table as integers, so the compiler cannot tell they are global: the intrinsics say so (ld.global,
// cached in L2 only: every element is read once).
template <int kCount, typename T>
__device__ __forceinline__ void load(const T* x, int64_t i, float (&out)[kCount]) {
  if constexpr (kCount == 1) {
    out[0] = from_bits<T>(__ldcg(reinterpret_cast<const Bits<T>*>(x + i)));
  } else {
    static_assert(kCount * sizeof(T) % 16 == 0, "a pack is whole 128-bit words");
    constexpr int kPerWord = 4 / sizeof(T);  // elements per 32-bit part of a word
    const uint4* words = reinterpret_cast<const uint4*>(x + i);
#pragma unroll
    for (int w = 0; w < kCount / (4 * kPerWord); ++w) {
      const uint4 word = __ldcg(words + w);
      const uint32_t parts[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
      for (int k = 0; k < 4 * kPerWord; ++k) {
        const uint32_t part = parts[k / kPerWord];
        out[w * 4 * kPerWord + k] = from_bits<T>(kPerWord == 1 ? part : (k % 2 == 0 ? part & 0xffffu : part >> 16));
      }
    }
  }
}

template <int kCount, typename T>
__device__ __forceinline__ void store(T* x, int64_t i, const float (&values)[kCount]) {
  if constexpr (kCount == 1) {
    __stcg(reinterpret_cast<Bits<T>*>(x + i), static_cast<Bits<T>>(to_bits<T>(values[0])));
  } else {
    constexpr int kPerWord = 4 / sizeof(T);
    uint4* words = reinterpret_cast<uint4*>(x + i);
#pragma unroll
    for (int w = 0; w < kCount / (4 * kPerWord); ++w) {
      uint32_t parts[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float* v = values + w * 4 * kPerWord + k * kPerWord;
        parts[k] = kPerWord == 1 ? to_bits<T>(v[0]) : (to_bits<T>(v[0]) | (to_bits<T>(v[kPerWord - 1]) << 16));
      }
      __stcg(words + w, make_uint4(parts[0], parts[1], parts[2], parts[3]));
    }
  }
}

// Calls body(Count<k>{}, i) over the chunk's n elements: packs of kPack from i = kPack * thread
// (when kAligned), then single elements for the rest. Which thread handles which element depends
// only on n, so each thread's partial sums, and the block's, are the same on every run.
template <int kCount>
struct Count {
  static constexpr int value = kCount;
};

template <bool kAligned, typename Body>
__device__ __forceinline__ void for_each_element(int64_t n, Body&& body) {
  int64_t packed = 0;
  if constexpr (kAligned) {
    packed = n / kPack * kPack;
    for (int64_t i = int64_t(threadIdx.x) * kPack; i < packed; i += int64_t(kThreads) * kPack) body(Count<kPack>{}, i);
  }
  for (int64_t i = packed + threadIdx.x; i < n; i += kThreads) body(Count<1>{}, i);
}

// The sum of each of kWidth values over the block, in a fixed order (a shuffle tree in each warp,
// then the warps' sums in order); the result is in thread 0. No atomics: the same bits every run.
template <int kWidth, typename Acc>
__device__ __forceinline__ void block_sum(Acc (&values)[kWidth]) {
  __shared__ Acc warp_sums[kThreads / 32][kWidth];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) values[k] += __shfl_down_sync(0xffffffffu, values[k], offset);
    if (lane == 0) warp_sums[warp][k] = values[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      Acc total = warp_sums[0][k];
      for (int w = 1; w < kThreads / 32; ++w) total += warp_sums[w][k];
      values[k] = total;
    }
  }
}

// -- 8-bit states (optimizer_math.h): one warp per block of kCodeBlock elements, 8 per lane --------

constexpr int kCodesPerLane = static_cast<int>(kCodeBlock) / 32;

// The largest magnitude over the warp, in every lane (a NaN kept: the same in every lane, whatever
// the order, as the maximum is exact).
__device__ __forceinline__ float warp_absmax(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = absmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// A lane's kCodesPerLane elements from x[i]: `valid` of them exist (the rest read as 0), a whole,
// aligned pack through 128-bit loads.
template <bool kAligned, typename T>
__device__ __forceinline__ void load_lane(const T* x, int64_t i, int valid, float (&out)[kCodesPerLane]) {
  if (kAligned && valid == kCodesPerLane) {
    load<kCodesPerLane>(x, i, out);
    return;
  }
#pragma unroll
  for (int k = 0; k < kCodesPerLane; ++k) {
    float one[1] = {0.0f};
    if (k < valid) load<1>(x, i + k, one);
    out[k] = one[0];
  }
}

template <bool kAligned, typename T>
__device__ __forceinline__ void store_lane(T* x, int64_t i, int valid, const float (&values)[kCodesPerLane]) {
  if (kAligned && valid == kCodesPerLane) {
    store<kCodesPerLane>(x, i, values);
    return;
  }
#pragma unroll
  for (int k = 0; k < kCodesPerLane; ++k) {
    if (k < valid) {
      const float one[1] = {values[k]};
      store<1>(x, i + k, one);
    }
  }
}

// A lane's codes (int8_t or uint8_t) as int32, 0 where they do not exist; a whole aligned pack is one
// 64-bit load.
template <bool kAligned, typename T>
__device__ __forceinline__ void load_code_lane(const T* x, int64_t i, int valid, int32_t (&out)[kCodesPerLane]) {
  if (kAligned && valid == kCodesPerLane) {
    const uint2 word = __ldcg(reinterpret_cast<const uint2*>(x + i));
#pragma unroll
    for (int k = 0; k < kCodesPerLane; ++k) {
      const uint32_t byte = ((k < 4 ? word.x : word.y) >> (8 * (k % 4))) & 0xffu;
      out[k] = std::is_same_v<T, int8_t> ? static_cast<int32_t>(static_cast<int8_t>(byte)) : static_cast<int32_t>(byte);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kCodesPerLane; ++k) out[k] = k < valid ? static_cast<int32_t>(x[i + k]) : 0;
}

template <bool kAligned, typename T>
__device__ __forceinline__ void store_code_lane(T* x, int64_t i, int valid, const int32_t (&codes)[kCodesPerLane]) {
  if (kAligned && valid == kCodesPerLane) {
    uint32_t low = 0, high = 0;
#pragma unroll
    for (int k = 0; k < kCodesPerLane; ++k) {
      const uint32_t byte = static_cast<uint32_t>(codes[k]) & 0xffu;
      if (k < 4) {
        low |= byte << (8 * k);
      } else {
        high |= byte << (8 * (k - 4));
      }
    }
    __stcg(reinterpret_cast<uint2*>(x + i), make_uint2(low, high));
    return;
  }
#pragma unroll
  for (int k = 0; k < kCodesPerLane; ++k) {
    if (k < valid) x[i + k] = static_cast<T>(codes[k]);
  }
}

// Calls body(block, i, valid) for each block of kCodeBlock elements of a chunk of n elements, one warp
// per block: i is the lane's first element, `valid` how many of its kCodesPerLane exist. Every lane of
// a warp takes the same blocks (the warp's shuffles need them all).
template <typename Body>
__device__ __forceinline__ void for_each_code_block(int64_t n, Body&& body) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t blocks = (n + kCodeBlock - 1) / kCodeBlock;
  for (int64_t b = warp; b < blocks; b += kThreads / 32) {
    const int64_t i = b * kCodeBlock + int64_t(lane) * kCodesPerLane;
    const int64_t left = n - i;
    body(b, i, left <= 0 ? 0 : left < kCodesPerLane ? static_cast<int>(left) : kCodesPerLane);
  }
}

// A GradScaler's found_inf, read on the device: nonzero (a NaN too) means nothing is written.
__device__ __forceinline__ bool skips_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// 1 / grad_scale (one IEEE division), or 1 without a scale.
__device__ __forceinline__ float inverse_grad_scale(const float* grad_scale) {
  return grad_scale != nullptr ? divide(1.0f, *grad_scale) : 1.0f;
}

// The loss scale's product, never fused into a following add: with a power-of-two scale it is exact
// and a scaled step has the bits of an unscaled one.
__device__ __forceinline__ float unscale(float grad, float inv_scale) { return __fmul_rn(grad, inv_scale); }

}  // namespace cuda
}  // namespace lamb_kernels
