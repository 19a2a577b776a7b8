// Multi-tensor machinery for the CPU kernels: the chunk map, the parallel loop over chunks,
// deterministic sums, and the element types.
//
// Every tensor of a call is cut into chunks of `chunk_size` elements, and the chunks of all tensors
// are shared out among the threads (ATen's parallel_for, which is OpenMP in PyTorch's CPU builds), so
// one large embedding spreads over every core. A chunk never depends on which thread runs it: its
// partial sums go to its own slot, and the slots of a tensor are added in chunk order afterwards. The
// same inputs and chunk size give the same bits whatever the thread count.
#pragma once

#include "multi_tensor.h"
#include "optimizer_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

namespace lamb_kernels {

// Independent accumulators per sum. A fixed-width array of lanes, rather than one scalar, lets the
// compiler vectorise a reduction without reassociating floating point (each lane is an ordinary
// sequential sum), and makes the result independent of the vector width of the machine.
constexpr int64_t kLanes = 16;

struct Chunk {
  int64_t tensor;  // index into the call's tensor lists
  int64_t begin;   // first element of the chunk inside the tensor
  int64_t size;    // elements in the chunk, 1 to chunk_size
};

inline std::vector<Chunk> chunk_map(at::TensorList tensors, int64_t chunk_size) {
  TORCH_CHECK(chunk_size > 0 && chunk_size % kLanes == 0, "chunk_size must be a positive multiple of ",
              kLanes, ", got ", chunk_size);
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t begin = 0; begin < n; begin += chunk_size) {
      chunks.push_back({t, begin, std::min(chunk_size, n - begin)});
    }
  }
  return chunks;
}

// The tensors' data pointers, taken before the parallel loop: a tensor's storage must not be touched
// from inside it (a copy-on-write storage would materialise there), and a pointer is cheaper to index.
template <typename T = float>
std::vector<T*> mutable_pointers(at::TensorList tensors) {
  std::vector<T*> pointers;
  for (const at::Tensor& t : tensors) pointers.push_back(t.mutable_data_ptr<T>());
  return pointers;
}

template <typename T = float>
std::vector<const T*> const_pointers(at::TensorList tensors) {
  std::vector<const T*> pointers;
  for (const at::Tensor& t : tensors) pointers.push_back(t.const_data_ptr<T>());
  return pointers;
}

// The copies' pointers; none for NoCopy (the kernels then never index them).
template <typename C>
std::vector<C*> copy_pointers(at::TensorList copies) {
  if constexpr (kWritesCopy<C>) {
    return mutable_pointers<C>(copies);
  } else {
    return {};
  }
}

// The work of one pass on one chunk: task(chunk_index, chunk). Built once per call, after the
// dispatch on element types, so that one schedule (below) runs the passes of any types.
using ChunkTask = std::function<void(int64_t, const Chunk&)>;

// Chunks [first, last) of a chunk map.
struct ChunkRange {
  int64_t first, last;
};

// Calls f(chunk_index, chunk) for every chunk of `range`, the chunks shared out among torch's threads:
// each thread takes one run of consecutive chunks, the same run for the same range and thread count
// (at::parallel_for's static split), so a second pass over a range finds each thread's chunks in its
// own caches. `reverse`: each thread walks its run from the last chunk back, starting with the chunks
// it touched last in the pass before, those most likely still in cache.
template <typename F>
void parallel_over_range(const std::vector<Chunk>& chunks, ChunkRange range, bool reverse, const F& f) {
  at::parallel_for(range.first, range.last, 1, [&](int64_t first, int64_t last) {
    if (reverse) {
      for (int64_t c = last - 1; c >= first; --c) f(c, chunks[c]);
    } else {
      for (int64_t c = first; c < last; ++c) f(c, chunks[c]);
    }
  });
}

template <typename F>
void parallel_over_chunks(const std::vector<Chunk>& chunks, const F& f) {
  parallel_over_range(chunks, {0, static_cast<int64_t>(chunks.size())}, false, f);
}

