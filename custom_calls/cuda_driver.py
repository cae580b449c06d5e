"""The CUDA driver calls jax_flux needs, through ctypes on libcuda (no torch, no cupy).

Two users: the symmetric workspace (``jax_flux.workspace``: device memory in
each device's primary context, the one XLA uses; peer access; IPC handles),
and ``custom_calls.rank_emulation`` (P ranks of a fused kernel on one GPU,
each launched on its own stream: modules, streams, events, launches, copies).

Every call is checked; a failure raises ``CudaError`` naming the call and the
driver's error name. Memory from ``allocate`` is never freed: programs
compiled against a workspace may run until the process exits.

Written in a session without a GPU: the GPU tests (``tests/test_gpu_fused.py``)
are what exercise it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os

PEER_ACCESS_ALREADY_ENABLED = 704
_INVALID_VALUE, _INVALID_DEVICE = 1, 101
_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_STREAM_NON_BLOCKING = 1
_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
_MEMHOSTALLOC_PORTABLE = 0x01
_MEMHOSTALLOC_DEVICEMAP = 0x02


class CudaError(RuntimeError):
    """A CUDA driver call failed."""


class IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


@functools.cache
def lib() -> ctypes.CDLL:
    """libcuda (or ``$JAX_FLUX_LIBCUDA``) with argument types set, after ``cuInit``."""
    path = os.environ.get("JAX_FLUX_LIBCUDA", "libcuda.so.1")
    try:
        cuda = ctypes.CDLL(path)
    except OSError as e:
        raise CudaError(f"jax_flux needs the CUDA driver ({path}) here: {e}") from e
    p, u64, i32, u32, size = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint,
                              ctypes.c_size_t)
    ptr = ctypes.POINTER
    sigs = {
        "cuInit": [u32],
        "cuGetErrorName": [i32, ptr(ctypes.c_char_p)],
        "cuDeviceGet": [ptr(i32), i32],
        "cuDeviceGetAttribute": [ptr(i32), i32, i32],
        "cuDeviceCanAccessPeer": [ptr(i32), i32, i32],
        "cuDeviceGetP2PAttribute": [ptr(i32), i32, i32, i32],
        "cuDeviceGetPCIBusId": [ctypes.c_char_p, i32, i32],
        "cuDeviceGetByPCIBusId": [ptr(i32), ctypes.c_char_p],
        "cuDevicePrimaryCtxRetain": [ptr(p), i32],
        "cuCtxPushCurrent_v2": [p],
        "cuCtxPopCurrent_v2": [ptr(p)],
        "cuCtxSynchronize": [],
        "cuCtxEnablePeerAccess": [p, u32],
        "cuMemAlloc_v2": [ptr(u64), size],
        "cuMemHostAlloc": [ptr(p), size, u32],
        "cuMemHostGetDevicePointer_v2": [ptr(u64), p, u32],
        "cuMemsetD8_v2": [u64, ctypes.c_ubyte, size],
        "cuMemsetD8Async": [u64, ctypes.c_ubyte, size, p],
        "cuMemcpyHtoD_v2": [u64, p, size],
        "cuMemcpyDtoH_v2": [p, u64, size],
        "cuIpcGetMemHandle": [ptr(IpcMemHandle), u64],
        "cuIpcOpenMemHandle_v2": [ptr(u64), IpcMemHandle, u32],
        "cuModuleLoadData": [ptr(p), p],
        "cuModuleGetFunction": [ptr(p), p, ctypes.c_char_p],
        "cuFuncGetAttribute": [ptr(i32), i32, p],
        "cuFuncSetAttribute": [p, i32, i32],
        "cuStreamCreate": [ptr(p), u32],
        "cuStreamSynchronize": [p],
        "cuStreamWaitEvent": [p, p, u32],
        "cuEventCreate": [ptr(p), u32],
        "cuEventRecord": [p, p],
        "cuEventSynchronize": [p],
        "cuLaunchKernel": [p, u32, u32, u32, u32, u32, u32, u32, p, ptr(p), ptr(p)],
    }
    for name, args in sigs.items():
        fn = getattr(cuda, name)
        fn.argtypes, fn.restype = args, i32
    # CUDA 12.8 added cuEventElapsedTime_v2 (same signature); newer drivers may
    # keep only that one.
    elapsed = getattr(cuda, "cuEventElapsedTime_v2", None) or getattr(cuda, "cuEventElapsedTime")
    elapsed.argtypes, elapsed.restype = [ptr(ctypes.c_float), p, p], i32
    cuda.event_elapsed_time = elapsed
    check(cuda.cuInit(0), "cuInit", cuda)
    return cuda


def check(code: int, what: str, cuda=None, *, ok: tuple[int, ...] = ()) -> None:
    """Raises CudaError unless ``code`` is CUDA_SUCCESS or in ``ok``."""
    if code == 0 or code in ok:
        return
    cuda = cuda or lib()
    name = ctypes.c_char_p()
    cuda.cuGetErrorName(code, ctypes.byref(name))
    raise CudaError(f"{what} failed: {name.value.decode() if name.value else code}")


@functools.cache
def context(ordinal: int) -> int:
    """The primary context of CUDA device ``ordinal`` (retained, never released)."""
    cuda, dev, ctx = lib(), ctypes.c_int(), ctypes.c_void_p()
    check(cuda.cuDeviceGet(ctypes.byref(dev), ordinal), f"cuDeviceGet({ordinal})")
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev),
          f"cuDevicePrimaryCtxRetain({ordinal})")
    return ctx.value


@contextlib.contextmanager
def current(ordinal: int):
    """Makes device ``ordinal``'s primary context current on this thread, then restores."""
    cuda = lib()
    check(cuda.cuCtxPushCurrent_v2(context(ordinal)), "cuCtxPushCurrent")
    try:
        yield cuda
    finally:
        popped = ctypes.c_void_p()
        cuda.cuCtxPopCurrent_v2(ctypes.byref(popped))


