// One-sided NVLink all-to-all for expert-parallel dispatch and combine, within
// one process whose GPUs have peer access (the analogue of TensorRT-LLM's
// MNNVL all-to-all and DeepEP's intranode kernels).
//
// Every device of an EP group owns a workspace: a control block followed by
// two data halves. A call pushes each token once per destination rank straight
// into that rank's buffers (peer stores over NVLink), then raises a flag there
// with a release store; the receiver waits on its flags with acquire loads.
// Each receiver posts its dispatch output addresses in its senders' mailboxes
// at the start of a call; with WIDEEP_NVLINK_DIRECT=1 and outputs in classic
// device memory (peer-mapped once peer access is on) senders write there
// directly. Otherwise (the default) rows land in the workspace and the
// receiver copies them out.
// Calls alternate halves, so a sender never overwrites rows a receiver still
// reads: to reach call n+2 it must have seen the receiver's call n+1 data,
// which the receiver only sends after finishing call n. The call counter and
// the row counts live in device memory, so the kernels can be captured in a
// CUDA graph / XLA command buffer.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.h"

namespace wideep {
namespace {

constexpr int64_t kCtrlBytes = 64 * 1024;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct Ctrl {
  uint64_t seq;                        // calls completed on this device
  uint64_t flags[kMaxRanks];           // flags[s] = last call whose rows from rank s have landed
  uint32_t sent[kMaxRanks];            // CTAs of this call done sending to each destination
  uint32_t finished;                   // CTAs of this call done
  int32_t recv_count[2][kMaxRanks];    // rows from each source rank, per data half
  char* peers[kMaxRanks];              // every rank's workspace, mapped here
  struct Mailbox {
    char* x;
    int32_t* slot;
    float* weight;
    int32_t* count;
  } mail[2][kMaxRanks];                // receiver r's dispatch outputs (null: use the workspace)
  uint64_t mail_seq[2][kMaxRanks];     // call whose addresses mail[.][r] holds
  uint64_t prof_direct;                // dispatch calls whose outputs were written directly
  uint64_t prof_start;                 // CTA 0's start of the running call (globaltimer ns)
  uint64_t prof_ns[2], prof_calls[2];  // kernel time and calls: [dispatch, combine]
};
static_assert(sizeof(Ctrl) <= kCtrlBytes, "control block too large");

struct Member {
  int rank = 0;
  int nranks = 0;
  char* base = nullptr;  // workspace on this device
  int sms = 0;
  uint64_t data_bytes = 0;  // one data half
};

std::mutex g_mu;
// WIDEEP_NVLINK_DIRECT=1 lets peers write dispatch outputs directly where they
// are classic device memory. Off by default: jaxlib's default allocator never
// qualified on the GPUs measured so far, so this path is not validated yet.
const bool g_allow_direct = [] {
  const char* v = std::getenv("WIDEEP_NVLINK_DIRECT");
  return v != nullptr && std::string(v) == "1";
}();
std::unordered_map<int64_t, std::unordered_map<int, Member>> g_workspaces;

// ---------------------------------------------------------------------------
// Device code.

// Copies `bytes` with one warp, 16 bytes per lane where alignment allows.
// kCoherent loads bypass L1: they read rows peers wrote during this kernel.
template <bool kCoherent>
__device__ __forceinline__ void WarpCopy(char* dst, const char* src, int64_t bytes, int lane) {
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                          static_cast<uintptr_t>(bytes);
  if ((align & 15) == 0) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    const int64_t n = bytes / 16;
    constexpr int kUnroll = 8;  // 128 bytes in flight per lane
    int64_t i = lane;
    for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = kCoherent ? __ldcg(s + i + 32 * u) : __ldg(s + i + 32 * u);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) d[i + 32 * u] = v[u];
    }
    for (; i < n; i += 32) d[i] = kCoherent ? __ldcg(s + i) : __ldg(s + i);
  } else if ((align & 3) == 0) {
    const int* s = reinterpret_cast<const int*>(src);
    int* d = reinterpret_cast<int*>(dst);
    for (int64_t i = lane; i < bytes / 4; i += 32) d[i] = kCoherent ? __ldcg(s + i) : __ldg(s + i);
  } else {
    for (int64_t i = lane; i < bytes; i += 32) {
      dst[i] = kCoherent ? *reinterpret_cast<const volatile char*>(src + i) : src[i];
    }
  }
}

