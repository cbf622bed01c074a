// Plain C entry points of the MPI library for the Python control plane
// (initialisation, communicators, blocking collectives on byte buffers,
// shutdown). Loaded through ctypes from the same shared object that holds the
// TensorFlow ops, so both see the one Communicator.
//
// Python's buffers are never handed to MPI: a request that fails by the
// watchdog cannot be cancelled and may still be written by MPI later, after
// Python freed its memory. Each call copies into buffers owned here, copies
// the result out on success, and on such a failure leaks them on purpose
// (like the TensorFlow ops).
#include <cstdlib>
#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "kernels/mpi/comm.h"

namespace {

namespace mpi = ::smdist::mpi;

int Report(const mpi::Status& s, char* err, int err_len) {
  if (!s.ok() && err != nullptr && err_len > 0) {
    std::strncpy(err, s.message.c_str(), static_cast<size_t>(err_len) - 1);
    err[err_len - 1] = '\0';
  }
  return static_cast<int>(s.code);
}

// Buffers of one blocking call. Released unless MPI may still use them.
struct Buffers {
  std::vector<char> send;
  std::vector<char> recv;
};

void Release(std::unique_ptr<Buffers> buffers, const mpi::Status& s) {
  // Validation errors (kInvalidArgument, kFailedPrecondition) are raised
  // before MPI sees the buffers; the others may leave a request in flight.
  if (s.code == mpi::Code::kDeadlineExceeded || s.code == mpi::Code::kInternal) {
    buffers.release();  // leaked deliberately
  }
}

std::vector<int64_t> Counts(const long long* counts, int n) {
  std::vector<int64_t> out;
  if (counts != nullptr) out.assign(counts, counts + n);
  return out;
}

char* Malloc(size_t n) { return static_cast<char*>(std::malloc(n > 0 ? n : 1)); }

}  // namespace

