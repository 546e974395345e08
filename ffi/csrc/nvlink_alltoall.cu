// One-sided NVLink all-to-all for expert-parallel dispatch and combine, within
// one process whose GPUs have peer access (the analogue of TensorRT-LLM's
// MNNVL all-to-all and DeepEP's intranode kernels).
//
// Every device of an EP group owns a workspace: a control block and two
// halves, each half a data region (7/8) and a flag region (1/8). The grid is
// split in two roles that run at once (a quarter sends by default):
// - sender CTAs store rows (each token once per destination rank, a row cut
//   into pieces) straight into the destination's data region over NVLink;
//   after every few pieces (kDispatchSendBatch, kCombineSendBatch) its warp
//   fences once and raises those pieces' flags there;
// - receiver CTAs wait for pieces with acquire loads as they land and stream
//   them out (dispatch: copy into the outputs; combine: reduce each token's
//   rows in rank order, the portable path's order, so sums match it bit for
//   bit). A few CTAs already saturate NVLink stores, so the copy-out hides
//   behind the transfer instead of following it.
// Flags hold the call number that wrote them, so they only grow and never
// need resetting; they live apart from the data so no row bytes of another
// call's layout can pose as a flag. At its start a call posts its number (and
// for dispatch its row counts) to every peer, and no call ends before seeing
// every peer's number: a sender can only reach call n+2, which reuses call
// n's half, after its peers have started call n+1, i.e. finished call n. The
// call counter and the row counts live in device memory, so the kernels can
// be captured in a CUDA graph / XLA command buffer.
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
constexpr int kMaxPieces = 16;     // flags per row; keep equal to nvlink.py's MAX_PIECES
constexpr int64_t kMinPiece = 512;  // bytes; keep equal to nvlink.py's MIN_PIECE
// Pieces a sender warp stores before one system fence publishes them all. Each
// fence waits for the warp's stores to reach the peer, so fewer fences shorten
// a decode dispatch (EP4, 128 tokens: the last sender's end 22.3 -> 20.6 µs with
// 4); combine's receivers wait on each piece to reduce it, and its 4096-token
// call was no faster with 4 (benchmarks/RESULTS.md, 2026-11-28).
constexpr int kDispatchSendBatch = 4;
constexpr int kCombineSendBatch = 1;
constexpr int kTraceCalls = 128;    // calls each op's trace ring keeps (wideep_nvlink_trace_calls)
// Stamps per traced call (globaltimer ns; ffi_lib.NVLINK_TRACE_STAMPS names them):
// CTA 0's start, the last CTA's start, every peer's call seen, the last sender
// CTA's end, the call's end (the last CTA's).
constexpr int kTraceStamps = 5;

struct Ctrl {
  uint64_t seq;                        // calls completed on this device
  uint64_t calls[kMaxRanks];           // calls[s] = last call rank s has started
  uint32_t finished;                   // CTAs of this call done
  int32_t recv_count[2][kMaxRanks];    // rows from each source rank, per half
  char* peers[kMaxRanks];              // every rank's workspace, mapped here
  uint64_t prof_start;                 // CTA 0's start of the running call (globaltimer ns)
  uint64_t prof_ns[2], prof_calls[2];  // kernel time and calls: [dispatch, combine]
  uint64_t prof_ready_ns;              // dispatch: a receiver CTA's start to seeing every peer's call
  // Running maxima of globaltimer stamps (they only grow, so the maximum is the
  // running call's): CTAs' starts and sender CTAs' ends.
  unsigned long long last_start, senders_done;
  uint64_t peers_seen;                 // when a receiver CTA saw every peer's call number
  uint64_t trace[2][kTraceCalls][kTraceStamps];  // the last calls' stamps, per op, at prof_calls % kTraceCalls
};
static_assert(sizeof(Ctrl) <= kCtrlBytes, "control block too large");

struct Member {
  int rank = 0;
  int nranks = 0;
  char* base = nullptr;  // workspace on this device
  int sms = 0;
  uint64_t half_bytes = 0;  // one half: data then flags
};

std::mutex g_mu;
std::unordered_map<int64_t, std::unordered_map<int, Member>> g_workspaces;

__host__ __device__ inline uint64_t DataBytes(uint64_t half_bytes) { return half_bytes / 8 * 7; }
__host__ __device__ inline uint64_t FlagBytes(uint64_t half_bytes) { return half_bytes / 8; }

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
  uint64_t seen = LoadAcquireSys(flag);
  if (seen >= seq) return;
  const uint64_t start = GlobalTimerNs();
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

// A row count, row or token index of the plan outside [lo, hi]: the kernel would read
// or write past a buffer (and a peer's workspace), so it stops at once, like a timeout.
// make_dispatch_plan never builds such a plan; a hand-made or corrupted one can.
__device__ __noinline__ void BadPlanIndex(const char* op, int rank, const char* what, int64_t value, int64_t lo,
                                          int64_t hi) {
  printf("wideep nvlink %s: rank %d got %s %lld; allowed: %lld..%lld (the dispatch plan is inconsistent)\n", op,
         rank, what, static_cast<long long>(value), static_cast<long long>(lo), static_cast<long long>(hi));
  __trap();
}

__device__ __forceinline__ int64_t CheckedIndex(int64_t value, int64_t lo, int64_t hi, const char* op, int rank,
                                                const char* what) {
  if (value < lo || value > hi) BadPlanIndex(op, rank, what, value, lo, hi);
  return value;
}

__device__ __forceinline__ void StartCall(Ctrl* ctrl) {
  if (threadIdx.x != 0) return;
  const uint64_t now = GlobalTimerNs();
  if (blockIdx.x == 0) ctrl->prof_start = now;
  atomicMax(&ctrl->last_start, static_cast<unsigned long long>(now));
}

// Receivers: the moment every peer's call number was seen (the trace's third stamp).
__device__ __forceinline__ void PeersSeen(Ctrl* ctrl) {
  *reinterpret_cast<volatile uint64_t*>(&ctrl->peers_seen) = GlobalTimerNs();
}