__device__ void WaitFlag(const uint64_t* flag, uint64_t seq, uint64_t timeout_ns, const char* op,
                         int rank, int peer) {
  const uint64_t start = GlobalTimerNs();
  uint64_t seen;
  while ((seen = LoadAcquireSys(flag)) < seq) {
    if (GlobalTimerNs() - start > timeout_ns) {
      printf("wideep nvlink %s: rank %d timed out after %llu ms waiting for rank %d (call %llu, "
             "last seen %llu). Every rank of the EP group must run the same program; raise "
             "WIDEEP_COMM_TIMEOUT_S if a peer is only slow.\n",
             op, rank, static_cast<unsigned long long>(timeout_ns / 1000000), peer,
             static_cast<unsigned long long>(seq), static_cast<unsigned long long>(seen));
      __trap();
    }
  }
}

// Called by every thread of a CTA after its stores to `dest`: the last CTA
// for that destination raises the destination's flag for this rank.
__device__ __forceinline__ void FenceSys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

__device__ __forceinline__ void SignalSent(Ctrl* ctrl, int dest, int rank, int ctas_per_rank,
                                           uint64_t seq) {
  FenceSys();
  __syncthreads();
  if (threadIdx.x == 0 && dest != rank) {
    if (atomicAdd(&ctrl->sent[dest], 1u) == static_cast<uint32_t>(ctas_per_rank - 1)) {
      ctrl->sent[dest] = 0;
      FenceSys();
      Ctrl* peer = reinterpret_cast<Ctrl*>(ctrl->peers[dest]);
      StoreReleaseSys(&peer->flags[rank], seq);
    }
  }
}

__device__ __forceinline__ void StartCall(Ctrl* ctrl) {
  if (blockIdx.x == 0 && threadIdx.x == 0) ctrl->prof_start = GlobalTimerNs();
}

// The last CTA of the call publishes it as completed (and its duration, from
// CTA 0's start to here: what a caller waits, peers' skew included).
__device__ __forceinline__ void FinishCall(Ctrl* ctrl, uint64_t seq, int op) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&ctrl->finished, 1u) == gridDim.x - 1) {
      __threadfence();
      ctrl->prof_ns[op] += GlobalTimerNs() - *reinterpret_cast<volatile uint64_t*>(&ctrl->prof_start);
      ctrl->prof_calls[op] += 1;
      ctrl->finished = 0;
      *reinterpret_cast<volatile uint64_t*>(&ctrl->seq) = seq;
    }
  }
}

__device__ __forceinline__ uint64_t CurrentCall(const Ctrl* ctrl) {
  return *reinterpret_cast<const volatile uint64_t*>(&ctrl->seq) + 1;
}

// A row of `payload` bytes is cut into `splits` pieces of `piece` bytes (the
// last one shorter), so few rows still keep every warp of the grid busy.
struct Pieces {
  int64_t payload, piece;
  int splits;
  __device__ __forceinline__ int64_t Offset(int k) const { return k * piece; }
  __device__ __forceinline__ int64_t Length(int k) const {
    const int64_t rest = payload - k * piece;
    return rest < piece ? rest : piece;
  }
};

struct DispatchParams {
  Ctrl* ctrl;
  int rank, nranks, capacity, top_k, ctas_per_rank;
  Pieces row;
  int64_t meta_offset, row_bytes;
  uint64_t data_bytes, timeout_ns;
  const char* x;
  const int32_t* send_token;
  const int32_t* send_count;
  const int32_t* send_slot;
  const float* send_weight;
  char* recv_x;
  int32_t* recv_slot;
  float* recv_weight;
  int32_t* recv_count;
  bool direct;  // peers may write recv_* themselves
};

