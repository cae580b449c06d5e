/* A stand-in for libcuda.so.1 that keeps "device" memory in host shared memory.
 *
 * Test-only. It lets the CPU test suite drive jax_flux's GPU workspace code
 * (custom_calls/cuda_driver.py through ctypes, jax_flux/_cuda_workspace.py) with
 * the Triton interpreter reading and writing the "device" buffers, so the
 * driver calls' marshalling (argument order, out-pointers, the 64-byte IPC
 * handle passed by value), context handling and the IPC exchange are checked
 * without a GPU. It is compiled against the real cuda.h, so every function
 * here has the real prototype and the real exported name (cuMemAlloc is
 * cuMemAlloc_v2, and so on).
 *
 * Memory: every allocation is a file in /dev/shm mapped into this process;
 * its IPC handle carries the file name, so another process can map it.
 * Modules, streams, events and launches are recorded but nothing runs: the
 * rank emulation's launch marshalling is checked, not kernels.
 */
#define _GNU_SOURCE
#include <cuda.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_ALLOCS 4096
#define MAX_STACK 64

static int g_initialized = 0;
static int g_devices = 8;
/* FAKE_CUDA_P2P_ATOMICS=0 (read at cuInit): links without native atomics, as PCIe P2P. */
static int g_p2p_atomics = 1;
/* FAKE_CUDA_BUS_BASE (read at cuInit): the PCI bus number of ordinal 0; the
 * others follow. Processes of one test "machine" take disjoint ranges, as
 * processes that each see only their own GPUs (CUDA_VISIBLE_DEVICES) do. */
static int g_bus_base = 0x10;
static struct { uintptr_t ptr; size_t size; char name[64]; int device; int owned; } g_allocs[MAX_ALLOCS];
static int g_nallocs = 0;
static int g_counter = 0;
static unsigned char g_peer[64][64];
static __thread CUcontext t_stack[MAX_STACK];
static __thread int t_depth = 0;

static CUcontext ctx_of(int dev) { return (CUcontext)(uintptr_t)(0x1000 + dev); }
static int dev_of(CUcontext ctx) { return (int)((uintptr_t)ctx - 0x1000); }
static int valid_dev(int dev) { return dev >= 0 && dev < g_devices; }
static int current_dev(void) { return t_depth ? dev_of(t_stack[t_depth - 1]) : -1; }

static int find(uintptr_t ptr) {
  for (int i = 0; i < g_nallocs; i++)
    if (ptr >= g_allocs[i].ptr && ptr < g_allocs[i].ptr + g_allocs[i].size) return i;
  return -1;
}

