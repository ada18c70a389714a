// _C.AllocatorFastPath: the caching allocator's hot malloc/free, in C.
//
// cutegrad.allocator.CachingAllocator derives from this type (or, without _C,
// from allocator/fast_path.py:PythonFastPath, which sends every call to the
// policy, whose _quick_take and _file_quick are this same hit in Python). What
// it does natively is only the exact-size hit of the deferred-coalescing fast
// path (docs/allocator.md, "Coalescing" and "The native fast path"):
//
//   malloc(nbytes, stream=0): with the fast path open (`_slow` false), take the
//       last block of pool.quick[stream][rounded size] and count it allocated;
//   free(block): with `_quick_free` true, file an allocated block without
//       stream uses under pool.quick[block.stream][block.size].
//
// Everything else (a miss, a bad argument, keywords, a busy token, pending
// frees, a capture, events) calls the Python policy: `_malloc_slow`,
// `_free_slow`, `_drain_pending_frees` of the same object. The quick lists stay
// the Python dicts and lists the policy reads (allocator/block.py); the
// counters the hit path moves (`_n_alloc`, `_bytes_alloc`, `_bytes_req`, their
// peaks and totals, `_n_quick`) and the two flags are C members here, read and
// written by the Python policy as ordinary attributes. So memory_stats(),
// snapshots and check_invariants() see one state whichever path ran.
//
// Why C: one op's output costs an alloc+free pair, about 0.57 us of Python on
// the dry-run device's add (bench/overhead.py); here it is two METH_FASTCALL
// calls that touch Block fields through their slot offsets.
//
// Blocks, segments and pools are the Python classes of allocator/block.py.
// bind_layout() reads the offsets of their __slots__ once (each must be a
// plain object slot) and the Block state codes; until it has run every call
// takes the Python path.
//
// _C.device_tensor(alloc, shape, dtype, device, stream) builds a kernel's
// output the way frontend/backends/cuda/launch.py:_empty does in Python (which
// stays the path without _C and with poisoned outputs): nbytes from the shape,
// alloc.malloc(nbytes, stream), a DeviceStorage around the block and a
// contiguous Tensor around the storage, their __slots__ written directly.
// bind_device_tensor(Tensor, DeviceStorage, DType, strides cache,
// contiguous_strides) checks that the slots it writes are all the classes have.
// Neither entry launches anything: the dry-run stand-in of _C never sees them
// (the allocator and launch.py import them from the real module).
//
// Locking: the same token protocol as the Python policy (caching.py,
// "locking"): the token is popped from `_token` for the duration of a hit and
// pushed back after it, then `_pending_frees` is drained if a free queued
// one meanwhile. The hit runs with the GIL held; the type is not built for a
// free-threaded Python, where the allocator uses PythonFastPath.
#include <nanobind/nanobind.h>
#include <structmember.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bindings.h"

namespace nb = nanobind;

namespace {

#ifndef Py_GIL_DISABLED

constexpr long long kMinBlock = 512;
constexpr long long kSmallSize = 1 << 20;  // largest request of the small pool (caching.SMALL_SIZE)
constexpr long long kMaxHit = 1LL << 60;   // larger requests (never cached) go to Python: no overflow here

// Slot offsets of the allocator's Python classes, set by bind_layout.
struct Layout {
  PyTypeObject* block = nullptr;
  PyTypeObject* segment = nullptr;
  PyTypeObject* pool = nullptr;
  PyObject* allocated = nullptr;  // block.ALLOCATED
  PyObject* quick = nullptr;      // block.QUICK
  Py_ssize_t state, requested, size, stream, pool_of, segment_of, stream_uses;  // Block
  Py_ssize_t segment_ptr;                                                      // Segment.ptr
  Py_ssize_t pool_quick;                                                       // BlockPool.quick
};
Layout layout;

PyObject* s_malloc_slow;
PyObject* s_free_slow;
PyObject* s_drain;
PyObject* zero;

inline PyObject*& slot(PyObject* obj, Py_ssize_t offset) {
  return *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(obj) + offset);
}