// Every CTA first sends to destination blockIdx / cpr, then copies the rows of
// source blockIdx / cpr out of the workspace: all SMs push, then all copy out.
// The grid fits on the GPU at once (the waits need every CTA resident).
__global__ void __launch_bounds__(kThreads) DispatchKernel(DispatchParams p) {
  __shared__ Ctrl::Mailbox box;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t seq = CurrentCall(p.ctrl);
  const int half = static_cast<int>(seq & 1);
  const int64_t C = p.capacity, K = p.top_k;
  const int peer = blockIdx.x / p.ctas_per_rank;
  const int part = blockIdx.x % p.ctas_per_rank;
  const int64_t first = part * kWarps + warp;
  const int64_t stride = static_cast<int64_t>(p.ctas_per_rank) * kWarps;
  const int splits = p.row.splits;
  StartCall(p.ctrl);

  // Post this rank's output addresses (or null) in every sender's mailbox.
  if (blockIdx.x == 0 && threadIdx.x < p.nranks && threadIdx.x != p.rank) {
    Ctrl* sender = reinterpret_cast<Ctrl*>(p.ctrl->peers[threadIdx.x]);
    Ctrl::Mailbox mine{nullptr, nullptr, nullptr, nullptr};
    if (p.direct) mine = {p.recv_x, p.recv_slot, p.recv_weight, p.recv_count};
    sender->mail[half][p.rank] = mine;
    StoreReleaseSys(&sender->mail_seq[half][p.rank], seq);
  }

  {  // Send to `peer`.
    const bool self = peer == p.rank;
    const int64_t n = p.send_count[peer];
    if (threadIdx.x == 0) {
      if (self) {
        box = {p.recv_x, p.recv_slot, p.recv_weight, p.recv_count};
      } else {
        WaitFlag(&p.ctrl->mail_seq[half][peer], seq, p.timeout_ns, "dispatch (mailbox)", p.rank, peer);
        volatile Ctrl::Mailbox* posted = &p.ctrl->mail[half][peer];
        box.x = posted->x, box.slot = posted->slot, box.weight = posted->weight, box.count = posted->count;
      }
    }
    __syncthreads();
    const bool direct = box.x != nullptr;  // rows go straight into the destination's outputs
    char* region = nullptr;
    if (!direct) region = p.ctrl->peers[peer] + kCtrlBytes + half * p.data_bytes + p.rank * C * p.row_bytes;
    const int64_t block = static_cast<int64_t>(p.rank) * C;  // our rows in the destination's outputs
    for (int64_t item = first; item < n * splits; item += stride) {
      const int64_t i = item / splits;
      const int k = static_cast<int>(item % splits);
      const int64_t t = p.send_token[peer * C + i];
      const char* src = p.x + t * p.row.payload + p.row.Offset(k);
      const int64_t pair = (peer * C + i) * K;
      char* dst = direct ? box.x + (block + i) * p.row.payload : region + i * p.row_bytes;
      WarpCopy<false>(dst + p.row.Offset(k), src, p.row.Length(k), lane);
      if (k != 0) continue;
      if (direct) {
        for (int64_t e = lane; e < K; e += 32) {
          box.slot[(block + i) * K + e] = p.send_slot[pair + e];
          box.weight[(block + i) * K + e] = p.send_weight[pair + e];
        }
      } else {
        int32_t* meta = reinterpret_cast<int32_t*>(region + i * p.row_bytes + p.meta_offset);
        for (int64_t e = lane; e < K; e += 32) {
          meta[e] = p.send_slot[pair + e];
          meta[K + e] = __float_as_int(p.send_weight[pair + e]);
        }
      }
    }
    if (direct) {  // the destination's padding pairs and our row count
      for (int64_t e = n * K + part * kThreads + threadIdx.x; e < C * K; e += p.ctas_per_rank * kThreads) {
        box.slot[block * K + e] = -1;
        box.weight[block * K + e] = 0.0f;
      }
      if (part == 0 && threadIdx.x == 0) box.count[p.rank] = static_cast<int32_t>(n);
    } else if (part == 0 && threadIdx.x == 0) {
      reinterpret_cast<Ctrl*>(p.ctrl->peers[peer])->recv_count[half][p.rank] = static_cast<int32_t>(n);
    }
    SignalSent(p.ctrl, peer, p.rank, p.ctas_per_rank, seq);
  }

  if (peer != p.rank) {  // Receive from `peer`.
    if (threadIdx.x == 0) WaitFlag(&p.ctrl->flags[peer], seq, p.timeout_ns, "dispatch", p.rank, peer);
    __syncthreads();
    if (!p.direct) {
      const int64_t n = *reinterpret_cast<volatile int32_t*>(&p.ctrl->recv_count[half][peer]);
      const char* region = reinterpret_cast<char*>(p.ctrl) + kCtrlBytes + half * p.data_bytes +
                           peer * C * p.row_bytes;
      for (int64_t item = first; item < n * splits; item += stride) {
        const int64_t i = item / splits;
        const int k = static_cast<int>(item % splits);
        const char* row = region + i * p.row_bytes;
        WarpCopy<true>(p.recv_x + (peer * C + i) * p.row.payload + p.row.Offset(k), row + p.row.Offset(k),
                       p.row.Length(k), lane);
        if (k != 0) continue;
        const int32_t* meta = reinterpret_cast<const int32_t*>(row + p.meta_offset);
        const int64_t pair = (peer * C + i) * K;
        for (int64_t e = lane; e < K; e += 32) {
          p.recv_slot[pair + e] = __ldcg(meta + e);
          p.recv_weight[pair + e] = __int_as_float(__ldcg(meta + K + e));
        }
      }
      for (int64_t e = n * K + part * kThreads + threadIdx.x; e < C * K; e += p.ctas_per_rank * kThreads) {
        p.recv_slot[peer * C * K + e] = -1;
        p.recv_weight[peer * C * K + e] = 0.0f;
      }
      if (part == 0 && threadIdx.x == 0) p.recv_count[peer] = static_cast<int32_t>(n);
    }
  }
  if (p.direct && blockIdx.x == 0 && threadIdx.x == 0) p.ctrl->prof_direct += 1;
  FinishCall(p.ctrl, seq, 0);
}

