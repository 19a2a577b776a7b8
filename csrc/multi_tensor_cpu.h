// Multi-tensor machinery for the CPU kernels: the chunk map, the parallel loop over chunks,
// deterministic sums, and the element types.
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

// Element types. params and grads (and the lists of sums_of_squares) may be stored as float32,
// bfloat16 or float16, each list in one dtype of its own (fp32 master weights with bf16 grads, say);
// optimizer states stay float32. Arithmetic is fp32 whatever the storage: an element is converted with
// static_cast<float> on load, and a result is stored with static_cast<T>(float), which c10 rounds to
// the nearest even. For float both casts are no-ops, so the fp32 instantiation of a kernel is the
// loop it was before the kernels took other types.
template <typename T>
struct Element {
  using type = T;
};

// The element type of `copies` when there are none: the kernels test for it at compile time, so the
// fp32 loop without copies has no store and no branch for them.
struct NoCopy {};

template <typename C>
constexpr bool kWritesCopy = !std::is_same_v<C, NoCopy>;

// A list's dtype (check_lists has made it uniform); an empty list has no chunks, any type serves.
inline at::ScalarType element_type(at::TensorList tensors) {
  return tensors.empty() ? at::kFloat : tensors[0].scalar_type();
}

// Calls f(Element<T>{}) with T the C++ type of `dtype`: float, at::BFloat16 or at::Half.
template <typename F>
void dispatch_element(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(Element<float>{});
      break;
    case at::kBFloat16:
      f(Element<at::BFloat16>{});
      break;
    case at::kHalf:
      f(Element<at::Half>{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "dtype ", dtype, " passed check_lists");
  }
}

// Calls f(Element<P>{}, Element<C>{}) for params of type P and copies of type C (NoCopy when there are
// none). check_copies allows copies only with float32 params, so only those types are instantiated.
template <typename F>
void dispatch_params_and_copies(at::TensorList params, at::TensorList copies, const F& f) {
  dispatch_element(element_type(params), [&](auto param_type) {
    using P = typename decltype(param_type)::type;
    if constexpr (std::is_same_v<P, float>) {
      if (copies.empty()) {
        f(param_type, Element<NoCopy>{});
      } else if (element_type(copies) == at::kBFloat16) {
        f(param_type, Element<at::BFloat16>{});
      } else {
        f(param_type, Element<at::Half>{});
      }
    } else {
      f(param_type, Element<NoCopy>{});
    }
  });
}

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime choice made a template argument, so
// that a loop without it has no trace of it (the grad scale: no product by 1 in the fp32 loop).
template <typename F>
void dispatch_bool(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
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

// What a list may hold: float32 only (optimizer states, buffers); float32, bfloat16 or float16
// (params, grads); bfloat16 or float16 (the low-precision copies of fp32 master weights).
enum class Storage { kFloat32, kFloating, kLowPrecision };

struct ListArg {
  const char* name;
  at::TensorList list;
  Storage storage = Storage::kFloating;
};

inline bool storable(Storage storage, at::ScalarType dtype) {
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
  switch (storage) {
    case Storage::kFloat32:
      return dtype == at::kFloat;
    case Storage::kFloating:
      return dtype == at::kFloat || low;
    case Storage::kLowPrecision:
      return low;
  }
  return false;
}

inline const char* storable_names(Storage storage) {
  switch (storage) {
    case Storage::kFloat32:
      return "float32";
    case Storage::kFloating:
      return "float32, bfloat16 or float16";
    case Storage::kLowPrecision:
      return "bfloat16 or float16";
  }
  return "";
}

// Checks shared by the ops: CPU tensors of a dtype the list may hold, one dtype per list (a kernel is
// instantiated per element type, not per tensor), one memory block each, and for every list after
// the first, the sizes and strides of the first list's tensor at the same index (the kernels walk
// them all with one element index).
inline void check_lists(const char* op, std::initializer_list<ListArg> lists) {
  const ListArg& first = *lists.begin();
  for (const ListArg& arg : lists) {
    const char* name = arg.name;
    const at::TensorList list = arg.list;
    TORCH_CHECK(list.size() == first.list.size(), op, ": ", name, " has ", list.size(), " tensors, ", first.name,
                " has ", first.list.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(), ", expected cpu");
      TORCH_CHECK(storable(arg.storage, t.scalar_type()), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                  ", expected ", storable_names(arg.storage));
      TORCH_CHECK(t.scalar_type() == list[0].scalar_type(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                  ", but ", name, "[0] has ", list[0].scalar_type(), " (the tensors of one list share a dtype)");
      TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", name, "[", i, "] is not dense in memory");
      const at::Tensor& other = first.list[i];
      TORCH_CHECK(t.sizes() == other.sizes() && (t.numel() <= 1 || t.strides() == other.strides()), op, ": ", name,
                  "[", i, "] has sizes ", t.sizes(), " and strides ", t.strides(), ", but ", first.name, "[", i,
                  "] has ", other.sizes(), " and ", other.strides());
    }
  }
}

// copies: empty, or the low-precision model parameters that the fp32 master weights `params` are
// written to after their update, one per param, laid out as the param.
inline void check_copies(const char* op, at::TensorList params, at::TensorList copies) {
  if (copies.empty()) return;
  TORCH_CHECK(copies.size() == params.size(), op, ": copies has ", copies.size(), " tensors, params has ",
              params.size());
  TORCH_CHECK(element_type(params) == at::kFloat, op, ": copies are given, so params must be float32 (master ",
              "weights), but params has dtype ", element_type(params));
  check_lists(op, {{"params", params}, {"copies", copies, Storage::kLowPrecision}});
}

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