// Stores a new reference to `value` in a slot of a fresh object (nothing to release).
inline void put(PyObject* obj, Py_ssize_t offset, PyObject* value) {
  Py_INCREF(value);
  slot(obj, offset) = value;
}

struct FastPath {
  PyObject_HEAD
  PyObject* small;     // _small: BlockPool
  PyObject* large;     // _large: BlockPool
  PyObject* segments;  // _segments: {ptr: Segment}
  PyObject* token;     // _token: [True] while nobody holds the allocator
  PyObject* pending;   // _pending_frees: blocks whose free found the token taken
  long long n_alloc, n_alloc_peak, n_alloc_total;
  long long bytes_alloc, bytes_alloc_peak, bytes_alloc_total;
  long long bytes_req, bytes_req_peak, bytes_req_total;
  long long n_quick;
  char slow;        // _slow: malloc must take the Python path
  char quick_free;  // _quick_free: free may defer coalescing
};

// The token protocol: pop it (nullptr: someone holds it), push it back, drain.
PyObject* take_token(FastPath* self) {
  PyObject* token = self->token;
  if (token == nullptr || !PyList_CheckExact(token)) return nullptr;
  Py_ssize_t n = PyList_GET_SIZE(token);
  if (n == 0) return nullptr;
  PyObject* item = PyList_GET_ITEM(token, n - 1);  // the list's reference becomes ours
  Py_SET_SIZE(reinterpret_cast<PyVarObject*>(token), n - 1);
  return item;
}

// Pushes the token back (consuming `item`); then, like the Python holders, frees
// what was queued meanwhile. An exception the hit raised is kept across the
// drain, as across a `finally`; false: the drain raised (its exception replaces it).
bool give_token(FastPath* self, PyObject* item) {
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  int rc = PyList_Append(self->token, item);
  Py_DECREF(item);
  bool ok = rc == 0;
  if (ok && self->pending != nullptr && PyList_Check(self->pending) && PyList_GET_SIZE(self->pending) > 0) {
    PyObject* r = PyObject_CallMethodNoArgs(reinterpret_cast<PyObject*>(self), s_drain);
    ok = r != nullptr;
    Py_XDECREF(r);
  }
  if (!ok) {
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return false;
  }
  PyErr_Restore(type, value, traceback);
  return true;
}