struct CombineParams {
  Ctrl* ctrl;
  int rank, nranks, capacity, num_tokens, hidden, ctas_per_rank;
  Pieces row;          // the pushed partial rows
  int reduce_splits;   // pieces per token row in the reduction
  int64_t row_bytes;
  uint64_t data_bytes, timeout_ns;
  const char* partial;
  const int32_t* send_rows;
  const int32_t* token_row;
  float* y;
};

template <typename T>
__device__ __forceinline__ float ToFloat(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float ToFloat(__half v) {
  return __half2float(v);
}

// Every CTA pushes partial rows back to source rank blockIdx / cpr, waits for
// every peer, then reduces its share of (token, piece) items in rank order
// (the portable path's order, so the sums match it bit for bit).
template <typename T>
__global__ void __launch_bounds__(kThreads) CombineKernel(CombineParams p) {
  __shared__ int rows[kWarps][kMaxRanks];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t seq = CurrentCall(p.ctrl);
  const int half = static_cast<int>(seq & 1);
  const int64_t C = p.capacity, H = p.hidden, R = p.nranks;
  const int dest = blockIdx.x / p.ctas_per_rank, part = blockIdx.x % p.ctas_per_rank;
  StartCall(p.ctrl);

  if (dest != p.rank) {
    const int64_t n = p.send_rows[dest];
    const int splits = p.row.splits;
    char* region = p.ctrl->peers[dest] + kCtrlBytes + half * p.data_bytes + p.rank * C * p.row_bytes;
    for (int64_t item = part * kWarps + warp; item < n * splits;
         item += static_cast<int64_t>(p.ctas_per_rank) * kWarps) {
      const int64_t i = item / splits;
      const int k = static_cast<int>(item % splits);
      WarpCopy<false>(region + i * p.row_bytes + p.row.Offset(k),
                      p.partial + (dest * C + i) * p.row.payload + p.row.Offset(k), p.row.Length(k), lane);
    }
  }
  SignalSent(p.ctrl, dest, p.rank, p.ctas_per_rank, seq);

  if (threadIdx.x == 0) {
    for (int s = 0; s < p.nranks; ++s) {
      if (s != p.rank) WaitFlag(&p.ctrl->flags[s], seq, p.timeout_ns, "combine", p.rank, s);
    }
  }
  __syncthreads();
  const char* local = p.partial;
  const char* remote = reinterpret_cast<const char*>(p.ctrl) + kCtrlBytes + half * p.data_bytes;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = (p.row.payload % 16) == 0;
  const int64_t units = vec ? H / kVec : H;  // 16-byte chunks, or elements
  const int splits = p.reduce_splits;
  const int64_t per_piece = (units + splits - 1) / splits;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t item = blockIdx.x * kWarps + warp; item < p.num_tokens * splits; item += step) {
    const int64_t t = item / splits;
    const int64_t u0 = (item % splits) * per_piece;
    const int64_t u1 = u0 + per_piece < units ? u0 + per_piece : units;
    __syncwarp();
    for (int r = lane; r < R; r += 32) rows[warp][r] = p.token_row[t * R + r];
    __syncwarp();
    float* out = p.y + t * H;
    if (vec) {
      for (int64_t c = u0 + lane; c < u1; c += 32) {
        float acc[kVec];
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[v] = 0.0f;
        for (int r = 0; r < R; ++r) {
          const int row = rows[warp][r];
          if (row < 0) continue;
          int4 raw;
          if (r == p.rank) {
            raw = __ldg(reinterpret_cast<const int4*>(local + (r * C + row) * p.row.payload) + c);
          } else {
            raw = __ldcg(reinterpret_cast<const int4*>(remote + (r * C + row) * p.row_bytes) + c);
          }
          const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int v = 0; v < kVec; ++v) acc[v] += ToFloat(vals[v]);
        }
        float4* dst = reinterpret_cast<float4*>(out + c * kVec);
#pragma unroll
        for (int v = 0; v < kVec / 4; ++v) {
          dst[v] = make_float4(acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3]);
        }
      }
    } else {
      for (int64_t e = u0 + lane; e < u1; e += 32) {
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) {
          const int row = rows[warp][r];
          if (row < 0) continue;
          if (r == p.rank) {
            acc += ToFloat(reinterpret_cast<const T*>(local + (r * C + row) * p.row.payload)[e]);
          } else {
            const T* src = reinterpret_cast<const T*>(remote + (r * C + row) * p.row_bytes);
            acc += ToFloat(*reinterpret_cast<const volatile T*>(src + e));
          }
        }
        out[e] = acc;
      }
    }
  }
  FinishCall(p.ctrl, seq, 1);
}

