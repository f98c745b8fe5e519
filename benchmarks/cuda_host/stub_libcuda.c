// A stand-in libcuda.so.1 for measuring host-side launch cost without a GPU (benchmarks/cuda_host_cost.py).
// Every driver call Triton's launcher makes succeeds at once and does nothing; device queries answer as an
// H100/H200-class device (sm_90, 132 SMs). Kernels never run: only the CPU work around a launch is real.
#include <cuda.h>
#include <string.h>

static int fake_object;
#define FAKE ((void*)&fake_object)

CUresult CUDAAPI cuInit(unsigned int flags) { (void)flags; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDriverGetVersion(int* v) { *v = 12080; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGetCount(int* n) { *n = 1; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGet(CUdevice* d, int ordinal) { *d = ordinal; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGetAttribute(int* pi, CUdevice_attribute a, CUdevice d) {
  (void)d;
  switch (a) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 132; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *pi = 232448; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *pi = 233472; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: *pi = 65536; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *pi = 2048; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *pi = 32; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *pi = 1980000; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *pi = 2619000; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *pi = 5120; break;
    default: *pi = 1;
  }
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) { (void)d; *c = FAKE; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetCurrent(CUcontext* c) { *c = FAKE; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetCurrent(CUcontext c) { (void)c; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice* d) { *d = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetLimit(size_t* v, CUlimit l) { (void)l; *v = 1 << 20; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetLimit(CUlimit l, size_t v) { (void)l; (void)v; return CUDA_SUCCESS; }
CUresult CUDAAPI cuGetErrorString(CUresult e, const char** s) { (void)e; *s = "stub libcuda"; return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleLoadData(CUmodule* m, const void* image) { (void)image; *m = FAKE; return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleUnload(CUmodule m) { (void)m; return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
  (void)m; (void)name; *f = FAKE; return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncGetAttribute(int* pi, CUfunction_attribute a, CUfunction f) {
  (void)f;
  *pi = a == CU_FUNC_ATTRIBUTE_NUM_REGS ? 32 : a == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
  (void)f; (void)a; (void)v; return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { (void)f; (void)c; return CUDA_SUCCESS; }
CUresult CUDAAPI cuOccupancyMaxActiveClusters(int* n, CUfunction f, const CUlaunchConfig* c) {
  (void)f; (void)c; *n = 1; return CUDA_SUCCESS;
}
CUresult CUDAAPI cuPointerGetAttribute(void* data, CUpointer_attribute a, CUdeviceptr p) {
  if (a == CU_POINTER_ATTRIBUTE_DEVICE_POINTER) *(CUdeviceptr*)data = p;
  else if (a == CU_POINTER_ATTRIBUTE_MEMORY_TYPE) *(unsigned int*)data = CU_MEMORYTYPE_DEVICE;
  else *(int*)data = 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuPointerGetAttributes(unsigned int n, CUpointer_attribute* a, void** data, CUdeviceptr p) {
  for (unsigned int i = 0; i < n; ++i) cuPointerGetAttribute(data[i], a[i], p);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus* st) {
  (void)s; *st = CU_STREAM_CAPTURE_STATUS_NONE; return CUDA_SUCCESS;
}
// The last launch, for tests that compare two ways of launching the same kernel: grid, block, shared
// memory, stream and the bytes of its parameters, whose count and sizes the test gives beforehand
// (stub_expect; it holds for the next two launches, then parameters are not read).
static struct {
  unsigned dims[7];
  void* stream;
  int n, launches_left;
  int sizes[64];
  unsigned char bytes[64][8];
} last;

void stub_expect(int n, const int* sizes) {
  last.n = n < 64 ? n : 64;
  last.launches_left = 2;
  for (int i = 0; i < last.n; ++i) last.sizes[i] = sizes[i] < 8 ? sizes[i] : 8;
}

// dims (7 unsigned: grid xyz, block xyz, shared bytes), stream, then n x 8 parameter bytes (zero-padded)
void stub_last(unsigned* dims, void** stream, unsigned char* bytes) {
  memcpy(dims, last.dims, sizeof(last.dims));
  *stream = last.stream;
  memcpy(bytes, last.bytes, (size_t)last.n * 8);
}

static void record(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared,
                   void* stream, void** params) {
  unsigned dims[7] = {gx, gy, gz, bx, by, bz, shared};
  memcpy(last.dims, dims, sizeof(dims));
  last.stream = stream;
  memset(last.bytes, 0, sizeof(last.bytes));
  if (last.launches_left <= 0) return;
  --last.launches_left;
  for (int i = 0; i < last.n && params; ++i) memcpy(last.bytes[i], params[i], (size_t)last.sizes[i]);
}

CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig* c, CUfunction f, void** params, void** extra) {
  (void)f; (void)extra;
  record(c->gridDimX, c->gridDimY, c->gridDimZ, c->blockDimX, c->blockDimY, c->blockDimZ, c->sharedMemBytes,
         (void*)c->hStream, params);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                unsigned bz, unsigned shared, CUstream s, void** params, void** extra) {
  (void)f; (void)extra;
  record(gx, gy, gz, bx, by, bz, shared, (void*)s, params);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap* m, CUtensorMapDataType t, cuuint32_t r, void* g,
                                        const cuuint64_t* d, const cuuint64_t* s, const cuuint32_t* b,
                                        const cuuint32_t* e, CUtensorMapInterleave i, CUtensorMapSwizzle w,
                                        CUtensorMapL2promotion l, CUtensorMapFloatOOBfill o) {
  (void)t; (void)r; (void)g; (void)d; (void)s; (void)b; (void)e; (void)i; (void)w; (void)l; (void)o;
  memset(m, 0, sizeof(*m));
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap* m, CUtensorMapDataType t, cuuint32_t r, void* g,
                                         const cuuint64_t* d, const cuuint64_t* s, const int* lo, const int* hi,
                                         cuuint32_t c, cuuint32_t p, const cuuint32_t* e, CUtensorMapInterleave i,
                                         CUtensorMapSwizzle w, CUtensorMapL2promotion l,
                                         CUtensorMapFloatOOBfill o) {
  (void)t; (void)r; (void)g; (void)d; (void)s; (void)lo; (void)hi; (void)c; (void)p; (void)e; (void)i; (void)w;
  (void)l; (void)o;
  memset(m, 0, sizeof(*m));
  return CUDA_SUCCESS;
}
