// Shared helpers of the wideep FFI library: error plumbing and the PTX
// memory-ordering primitives the one-sided kernels synchronise with.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
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

// Whether `dims` (a buffer's dimensions) is exactly `want`.
template <typename Dims>
bool HasDims(const Dims& dims, std::initializer_list<int64_t> want) {
  if (dims.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want) {
    if (dims[i++] != w) return false;
  }
  return true;
}

// "[a, b, c]", for error messages.
template <typename Dims>
std::string DimsString(const Dims& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// A buffer's shape check: empty if `dims` is `want`, else what is wrong with `name`.
// The handlers write as many bytes as the inputs say, so a smaller output would be overrun.
template <typename Dims>
std::string ShapeError(const char* op, const char* name, const Dims& dims,
                             std::initializer_list<int64_t> want) {
  if (HasDims(dims, want)) return "";
  std::string w = "[";
  size_t i = 0;
  for (int64_t d : want) w += (i++ ? ", " : "") + std::to_string(d);
  return std::string(op) + ": " + name + " is " + DimsString(dims) + "; allowed: " + w + "]";
}

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
