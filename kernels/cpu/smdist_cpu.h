// Framework-free CPU compute for tf_smdist: pack, unpack and N-way reduce.
//
// Element types are float32, IEEE float16 and bfloat16, the last two stored
// as 16-bit words. Every function works on a half-open element range
// [begin, end) so that a caller can shard the work over threads; the ranges
// of different calls never write the same output element.
#ifndef TF_SMDIST_KERNELS_CPU_SMDIST_CPU_H_
#define TF_SMDIST_KERNELS_CPU_SMDIST_CPU_H_

#include <cstddef>
#include <cstdint>

namespace smdist {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Bytes per element of `dtype`.
size_t DTypeSize(DType dtype);

// packed[i] = cast<out>(scale * srcs[k][i - offsets[k]]) for i in
// [begin, end), where offsets is the exclusive prefix sum of the inputs'
// element counts (num_srcs + 1 entries, offsets[0] == 0).
void PackRange(const void* const* srcs, const int64_t* offsets, int num_srcs,
               DType in_type, void* packed, DType out_type, float scale,
               int64_t begin, int64_t end);

// dsts[k][i - offsets[k]] = cast<out>(packed[i]) for i in [begin, end).
void UnpackRange(const void* packed, DType in_type, void* const* dsts,
                 const int64_t* offsets, int num_dsts, DType out_type,
                 int64_t begin, int64_t end);

// out[i] = cast<out>(scale * sum_k srcs[k][i]) for i in [begin, end),
// summed in float32 in input order. `out` may be one of `srcs` when the
// types are equal: every element is read before it is written.
void ReduceRange(const void* const* srcs, int num_srcs, DType in_type,
                 void* out, DType out_type, float scale, int64_t begin,
                 int64_t end);

}  // namespace smdist

#endif  // TF_SMDIST_KERNELS_CPU_SMDIST_CPU_H_