// The last CTA of the call publishes it as completed (and its duration, from
// CTA 0's start to here: what a caller waits, peers' skew included) and its
// trace stamps. Stamps this call did not set (no senders at EP1) read as its start.
__device__ __forceinline__ void FinishCall(Ctrl* ctrl, uint64_t seq, int op, int send_ctas) {
  __syncthreads();
  if (threadIdx.x == 0) {
    if (static_cast<int>(blockIdx.x) < send_ctas) {
      atomicMax(&ctrl->senders_done, static_cast<unsigned long long>(GlobalTimerNs()));
    }
    __threadfence();
    if (atomicAdd(&ctrl->finished, 1u) == gridDim.x - 1) {
      __threadfence();
      const uint64_t start = *reinterpret_cast<volatile uint64_t*>(&ctrl->prof_start), end = GlobalTimerNs();
      const auto after_start = [start](uint64_t t) { return t > start ? t : start; };
      uint64_t* trace = ctrl->trace[op][ctrl->prof_calls[op] % kTraceCalls];
      trace[0] = start;
      trace[1] = after_start(*reinterpret_cast<volatile unsigned long long*>(&ctrl->last_start));
      trace[2] = after_start(*reinterpret_cast<volatile uint64_t*>(&ctrl->peers_seen));
      trace[3] = after_start(*reinterpret_cast<volatile unsigned long long*>(&ctrl->senders_done));
      trace[4] = end;
      ctrl->prof_ns[op] += end - start;
      ctrl->prof_calls[op] += 1;
      ctrl->finished = 0;
      *reinterpret_cast<volatile uint64_t*>(&ctrl->seq) = seq;
    }
  }
}

__device__ __forceinline__ uint64_t CurrentCall(const Ctrl* ctrl) {
  return *reinterpret_cast<const volatile uint64_t*>(&ctrl->seq) + 1;
}

// One half of some rank's workspace.
struct Half {
  char* data;
  uint64_t* flags;
};
__device__ __forceinline__ Half HalfOf(char* base, int half, uint64_t half_bytes) {
  char* h = base + kCtrlBytes + half * half_bytes;
  return {h, reinterpret_cast<uint64_t*>(h + DataBytes(half_bytes))};
}

// A row of `payload` bytes is cut into `splits` pieces of `piece` bytes (the
// last one shorter); each piece has its own flag.
struct Pieces {
  int64_t payload, piece;
  int splits;
  __device__ __forceinline__ int64_t Offset(int k) const { return k * piece; }
  __device__ __forceinline__ int64_t Length(int k) const {
    const int64_t rest = payload - k * piece;
    return rest < piece ? rest : piece;
  }
};

// The work items (piece k of row i of list j) over several lists of rows (one
// list per peer), ordered by row first: item q is row i of every list that
// has one, then row i + 1, ... So a warp-strided walk advances every list at
// once: each receiver gets its rows from all sources together, in its own
// token order, which is the order combine's receivers reduce in. Lists sorted
// by row count split the rows into bands; band b holds rows [rows[b-1],
// rows[b]) of the lists at positions b and later.
struct ItemOrder {
  int lists, splits;
  int order[kMaxRanks];            // list at each position, fewest rows first
  int64_t rows[kMaxRanks];         // row counts in that order
  int64_t first[kMaxRanks + 1];    // first item of each band; first[lists] = all items

  struct Item {
    int list, piece;
    int64_t row;
  };
  __host__ __device__ __forceinline__ int64_t Total() const { return first[lists]; }
  // `band` is the walker's cursor: items are visited in increasing order.
  __host__ __device__ __forceinline__ Item At(int64_t q, int* band) const {
    while (q >= first[*band + 1]) ++*band;
    const int b = *band;
    const int64_t r = q - first[b];
    const int64_t per_row = static_cast<int64_t>(lists - b) * splits;
    const int64_t rem = r % per_row;
    return {order[b + static_cast<int>(rem / splits)], static_cast<int>(rem % splits),
            (b > 0 ? rows[b - 1] : 0) + r / per_row};
  }
};

// Puts list j at its position (by row count, ties by list index).
template <typename CountOf>
__host__ __device__ void PlaceList(ItemOrder* o, int lists, int j, CountOf count_of) {
  const int64_t n = count_of(j);
  int pos = 0;
  for (int i = 0; i < lists; ++i) {
    const int64_t m = count_of(i);
    pos += (m < n) || (m == n && i < j);
  }
  o->order[pos] = j;
  o->rows[pos] = n;
}

// After every list is placed: the bands' first items.
__host__ __device__ inline void FinishItemOrder(ItemOrder* o, int lists, int splits) {
  int64_t q = 0, prev = 0;
  for (int b = 0; b < lists; ++b) {
    o->first[b] = q;
    q += (o->rows[b] - prev) * (lists - b) * splits;
    prev = o->rows[b];
  }
  o->first[lists] = q;
  o->lists = lists;
  o->splits = splits;
}

// Every thread of the CTA calls this (it synchronizes the CTA).
template <typename CountOf>
__device__ void BuildItemOrder(ItemOrder* o, int lists, int splits, CountOf count_of) {
  if (static_cast<int>(threadIdx.x) < lists) PlaceList(o, lists, threadIdx.x, count_of);
  __syncthreads();
  if (threadIdx.x == 0) FinishItemOrder(o, lists, splits);
  __syncthreads();
}

// Lane 0 raises the flags of the warp's last `n` pieces with one system fence
// (a release pattern: the fence, then relaxed flag stores); the warp barrier
// orders every lane's stores of those pieces before it.
__device__ __forceinline__ void PublishPieces(uint64_t* const* flags, int n, uint64_t seq, int lane) {
  __syncwarp();
  if (lane != 0 || n == 0) return;
  FenceAcqRelSys();
  for (int i = 0; i < n; ++i) StoreRelaxedSys(flags[i], seq);
}

