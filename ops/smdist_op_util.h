// Input and attribute checks shared by the CPU and GPU kernels of
// SmdistPack and SmdistUnpack, so both report the same errors.
#ifndef TF_SMDIST_OPS_SMDIST_OP_UTIL_H_
#define TF_SMDIST_OPS_SMDIST_OP_UTIL_H_

#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tensorflow {
namespace smdist {

// SmdistPack's `tensors`, at least one.
inline Status GetPackInputs(OpKernelContext* ctx, OpInputList* tensors) {
  TF_RETURN_IF_ERROR(ctx->input_list("tensors", tensors));
  if (tensors->size() < 1) {
    return errors::InvalidArgument(
        "SmdistPack: input `tensors` must hold at least one tensor, got 0");
  }
  return OkStatus();
}

// SmdistUnpack's `shapes` (fully defined, as many as attr N) and the
// exclusive prefix sum of their element counts (shapes->size() + 1 entries).
inline Status ReadUnpackShapes(OpKernelConstruction* ctx,
                               std::vector<TensorShape>* shapes,
                               std::vector<int64_t>* offsets) {
  std::vector<PartialTensorShape> partial;
  TF_RETURN_IF_ERROR(ctx->GetAttr("shapes", &partial));
  if (partial.empty()) {
    return errors::InvalidArgument(
        "SmdistUnpack: attr `shapes` must not be empty");
  }
  int num_outputs = 0;
  TF_RETURN_IF_ERROR(ctx->GetAttr("N", &num_outputs));
  if (num_outputs != static_cast<int>(partial.size())) {
    return errors::InvalidArgument("SmdistUnpack: attr N (", num_outputs,
                                   ") must equal the number of `shapes` (",
                                   partial.size(), ")");
  }
  shapes->clear();
  offsets->assign(1, 0);
  for (size_t i = 0; i < partial.size(); ++i) {
    TensorShape shape;
    if (!partial[i].AsTensorShape(&shape)) {
      return errors::InvalidArgument("SmdistUnpack: shapes[", i,
                                     "] must be fully defined, got ",
                                     partial[i].DebugString());
    }
    offsets->push_back(offsets->back() + shape.num_elements());
    shapes->push_back(shape);
  }
  return OkStatus();
}

// SmdistUnpack's `packed` must be 1-D with `total` elements.
inline Status CheckPacked(const Tensor& packed, int64_t total) {
  if (!TensorShapeUtils::IsVector(packed.shape())) {
    return errors::InvalidArgument(
        "SmdistUnpack: input `packed` must be 1-D, got shape ",
        packed.shape().DebugString());
  }
  if (packed.NumElements() != total) {
    return errors::InvalidArgument("SmdistUnpack: input `packed` has ",
                                   packed.NumElements(),
                                   " elements but `shapes` add up to ", total);
  }
  return OkStatus();
}

// Allocates SmdistUnpack's outputs; `dsts` gets their data pointers.
inline Status AllocateUnpackOutputs(OpKernelContext* ctx,
                                    const std::vector<TensorShape>& shapes,
                                    std::vector<void*>* dsts) {
  dsts->resize(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->allocate_output(static_cast<int>(i), shapes[i], &out));
    (*dsts)[i] = out->data();
  }
  return OkStatus();
}

}  // namespace smdist
}  // namespace tensorflow

#endif  // TF_SMDIST_OPS_SMDIST_OP_UTIL_H_
