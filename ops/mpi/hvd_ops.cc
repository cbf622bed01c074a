// TensorFlow adapter of the Horovod-compatible collectives: op registrations,
// shape functions and asynchronous CPU kernels that hand named requests to
// the process set's negotiator (kernels/mpi/negotiator.h).
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/mpi/negotiator.h"
#include "ops/mpi/tf_mpi_util.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"

namespace smdist {
namespace {

namespace tf = ::tensorflow;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

#define SMDIST_HVD_TYPES \
  "T: {uint8, int8, int16, uint16, int32, int64, half, bfloat16, float, double, bool}"

// x <- T(double(x) * factor): integers truncate toward zero, 16-bit floats
// round once from float.
template <typename T>
void ScaleTyped(void* data, int64_t n, double factor) {
  T* p = static_cast<T*>(data);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(static_cast<double>(p[i]) * factor);
}

template <typename T>
void ScaleHalf(void* data, int64_t n, double factor) {
  T* p = static_cast<T*>(data);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = static_cast<T>(static_cast<float>(static_cast<double>(static_cast<float>(p[i])) *
                                             factor));
  }
}

void Scale(tf::DataType dtype, void* data, int64_t n, double factor) {
  if (factor == 1.0 || n == 0) return;
  switch (dtype) {
    case tf::DT_FLOAT: ScaleTyped<float>(data, n, factor); break;
    case tf::DT_DOUBLE: ScaleTyped<double>(data, n, factor); break;
    case tf::DT_INT32: ScaleTyped<int32_t>(data, n, factor); break;
    case tf::DT_INT64: ScaleTyped<int64_t>(data, n, factor); break;
    case tf::DT_UINT8: ScaleTyped<uint8_t>(data, n, factor); break;
    case tf::DT_INT8: ScaleTyped<int8_t>(data, n, factor); break;
    case tf::DT_INT16: ScaleTyped<int16_t>(data, n, factor); break;
    case tf::DT_UINT16: ScaleTyped<uint16_t>(data, n, factor); break;
    case tf::DT_HALF: ScaleHalf<Eigen::half>(data, n, factor); break;
    case tf::DT_BFLOAT16: ScaleHalf<tf::bfloat16>(data, n, factor); break;
    default: break;  // bool: scale factors do not apply
  }
}

void* Data(const tf::Tensor& t) { return const_cast<char*>(t.tensor_data().data()); }

std::vector<int64_t> Dims(const tf::TensorShape& shape) {
  std::vector<int64_t> out;
  for (int i = 0; i < shape.dims(); ++i) out.push_back(shape.dim_size(i));
  return out;
}

tf::TensorShape ToShape(const std::vector<int64_t>& dims) {
  tf::TensorShape shape;
  for (int64_t d : dims) shape.AddDim(d);
  return shape;
}

absl::Status FirstDimUnknown(InferenceContext* c) {
  ShapeHandle in = c->input(0);
  if (!c->RankKnown(in)) {
    c->set_output(0, c->UnknownShape());
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(in, 1, &in));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->ReplaceDim(in, 0, c->UnknownDim(), &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

// Stateful: never constant-folded, deduplicated or pruned, and ordered by
// tf.function's automatic control dependencies only where they touch the
// same resources (collectives of one function may still run concurrently,
// and in any order: the negotiator matches them by name).
REGISTER_OP("SmdistHvdAllreduce")
    .Input("tensor: T")
    .Output("output: T")
    .Attr(SMDIST_HVD_TYPES)
    .Attr("reduce_op: int")
    .Attr("prescale_factor: float = 1.0")
    .Attr("postscale_factor: float = 1.0")
    .Attr("tensor_name: string")
    .Attr("process_set_id: int = 0")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::UnchangedShape)
    .Doc(R"doc(
All-reduces `tensor` across the ranks of a process set, matched by `tensor_name`.

reduce_op: Horovod's numbering (0 Average, 1 Sum, 3 Min, 4 Max, 5 Product).
output = postscale_factor * reduce(prescale_factor * tensor) (Average divides
the sum by the set's size).
)doc");

REGISTER_OP("SmdistHvdGroupedAllreduce")
    .Input("tensors: N * T")
    .Output("outputs: N * T")
    .Attr("N: int >= 1")
    .Attr(SMDIST_HVD_TYPES)
    .Attr("reduce_op: int")
    .Attr("prescale_factor: float = 1.0")
    .Attr("postscale_factor: float = 1.0")
    .Attr("tensor_name: string")
    .Attr("process_set_id: int = 0")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 0; i < c->num_inputs(); ++i) c->set_output(i, c->input(i));
      return absl::OkStatus();
    })
    .Doc(R"doc(
All-reduces N tensors announced together (named `tensor_name`.0 .. .N-1).
)doc");