// self.<name>(*args, **kwargs): the Python path, with the call's arguments as given.
PyObject* call_python(PyObject* self, PyObject* name, PyObject* const* args, Py_ssize_t nargs,
                      PyObject* kwnames) {
  Py_ssize_t total = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
  std::vector<PyObject*> stack(static_cast<size_t>(total) + 1);
  stack[0] = self;
  for (Py_ssize_t i = 0; i < total; ++i) stack[i + 1] = args[i];
  return PyObject_VectorcallMethod(name, stack.data(), (nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
}

inline bool is_pool(PyObject* p) { return p != nullptr && Py_TYPE(p) == layout.pool; }

// The exact-size hit; nullptr without an exception: not served here.
PyObject* quick_hit(FastPath* self, PyObject* nbytes_obj, long long nbytes, PyObject* stream) {
  long long size = nbytes < kMinBlock ? kMinBlock : (nbytes + kMinBlock - 1) & -kMinBlock;
  PyObject* pool = size <= kSmallSize ? self->small : self->large;
  if (!is_pool(pool)) return nullptr;
  PyObject* quick = slot(pool, layout.pool_quick);
  if (quick == nullptr || !PyDict_CheckExact(quick)) return nullptr;
  PyObject* sizes = PyDict_GetItemWithError(quick, stream);
  if (sizes == nullptr || !PyDict_CheckExact(sizes)) return nullptr;
  PyObject* key = PyLong_FromLongLong(size);
  if (key == nullptr) return nullptr;
  PyObject* blocks = PyDict_GetItemWithError(sizes, key);
  Py_DECREF(key);
  if (blocks == nullptr || !PyList_CheckExact(blocks)) return nullptr;
  Py_ssize_t n = PyList_GET_SIZE(blocks);
  if (n == 0 || Py_TYPE(PyList_GET_ITEM(blocks, n - 1)) != layout.block) return nullptr;
  PyObject* block = PyList_GET_ITEM(blocks, n - 1);  // popped: the list's reference becomes ours
  Py_SET_SIZE(reinterpret_cast<PyVarObject*>(blocks), n - 1);
  self->n_quick -= 1;
  Py_INCREF(layout.allocated);
  Py_XSETREF(slot(block, layout.state), layout.allocated);
  Py_INCREF(nbytes_obj);
  Py_XSETREF(slot(block, layout.requested), nbytes_obj);
  // No block is pending on this path, so active == allocated and the active
  // peaks follow from the allocated ones (memory_stats() takes the max).
  if (++self->n_alloc > self->n_alloc_peak) self->n_alloc_peak = self->n_alloc;
  if ((self->bytes_alloc += size) > self->bytes_alloc_peak) self->bytes_alloc_peak = self->bytes_alloc;
  if ((self->bytes_req += nbytes) > self->bytes_req_peak) self->bytes_req_peak = self->bytes_req;
  self->n_alloc_total += 1;
  self->bytes_alloc_total += size;
  self->bytes_req_total += nbytes;
  return block;
}

PyObject* fast_malloc(PyObject* self_obj, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  auto* self = reinterpret_cast<FastPath*>(self_obj);
  if (kwnames == nullptr && (nargs == 1 || nargs == 2) && !self->slow && layout.block != nullptr) {
    PyObject* nbytes_obj = args[0];
    PyObject* stream = nargs == 2 ? args[1] : zero;
    if (PyLong_CheckExact(nbytes_obj) && PyLong_CheckExact(stream)) {
      int overflow = 0;
      long long nbytes = PyLong_AsLongLongAndOverflow(nbytes_obj, &overflow);
      if (!overflow && nbytes >= 0 && nbytes <= kMaxHit) {
        PyObject* token = take_token(self);
        if (token != nullptr) {
          PyObject* block = quick_hit(self, nbytes_obj, nbytes, stream);
          bool failed = block == nullptr && PyErr_Occurred();
          if (!give_token(self, token) || failed) {
            Py_XDECREF(block);
            return nullptr;
          }
          if (block != nullptr) return block;
        }
      }
    }
  }
  return call_python(self_obj, s_malloc_slow, args, nargs, kwnames);
}

// Files `block` in its pool's quick list and counts it freed. 1: done, 0: not a
// fast-path free (the Python path decides), -1: an exception is set.
int quick_file(FastPath* self, PyObject* block) {
  PyObject* state = slot(block, layout.state);
  if (state != layout.allocated &&
      (state == nullptr || !PyLong_CheckExact(state) || PyObject_RichCompareBool(state, layout.allocated, Py_EQ) != 1))
    return 0;  // not allocated (a double free): the Python path raises
  if (slot(block, layout.stream_uses) != Py_None) return 0;
  PyObject* seg = slot(block, layout.segment_of);
  PyObject* pool = slot(block, layout.pool_of);
  PyObject* stream = slot(block, layout.stream);
  PyObject* size_obj = slot(block, layout.size);
  PyObject* requested_obj = slot(block, layout.requested);
  if (seg == nullptr || Py_TYPE(seg) != layout.segment || !is_pool(pool) || stream == nullptr ||
      size_obj == nullptr || !PyLong_CheckExact(size_obj) || requested_obj == nullptr ||
      !PyLong_CheckExact(requested_obj) || self->segments == nullptr || !PyDict_CheckExact(self->segments))
    return 0;
  PyObject* seg_ptr = slot(seg, layout.segment_ptr);
  if (seg_ptr == nullptr) return 0;
  PyObject* owner = PyDict_GetItemWithError(self->segments, seg_ptr);
  if (owner != seg) return PyErr_Occurred() ? -1 : 0;  // not this allocator's: the Python path raises
  long long size = PyLong_AsLongLong(size_obj);
  long long requested = PyLong_AsLongLong(requested_obj);
  if (PyErr_Occurred()) return -1;
  PyObject* quick = slot(pool, layout.pool_quick);
  if (quick == nullptr || !PyDict_CheckExact(quick)) return 0;
  // Filed first: once the block is in its list nothing below can fail.
  PyObject* sizes = PyDict_GetItemWithError(quick, stream);
  if (sizes == nullptr) {
    if (PyErr_Occurred()) return -1;
    sizes = PyDict_New();
    if (sizes == nullptr) return -1;
    int rc = PyDict_SetItem(quick, stream, sizes);
    Py_DECREF(sizes);  // the pool's dict holds it
    if (rc < 0) return -1;
  } else if (!PyDict_CheckExact(sizes)) {
    return 0;
  }
  PyObject* blocks = PyDict_GetItemWithError(sizes, size_obj);
  if (blocks == nullptr) {
    if (PyErr_Occurred()) return -1;
    blocks = PyList_New(1);
    if (blocks == nullptr) return -1;
    Py_INCREF(block);
    PyList_SET_ITEM(blocks, 0, block);
    int rc = PyDict_SetItem(sizes, size_obj, blocks);
    Py_DECREF(blocks);
    if (rc < 0) return -1;
  } else if (!PyList_CheckExact(blocks) || PyList_Append(blocks, block) < 0) {
    return PyErr_Occurred() ? -1 : 0;
  }
  Py_INCREF(layout.quick);
  Py_XSETREF(slot(block, layout.state), layout.quick);
  self->n_alloc -= 1;
  self->bytes_alloc -= size;
  self->bytes_req -= requested;
  self->n_quick += 1;
  return 1;
}

PyObject* fast_free(PyObject* self_obj, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  auto* self = reinterpret_cast<FastPath*>(self_obj);
  if (kwnames == nullptr && nargs == 1 && self->quick_free && layout.block != nullptr &&
      Py_TYPE(args[0]) == layout.block) {
    PyObject* token = take_token(self);
    if (token != nullptr) {
      int filed = quick_file(self, args[0]);
      if (!give_token(self, token) || filed < 0) return nullptr;
      if (filed == 1) Py_RETURN_NONE;
    }
  }
  return call_python(self_obj, s_free_slow, args, nargs, kwnames);
}

// bind_layout(Block, Segment, BlockPool, ALLOCATED, QUICK)
Py_ssize_t slot_offset(PyTypeObject* type, const char* name) {
  PyObject* descr = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), name);
  Py_ssize_t offset = -1;
  if (descr == nullptr) {
    PyErr_Clear();
  } else {
    if (Py_TYPE(descr) == &PyMemberDescr_Type) {
      PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(descr)->d_member;
      if (m->type == T_OBJECT_EX && !(m->flags & READONLY)) offset = m->offset;
    }
    Py_DECREF(descr);
  }
  if (offset < 0)
    PyErr_Format(PyExc_TypeError, "%s.%s is not a writable __slots__ entry", type->tp_name, name);
  return offset;
}

