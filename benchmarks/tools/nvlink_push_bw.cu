// NVLink store bandwidth between GPUs of one process, by CTA count and copy
// style: what the one-sided all-to-all's push phase can reach at best.
//
//   nvcc -O3 -gencode=arch=compute_90,code=sm_90 -o /tmp/push_bw benchmarks/tools/nvlink_push_bw.cu
//   /tmp/push_bw [MiB per GPU, default 128]
//   /tmp/push_bw ramp        # all-to-all pushes of 0.5-64 MB, timed inside the kernel
//
// Every GPU pushes to the next one (a ring; with 2 GPUs they exchange), all at
// once, so each link carries traffic both ways as in an all-to-all. Modes:
//   v4      one warp per 16-byte lane stride, 8 loads in flight (the kernel's WarpCopy)
//   v4pull  the same, but reading the peer's buffer into local memory
//   bulk    cp.async.bulk global->shared, then shared->peer global (the copy engine
//           of the SM, one thread issuing, 4 stages of 16 KiB per CTA)
//   local   v4 into this GPU's own memory (HBM copy, for scale)
//   v4a2a   v4, but every GPU pushes 1/n of its buffer to each of the n-1 others
//           at once (CTAs dealt round-robin over peers): an all-to-all's pattern
//   cea2a   v4a2a's pattern by the copy engines: one cudaMemcpyPeerAsync per peer,
//           each on its own stream (no SMs; the CTAs column does not apply)
// ramp: v4a2a at small sizes, where the ramp matters (a decode step's dispatch
// is ~5 MB per GPU). Events around small kernels would time launches and the
// GPUs' start skew, so every GPU's kernel first waits for all peers to arrive
// (a flag each in every GPU's memory), then pushes; each warp ends with a
// system fence (its stores visible, as before the all-to-all's flags). Time =
// from the barrier's release to the last warp's fence, in globaltimer ns.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e = (x);                                                                \
    if (e != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

// Warp `warp` of `warps` copies whole 4 KiB chunks (32 lanes x 8 x 16 B) of n 16-byte units.
__device__ __forceinline__ void CopyChunks(int4* dst, const int4* src, int64_t n, int64_t warp, int64_t warps) {
  const int lane = threadIdx.x % 32;
  constexpr int kU = 8;
  for (int64_t c = warp; c * 32 * kU < n; c += warps) {
    const int64_t base = c * 32 * kU + lane;
    int4 v[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) v[u] = __ldcg(src + base + 32 * u);
#pragma unroll
    for (int u = 0; u < kU; ++u) dst[base + 32 * u] = v[u];
  }
}

__global__ void __launch_bounds__(512) CopyV4(int4* dst, const int4* src, int64_t n) {
  CopyChunks(dst, src, n, (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32, gridDim.x * int64_t(blockDim.x) / 32);
}

// CTA b pushes to peer b % npeers: its share of slice `b % npeers` of src
// (n16 16-byte units per slice) lands in that peer's slice `slot`.
__global__ void __launch_bounds__(512) CopyV4Spread(int4* const* dsts, int npeers, int slot, const int4* src,
                                                    int64_t n16) {
  const int peer = blockIdx.x % npeers;
  const int64_t warp = (blockIdx.x / npeers) * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int64_t warps = (gridDim.x / npeers) * int64_t(blockDim.x / 32);
  CopyChunks(dsts[peer] + slot * n16, src + peer * n16, n16, warp, warps);
}

__device__ __forceinline__ uint64_t GlobalNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// clock[0]: barrier release (CTA 0), clock[1]: running max of warps' fenced ends.
__global__ void __launch_bounds__(512) CopyV4SpreadTimed(int4* const* dsts, int npeers, int slot, const int4* src,
                                                         int64_t n16, unsigned* const* arrive, unsigned* here,
                                                         int nranks, unsigned round, unsigned long long* clock) {
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0) {
      for (int r = 0; r < nranks; ++r) atomicMax(arrive[r] + slot, round);  // slot = this GPU's rank
    }
    for (int r = 0; r < nranks; ++r) {
      while (*reinterpret_cast<volatile unsigned*>(here + r) < round) {
      }
    }
    if (blockIdx.x == 0) clock[0] = GlobalNs();
  }
  __syncthreads();
  const int peer = blockIdx.x % npeers;
  const int64_t warp = (blockIdx.x / npeers) * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int64_t warps = (gridDim.x / npeers) * int64_t(blockDim.x / 32);
  CopyChunks(dsts[peer] + slot * n16, src + peer * n16, n16, warp, warps);
  __threadfence_system();
  __syncwarp();
  if (threadIdx.x % 32 == 0) atomicMax(clock + 1, static_cast<unsigned long long>(GlobalNs()));
}

