// Per-tensor sums of squares of one or two lists of CUDA tensors, in one pass over memory (the
// global grad norm of LAMB; ||p||^2 and ||g||^2 of LARS), and the per-tensor sums of per-chunk
// partials that every norm stage ends with.
//
// Two launches: one block per chunk writes the chunk's partial sums, then one block per tensor adds
// its chunks' partials in ascending order. Neither uses atomics, so the bits never change.
#include "kernels.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

namespace lamb_kernels {
namespace cuda {
namespace {

// Two lists in packs of eight: at least three blocks per SM (at most 80 registers a thread), the
// tightest bound under which ptxas allocates every variant without spills (four spills one on sm_80).
constexpr int kSumsMinBlocksPerSm = 3;

// kWidth columns: column k of the table holds the list whose squares go to partials[chunk][k].
template <typename A, typename B, int kWidth, bool kAligned>
__global__ void __launch_bounds__(kThreads, kSumsMinBlocksPerSm) chunk_sums_kernel(TensorTable table, float* __restrict__ partials) {
  const ChunkView chunk(table);
  const A* a = chunk.pointer<const A>(table, 0);
  const B* b = kWidth == 2 ? chunk.pointer<const B>(table, 1) : nullptr;
  float sums[kWidth] = {};
  for_each_element<kAligned>(chunk.size, [&](auto count, int64_t i) {
    constexpr int n = decltype(count)::value;
    float x[n];
    load<n>(a, i, x);
#pragma unroll
    for (int k = 0; k < n; ++k) sums[0] += x[k] * x[k];
    if constexpr (kWidth == 2) {
      load<n>(b, i, x);
#pragma unroll
      for (int k = 0; k < n; ++k) sums[kWidth - 1] += x[k] * x[k];
    }
  });
  block_sum<kWidth>(sums);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) partials[blockIdx.x * kWidth + k] = sums[k];
  }
}

// One block per tensor: thread j adds chunks j, j + kThreads, ... of the tensor in double, then the
// block adds the threads' sums in a fixed order; rounded once to fp32.
__global__ void __launch_bounds__(kThreads, kSumsMinBlocksPerSm)
    per_tensor_sums_kernel(TensorTable table, const float* __restrict__ partials, int64_t width, float* __restrict__ out) {
  const int64_t tensor = blockIdx.x;
  const int64_t* first_chunk = table.data + table.n_lists * table.n_tensors + table.n_tensors;
  const int64_t begin = first_chunk[tensor], end = first_chunk[tensor + 1];
  for (int64_t k = 0; k < width; ++k) {
    double total[1] = {0.0};
    for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) total[0] += partials[c * width + k];
    block_sum<1>(total);
    if (threadIdx.x == 0) out[tensor * width + k] = static_cast<float>(total[0]);
    __syncthreads();  // block_sum's shared memory is reused by the next column
  }
}

}  // namespace

at::Tensor per_tensor_sums(const at::Tensor& partials, const TensorTable& table, int64_t width) {
  at::Tensor out = at::empty({table.n_tensors, width}, partials.options());
  if (table.n_tensors == 0) return out;
  per_tensor_sums_kernel<<<table.n_tensors, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      table, partials.const_data_ptr<float>(), width, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sums_of_squares_cuda(at::TensorList tensors, std::optional<at::TensorList> paired, int64_t chunk_size) {
  const char* op = "sums_of_squares";
  const int64_t width = paired.has_value() ? 2 : 1;
  check_chunk_size(op, chunk_size);
  TORCH_CHECK(!tensors.empty(), op, ": tensors is empty");
  const at::Device device = tensors[0].device();
  if (paired.has_value()) {
    check_lists(op, {{"tensors", tensors}, {"paired", *paired}}, device);
  } else {
    check_lists(op, {{"tensors", tensors}}, device);
  }
  const c10::cuda::CUDAGuard guard(device);
  const TensorTable table = paired.has_value() ? tensor_table({tensors, *paired}, chunk_size)
                                               : tensor_table({tensors}, chunk_size);
  at::Tensor partials = at::empty({table.n_chunks, width}, tensors[0].options().dtype(at::kFloat));
  if (table.n_chunks > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    float* out = partials.mutable_data_ptr<float>();
    dispatch_element(element_type(tensors), [&](auto a_type) {
      using A = typename decltype(a_type)::type;
      dispatch_element(paired.has_value() ? element_type(*paired) : at::kFloat, [&](auto b_type) {
        using B = typename decltype(b_type)::type;
        dispatch_bool(table.aligned, [&](auto aligned) {
          constexpr bool kAligned = decltype(aligned)::value;
          if (width == 2) {
            chunk_sums_kernel<A, B, 2, kAligned><<<table.n_chunks, kThreads, 0, stream>>>(table, out);
          } else if constexpr (std::is_same_v<B, float>) {  // one column: the second type is unused
            chunk_sums_kernel<A, B, 1, kAligned><<<table.n_chunks, kThreads, 0, stream>>>(table, out);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  at::Tensor sums = per_tensor_sums(partials, table, width);
  return paired.has_value() ? sums : sums.reshape({-1});
}

}  // namespace cuda
}  // namespace lamb_kernels