CUresult CUDAAPI cuInit(unsigned int Flags) {
  if (Flags != 0) return CUDA_ERROR_INVALID_VALUE;
  const char *n = getenv("FAKE_CUDA_DEVICES");
  if (n) g_devices = atoi(n);
  const char *atomics = getenv("FAKE_CUDA_P2P_ATOMICS");
  g_p2p_atomics = atomics ? atoi(atomics) : 1;
  const char *base = getenv("FAKE_CUDA_BUS_BASE");
  g_bus_base = base ? atoi(base) : 0x10;
  g_initialized = 1;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorName(CUresult error, const char **pStr) {
  switch (error) {
    case CUDA_SUCCESS: *pStr = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *pStr = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *pStr = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *pStr = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case CUDA_ERROR_INVALID_DEVICE: *pStr = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *pStr = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_INVALID_HANDLE: *pStr = "CUDA_ERROR_INVALID_HANDLE"; break;
    case CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED: *pStr = "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *pStr = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: *pStr = NULL; return CUDA_ERROR_INVALID_VALUE;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal) {
  if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!valid_dev(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
  *device = ordinal;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
  if (!valid_dev(dev)) return CUDA_ERROR_INVALID_DEVICE;
  switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 132; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *pi = 232448; break;
    default: return CUDA_ERROR_NOT_SUPPORTED;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceCanAccessPeer(int *canAccessPeer, CUdevice dev, CUdevice peerDev) {
  if (!valid_dev(dev) || !valid_dev(peerDev)) return CUDA_ERROR_INVALID_DEVICE;
  *canAccessPeer = dev != peerDev;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetP2PAttribute(int *value, CUdevice_P2PAttribute attrib,
                                         CUdevice srcDevice, CUdevice dstDevice) {
  if (!valid_dev(srcDevice) || !valid_dev(dstDevice)) return CUDA_ERROR_INVALID_DEVICE;
  if (srcDevice == dstDevice) return CUDA_ERROR_INVALID_DEVICE;
  switch (attrib) {
    case CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK: *value = 0; break;
    case CU_DEVICE_P2P_ATTRIBUTE_ACCESS_SUPPORTED: *value = 1; break;
    case CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED: *value = g_p2p_atomics; break;
    default: return CUDA_ERROR_INVALID_VALUE;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev) {
  if (!valid_dev(dev)) return CUDA_ERROR_INVALID_DEVICE;
  if (len < 13) return CUDA_ERROR_INVALID_VALUE;
  snprintf(pciBusId, (size_t)len, "0000:%02X:00.0", g_bus_base + dev);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetByPCIBusId(CUdevice *dev, const char *pciBusId) {
  unsigned domain, bus, device, function;
  if (sscanf(pciBusId, "%x:%x:%x.%x", &domain, &bus, &device, &function) != 4)
    return CUDA_ERROR_INVALID_VALUE;
  int ordinal = (int)bus - g_bus_base;
  if (domain != 0 || device != 0 || function != 0 || !valid_dev(ordinal))
    return CUDA_ERROR_INVALID_DEVICE;
  *dev = ordinal;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
  if (!valid_dev(dev)) return CUDA_ERROR_INVALID_DEVICE;
  *pctx = ctx_of(dev);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxPushCurrent(CUcontext ctx) {
  if (!valid_dev(dev_of(ctx)) || t_depth == MAX_STACK) return CUDA_ERROR_INVALID_CONTEXT;
  t_stack[t_depth++] = ctx;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxPopCurrent(CUcontext *pctx) {
  if (!t_depth) return CUDA_ERROR_INVALID_CONTEXT;
  *pctx = t_stack[--t_depth];
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSynchronize(void) {
  return t_depth ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

CUresult CUDAAPI cuCtxEnablePeerAccess(CUcontext peerContext, unsigned int Flags) {
  int me = current_dev(), peer = dev_of(peerContext);
  if (me < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (Flags != 0 || !valid_dev(peer) || peer == me) return CUDA_ERROR_INVALID_VALUE;
  if (g_peer[me][peer]) return CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED;
  g_peer[me][peer] = 1;
  return CUDA_SUCCESS;
}

static CUresult map_file(const char *name, size_t size, uintptr_t *out) {
  char path[96];
  snprintf(path, sizeof path, "/dev/shm/%s", name);
  int fd = open(path, O_RDWR);
  if (fd < 0) return CUDA_ERROR_INVALID_HANDLE;
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  *out = (uintptr_t)p;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemAlloc(CUdeviceptr *dptr, size_t bytesize) {
  int dev = current_dev();
  if (dev < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
  if (g_nallocs == MAX_ALLOCS) return CUDA_ERROR_OUT_OF_MEMORY;
  char name[64];
  /* unique per process and per loaded copy of this library */
  snprintf(name, sizeof name, "fake_cuda-%d-%lx-%d", (int)getpid(), (unsigned long)(uintptr_t)&g_counter,
           g_counter++);
  /* The file stays until this process exits (see unlink_owned): peers open it by name. */
  char path[96];
  snprintf(path, sizeof path, "/dev/shm/%s", name);
  int fd = open(path, O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  if (ftruncate(fd, (off_t)bytesize) != 0) { close(fd); return CUDA_ERROR_OUT_OF_MEMORY; }
  void *p = mmap(NULL, bytesize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  memset(p, 0xA5, bytesize);  /* like real device memory: not zero until someone zeroes it */
  g_allocs[g_nallocs].ptr = (uintptr_t)p;
  g_allocs[g_nallocs].size = bytesize;
  g_allocs[g_nallocs].device = dev;
  g_allocs[g_nallocs].owned = 1;
  strncpy(g_allocs[g_nallocs].name, name, sizeof g_allocs[0].name - 1);
  g_nallocs++;
  *dptr = (CUdeviceptr)(uintptr_t)p;
  return CUDA_SUCCESS;
}

static CUresult check_range(CUdeviceptr p, size_t n) {
  int i = find((uintptr_t)p);
  if (i < 0 || (uintptr_t)p + n > g_allocs[i].ptr + g_allocs[i].size) return CUDA_ERROR_INVALID_VALUE;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemsetD8(CUdeviceptr dstDevice, unsigned char uc, size_t N) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  CUresult r = check_range(dstDevice, N);
  if (r) return r;
  memset((void *)(uintptr_t)dstDevice, uc, N);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr dstDevice, unsigned char uc, size_t N, CUstream hStream) {
  (void)hStream;
  return cuMemsetD8(dstDevice, uc, N);
}

CUresult CUDAAPI cuMemcpyHtoD(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  CUresult r = check_range(dstDevice, ByteCount);
  if (r) return r;
  memcpy((void *)(uintptr_t)dstDevice, srcHost, ByteCount);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemcpyDtoH(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  CUresult r = check_range(srcDevice, ByteCount);
  if (r) return r;
  memcpy(dstHost, (const void *)(uintptr_t)srcDevice, ByteCount);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuIpcGetMemHandle(CUipcMemHandle *pHandle, CUdeviceptr dptr) {
  int i = find((uintptr_t)dptr);
  if (i < 0 || !g_allocs[i].owned || g_allocs[i].ptr != (uintptr_t)dptr) return CUDA_ERROR_INVALID_VALUE;
  memset(pHandle->reserved, 0, CU_IPC_HANDLE_SIZE);
  /* name, NUL, then the size: a handle holds NUL bytes, as real ones do */
  size_t len = strlen(g_allocs[i].name);
  memcpy(pHandle->reserved, g_allocs[i].name, len);
  uint64_t size = g_allocs[i].size;
  memcpy(pHandle->reserved + CU_IPC_HANDLE_SIZE - 8, &size, 8);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int Flags) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (Flags != CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS) return CUDA_ERROR_INVALID_VALUE;
  char name[64];
  memcpy(name, handle.reserved, CU_IPC_HANDLE_SIZE - 8);
  name[CU_IPC_HANDLE_SIZE - 9] = 0;
  uint64_t size;
  memcpy(&size, handle.reserved + CU_IPC_HANDLE_SIZE - 8, 8);
  for (int i = 0; i < g_nallocs; i++)  /* a process cannot open its own handle */
    if (g_allocs[i].owned && strcmp(g_allocs[i].name, name) == 0) return CUDA_ERROR_INVALID_CONTEXT;
  uintptr_t p;
  CUresult r = map_file(name, size, &p);
  if (r) return r;
  if (g_nallocs == MAX_ALLOCS) return CUDA_ERROR_OUT_OF_MEMORY;
  g_allocs[g_nallocs].ptr = p;
  g_allocs[g_nallocs].size = size;
  g_allocs[g_nallocs].device = current_dev();
  g_allocs[g_nallocs].owned = 0;
  strncpy(g_allocs[g_nallocs].name, name, sizeof g_allocs[0].name - 1);
  g_nallocs++;
  *pdptr = (CUdeviceptr)p;
  return CUDA_SUCCESS;
}

/* Pinned host memory (cuMemHostAlloc): plain host memory here, with the same
 * address on the "device" (as under unified addressing). A mapping needs the
 * DEVICEMAP flag and a current context, as in the real driver. */
#define MAX_HOST_ALLOCS 1024
static struct { uintptr_t ptr; size_t size; unsigned int flags; } g_host[MAX_HOST_ALLOCS];
static int g_nhost = 0;

CUresult CUDAAPI cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (bytesize == 0 || Flags & ~(unsigned)(CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP |
                                            CU_MEMHOSTALLOC_WRITECOMBINED))
    return CUDA_ERROR_INVALID_VALUE;
  if (g_nhost == MAX_HOST_ALLOCS) return CUDA_ERROR_OUT_OF_MEMORY;
  void *p = NULL;
  if (posix_memalign(&p, 4096, bytesize) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
  memset(p, 0xA5, bytesize);  /* not zeroed, as in the real driver */
  g_host[g_nhost].ptr = (uintptr_t)p;
  g_host[g_nhost].size = bytesize;
  g_host[g_nhost].flags = Flags;
  g_nhost++;
  *pp = p;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemHostGetDevicePointer(CUdeviceptr *pdptr, void *p, unsigned int Flags) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (Flags != 0) return CUDA_ERROR_INVALID_VALUE;
  for (int i = 0; i < g_nhost; i++) {
    if ((uintptr_t)p >= g_host[i].ptr && (uintptr_t)p < g_host[i].ptr + g_host[i].size) {
      if (!(g_host[i].flags & CU_MEMHOSTALLOC_DEVICEMAP)) return CUDA_ERROR_INVALID_VALUE;
      *pdptr = (CUdeviceptr)(uintptr_t)p;
      return CUDA_SUCCESS;
    }
  }
  return CUDA_ERROR_INVALID_VALUE;
}

int fakeCudaHostAllocCount(void) { return g_nhost; }

__attribute__((destructor)) static void unlink_owned(void) {
  char path[96];
  for (int i = 0; i < g_nallocs; i++) {
    if (!g_allocs[i].owned) continue;
    snprintf(path, sizeof path, "/dev/shm/%s", g_allocs[i].name);
    unlink(path);
  }
}

/* Modules, streams, events and launches: recorded, not run (kernels do not
 * execute here). A test reads the launches back through fakeCudaLaunchCount /
 * fakeCudaLaunch after telling the fake how many 8-byte parameters a launch
 * carries (fakeCudaSetParamCount): the real driver learns that from the
 * kernel's image. */
#define MAX_LAUNCHES 256
#define MAX_PARAMS 32
static int g_param_count = 0;
static int g_nlaunches = 0;
static struct {
  uintptr_t function, stream;
  unsigned grid, block, shared;
  uint64_t params[MAX_PARAMS];
} g_launches[MAX_LAUNCHES];
static uintptr_t g_handles = 0x100000;

void fakeCudaSetParamCount(int n) { g_param_count = n < MAX_PARAMS ? n : MAX_PARAMS; }
int fakeCudaLaunchCount(void) { return g_nlaunches; }
int fakeCudaPeerAccess(int from, int to) { return g_peer[from][to]; }
/* The device whose context allocated or opened the block holding ptr, or -1. */
int fakeCudaDeviceOf(uint64_t ptr) {
  int i = find((uintptr_t)ptr);
  return i < 0 ? -1 : g_allocs[i].device;
}
int fakeCudaLaunch(int i, uint64_t *out) {  /* function, stream, grid, block, shared, params... */
  if (i < 0 || i >= g_nlaunches) return -1;
  out[0] = g_launches[i].function; out[1] = g_launches[i].stream; out[2] = g_launches[i].grid;
  out[3] = g_launches[i].block; out[4] = g_launches[i].shared;
  memcpy(out + 5, g_launches[i].params, sizeof(uint64_t) * (size_t)g_param_count);
  return g_param_count;
}

CUresult CUDAAPI cuModuleLoadData(CUmodule *module, const void *image) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (!image) return CUDA_ERROR_INVALID_VALUE;
  *module = (CUmodule)(g_handles++);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name) {
  if (!hmod || !name || !*name) return CUDA_ERROR_INVALID_VALUE;
  *hfunc = (CUfunction)(g_handles++);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncGetAttribute(int *pi, CUfunction_attribute attrib, CUfunction hfunc) {
  if (!hfunc || attrib != CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES) return CUDA_ERROR_INVALID_VALUE;
  *pi = 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib, int value) {
  if (!hfunc || attrib != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES || value > 232448)
    return CUDA_ERROR_INVALID_VALUE;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                                unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                                void **kernelParams, void **extra) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (!f || !kernelParams || extra || gridDimY != 1 || gridDimZ != 1 || blockDimY != 1 ||
      blockDimZ != 1 || g_nlaunches == MAX_LAUNCHES)
    return CUDA_ERROR_INVALID_VALUE;
  g_launches[g_nlaunches].function = (uintptr_t)f;
  g_launches[g_nlaunches].stream = (uintptr_t)hStream;
  g_launches[g_nlaunches].grid = gridDimX;
  g_launches[g_nlaunches].block = blockDimX;
  g_launches[g_nlaunches].shared = sharedMemBytes;
  for (int i = 0; i < g_param_count; i++)
    memcpy(&g_launches[g_nlaunches].params[i], kernelParams[i], sizeof(uint64_t));
  g_nlaunches++;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuStreamCreate(CUstream *phStream, unsigned int Flags) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (Flags != CU_STREAM_NON_BLOCKING) return CUDA_ERROR_INVALID_VALUE;
  *phStream = (CUstream)(g_handles++);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuStreamSynchronize(CUstream hStream) {
  return hStream ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
CUresult CUDAAPI cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags) {
  return hStream && hEvent && !Flags ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
CUresult CUDAAPI cuEventCreate(CUevent *phEvent, unsigned int Flags) {
  if (current_dev() < 0) return CUDA_ERROR_INVALID_CONTEXT;
  (void)Flags;
  *phEvent = (CUevent)(g_handles++);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuEventRecord(CUevent hEvent, CUstream hStream) {
  return hEvent && hStream ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
CUresult CUDAAPI cuEventSynchronize(CUevent hEvent) {
  return hEvent ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
CUresult CUDAAPI cuEventElapsedTime(float *pMilliseconds, CUevent hStart, CUevent hEnd) {
  if (!hStart || !hEnd) return CUDA_ERROR_INVALID_HANDLE;
  *pMilliseconds = 1.0f;
  return CUDA_SUCCESS;
}