__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

constexpr int kStages = 4;
constexpr int kChunk = 16384;

__global__ void __launch_bounds__(32) CopyBulk(char* dst, const char* src, int64_t bytes) {
  extern __shared__ __align__(128) char buf[];
  __shared__ __align__(8) uint64_t bar[kStages];
  if (threadIdx.x != 0) return;
  for (int s = 0; s < kStages; ++s) {
    asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(Smem(&bar[s])));
  }
  asm volatile("fence.mbarrier_init.release.cluster;");
  const int64_t chunks = bytes / kChunk;
  uint32_t phase[kStages] = {};
  int64_t i = 0;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x, ++i) {
    const int s = i % kStages;
    char* slot = buf + s * kChunk;
    // The store that last used this stage must have read it.
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kStages - 1) : "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(Smem(&bar[s])), "r"(kChunk));
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            Smem(slot)),
        "l"(src + c * kChunk), "r"(kChunk), "r"(Smem(&bar[s]))
        : "memory");
    asm volatile(
        "{ .reg .pred p; W: mbarrier.try_wait.parity.shared.b64 p, [%0], %1; @!p bra W; }" ::"r"(Smem(&bar[s])),
        "r"(phase[s]));
    phase[s] ^= 1;
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst + c * kChunk),
                 "r"(Smem(slot)), "r"(kChunk)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// The ramp table (see the top): bytes leaving each GPU by CTAs, slowest GPU, median of reps.
