// TensorFlow adapter of the MPI library: op registrations, shape functions
// and asynchronous kernels that hand host buffers to the communication
// thread (kernels/mpi/comm.h). CPU (host memory) only.
//
// Buffers handed to MPI stay referenced until the request completes; when it
// fails by the watchdog (or an MPI error) it cannot be cancelled and MPI may
// still write it later, so the buffer is then kept alive for the rest of the
// process on purpose.
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/mpi/comm.h"
#include "ops/mpi/tf_mpi_util.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/logging.h"

namespace smdist {
namespace {

namespace tf = ::tensorflow;

#define SMDIST_MPI_TYPES \
  "{float, double, half, bfloat16, int32, int64, uint8, int8, int16, uint16, bool}"

// Every op is stateful: never constant-folded, deduplicated or pruned, and
// kept in program order by tf.function's automatic control dependencies.
REGISTER_OP("SmdistHostAllreduce")
    .Input("input: T")
    .Output("output: T")
    .Attr("T: " SMDIST_MPI_TYPES)
    .Attr("reduction: {'sum', 'min', 'max', 'prod'} = 'sum'")
    .Attr("group: int = 0")
    .Attr("index: int = 0")
    .Attr("group_size: int = 1")
    .Attr("comm: int = 0")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::UnchangedShape)
    .Doc(R"doc(
All-reduces a host tensor across the MPI processes of communicator `comm`.

The buffer is handed to tf_smdist's communication thread, which starts the
collective when its turn in `group` comes: `index` in [0, group_size), taken in
order and cycling (the bucket plan's order). The op completes asynchronously.
For booleans, sum and max are a logical or, min and prod a logical and.
)doc");

REGISTER_OP("SmdistMpiBroadcast")
    .Input("input: T")
    .Output("output: T")
    .Attr("T: " SMDIST_MPI_TYPES)
    .Attr("root: int = 0")
    .Attr("group: int = 0")
    .Attr("comm: int = 0")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::UnchangedShape)
    .Doc(R"doc(
Returns `root`'s value of `input` on every process of communicator `comm`.
)doc");

REGISTER_OP("SmdistMpiSend")
    .Input("input: T")
    .Output("token: int32")
    .Attr("T: " SMDIST_MPI_TYPES)
    .Attr("peer: int")
    .Attr("tag: int")
    .Attr("comm: int = 0")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::ScalarShape)
    .Doc(R"doc(
Sends `input` to rank `peer` of communicator `comm`, matched by `tag`.

Completes (the token is produced) as soon as the send is handed to the
communication thread, which posts it at once and keeps the buffer until it is
delivered; so a chain of sends never waits for the receiver. A later failure
of the send fails every later MPI op of the process (the watchdog).
)doc");

REGISTER_OP("SmdistMpiRecv")
    .Input("shape: int64")
    .Output("output: dtype")
    .Attr("dtype: " SMDIST_MPI_TYPES)
    .Attr("peer: int")
    .Attr("tag: int")
    .Attr("comm: int = 0")
    .SetIsStateful()
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      tf::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(0, &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Receives a tensor of `shape` and `dtype` from rank `peer` of communicator
`comm`, matched by `tag`. A message of another size is an InvalidArgument
error.
)doc");

REGISTER_OP("SmdistMpiAllgather")
    .Input("input: T")
    .Output("output: T")
    .Attr("T: " SMDIST_MPI_TYPES)
    .Attr("group: int = 0")
    .Attr("comm: int = 0")
    .SetIsStateful()
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      tf::shape_inference::ShapeHandle in;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &in));
      tf::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->ReplaceDim(in, 0, c->UnknownDim(), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Concatenates `input` of every process of communicator `comm` along the first
dimension, in rank order. The first dimension may differ per rank; the others
must agree.
)doc");

absl::Status NotInitialised() {
  return absl::FailedPreconditionError(
      "the tf_smdist MPI communicator is not initialised (or was shut "
      "down). Call tf_smdist.data_parallel.cluster.initialize() in a "
      "process started by mpirun or `python -m tf_smdist.launch`.");
}

absl::Status CheckComm(int comm) {
  if (mpi::Communicator::Get().CommSize(comm) < 1) {
    return absl::InvalidArgumentError(
        "`comm` is not a communicator of this rank (never created, destroyed, or this "
        "rank is not a member). Received: comm=" + std::to_string(comm));
  }
  return absl::OkStatus();
}

