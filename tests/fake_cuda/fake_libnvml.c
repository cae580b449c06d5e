/* A stand-in for libnvidia-ml.so.1: the P2P status of the links between the
 * GPUs of one test "machine", for custom_calls/nvml.py through ctypes.
 *
 * Test-only. No nvml.h on the CI host: the few types are declared here with
 * the real ABI (enums are 32-bit ints, a device handle is a pointer) and the
 * real exported names (nvmlInit_v2, nvmlDeviceGetHandleByPciBusId_v2).
 *
 * The machine: FAKE_NVML_GPUS GPUs (default 8) at PCI bus numbers 0x10 on,
 * the numbering of tests/fake_cuda's libcuda (FAKE_CUDA_BUS_BASE: where each
 * process's own GPUs start). FAKE_NVML_P2P_ATOMICS=0: links without native
 * atomics, as PCIe P2P. Read at nvmlInit_v2.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;
enum { NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
       NVML_ERROR_NOT_FOUND = 6 };
enum { CAPS_READ = 0, CAPS_WRITE = 1, CAPS_NVLINK = 2, CAPS_ATOMICS = 3 };
enum { STATUS_OK = 0, STATUS_NOT_SUPPORTED = 5 };

#define FIRST_BUS 0x10

static int g_initialized = 0;
static int g_gpus = 8;
static int g_atomics = 1;
static int g_queries = 0;

static int gpu_of(nvmlDevice_t d) { return (int)((uintptr_t)d - 0x2000); }
static int valid(nvmlDevice_t d) { return gpu_of(d) >= 0 && gpu_of(d) < g_gpus; }

nvmlReturn_t nvmlInit_v2(void) {
  const char *n = getenv("FAKE_NVML_GPUS");
  const char *atomics = getenv("FAKE_NVML_P2P_ATOMICS");
  g_gpus = n ? atoi(n) : 8;
  g_atomics = atomics ? atoi(atomics) : 1;
  g_initialized = 1;
  return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
  switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    default: return "Unknown Error";
  }
}

nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device) {
  unsigned domain, bus, dev, function;
  if (!g_initialized) return NVML_ERROR_UNINITIALIZED;
  if (!pciBusId || !device) return NVML_ERROR_INVALID_ARGUMENT;
  if (sscanf(pciBusId, "%x:%x:%x.%x", &domain, &bus, &dev, &function) != 4)
    return NVML_ERROR_INVALID_ARGUMENT;
  int gpu = (int)bus - FIRST_BUS;
  if (domain != 0 || dev != 0 || function != 0 || gpu < 0 || gpu >= g_gpus)
    return NVML_ERROR_NOT_FOUND;
  *device = (nvmlDevice_t)(uintptr_t)(0x2000 + gpu);
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetP2PStatus(nvmlDevice_t a, nvmlDevice_t b, int index, int *status) {
  if (!g_initialized) return NVML_ERROR_UNINITIALIZED;
  if (!valid(a) || !valid(b) || a == b || !status || index < 0 || index > 4)
    return NVML_ERROR_INVALID_ARGUMENT;
  g_queries++;
  *status = (index == CAPS_ATOMICS || index == CAPS_NVLINK) && !g_atomics ? STATUS_NOT_SUPPORTED
                                                                           : STATUS_OK;
  return NVML_SUCCESS;
}

/* Test hook: how many P2P statuses were asked. */
int fakeNvmlP2PQueries(void) { return g_queries; }