// ---------------------------------------------------------------------------
// Host side.

// True when `ptr` is classic device memory (cuMemAlloc): peer access, once
// enabled, maps it into every peer. Pool (cudaMallocAsync) and VMM memory
// need per-allocation access rights instead, so they take the workspace path.
bool PeerMapped(const void* ptr) {
  using GetAttribute = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);
  static GetAttribute get = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<GetAttribute>(nullptr);
    }
    return reinterpret_cast<GetAttribute>(fn);
  }();
  if (get == nullptr || ptr == nullptr) return false;
  int legacy = 0;
  if (get(&legacy, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, reinterpret_cast<CUdeviceptr>(ptr)) !=
      CUDA_SUCCESS) {
    return false;
  }
  return legacy != 0;
}

ffi::Error FindMember(int64_t workspace, int ordinal, Member* out) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto set = g_workspaces.find(workspace);
  if (set == g_workspaces.end()) {
    return ffi::Error::InvalidArgument(
        "wideep nvlink: workspace " + std::to_string(workspace) +
        " was not created in this process (programs must be traced here, not deserialized)");
  }
  auto member = set->second.find(ordinal);
  if (member == set->second.end()) {
    return ffi::Error::InvalidArgument("wideep nvlink: GPU " + std::to_string(ordinal) +
                                       " is not a member of workspace " + std::to_string(workspace));
  }
  *out = member->second;
  return ffi::Error::Success();
}

// CTAs per peer: the whole GPU (capped by `max_ctas`), one CTA per SM so the
// grid is resident at once (ranks wait on each other inside the kernel).
int CtasPerRank(const Member& m, int64_t max_ctas) {
  int64_t ctas = m.sms;
  if (max_ctas > 0 && max_ctas < ctas) ctas = max_ctas;
  const int64_t cpr = ctas / m.nranks;
  return static_cast<int>(cpr < 1 ? 1 : cpr);
}

// Pieces per row so that `rows` rows give every warp of `ctas_per_rank` CTAs
// work, at least 512 bytes a piece; one piece when the row is not 16-byte aligned.
Pieces SplitRows(int64_t payload, int64_t rows, int ctas_per_rank) {
  Pieces p{payload, payload, 1};
  if (payload % 16 != 0 || rows <= 0) return p;
  const int64_t warps = static_cast<int64_t>(ctas_per_rank) * kWarps;
  int64_t splits = (warps + rows - 1) / rows;
  const int64_t most = payload / 512 > 1 ? payload / 512 : 1;
  if (splits > most) splits = most;
  p.piece = AlignUp((payload + splits - 1) / splits, 16);
  p.splits = static_cast<int>((payload + p.piece - 1) / p.piece);
  return p;
}

// The rows of every source rank must fit one data half of the workspace.
ffi::Error CheckRoom(const char* op, const Member& m, int64_t workspace, int64_t capacity, int64_t row_bytes) {
  const uint64_t need = static_cast<uint64_t>(m.nranks) * capacity * row_bytes;
  if (need <= m.data_bytes) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("wideep nvlink ") + op + ": needs " + std::to_string(need) +
                                     " bytes per workspace half, workspace " + std::to_string(workspace) +
                                     " has " + std::to_string(m.data_bytes));
}