// The cache-aware schedule (docs/benchmark.md, "The schedule"): the tensors of a call in groups of
// consecutive tensors, each group's bytes (over `lists`, the lists its passes read) at most
// `cache_bytes`, or one tensor alone when it is larger; as ranges of the chunk map, whose chunks are
// in tensor order. A step runs its first pass on a group, then its second on the same group while
// the group's tensors are still in the last-level cache, and only then goes to the next group.
inline std::vector<ChunkRange> cache_groups(const std::vector<Chunk>& chunks,
                                            std::initializer_list<at::TensorList> lists, int64_t cache_bytes) {
  std::vector<ChunkRange> groups;
  int64_t bytes = 0, tensor = -1;
  for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c) {
    if (chunks[c].tensor == tensor) {
      groups.back().last = c + 1;
      continue;
    }
    tensor = chunks[c].tensor;
    int64_t own = 0;
    for (const at::TensorList& list : lists) own += list[tensor].numel() * list[tensor].element_size();
    if (groups.empty() || bytes + own > cache_bytes) {
      groups.push_back({c, c + 1});
      bytes = own;
    } else {
      groups.back().last = c + 1;
      bytes += own;
    }
  }
  return groups;
}

// The lanes added pairwise in a fixed order.
inline float lane_total(const float* lanes) {
  float pairs[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) pairs[i] = lanes[i];
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t i = 0; i < width; ++i) pairs[i] += pairs[i + width];
  }
  return pairs[0];
}

// Calls f(i, lane) for i in [0, n): kLanes at a time (an inner loop of fixed length, which the
// compiler vectorizes), lane = i % kLanes, then the rest.
template <typename F>
inline void for_each_lane(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) f(i + lane, lane);
  }
  for (int64_t lane = 0; i + lane < n; ++lane) f(i + lane, lane);
}

// The cache-aware schedule's loop: per group, `first` on its chunks (none when `first` is empty), then
// `between(group)` on the calling thread (the group's norms), then `second` on its chunks, each
// thread's run in reverse.
template <typename Between>
void run_in_cache_groups(const std::vector<Chunk>& chunks, const std::vector<ChunkRange>& groups,
                         const ChunkTask& first, const Between& between, const ChunkTask& second) {
  for (const ChunkRange& group : groups) {
    if (first) parallel_over_range(chunks, group, false, first);
    between(group);
    parallel_over_range(chunks, group, true, second);
  }
}

// The largest magnitude of x[0:n), NaN when one is NaN (as torch's amax). The maximum of the bit
// patterns with the sign cleared: for magnitudes the order of the patterns is the order of the
// values, and every NaN's pattern is above infinity's; an integer maximum, which vectorizes (a
// float one with NaN checks does not).
inline float block_absmax(const float* __restrict__ x, int64_t n) {
  uint32_t largest[kLanes] = {};
  for_each_lane(n, [&](int64_t i, int64_t lane) {
    const uint32_t bits = float_bits(x[i]) & 0x7fffffffU;
    largest[lane] = bits > largest[lane] ? bits : largest[lane];
  });
  uint32_t result = 0;
  for (int64_t lane = 0; lane < kLanes; ++lane) result = largest[lane] > result ? largest[lane] : result;
  return result > 0x7f800000U ? std::nanf("") : bits_float(result);
}

// Sum of squares of x[0:n). The range is walked as kStreams interleaved sub-ranges: a single
// read-only stream leaves a core waiting on memory latency, several keep more loads in flight (about
// 15% faster on a 2-core Zen 3). The order of additions depends on n only.
constexpr int64_t kStreams = 4;

template <typename T>
float sum_of_squares(const T* __restrict__ x, int64_t n) {
  float acc[kStreams][kLanes] = {};
  const int64_t span = n / (kStreams * kLanes) * kLanes;  // elements per sub-range
  for (int64_t i = 0; i < span; i += kLanes) {
    for (int64_t s = 0; s < kStreams; ++s) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const float e = static_cast<float>(x[s * span + i + lane]);
        acc[s][lane] += e * e;
      }
    }
  }
  for (int64_t i = kStreams * span; i < n; ++i) {
    const float e = static_cast<float>(x[i]);
    acc[0][(i - kStreams * span) % kLanes] += e * e;
  }
  float total = 0.0f;
  for (int64_t s = 0; s < kStreams; ++s) total += lane_total(acc[s]);
  return total;
}