def attribute(ordinal: int, attr: int) -> int:
    value = ctypes.c_int()
    check(lib().cuDeviceGetAttribute(ctypes.byref(value), attr, ordinal), "cuDeviceGetAttribute")
    return value.value


def multiprocessor_count(ordinal: int) -> int:
    return attribute(ordinal, _DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)


# ------------------------------------------------------------------- memory


def allocate(ordinal: int, nbytes: int) -> int:
    """``nbytes`` of zeroed device memory on ``ordinal``; returns its address."""
    ptr = ctypes.c_uint64()
    with current(ordinal) as cuda:
        check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), nbytes),
              f"cuMemAlloc of {nbytes} bytes on GPU {ordinal} (jax_flux's workspace lives "
              f"outside XLA's pool, which takes 75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION "
              f"says less)")
        check(cuda.cuMemsetD8_v2(ptr.value, 0, nbytes), "cuMemsetD8")
        check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    return ptr.value


def host_mapped(ordinal: int, nbytes: int) -> tuple[int, int]:
    """``nbytes`` of zeroed pinned host memory that device ``ordinal`` can write.

    Returns (host address, device address on ``ordinal``). Portable and mapped:
    the host reads it with plain loads, without a CUDA call and without
    waiting for the device (``jax_flux.errors`` polls error records there).
    """
    host, dev = ctypes.c_void_p(), ctypes.c_uint64()
    with current(ordinal) as cuda:
        check(cuda.cuMemHostAlloc(ctypes.byref(host), nbytes,
                                  _MEMHOSTALLOC_PORTABLE | _MEMHOSTALLOC_DEVICEMAP),
              f"cuMemHostAlloc of {nbytes} bytes")
        ctypes.memset(host.value, 0, nbytes)
        check(cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(dev), host.value, 0),
              "cuMemHostGetDevicePointer")
    return host.value, dev.value


def fill(ordinal: int, ptr: int, nbytes: int, byte: int = 0, stream: int | None = None) -> None:
    """Sets ``nbytes`` at ``ptr`` to ``byte``: synchronously, or queued on ``stream``."""
    with current(ordinal) as cuda:
        if stream is None:
            check(cuda.cuMemsetD8_v2(ptr, byte, nbytes), "cuMemsetD8")
            check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        else:
            check(cuda.cuMemsetD8Async(ptr, byte, nbytes, stream), "cuMemsetD8Async")


