// TensorFlow adapter of the MPI library: op registrations, shape functions
// and asynchronous kernels that hand host buffers to the communication
// thread (kernels/mpi/comm.h). CPU (host memory) only.
#include <cstring>
#include <string>

#include "kernels/mpi/comm.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"

namespace smdist {
namespace {

namespace tf = ::tensorflow;

// Stateful: never constant-folded, deduplicated or pruned, and kept in
// program order by tf.function's automatic control dependencies.
REGISTER_OP("SmdistHostAllreduce")
    .Input("input: T")
    .Output("output: T")
    .Attr("T: {float, double, half, bfloat16, int32, int64}")
    .Attr("reduction: {'sum', 'min', 'max'} = 'sum'")
    .Attr("group: int = 0")
    .Attr("index: int = 0")
    .Attr("group_size: int = 1")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::UnchangedShape)
    .Doc(R"doc(
All-reduces a host tensor across the MPI processes of the job.

The buffer is handed to tf_smdist's communication thread, which starts the
collective when its turn in `group` comes: `index` in [0, group_size), taken in
order and cycling (the bucket plan's order). The op completes asynchronously.
)doc");

REGISTER_OP("SmdistMpiBroadcast")
    .Input("input: T")
    .Output("output: T")
    .Attr("T: {float, double, half, bfloat16, int32, int64, uint8, bool}")
    .Attr("root: int = 0")
    .Attr("group: int = 0")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::UnchangedShape)
    .Doc(R"doc(
Returns `root`'s value of `input` on every MPI process.
)doc");

absl::Status ToTfStatus(const mpi::Status& s) {
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

bool ToMpiType(tf::DataType dtype, mpi::DataType* out) {
  switch (dtype) {
    case tf::DT_FLOAT: *out = mpi::DataType::kFloat32; return true;
    case tf::DT_DOUBLE: *out = mpi::DataType::kFloat64; return true;
    case tf::DT_HALF: *out = mpi::DataType::kFloat16; return true;
    case tf::DT_BFLOAT16: *out = mpi::DataType::kBFloat16; return true;
    case tf::DT_INT32: *out = mpi::DataType::kInt32; return true;
    case tf::DT_INT64: *out = mpi::DataType::kInt64; return true;
    case tf::DT_UINT8: *out = mpi::DataType::kUint8; return true;
    case tf::DT_BOOL: *out = mpi::DataType::kUint8; return true;
    default: return false;
  }
}

// Shared by both ops: output = input (forwarded or copied), then the
// collective runs in place on the output buffer.
class MpiCollectiveOp : public tf::AsyncOpKernel {
 public:
  explicit MpiCollectiveOp(tf::OpKernelConstruction* ctx, mpi::Kind kind)
      : tf::AsyncOpKernel(ctx), kind_(kind) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("group", &group_));
    OP_REQUIRES(ctx, group_ >= 0 && group_ < mpi::kMaxGroups,
                absl::InvalidArgumentError(
                    "`group` must be in [0, " + std::to_string(mpi::kMaxGroups) +
                    "). Received: group=" + std::to_string(group_)));
    tf::DataType dtype;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &dtype));
    OP_REQUIRES(ctx, ToMpiType(dtype, &dtype_),
                absl::InvalidArgumentError("unsupported dtype " + tf::DataTypeString(dtype)));
    if (kind_ == mpi::Kind::kAllreduce) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("index", &index_));
      OP_REQUIRES_OK(ctx, ctx->GetAttr("group_size", &group_size_));
      OP_REQUIRES(ctx, group_size_ >= 1 && index_ >= 0 && index_ < group_size_,
                  absl::InvalidArgumentError(
                      "`index` must be in [0, group_size). Received: index=" +
                      std::to_string(index_) + ", group_size=" + std::to_string(group_size_)));
      std::string reduction;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("reduction", &reduction));
      reduction_ = reduction == "min"   ? mpi::Reduction::kMin
                   : reduction == "max" ? mpi::Reduction::kMax
                                        : mpi::Reduction::kSum;
      OP_REQUIRES(ctx,
                  reduction_ == mpi::Reduction::kSum ||
                      (dtype != tf::DT_HALF && dtype != tf::DT_BFLOAT16),
                  absl::InvalidArgumentError(
                      "float16/bfloat16 all-reduce supports only reduction='sum'. "
                      "Received: reduction=" + reduction));
    } else {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("root", &root_));
    }
  }

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    mpi::Communicator& comm = mpi::Communicator::Get();
    OP_REQUIRES_ASYNC(
        ctx, comm.initialized(),
        absl::FailedPreconditionError(
            "the tf_smdist MPI communicator is not initialised (or was shut "
            "down). Call tf_smdist.data_parallel.cluster.initialize() in a "
            "process started by mpirun or `python -m tf_smdist.launch`."),
        done);
    if (kind_ == mpi::Kind::kBroadcast) {
      OP_REQUIRES_ASYNC(ctx, root_ >= 0 && root_ < comm.size(),
                        absl::InvalidArgumentError(
                            "`root` must be a rank in [0, " + std::to_string(comm.size()) +
                            "). Received: root=" + std::to_string(root_)),
                        done);
    }
    const tf::Tensor& input = ctx->input(0);
    OP_REQUIRES_ASYNC(ctx, input.NumElements() < (int64_t{1} << 31),
                      absl::InvalidArgumentError(
                          "MPI collectives take fewer than 2^31 elements. Received: "
                          "num_elements=" + std::to_string(input.NumElements()) +
                          ". Use a smaller bucket_cap_mb."),
                      done);
    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK_ASYNC(
        ctx, ctx->forward_input_or_allocate_output({0}, 0, input.shape(), &output), done);
    if (output->data() != input.data() && input.TotalBytes() > 0) {
      std::memcpy(output->data(), input.data(), input.TotalBytes());
    }
    mpi::Request r;
    r.kind = kind_;
    r.name = name();
    r.group = group_;
    r.index = index_;
    r.group_size = group_size_;
    r.recv = output->data();
    r.count = output->NumElements();
    r.dtype = dtype_;
    r.reduction = reduction_;
    r.root = root_;
    tf::Tensor keep = *output;  // a reference: the buffer lives while MPI uses it
    r.done = [ctx, done, keep](const mpi::Status& s) {
      if (!s.ok()) {
        // A failed collective may still be written by MPI later (it cannot be
        // cancelled): keep its buffer alive for the rest of the process.
        new tf::Tensor(keep);
        ctx->SetStatus(ToTfStatus(s));
      }
      done();
    };
    comm.Enqueue(std::move(r));
  }

 private:
  mpi::Kind kind_;
  int group_ = 0;
  int index_ = 0;
  int group_size_ = 1;
  int root_ = 0;
  mpi::DataType dtype_ = mpi::DataType::kFloat32;
  mpi::Reduction reduction_ = mpi::Reduction::kSum;
};

class HostAllreduceOp : public MpiCollectiveOp {
 public:
  explicit HostAllreduceOp(tf::OpKernelConstruction* ctx)
      : MpiCollectiveOp(ctx, mpi::Kind::kAllreduce) {}
};

class BroadcastOp : public MpiCollectiveOp {
 public:
  explicit BroadcastOp(tf::OpKernelConstruction* ctx)
      : MpiCollectiveOp(ctx, mpi::Kind::kBroadcast) {}
};

REGISTER_KERNEL_BUILDER(Name("SmdistHostAllreduce").Device(tf::DEVICE_CPU), HostAllreduceOp);
REGISTER_KERNEL_BUILDER(Name("SmdistMpiBroadcast").Device(tf::DEVICE_CPU), BroadcastOp);

}  // namespace
}  // namespace smdist
