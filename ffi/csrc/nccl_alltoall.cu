// NCCL all-to-all for expert-parallel dispatch and combine: grouped
// ncclSend/ncclRecv of only the real rows of each per-peer buffer.
//
// The per-peer row counts are exchanged on the device first; the host then
// needs them to size the sends, so each call copies them back and waits for
// the stream once (what torch's all_to_all_single with splits and DeepEP's
// normal mode do too). That wait keeps these handlers out of CUDA graphs.
// It is bounded: a peer that never reaches the call (crashed, or running
// another program) makes it abort the communicator and return an error.
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <initializer_list>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common.h"

namespace wideep {
namespace {

struct NcclMember {
  ncclComm_t comm = nullptr;
  int rank = 0;
  int nranks = 0;
  int32_t* host_counts = nullptr;  // pinned, 2 * nranks
  cudaEvent_t counts_ready = nullptr;
  std::mutex* mu = nullptr;        // guards host_counts, aborted and started
  bool* aborted = nullptr;         // set once a timeout aborted `comm`; every later call fails
  bool* started = nullptr;         // set once a call's counts arrived
  int64_t first_call_timeout_ms = 0;  // the wait limit until then
};

std::mutex g_nccl_mu;       // guards g_comms; every call takes it briefly (FindComm)
std::mutex g_nccl_init_mu;  // one communicator set-up at a time; held across ncclCommInitRank
std::unordered_map<int64_t, std::unordered_map<int, NcclMember>> g_comms;

ffi::Error FindComm(int64_t id, int ordinal, NcclMember* out) {
  std::lock_guard<std::mutex> lock(g_nccl_mu);
  auto set = g_comms.find(id);
  if (set == g_comms.end()) {
    return ffi::Error::InvalidArgument("wideep nccl: communicator set " + std::to_string(id) +
                                       " was not created in this process");
  }
  auto member = set->second.find(ordinal);
  if (member == set->second.end()) {
    return ffi::Error::InvalidArgument("wideep nccl: GPU " + std::to_string(ordinal) +
                                       " has no communicator in set " + std::to_string(id));
  }
  *out = member->second;
  return ffi::Error::Success();
}

// One payload of an exchange: block r of `send` / `recv` ([R, C, row]) holds
// the rows for / from rank r.
struct Payload {
  const char* send;
  char* recv;
  int64_t row_bytes, capacity;
};

ffi::Error Aborted(const NcclMember& m, const char* op, const std::string& why) {
  ncclCommAbort(m.comm);  // also ends the NCCL kernels still waiting on the stream
  *m.aborted = true;
  return ffi::Error::Internal(std::string("wideep nccl ") + op + ": rank " + std::to_string(m.rank) + " of " +
                              std::to_string(m.nranks) + " " + why +
                              "; the communicator was aborted, restart the process");
}

// Runs the sends and receives `post` enqueues (it returns the first failure) as one
// NCCL group. The group is closed even on a failure, so this thread's next group starts
// clean; a failure aborts the communicator, since peers may already have posted their
// halves of this exchange and nothing later could match them.
template <typename Post>
ffi::Error InGroup(const NcclMember& m, const char* op, Post post) {
  ncclResult_t r = ncclGroupStart();
  if (r == ncclSuccess) {
    r = post();
    const ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess) r = end;
  }
  if (r != ncclSuccess) return Aborted(m, op, std::string("got an NCCL error: ") + ncclGetErrorString(r));
  return ffi::Error::Success();
}

// Sends rows [0, send_rows[r]) of every payload's block r to rank r and
// receives rows [0, recv_rows[r]) from it, all in one NCCL group (one launch).
ffi::Error ExchangeRows(const NcclMember& m, cudaStream_t stream, const char* op,
                        std::initializer_list<Payload> payloads, const int32_t* send_rows,
                        const int32_t* recv_rows) {
  return InGroup(m, op, [&]() -> ncclResult_t {
    for (int r = 0; r < m.nranks; ++r) {
      for (const Payload& p : payloads) {
        const int64_t block = r * p.capacity * p.row_bytes;
        if (send_rows[r] > 0) {
          ncclResult_t e = ncclSend(p.send + block, send_rows[r] * p.row_bytes, ncclInt8, r, m.comm, stream);
          if (e != ncclSuccess) return e;
        }
        if (recv_rows[r] > 0) {
          ncclResult_t e = ncclRecv(p.recv + block, recv_rows[r] * p.row_bytes, ncclInt8, r, m.comm, stream);
          if (e != ncclSuccess) return e;
        }
      }
    }
    return ncclSuccess;
  });
}

// Waits for the counts' copy like cudaStreamSynchronize (spinning), but at
// most timeout_ms, and stops early on an error NCCL reports asynchronously.
// The first call waits as long as setting up the communicator may: processes reach
// their first step apart by their compile and load times (one may hit the compilation
// cache, another compile for minutes), which the per-call limit is too short for.
ffi::Error WaitForCounts(const NcclMember& m, cudaStream_t stream, int64_t timeout_ms, const char* op) {
  WIDEEP_CUDA_OR_RETURN(cudaEventRecord(m.counts_ready, stream));
  const bool first = !*m.started;
  if (first) timeout_ms = std::max(timeout_ms, m.first_call_timeout_ms);
  const char* limit_name = first ? "WIDEEP_NCCL_INIT_TIMEOUT_S, the first call's limit" : "WIDEEP_COMM_TIMEOUT_S";
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t spin = 1;; ++spin) {
    const cudaError_t q = cudaEventQuery(m.counts_ready);
    if (q == cudaSuccess) {
      *m.started = true;
      return ffi::Error::Success();
    }
    if (q != cudaErrorNotReady) {
      return ffi::Error::Internal(std::string("wideep nccl ") + op + ": waiting for the row counts failed: " +
                                  cudaGetErrorString(q));
    }
    if (spin % 1024 != 0) continue;
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(m.comm, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress) {
      return Aborted(m, op, std::string("got an NCCL error while exchanging row counts: ") +
                                ncclGetErrorString(async));
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    if (waited > std::chrono::milliseconds(timeout_ms)) {
      return Aborted(m, op, "timed out after " + std::to_string(timeout_ms) + " ms (" + limit_name +
                                ") waiting for its peers' row counts: a peer rank "
                                "did not reach the same call (stopped, crashed, or running another program)");
    }
    if (waited > std::chrono::milliseconds(10)) std::this_thread::yield();  // a long wait: share the core
  }
}

ffi::Error CopyCountsToHost(const NcclMember& m, cudaStream_t stream, const int32_t* a, const int32_t* b,
                            int64_t timeout_ms, const char* op) {
  WIDEEP_CUDA_OR_RETURN(cudaMemcpyAsync(m.host_counts, a, m.nranks * sizeof(int32_t),
                                        cudaMemcpyDeviceToHost, stream));
  WIDEEP_CUDA_OR_RETURN(cudaMemcpyAsync(m.host_counts + m.nranks, b, m.nranks * sizeof(int32_t),
                                        cudaMemcpyDeviceToHost, stream));
  return WaitForCounts(m, stream, timeout_ms, op);
}

ffi::Error CheckUsable(const NcclMember& m, int64_t timeout_ms, const char* op) {
  if (*m.aborted) {
    return ffi::Error::Internal(std::string("wideep nccl ") + op +
                                ": this communicator was aborted after an earlier timeout or NCCL error; "
                                "restart the process");
  }
  if (timeout_ms <= 0) {
    return ffi::Error::InvalidArgument(std::string("wideep nccl ") + op + ": timeout_ms=" +
                                       std::to_string(timeout_ms) + "; allowed: > 0");
  }
  return ffi::Error::Success();
}

// Says which row count is outside [0, capacity], and clamps every such count into it.
// The caller still runs the exchange with the clamped counts: each count pair (my send
// to r, r's receive from me) holds one value on both ranks, so clamped pairs still match,
// whereas a rank that returned here would leave its peers' NCCL kernels waiting forever.
ffi::Error ClampCounts(const NcclMember& m, int64_t capacity, const char* op) {
  ffi::Error error = ffi::Error::Success();
  for (int i = 0; i < 2 * m.nranks; ++i) {
    const int32_t count = m.host_counts[i];
    if (count >= 0 && count <= capacity) continue;
    if (error.success()) {
      error = ffi::Error::InvalidArgument(std::string("wideep nccl ") + op + ": row count " +
                                          std::to_string(count) + " is outside [0, capacity=" +
                                          std::to_string(capacity) + "]");
    }
    m.host_counts[i] = count < 0 ? 0 : static_cast<int32_t>(capacity);
  }
  return error;
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer send_x,
                        ffi::Buffer<ffi::S32> send_meta, ffi::Buffer<ffi::S32> send_count,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::Buffer<ffi::S32>> recv_meta,
                        ffi::Result<ffi::Buffer<ffi::S32>> recv_count, int64_t comm, int64_t timeout_ms) {
  NcclMember m;
  if (ffi::Error e = FindComm(comm, ordinal, &m); !e.success()) return e;
  std::lock_guard<std::mutex> lock(*m.mu);
  if (ffi::Error e = CheckUsable(m, timeout_ms, "dispatch"); !e.success()) return e;
  const auto xd = send_x.dimensions();
  const auto md = send_meta.dimensions();
  if (xd.size() != 3 || md.size() != 3 || xd[0] != m.nranks || md[0] != m.nranks || md[1] != xd[1] ||
      send_count.element_count() != static_cast<size_t>(m.nranks)) {
    return ffi::Error::InvalidArgument("wideep nccl dispatch: expected send_x [R, C, H], send_meta [R, C, M], "
                                       "send_count [R] with R = " + std::to_string(m.nranks));
  }
  for (const std::string& err : {ShapeError("wideep nccl dispatch", "output recv_x", recv_x->dimensions(),
                                                  {xd[0], xd[1], xd[2]}),
                                 ShapeError("wideep nccl dispatch", "output recv_meta", recv_meta->dimensions(),
                                                  {md[0], md[1], md[2]}),
                                 ShapeError("wideep nccl dispatch", "output recv_count", recv_count->dimensions(),
                                                  {m.nranks})}) {
    if (!err.empty()) return ffi::Error::InvalidArgument(err);
  }
  if (recv_x->element_type() != send_x.element_type()) {
    return ffi::Error::InvalidArgument("wideep nccl dispatch: output recv_x's dtype differs from send_x's; "
                                       "allowed: the same dtype");
  }
  const int64_t capacity = xd[1];
  const int32_t* dev_send = send_count.typed_data();
  int32_t* dev_recv = recv_count->typed_data();
  // Counts first: one int per peer, on the device.
  ffi::Error exchanged = InGroup(m, "dispatch", [&]() -> ncclResult_t {
    for (int r = 0; r < m.nranks; ++r) {
      if (ncclResult_t e = ncclSend(dev_send + r, 1, ncclInt32, r, m.comm, stream); e != ncclSuccess) return e;
      if (ncclResult_t e = ncclRecv(dev_recv + r, 1, ncclInt32, r, m.comm, stream); e != ncclSuccess) return e;
    }
    return ncclSuccess;
  });
  if (!exchanged.success()) return exchanged;
  if (capacity == 0) return ffi::Error::Success();
  if (ffi::Error e = CopyCountsToHost(m, stream, dev_send, dev_recv, timeout_ms, "dispatch"); !e.success()) {
    return e;
  }
  ffi::Error out_of_range = ClampCounts(m, capacity, "dispatch");
  const int32_t* host_send = m.host_counts;
  const int32_t* host_recv = m.host_counts + m.nranks;
  const int64_t x_row = static_cast<int64_t>(send_x.size_bytes()) / (m.nranks * capacity);
  const int64_t meta_row = static_cast<int64_t>(send_meta.size_bytes()) / (m.nranks * capacity);
  ffi::Error sent = ExchangeRows(
      m, stream, "dispatch",
      {Payload{static_cast<const char*>(send_x.untyped_data()), static_cast<char*>(recv_x->untyped_data()),
               x_row, capacity},
       Payload{reinterpret_cast<const char*>(send_meta.typed_data()),
               reinterpret_cast<char*>(recv_meta->typed_data()), meta_row, capacity}},
      host_send, host_recv);
  return out_of_range.success() ? sent : out_of_range;
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer partial,
                       ffi::Buffer<ffi::S32> send_rows, ffi::Buffer<ffi::S32> recv_rows,
                       ffi::Result<ffi::AnyBuffer> back, int64_t comm, int64_t timeout_ms) {
  NcclMember m;
  if (ffi::Error e = FindComm(comm, ordinal, &m); !e.success()) return e;
  std::lock_guard<std::mutex> lock(*m.mu);
  if (ffi::Error e = CheckUsable(m, timeout_ms, "combine"); !e.success()) return e;
  const auto pd = partial.dimensions();
  if (pd.size() != 3 || pd[0] != m.nranks || send_rows.element_count() != static_cast<size_t>(m.nranks) ||
      recv_rows.element_count() != static_cast<size_t>(m.nranks)) {
    return ffi::Error::InvalidArgument("wideep nccl combine: expected partial [R, C, H], send_rows [R], "
                                       "recv_rows [R] with R = " + std::to_string(m.nranks));
  }
  if (std::string err = ShapeError("wideep nccl combine", "output back", back->dimensions(), {pd[0], pd[1], pd[2]});
      !err.empty()) {
    return ffi::Error::InvalidArgument(err);
  }
  if (back->element_type() != partial.element_type()) {
    return ffi::Error::InvalidArgument("wideep nccl combine: output back's dtype differs from partial's; "
                                       "allowed: the same dtype");
  }
  const int64_t capacity = pd[1];
  if (capacity == 0) return ffi::Error::Success();
  if (ffi::Error e = CopyCountsToHost(m, stream, send_rows.typed_data(), recv_rows.typed_data(), timeout_ms,
                                      "combine");
      !e.success()) {
    return e;
  }
  ffi::Error out_of_range = ClampCounts(m, capacity, "combine");
  const int64_t row = static_cast<int64_t>(partial.size_bytes()) / (m.nranks * capacity);
  ffi::Error sent = ExchangeRows(
      m, stream, "combine",
      {Payload{static_cast<const char*>(partial.untyped_data()), static_cast<char*>(back->untyped_data()), row,
               capacity}},
      m.host_counts, m.host_counts + m.nranks);
  return out_of_range.success() ? sent : out_of_range;
}

}  // namespace
}  // namespace wideep

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(WideepNcclDispatch, wideep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()         // send_x [R, C, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // send_meta [R, C, M]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // send_count [R]
                                  .Ret<ffi::AnyBuffer>()         // recv_x [R, C, H]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // recv_meta [R, C, M]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // recv_count [R]
                                  .Attr<int64_t>("comm")
                                  .Attr<int64_t>("timeout_ms"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WideepNcclCombine, wideep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()         // partial [R, C, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // send_rows [R]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // recv_rows [R]
                                  .Ret<ffi::AnyBuffer>()         // back [R, C, H]
                                  .Attr<int64_t>("comm")
                                  .Attr<int64_t>("timeout_ms"));

extern "C" {

int wideep_nccl_version() {
  int version = 0;
  return ncclGetVersion(&version) == ncclSuccess ? version : -1;
}

// Writes a fresh ncclUniqueId (NCCL_UNIQUE_ID_BYTES bytes) to `out`.
int wideep_nccl_unique_id(char* out) {
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return wideep::Fail(std::string("ncclGetUniqueId failed: ") + ncclGetErrorString(r));
  memcpy(out, id.internal, NCCL_UNIQUE_ID_BYTES);
  return 0;
}

int wideep_nccl_unique_id_bytes() { return NCCL_UNIQUE_ID_BYTES; }

// Creates communicator set `id` for this process's `nlocal` GPUs: GPU
// ordinals[i] is rank ranks[i] of an `nranks`-rank group whose unique id is
// unique_ids[i * NCCL_UNIQUE_ID_BYTES ...]. Each member's first call waits for its
// peers' row counts up to first_call_timeout_ms (or its own limit, if longer).
// Idempotent per id.
int wideep_nccl_init(int64_t id, int nlocal, const int* ordinals, const int* ranks, int nranks,
                     const char* unique_ids, int64_t first_call_timeout_ms) {
  using namespace wideep;
  // ncclCommInitRank blocks until every rank joins, for ever if one never does (Python
  // stops waiting after WIDEEP_NCCL_INIT_TIMEOUT_S): holding only the set-up lock meanwhile
  // leaves the calls on communicator sets that already exist free to run.
  std::lock_guard<std::mutex> init_lock(g_nccl_init_mu);
  {
    std::lock_guard<std::mutex> lock(g_nccl_mu);
    if (g_comms.count(id)) return 0;
  }
  DeviceGuard guard;
  std::vector<ncclComm_t> comms(nlocal, nullptr);
  std::string bad_device;  // set instead of returning, so that the group below is always closed
  ncclResult_t r = ncclGroupStart();
  for (int i = 0; i < nlocal && r == ncclSuccess; ++i) {
    ncclUniqueId uid;
    memcpy(uid.internal, unique_ids + static_cast<int64_t>(i) * NCCL_UNIQUE_ID_BYTES, NCCL_UNIQUE_ID_BYTES);
    if (cudaSetDevice(ordinals[i]) != cudaSuccess) {
      bad_device = "cudaSetDevice failed for GPU " + std::to_string(ordinals[i]);
      break;
    }
    r = ncclCommInitRank(&comms[i], nranks, uid, ranks[i]);
  }
  ncclResult_t end = ncclGroupEnd();
  if (!bad_device.empty()) return Fail(bad_device);
  if (r == ncclSuccess) r = end;
  if (r != ncclSuccess) return Fail(std::string("ncclCommInitRank failed: ") + ncclGetErrorString(r));
  std::unordered_map<int, NcclMember> members;
  for (int i = 0; i < nlocal; ++i) {
    NcclMember m;
    m.comm = comms[i], m.rank = ranks[i], m.nranks = nranks;
    WIDEEP_CUDA_OR_FAIL(cudaSetDevice(ordinals[i]));
    WIDEEP_CUDA_OR_FAIL(cudaMallocHost(&m.host_counts, 2 * nranks * sizeof(int32_t)));
    WIDEEP_CUDA_OR_FAIL(cudaEventCreateWithFlags(&m.counts_ready, cudaEventDisableTiming));
    m.mu = new std::mutex();
    m.aborted = new bool(false);
    m.started = new bool(false);
    m.first_call_timeout_ms = first_call_timeout_ms;
    members[ordinals[i]] = m;
  }
  std::lock_guard<std::mutex> lock(g_nccl_mu);
  g_comms[id] = std::move(members);
  return 0;
}

}  // extern "C"
