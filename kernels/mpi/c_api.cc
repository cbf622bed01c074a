// Plain C entry points of the MPI library for the Python control plane
// (initialisation, rank/size, blocking byte collectives, shutdown). Loaded
// through ctypes from the same shared object that holds the TensorFlow ops,
// so both see the one Communicator.
#include <cstring>
#include <string>

#include "kernels/mpi/comm.h"

namespace {

int Report(const smdist::mpi::Status& s, char* err, int err_len) {
  if (!s.ok() && err != nullptr && err_len > 0) {
    std::strncpy(err, s.message.c_str(), static_cast<size_t>(err_len) - 1);
    err[err_len - 1] = '\0';
  }
  return static_cast<int>(s.code);
}

}  // namespace

extern "C" {

int smdist_mpi_init(double timeout_s, double heartbeat_s, char* err, int err_len) {
  smdist::mpi::Options options;
  options.timeout_s = timeout_s;
  options.heartbeat_s = heartbeat_s;
  return Report(smdist::mpi::Communicator::Get().Init(options), err, err_len);
}

int smdist_mpi_initialized() {
  return smdist::mpi::Communicator::Get().initialized() ? 1 : 0;
}

int smdist_mpi_rank() { return smdist::mpi::Communicator::Get().rank(); }

int smdist_mpi_size() { return smdist::mpi::Communicator::Get().size(); }

// Every rank contributes `count` bytes; `recv` receives size * count bytes.
int smdist_mpi_allgather_bytes(const void* send, long long count, void* recv, char* err,
                               int err_len) {
  smdist::mpi::Request r;
  r.kind = smdist::mpi::Kind::kAllgather;
  r.name = "allgather_bytes";
  r.send = send;
  r.recv = recv;
  r.count = count;
  r.dtype = smdist::mpi::DataType::kUint8;
  return Report(smdist::mpi::Communicator::Get().Run(std::move(r)), err, err_len);
}

// In-place broadcast of `count` bytes from `root`.
int smdist_mpi_broadcast_bytes(void* buf, long long count, int root, char* err, int err_len) {
  smdist::mpi::Request r;
  r.kind = smdist::mpi::Kind::kBroadcast;
  r.name = "broadcast_bytes";
  r.recv = buf;
  r.count = count;
  r.root = root;
  r.dtype = smdist::mpi::DataType::kUint8;
  return Report(smdist::mpi::Communicator::Get().Run(std::move(r)), err, err_len);
}

// In-place all-reduce of `count` elements of `dtype` (DataType enum) with
// `reduction` (Reduction enum), in `group`'s order.
int smdist_mpi_allreduce(void* buf, long long count, int dtype, int reduction, int group,
                         int index, int group_size, char* err, int err_len) {
  smdist::mpi::Request r;
  r.kind = smdist::mpi::Kind::kAllreduce;
  r.name = "allreduce";
  r.recv = buf;
  r.count = count;
  r.dtype = static_cast<smdist::mpi::DataType>(dtype);
  r.reduction = static_cast<smdist::mpi::Reduction>(reduction);
  r.group = group;
  r.index = index;
  r.group_size = group_size;
  return Report(smdist::mpi::Communicator::Get().Run(std::move(r)), err, err_len);
}

int smdist_mpi_barrier(char* err, int err_len) {
  smdist::mpi::Request r;
  r.kind = smdist::mpi::Kind::kBarrier;
  r.name = "barrier";
  return Report(smdist::mpi::Communicator::Get().Run(std::move(r)), err, err_len);
}

double smdist_mpi_time_native_allreduce(long long count, int iters) {
  return smdist::mpi::Communicator::Get().TimeNativeAllreduce(count, iters);
}

int smdist_mpi_shutdown(char* err, int err_len) {
  return Report(smdist::mpi::Communicator::Get().Shutdown(), err, err_len);
}

}  // extern "C"