// Per-chunk partial sums [n_chunks, width] -> per-tensor sums [n_tensors, width], each tensor's
// chunks added in ascending order in double and rounded once (a tensor may have thousands of chunks).
// The same for the tensors of a range of whole tensors, into out[tensor * width + k]: the sums of the
// cache-aware schedule, which has the bits of the streaming passes'.
inline void range_sums(const std::vector<float>& partials, const std::vector<Chunk>& chunks, ChunkRange range,
                       int64_t width, float* out) {
  if (range.first == range.last) return;
  const int64_t first_tensor = chunks[range.first].tensor;
  std::vector<double> sums((chunks[range.last - 1].tensor - first_tensor + 1) * width, 0.0);
  for (int64_t c = range.first; c < range.last; ++c) {
    for (int64_t k = 0; k < width; ++k) {
      sums[(chunks[c].tensor - first_tensor) * width + k] += partials[c * width + k];
    }
  }
  for (size_t i = 0; i < sums.size(); ++i) out[first_tensor * width + static_cast<int64_t>(i)] = static_cast<float>(sums[i]);
}

inline at::Tensor per_tensor_sums(const std::vector<float>& partials, const std::vector<Chunk>& chunks,
                                  int64_t n_tensors, int64_t width) {
  at::Tensor out = at::zeros({n_tensors, width}, at::TensorOptions().dtype(at::kFloat));
  range_sums(partials, chunks, {0, static_cast<int64_t>(chunks.size())}, width, out.data_ptr<float>());
  return out;
}

// The task of sums_of_squares (multi_tensor_cpu.cpp): chunk c's sum of squares of `tensors` into
// partials[c], or with `paired` its two sums into partials[2c], partials[2c + 1].
ChunkTask sums_of_squares_task(at::TensorList tensors, std::optional<at::TensorList> paired, float* partials);

// The value of an optional one-element CPU float32 tensor (grad_sumsq, grad_scale, found_inf), read
// once per call, before the parallel loop.
inline std::optional<float> read_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device().is_cpu(), op, ": ", name,
              " must be a one-element CPU float32 tensor, got ", t->sizes(), " ", t->scalar_type(), " on ",
              t->device());
  return t->item<float>();
}

// grad_scale: the grads arrive multiplied by it (a GradScaler's loss scale). Its inverse, one fp32
// division, multiplies every grad element and every grad norm; 1 without a scale (the element loops
// then skip the product at compile time; the per-tensor norms keep it, a product by 1.0f is exact).
inline float inverse_grad_scale(const char* op, const std::optional<at::Tensor>& grad_scale) {
  const std::optional<float> scale = read_scalar(op, "grad_scale", grad_scale);
  return scale.has_value() ? 1.0f / *scale : 1.0f;
}

// found_inf nonzero (a NaN too): the grads overflowed under the loss scale, and the op writes nothing.
inline bool skips_step(const char* op, const std::optional<at::Tensor>& found_inf) {
  const std::optional<float> value = read_scalar(op, "found_inf", found_inf);
  return value.has_value() && *value != 0.0f;
}

inline void check_hyper(const char* op, const at::Tensor& hyper, int64_t n_tensors, int64_t width) {
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kFloat && hyper.is_contiguous() &&
                  hyper.dim() == 2 && hyper.size(0) == n_tensors && hyper.size(1) == width,
              op, ": hyper must be a contiguous CPU float32 tensor of shape [", n_tensors, ", ", width,
              "], got ", hyper.sizes(), " ", hyper.scalar_type(), " on ", hyper.device());
}

inline void check_norms(const char* op, const at::Tensor& norms, int64_t n_tensors) {
  TORCH_CHECK(norms.device().is_cpu() && norms.scalar_type() == at::kFloat && norms.is_contiguous() &&
                  norms.dim() == 2 && norms.size(0) == n_tensors && norms.size(1) == 2,
              op, ": norms must be a contiguous CPU float32 tensor of shape [", n_tensors, ", 2], got ",
              norms.sizes(), " ", norms.scalar_type(), " on ", norms.device());
}

}  // namespace lamb_kernels
