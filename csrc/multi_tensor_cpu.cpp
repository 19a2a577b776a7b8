// Per-tensor sums of squares of one or two lists of CPU tensors, in one pass over memory.
#include "multi_tensor_cpu.h"

#include <optional>

namespace lamb_kernels {

at::Tensor sums_of_squares_cpu(at::TensorList tensors, std::optional<at::TensorList> paired, int64_t chunk_size) {
  const int64_t width = paired.has_value() ? 2 : 1;
  if (paired.has_value()) {
    check_lists("sums_of_squares", {{"tensors", tensors}, {"paired", *paired}});
  } else {
    check_lists("sums_of_squares", {{"tensors", tensors}});
  }
  const std::vector<Chunk> chunks = chunk_map(tensors, chunk_size);
  std::vector<float> partials(width * chunks.size());
  const std::vector<const float*> columns[2] = {const_pointers(tensors),
                                                paired.has_value() ? const_pointers(*paired) : std::vector<const float*>{}};
  parallel_over_chunks(chunks, [&](int64_t c, const Chunk& chunk) {
    for (int64_t k = 0; k < width; ++k) {
      partials[width * c + k] = sum_of_squares(columns[k][chunk.tensor] + chunk.begin, chunk.size);
    }
  });
  at::Tensor sums = per_tensor_sums(partials, chunks, static_cast<int64_t>(tensors.size()), width);
  return paired.has_value() ? sums : sums.reshape({-1});
}

}  // namespace lamb_kernels
