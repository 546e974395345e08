// Shared helpers of the wideep FFI library: error plumbing and the PTX
// memory-ordering primitives the one-sided kernels synchronise with.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace wideep {

namespace ffi = xla::ffi;

// Last error of the ctypes-facing C API, per calling thread.
inline thread_local std::string g_last_error;

inline int Fail(std::string message) {
  g_last_error = std::move(message);
  return -1;
}

#define WIDEEP_CUDA_OR_FAIL(expr)                                                   \
  do {                                                                              \
    cudaError_t err_ = (expr);                                                      \
    if (err_ != cudaSuccess)                                                        \
      return ::wideep::Fail(std::string(#expr) + " failed: " + cudaGetErrorString(err_)); \
  } while (0)

#define WIDEEP_CUDA_OR_RETURN(expr)                                                 \
  do {                                                                              \
    cudaError_t err_ = (expr);                                                      \
    if (err_ != cudaSuccess)                                                        \
      return ::xla::ffi::Error::Internal(std::string(#expr) + " failed: " +        \
                                         cudaGetErrorString(err_));                 \
  } while (0)

constexpr int kMaxRanks = 64;

__host__ __device__ inline int64_t AlignUp(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// Restores the calling thread's current device (the C API switches devices).
class DeviceGuard {
 public:
  DeviceGuard() { cudaGetDevice(&saved_); }
  ~DeviceGuard() { cudaSetDevice(saved_); }

 private:
  int saved_ = 0;
};

#ifdef __CUDACC__
__device__ __forceinline__ uint64_t LoadAcquireSys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreReleaseSys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// A release fence then relaxed stores: each store is a release of every write
// the thread (and, through a preceding warp barrier, its warp) made before the fence.
__device__ __forceinline__ void FenceAcqRelSys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

__device__ __forceinline__ void StoreRelaxedSys(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif

}  // namespace wideep