REGISTER_OP("SmdistHvdAllgather")
    .Input("tensor: T")
    .Output("output: T")
    .Attr(SMDIST_HVD_TYPES)
    .Attr("tensor_name: string")
    .Attr("process_set_id: int = 0")
    .SetIsStateful()
    .SetShapeFn(FirstDimUnknown)
    .Doc(R"doc(
Concatenates every rank's `tensor` along the first dimension (which may
differ per rank), in rank order.
)doc");

REGISTER_OP("SmdistHvdBroadcast")
    .Input("tensor: T")
    .Output("output: T")
    .Attr(SMDIST_HVD_TYPES)
    .Attr("root_rank: int")
    .Attr("tensor_name: string")
    .Attr("process_set_id: int = 0")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::UnchangedShape)
    .Doc(R"doc(
Returns `root_rank`'s value of `tensor` (a rank of the process set).
)doc");

REGISTER_OP("SmdistHvdAlltoall")
    .Input("tensor: T")
    .Input("splits: int32")
    .Output("output: T")
    .Output("received_splits: int32")
    .Attr(SMDIST_HVD_TYPES)
    .Attr("tensor_name: string")
    .Attr("process_set_id: int = 0")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(FirstDimUnknown(c));
      c->set_output(1, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Sends splits[r] rows of `tensor` to rank r (empty splits: equal parts) and
concatenates the rows received from every rank, in rank order.
)doc");

REGISTER_OP("SmdistHvdReducescatter")
    .Input("tensor: T")
    .Output("output: T")
    .Attr(SMDIST_HVD_TYPES)
    .Attr("reduce_op: int")
    .Attr("prescale_factor: float = 1.0")
    .Attr("postscale_factor: float = 1.0")
    .Attr("tensor_name: string")
    .Attr("process_set_id: int = 0")
    .SetIsStateful()
    .SetShapeFn(FirstDimUnknown)
    .Doc(R"doc(
Reduces `tensor` across the set and keeps this rank's rows: rank r gets
rows/size rows, plus one when r < rows % size.
)doc");

REGISTER_OP("SmdistHvdJoin")
    .Output("last_rank: int32")
    .Attr("process_set_id: int = 0")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::ScalarShape)
    .Doc(R"doc(
Waits until every rank of the set joined, contributing zeros to the others'
all-reduces meanwhile; returns the rank that joined last.
)doc");

REGISTER_OP("SmdistHvdBarrier")
    .Attr("tensor_name: string")
    .Attr("process_set_id: int = 0")
    .SetIsStateful()
    .SetShapeFn(tf::shape_inference::NoOutputs)
    .Doc(R"doc(
Waits until every rank of the set reached the barrier of this name.
)doc");