def to_device(ordinal: int, ptr: int, host) -> None:
    """Copies a C-contiguous numpy array to device memory at ``ptr``, completely.

    From pageable memory cuMemcpyHtoD may return before its DMA lands, and
    non-blocking streams do not wait for the legacy stream: synchronise, so a
    kernel launched next on any stream sees the data.
    """
    with current(ordinal) as cuda:
        check(cuda.cuMemcpyHtoD_v2(ptr, host.ctypes.data, host.nbytes), "cuMemcpyHtoD")
        check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")


def to_host(ordinal: int, ptr: int, host) -> None:
    """Copies device memory at ``ptr`` into a C-contiguous numpy array."""
    with current(ordinal) as cuda:
        check(cuda.cuMemcpyDtoH_v2(host.ctypes.data, ptr, host.nbytes), "cuMemcpyDtoH")


def enable_peer_access(ordinals) -> None:
    """Lets every device in ``ordinals`` access every other one's memory."""
    ordinals = sorted(set(ordinals))
    cuda = lib()
    for a in ordinals:
        for b in ordinals:
            if a == b:
                continue
            can = ctypes.c_int()
            check(cuda.cuDeviceCanAccessPeer(ctypes.byref(can), a, b), "cuDeviceCanAccessPeer")
            if not can.value:
                raise CudaError(f"GPU {a} cannot access GPU {b}'s memory (no P2P path); "
                                f"impl='fused' needs every pair of GPUs on a fused axis "
                                f"connected (NVLink)")
            with current(a):
                check(cuda.cuCtxEnablePeerAccess(context(b), 0), f"cuCtxEnablePeerAccess({a}->{b})",
                      ok=(PEER_ACCESS_ALREADY_ENABLED,))


# CUdevice_P2PAttribute
_P2P_ATTRIBUTES = {"performance_rank": 1, "access": 2, "native_atomics": 3}


def p2p_attributes(a: int, b: int) -> dict[str, int]:
    """What the link from GPU ``a`` to GPU ``b`` supports: ``access`` (peer access
    at all), ``native_atomics`` (atomics over the link: NVLink has them, PCIe
    P2P does not) and its relative ``performance_rank``."""
    cuda, out = lib(), {}
    for name, attr in _P2P_ATTRIBUTES.items():
        value = ctypes.c_int()
        check(cuda.cuDeviceGetP2PAttribute(ctypes.byref(value), attr, a, b),
              f"cuDeviceGetP2PAttribute({name}, {a}->{b})")
        out[name] = value.value
    return out


def weak_links(ordinals) -> tuple[list, list]:
    """The directed links (from, to) among GPUs ``ordinals`` that the fused kernels
    cannot use: (those without peer access, those with access but no native
    atomics: PCIe P2P, not NVLink)."""
    no_access, no_atomics = [], []
    for a, b in itertools.permutations(sorted(set(ordinals)), 2):
        link = p2p_attributes(a, b)
        if not link["access"]:
            no_access.append((a, b))
        elif not link["native_atomics"]:
            no_atomics.append((a, b))
    return no_access, no_atomics


def bus_id(ordinal: int) -> str:
    """The PCI bus id of GPU ``ordinal`` ("0000:1B:00.0"): what names a GPU to
    every process of a machine, whichever GPUs each one sees."""
    buf = ctypes.create_string_buffer(32)
    check(lib().cuDeviceGetPCIBusId(buf, len(buf), ordinal), f"cuDeviceGetPCIBusId({ordinal})")
    return buf.value.decode()


def ordinal_of_bus(bus: str) -> int | None:
    """This process's ordinal of the GPU at PCI bus id ``bus``; None where this
    process does not see it (``CUDA_VISIBLE_DEVICES``). Which of the two codes
    the driver gives for a hidden GPU is not verified on a GPU; both mean the
    id, which another process's driver wrote, names no device here."""
    dev = ctypes.c_int()
    code = lib().cuDeviceGetByPCIBusId(ctypes.byref(dev), bus.encode())
    if code in (_INVALID_DEVICE, _INVALID_VALUE):
        return None
    check(code, f"cuDeviceGetByPCIBusId({bus!r})")
    return dev.value


