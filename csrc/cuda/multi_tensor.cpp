// The launch tables of the CUDA operators and their cache (multi_tensor.h).
#include "multi_tensor.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <list>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace lamb_kernels {
namespace cuda {
namespace {

struct CachedTable {
  at::Tensor device;  // keeps the table's memory alive
  TensorTable table;
  bool pinned;  // used while a CUDA graph was captured: the graph reads it at every replay
};

// Most recently used first. The key holds every pointer and size, so a hit is the same table.
using Key = std::vector<int64_t>;
std::mutex cache_mutex;
std::list<std::pair<Key, CachedTable>> cache;
std::map<Key, std::list<std::pair<Key, CachedTable>>::iterator> cache_index;

}  // namespace

void check_chunk_size(const char* op, int64_t chunk_size) {
  TORCH_CHECK(chunk_size > 0 && chunk_size % kPack == 0, op, ": chunk_size must be a positive multiple of ", kPack,
              ", got ", chunk_size);
}

TensorTable tensor_table(std::initializer_list<at::TensorList> lists, int64_t chunk_size) {
  const at::TensorList first = *lists.begin();
  const int64_t n_lists = static_cast<int64_t>(lists.size());
  const int64_t n_tensors = static_cast<int64_t>(first.size());
  const at::Device device = first[0].device();
  Key key;
  key.reserve(4 + n_tensors * (n_lists + 1));
  key.push_back(device.index());
  key.push_back(chunk_size);
  key.push_back(n_lists);
  key.push_back(n_tensors);
  // A tensor with no elements has no memory: its pointer is 0 (LARS's placeholder buffers, which
  // the kernel then refuses to write through).
  for (const at::TensorList& list : lists) {
    for (const at::Tensor& t : list) key.push_back(t.numel() == 0 ? 0 : reinterpret_cast<int64_t>(t.data_ptr()));
  }
  for (const at::Tensor& t : first) key.push_back(t.numel());

  // A table that a captured graph holds is never evicted (a few kilobytes each, for the process's
  // life). Capture after a warm-up step, as for any graph: then the tables exist and nothing is
  // uploaded while capturing.
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  std::lock_guard<std::mutex> lock(cache_mutex);
  const auto hit = cache_index.find(key);
  if (hit != cache_index.end()) {
    cache.splice(cache.begin(), cache, hit->second);
    hit->second->second.pinned = hit->second->second.pinned || capturing;
    return hit->second->second.table;
  }
  TensorTable table;
  table.n_lists = n_lists;
  table.n_tensors = n_tensors;
  table.chunk_size = chunk_size;
  table.aligned = true;
  std::vector<int64_t> first_chunk(n_tensors + 1, 0);
  for (int64_t t = 0; t < n_tensors; ++t) {
    first_chunk[t + 1] = first_chunk[t] + (first[t].numel() + chunk_size - 1) / chunk_size;
  }
  table.n_chunks = first_chunk[n_tensors];
  const int64_t size = n_lists * n_tensors + n_tensors + (n_tensors + 1) + table.n_chunks;
  at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* out = host.data_ptr<int64_t>();
  for (size_t k = 4; k < 4 + static_cast<size_t>(n_lists * n_tensors); ++k) {
    *out++ = key[k];
    table.aligned = table.aligned && key[k] % 16 == 0;
  }
  for (const at::Tensor& t : first) *out++ = t.numel();
  for (int64_t t = 0; t <= n_tensors; ++t) *out++ = first_chunk[t];
  for (int64_t t = 0; t < n_tensors; ++t) {
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) *out++ = t;
  }
  // Asynchronous from pinned memory: torch keeps the staging block until the copy has run.
  at::Tensor on_device = host.to(device, /*non_blocking=*/true);
  table.data = on_device.const_data_ptr<int64_t>();
  cache.emplace_front(key, CachedTable{on_device, table, capturing});
  cache_index[key] = cache.begin();
  if (static_cast<int64_t>(cache.size()) > kTablesKept) {  // the least recently used unpinned table goes
    for (auto entry = std::prev(cache.end()); entry != cache.begin(); --entry) {
      if (!entry->second.pinned) {
        cache_index.erase(entry->first);
        cache.erase(entry);
        break;
      }
    }
  }
  return table;
}

const float* scalar_pointer(const char* op, const char* name, const std::optional<at::Tensor>& t, at::Device device) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device, op, ": ", name,
              " must be a one-element float32 tensor on ", device, ", got ", t->sizes(), " ", t->scalar_type(),
              " on ", t->device());
  return t->const_data_ptr<float>();
}

void check_table_argument(const char* op, const char* name, const at::Tensor& t, at::Device device, int64_t rows,
                          int64_t width) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == width,
              op, ": ", name, " must be a contiguous float32 tensor on ", device, " of shape [", rows, ", ", width,
              "], got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

}  // namespace cuda
}  // namespace lamb_kernels
