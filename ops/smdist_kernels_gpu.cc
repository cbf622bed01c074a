// GPU OpKernels of SmdistPack and SmdistUnpack: input validation and the
// segment table; the copy itself is one launch of kernels/gpu/smdist_gpu.cu
// per op call, on the op's CUDA stream. Built only when TensorFlow was built
// with CUDA and nvcc is present (setup.py defines GOOGLE_CUDA for this file).
#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "kernels/gpu/smdist_gpu.h"
#include "ops/smdist_op_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tensorflow {
namespace smdist {
namespace {

// TensorFlow's element types and the CUDA types of kernels/gpu: the same bit
// layouts, so buffers are passed through reinterpret_cast.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<Eigen::half> {
  using type = __half;
};
template <>
struct CudaType<Eigen::bfloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(Eigen::half) == sizeof(__half), "half layout");
static_assert(sizeof(Eigen::bfloat16) == sizeof(__nv_bfloat16),
              "bfloat16 layout");

Status CudaError(const char* op, const char* what, cudaError_t err) {
  return errors::Internal(op, ": ", what, " failed: ", cudaGetErrorName(err),
                          " (", cudaGetErrorString(err), ")");
}

// Plans the copy described by `segments` on the current device, copies the
// table into a device temporary on `stream` and returns it and the plan.
// The table is copied from pageable host memory, which the CUDA driver
// stages before cudaMemcpyAsync returns, so `segments` may go out of scope.
Status UploadSegments(OpKernelContext* ctx, const char* op,
                      std::vector<::smdist::gpu::Segment>* segments,
                      size_t in_bytes, size_t out_bytes, cudaStream_t stream,
                      Tensor* table, ::smdist::gpu::CopyPlan* plan) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return CudaError(op, "cudaGetDevice", err);
  const int n = static_cast<int>(segments->size());
  *plan = ::smdist::gpu::PlanSegments(segments->data(), n, in_bytes, out_bytes,
                                      device);
  const int64_t bytes =
      static_cast<int64_t>(sizeof(::smdist::gpu::Segment)) * n;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_INT8, TensorShape({bytes}), table));
  err = cudaMemcpyAsync(table->data(), segments->data(), bytes,
                        cudaMemcpyHostToDevice, stream);
  if (err != cudaSuccess) return CudaError(op, "segment table upload", err);
  return OkStatus();
}

template <typename T, typename OutT>
class PackGpuOp : public OpKernel {
 public:
  explicit PackGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    OpInputList tensors;
    OP_REQUIRES_OK(ctx, GetPackInputs(ctx, &tensors));
    const int n = tensors.size();
    std::vector<const void*> srcs(n);
    std::vector<int64_t> sizes(n);
    int64_t total = 0;
    for (int i = 0; i < n; ++i) {
      srcs[i] = tensors[i].data();
      sizes[i] = tensors[i].NumElements();
      total += sizes[i];
    }
    Tensor* packed = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({total}), &packed));
    if (total == 0) return;

    std::vector<::smdist::gpu::Segment> segments(n);
    ::smdist::gpu::FillPackSegments(srcs.data(), sizes.data(), n,
                                    packed->data(), sizeof(OutT),
                                    segments.data());
    const cudaStream_t stream = ctx->eigen_gpu_device().stream();
    Tensor table;
    ::smdist::gpu::CopyPlan plan;
    OP_REQUIRES_OK(ctx, UploadSegments(ctx, "SmdistPack", &segments, sizeof(T),
                                       sizeof(OutT), stream, &table, &plan));
    const cudaError_t err =
        ::smdist::gpu::LaunchPack<typename CudaType<T>::type,
                                  typename CudaType<OutT>::type>(
            reinterpret_cast<const ::smdist::gpu::Segment*>(table.data()), n,
            plan, scale_, stream);
    OP_REQUIRES(ctx, err == cudaSuccess,
                CudaError("SmdistPack", "kernel launch", err));
  }

 private:
  float scale_;
};

template <typename T, typename OutT>
class UnpackGpuOp : public OpKernel {
 public:
  explicit UnpackGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int64_t> offsets;
    OP_REQUIRES_OK(ctx, ReadUnpackShapes(ctx, &shapes_, &offsets));
    for (size_t i = 0; i + 1 < offsets.size(); ++i) {
      sizes_.push_back(offsets[i + 1] - offsets[i]);
    }
    total_ = offsets.back();
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& packed = ctx->input(0);
    OP_REQUIRES_OK(ctx, CheckPacked(packed, total_));
    const int n = static_cast<int>(shapes_.size());
    std::vector<void*> dsts;
    OP_REQUIRES_OK(ctx, AllocateUnpackOutputs(ctx, shapes_, &dsts));
    if (total_ == 0) return;

    std::vector<::smdist::gpu::Segment> segments(n);
    ::smdist::gpu::FillUnpackSegments(packed.data(), sizeof(T), dsts.data(),
                                      sizes_.data(), n, segments.data());
    const cudaStream_t stream = ctx->eigen_gpu_device().stream();
    Tensor table;
    ::smdist::gpu::CopyPlan plan;
    OP_REQUIRES_OK(ctx, UploadSegments(ctx, "SmdistUnpack", &segments,
                                       sizeof(T), sizeof(OutT), stream, &table,
                                       &plan));
    const cudaError_t err =
        ::smdist::gpu::LaunchUnpack<typename CudaType<T>::type,
                                    typename CudaType<OutT>::type>(
            reinterpret_cast<const ::smdist::gpu::Segment*>(table.data()), n,
            plan, stream);
    OP_REQUIRES(ctx, err == cudaSuccess,
                CudaError("SmdistUnpack", "kernel launch", err));
  }

 private:
  std::vector<TensorShape> shapes_;
  std::vector<int64_t> sizes_;
  int64_t total_ = 0;
};

#define SMDIST_REGISTER_GPU(T, OutT)                                  \
  REGISTER_KERNEL_BUILDER(Name("SmdistPack")                          \
                              .Device(DEVICE_GPU)                     \
                              .TypeConstraint<T>("T")                 \
                              .TypeConstraint<OutT>("out_type"),      \
                          PackGpuOp<T, OutT>);                        \
  REGISTER_KERNEL_BUILDER(Name("SmdistUnpack")                        \
                              .Device(DEVICE_GPU)                     \
                              .TypeConstraint<T>("T")                 \
                              .TypeConstraint<OutT>("out_type"),      \
                          UnpackGpuOp<T, OutT>);

#define SMDIST_REGISTER_GPU_FROM(T)          \
  SMDIST_REGISTER_GPU(T, float)              \
  SMDIST_REGISTER_GPU(T, Eigen::half)        \
  SMDIST_REGISTER_GPU(T, Eigen::bfloat16)

SMDIST_REGISTER_GPU_FROM(float)
SMDIST_REGISTER_GPU_FROM(Eigen::half)
SMDIST_REGISTER_GPU_FROM(Eigen::bfloat16)

#undef SMDIST_REGISTER_GPU_FROM
#undef SMDIST_REGISTER_GPU

}  // namespace
}  // namespace smdist
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