absl::Status CheckCount(int64_t n) {
  if (n >= (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(
        "MPI collectives take fewer than 2^31 elements. Received: num_elements=" +
        std::to_string(n) + ". Split the tensor (or use a smaller bucket_cap_mb).");
  }
  return absl::OkStatus();
}

// Attributes shared by every op: dtype, comm, and (collectives) group.
class MpiOpBase : public tf::AsyncOpKernel {
 public:
  MpiOpBase(tf::OpKernelConstruction* ctx, const char* type_attr, bool has_group)
      : tf::AsyncOpKernel(ctx) {
    tf::DataType dtype;
    OP_REQUIRES_OK(ctx, ctx->GetAttr(type_attr, &dtype));
    OP_REQUIRES(ctx, ToMpiType(dtype, &dtype_),
                absl::InvalidArgumentError("unsupported dtype " + tf::DataTypeString(dtype)));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("comm", &comm_));
    if (has_group) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("group", &group_));
      OP_REQUIRES(ctx, group_ >= 0 && group_ < mpi::kMaxGroups,
                  absl::InvalidArgumentError(
                      "`group` must be in [0, " + std::to_string(mpi::kMaxGroups) +
                      "). Received: group=" + std::to_string(group_)));
    }
  }

 protected:
  // Common start of ComputeAsync: the communicator is up and knows `comm_`.
  absl::Status Ready() const {
    if (!mpi::Communicator::Get().initialized()) return NotInitialised();
    return CheckComm(comm_);
  }

  // The request's completion: keeps `keep` alive for ever on a failure that
  // may leave MPI writing it, sets the op's status, drops this op's
  // references to `keep` (so that the next op may reuse the buffers: the
  // request itself is destroyed only after `done` returns), calls `done`.
  static mpi::DoneCallback Finish(tf::OpKernelContext* ctx, DoneCallback done,
                                  std::vector<tf::Tensor> keep) {
    auto held = std::make_shared<std::vector<tf::Tensor>>(std::move(keep));
    return [ctx, done, held](const mpi::Status& s) {
      if (!s.ok()) {
        if (MayStillBeInUse(s)) new std::vector<tf::Tensor>(*held);
        ctx->SetStatus(ToTfStatus(s));
      }
      held->clear();
      done();
    };
  }

  mpi::DataType dtype_ = mpi::DataType::kFloat32;
  int comm_ = 0;
  int group_ = 0;
};

// All-reduce and broadcast into the output (the input's buffer when it can be
// forwarded): a broadcast runs in place on it (copied from the input), an
// all-reduce reads a separate input where it is.
class MpiCollectiveOp : public MpiOpBase {
 public:
  MpiCollectiveOp(tf::OpKernelConstruction* ctx, mpi::Kind kind)
      : MpiOpBase(ctx, "T", true), kind_(kind) {
    if (kind_ == mpi::Kind::kAllreduce) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("index", &index_));
      OP_REQUIRES_OK(ctx, ctx->GetAttr("group_size", &group_size_));
      OP_REQUIRES(ctx, group_size_ >= 1 && index_ >= 0 && index_ < group_size_,
                  absl::InvalidArgumentError(
                      "`index` must be in [0, group_size). Received: index=" +
                      std::to_string(index_) + ", group_size=" + std::to_string(group_size_)));
      std::string reduction;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("reduction", &reduction));
      reduction_ = reduction == "min"    ? mpi::Reduction::kMin
                   : reduction == "max"  ? mpi::Reduction::kMax
                   : reduction == "prod" ? mpi::Reduction::kProd
                                         : mpi::Reduction::kSum;
    } else {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("root", &root_));
    }
  }

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    OP_REQUIRES_OK_ASYNC(ctx, Ready(), done);
    mpi::Communicator& comm = mpi::Communicator::Get();
    if (kind_ == mpi::Kind::kBroadcast) {
      int size = comm.CommSize(comm_);
      OP_REQUIRES_ASYNC(ctx, root_ >= 0 && root_ < size,
                        absl::InvalidArgumentError(
                            "`root` must be a rank in [0, " + std::to_string(size) +
                            "). Received: root=" + std::to_string(root_)),
                        done);
    }
    const tf::Tensor& input = ctx->input(0);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input.NumElements()), done);
    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK_ASYNC(
        ctx,
        kind_ == mpi::Kind::kAllreduce
            ? AllocateAllreduceOutput(ctx, 0, input, &output)
            : ctx->forward_input_or_allocate_output({0}, 0, input.shape(), &output),
        done);
    // An all-reduce reads a separate input where it is (no copy); a
    // broadcast runs in place on the output.
    bool separate = output->data() != input.data() && input.TotalBytes() > 0;
    if (separate && kind_ != mpi::Kind::kAllreduce) {
      std::memcpy(output->data(), input.data(), input.TotalBytes());
      separate = false;
    }
    mpi::Request r;
    if (separate) r.send = input.data();
    r.kind = kind_;
    r.name = name();
    r.comm = comm_;
    r.group = group_;
    r.index = index_;
    r.group_size = group_size_;
    r.recv = output->data();
    r.count = output->NumElements();
    r.dtype = dtype_;
    r.reduction = reduction_;
    r.root = root_;
    std::vector<tf::Tensor> keep{*output};
    if (separate) keep.push_back(input);
    int64_t bytes = static_cast<int64_t>(output->TotalBytes());
    r.done = Finish(ctx, done, std::move(keep));
    comm.Enqueue(std::move(r));
    inline_done.set_bytes(bytes);
  }

 private:
  mpi::Kind kind_;
  int index_ = 0;
  int group_size_ = 1;
  int root_ = 0;
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