PyObject* bind_layout(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyType_Check(args[2]) ||
      !PyLong_CheckExact(args[3]) || !PyLong_CheckExact(args[4])) {
    PyErr_SetString(PyExc_TypeError,
                    "AllocatorFastPath.bind_layout(Block, Segment, BlockPool, ALLOCATED, QUICK): expected three "
                    "classes and two ints");
    return nullptr;
  }
  auto* block = reinterpret_cast<PyTypeObject*>(args[0]);
  auto* segment = reinterpret_cast<PyTypeObject*>(args[1]);
  auto* pool = reinterpret_cast<PyTypeObject*>(args[2]);
  Layout l;
  const struct {
    PyTypeObject* type;
    const char* name;
    Py_ssize_t* offset;
  } slots[] = {{block, "state", &l.state},           {block, "requested", &l.requested},
               {block, "size", &l.size},             {block, "stream", &l.stream},
               {block, "pool", &l.pool_of},          {block, "segment", &l.segment_of},
               {block, "stream_uses", &l.stream_uses}, {segment, "ptr", &l.segment_ptr},
               {pool, "quick", &l.pool_quick}};
  for (const auto& s : slots)
    if ((*s.offset = slot_offset(s.type, s.name)) < 0) return nullptr;
  Py_INCREF(block);
  Py_INCREF(segment);
  Py_INCREF(pool);
  Py_INCREF(args[3]);
  Py_INCREF(args[4]);
  l.block = block;
  l.segment = segment;
  l.pool = pool;
  l.allocated = args[3];
  l.quick = args[4];
  Layout old = layout;
  layout = l;
  Py_XDECREF(old.block);
  Py_XDECREF(old.segment);
  Py_XDECREF(old.pool);
  Py_XDECREF(old.allocated);
  Py_XDECREF(old.quick);
  Py_RETURN_NONE;
}

