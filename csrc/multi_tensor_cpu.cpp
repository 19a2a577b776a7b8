// Per-tensor sums of squares of one or two lists of CPU tensors, in one pass over memory.
#include "multi_tensor_cpu.h"

#include <optional>

namespace lamb_kernels {
namespace {

// One list's sums: its pointers, and sum_of_squares instantiated for its element type. The two lists
// may differ in type (fp32 master weights with bf16 grads); an indirect call per chunk costs nothing
// next to the chunk's elements, where a kernel per pair of types would compile nine.
struct SquaresColumn {
  std::vector<const void*> data;
  float (*sum)(const void* data, int64_t begin, int64_t n) = nullptr;
};

template <typename T>
float chunk_sum_of_squares(const void* data, int64_t begin, int64_t n) {
  return sum_of_squares(static_cast<const T*>(data) + begin, n);
}

SquaresColumn squares_column(at::TensorList tensors) {
  SquaresColumn column;
  dispatch_element(element_type(tensors), [&](auto type) {
    using T = typename decltype(type)::type;
    for (const T* pointer : const_pointers<T>(tensors)) column.data.push_back(pointer);
    column.sum = &chunk_sum_of_squares<T>;
  });
  return column;
}

}  // namespace

ChunkTask sums_of_squares_task(at::TensorList tensors, std::optional<at::TensorList> paired, float* partials) {
  const int64_t width = paired.has_value() ? 2 : 1;
  const SquaresColumn first = squares_column(tensors);
  const SquaresColumn second = paired.has_value() ? squares_column(*paired) : SquaresColumn{};
  return [=](int64_t c, const Chunk& chunk) {
    partials[width * c] = first.sum(first.data[chunk.tensor], chunk.begin, chunk.size);
    if (width == 2) partials[width * c + 1] = second.sum(second.data[chunk.tensor], chunk.begin, chunk.size);
  };
}

at::Tensor sums_of_squares_cpu(at::TensorList tensors, std::optional<at::TensorList> paired, int64_t chunk_size) {
  const int64_t width = paired.has_value() ? 2 : 1;
  if (paired.has_value()) {
    check_lists("sums_of_squares", {{"tensors", tensors}, {"paired", *paired}});
  } else {
    check_lists("sums_of_squares", {{"tensors", tensors}});
  }
  const std::vector<Chunk> chunks = chunk_map(tensors, chunk_size);
  std::vector<float> partials(width * chunks.size());
  parallel_over_chunks(chunks, sums_of_squares_task(tensors, paired, partials.data()));
  at::Tensor sums = per_tensor_sums(partials, chunks, static_cast<int64_t>(tensors.size()), width);
  return paired.has_value() ? sums : sums.reshape({-1});
}

}  // namespace lamb_kernels