uint64_t TimeoutNs(int64_t timeout_ms) {
  return static_cast<uint64_t>(timeout_ms > 0 ? timeout_ms : 1) * 1000000ull;
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer x,
                        ffi::Buffer<ffi::S32> send_token, ffi::Buffer<ffi::S32> send_count,
                        ffi::Buffer<ffi::S32> send_slot, ffi::Buffer<ffi::F32> send_weight,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::Buffer<ffi::S32>> recv_slot,
                        ffi::Result<ffi::Buffer<ffi::F32>> recv_weight,
                        ffi::Result<ffi::Buffer<ffi::S32>> recv_count, int64_t workspace,
                        int64_t timeout_ms, int64_t max_ctas) {
  Member m;
  if (ffi::Error e = FindMember(workspace, ordinal, &m); !e.success()) return e;
  const auto xd = x.dimensions();
  const auto td = send_token.dimensions();
  const auto sd = send_slot.dimensions();
  if (xd.size() != 2 || td.size() != 2 || sd.size() != 3 || td[0] != m.nranks || sd[0] != m.nranks ||
      sd[1] != td[1] || send_count.element_count() != static_cast<size_t>(m.nranks)) {
    return ffi::Error::InvalidArgument("wideep nvlink dispatch: expected x [T, H], send_token [R, C], "
                                       "send_slot [R, C, K], send_count [R] with R = " +
                                       std::to_string(m.nranks));
  }
  const int64_t tokens = xd[0], capacity = td[1], top_k = sd[2];
  if (capacity == 0 || tokens == 0) return ffi::Error::Success();
  const int64_t payload = static_cast<int64_t>(x.size_bytes()) / tokens;
  DispatchParams p;
  p.ctrl = reinterpret_cast<Ctrl*>(m.base);
  p.rank = m.rank, p.nranks = m.nranks, p.capacity = static_cast<int>(capacity);
  p.top_k = static_cast<int>(top_k);
  p.meta_offset = AlignUp(payload, 16);
  p.row_bytes = p.meta_offset + AlignUp(2 * top_k * 4, 16);
  if (ffi::Error e = CheckRoom("dispatch", m, workspace, capacity, p.row_bytes); !e.success()) return e;
  p.data_bytes = m.data_bytes;
  p.timeout_ns = TimeoutNs(timeout_ms);
  p.ctas_per_rank = CtasPerRank(m, max_ctas);
  p.row = SplitRows(payload, capacity, p.ctas_per_rank);
  p.x = static_cast<const char*>(x.untyped_data());
  p.send_token = send_token.typed_data();
  p.send_count = send_count.typed_data();
  p.send_slot = send_slot.typed_data();
  p.send_weight = send_weight.typed_data();
  p.recv_x = static_cast<char*>(recv_x->untyped_data());
  p.recv_slot = recv_slot->typed_data();
  p.recv_weight = recv_weight->typed_data();
  p.recv_count = recv_count->typed_data();
  p.direct = g_allow_direct && PeerMapped(p.recv_x) && PeerMapped(p.recv_slot) &&
             PeerMapped(p.recv_weight) && PeerMapped(p.recv_count);
  DispatchKernel<<<m.nranks * p.ctas_per_rank, kThreads, 0, stream>>>(p);
  WIDEEP_CUDA_OR_RETURN(cudaGetLastError());
  return ffi::Error::Success();
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer partial,
                       ffi::Buffer<ffi::S32> send_rows, ffi::Buffer<ffi::S32> token_row,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t workspace, int64_t timeout_ms,
                       int64_t max_ctas) {
  Member m;
  if (ffi::Error e = FindMember(workspace, ordinal, &m); !e.success()) return e;
  const auto pd = partial.dimensions();
  const auto rd = token_row.dimensions();
  if (pd.size() != 3 || pd[0] != m.nranks || rd.size() != 2 || rd[1] != m.nranks ||
      send_rows.element_count() != static_cast<size_t>(m.nranks)) {
    return ffi::Error::InvalidArgument("wideep nvlink combine: expected partial [R, C, H], send_rows [R], "
                                       "token_row [T, R] with R = " + std::to_string(m.nranks));
  }
  const int64_t capacity = pd[1], hidden = pd[2], tokens = rd[0];
  if (tokens == 0 || hidden == 0) return ffi::Error::Success();
  if (capacity == 0) {  // nothing was sent anywhere: every token's sum is empty
    WIDEEP_CUDA_OR_RETURN(cudaMemsetAsync(y->untyped_data(), 0, y->size_bytes(), stream));
    return ffi::Error::Success();
  }
  CombineParams p;
  p.ctrl = reinterpret_cast<Ctrl*>(m.base);
  p.rank = m.rank, p.nranks = m.nranks, p.capacity = static_cast<int>(capacity);
  p.num_tokens = static_cast<int>(tokens), p.hidden = static_cast<int>(hidden);
  const int64_t payload = static_cast<int64_t>(partial.size_bytes()) / (m.nranks * capacity);
  p.row_bytes = AlignUp(payload, 16);
  if (ffi::Error e = CheckRoom("combine", m, workspace, capacity, p.row_bytes); !e.success()) return e;
  p.data_bytes = m.data_bytes;
  p.timeout_ns = TimeoutNs(timeout_ms);
  p.ctas_per_rank = CtasPerRank(m, max_ctas);
  p.row = SplitRows(payload, capacity, p.ctas_per_rank);
  // Reduction pieces: enough (token, piece) items for every warp of the grid.
  const int64_t warps = static_cast<int64_t>(m.nranks) * p.ctas_per_rank * kWarps;
  const int64_t units = payload % 16 == 0 ? payload / 16 : hidden;
  int64_t rsplits = (warps + tokens - 1) / tokens;
  if (rsplits > units / 32) rsplits = units / 32 > 1 ? units / 32 : 1;
  p.reduce_splits = static_cast<int>(rsplits);
  p.partial = static_cast<const char*>(partial.untyped_data());
  p.send_rows = send_rows.typed_data();
  p.token_row = token_row.typed_data();
  p.y = y->typed_data();
  const int grid = m.nranks * p.ctas_per_rank;
  switch (partial.element_type()) {
    case ffi::DataType::BF16:
      CombineKernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
      break;
    case ffi::DataType::F16:
      CombineKernel<__half><<<grid, kThreads, 0, stream>>>(p);
      break;
    case ffi::DataType::F32:
      CombineKernel<float><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      return ffi::Error::InvalidArgument("wideep nvlink combine: partial dtype must be bf16, f16 or f32");
  }
  WIDEEP_CUDA_OR_RETURN(cudaGetLastError());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace wideep

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(WideepNvlinkDispatch, wideep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // x [T, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // send_token [R, C]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // send_count [R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // send_slot [R, C, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()     // send_weight [R, C, K]
                                  .Ret<ffi::AnyBuffer>()            // recv_x [R, C, H]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // recv_slot [R, C, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()     // recv_weight [R, C, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // recv_count [R]
                                  .Attr<int64_t>("workspace")
                                  .Attr<int64_t>("timeout_ms")
                                  .Attr<int64_t>("max_ctas"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(WideepNvlinkCombine, wideep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // partial [R, C, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // send_rows [R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // token_row [T, R]
                                  .Ret<ffi::Buffer<ffi::F32>>()     // y [T, H]
                                  .Attr<int64_t>("workspace")
                                  .Attr<int64_t>("timeout_ms")
                                  .Attr<int64_t>("max_ctas"),
                              {ffi::Traits::kCmdBufferCompatible});

// ---------------------------------------------------------------------------
// C API for ctypes (set-up only; never on the hot path).

extern "C" {

const char* wideep_last_error() { return wideep::g_last_error.c_str(); }

// 1 if every ordered pair of `ordinals` can access each other's memory, else 0.
int wideep_nvlink_peer_access(int n, const int* ordinals) {
  for (int a = 0; a < n; ++a) {
    for (int b = 0; b < n; ++b) {
      if (a == b) continue;
      int ok = 0;
      WIDEEP_CUDA_OR_FAIL(cudaDeviceCanAccessPeer(&ok, ordinals[a], ordinals[b]));
      if (!ok) return 0;
    }
  }
  return 1;
}

// Creates workspace `id`: `ngroups` EP groups of `nranks` GPUs each (ordinals
// row-major, group by group), `data_bytes` per data half. Idempotent per id.
int wideep_nvlink_create(int64_t id, int ngroups, int nranks, const int* ordinals, uint64_t data_bytes) {
  using namespace wideep;
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_workspaces.count(id)) return 0;
  if (nranks < 1 || nranks > kMaxRanks) {
    return Fail("nranks=" + std::to_string(nranks) + " is out of range; allowed: 1.." + std::to_string(kMaxRanks));
  }
  DeviceGuard guard;
  for (int g = 0; g < ngroups; ++g) {
    const int* group = ordinals + static_cast<int64_t>(g) * nranks;
    for (int a = 0; a < nranks; ++a) {
      for (int b = 0; b < nranks; ++b) {
        if (a == b) continue;
        int ok = 0;
        WIDEEP_CUDA_OR_FAIL(cudaDeviceCanAccessPeer(&ok, group[a], group[b]));
        if (!ok) {
          return Fail("GPU " + std::to_string(group[a]) + " cannot access GPU " + std::to_string(group[b]) +
                      " peer to peer; the nvlink all-to-all needs peer access (use 'nccl')");
        }
        WIDEEP_CUDA_OR_FAIL(cudaSetDevice(group[a]));
        cudaError_t err = cudaDeviceEnablePeerAccess(group[b], 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) {
          cudaGetLastError();  // clear the sticky-free status
        } else if (err != cudaSuccess) {
          return Fail(std::string("cudaDeviceEnablePeerAccess failed: ") + cudaGetErrorString(err));
        }
      }
    }
  }
  std::unordered_map<int, Member> members;
  auto release = [&]() {
    for (auto& kv : members) {
      cudaSetDevice(kv.first);
      cudaFree(kv.second.base);
    }
  };
  const uint64_t total = kCtrlBytes + 2 * data_bytes;
  for (int g = 0; g < ngroups; ++g) {
    for (int r = 0; r < nranks; ++r) {
      const int ordinal = ordinals[static_cast<int64_t>(g) * nranks + r];
      if (members.count(ordinal)) {
        release();
        return Fail("GPU " + std::to_string(ordinal) + " appears twice in the EP groups");
      }
      Member m;
      m.rank = r, m.nranks = nranks, m.data_bytes = data_bytes;
      cudaError_t err = cudaSetDevice(ordinal);
      if (err == cudaSuccess) err = cudaMalloc(&m.base, total);
      if (err == cudaSuccess) err = cudaMemset(m.base, 0, kCtrlBytes);
      if (err == cudaSuccess) err = cudaDeviceGetAttribute(&m.sms, cudaDevAttrMultiProcessorCount, ordinal);
      if (err != cudaSuccess) {
        if (m.base) cudaFree(m.base);
        release();
        return Fail("allocating a " + std::to_string(total) + "-byte nvlink workspace on GPU " +
                    std::to_string(ordinal) + " failed: " + cudaGetErrorString(err));
      }
      members[ordinal] = m;
    }
  }
  for (int g = 0; g < ngroups; ++g) {
    char* peers[kMaxRanks] = {};
    for (int r = 0; r < nranks; ++r) peers[r] = members[ordinals[static_cast<int64_t>(g) * nranks + r]].base;
    for (int r = 0; r < nranks; ++r) {
      const int ordinal = ordinals[static_cast<int64_t>(g) * nranks + r];
      cudaError_t err = cudaSetDevice(ordinal);
      if (err == cudaSuccess) {
        err = cudaMemcpy(members[ordinal].base + offsetof(Ctrl, peers), peers, sizeof(peers), cudaMemcpyHostToDevice);
      }
      if (err == cudaSuccess) err = cudaDeviceSynchronize();
      if (err != cudaSuccess) {
        release();
        return Fail(std::string("initialising an nvlink workspace failed: ") + cudaGetErrorString(err));
      }
    }
  }
  g_workspaces[id] = std::move(members);
  return 0;
}

// Reads (and with reset != 0, zeroes) GPU `ordinal`'s kernel timing in
// workspace `id`: out = {dispatch ns, dispatch calls, combine ns, combine calls,
// dispatch calls written directly}.
// Synchronous; for benchmarks.
int wideep_nvlink_profile(int64_t id, int ordinal, uint64_t* out, int reset) {
  using namespace wideep;
  Member m;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto set = g_workspaces.find(id);
    if (set == g_workspaces.end() || !set->second.count(ordinal)) {
      return Fail("no nvlink workspace " + std::to_string(id) + " on GPU " + std::to_string(ordinal));
    }
    m = set->second[ordinal];
  }
  DeviceGuard guard;
  WIDEEP_CUDA_OR_FAIL(cudaSetDevice(ordinal));
  WIDEEP_CUDA_OR_FAIL(cudaDeviceSynchronize());
  uint64_t vals[4];
  char* base = m.base;
  WIDEEP_CUDA_OR_FAIL(cudaMemcpy(out + 4, base + offsetof(Ctrl, prof_direct), sizeof(uint64_t), cudaMemcpyDeviceToHost));
  WIDEEP_CUDA_OR_FAIL(cudaMemcpy(vals, base + offsetof(Ctrl, prof_ns), 2 * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  WIDEEP_CUDA_OR_FAIL(cudaMemcpy(vals + 2, base + offsetof(Ctrl, prof_calls), 2 * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  out[0] = vals[0], out[1] = vals[2], out[2] = vals[1], out[3] = vals[3];
  if (reset) {
    WIDEEP_CUDA_OR_FAIL(cudaMemset(base + offsetof(Ctrl, prof_ns), 0, 2 * sizeof(uint64_t)));
    WIDEEP_CUDA_OR_FAIL(cudaMemset(base + offsetof(Ctrl, prof_calls), 0, 2 * sizeof(uint64_t)));
    WIDEEP_CUDA_OR_FAIL(cudaMemset(base + offsetof(Ctrl, prof_direct), 0, sizeof(uint64_t)));
    WIDEEP_CUDA_OR_FAIL(cudaDeviceSynchronize());
  }
  return 0;
}

}  // extern "C"
