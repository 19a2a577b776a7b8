// What the CPU and CUDA operators share: the element types and their dispatch, and the checks on
// the tensor lists an operator takes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>

namespace lamb_kernels {

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

// Calls f(Element<float>{}), f(Element<at::BFloat16>{}) or f(Element<int8_t>{}): the storage of a list of
// optimizer states (int8_t: 8-bit codes with block scales, optimizer_math.h; LAMB's v is then uint8).
template <typename F>
void dispatch_state(at::ScalarType dtype, const F& f) {
  if (dtype == at::kBFloat16) {
    f(Element<at::BFloat16>{});
  } else if (dtype == at::kChar) {
    f(Element<int8_t>{});
  } else {
    f(Element<float>{});
  }
}

// What a list may hold: float32 only (buffers); float32, bfloat16 or int8 codes (signed optimizer
// states: m, momentum buffers); float32, bfloat16 or uint8 codes (LAMB's v); float32, bfloat16 or
// float16 (params, grads); bfloat16 or float16 (the low-precision copies of fp32 master weights).
enum class Storage { kFloat32, kState, kUnsignedState, kFloating, kLowPrecision };

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
    case Storage::kState:
      return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kChar;
    case Storage::kUnsignedState:
      return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kByte;
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
    case Storage::kState:
      return "float32, bfloat16 or int8 (codes)";
    case Storage::kUnsignedState:
      return "float32, bfloat16 or uint8 (codes)";
    case Storage::kFloating:
      return "float32, bfloat16 or float16";
    case Storage::kLowPrecision:
      return "bfloat16 or float16";
  }
  return "";
}

// Checks shared by the ops: tensors on `device` of a dtype the list may hold, one dtype per list (a
// kernel is instantiated per element type, not per tensor), one memory block each, and for every
// list after the first, the sizes and strides of the first list's tensor at the same index (the
// kernels walk them all with one element index).
inline void check_lists(const char* op, std::initializer_list<ListArg> lists, at::Device device = at::kCPU) {
  const ListArg& first = *lists.begin();
  for (const ListArg& arg : lists) {
    const char* name = arg.name;
    const at::TensorList list = arg.list;
    TORCH_CHECK(list.size() == first.list.size(), op, ": ", name, " has ", list.size(), " tensors, ", first.name,
                " has ", first.list.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", device);
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

// A kernel's m and v, of one dtype each (check_lists): both float32, both bfloat16, or 8-bit codes
// (m int8, v uint8).
inline void check_same_dtype(const char* op, const char* name, at::TensorList list, const char* other_name,
                             at::TensorList other) {
  if (list.empty() || other.empty()) return;
  const at::ScalarType own = list[0].scalar_type(), theirs = other[0].scalar_type();
  TORCH_CHECK(own == theirs || (own == at::kByte && theirs == at::kChar), op, ": ", name, " has dtype ", own,
              ", but ", other_name, " has ", theirs, " (8-bit codes: ", other_name, " int8, ", name, " uint8)");
}

// The block scales of 8-bit codes (optimizer_math.h): when `codes` are int8 or uint8 (any of them,
// empty ones too: LARS's float32 placeholders are never codes), one contiguous float32 tensor of
// ceil(numel / 256) elements per code tensor (checked where `is_codes(t)`: not for placeholders), on
// `device`, and a chunk size that keeps blocks whole; else `scales` is empty. Returns whether they are
// codes.
template <typename IsCodes>
bool check_scales(const char* op, const char* name, at::TensorList codes, at::TensorList scales, at::Device device,
                  int64_t chunk_size, const IsCodes& is_codes) {
  bool coded = false;
  for (const at::Tensor& t : codes) coded = coded || t.scalar_type() == at::kChar || t.scalar_type() == at::kByte;
  if (!coded) {
    TORCH_CHECK(scales.empty(), op, ": ", name, " must be empty for float states, got ", scales.size(), " tensors");
    return false;
  }
  TORCH_CHECK(scales.size() == codes.size(), op, ": ", name, " has ", scales.size(), " tensors, the codes have ",
              codes.size());
  TORCH_CHECK(chunk_size % 256 == 0, op, ": chunk_size must be a multiple of 256 with 8-bit states, got ",
              chunk_size);
  for (int64_t t = 0; t < static_cast<int64_t>(codes.size()); ++t) {
    if (!is_codes(t)) continue;
    const at::Tensor& s = scales[t];
    const int64_t blocks = (codes[t].numel() + 255) / 256;
    TORCH_CHECK(s.device() == device && s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == blocks,
                op, ": ", name, "[", t, "] must be a contiguous float32 tensor of ", blocks, " elements on ", device,
                " (one scale per 256 codes), got ", s.sizes(), " ", s.scalar_type(), " on ", s.device());
  }
  return true;
}

// LAMB's scale lists (m's and v's).
inline void check_lamb_scales(const char* op, at::TensorList exp_avgs, at::TensorList exp_avg_scales,
                              at::TensorList exp_avg_sq_scales, int64_t chunk_size, at::Device device) {
  auto every = [](int64_t) { return true; };
  check_scales(op, "exp_avg_scales", exp_avgs, exp_avg_scales, device, chunk_size, every);
  check_scales(op, "exp_avg_sq_scales", exp_avgs, exp_avg_sq_scales, device, chunk_size, every);
}

// LARS's momentum buffers: those where `is_buffer(t)` (the others are placeholders, never read) laid
// out as their parameters, on `device`, float32 or bfloat16, all of one dtype, which is returned
// (float32 when every entry is a placeholder): the kernels are instantiated per buffer type.
template <typename IsBuffer>
at::ScalarType check_momentum_buffers(const char* op, at::TensorList params, at::TensorList buffers, at::Device device,
                                      const IsBuffer& is_buffer) {
  std::optional<at::ScalarType> type;
  for (int64_t t = 0; t < static_cast<int64_t>(buffers.size()); ++t) {
    if (!is_buffer(t)) continue;
    check_lists(op, {{"params", params.slice(t, 1)}, {"momentum_buffers", buffers.slice(t, 1), Storage::kState}},
                device);
    const at::ScalarType own = buffers[t].scalar_type();
    TORCH_CHECK(!type.has_value() || *type == own, op, ": momentum_buffers[", t, "] has dtype ", own,
                ", but another buffer has ", *type, " (the buffers of one call share a dtype)");
    type = own;
  }
  return type.value_or(at::kFloat);
}

// copies: empty, or the low-precision model parameters that the fp32 master weights `params` are
// written to after their update, one per param, laid out as the param.
inline void check_copies(const char* op, at::TensorList params, at::TensorList copies, at::Device device = at::kCPU) {
  if (copies.empty()) return;
  TORCH_CHECK(copies.size() == params.size(), op, ": copies has ", copies.size(), " tensors, params has ",
              params.size());
  TORCH_CHECK(element_type(params) == at::kFloat, op, ": copies are given, so params must be float32 (master ",
              "weights), but params has dtype ", element_type(params));
  check_lists(op, {{"params", params}, {"copies", copies, Storage::kLowPrecision}}, device);
}

}  // namespace lamb_kernels
