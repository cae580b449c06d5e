"""What NVML (the driver's management library, through ctypes) says about the
link between two GPUs named by PCI bus id.

The fused kernels need their peers' memory over a link with native atomics
(``jax_flux._cuda_workspace.check_links``). Within a process the CUDA driver
answers that (``cuda_driver.p2p_attributes``); with one process per GPU a
process often sees only its own GPU (``CUDA_VISIBLE_DEVICES``), and its driver
cannot name a peer's. NVML sees every GPU of the machine whatever CUDA sees,
as NCCL's and NVSHMEM's topology checks rely on.

Written in a session without a GPU; tests/fake_cuda's libnvml stands in for it
in the CPU tests.
"""

from __future__ import annotations

import ctypes
import functools
import os

_SUCCESS = 0
# nvmlGpuP2PCapsIndex_t: the capabilities asked; nvmlGpuP2PStatus_t: 0 is OK.
_CAPS = {"read": 0, "write": 1, "native_atomics": 3}
_P2P_STATUS_OK = 0


class NvmlError(RuntimeError):
    """NVML is not here, or a call failed."""


@functools.cache
def lib() -> ctypes.CDLL:
    """libnvidia-ml (or ``$JAX_FLUX_LIBNVML``) with argument types set, after ``nvmlInit``."""
    path = os.environ.get("JAX_FLUX_LIBNVML", "libnvidia-ml.so.1")
    try:
        nvml = ctypes.CDLL(path)
    except OSError as e:
        raise NvmlError(f"NVML ({path}) is not loadable here: {e}") from e
    p, u32, i32 = ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
    sigs = {
        "nvmlInit_v2": [],
        "nvmlDeviceGetHandleByPciBusId_v2": [ctypes.c_char_p, ctypes.POINTER(p)],
        "nvmlDeviceGetP2PStatus": [p, p, u32, ctypes.POINTER(u32)],
    }
    for name, args in sigs.items():
        fn = getattr(nvml, name)
        fn.argtypes, fn.restype = args, i32
    nvml.nvmlErrorString.argtypes, nvml.nvmlErrorString.restype = [i32], ctypes.c_char_p
    _check(nvml, nvml.nvmlInit_v2(), "nvmlInit")
    return nvml


def _check(nvml, code: int, what: str) -> None:
    if code != _SUCCESS:
        text = nvml.nvmlErrorString(code)
        raise NvmlError(f"{what} failed: {text.decode() if text else code}")


@functools.cache
def _device(bus: str) -> int:
    nvml, handle = lib(), ctypes.c_void_p()
    _check(nvml, nvml.nvmlDeviceGetHandleByPciBusId_v2(bus.encode(), ctypes.byref(handle)),
           f"nvmlDeviceGetHandleByPciBusId({bus!r})")
    return handle.value


def link(a: str, b: str) -> dict[str, bool]:
    """What the link from the GPU at bus id ``a`` to the one at ``b`` supports:
    ``access`` (peer reads and writes) and ``native_atomics`` (NVLink has
    them, PCIe P2P does not). NvmlError where NVML cannot tell."""
    nvml, status, out = lib(), ctypes.c_uint(), {}
    for name, index in _CAPS.items():
        _check(nvml, nvml.nvmlDeviceGetP2PStatus(_device(a), _device(b), index,
                                                 ctypes.byref(status)),
               f"nvmlDeviceGetP2PStatus({name}, {a}->{b})")
        out[name] = status.value == _P2P_STATUS_OK
    return {"access": out["read"] and out["write"], "native_atomics": out["native_atomics"]}
