// CPU OpKernels of SmdistPack, SmdistUnpack and SmdistHostReduce: input
// validation and sharding over TensorFlow's CPU worker threads; the compute
// itself is in kernels/cpu.
#include <vector>

#include "kernels/cpu/smdist_cpu.h"
#include "ops/smdist_op_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/lib/core/threadpool.h"

namespace tensorflow {
namespace smdist {
namespace {

using ::smdist::DType;

DType ToDType(DataType dtype) {
  switch (dtype) {
    case DT_HALF:
      return DType::kFloat16;
    case DT_BFLOAT16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

// Cost per element for the thread pool's sharding: the loops are memory
// bound, so the bytes moved per element.
int64_t CostPerElement(int num_reads, DataType in, DataType out) {
  return num_reads * DataTypeSize(in) + DataTypeSize(out);
}

// Runs fn(begin, end) over [0, total) on the CPU worker threads, one
// contiguous shard per thread, shard boundaries at multiples of 16 elements
// (whole cache lines for float32) so no two threads share a cache line of
// output. max_shards > 0 caps the number of shards, and so of threads at work.
template <typename Fn>
void ParallelRange(OpKernelContext* ctx, int64_t total, int64_t cost,
                   int max_shards, const Fn& fn) {
  if (total <= 0) return;
  // Below this many bytes moved, waking worker threads costs more than the
  // work itself: run inline on the calling thread.
  constexpr int64_t kInlineBytes = 256 << 10;
  if (total * cost <= kInlineBytes || max_shards == 1) {
    fn(0, total);
    return;
  }
  constexpr int64_t kAlign = 16;
  const int64_t blocks = (total + kAlign - 1) / kAlign;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  auto shard = [&fn, total](int64_t first, int64_t last) {
    fn(first * kAlign, std::min(total, last * kAlign));
  };
  // One contiguous shard per thread (or per allowed thread).
  const int64_t shards =
      max_shards > 0 ? std::min<int64_t>(max_shards, pool->NumThreads())
                     : pool->NumThreads();
  const int64_t per_shard = (blocks + shards - 1) / std::max<int64_t>(shards, 1);
  pool->ParallelFor(blocks, thread::ThreadPool::SchedulingParams::Fixed(per_shard),
                    shard);
}

class PackOp : public OpKernel {
 public:
  explicit PackOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("out_type", &out_type_));
  }

  void Compute(OpKernelContext* ctx) override {
    OpInputList tensors;
    OP_REQUIRES_OK(ctx, GetPackInputs(ctx, &tensors));
    const int n = tensors.size();
    std::vector<const void*> srcs(n);
    std::vector<int64_t> offsets(n + 1, 0);
    for (int i = 0; i < n; ++i) {
      srcs[i] = tensors[i].data();
      offsets[i + 1] = offsets[i] + tensors[i].NumElements();
    }
    Tensor* packed = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({offsets[n]}),
                                             &packed));
    const DataType in_type = tensors[0].dtype();
    const DType in = ToDType(in_type);
    const DType out = ToDType(out_type_);
    void* dst = packed->data();
    const float scale = scale_;
    ParallelRange(ctx, offsets[n], CostPerElement(1, in_type, out_type_), 0,
                  [&](int64_t begin, int64_t end) {
                    ::smdist::PackRange(srcs.data(), offsets.data(), n, in,
                                        dst, out, scale, begin, end);
                  });
  }

 private:
  float scale_;
  DataType out_type_;
};

class UnpackOp : public OpKernel {
 public:
  explicit UnpackOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("out_type", &out_type_));
    OP_REQUIRES_OK(ctx, ReadUnpackShapes(ctx, &shapes_, &offsets_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& packed = ctx->input(0);
    OP_REQUIRES_OK(ctx, CheckPacked(packed, offsets_.back()));
    const int n = static_cast<int>(shapes_.size());
    std::vector<void*> dsts;
    OP_REQUIRES_OK(ctx, AllocateUnpackOutputs(ctx, shapes_, &dsts));
    const DType in = ToDType(packed.dtype());
    const DType out = ToDType(out_type_);
    const void* src = packed.data();
    ParallelRange(ctx, offsets_.back(),
                  CostPerElement(1, packed.dtype(), out_type_), 0,
                  [&](int64_t begin, int64_t end) {
                    ::smdist::UnpackRange(src, in, dsts.data(),
                                          offsets_.data(), n, out, begin, end);
                  });
  }

 private:
  DataType out_type_;
  std::vector<TensorShape> shapes_;
  std::vector<int64_t> offsets_;
};

class HostReduceOp : public OpKernel {
 public:
  explicit HostReduceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("out_type", &out_type_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_threads", &max_threads_));
  }

  void Compute(OpKernelContext* ctx) override {
    OpInputList inputs;
    OP_REQUIRES_OK(ctx, ctx->input_list("inputs", &inputs));
    OP_REQUIRES(ctx, inputs.size() >= 1,
                errors::InvalidArgument(
                    "SmdistHostReduce: input `inputs` must hold at least one "
                    "tensor, got 0"));
    const int n = inputs.size();
    const TensorShape& shape = inputs[0].shape();
    std::vector<const void*> srcs(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES(ctx, inputs[i].shape() == shape,
                  errors::InvalidArgument(
                      "SmdistHostReduce: input inputs[", i, "] has shape ",
                      inputs[i].shape().DebugString(),
                      " but inputs[0] has shape ", shape.DebugString(),
                      "; all inputs must have one shape"));
      srcs[i] = inputs[i].data();
    }
    // Reuse an input's buffer for the output where TensorFlow allows it (no
    // other reader): the sum is computed chunk by chunk, each chunk read in
    // full before it is written, so writing over an input is safe.
    Tensor* output = nullptr;
    const DataType in_type = inputs[0].dtype();
    if (in_type == out_type_) {
      std::vector<int> candidates(n);
      for (int i = 0; i < n; ++i) candidates[i] = i;
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                              candidates, 0, shape, &output));
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &output));
    }
    const DType in = ToDType(in_type);
    const DType out = ToDType(out_type_);
    void* dst = output->data();
    const float scale = scale_;
    ParallelRange(ctx, shape.num_elements(),
                  CostPerElement(n, in_type, out_type_), max_threads_,
                  [&](int64_t begin, int64_t end) {
                    ::smdist::ReduceRange(srcs.data(), n, in, dst, out, scale,
                                          begin, end);
                  });
  }

 private:
  float scale_;
  DataType out_type_;
  int max_threads_;
};

REGISTER_KERNEL_BUILDER(Name("SmdistPack").Device(DEVICE_CPU), PackOp);
REGISTER_KERNEL_BUILDER(Name("SmdistUnpack").Device(DEVICE_CPU), UnpackOp);
REGISTER_KERNEL_BUILDER(Name("SmdistHostReduce").Device(DEVICE_CPU),
                        HostReduceOp);

// GPU kernels of SmdistPack and SmdistUnpack are registered in
// ops/smdist_kernels_gpu.cc under GOOGLE_CUDA. SmdistHostReduce runs on the
// host by design: on a GPU machine its inputs and output live in host memory.

}  // namespace
}  // namespace smdist
}  // namespace tensorflow