// ---------------------------------------------------------------------------- device_tensor
struct TensorLayout {
  PyTypeObject* tensor = nullptr;
  PyTypeObject* storage = nullptr;
  PyTypeObject* dtype = nullptr;
  PyObject* strides_cache = nullptr;       // tensor._STRIDES: shape -> contiguous strides
  PyObject* contiguous_strides = nullptr;  // tensor.contiguous_strides, for a shape not cached
  Py_ssize_t storage_of, shape, strides, offset, dtype_of, np, requires_grad, grad, grad_fn, base, hooks,
      retains_grad, accum, base_fn;         // Tensor
  Py_ssize_t data, device, version, allocator;  // DeviceStorage
  Py_ssize_t itemsize;                          // DType
};
TensorLayout tensor_layout;
PyObject* s_malloc;
PyObject* s_free;

// The names in __slots__ over a class's MRO (without __weakref__ and __dict__).
bool collect_slots(PyTypeObject* type, std::vector<std::string>& names) {
  PyObject* mro = type->tp_mro;
  for (Py_ssize_t i = 0; mro != nullptr && i < PyTuple_GET_SIZE(mro); ++i) {
    PyTypeObject* cls = reinterpret_cast<PyTypeObject*>(PyTuple_GET_ITEM(mro, i));
    // Static builtin types (object) declare no __slots__, and from Python 3.12 their tp_dict is NULL.
    if (!(cls->tp_flags & Py_TPFLAGS_HEAPTYPE) || cls->tp_dict == nullptr) continue;
    PyObject* slots = PyDict_GetItemString(cls->tp_dict, "__slots__");
    if (slots == nullptr) continue;
    PyObject* seq = PyUnicode_Check(slots) ? PyTuple_Pack(1, slots) : PySequence_Tuple(slots);
    if (seq == nullptr) return false;
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(seq); ++j) {
      const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(seq, j));
      if (name == nullptr) {
        Py_DECREF(seq);
        return false;
      }
      if (std::string(name) != "__weakref__" && std::string(name) != "__dict__") names.emplace_back(name);
    }
    Py_DECREF(seq);
  }
  return true;
}

struct SlotSpec {
  const char* name;
  Py_ssize_t* offset;
};

// Offsets of `wanted`, which must be exactly the slots `type` has: a slot added to
// the class later would otherwise be left unset by device_tensor.
bool bind_slots(PyTypeObject* type, const std::vector<SlotSpec>& wanted) {
  std::vector<std::string> names;
  if (!collect_slots(type, names)) return false;
  std::sort(names.begin(), names.end());
  std::vector<std::string> expected;
  for (const auto& w : wanted) expected.emplace_back(w.name);
  std::sort(expected.begin(), expected.end());
  if (names != expected) {
    PyErr_Format(PyExc_TypeError, "bind_device_tensor: %s's __slots__ are not the ones device_tensor writes; "
                 "update kernels/cuda/allocator_bindings.cpp with the class", type->tp_name);
    return false;
  }
  for (const auto& w : wanted)
    if ((*w.offset = slot_offset(type, w.name)) < 0) return false;
  return true;
}