def export_handle(ordinal: int, ptr: int) -> bytes:
    """The CUDA IPC handle of an ``allocate``d block (64 bytes, may hold NULs)."""
    handle = IpcMemHandle()
    with current(ordinal) as cuda:
        check(cuda.cuIpcGetMemHandle(ctypes.byref(handle), ptr), "cuIpcGetMemHandle")
    return ctypes.string_at(ctypes.addressof(handle), ctypes.sizeof(handle))


def open_handle(ordinal: int, handle: bytes) -> int:
    """Maps another process's block into this one, for device ``ordinal``."""
    h = IpcMemHandle()
    ctypes.memmove(ctypes.addressof(h), handle, ctypes.sizeof(h))
    ptr = ctypes.c_uint64()
    with current(ordinal) as cuda:
        check(cuda.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h, _IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
              "cuIpcOpenMemHandle (ranks of a fused axis must share one host)")
    return ptr.value


# ------------------------------------------------------- modules and launches


def load_function(ordinal: int, cubin: bytes, name: str, shared: int) -> int:
    """Loads a cubin on ``ordinal`` (eagerly: no lazy loading under spinning kernels)
    and returns its kernel ``name``, allowed ``shared`` bytes of shared memory."""
    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
    buf = ctypes.create_string_buffer(cubin, len(cubin))
    with current(ordinal) as cuda:
        check(cuda.cuModuleLoadData(ctypes.byref(module), buf), f"cuModuleLoadData({name})")
        check(cuda.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()),
              f"cuModuleGetFunction({name})")
        if shared > 49152:  # beyond the default 48 KiB, opt in (as Triton's loader does)
            static = ctypes.c_int()
            check(cuda.cuFuncGetAttribute(ctypes.byref(static), _FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                                          fn), "cuFuncGetAttribute")
            optin = attribute(ordinal, _DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            check(cuda.cuFuncSetAttribute(fn, _FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                          optin - static.value), "cuFuncSetAttribute")
    return fn.value


def launch(ordinal: int, fn: int, grid: int, threads: int, shared: int, stream: int,
           params: list) -> None:
    """Queues ``fn`` on ``stream``; ``params`` are ctypes values, one per kernel parameter."""
    array = (ctypes.c_void_p * len(params))(*[ctypes.addressof(p) for p in params])
    with current(ordinal) as cuda:
        check(cuda.cuLaunchKernel(fn, grid, 1, 1, threads, 1, 1, shared, stream, array, None),
              "cuLaunchKernel")


def stream(ordinal: int) -> int:
    s = ctypes.c_void_p()
    with current(ordinal) as cuda:
        check(cuda.cuStreamCreate(ctypes.byref(s), _STREAM_NON_BLOCKING), "cuStreamCreate")
    return s.value


def synchronize(ordinal: int, stream_: int) -> None:
    with current(ordinal) as cuda:
        check(cuda.cuStreamSynchronize(stream_), "cuStreamSynchronize")


def event(ordinal: int) -> int:
    e = ctypes.c_void_p()
    with current(ordinal) as cuda:
        check(cuda.cuEventCreate(ctypes.byref(e), 0), "cuEventCreate")
    return e.value


def record(ordinal: int, event_: int, stream_: int) -> None:
    with current(ordinal) as cuda:
        check(cuda.cuEventRecord(event_, stream_), "cuEventRecord")


def wait(ordinal: int, stream_: int, event_: int) -> None:
    """Makes ``stream_`` wait for ``event_``."""
    with current(ordinal) as cuda:
        check(cuda.cuStreamWaitEvent(stream_, event_, 0), "cuStreamWaitEvent")


def elapsed_ms(ordinal: int, start: int, end: int) -> float:
    ms = ctypes.c_float()
    with current(ordinal) as cuda:
        check(cuda.cuEventSynchronize(end), "cuEventSynchronize")
        check(cuda.event_elapsed_time(ctypes.byref(ms), start, end), "cuEventElapsedTime")
    return float(ms.value)
