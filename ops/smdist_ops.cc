// Registrations and shape functions of tf_smdist's core ops.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace smdist {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

Status PackShape(InferenceContext* c) {
  int64_t total = 0;
  for (int i = 0; i < c->num_inputs(); ++i) {
    DimensionHandle n = c->NumElements(c->input(i));
    if (!c->ValueKnown(n)) {
      c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
      return OkStatus();
    }
    total += c->Value(n);
  }
  c->set_output(0, c->Vector(total));
  return OkStatus();
}

Status UnpackShape(InferenceContext* c) {
  std::vector<PartialTensorShape> shapes;
  TF_RETURN_IF_ERROR(c->GetAttr("shapes", &shapes));
  if (shapes.empty()) {
    return errors::InvalidArgument("SmdistUnpack: `shapes` must not be empty");
  }
  if (c->num_outputs() != static_cast<int>(shapes.size())) {
    return errors::InvalidArgument("SmdistUnpack: attr N (", c->num_outputs(),
                                   ") must equal the number of `shapes` (",
                                   shapes.size(), ")");
  }
  ShapeHandle packed;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &packed));
  int64_t total = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    if (!shapes[i].IsFullyDefined()) {
      return errors::InvalidArgument("SmdistUnpack: shapes[", i,
                                     "] must be fully defined, got ",
                                     shapes[i].DebugString());
    }
    total += shapes[i].num_elements();
    ShapeHandle out;
    TF_RETURN_IF_ERROR(c->MakeShapeFromPartialTensorShape(shapes[i], &out));
    c->set_output(static_cast<int>(i), out);
  }
  DimensionHandle length = c->Dim(packed, 0);
  if (c->ValueKnown(length) && c->Value(length) != total) {
    return errors::InvalidArgument(
        "SmdistUnpack: input `packed` has ", c->Value(length),
        " elements but `shapes` add up to ", total);
  }
  return OkStatus();
}

Status HostReduceShape(InferenceContext* c) {
  ShapeHandle out = c->input(0);
  for (int i = 1; i < c->num_inputs(); ++i) {
    Status s = c->Merge(out, c->input(i), &out);
    if (!s.ok()) {
      return errors::InvalidArgument(
          "SmdistHostReduce: input inputs[", i, "] has shape ",
          c->DebugString(c->input(i)), " but inputs[0] has shape ",
          c->DebugString(c->input(0)), "; all inputs must have one shape");
    }
  }
  c->set_output(0, out);
  return OkStatus();
}

}  // namespace
}  // namespace smdist

REGISTER_OP("SmdistPack")
    .Input("tensors: N * T")
    .Output("packed: out_type")
    .Attr("N: int >= 1")
    .Attr("T: {float, half, bfloat16}")
    .Attr("scale: float = 1.0")
    .Attr("out_type: {float, half, bfloat16}")
    .SetShapeFn(smdist::PackShape)
    .Doc(R"doc(
Flattens `tensors`, multiplies them by `scale`, casts them to `out_type` and
concatenates them, in order, into the 1-D `packed`.
)doc");

REGISTER_OP("SmdistUnpack")
    .Input("packed: T")
    .Output("tensors: N * out_type")
    .Attr("N: int >= 1")
    .Attr("T: {float, half, bfloat16}")
    .Attr("shapes: list(shape)")
    .Attr("out_type: {float, half, bfloat16}")
    .SetShapeFn(smdist::UnpackShape)
    .Doc(R"doc(
Splits the 1-D `packed` into tensors of `shapes`, cast to `out_type`: the
inverse of SmdistPack with scale 1.
)doc");

REGISTER_OP("SmdistHostReduce")
    .Input("inputs: N * T")
    .Output("output: out_type")
    .Attr("N: int >= 1")
    .Attr("T: {float, half, bfloat16}")
    .Attr("scale: float = 1.0")
    .Attr("out_type: {float, half, bfloat16}")
    .Attr("max_threads: int >= 0 = 0")
    .SetShapeFn(smdist::HostReduceShape)
    .Doc(R"doc(
`scale` times the elementwise sum of `inputs` (all of one shape), accumulated
in float32 whatever T is, computed on the host over the CPU worker threads.
max_threads: at most this many threads work on it; 0: the whole pool.
)doc");

}  // namespace tensorflow