// Attributes and set lookup shared by every kernel.
class HvdKernel : public tf::AsyncOpKernel {
 public:
  explicit HvdKernel(tf::OpKernelConstruction* ctx) : tf::AsyncOpKernel(ctx) {
    if (HasAttr(ctx, "tensor_name")) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("tensor_name", &tensor_name_));
    }
    OP_REQUIRES_OK(ctx, ctx->GetAttr("process_set_id", &process_set_id_));
    if (HasAttr(ctx, "T")) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &dtype_));
      OP_REQUIRES(ctx, ToMpiType(dtype_, &mpi_dtype_),
                  absl::InvalidArgumentError("unsupported dtype " +
                                             tf::DataTypeString(dtype_)));
    }
    if (HasAttr(ctx, "reduce_op")) {
      int op = 0;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("reduce_op", &op));
      OP_REQUIRES(ctx, op == 0 || op == 1 || op == 3 || op == 4 || op == 5,
                  absl::InvalidArgumentError(
                      "`reduce_op` must be Average (0), Sum (1), Min (3), Max (4) or "
                      "Product (5); Adasum is not supported. Received: reduce_op=" +
                      std::to_string(op)));
      reduce_op_ = static_cast<hvd::ReduceOp>(op);
      float pre = 1.0f, post = 1.0f;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("prescale_factor", &pre));
      OP_REQUIRES_OK(ctx, ctx->GetAttr("postscale_factor", &post));
      prescale_ = pre;
      postscale_ = post;
    }
  }

 protected:
  static bool HasAttr(tf::OpKernelConstruction* ctx, const char* name) {
    return ctx->def().attr().count(name) > 0;
  }

  // The set's negotiator, or an error status.
  absl::Status Lookup(std::shared_ptr<hvd::Negotiator>* out) const {
    *out = hvd::Engine::Get().Find(process_set_id_);
    if (*out != nullptr) return absl::OkStatus();
    if (!hvd::Engine::Get().initialized()) {
      return absl::FailedPreconditionError(
          "tf_smdist.horovod is not initialised (or was shut down). Call hvd.init() "
          "first, in every process of the job.");
    }
    return absl::InvalidArgumentError(
        "this rank is not a member of the process set, or the set was removed. "
        "Received: process_set_id=" + std::to_string(process_set_id_) +
        ". Call a collective of a process set only on its member ranks.");
  }

  // The factor applied to the reduced values (Average divides by the size).
  double OutputScale(int size) const {
    return postscale_ * (reduce_op_ == hvd::ReduceOp::kAverage ? 1.0 / size : 1.0);
  }

  // An empty `tensor_name` (unnamed eager calls: a name attribute per call
  // would make a new kernel per call) takes the set's next eager name.
  hvd::Entry MakeEntry(hvd::Negotiator* set, hvd::OpType type, const tf::TensorShape& shape,
                       const std::string* name = nullptr) const {
    hvd::Entry e;
    e.name = name != nullptr          ? *name
             : tensor_name_.empty() ? set->EagerName(hvd::OpTypeName(type))
                                    : tensor_name_;
    e.type = type;
    e.dtype = mpi_dtype_;
    e.shape = Dims(shape);
    e.reduce_op = reduce_op_;
    e.prescale = prescale_;
    e.postscale = postscale_;
    return e;
  }

  std::string tensor_name_;
  int process_set_id_ = 0;
  tf::DataType dtype_ = tf::DT_FLOAT;
  mpi::DataType mpi_dtype_ = mpi::DataType::kFloat32;
  hvd::ReduceOp reduce_op_ = hvd::ReduceOp::kSum;
  double prescale_ = 1.0;
  double postscale_ = 1.0;
};

absl::Status CheckCount(const tf::Tensor& t) {
  if (t.NumElements() < (int64_t{1} << 31)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      "MPI collectives take fewer than 2^31 elements. Received: num_elements=" +
      std::to_string(t.NumElements()) + ". Split the tensor.");
}

// Allocates output `index` of shape `dims`, keeps a reference to it in
// `*keep` and returns its buffer in `*data`.
mpi::Status AllocateKept(tf::OpKernelContext* ctx, int index, const std::vector<int64_t>& dims,
                         tf::Tensor* keep, void** data) {
  tf::Tensor* out = nullptr;
  absl::Status s = ctx->allocate_output(index, ToShape(dims), &out);
  if (!s.ok()) return ToMpiStatus(s);
  *keep = *out;
  *data = out->data();
  return mpi::Status::Ok();
}

// An entry's `allocate` for an op whose only output is the entry's result:
// output 0, referenced from `*keep_out`.
hvd::AllocateFn AllocateOutput(tf::OpKernelContext* ctx, std::shared_ptr<tf::Tensor> keep_out) {
  return [ctx, keep_out](const std::vector<int64_t>& shape, const std::vector<int64_t>&,
                         void** data) { return AllocateKept(ctx, 0, shape, keep_out.get(), data); };
}