int Ramp(int n, const std::vector<char*>& src, const std::vector<int4**>& peer_dsts, int64_t cap_bytes) {
  std::vector<unsigned*> arrive(n);
  std::vector<unsigned**> arrive_all(n);
  std::vector<unsigned long long*> clock(n);
  for (int d = 0; d < n; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaMalloc(&arrive[d], n * sizeof(unsigned)));
    CHECK(cudaMemset(arrive[d], 0, n * sizeof(unsigned)));
    CHECK(cudaMalloc(&clock[d], 2 * sizeof(unsigned long long)));
  }
  for (int d = 0; d < n; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaMalloc(&arrive_all[d], n * sizeof(unsigned*)));
    CHECK(cudaMemcpy(arrive_all[d], arrive.data(), n * sizeof(unsigned*), cudaMemcpyHostToDevice));
  }
  std::printf("| MB leaving each GPU | CTAs | µs (barrier to last fence, slowest GPU, median) | GB/s |\n|---|---|---|---|\n");
  const double sizes_mb[] = {0.5, 1, 2, 4, 5.25, 8, 16, 64};
  const int ctas_list[] = {33, 66, 132};
  unsigned round = 0;
  for (double mb : sizes_mb) {
    // 16-byte units per peer, whole 4 KiB chunks.
    const int64_t per_peer16 = static_cast<int64_t>(mb * 1e6 / (n - 1) / 16 / 256) * 256;
    if (per_peer16 * 16 * n > cap_bytes) continue;
    for (int ctas : ctas_list) {
      const int grid = ctas / (n - 1) * (n - 1);
      std::vector<double> us;
      for (int rep = 0; rep < 12; ++rep) {
        ++round;
        for (int d = 0; d < n; ++d) {
          CHECK(cudaSetDevice(d));
          CHECK(cudaMemset(clock[d], 0, 2 * sizeof(unsigned long long)));
          CopyV4SpreadTimed<<<grid, 512>>>(peer_dsts[d], n - 1, d, reinterpret_cast<const int4*>(src[d]),
                                           per_peer16, arrive_all[d], arrive[d], n, round, clock[d]);
          CHECK(cudaGetLastError());
        }
        double slowest = 0;
        for (int d = 0; d < n; ++d) {
          CHECK(cudaSetDevice(d));
          CHECK(cudaDeviceSynchronize());
          unsigned long long c[2];
          CHECK(cudaMemcpy(c, clock[d], sizeof(c), cudaMemcpyDeviceToHost));
          const double t = (c[1] - c[0]) / 1e3;
          if (t > slowest) slowest = t;
        }
        if (rep >= 2) us.push_back(slowest);  // two warm-ups
      }
      std::sort(us.begin(), us.end());
      const double med = us[us.size() / 2];
      const double bytes = double(per_peer16) * 16 * (n - 1);
      std::printf("| %.2f | %d | %.1f | %.0f |\n", bytes / 1e6, grid, med, bytes / (med * 1e-6) / 1e9);
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  const bool ramp = argc > 1 && std::string(argv[1]) == "ramp";
  const int64_t mib = argc > 1 && !ramp ? std::atoll(argv[1]) : 128;
  const int64_t bytes = mib << 20;
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::printf("needs 2 or more GPUs, found %d\n", n);
    return 1;
  }
  std::vector<char*> src(n), dst(n);
  std::vector<cudaStream_t> stream(n);
  std::vector<std::vector<cudaStream_t>> peer_stream(n, std::vector<cudaStream_t>(n));
  std::vector<std::vector<cudaEvent_t>> peer_done(n, std::vector<cudaEvent_t>(n));
  std::vector<cudaEvent_t> start(n), stop(n);
  int sms = 0;
  for (int d = 0; d < n; ++d) {
    CHECK(cudaSetDevice(d));
    for (int p = 0; p < n; ++p) {
      if (p != d) {
        cudaError_t err = cudaDeviceEnablePeerAccess(p, 0);
        if (err != cudaSuccess && err != cudaErrorPeerAccessAlreadyEnabled) CHECK(err);
        cudaGetLastError();
      }
    }
    CHECK(cudaMalloc(&src[d], bytes));
    CHECK(cudaMalloc(&dst[d], bytes));
    CHECK(cudaMemset(src[d], d + 1, bytes));
    CHECK(cudaStreamCreateWithFlags(&stream[d], cudaStreamNonBlocking));
    for (int p = 0; p < n; ++p) {
      CHECK(cudaStreamCreateWithFlags(&peer_stream[d][p], cudaStreamNonBlocking));
      CHECK(cudaEventCreateWithFlags(&peer_done[d][p], cudaEventDisableTiming));
    }
    CHECK(cudaEventCreate(&start[d]));
    CHECK(cudaEventCreate(&stop[d]));
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d));
    CHECK(cudaFuncSetAttribute(CopyBulk, cudaFuncAttributeMaxDynamicSharedMemorySize, kStages * kChunk));
  }
  // For v4a2a: each GPU's list of peers' dst buffers; slices of bytes / n.
  const int64_t slice16 = bytes / n / 16 / (32 * 8) * (32 * 8);
  std::vector<int4**> peer_dsts(n);
  for (int d = 0; d < n; ++d) {
    std::vector<int4*> host;
    for (int p = 1; p < n; ++p) host.push_back(reinterpret_cast<int4*>(dst[(d + p) % n]));
    CHECK(cudaSetDevice(d));
    CHECK(cudaMalloc(&peer_dsts[d], host.size() * sizeof(int4*)));
    CHECK(cudaMemcpy(peer_dsts[d], host.data(), host.size() * sizeof(int4*), cudaMemcpyHostToDevice));
  }
  if (ramp) return Ramp(n, src, peer_dsts, bytes);
  std::printf("%d GPUs, %d SMs, %lld MiB per GPU, every GPU pushing to the next at once\n", n, sms,
              static_cast<long long>(mib));
  std::printf("| mode | CTAs | GB/s per GPU (slowest) |\n|---|---|---|\n");
  const char* modes[] = {"local", "v4", "v4pull", "bulk", "v4a2a", "cea2a"};
  const int ctas_list[] = {8, 16, 24, 32, 48, 66, 99, 132, 264};
  for (const char* mode : modes) {
    for (int ctas : ctas_list) {
      const bool bulk = mode[0] == 'b';
      const bool ce = mode[0] == 'c';
      if (ce && ctas != ctas_list[0]) continue;  // no SMs: one row
      float worst = 0;
      for (int rep = 0; rep < 4; ++rep) {
        for (int d = 0; d < n; ++d) {
          CHECK(cudaSetDevice(d));
          const int peer = (d + 1) % n;
          char* to = dst[peer];
          const char* from = src[d];
          if (mode[0] == 'l') to = dst[d];
          if (mode[2] == 'p') to = dst[d], from = src[peer];
          CHECK(cudaEventRecord(start[d], stream[d]));
          if (ce) {
            // Each peer's slice on its own stream, forked from and joined back to stream[d].
            for (int p = 1; p < n; ++p) {
              const int to_rank = (d + p) % n;
              CHECK(cudaEventRecord(peer_done[d][0], stream[d]));
              CHECK(cudaStreamWaitEvent(peer_stream[d][p], peer_done[d][0]));
              CHECK(cudaMemcpyPeerAsync(dst[to_rank] + d * slice16 * 16, to_rank, src[d] + (p - 1) * slice16 * 16, d,
                                        slice16 * 16, peer_stream[d][p]));
              CHECK(cudaEventRecord(peer_done[d][p], peer_stream[d][p]));
            }
            for (int p = 1; p < n; ++p) CHECK(cudaStreamWaitEvent(stream[d], peer_done[d][p]));
          } else if (mode[2] == 'a') {
            const int grid = ctas / (n - 1) * (n - 1) > 0 ? ctas / (n - 1) * (n - 1) : n - 1;
            // Sender d writes slot d of every peer: no two senders share bytes.
            CopyV4Spread<<<grid, 512, 0, stream[d]>>>(peer_dsts[d], n - 1, d, reinterpret_cast<const int4*>(from),
                                                      slice16);
          } else if (bulk) {
            CopyBulk<<<ctas, 32, kStages * kChunk, stream[d]>>>(to, from, bytes);
          } else {
            CopyV4<<<ctas, 512, 0, stream[d]>>>(reinterpret_cast<int4*>(to), reinterpret_cast<const int4*>(from),
                                                 bytes / 16);
          }
          CHECK(cudaGetLastError());
          CHECK(cudaEventRecord(stop[d], stream[d]));
        }
        float slowest = 0;
        for (int d = 0; d < n; ++d) {
          CHECK(cudaSetDevice(d));
          CHECK(cudaEventSynchronize(stop[d]));
          float ms = 0;
          CHECK(cudaEventElapsedTime(&ms, start[d], stop[d]));
          if (ms > slowest) slowest = ms;
        }
        if (rep > 0 && (worst == 0 || slowest < worst)) worst = slowest;  // best of 3 after a warm-up
      }
      const double moved = mode[2] == 'a' ? double(slice16) * 16 * (n - 1) : double(bytes);
      if (ce) {
        std::printf("| %s | (copy engines) | %.0f |\n", mode, moved / (worst * 1e-3) / 1e9);
        continue;
      }
      std::printf("| %s | %d | %.0f |\n", mode, ctas, moved / (worst * 1e-3) / 1e9);
    }
  }
  return 0;
}
