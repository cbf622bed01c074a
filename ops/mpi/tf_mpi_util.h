// Conversions between TensorFlow and the communication layer
// (kernels/mpi/comm.h) shared by the MPI ops and the Horovod-compatible ops:
// statuses both ways, dtypes, and keeping a failed request's buffers alive.
#ifndef TF_SMDIST_OPS_MPI_TF_MPI_UTIL_H_
#define TF_SMDIST_OPS_MPI_TF_MPI_UTIL_H_

#include <sched.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "kernels/mpi/comm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"

namespace smdist {

// The TensorFlow status of a communication-layer status, code preserved.
inline absl::Status ToTfStatus(const mpi::Status& s) {
  switch (s.code) {
    case mpi::Code::kOk:
      return absl::OkStatus();
    case mpi::Code::kInvalidArgument:
      return absl::InvalidArgumentError(s.message);
    case mpi::Code::kDeadlineExceeded:
      return absl::DeadlineExceededError(s.message);
    case mpi::Code::kFailedPrecondition:
      return absl::FailedPreconditionError(s.message);
    case mpi::Code::kInternal:
      return absl::InternalError(s.message);
  }
  return absl::UnknownError(s.message);
}

// Allocates output `index` of an all-reduce of `input`. Up to
// SMDIST_MPI_OUT_OF_PLACE_BYTES (default 1 MiB) a fresh buffer, so that MPI
// reduces from the input into it: Open MPI's all-reduce is faster out of place
// there (its non-blocking ring, 2 processes, each call reducing the previous
// result: 0.76-0.80x the in-place time from 64 to 512 KB, 0.85-0.93x at 1 MB,
// but 1.04-1.08x at 2 MB; benchmarks/mpi_nonblocking_check.cc). Above it,
// the input's buffer when TensorFlow can forward it (in place, no second
// buffer of a large size). 0 turns fresh buffers off.
inline absl::Status AllocateAllreduceOutput(tensorflow::OpKernelContext* ctx, int index,
                                            const tensorflow::Tensor& input,
                                            tensorflow::Tensor** output) {
  static const double kMaxBytes = mpi::EnvDouble("SMDIST_MPI_OUT_OF_PLACE_BYTES", 1 << 20);
  const double bytes = static_cast<double>(input.TotalBytes());
  if (bytes > 0 && bytes <= kMaxBytes) return ctx->allocate_output(index, input.shape(), output);
  return ctx->forward_input_or_allocate_output({index}, index, input.shape(), output);
}

// The communication-layer status of a TensorFlow status: any failure is
// kInternal, with its message.
inline mpi::Status ToMpiStatus(const absl::Status& s) {
  mpi::Status out;
  if (!s.ok()) {
    out.code = mpi::Code::kInternal;
    out.message = std::string(s.message());
  }
  return out;
}

// Sets `*out` to the communication layer's type of `dtype`; false when it
// has none.
inline bool ToMpiType(::tensorflow::DataType dtype, mpi::DataType* out) {
  switch (dtype) {
    case ::tensorflow::DT_FLOAT: *out = mpi::DataType::kFloat32; return true;
    case ::tensorflow::DT_DOUBLE: *out = mpi::DataType::kFloat64; return true;
    case ::tensorflow::DT_HALF: *out = mpi::DataType::kFloat16; return true;
    case ::tensorflow::DT_BFLOAT16: *out = mpi::DataType::kBFloat16; return true;
    case ::tensorflow::DT_INT32: *out = mpi::DataType::kInt32; return true;
    case ::tensorflow::DT_INT64: *out = mpi::DataType::kInt64; return true;
    case ::tensorflow::DT_UINT8: *out = mpi::DataType::kUint8; return true;
    case ::tensorflow::DT_INT8: *out = mpi::DataType::kInt8; return true;
    case ::tensorflow::DT_INT16: *out = mpi::DataType::kInt16; return true;
    case ::tensorflow::DT_UINT16: *out = mpi::DataType::kUint16; return true;
    case ::tensorflow::DT_BOOL: *out = mpi::DataType::kBool; return true;
    default: return false;
  }
}

// Whether MPI may still hold a failed request's buffers (a transfer in
// flight cannot be cancelled: the watchdog's deadline, or an MPI error).
inline bool MayStillBeInUse(const mpi::Status& s) {
  return s.code == mpi::Code::kDeadlineExceeded || s.code == mpi::Code::kInternal;
}

// Keeps `t`'s buffer alive for the rest of the process, on purpose, when
// the request failed in a way that may leave MPI writing it later.
inline void KeepOnFailure(const mpi::Status& s, const ::tensorflow::Tensor& t) {
  if (MayStillBeInUse(s)) new ::tensorflow::Tensor(t);
}

// Lets an asynchronous op finish on its own thread when its request
// completes within a short wait. Why: when the communication thread calls
// the op's `done`, TensorFlow's executor hands the op's successors to its
// thread pool, whose worker must be woken (about 25 us on these machines,
// more than a small all-reduce itself); `done` called before ComputeAsync
// returns leaves them to the worker that is already running. The wait is
// bounded, so that an op whose peers are late (or never come) still frees
// its thread, and only requests small enough to finish within it wait.
//
// At the top of ComputeAsync:
//   InlineDone inline_done(&done);   // `done` now goes through the gate
//   ...                              // enqueue the request as before
//   inline_done.set_bytes(n);        // after enqueueing: wait for it
// The destructor waits (up to SMDIST_MPI_INLINE_WAIT_US, default 100 us,
// yielding the core, for requests of at most SMDIST_MPI_INLINE_BYTES,
// default 256 KiB; not at all without set_bytes) and calls the original
// `done` here if it came; otherwise the completing thread calls it. Exactly
// one of the two does. Early returns (OP_REQUIRES_*_ASYNC) call `done`
// before that, so the destructor calls it at once.
class InlineDone {
 public:
  explicit InlineDone(std::function<void()>* done) : gate_(std::make_shared<Gate>()) {
    gate_->done = std::move(*done);
    std::shared_ptr<Gate> gate = gate_;
    *done = [gate] {
      int expected = kWaiting;
      if (!gate->state.compare_exchange_strong(expected, kCompleted,
                                               std::memory_order_acq_rel)) {
        gate->done();  // the op's thread stopped waiting
      }
    };
  }
  InlineDone(const InlineDone&) = delete;
  InlineDone& operator=(const InlineDone&) = delete;