extern "C" {

int smdist_mpi_init(double timeout_s, double heartbeat_s, char* err, int err_len) {
  mpi::Options options;
  options.timeout_s = timeout_s;
  options.heartbeat_s = heartbeat_s;
  return Report(mpi::Communicator::Get().Init(options), err, err_len);
}

int smdist_mpi_initialized() { return mpi::Communicator::Get().initialized() ? 1 : 0; }

int smdist_mpi_rank() { return mpi::Communicator::Get().rank(); }

int smdist_mpi_size() { return mpi::Communicator::Get().size(); }

// A communicator over the `n` world ranks `ranks`; `*id` is -1 on non-members.
int smdist_mpi_create_comm(const int* ranks, int n, int* id, char* err, int err_len) {
  std::vector<int> list(ranks, ranks + (n > 0 ? n : 0));
  return Report(mpi::Communicator::Get().CreateComm(list, id), err, err_len);
}

int smdist_mpi_destroy_comm(int id, char* err, int err_len) {
  return Report(mpi::Communicator::Get().DestroyComm(id), err, err_len);
}

int smdist_mpi_comm_rank(int id) { return mpi::Communicator::Get().CommRank(id); }

int smdist_mpi_comm_size(int id) { return mpi::Communicator::Get().CommSize(id); }

// One blocking request of any kind (mpi::Kind) on copies of the buffers:
// `send_bytes` bytes are read from `send`, `recv_bytes` from `recv` (its
// initial contents: in-place all-reduce and broadcast), and on success
// `recv_bytes` are written back to `recv`. `counts` and `recv_counts` hold
// `ncounts` entries (or are null).
int smdist_mpi_request(int kind, const void* send, long long send_bytes, void* recv,
                       long long recv_bytes, long long count, const long long* counts,
                       const long long* recv_counts, int ncounts, int dtype, int reduction,
                       int root, int peer, int tag, int comm, int group, int index,
                       int group_size, char* err, int err_len) {
  auto buffers = std::make_unique<Buffers>();
  if (send_bytes > 0) {
    buffers->send.assign(static_cast<const char*>(send),
                         static_cast<const char*>(send) + send_bytes);
  }
  if (recv_bytes > 0) {
    buffers->recv.assign(static_cast<const char*>(recv),
                         static_cast<const char*>(recv) + recv_bytes);
  }
  mpi::Request r;
  r.kind = static_cast<mpi::Kind>(kind);
  r.name = "ctypes request";
  r.send = send_bytes > 0 ? buffers->send.data() : nullptr;
  r.recv = recv_bytes > 0 ? buffers->recv.data() : nullptr;
  r.count = count;
  r.counts = Counts(counts, ncounts);
  r.recv_counts = Counts(recv_counts, ncounts);
  r.dtype = static_cast<mpi::DataType>(dtype);
  r.reduction = static_cast<mpi::Reduction>(reduction);
  r.root = root;
  r.peer = peer;
  r.tag = tag;
  r.comm = comm;
  r.group = group;
  r.index = index;
  r.group_size = group_size;
  mpi::Status s = mpi::Communicator::Get().Run(std::move(r));
  if (s.ok() && recv_bytes > 0) std::memcpy(recv, buffers->recv.data(), recv_bytes);
  Release(std::move(buffers), s);
  return Report(s, err, err_len);
}

// Gathers `n` bytes from every rank of `comm`, `n` may differ per rank: one
// all-gather of the lengths, then an all-gatherv, started back to back in
// `group`. On success `*out` is a malloc'd buffer of the concatenation (free
// it with smdist_mpi_free) and `lengths` (one per rank of `comm`) holds each
// rank's length.
int smdist_mpi_allgather_bytes(const void* data, long long n, int comm, int group,
                               char** out, long long* lengths, char* err, int err_len) {
  *out = nullptr;
  mpi::Communicator& c = mpi::Communicator::Get();
  int size = c.CommSize(comm);
  if (size < 1) {
    return Report({mpi::Code::kInvalidArgument,
                   "tf_smdist: unknown communicator (never created, destroyed, or this rank "
                   "is not a member). Received: comm=" + std::to_string(comm)},
                  err, err_len);
  }
  struct State {
    std::vector<char> send;
    int64_t length = 0;
    std::vector<int64_t> lengths;
    char* result = nullptr;  // malloc'd
    int64_t total = 0;
    ~State() { std::free(result); }
  };
  auto state = std::make_shared<State>();
  if (n > 0) {
    state->send.assign(static_cast<const char*>(data), static_cast<const char*>(data) + n);
  }
  state->length = n;
  state->lengths.assign(size, 0);
  mpi::Request r;
  r.kind = mpi::Kind::kAllgather;
  r.name = "allgather_bytes (lengths)";
  r.send = &state->length;
  r.recv = state->lengths.data();
  r.count = 1;
  r.dtype = mpi::DataType::kInt64;
  r.comm = comm;
  r.group = group;
  auto promise = std::make_shared<std::promise<mpi::Status>>();
  std::future<mpi::Status> future = promise->get_future();
  auto done = [promise, state](const mpi::Status& s) {
    if (!s.ok() && s.code != mpi::Code::kInvalidArgument &&
        s.code != mpi::Code::kFailedPrecondition) {
      new std::shared_ptr<State>(state);  // MPI may still use the buffers
    }
    promise->set_value(s);
  };
  r.done = done;
  r.then = [state, done](mpi::Request* next) {
    state->total = 0;
    for (int64_t x : state->lengths) state->total += x;
    state->result = Malloc(static_cast<size_t>(state->total));
    next->kind = mpi::Kind::kAllgatherv;
    next->name = "allgather_bytes";
    next->send = state->send.data();
    next->recv = state->result;
    next->counts = state->lengths;
    next->dtype = mpi::DataType::kUint8;
    next->done = done;
    return mpi::Status::Ok();
  };
  c.Enqueue(std::move(r));
  mpi::Status s = future.get();
  if (s.ok()) {
    *out = state->result;
    state->result = nullptr;
    for (int i = 0; i < size; ++i) lengths[i] = state->lengths[i];
  }
  return Report(s, err, err_len);
}

// Returns `root`'s bytes on every rank of `comm` (any length): a broadcast
// of the length, then of the data, back to back in `group`. On success
// `*out` is a malloc'd buffer of `*out_n` bytes (free with smdist_mpi_free).
// `timeout_s` > 0 lets the broadcast wait that long for a peer that is alive
// (see Request::timeout_s); 0 keeps the usual deadline.
int smdist_mpi_broadcast_bytes(const void* data, long long n, int root, int comm, int group,
                               double timeout_s, char** out, long long* out_n, char* err,
                               int err_len) {
  *out = nullptr;
  *out_n = 0;
  mpi::Communicator& c = mpi::Communicator::Get();
  struct State {
    int64_t length = 0;
    char* buf = nullptr;  // malloc'd
    ~State() { std::free(buf); }
  };
  auto state = std::make_shared<State>();
  state->length = n;
  state->buf = Malloc(static_cast<size_t>(n));
  if (n > 0) std::memcpy(state->buf, data, static_cast<size_t>(n));
  bool is_root = c.CommRank(comm) == root;
  mpi::Request r;
  r.kind = mpi::Kind::kBroadcast;
  r.name = "broadcast_bytes (length)";
  r.recv = &state->length;
  r.count = 1;
  r.dtype = mpi::DataType::kInt64;
  r.root = root;
  r.comm = comm;
  r.group = group;
  r.timeout_s = timeout_s;
  auto promise = std::make_shared<std::promise<mpi::Status>>();
  std::future<mpi::Status> future = promise->get_future();
  auto done = [promise, state](const mpi::Status& s) {
    if (!s.ok() && s.code != mpi::Code::kInvalidArgument &&
        s.code != mpi::Code::kFailedPrecondition) {
      new std::shared_ptr<State>(state);  // MPI may still use the buffers
    }
    promise->set_value(s);
  };
  r.done = done;
  r.then = [state, done, is_root, root](mpi::Request* next) {
    if (!is_root) {
      std::free(state->buf);
      state->buf = Malloc(static_cast<size_t>(state->length));
    }
    next->kind = mpi::Kind::kBroadcast;
    next->name = "broadcast_bytes";
    next->root = root;
    next->recv = state->buf;
    next->count = state->length;
    next->dtype = mpi::DataType::kUint8;
    next->done = done;
    return mpi::Status::Ok();
  };
  c.Enqueue(std::move(r));
  mpi::Status s = future.get();
  if (s.ok()) {
    *out = state->buf;
    *out_n = state->length;
    state->buf = nullptr;
  }
  return Report(s, err, err_len);
}

void smdist_mpi_free(char* p) { std::free(p); }

double smdist_mpi_time_native_allreduce(long long count, int iters) {
  return mpi::Communicator::Get().TimeNativeAllreduce(count, iters);
}

void smdist_mpi_abort(const char* message) {
  mpi::Communicator::Get().Abort(message == nullptr ? "" : message);
}

int smdist_mpi_shutdown(char* err, int err_len) {
  return Report(mpi::Communicator::Get().Shutdown(), err, err_len);
}

}  // extern "C"
