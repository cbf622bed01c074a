// Conversions between TensorFlow and the communication layer
// (kernels/mpi/comm.h) shared by the MPI ops and the Horovod-compatible ops:
// statuses both ways, dtypes, and keeping a failed request's buffers alive.
#ifndef TF_SMDIST_OPS_MPI_TF_MPI_UTIL_H_
#define TF_SMDIST_OPS_MPI_TF_MPI_UTIL_H_

#include <string>

#include "absl/status/status.h"
#include "kernels/mpi/comm.h"
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

}  // namespace smdist

#endif  // TF_SMDIST_OPS_MPI_TF_MPI_UTIL_H_
