// The library as a Python module (`lamb_kernels._C`), with one function for the optimizers' host
// path: `layouts`, what a step's checks depend on, read from a whole list of tensors in one call
// (lamb_kernels/optimizers/plan_cache.py compares it with the last full check's). The ahead-of-time build
// imports this module; the just-in-time build loads the same library with torch.ops.load_library
// and imports it from its path (lamb_kernels/extension.py).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kNone = -1;  // the item is None

// layouts(items: list, addresses: bool) -> bytes. Per item: None, or a tensor's Python type, dtype,
// layout, device, sizes, strides (strided tensors), and with `addresses` the address of its first
// element (-2 for a tensor without storage: a DTensor or another wrapper subclass). Two lists give
// equal bytes exactly when their items agree in all of these, item by item. Any other item raises
// TypeError. Reads metadata only: no tensor is touched, no Python code runs.
PyObject* layouts(PyObject* /*self*/, PyObject* args) {
  PyObject* items = nullptr;
  int addresses = 0;
  if (!PyArg_ParseTuple(args, "O!p:layouts", &PyList_Type, &items, &addresses)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(items);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(n) * 8);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(items, i);
    if (item == Py_None) {
      out.push_back(kNone);
      continue;
    }
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "layouts: item %zd is a %s, not a tensor or None", i, Py_TYPE(item)->tp_name);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    const at::Device device = t.device();
    out.push_back(reinterpret_cast<intptr_t>(Py_TYPE(item)));
    out.push_back(static_cast<int64_t>(t.scalar_type()) | (static_cast<int64_t>(t.layout()) << 8) |
                  (static_cast<int64_t>(device.type()) << 16) | ((static_cast<int64_t>(device.index()) + 1) << 32));
    out.push_back(t.dim());
    if (t.layout() != at::kStrided) continue;
    for (const int64_t size : t.sizes()) out.push_back(size);
    for (const int64_t stride : t.strides()) out.push_back(stride);
    if (addresses) {
      out.push_back(t.has_storage() ? reinterpret_cast<intptr_t>(t.data_ptr()) : -2);
    }
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
}

PyMethodDef methods[] = {
    {"layouts", layouts, METH_VARARGS, "layouts(items: list, addresses: bool) -> bytes (csrc/host.cpp)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lamb_kernels' C++ operators", -1, methods};
  return PyModule_Create(&module);
}