PyObject* bind_device_tensor(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyType_Check(args[2]) ||
      !PyDict_CheckExact(args[3]) || !PyCallable_Check(args[4])) {
    PyErr_SetString(PyExc_TypeError, "bind_device_tensor(Tensor, DeviceStorage, DType, strides cache (dict), "
                                     "contiguous_strides)");
    return nullptr;
  }
  TensorLayout l;
  l.tensor = reinterpret_cast<PyTypeObject*>(args[0]);
  l.storage = reinterpret_cast<PyTypeObject*>(args[1]);
  l.dtype = reinterpret_cast<PyTypeObject*>(args[2]);
  if (!bind_slots(l.tensor, {{"_storage", &l.storage_of}, {"_shape", &l.shape}, {"_strides", &l.strides},
                             {"_offset", &l.offset}, {"_dtype", &l.dtype_of}, {"_np", &l.np},
                             {"_requires_grad", &l.requires_grad}, {"_grad", &l.grad}, {"grad_fn", &l.grad_fn},
                             {"_base", &l.base}, {"_hooks", &l.hooks}, {"_retains_grad", &l.retains_grad},
                             {"_accum", &l.accum}, {"_base_fn", &l.base_fn}}) ||
      !bind_slots(l.storage, {{"data", &l.data}, {"device", &l.device}, {"version", &l.version},
                              {"allocator", &l.allocator}}))
    return nullptr;
  if ((l.itemsize = slot_offset(l.dtype, "itemsize")) < 0) return nullptr;
  l.strides_cache = args[3];
  l.contiguous_strides = args[4];
  for (PyObject* o : {reinterpret_cast<PyObject*>(l.tensor), reinterpret_cast<PyObject*>(l.storage),
                      reinterpret_cast<PyObject*>(l.dtype), l.strides_cache, l.contiguous_strides})
    Py_INCREF(o);
  TensorLayout old = tensor_layout;
  tensor_layout = l;
  for (PyObject* o : {reinterpret_cast<PyObject*>(old.tensor), reinterpret_cast<PyObject*>(old.storage),
                      reinterpret_cast<PyObject*>(old.dtype), old.strides_cache, old.contiguous_strides})
    Py_XDECREF(o);
  Py_RETURN_NONE;
}

// dtype.itemsize * prod(shape), as the Python loop computes it (generic arithmetic
// for anything but small ints).
PyObject* output_nbytes(PyObject* shape, PyObject* dtype) {
  const TensorLayout& l = tensor_layout;
  PyObject* itemsize = Py_TYPE(dtype) == l.dtype ? slot(dtype, l.itemsize) : nullptr;
  PyObject* nbytes = itemsize != nullptr ? (Py_INCREF(itemsize), itemsize)
                                         : PyObject_GetAttrString(dtype, "itemsize");
  if (nbytes == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape); ++i) {
    PyObject* n = PyTuple_GET_ITEM(shape, i);
    long long a, b, product;
    int overflow_a = 0, overflow_b = 0;
    if (PyLong_CheckExact(nbytes) && PyLong_CheckExact(n) &&
        (a = PyLong_AsLongLongAndOverflow(nbytes, &overflow_a), !overflow_a) &&
        (b = PyLong_AsLongLongAndOverflow(n, &overflow_b), !overflow_b) &&
        !__builtin_mul_overflow(a, b, &product)) {
      Py_SETREF(nbytes, PyLong_FromLongLong(product));
    } else {
      Py_SETREF(nbytes, PyNumber_Multiply(nbytes, n));
    }
    if (nbytes == nullptr) return nullptr;
  }
  return nbytes;
}

