"""The DLPack C ABI in ctypes: structs, enums and the PyCapsule calls.

Mirrors dlpack.h (v1.x): DLTensor, DLManagedTensor (the legacy "dltensor"
capsule) and DLManagedTensorVersioned ("dltensor_versioned"). Only layouts and
constants live here; what cutegrad does with them is in `dlpack.py`.

Everything a foreign consumer may touch after Python has started tearing
modules down (capsule names, the deleter thunk, the capsule destructor thunk)
is made immortal with an extra reference: a PyTorch tensor that outlives this
module at interpreter exit still calls our deleter, and that call must not
land in freed memory.
"""
import ctypes

# DLDeviceType
kDLCPU = 1
kDLCUDA = 2
kDLCUDAHost = 3
kDLROCM = 10
kDLCUDAManaged = 13

# DLDataTypeCode
kDLInt = 0
kDLUInt = 1
kDLFloat = 2
kDLBfloat = 4
kDLComplex = 5
kDLBool = 6

FLAG_READ_ONLY = 1 << 0
FLAG_IS_COPIED = 1 << 1

# The versioned struct cutegrad produces and the newest major it reads; minor
# versions of 1.x only add enum values, never change these layouts.
VERSION = (1, 1)


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


# Both managed structs take their own address; one C signature serves both.
# CFUNCTYPE (not PYFUNCTYPE): a consumer may call the deleter from a thread
# that does not hold the GIL, and ctypes then takes it for us.
DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

_api = ctypes.pythonapi
# Arguments are raw addresses (c_void_p), not py_object: the destructor runs
# while the capsule is being deallocated, when taking a new reference is illegal.
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, CAPSULE_DESTRUCTOR]
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_api.PyCapsule_GetName.restype = ctypes.c_char_p
_api.PyCapsule_GetName.argtypes = [ctypes.c_void_p]
_api.PyCapsule_SetName.restype = ctypes.c_int
_api.PyCapsule_SetName.argtypes = [ctypes.c_void_p, ctypes.c_void_p]


def immortal(obj):
    """Keep obj alive until the process ends (see the module docstring)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    return obj


def _c_string(text):
    # A capsule stores the name pointer, not a copy: it must never be freed.
    return immortal(ctypes.create_string_buffer(text))


NAME_LEGACY = _c_string(b"dltensor")
NAME_VERSIONED = _c_string(b"dltensor_versioned")
NAME_USED_LEGACY = _c_string(b"used_dltensor")
NAME_USED_VERSIONED = _c_string(b"used_dltensor_versioned")

# There is no public name for the capsule type before Python 3.13 (types.CapsuleType).
CapsuleType = type(_api.PyCapsule_New(1, None, CAPSULE_DESTRUCTOR()))


def new_capsule(address, name, destructor):
    return _api.PyCapsule_New(address, ctypes.cast(name, ctypes.c_char_p), destructor)


def capsule_is(capsule_address, name):
    return bool(_api.PyCapsule_IsValid(capsule_address, ctypes.cast(name, ctypes.c_char_p)))


def capsule_pointer(capsule_address, name):
    return _api.PyCapsule_GetPointer(capsule_address, ctypes.cast(name, ctypes.c_char_p))


def capsule_name(capsule_address):
    name = _api.PyCapsule_GetName(capsule_address)
    return None if name is None else name.decode("utf-8", "replace")


def rename_capsule(capsule_address, name):
    if _api.PyCapsule_SetName(capsule_address, ctypes.addressof(name)) != 0:
        raise RuntimeError("PyCapsule_SetName failed")