// Send and receive share the peer/tag checks.
class PointToPointOp : public MpiOpBase {
 public:
  PointToPointOp(tf::OpKernelConstruction* ctx, const char* type_attr)
      : MpiOpBase(ctx, type_attr, false) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("peer", &peer_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tag", &tag_));
    OP_REQUIRES(ctx, tag_ >= 0 && tag_ <= mpi::kMaxTag,
                absl::InvalidArgumentError("`tag` must be in [0, " +
                                           std::to_string(mpi::kMaxTag) +
                                           "]. Received: tag=" + std::to_string(tag_)));
  }

 protected:
  absl::Status ReadyToTalk() const {
    TF_RETURN_IF_ERROR(Ready());
    int size = mpi::Communicator::Get().CommSize(comm_);
    if (peer_ < 0 || peer_ >= size) {
      return absl::InvalidArgumentError("`peer` must be a rank of the communicator, in [0, " +
                                        std::to_string(size) +
                                        "). Received: peer=" + std::to_string(peer_));
    }
    return absl::OkStatus();
  }

  int peer_ = 0;
  int tag_ = 0;
};

class SendOp : public PointToPointOp {
 public:
  explicit SendOp(tf::OpKernelConstruction* ctx) : PointToPointOp(ctx, "T") {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    OP_REQUIRES_OK_ASYNC(ctx, ReadyToTalk(), done);
    const tf::Tensor& input = ctx->input(0);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input.NumElements()), done);
    tf::Tensor* token = nullptr;
    OP_REQUIRES_OK_ASYNC(ctx, ctx->allocate_output(0, tf::TensorShape({}), &token), done);
    token->scalar<int32_t>()() = 0;
    mpi::Request r;
    r.kind = mpi::Kind::kSend;
    r.name = name();
    r.comm = comm_;
    r.peer = peer_;
    r.tag = tag_;
    r.send = input.data();
    r.count = input.NumElements();
    r.dtype = dtype_;
    tf::Tensor keep = input;  // a reference: the buffer lives until delivered
    std::string op_name = name();
    r.done = [keep, op_name](const mpi::Status& s) {
      if (s.ok()) return;
      KeepOnFailure(s, keep);
      // The op has completed already; the failure is sticky, so the next MPI
      // op of the process raises it.
      LOG(ERROR) << "tf_smdist: send " << op_name << " failed: " << s.message;
    };
    mpi::Communicator::Get().Enqueue(std::move(r));
    done();
  }
};

class RecvOp : public PointToPointOp {
 public:
  explicit RecvOp(tf::OpKernelConstruction* ctx) : PointToPointOp(ctx, "dtype") {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    OP_REQUIRES_OK_ASYNC(ctx, ReadyToTalk(), done);
    const tf::Tensor& shape_t = ctx->input(0);
    OP_REQUIRES_ASYNC(ctx, tf::TensorShapeUtils::IsVector(shape_t.shape()),
                      absl::InvalidArgumentError(
                          "`shape` must be a 1-D int64 tensor. Received: shape of shape=" +
                          shape_t.shape().DebugString()),
                      done);
    tf::TensorShape shape;
    OP_REQUIRES_OK_ASYNC(
        ctx, tf::TensorShapeUtils::MakeShape(shape_t.vec<int64_t>(), &shape), done);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(shape.num_elements()), done);
    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK_ASYNC(ctx, ctx->allocate_output(0, shape, &output), done);
    mpi::Request r;
    r.kind = mpi::Kind::kRecv;
    r.name = name();
    r.comm = comm_;
    r.peer = peer_;
    r.tag = tag_;
    r.recv = output->data();
    r.count = output->NumElements();
    r.dtype = dtype_;
    r.done = Finish(ctx, done, {*output});
    mpi::Communicator::Get().Enqueue(std::move(r));
  }
};