  void set_bytes(int64_t bytes) { bytes_ = bytes; }

  ~InlineDone() {
    static const double kWaitUs = mpi::EnvDouble("SMDIST_MPI_INLINE_WAIT_US", 100);
    static const double kMaxBytes = mpi::EnvDouble("SMDIST_MPI_INLINE_BYTES", 256 << 10);
    if (kWaitUs > 0 && bytes_ >= 0 && bytes_ <= kMaxBytes) {
      auto deadline = std::chrono::steady_clock::now() +
                      std::chrono::microseconds(static_cast<int64_t>(kWaitUs));
      while (gate_->state.load(std::memory_order_acquire) == kWaiting &&
             std::chrono::steady_clock::now() < deadline) {
        sched_yield();
      }
    }
    int expected = kWaiting;
    if (gate_->state.compare_exchange_strong(expected, kGaveUp, std::memory_order_acq_rel)) {
      return;
    }
    gate_->done();
  }

 private:
  enum { kWaiting = 0, kCompleted = 1, kGaveUp = 2 };
  struct Gate {
    std::atomic<int> state{kWaiting};
    std::function<void()> done;
  };

  std::shared_ptr<Gate> gate_;
  int64_t bytes_ = -1;
};

}  // namespace smdist

#endif  // TF_SMDIST_OPS_MPI_TF_MPI_UTIL_H_