// An entry's completion: on success scales `*output` by `scale` (for types
// it applies to); on failure keeps `inputs` and `*output` alive where MPI may
// still write them and sets the op's status; then drops the entry's
// references to them, so that the next op may reuse (forward) the output
// buffer (the entry itself is destroyed only later, on the communication
// thread), and calls `done`.
hvd::EntryDoneFn FinishEntry(tf::OpKernelContext* ctx, tf::AsyncOpKernel::DoneCallback done,
                             std::vector<tf::Tensor> inputs, std::shared_ptr<tf::Tensor> output,
                             tf::DataType dtype, double scale) {
  auto held = std::make_shared<std::vector<tf::Tensor>>(std::move(inputs));
  return [ctx, done, held, output, dtype, scale](const mpi::Status& s, int) {
    if (s.ok()) {
      if (scale != 1.0) Scale(dtype, Data(*output), output->NumElements(), scale);
    } else {
      for (const tf::Tensor& t : *held) KeepOnFailure(s, t);
      KeepOnFailure(s, *output);
      ctx->SetStatus(ToTfStatus(s));
    }
    held->clear();
    *output = tf::Tensor();
    done();
  };
}

class AllreduceOp : public HvdKernel {
 public:
  explicit AllreduceOp(tf::OpKernelConstruction* ctx) : HvdKernel(ctx) {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    std::shared_ptr<hvd::Negotiator> set;
    OP_REQUIRES_OK_ASYNC(ctx, Lookup(&set), done);
    const tf::Tensor& input = ctx->input(0);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input), done);
    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK_ASYNC(ctx, AllocateAllreduceOutput(ctx, 0, input, &output), done);
    hvd::Entry e = MakeEntry(set.get(), hvd::OpType::kAllreduce, input.shape());
    e.output = output->data();
    std::vector<tf::Tensor> inputs;
    if (output->data() != input.data() && input.TotalBytes() > 0) {
      if (prescale_ == 1.0) {
        // Reduced from the input straight into the output: no copy.
        e.input = input.data();
        inputs.push_back(input);
      } else {
        std::memcpy(output->data(), input.data(), input.TotalBytes());
      }
    }
    if (e.input == nullptr) Scale(dtype_, output->data(), output->NumElements(), prescale_);
    int64_t bytes = static_cast<int64_t>(output->TotalBytes());
    e.done = FinishEntry(ctx, done, std::move(inputs), std::make_shared<tf::Tensor>(*output),
                         dtype_, OutputScale(set->size()));
    OP_REQUIRES_OK_ASYNC(ctx, ToTfStatus(set->Enqueue(std::move(e))), done);
    inline_done.set_bytes(bytes);
  }
};

class GroupedAllreduceOp : public HvdKernel {
 public:
  explicit GroupedAllreduceOp(tf::OpKernelConstruction* ctx) : HvdKernel(ctx) {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    std::shared_ptr<hvd::Negotiator> set;
    OP_REQUIRES_OK_ASYNC(ctx, Lookup(&set), done);
    const int n = ctx->num_inputs();
    struct Shared {
      std::atomic<int> left;
      std::mutex mu;
      absl::Status status;
    };
    auto shared = std::make_shared<Shared>();
    shared->left = n;
    std::vector<hvd::Entry> entries;
    const std::string base =
        tensor_name_.empty() ? set->EagerName("grouped_allreduce") : tensor_name_;
    double scale = OutputScale(set->size());
    tf::DataType dtype = dtype_;
    int64_t bytes = 0;
    for (int i = 0; i < n; ++i) {
      const tf::Tensor& input = ctx->input(i);
      bytes += static_cast<int64_t>(input.TotalBytes());
      OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input), done);
      tf::Tensor* output = nullptr;
      OP_REQUIRES_OK_ASYNC(
          ctx, ctx->forward_input_or_allocate_output({i}, i, input.shape(), &output), done);
      if (output->data() != input.data() && input.TotalBytes() > 0) {
        std::memcpy(output->data(), input.data(), input.TotalBytes());
      }
      Scale(dtype_, output->data(), output->NumElements(), prescale_);
      const std::string name = base + "." + std::to_string(i);
      hvd::Entry e = MakeEntry(set.get(), hvd::OpType::kAllreduce, input.shape(), &name);
      e.output = output->data();
      tf::Tensor keep = *output;
      e.done = [ctx, done, keep, scale, dtype, shared](const mpi::Status& s, int) {
        if (s.ok()) {
          Scale(dtype, Data(keep), keep.NumElements(), scale);
        } else {
          KeepOnFailure(s, keep);
          std::lock_guard<std::mutex> lock(shared->mu);
          if (shared->status.ok()) shared->status = ToTfStatus(s);
        }
        if (--shared->left == 0) {
          if (!shared->status.ok()) ctx->SetStatus(shared->status);
          done();
        }
      };
      entries.push_back(std::move(e));
    }
    OP_REQUIRES_OK_ASYNC(ctx, ToTfStatus(set->EnqueueGroup(std::move(entries))), done);
    inline_done.set_bytes(bytes);
  }
};

