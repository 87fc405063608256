// The fused CPU step's per-step check, in one call over all of a bucket's
// tensors (see rprop/torch/_tensor_table.py).
//
// A prepared fused step walks its tensors through a table of data pointers.
// Before each step it must know that nothing the table was built from has
// changed: the same parameter objects in the group, the same state tensor
// objects in their state dicts, each tensor with the Python type, dispatch
// keys, dtype, device, requires_grad, sizes, strides and data pointer it had,
// and a gradient of the layout it had. Python does that with a handful of
// passes of about 0.1 us a tensor each; this does it in one, reading the
// tensors' metadata directly.
//
// It only ever answers "all the same" (and then the gradients and their data
// pointers) or "something differs"; what to do about a difference is decided
// in Python, which checks again and gathers the bucket anew.
//
// Built against the torch it runs with (the cache key holds torch's version),
// loaded with ctypes.PyDLL (the GIL is held). No C++ exception leaves it.

#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>

#define RPROP_TABLE_ABI 1

namespace {

constexpr int kMaxDim = 8;

// What a tensor looked like when recorded; Python holds these as bytes.
struct Record {
  PyObject* object;  // identity (not a reference: Python holds the tensors)
  PyTypeObject* type;
  uint64_t keys;
  int64_t data;
  int64_t sizes[kMaxDim];
  int64_t strides[kMaxDim];
  int32_t dtype;
  int32_t device_type;
  int32_t device_index;
  int32_t dim;
  int32_t requires_grad;
  int32_t pad;
};

// Fill ``r`` from the tensor object ``obj``; false when it is not a strided
// tensor of at most kMaxDim dimensions with storage.
bool describe(PyObject* obj, Record* r) {
  if (!THPVariable_Check(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.layout() != c10::kStrided || !t.has_storage()) return false;
  const int64_t dim = t.dim();
  if (dim > kMaxDim) return false;
  std::memset(r, 0, sizeof(Record));
  r->object = obj;
  r->type = Py_TYPE(obj);
  r->keys = t.key_set().raw_repr();
  r->data = reinterpret_cast<int64_t>(t.data_ptr());
  for (int64_t d = 0; d < dim; d++) {
    r->sizes[d] = t.sizes()[d];
    r->strides[d] = t.strides()[d];
  }
  r->dtype = static_cast<int32_t>(t.scalar_type());
  r->device_type = static_cast<int32_t>(t.device().type());
  r->device_index = static_cast<int32_t>(t.device().index());
  r->dim = static_cast<int32_t>(dim);
  r->requires_grad = t.requires_grad() ? 1 : 0;
  return true;
}

// Whether the object ``obj`` is a tensor recorded as ``was`` and still laid
// out as it was (its identity and data pointer too when ``exact``). The
// Python type is compared first: recorded types passed THPVariable_Check, and
// comparing the type pointer avoids its isinstance call.
bool matches(PyObject* obj, const Record& was, bool exact) {
  if (Py_TYPE(obj) != was.type || (exact && obj != was.object)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  // The dispatch keys name the layout (a sparse or mkldnn tensor has its own
  // keys), so the recorded keys stand for the recorded strided layout.
  if (!t.defined() || !t.has_storage()) return false;
  const int64_t dim = t.dim();
  if (dim != was.dim || t.key_set().raw_repr() != was.keys ||
      static_cast<int32_t>(t.scalar_type()) != was.dtype ||
      static_cast<int32_t>(t.device().type()) != was.device_type ||
      static_cast<int32_t>(t.device().index()) != was.device_index ||
      (t.requires_grad() ? 1 : 0) != was.requires_grad)
    return false;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  for (int64_t d = 0; d < dim; d++) {
    if (sizes[d] != was.sizes[d] || strides[d] != was.strides[d]) return false;
  }
  return !exact || reinterpret_cast<int64_t>(t.data_ptr()) == was.data;
}

PyObject* grad_name = nullptr;

}  // namespace

extern "C" {

int rprop_table_abi(void) { return RPROP_TABLE_ABI; }

int rprop_table_record_size(void) { return static_cast<int>(sizeof(Record)); }

// Record the tensors of the list ``tensors`` into ``out`` (len(tensors)
// records). 0 when done, 1 when one cannot be recorded, -1 on an error.
int rprop_table_record(PyObject* tensors, Record* out) {
  try {
    if (!PyList_Check(tensors)) return -1;
    const Py_ssize_t n = PyList_GET_SIZE(tensors);
    for (Py_ssize_t i = 0; i < n; i++) {
      if (!describe(PyList_GET_ITEM(tensors, i), &out[i])) return 1;
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

// Whether this step's tensors are the recorded ones, as they were:
//   params: the group's parameter list, n of them, recorded as records[0:n];
//   states: the n parameters' state dicts, and keys a tuple of k names, whose
//           tensors states[i][keys[j]] are recorded as records[n + j*n + i];
//   grad_records: the n gradients' layouts when recorded (pointers not compared).
// On 0 (all the same), grads_out (a list of n items) holds the gradients and
// grad_ptrs their data pointers. 1: something differs (or a gradient is
// missing); -1: an error (a Python exception is cleared). grads_out and
// grad_ptrs are written as the check goes, also when it then answers 1: the
// caller must not read either then.
int rprop_table_check(PyObject* params, PyObject* states, PyObject* keys,
                      const Record* records, const Record* grad_records,
                      PyObject* grads_out, int64_t* grad_ptrs) {
  try {
    if (grad_name == nullptr) {
      grad_name = PyUnicode_InternFromString("grad");
      if (grad_name == nullptr) {
        PyErr_Clear();
        return -1;
      }
    }
    if (!PyList_Check(params) || !PyList_Check(states) || !PyTuple_Check(keys) ||
        !PyList_Check(grads_out))
      return -1;
    const Py_ssize_t n = PyList_GET_SIZE(params);
    const Py_ssize_t k = PyTuple_GET_SIZE(keys);
    if (PyList_GET_SIZE(states) != n || PyList_GET_SIZE(grads_out) != n) return 1;
    for (Py_ssize_t i = 0; i < n; i++) {
      PyObject* p = PyList_GET_ITEM(params, i);
      if (!matches(p, records[i], true)) return 1;
      PyObject* state = PyList_GET_ITEM(states, i);
      if (!PyDict_CheckExact(state)) return 1;
      for (Py_ssize_t j = 0; j < k; j++) {
        PyObject* t = PyDict_GetItemWithError(state, PyTuple_GET_ITEM(keys, j));
        if (t == nullptr) {
          PyErr_Clear();
          return 1;
        }
        if (!matches(t, records[n + j * n + i], true)) return 1;
      }
      // The recorded types are plain tensors, whose ``grad`` is a C getter,
      // but it may allocate a wrapper and so run the garbage collector and
      // finalizers: the lists' lengths are checked again after it.
      PyObject* g = PyObject_GetAttr(p, grad_name);  // new reference
      if (g == nullptr) {
        PyErr_Clear();
        return 1;
      }
      PyList_SetItem(grads_out, i, g);  // steals g (drops the item it replaces)
      if (PyList_GET_SIZE(params) != n || PyList_GET_SIZE(states) != n ||
          PyList_GET_SIZE(grads_out) != n)
        return 1;
      if (!matches(g, grad_records[i], false)) return 1;
      grad_ptrs[i] = reinterpret_cast<int64_t>(THPVariable_Unpack(g).data_ptr());
    }
    return 0;
  } catch (...) {
    PyErr_Clear();
    return -1;
  }
}

}  // extern "C"
