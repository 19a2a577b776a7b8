// Multi-tensor machinery for the CPU kernels: the chunk map, the parallel loop over chunks, and
// deterministic sums.
//
// Every tensor of a call is cut into chunks of `chunk_size` elements, and the chunks of all tensors
// are shared out among the threads (ATen's parallel_for, which is OpenMP in PyTorch's CPU builds), so
// one large embedding spreads over every core. A chunk never depends on which thread runs it: its
// partial sums go to its own slot, and the slots of a tensor are added in chunk order afterwards. The
// same inputs and chunk size give the same bits whatever the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
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
inline std::vector<float*> mutable_pointers(at::TensorList tensors) {
  std::vector<float*> pointers;
  for (const at::Tensor& t : tensors) pointers.push_back(t.mutable_data_ptr<float>());
  return pointers;
}

inline std::vector<const float*> const_pointers(at::TensorList tensors) {
  std::vector<const float*> pointers;
  for (const at::Tensor& t : tensors) pointers.push_back(t.const_data_ptr<float>());
  return pointers;
}

// Calls f(chunk_index, chunk) for every chunk, the chunks shared out among torch's threads.
template <typename F>
void parallel_over_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      f(c, chunks[c]);
    }
  });
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

// Sum of squares of x[0:n). The range is walked as kStreams interleaved sub-ranges: a single
// read-only stream leaves a core waiting on memory latency, several keep more loads in flight (about
// 15% faster on a 2-core Zen 3). The order of additions depends on n only.
constexpr int64_t kStreams = 4;

inline float sum_of_squares(const float* __restrict__ x, int64_t n) {
  float acc[kStreams][kLanes] = {};
  const int64_t span = n / (kStreams * kLanes) * kLanes;  // elements per sub-range
  for (int64_t i = 0; i < span; i += kLanes) {
    for (int64_t s = 0; s < kStreams; ++s) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const float e = x[s * span + i + lane];
        acc[s][lane] += e * e;
      }
    }
  }
  for (int64_t i = kStreams * span; i < n; ++i) acc[0][(i - kStreams * span) % kLanes] += x[i] * x[i];
  float total = 0.0f;
  for (int64_t s = 0; s < kStreams; ++s) total += lane_total(acc[s]);
  return total;
}

// Per-chunk partial sums [n_chunks, width] -> per-tensor sums [n_tensors, width], each tensor's
// chunks added in ascending order in double and rounded once (a tensor may have thousands of chunks).
inline at::Tensor per_tensor_sums(const std::vector<float>& partials, const std::vector<Chunk>& chunks,
                                  int64_t n_tensors, int64_t width) {
  std::vector<double> sums(n_tensors * width, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int64_t k = 0; k < width; ++k) {
      sums[chunks[c].tensor * width + k] += partials[c * width + k];
    }
  }
  at::Tensor out = at::empty({n_tensors, width}, at::TensorOptions().dtype(at::kFloat));
  float* data = out.data_ptr<float>();
  for (int64_t i = 0; i < n_tensors * width; ++i) data[i] = static_cast<float>(sums[i]);
  return out;
}

// Checks shared by the ops: CPU float32 tensors, one memory block each, and for every list after the
// first, the sizes and strides of the first list's tensor at the same index (the kernels walk them all
// with one element index).
inline void check_lists(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  const auto& [first_name, first] = *lists.begin();
  for (const auto& [name, list] : lists) {
    TORCH_CHECK(list.size() == first.size(), op, ": ", name, " has ", list.size(), " tensors, ", first_name,
                " has ", first.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(), ", expected cpu");
      TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                  ", expected float32");
      TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", name, "[", i, "] is not dense in memory");
      TORCH_CHECK(t.sizes() == first[i].sizes() && (t.numel() <= 1 || t.strides() == first[i].strides()), op,
                  ": ", name, "[", i, "] has sizes ", t.sizes(), " and strides ", t.strides(), ", but ",
                  first_name, "[", i, "] has ", first[i].sizes(), " and ", first[i].strides());
    }
  }
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
