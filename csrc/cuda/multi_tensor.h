// Multi-tensor machinery of the CUDA operators, host side: the launch tables and the checks.
//
// Every tensor of a call is cut into chunks of `chunk_size` elements and one thread block runs one
// chunk, so one launch covers every tensor of a bucket whatever their number. Which chunk belongs to
// which tensor, and where each tensor's elements are, is a table in device memory:
//
//   int64 [n_lists * n_tensors]  data pointers, list by list (0 for a tensor with no elements)
//   int64 [n_tensors]            elements per tensor
//   int64 [n_tensors + 1]        index of each tensor's first chunk (the last entry: n_chunks)
//   int64 [n_chunks]             the tensor of each chunk
//
// A table is built on the host, uploaded once through pinned memory, and kept (up to kTablesKept of
// them, and always those used while a CUDA graph was captured) while the same tensors, at the same
// addresses and sizes, come back: a steady training loop, or a CUDA graph captured after a warm-up
// step, copies nothing from the host. A table is uploaded on the stream of its first use, which
// later uses are expected to share (an optimizer steps on one stream).
#pragma once

#include "../multi_tensor.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

namespace lamb_kernels {
namespace cuda {

constexpr int kThreads = 256;  // threads per block; a block runs one chunk
// The LAMB kernels' occupancy: at least four blocks resident per SM (at most 64 registers a thread),
// the bound under which ptxas allocates their fp16 variants on sm_80 without spills. The other
// kernels set their own (sums_of_squares.cu, lars.cu).
constexpr int kMinBlocksPerSm = 4;
constexpr int kPack = 8;       // elements per thread and iteration on the vectorized path
constexpr int kTablesKept = 64;

// What a kernel needs of a table: passed by value as a kernel argument.
struct TensorTable {
  const int64_t* data = nullptr;  // device memory, laid out as above
  int64_t n_lists = 0, n_tensors = 0, n_chunks = 0, chunk_size = 0;
  bool aligned = false;  // every pointer 16-byte aligned: the kernels may use 128-bit loads and stores
};

// The table of `lists` (each with one tensor per index, the same sizes across lists), cached.
TensorTable tensor_table(std::initializer_list<at::TensorList> lists, int64_t chunk_size);

// Per-tensor sums [n_tensors, width] of per-chunk partial sums [n_chunks, width]: each tensor's
// chunks added in ascending order, in double, rounded once (sums_of_squares.cu).
at::Tensor per_tensor_sums(const at::Tensor& partials, const TensorTable& table, int64_t width);

// A one-element float32 tensor on `device`, or none: its device pointer (the kernels read the
// value, so no host sync), or nullptr.
const float* scalar_pointer(const char* op, const char* name, const std::optional<at::Tensor>& t, at::Device device);

// A contiguous float32 [rows, width] tensor on `device`.
void check_table_argument(const char* op, const char* name, const at::Tensor& t, at::Device device, int64_t rows,
                          int64_t width);

// Whether a launch may use the vectorized path: 16-byte aligned pointers and whole packs per chunk.
void check_chunk_size(const char* op, int64_t chunk_size);

}  // namespace cuda
}  // namespace lamb_kernels