// Senders (CTAs [0, send_ctas)): push every peer's rows (list j is rank
// rank + 1 + j) into this rank's block of the peer's data region, piece by
// piece; `write_piece(dst_row, dest, i, k)` stores piece k of row i there. A warp
// publishes its pieces kBatch at a time (and the rest at its end).
template <int kBatch, typename WritePiece>
__device__ __forceinline__ void SendRows(const char* op, Ctrl* ctrl, ItemOrder* order, const int32_t* counts,
                                         int rank, int R, int64_t C, int half, uint64_t seq, uint64_t half_bytes,
                                         int64_t row_bytes, int splits, int send_ctas, WritePiece write_piece) {
  static_assert(kBatch >= 1, "a sender warp publishes at least every piece it stores");
  BuildItemOrder(order, R - 1, splits, [&](int j) {
    return CheckedIndex(counts[(rank + 1 + j) % R], 0, C, op, rank, "a row count to send");
  });
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(send_ctas) * kWarps;
  int band = 0;
  uint64_t* pending[kBatch];  // flags of pieces stored but not yet published
  int npending = 0;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + warp; q < order->Total(); q += stride) {
    const ItemOrder::Item it = order->At(q, &band);
    const int dest = (rank + 1 + it.list) % R;
    const Half there = HalfOf(ctrl->peers[dest], half, half_bytes);
    const int64_t row = rank * C + it.row;  // this rank's block at the destination
    write_piece(there.data + row * row_bytes, dest, it.row, it.piece);
    pending[npending++] = there.flags + row * splits + it.piece;
    if (npending == kBatch) {
      PublishPieces(pending, npending, seq, lane);
      npending = 0;
    }
  }
  PublishPieces(pending, npending, seq, lane);
}

// Raises this call's number (after the row counts, for dispatch) at every peer.
__device__ __forceinline__ void PostCall(Ctrl* ctrl, int rank, int nranks, int half, uint64_t seq,
                                         const int32_t* counts) {
  const int d = threadIdx.x;
  if (blockIdx.x != 0 || d >= nranks || d == rank) return;
  Ctrl* peer = reinterpret_cast<Ctrl*>(ctrl->peers[d]);
  if (counts != nullptr) peer->recv_count[half][rank] = counts[d];
  StoreReleaseSys(&peer->calls[rank], seq);
}

struct DispatchParams {
  Ctrl* ctrl;
  int rank, nranks, capacity, top_k, send_ctas;
  int64_t num_tokens;
  Pieces row;
  int64_t meta_offset, row_bytes;
  uint64_t half_bytes, timeout_ns;
  const char* x;
  const int32_t* send_token;
  const int32_t* send_count;
  const int32_t* send_slot;
  const float* send_weight;
  char* recv_x;
  int32_t* recv_slot;
  float* recv_weight;
  int32_t* recv_count;
};

// Senders: CTAs [0, send_ctas) push every peer's rows, peers interleaved row
// by row (ItemOrder). Receivers: the other CTAs walk the same kind of order
// over this rank's own rows (copied from x) and every source's, copying each
// piece out as its flag rises.
__global__ void __launch_bounds__(kThreads) DispatchKernel(DispatchParams p) {
  __shared__ int32_t counts[kMaxRanks];
  __shared__ ItemOrder order;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t seq = CurrentCall(p.ctrl);
  const int half = static_cast<int>(seq & 1);
  const int64_t C = p.capacity, K = p.top_k, R = p.nranks;
  const int P = p.row.splits;
  StartCall(p.ctrl);
  PostCall(p.ctrl, p.rank, p.nranks, half, seq, p.send_count);

  if (blockIdx.x < p.send_ctas) {
    SendRows<kDispatchSendBatch>("dispatch", p.ctrl, &order, p.send_count, p.rank, R, C, half, seq, p.half_bytes,
             p.row_bytes, P, p.send_ctas,
             [&](char* dst, int dest, int64_t i, int k) {
               const int64_t t = CheckedIndex(p.send_token[dest * C + i], 0, p.num_tokens - 1, "dispatch", p.rank,
                                              "a token index");
               WarpCopy<false>(dst + p.row.Offset(k), p.x + t * p.row.payload + p.row.Offset(k), p.row.Length(k),
                               lane);
               if (k == 0) {
                 int32_t* meta = reinterpret_cast<int32_t*>(dst + p.meta_offset);
                 const int64_t pair = (dest * C + i) * K;
                 for (int64_t e = lane; e < K; e += 32) {
                   meta[e] = p.send_slot[pair + e];
                   meta[K + e] = __float_as_int(p.send_weight[pair + e]);
                 }
               }
             });
  } else {
    const int rcv = blockIdx.x - p.send_ctas;
    const int rcv_ctas = gridDim.x - p.send_ctas;
    const uint64_t started = rcv == 0 && threadIdx.x == 0 ? GlobalTimerNs() : 0;
    if (threadIdx.x < R) {
      const int s = threadIdx.x;
      int32_t count;
      if (s == p.rank) {
        count = p.send_count[s];
      } else {
        WaitFlag(&p.ctrl->calls[s], seq, p.timeout_ns, "dispatch", p.rank, s);
        count = *reinterpret_cast<volatile int32_t*>(&p.ctrl->recv_count[half][s]);
      }
      counts[s] = static_cast<int32_t>(CheckedIndex(count, 0, C, "dispatch", p.rank, "a row count to receive"));
    }
    __syncthreads();
    // How long peers took to start this call (launch skew plus one NVLink round
    // trip): the part of the kernel's time no data movement can shorten.
    if (rcv == 0 && threadIdx.x == 0) {
      p.ctrl->prof_ready_ns += GlobalTimerNs() - started;
      PeersSeen(p.ctrl);
    }
    // Row counts and the padding pairs' slot -1 / weight 0.
    if (rcv == 0 && threadIdx.x < R) p.recv_count[threadIdx.x] = counts[threadIdx.x];
    for (int s = 0; s < R; ++s) {
      for (int64_t e = counts[s] * K + rcv * kThreads + threadIdx.x; e < C * K;
           e += static_cast<int64_t>(rcv_ctas) * kThreads) {
        p.recv_slot[s * C * K + e] = -1;
        p.recv_weight[s * C * K + e] = 0.0f;
      }
    }
    const int64_t stride = static_cast<int64_t>(rcv_ctas) * kWarps;
    const Half here = HalfOf(reinterpret_cast<char*>(p.ctrl), half, p.half_bytes);
    // Lists: this rank's own rows, then sources rank-1, rank-2, ...
    BuildItemOrder(&order, R, P, [&](int j) { return static_cast<int64_t>(counts[(p.rank - j + R) % R]); });
    int band = 0;
    for (int64_t q = static_cast<int64_t>(rcv) * kWarps + warp; q < order.Total(); q += stride) {
      const ItemOrder::Item it = order.At(q, &band);
      const int src = (p.rank - it.list + R) % R;
      const int64_t i = it.row;
      const int k = it.piece;
      const int64_t row = src * C + i;
      char* out = p.recv_x + row * p.row.payload + p.row.Offset(k);
      if (src == p.rank) {
        const int64_t t = CheckedIndex(p.send_token[row], 0, p.num_tokens - 1, "dispatch", p.rank, "a token index");
        WarpCopy<false>(out, p.x + t * p.row.payload + p.row.Offset(k), p.row.Length(k), lane);
        if (k == 0) {
          for (int64_t e = lane; e < K; e += 32) {
            p.recv_slot[row * K + e] = p.send_slot[row * K + e];
            p.recv_weight[row * K + e] = p.send_weight[row * K + e];
          }
        }
        continue;
      }
      if (lane == 0) WaitFlag(here.flags + row * P + k, seq, p.timeout_ns, "dispatch", p.rank, src);
      __syncwarp();
      const char* in = here.data + row * p.row_bytes;
      WarpCopy<true>(out, in + p.row.Offset(k), p.row.Length(k), lane);
      if (k == 0) {
        const int32_t* meta = reinterpret_cast<const int32_t*>(in + p.meta_offset);
        for (int64_t e = lane; e < K; e += 32) {
          p.recv_slot[row * K + e] = __ldcg(meta + e);
          p.recv_weight[row * K + e] = __int_as_float(__ldcg(meta + K + e));
        }
      }
    }
  }
  FinishCall(p.ctrl, seq, 0, p.send_ctas);
}