PyObject* device_tensor(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const TensorLayout& l = tensor_layout;
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "device_tensor(allocator, shape, dtype, device, stream)");
    return nullptr;
  }
  if (l.tensor == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "device_tensor: bind_device_tensor was not called");
    return nullptr;
  }
  PyObject *alloc = args[0], *shape = args[1], *dtype = args[2], *device = args[3], *stream = args[4];
  if (!PyTuple_Check(shape)) {
    PyErr_Format(PyExc_TypeError, "device_tensor: shape must be a tuple, got %s", Py_TYPE(shape)->tp_name);
    return nullptr;
  }
  PyObject* nbytes = output_nbytes(shape, dtype);
  if (nbytes == nullptr) return nullptr;
  PyObject* call[] = {alloc, nbytes, stream};  // alloc.malloc: an instance attribute (a timer) still counts
  PyObject* block = PyObject_VectorcallMethod(s_malloc, call, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
  Py_DECREF(nbytes);
  if (block == nullptr) return nullptr;
  PyObject* storage = l.storage->tp_alloc(l.storage, 0);
  if (storage == nullptr) {
    PyObject* free_call[] = {alloc, block};
    Py_XDECREF(PyObject_VectorcallMethod(s_free, free_call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
    Py_DECREF(block);
    return nullptr;
  }
  // From here a failure drops the storage, whose finalizer gives the block back.
  slot(storage, l.data) = block;
  put(storage, l.device, device);
  put(storage, l.version, zero);
  put(storage, l.allocator, alloc);
  PyObject* strides = PyDict_GetItemWithError(l.strides_cache, shape);
  if (strides != nullptr && PyObject_IsTrue(strides) == 1) {
    Py_INCREF(strides);
  } else {
    strides = PyErr_Occurred() ? nullptr : PyObject_CallOneArg(l.contiguous_strides, shape);
    if (strides == nullptr) {
      Py_DECREF(storage);
      return nullptr;
    }
  }
  PyObject* t = l.tensor->tp_alloc(l.tensor, 0);
  if (t == nullptr) {
    Py_DECREF(strides);
    Py_DECREF(storage);
    return nullptr;
  }
  slot(t, l.storage_of) = storage;
  slot(t, l.strides) = strides;
  put(t, l.shape, shape);
  put(t, l.offset, zero);
  put(t, l.dtype_of, dtype);
  for (Py_ssize_t off : {l.np, l.grad, l.grad_fn, l.base, l.hooks, l.accum, l.base_fn}) put(t, off, Py_None);
  for (Py_ssize_t off : {l.requires_grad, l.retains_grad}) put(t, off, Py_False);
  return t;
}

PyObject* fast_new(PyTypeObject* type, PyObject*, PyObject*) {
  PyObject* obj = type->tp_alloc(type, 0);
  if (obj != nullptr) reinterpret_cast<FastPath*>(obj)->slow = 1;  // closed until the policy opens it
  return obj;
}

int fast_traverse(PyObject* obj, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<FastPath*>(obj);
  Py_VISIT(Py_TYPE(obj));
  Py_VISIT(self->small);
  Py_VISIT(self->large);
  Py_VISIT(self->segments);
  Py_VISIT(self->token);
  Py_VISIT(self->pending);
  return 0;
}

int fast_clear(PyObject* obj) {
  auto* self = reinterpret_cast<FastPath*>(obj);
  Py_CLEAR(self->small);
  Py_CLEAR(self->large);
  Py_CLEAR(self->segments);
  Py_CLEAR(self->token);
  Py_CLEAR(self->pending);
  return 0;
}

void fast_dealloc(PyObject* obj) {
  PyTypeObject* type = Py_TYPE(obj);
  PyObject_GC_UnTrack(obj);
  fast_clear(obj);
  type->tp_free(obj);
  Py_DECREF(type);
}

#define FP_MEMBER(name, kind, field) {name, kind, offsetof(FastPath, field), 0, nullptr}
PyMemberDef fast_members[] = {
    FP_MEMBER("_small", T_OBJECT, small),
    FP_MEMBER("_large", T_OBJECT, large),
    FP_MEMBER("_segments", T_OBJECT, segments),
    FP_MEMBER("_token", T_OBJECT, token),
    FP_MEMBER("_pending_frees", T_OBJECT, pending),
    FP_MEMBER("_n_alloc", T_LONGLONG, n_alloc),
    FP_MEMBER("_n_alloc_peak", T_LONGLONG, n_alloc_peak),
    FP_MEMBER("_n_alloc_total", T_LONGLONG, n_alloc_total),
    FP_MEMBER("_bytes_alloc", T_LONGLONG, bytes_alloc),
    FP_MEMBER("_bytes_alloc_peak", T_LONGLONG, bytes_alloc_peak),
    FP_MEMBER("_bytes_alloc_total", T_LONGLONG, bytes_alloc_total),
    FP_MEMBER("_bytes_req", T_LONGLONG, bytes_req),
    FP_MEMBER("_bytes_req_peak", T_LONGLONG, bytes_req_peak),
    FP_MEMBER("_bytes_req_total", T_LONGLONG, bytes_req_total),
    FP_MEMBER("_n_quick", T_LONGLONG, n_quick),
    FP_MEMBER("_slow", T_BOOL, slow),
    FP_MEMBER("_quick_free", T_BOOL, quick_free),
    {nullptr, 0, 0, 0, nullptr},
};
#undef FP_MEMBER

PyMethodDef fast_methods[] = {
    {"malloc", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_malloc)),
     METH_FASTCALL | METH_KEYWORDS, "malloc(nbytes, stream=0) -> Block (see CachingAllocator.malloc)"},
    {"free", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_free)), METH_FASTCALL | METH_KEYWORDS,
     "free(block) (see CachingAllocator.free)"},
    {"bind_layout", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bind_layout)),
     METH_FASTCALL | METH_STATIC,
     "bind_layout(Block, Segment, BlockPool, ALLOCATED, QUICK): the allocator classes whose slots the fast "
     "path reads"},
    {nullptr, nullptr, 0, nullptr},
};