class AllgatherOp : public HvdKernel {
 public:
  explicit AllgatherOp(tf::OpKernelConstruction* ctx) : HvdKernel(ctx) {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    std::shared_ptr<hvd::Negotiator> set;
    OP_REQUIRES_OK_ASYNC(ctx, Lookup(&set), done);
    const tf::Tensor& input = ctx->input(0);
    OP_REQUIRES_ASYNC(ctx, input.dims() >= 1,
                      absl::InvalidArgumentError(
                          "allgather needs a tensor of rank >= 1 (it concatenates along "
                          "the first dimension). Received: shape=" +
                          input.shape().DebugString() + ". Reshape a scalar to [1]."),
                      done);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input), done);
    hvd::Entry e = MakeEntry(set.get(), hvd::OpType::kAllgather, input.shape());
    e.input = input.data();
    auto keep_out = std::make_shared<tf::Tensor>();
    e.allocate = AllocateOutput(ctx, keep_out);
    e.done = FinishEntry(ctx, done, {input}, keep_out, dtype_, 1.0);
    OP_REQUIRES_OK_ASYNC(ctx, ToTfStatus(set->Enqueue(std::move(e))), done);
    inline_done.set_bytes(static_cast<int64_t>(input.TotalBytes()));
  }
};

class BroadcastOp : public HvdKernel {
 public:
  explicit BroadcastOp(tf::OpKernelConstruction* ctx) : HvdKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("root_rank", &root_));
  }

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    std::shared_ptr<hvd::Negotiator> set;
    OP_REQUIRES_OK_ASYNC(ctx, Lookup(&set), done);
    OP_REQUIRES_ASYNC(ctx, root_ >= 0 && root_ < set->size(),
                      absl::InvalidArgumentError(
                          "`root_rank` must be a rank of the process set, in [0, " +
                          std::to_string(set->size()) +
                          "). Received: root_rank=" + std::to_string(root_)),
                      done);
    const tf::Tensor& input = ctx->input(0);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input), done);
    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK_ASYNC(
        ctx, ctx->forward_input_or_allocate_output({0}, 0, input.shape(), &output), done);
    if (output->data() != input.data() && input.TotalBytes() > 0) {
      std::memcpy(output->data(), input.data(), input.TotalBytes());
    }
    hvd::Entry e = MakeEntry(set.get(), hvd::OpType::kBroadcast, input.shape());
    e.root = root_;
    e.output = output->data();
    e.done = FinishEntry(ctx, done, {}, std::make_shared<tf::Tensor>(*output), dtype_, 1.0);
    OP_REQUIRES_OK_ASYNC(ctx, ToTfStatus(set->Enqueue(std::move(e))), done);
    inline_done.set_bytes(static_cast<int64_t>(input.TotalBytes()));
  }

 private:
  int root_ = 0;
};