// All-gather with a first dimension that may differ per rank: an all-gather
// of (first dimension, elements per row, rank) from every rank, then the
// all-gatherv it sizes, started back to back in the op's group (see
// Request::then).
class AllgatherOp : public MpiOpBase {
 public:
  explicit AllgatherOp(tf::OpKernelConstruction* ctx) : MpiOpBase(ctx, "T", true) {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    OP_REQUIRES_OK_ASYNC(ctx, Ready(), done);
    const tf::Tensor& input = ctx->input(0);
    OP_REQUIRES_ASYNC(ctx, input.dims() >= 1,
                      absl::InvalidArgumentError(
                          "allgather needs a tensor of rank >= 1 (it concatenates along the "
                          "first dimension). Received: shape=" + input.shape().DebugString()),
                      done);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input.NumElements()), done);
    mpi::Communicator& comm = mpi::Communicator::Get();
    const int size = comm.CommSize(comm_);
    struct State {
      int64_t mine[3] = {0, 0, 0};
      std::vector<int64_t> all;
      tf::Tensor output;
    };
    auto state = std::make_shared<State>();
    const int64_t rows = input.dim_size(0);
    const int64_t row_elements = RowElements(input.shape());
    state->mine[0] = rows;
    state->mine[1] = row_elements;
    state->mine[2] = input.dims();
    state->all.assign(3 * static_cast<size_t>(size), 0);
    tf::Tensor in = input;
    tf::TensorShape row_shape = input.shape();
    row_shape.RemoveDim(0);
    std::vector<tf::Tensor> keep = {in};
    mpi::DoneCallback finish = Finish(ctx, done, keep);
    mpi::Request r;
    r.kind = mpi::Kind::kAllgather;
    r.name = name() + " (sizes)";
    r.comm = comm_;
    r.group = group_;
    r.send = state->mine;
    r.recv = state->all.data();
    r.count = 3;
    r.dtype = mpi::DataType::kInt64;
    std::string op_name = name();
    mpi::DataType dtype = dtype_;
    r.done = [finish, state](const mpi::Status& s) { finish(s); };
    r.then = [ctx, finish, state, in, row_shape, size, op_name, dtype](mpi::Request* next) {
      std::vector<int64_t> counts(size, 0);
      int64_t total_rows = 0;
      for (int k = 0; k < size; ++k) {
        const int64_t* v = &state->all[3 * k];
        if (v[1] != state->all[1] || v[2] != state->all[2]) {
          return mpi::Status{
              mpi::Code::kFailedPrecondition,
              "tf_smdist: allgather " + op_name +
                  ": every rank must give the same rank and dimensions after the first. "
                  "Received: rank 0 has rank " + std::to_string(state->all[2]) + " and " +
                  std::to_string(state->all[1]) + " elements per row, rank " +
                  std::to_string(k) + " has rank " + std::to_string(v[2]) + " and " +
                  std::to_string(v[1]) + " elements per row."};
        }
        counts[k] = v[0] * v[1];
        total_rows += v[0];
      }
      tf::TensorShape out_shape = row_shape;
      out_shape.InsertDim(0, total_rows);
      tf::Tensor* output = nullptr;
      absl::Status a = ctx->allocate_output(0, out_shape, &output);
      if (!a.ok()) return mpi::Status{mpi::Code::kInternal, std::string(a.message())};
      if (out_shape.num_elements() >= (int64_t{1} << 31)) {
        return mpi::Status{mpi::Code::kInvalidArgument,
                           "tf_smdist: allgather " + op_name +
                               ": the result must hold fewer than 2^31 elements. Received: "
                               "shape=" + out_shape.DebugString()};
      }
      state->output = *output;
      next->kind = mpi::Kind::kAllgatherv;
      next->name = op_name;
      next->send = in.data();
      next->recv = output->data();
      next->counts = counts;
      next->dtype = dtype;
      next->done = [finish, state](const mpi::Status& s) {
        if (!s.ok()) KeepOnFailure(s, state->output);
        finish(s);
      };
      return mpi::Status::Ok();
    };
    comm.Enqueue(std::move(r));
    inline_done.set_bytes(static_cast<int64_t>(input.TotalBytes()));
  }

 private:
  static int64_t RowElements(const tf::TensorShape& shape) {
    int64_t n = 1;
    for (int d = 1; d < shape.dims(); ++d) n *= shape.dim_size(d);
    return n;
  }
};

REGISTER_KERNEL_BUILDER(Name("SmdistHostAllreduce").Device(tf::DEVICE_CPU), HostAllreduceOp);
REGISTER_KERNEL_BUILDER(Name("SmdistMpiBroadcast").Device(tf::DEVICE_CPU), BroadcastOp);
REGISTER_KERNEL_BUILDER(Name("SmdistMpiSend").Device(tf::DEVICE_CPU), SendOp);
REGISTER_KERNEL_BUILDER(Name("SmdistMpiRecv").Device(tf::DEVICE_CPU).HostMemory("shape"),
                        RecvOp);
REGISTER_KERNEL_BUILDER(Name("SmdistMpiAllgather").Device(tf::DEVICE_CPU), AllgatherOp);

}  // namespace
}  // namespace smdist