PyType_Slot fast_slots[] = {
    {Py_tp_doc, const_cast<char*>("The caching allocator's exact-size malloc/free hit (kernels/cuda/"
                                  "allocator_bindings.cpp); base of cutegrad.allocator.CachingAllocator.")},
    {Py_tp_new, reinterpret_cast<void*>(fast_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(fast_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(fast_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(fast_clear)},
    {Py_tp_members, fast_members},
    {Py_tp_methods, fast_methods},
    {0, nullptr},
};

PyMethodDef device_tensor_def = {
    "device_tensor", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(device_tensor)), METH_FASTCALL,
    "device_tensor(allocator, shape, dtype, device, stream) -> Tensor: a contiguous output of allocator.malloc "
    "(frontend/backends/cuda/launch.py:_empty)"};
PyMethodDef bind_device_tensor_def = {
    "bind_device_tensor", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bind_device_tensor)),
    METH_FASTCALL,
    "bind_device_tensor(Tensor, DeviceStorage, DType, strides cache, contiguous_strides): the classes "
    "device_tensor builds and reads"};

PyType_Spec fast_spec = {"cutegrad._C.AllocatorFastPath", sizeof(FastPath), 0,
                         Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, fast_slots};

void add_allocator(nb::module_& m) {
  s_malloc_slow = PyUnicode_InternFromString("_malloc_slow");
  s_free_slow = PyUnicode_InternFromString("_free_slow");
  s_drain = PyUnicode_InternFromString("_drain_pending_frees");
  zero = PyLong_FromLong(0);
  if (!s_malloc_slow || !s_free_slow || !s_drain || !zero) throw nb::python_error();
  s_malloc = PyUnicode_InternFromString("malloc");
  s_free = PyUnicode_InternFromString("free");
  if (!s_malloc || !s_free) throw nb::python_error();
  PyObject* type = PyType_FromSpec(&fast_spec);
  if (type == nullptr) throw nb::python_error();
  m.attr("AllocatorFastPath") = nb::steal(type);
  for (PyMethodDef* def : {&device_tensor_def, &bind_device_tensor_def}) {
    PyObject* fn = PyCFunction_NewEx(def, nullptr, m.ptr());
    if (fn == nullptr) throw nb::python_error();
    m.attr(def->ml_name) = nb::steal(fn);
  }
}

static cutegrad::Bindings reg(&add_allocator, nullptr);

#endif  // Py_GIL_DISABLED

}  // namespace