class AlltoallOp : public HvdKernel {
 public:
  explicit AlltoallOp(tf::OpKernelConstruction* ctx) : HvdKernel(ctx) {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    std::shared_ptr<hvd::Negotiator> set;
    OP_REQUIRES_OK_ASYNC(ctx, Lookup(&set), done);
    const tf::Tensor& input = ctx->input(0);
    const tf::Tensor& splits_t = ctx->input(1);
    OP_REQUIRES_ASYNC(ctx, input.dims() >= 1,
                      absl::InvalidArgumentError(
                          "alltoall needs a tensor of rank >= 1 (it splits the first "
                          "dimension). Received: shape=" + input.shape().DebugString()),
                      done);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input), done);
    OP_REQUIRES_ASYNC(ctx, splits_t.dims() == 1,
                      absl::InvalidArgumentError(
                          "`splits` must be a vector. Received: shape=" +
                          splits_t.shape().DebugString()),
                      done);
    const int size = set->size();
    const int64_t rows = input.dim_size(0);
    std::vector<int64_t> splits;
    if (splits_t.NumElements() == 0) {
      OP_REQUIRES_ASYNC(ctx, rows % size == 0,
                        absl::InvalidArgumentError(
                            "alltoall without `splits` divides the first dimension "
                            "equally, so it must be a multiple of the process set's size. "
                            "Received: first dimension=" + std::to_string(rows) +
                            ", size=" + std::to_string(size) + ". Pass `splits`."),
                        done);
      splits.assign(size, rows / size);
    } else {
      auto flat = splits_t.flat<int32_t>();
      int64_t sum = 0;
      bool negative = false;
      for (int64_t i = 0; i < flat.size(); ++i) {
        splits.push_back(flat(i));
        sum += flat(i);
        negative = negative || flat(i) < 0;
      }
      OP_REQUIRES_ASYNC(ctx, static_cast<int>(splits.size()) == size && !negative &&
                                 sum == rows,
                        absl::InvalidArgumentError(
                            "`splits` must hold one non-negative row count per rank of "
                            "the process set, summing to the first dimension. Received: "
                            "splits=" + splits_t.DebugString(size + 1) + " (length " +
                            std::to_string(splits.size()) + ", sum " + std::to_string(sum) +
                            "), first dimension=" + std::to_string(rows) +
                            ", size=" + std::to_string(size)),
                        done);
    }
    hvd::Entry e = MakeEntry(set.get(), hvd::OpType::kAlltoall, input.shape());
    e.splits = splits;
    e.input = input.data();
    auto keep_out = std::make_shared<tf::Tensor>();
    e.allocate = [ctx, keep_out](const std::vector<int64_t>& shape,
                                 const std::vector<int64_t>& recv_splits, void** data) {
      tf::Tensor out;
      void* out_data = nullptr;
      mpi::Status s = AllocateKept(ctx, 0, shape, &out, &out_data);
      if (!s.ok()) return s;
      tf::Tensor received;
      void* unused = nullptr;
      s = AllocateKept(ctx, 1, {static_cast<int64_t>(recv_splits.size())}, &received, &unused);
      if (!s.ok()) return s;
      for (size_t i = 0; i < recv_splits.size(); ++i) {
        received.flat<int32_t>()(i) = static_cast<int32_t>(recv_splits[i]);
      }
      *keep_out = out;
      *data = out_data;
      return mpi::Status::Ok();
    };
    e.done = FinishEntry(ctx, done, {input}, keep_out, dtype_, 1.0);
    OP_REQUIRES_OK_ASYNC(ctx, ToTfStatus(set->Enqueue(std::move(e))), done);
    inline_done.set_bytes(static_cast<int64_t>(input.TotalBytes()));
  }
};