struct CombineParams {
  Ctrl* ctrl;
  int rank, nranks, capacity, num_tokens, hidden, send_ctas;
  Pieces row;  // the pushed partial rows; the reduction works piece by piece too
  int64_t row_bytes;
  uint64_t half_bytes, timeout_ns;
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

// Bytes of a row one warp reduces per item: two 16-byte vectors per lane.
// Combine's pieces are whole chunks, so a chunk lies inside one pushed piece.
constexpr int64_t kReduceChunk = 32 * 16 * 2;

// out[b0:b1) (as T elements) = sum over ranks r, in order, of row rows[r] of
// rank r (this rank's own rows from `local`, the others' from the workspace).
// Each lane loads its vectors of a few ranks before adding any, so several
// loads are in flight; the sums still run in rank order.
template <typename T>
__device__ __forceinline__ void ReduceChunk(float* out, const char* remote, const char* local, const int* rows,
                                            int rank, int64_t R, int64_t C, int64_t row_bytes, int64_t payload,
                                            int64_t b0, int64_t b1, int lane) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerLane = kReduceChunk / 16 / 32;
  constexpr int kRanksAhead = 4;
  int64_t unit[kPerLane];
  bool live[kPerLane];
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    unit[u] = b0 / 16 + lane + 32 * u;
    live[u] = unit[u] < b1 / 16;
  }
  float acc[kPerLane][kVec];
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[u][v] = 0.0f;
  }
  for (int r0 = 0; r0 < R; r0 += kRanksAhead) {
    int4 raw[kRanksAhead][kPerLane];
#pragma unroll
    for (int j = 0; j < kRanksAhead; ++j) {
      const int r = r0 + j;
      const int row = r < R ? rows[r] : -1;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        raw[j][u] = make_int4(0, 0, 0, 0);
        if (row < 0 || !live[u]) continue;
        if (r == rank) {
          raw[j][u] = __ldg(reinterpret_cast<const int4*>(local + (r * C + row) * payload) + unit[u]);
        } else {
          raw[j][u] = __ldcg(reinterpret_cast<const int4*>(remote + (r * C + row) * row_bytes) + unit[u]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kRanksAhead; ++j) {
      const int r = r0 + j;
      if (r >= R || rows[r] < 0) continue;  // absent rows add nothing (not even +0.0)
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const T* vals = reinterpret_cast<const T*>(&raw[j][u]);
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[u][v] += ToFloat(vals[v]);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    if (!live[u]) continue;
    float4* dst = reinterpret_cast<float4*>(out + unit[u] * kVec);
#pragma unroll
    for (int v = 0; v < kVec / 4; ++v) {
      dst[v] = make_float4(acc[u][4 * v], acc[u][4 * v + 1], acc[u][4 * v + 2], acc[u][4 * v + 3]);
    }
  }
}

// Senders push partial rows back to their source ranks as dispatch pushes
// tokens (peers interleaved, so a token's rows from every rank land close
// together). Receivers reduce (token, chunk) items in token order; each waits
// only for the pieces it adds, so reducing overlaps the transfer.
template <typename T>
__global__ void __launch_bounds__(kThreads) CombineKernel(CombineParams p) {
  __shared__ int rows[kWarps][kMaxRanks];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t seq = CurrentCall(p.ctrl);
  const int half = static_cast<int>(seq & 1);
  const int64_t C = p.capacity, H = p.hidden, R = p.nranks;
  const int P = p.row.splits;
  StartCall(p.ctrl);
  PostCall(p.ctrl, p.rank, p.nranks, half, seq, nullptr);

  if (blockIdx.x < p.send_ctas) {
    __shared__ ItemOrder order;
    SendRows<kCombineSendBatch>("combine", p.ctrl, &order, p.send_rows, p.rank, R, C, half, seq, p.half_bytes,
             p.row_bytes, P, p.send_ctas,
             [&](char* dst, int dest, int64_t i, int k) {
               WarpCopy<false>(dst + p.row.Offset(k), p.partial + (dest * C + i) * p.row.payload + p.row.Offset(k),
                               p.row.Length(k), lane);
             });
  } else {
    const int rcv = blockIdx.x - p.send_ctas;
    const Half here = HalfOf(reinterpret_cast<char*>(p.ctrl), half, p.half_bytes);
    const int64_t step = static_cast<int64_t>(gridDim.x - p.send_ctas) * kWarps;
    // Items: (token, chunk) in token order, so all warps start on the rows that
    // land first. A chunk is a whole warp's vector width (or the whole row when
    // rows are not 16-byte aligned) and lies inside one pushed piece.
    const bool vec = (p.row.payload % 16) == 0;
    const int64_t chunk = vec ? kReduceChunk : p.row.payload;
    const int64_t chunks = (p.row.payload + chunk - 1) / chunk;
    for (int64_t item = static_cast<int64_t>(rcv) * kWarps + warp; item < p.num_tokens * chunks; item += step) {
      const int64_t t = item / chunks;
      const int64_t b0 = (item % chunks) * chunk;
      const int64_t b1 = b0 + chunk < p.row.payload ? b0 + chunk : p.row.payload;
      const int k = static_cast<int>(b0 / p.row.piece);  // the pushed piece holding these bytes
      __syncwarp();
      for (int r = lane; r < R; r += 32) {
        const int row = static_cast<int>(CheckedIndex(p.token_row[t * R + r], -1, C - 1, "combine", p.rank,
                                                      "a token's row"));
        rows[warp][r] = row;
        if (row >= 0 && r != p.rank) {
          WaitFlag(here.flags + (r * C + row) * P + k, seq, p.timeout_ns, "combine", p.rank, r);
        }
      }
      __syncwarp();
      float* out = p.y + t * H;
      if (vec) {
        ReduceChunk<T>(out, here.data, p.partial, rows[warp], p.rank, R, C, p.row_bytes, p.row.payload, b0, b1, lane);
      } else {
        for (int64_t e = b0 / static_cast<int64_t>(sizeof(T)) + lane; e < b1 / static_cast<int64_t>(sizeof(T));
             e += 32) {
          float acc = 0.0f;
          for (int r = 0; r < R; ++r) {
            const int row = rows[warp][r];
            if (row < 0) continue;
            if (r == p.rank) {
              acc += ToFloat(reinterpret_cast<const T*>(p.partial + (r * C + row) * p.row.payload)[e]);
            } else {
              const T* src = reinterpret_cast<const T*>(here.data + (r * C + row) * p.row_bytes);
              acc += ToFloat(*reinterpret_cast<const volatile T*>(src + e));
            }
          }
          out[e] = acc;
        }
      }
    }
    // Every peer must have started this call before it ends (see the top).
    if (rcv == 0 && threadIdx.x < R && threadIdx.x != p.rank) {
      WaitFlag(&p.ctrl->calls[threadIdx.x], seq, p.timeout_ns, "combine", p.rank, threadIdx.x);
    }
    __syncthreads();
    if (rcv == 0 && threadIdx.x == 0) PeersSeen(p.ctrl);
  }
  FinishCall(p.ctrl, seq, 1, p.send_ctas);
}

// ---------------------------------------------------------------------------
// Host side.

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

// The grid: one CTA per SM (capped by `max_ctas`), so it is resident at once;
// `send_ctas` of them (default: a quarter) send, the rest receive. A quarter
// of an H200's SMs already keeps NVLink stores near their peak, and receivers
// need the rest: combine's reduction reads R rows and writes an f32 row per token.
struct Grid {
  int ctas, send_ctas;
};
Grid MakeGrid(int nranks, int sms, int64_t max_ctas, int64_t send_ctas) {
  int64_t ctas = sms;
  if (max_ctas > 0 && max_ctas < ctas) ctas = max_ctas;
  if (ctas < 2) ctas = 2;
  if (nranks == 1) return {static_cast<int>(ctas), 0};  // nothing to send
  int64_t send = send_ctas > 0 ? send_ctas : (ctas / 4 > 0 ? ctas / 4 : 1);
  if (send > ctas - 1) send = ctas - 1;
  return {static_cast<int>(ctas), static_cast<int>(send)};
}

// Pieces per row: enough that `rows` rows give every sender warp work, each
// piece at least kMinPiece bytes and a multiple of `align`, at most kMaxPieces
// (and as many flags as the flag region holds); one piece when the row is not
// 16-byte aligned.
Pieces SplitRows(int64_t payload, int64_t rows, int send_ctas, int64_t flag_room, int64_t align) {
  Pieces p{payload, payload, 1};
  // Payload 0 (x [T, 0]: only the slots and weights move) is one empty piece; splitting it
  // gave piece 0 and divided by it.
  if (payload <= 0 || payload % 16 != 0 || rows <= 0) return p;
  const int64_t warps = static_cast<int64_t>(send_ctas > 0 ? send_ctas : 1) * kWarps;
  int64_t splits = (warps + rows - 1) / rows;
  int64_t most = payload / kMinPiece > 1 ? payload / kMinPiece : 1;
  if (most > kMaxPieces) most = kMaxPieces;
  if (most > flag_room) most = flag_room > 1 ? flag_room : 1;
  if (splits > most) splits = most;
  p.piece = AlignUp((payload + splits - 1) / splits, align);
  p.splits = static_cast<int>((payload + p.piece - 1) / p.piece);
  return p;
}

// Where one call's rows go: its grid, its pieces, and the bytes a workspace
// half must hold. Every member of an EP group derives the same layout (same
// shapes, workspace size and SM count), which senders and receivers rely on.
struct Layout {
  Grid grid;
  Pieces row;
  int64_t meta_offset, row_bytes;
  uint64_t data_need, flag_need;
};

Layout PlanLayout(bool combine, int nranks, int sms, uint64_t half_bytes, int64_t capacity, int64_t payload,
                  int64_t top_k, int64_t max_ctas, int64_t send_ctas) {
  Layout l;
  l.grid = MakeGrid(nranks, sms, max_ctas, send_ctas);
  l.meta_offset = AlignUp(payload, 16);
  l.row_bytes = combine ? l.meta_offset : l.meta_offset + AlignUp(2 * top_k * 4, 16);
  const int64_t rows = static_cast<int64_t>(nranks) * capacity;  // every source's block
  const int64_t flag_room = static_cast<int64_t>(FlagBytes(half_bytes) / sizeof(uint64_t)) / rows;
  const int64_t sent = (nranks > 1 ? nranks - 1 : 1) * capacity;  // the most rows one rank sends
  l.row = SplitRows(payload, sent, l.grid.send_ctas, flag_room, combine ? kReduceChunk : 16);
  l.data_need = static_cast<uint64_t>(rows) * l.row_bytes;
  l.flag_need = static_cast<uint64_t>(rows) * l.row.splits * sizeof(uint64_t);
  return l;
}

// Empty if the layout fits a half of `half_bytes`, else why not.
std::string RoomError(const char* op, const Layout& l, uint64_t half_bytes, int64_t workspace) {
  if (l.data_need <= DataBytes(half_bytes) && l.flag_need <= FlagBytes(half_bytes)) return "";
  return std::string("wideep nvlink ") + op + ": needs " + std::to_string(l.data_need) + " data and " +
         std::to_string(l.flag_need) + " flag bytes per workspace half, workspace " + std::to_string(workspace) +
         " has " + std::to_string(DataBytes(half_bytes)) + " and " + std::to_string(FlagBytes(half_bytes));
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
                        int64_t timeout_ms, int64_t max_ctas, int64_t send_ctas) {
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
  const int64_t tokens = xd[0], hidden = xd[1], capacity = td[1], top_k = sd[2];
  for (const std::string& err :
       {ShapeError("wideep nvlink dispatch", "input send_weight", send_weight.dimensions(),
                         {m.nranks, capacity, top_k}),
        ShapeError("wideep nvlink dispatch", "output recv_x", recv_x->dimensions(), {m.nranks, capacity, hidden}),
        ShapeError("wideep nvlink dispatch", "output recv_slot", recv_slot->dimensions(), {m.nranks, capacity, top_k}),
        ShapeError("wideep nvlink dispatch", "output recv_weight", recv_weight->dimensions(),
                         {m.nranks, capacity, top_k}),
        ShapeError("wideep nvlink dispatch", "output recv_count", recv_count->dimensions(), {m.nranks})}) {
    if (!err.empty()) return ffi::Error::InvalidArgument(err);
  }
  if (recv_x->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("wideep nvlink dispatch: output recv_x's dtype differs from x's; "
                                       "allowed: the same dtype");
  }
  if (capacity == 0 || tokens == 0) {
    // Nothing to move (every rank has these shapes, so none launches): no rows from any
    // source and every pair padding (slot -1, weight 0), as the kernel writes them.
    WIDEEP_CUDA_OR_RETURN(cudaMemsetAsync(recv_count->untyped_data(), 0, recv_count->size_bytes(), stream));
    WIDEEP_CUDA_OR_RETURN(cudaMemsetAsync(recv_slot->untyped_data(), 0xFF, recv_slot->size_bytes(), stream));
    WIDEEP_CUDA_OR_RETURN(cudaMemsetAsync(recv_weight->untyped_data(), 0, recv_weight->size_bytes(), stream));
    return ffi::Error::Success();
  }
  const int64_t payload = static_cast<int64_t>(x.size_bytes()) / tokens;
  const Layout l = PlanLayout(false, m.nranks, m.sms, m.half_bytes, capacity, payload, top_k, max_ctas, send_ctas);
  if (std::string err = RoomError("dispatch", l, m.half_bytes, workspace); !err.empty()) {
    return ffi::Error::InvalidArgument(err);
  }
  const Grid grid = l.grid;
  DispatchParams p;
  p.ctrl = reinterpret_cast<Ctrl*>(m.base);
  p.rank = m.rank, p.nranks = m.nranks, p.capacity = static_cast<int>(capacity);
  p.num_tokens = tokens;
  p.top_k = static_cast<int>(top_k);
  p.send_ctas = grid.send_ctas;
  p.meta_offset = l.meta_offset;
  p.row_bytes = l.row_bytes;
  p.row = l.row;
  p.half_bytes = m.half_bytes;
  p.timeout_ns = TimeoutNs(timeout_ms);
  p.x = static_cast<const char*>(x.untyped_data());
  p.send_token = send_token.typed_data();
  p.send_count = send_count.typed_data();
  p.send_slot = send_slot.typed_data();
  p.send_weight = send_weight.typed_data();
  p.recv_x = static_cast<char*>(recv_x->untyped_data());
  p.recv_slot = recv_slot->typed_data();
  p.recv_weight = recv_weight->typed_data();
  p.recv_count = recv_count->typed_data();
  DispatchKernel<<<grid.ctas, kThreads, 0, stream>>>(p);
  WIDEEP_CUDA_OR_RETURN(cudaGetLastError());
  return ffi::Error::Success();
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer partial,
                       ffi::Buffer<ffi::S32> send_rows, ffi::Buffer<ffi::S32> token_row,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t workspace, int64_t timeout_ms,
                       int64_t max_ctas, int64_t send_ctas) {
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
  if (std::string err = ShapeError("wideep nvlink combine", "output y", y->dimensions(), {tokens, hidden});
      !err.empty()) {
    return ffi::Error::InvalidArgument(err);
  }
  if (tokens == 0 || hidden == 0) return ffi::Error::Success();
  if (capacity == 0) {  // nothing was sent anywhere: every token's sum is empty
    WIDEEP_CUDA_OR_RETURN(cudaMemsetAsync(y->untyped_data(), 0, y->size_bytes(), stream));
    return ffi::Error::Success();
  }
  const int64_t payload = static_cast<int64_t>(partial.size_bytes()) / (m.nranks * capacity);
  const Layout l = PlanLayout(true, m.nranks, m.sms, m.half_bytes, capacity, payload, 0, max_ctas, send_ctas);
  if (std::string err = RoomError("combine", l, m.half_bytes, workspace); !err.empty()) {
    return ffi::Error::InvalidArgument(err);
  }
  const Grid grid = l.grid;
  CombineParams p;
  p.ctrl = reinterpret_cast<Ctrl*>(m.base);
  p.rank = m.rank, p.nranks = m.nranks, p.capacity = static_cast<int>(capacity);
  p.num_tokens = static_cast<int>(tokens), p.hidden = static_cast<int>(hidden);
  p.send_ctas = grid.send_ctas;
  p.row_bytes = l.row_bytes;
  p.row = l.row;
  p.half_bytes = m.half_bytes;
  p.timeout_ns = TimeoutNs(timeout_ms);
  p.partial = static_cast<const char*>(partial.untyped_data());
  p.send_rows = send_rows.typed_data();
  p.token_row = token_row.typed_data();
  p.y = y->typed_data();
  switch (partial.element_type()) {
    case ffi::DataType::BF16:
      CombineKernel<__nv_bfloat16><<<grid.ctas, kThreads, 0, stream>>>(p);
      break;
    case ffi::DataType::F16:
      CombineKernel<__half><<<grid.ctas, kThreads, 0, stream>>>(p);
      break;
    case ffi::DataType::F32:
      CombineKernel<float><<<grid.ctas, kThreads, 0, stream>>>(p);
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
                                  .Attr<int64_t>("max_ctas")
                                  .Attr<int64_t>("send_ctas"),
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
                                  .Attr<int64_t>("max_ctas")
                                  .Attr<int64_t>("send_ctas"),
                              {ffi::Traits::kCmdBufferCompatible});

// ---------------------------------------------------------------------------
// C API for ctypes (set-up only; never on the hot path).

namespace wideep {
// The profile readers' lookup: FindMember's, as a plain return code and message for ctypes.
int MemberForBenchmark(int64_t id, int ordinal, Member* m) {
  if (ffi::Error e = FindMember(id, ordinal, m); !e.success()) return Fail(e.message());
  return 0;
}
}  // namespace wideep

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
// row-major, group by group), `half_bytes` per half (7/8 data, 1/8 flags; a
// multiple of 64). Idempotent per id.
int wideep_nvlink_create(int64_t id, int ngroups, int nranks, const int* ordinals, uint64_t half_bytes) {
  using namespace wideep;
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_workspaces.count(id)) return 0;
  if (nranks < 1 || nranks > kMaxRanks) {
    return Fail("nranks=" + std::to_string(nranks) + " is out of range; allowed: 1.." + std::to_string(kMaxRanks));
  }
  if (half_bytes == 0 || half_bytes % 64 != 0) {
    return Fail("half_bytes=" + std::to_string(half_bytes) + "; allowed: a positive multiple of 64");
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
  const uint64_t total = kCtrlBytes + 2 * half_bytes;
  for (int g = 0; g < ngroups; ++g) {
    for (int r = 0; r < nranks; ++r) {
      const int ordinal = ordinals[static_cast<int64_t>(g) * nranks + r];
      if (members.count(ordinal)) {
        release();
        return Fail("GPU " + std::to_string(ordinal) + " appears twice in the EP groups");
      }
      Member m;
      m.rank = r, m.nranks = nranks, m.half_bytes = half_bytes;
      cudaError_t err = cudaSetDevice(ordinal);
      if (err == cudaSuccess) err = cudaMalloc(&m.base, total);
      // Flags must start below every call number; data needs no clearing, but
      // one memset of the whole is as cheap as three.
      if (err == cudaSuccess) err = cudaMemset(m.base, 0, total);
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
    // One SM count per group: every member must derive the same layout.
    int sms = members[ordinals[static_cast<int64_t>(g) * nranks]].sms;
    for (int r = 1; r < nranks; ++r) {
      const int other = members[ordinals[static_cast<int64_t>(g) * nranks + r]].sms;
      if (other < sms) sms = other;
    }
    for (int r = 0; r < nranks; ++r) members[ordinals[static_cast<int64_t>(g) * nranks + r]].sms = sms;
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

// The layout a call of these shapes gets (see PlanLayout): out = {ctas,
// send_ctas, pieces per row, piece bytes, data bytes, flag bytes}. Returns -1,
// with the reason in wideep_last_error(), when it does not fit `half_bytes`
// or an argument is out of range. Pure host arithmetic (no GPU), for tests.
int wideep_nvlink_layout(int combine, int nranks, int sms, int64_t capacity, int64_t payload, int64_t top_k,
                         int64_t max_ctas, int64_t send_ctas, uint64_t half_bytes, int64_t* out) {
  using namespace wideep;
  if (nranks < 1 || nranks > kMaxRanks || sms < 1 || capacity < 1 || payload < 0 || top_k < 0) {
    return Fail("wideep_nvlink_layout: nranks=" + std::to_string(nranks) + " sms=" + std::to_string(sms) +
                " capacity=" + std::to_string(capacity) + " payload=" + std::to_string(payload) +
                " top_k=" + std::to_string(top_k) + "; allowed: 1 <= nranks <= " + std::to_string(kMaxRanks) +
                ", sms, capacity >= 1, payload, top_k >= 0");
  }
  const Layout l = PlanLayout(combine != 0, nranks, sms, half_bytes, capacity, payload, top_k, max_ctas, send_ctas);
  const int64_t values[6] = {l.grid.ctas, l.grid.send_ctas, l.row.splits, l.row.piece,
                             static_cast<int64_t>(l.data_need), static_cast<int64_t>(l.flag_need)};
  for (int i = 0; i < 6; ++i) out[i] = values[i];
  const std::string err = RoomError(combine ? "combine" : "dispatch", l, half_bytes, -1);
  return err.empty() ? 0 : Fail(err);
}

// The order in which senders (and dispatch's receivers) walk their work
// items (see ItemOrder) over `lists` lists of counts[j] rows cut into `splits`
// pieces: out[3q .. 3q+2] = {list, row, piece} of item q. Returns the item
// count, or -1 (reason in wideep_last_error()) if it exceeds `max_items`
// or an argument is out of range. Pure host arithmetic, for tests.
int64_t wideep_nvlink_item_order(int lists, int splits, const int64_t* counts, int64_t max_items, int64_t* out) {
  using namespace wideep;
  if (lists < 1 || lists > kMaxRanks || splits < 1 || splits > kMaxPieces) {
    return Fail("wideep_nvlink_item_order: lists=" + std::to_string(lists) + " splits=" + std::to_string(splits) +
                "; allowed: 1.." + std::to_string(kMaxRanks) + " lists, 1.." + std::to_string(kMaxPieces) +
                " splits");
  }
  for (int j = 0; j < lists; ++j) {
    if (counts[j] < 0) return Fail("wideep_nvlink_item_order: counts[" + std::to_string(j) + "] < 0");
  }
  ItemOrder o;
  auto count_of = [&](int j) { return counts[j]; };
  for (int j = 0; j < lists; ++j) PlaceList(&o, lists, j, count_of);
  FinishItemOrder(&o, lists, splits);
  if (o.Total() > max_items) {
    return Fail("wideep_nvlink_item_order: " + std::to_string(o.Total()) + " items > max_items=" +
                std::to_string(max_items));
  }
  int band = 0;
  for (int64_t q = 0; q < o.Total(); ++q) {
    const ItemOrder::Item it = o.At(q, &band);
    out[3 * q] = it.list, out[3 * q + 1] = it.row, out[3 * q + 2] = it.piece;
  }
  return o.Total();
}

// Reads (and with reset != 0, zeroes) GPU `ordinal`'s kernel timing in
// workspace `id`: out = {dispatch ns, dispatch calls, combine ns, combine calls,
// dispatch ns waiting for peers to start}.
// Synchronous; for benchmarks.
int wideep_nvlink_profile(int64_t id, int ordinal, uint64_t* out, int reset) {
  using namespace wideep;
  Member m;
  if (int rc = MemberForBenchmark(id, ordinal, &m)) return rc;
  DeviceGuard guard;
  WIDEEP_CUDA_OR_FAIL(cudaSetDevice(ordinal));
  WIDEEP_CUDA_OR_FAIL(cudaDeviceSynchronize());
  uint64_t vals[4];
  char* base = m.base;
  WIDEEP_CUDA_OR_FAIL(cudaMemcpy(vals, base + offsetof(Ctrl, prof_ns), 2 * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  WIDEEP_CUDA_OR_FAIL(cudaMemcpy(vals + 2, base + offsetof(Ctrl, prof_calls), 2 * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  out[0] = vals[0], out[1] = vals[2], out[2] = vals[1], out[3] = vals[3];
  WIDEEP_CUDA_OR_FAIL(cudaMemcpy(out + 4, base + offsetof(Ctrl, prof_ready_ns), sizeof(uint64_t),
                                 cudaMemcpyDeviceToHost));
  if (reset) {
    WIDEEP_CUDA_OR_FAIL(cudaMemset(base + offsetof(Ctrl, prof_ns), 0, 2 * sizeof(uint64_t)));
    WIDEEP_CUDA_OR_FAIL(cudaMemset(base + offsetof(Ctrl, prof_calls), 0, 2 * sizeof(uint64_t)));
    WIDEEP_CUDA_OR_FAIL(cudaMemset(base + offsetof(Ctrl, prof_ready_ns), 0, sizeof(uint64_t)));
    WIDEEP_CUDA_OR_FAIL(cudaDeviceSynchronize());
  }
  return 0;
}

// Length of the trace ring and stamps per call (wideep_nvlink_trace's out
// holds their product).
int wideep_nvlink_trace_calls() { return wideep::kTraceCalls; }
int wideep_nvlink_trace_stamps() { return wideep::kTraceStamps; }

// Copies GPU `ordinal`'s trace ring of op 0 (dispatch) or 1 (combine) in
// workspace `id`: out[kTraceCalls][kTraceStamps] in globaltimer ns (see
// kTraceStamps), slot = call number % kTraceCalls; *calls = calls since the
// last profile reset. Synchronous; for benchmarks.

int wideep_nvlink_trace(int64_t id, int ordinal, int op, uint64_t* out, uint64_t* calls) {
  using namespace wideep;
  if (op < 0 || op > 1) return Fail("nvlink trace: op " + std::to_string(op) + " is not 0 or 1");
  Member m;
  if (int rc = MemberForBenchmark(id, ordinal, &m)) return rc;
  DeviceGuard guard;
  WIDEEP_CUDA_OR_FAIL(cudaSetDevice(ordinal));
  WIDEEP_CUDA_OR_FAIL(cudaDeviceSynchronize());
  WIDEEP_CUDA_OR_FAIL(cudaMemcpy(out, m.base + offsetof(Ctrl, trace) + op * sizeof(Ctrl::trace[0]),
                                 sizeof(Ctrl::trace[0]), cudaMemcpyDeviceToHost));
  WIDEEP_CUDA_OR_FAIL(cudaMemcpy(calls, m.base + offsetof(Ctrl, prof_calls) + op * sizeof(uint64_t),
                                 sizeof(uint64_t), cudaMemcpyDeviceToHost));
  return 0;
}

}  // extern "C"