class ReducescatterOp : public HvdKernel {
 public:
  explicit ReducescatterOp(tf::OpKernelConstruction* ctx) : HvdKernel(ctx) {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    std::shared_ptr<hvd::Negotiator> set;
    OP_REQUIRES_OK_ASYNC(ctx, Lookup(&set), done);
    const tf::Tensor& input = ctx->input(0);
    OP_REQUIRES_ASYNC(ctx, input.dims() >= 1,
                      absl::InvalidArgumentError(
                          "reducescatter needs a tensor of rank >= 1 (it scatters the "
                          "first dimension). Received: shape=" +
                          input.shape().DebugString()),
                      done);
    OP_REQUIRES_OK_ASYNC(ctx, CheckCount(input), done);
    tf::Tensor send = input;
    if (prescale_ != 1.0) {
      OP_REQUIRES_OK_ASYNC(ctx, ctx->allocate_temp(dtype_, input.shape(), &send), done);
      if (input.TotalBytes() > 0) {
        std::memcpy(Data(send), input.data(), input.TotalBytes());
      }
      Scale(dtype_, Data(send), send.NumElements(), prescale_);
    }
    hvd::Entry e = MakeEntry(set.get(), hvd::OpType::kReducescatter, input.shape());
    e.input = send.data();
    auto keep_out = std::make_shared<tf::Tensor>();
    e.allocate = AllocateOutput(ctx, keep_out);
    e.done = FinishEntry(ctx, done, {send}, keep_out, dtype_, OutputScale(set->size()));
    OP_REQUIRES_OK_ASYNC(ctx, ToTfStatus(set->Enqueue(std::move(e))), done);
    inline_done.set_bytes(static_cast<int64_t>(input.TotalBytes()));
  }
};

class JoinOp : public HvdKernel {
 public:
  explicit JoinOp(tf::OpKernelConstruction* ctx) : HvdKernel(ctx) {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    std::shared_ptr<hvd::Negotiator> set;
    OP_REQUIRES_OK_ASYNC(ctx, Lookup(&set), done);
    const std::string name = hvd::kJoinName;
    hvd::Entry e = MakeEntry(set.get(), hvd::OpType::kJoin, tf::TensorShape(), &name);
    e.done = [ctx, done](const mpi::Status& s, int last_rank) {
      if (s.ok()) {
        tf::Tensor* out = nullptr;
        absl::Status a = ctx->allocate_output(0, tf::TensorShape(), &out);
        if (a.ok()) {
          out->scalar<int32_t>()() = last_rank;
        } else {
          ctx->SetStatus(a);
        }
      } else {
        ctx->SetStatus(ToTfStatus(s));
      }
      done();
    };
    OP_REQUIRES_OK_ASYNC(ctx, ToTfStatus(set->Enqueue(std::move(e))), done);
  }
};

class BarrierOp : public HvdKernel {
 public:
  explicit BarrierOp(tf::OpKernelConstruction* ctx) : HvdKernel(ctx) {}

  void ComputeAsync(tf::OpKernelContext* ctx, DoneCallback done) override {
    InlineDone inline_done(&done);
    std::shared_ptr<hvd::Negotiator> set;
    OP_REQUIRES_OK_ASYNC(ctx, Lookup(&set), done);
    hvd::Entry e = MakeEntry(set.get(), hvd::OpType::kBarrier, tf::TensorShape());
    e.done = [ctx, done](const mpi::Status& s, int) {
      if (!s.ok()) ctx->SetStatus(ToTfStatus(s));
      done();
    };
    OP_REQUIRES_OK_ASYNC(ctx, ToTfStatus(set->Enqueue(std::move(e))), done);
    inline_done.set_bytes(0);
  }
};

REGISTER_KERNEL_BUILDER(Name("SmdistHvdAllreduce").Device(tf::DEVICE_CPU), AllreduceOp);
REGISTER_KERNEL_BUILDER(Name("SmdistHvdGroupedAllreduce").Device(tf::DEVICE_CPU),
                        GroupedAllreduceOp);
REGISTER_KERNEL_BUILDER(Name("SmdistHvdAllgather").Device(tf::DEVICE_CPU), AllgatherOp);
REGISTER_KERNEL_BUILDER(Name("SmdistHvdBroadcast").Device(tf::DEVICE_CPU), BroadcastOp);
REGISTER_KERNEL_BUILDER(Name("SmdistHvdAlltoall").Device(tf::DEVICE_CPU), AlltoallOp);
REGISTER_KERNEL_BUILDER(Name("SmdistHvdReducescatter").Device(tf::DEVICE_CPU),
                        ReducescatterOp);
REGISTER_KERNEL_BUILDER(Name("SmdistHvdJoin").Device(tf::DEVICE_CPU), JoinOp);
REGISTER_KERNEL_BUILDER(Name("SmdistHvdBarrier").Device(tf::DEVICE_CPU), BarrierOp);

}  // namespace
}  // namespace smdist
