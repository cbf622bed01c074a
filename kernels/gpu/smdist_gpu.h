// CUDA kernels for tf_smdist: fused pack (cast + scale), unpack (cast) and an
// N-way sum with float32 accumulation. Framework-free: pointers, sizes and a
// cudaStream_t; no TensorFlow headers.
//
// Element types are `float`, `__half` (cuda_fp16.h) and `__nv_bfloat16`
// (cuda_bf16.h); TensorFlow's Eigen::half and Eigen::bfloat16 have the same bit
// layout, so an adapter may reinterpret_cast its buffers. All 9 (In, Out) pairs
// are instantiated in smdist_gpu.cu.
//
// Pack and unpack are one segmented copy: a bucket is a table of segments, each
// `size` elements read from `src` and written, cast (and scaled), to `dst`. The
// table lives in device memory and the whole bucket runs as ONE launch: every
// segment is cut into chunks of `plan.chunk_elems` elements and the blocks walk
// the chunks with a grid-stride loop. Inside a chunk, vector loads and stores
// (16 bytes on the wider side, 8 on the narrower) are used when `src` and `dst`
// reach a vector boundary at the same element; otherwise a coalesced scalar
// path runs.
//
// Example (pack three device tensors into one float16 buffer, scaled by 0.5):
//
//   smdist::gpu::Segment host[3];
//   smdist::gpu::FillPackSegments(srcs, sizes, 3, packed, sizeof(__half), host);
//   smdist::gpu::CopyPlan plan = smdist::gpu::PlanSegments(
//       host, 3, sizeof(float), sizeof(__half), device);
//   cudaMemcpyAsync(dev_table, host, sizeof(host), cudaMemcpyHostToDevice, s);
//   smdist::gpu::LaunchPack<float, __half>(dev_table, 3, plan, 0.5f, s);

#ifndef SMDIST_KERNELS_GPU_SMDIST_GPU_H_
#define SMDIST_KERNELS_GPU_SMDIST_GPU_H_

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace smdist {
namespace gpu {

// Threads per block of every kernel here.
constexpr int kThreadsPerBlock = 256;
// Most inputs one LaunchReduce call takes (they travel as kernel arguments).
constexpr int kMaxReduceInputs = 16;

// One tensor's part of a bucket: `size` elements from `src` to `dst`.
// `first_chunk` is filled by PlanSegments.
struct Segment {
  const void* src;
  void* dst;
  int64_t size;
  int64_t first_chunk;
};

// How a segment table is cut into work: chunks of `chunk_elems` elements
// (a multiple of 8), `num_chunks` in all, walked by `grid` blocks.
struct CopyPlan {
  int64_t chunk_elems;
  int64_t num_chunks;
  int grid;
};

// What the launch shapes are computed from; read once per device with
// cudaGetDeviceProperties and cached.
struct DeviceInfo {
  int multiprocessors;
  int max_threads_per_multiprocessor;
  int64_t l2_bytes;
};

// The cached properties of `device` (fallback values if the query fails).
const DeviceInfo& GetDeviceInfo(int device);

// Blocks of kThreadsPerBlock that fill `device` once.
int ResidentBlocks(int device);

// Default chunk size (elements) for a copy from `in_elem_bytes`-wide to
// `out_elem_bytes`-wide elements: 16 KiB of input (4096 float or 8192 16-bit
// elements).
int64_t DefaultChunkElems(size_t in_elem_bytes, size_t out_elem_bytes);

// Host side: fills `segments[i].first_chunk` and returns the plan for a copy
// between elements `in_elem_bytes` and `out_elem_bytes` wide on `device`.
// `chunk_elems` > 0 overrides the chunk size (rounded up to a multiple of 8)
// and `grid` > 0 the number of blocks (capped at the number of chunks); 0
// takes DefaultChunkElems and one block per chunk, up to 32 times the
// device's resident blocks (then the grid-stride loop takes the rest).
CopyPlan PlanSegments(Segment* segments, int num_segments,
                      size_t in_elem_bytes, size_t out_elem_bytes, int device,
                      int64_t chunk_elems = 0, int grid = 0);

// Host side: segments for packing `n` tensors (`srcs[i]`, `sizes[i]` elements)
// into the contiguous buffer `packed` whose elements are `out_elem_bytes` wide.
void FillPackSegments(const void* const* srcs, const int64_t* sizes, int n,
                      void* packed, size_t out_elem_bytes, Segment* segments);

// Host side: segments for unpacking the contiguous buffer `packed` (elements
// `in_elem_bytes` wide) into `n` tensors (`dsts[i]`, `sizes[i]` elements).
void FillUnpackSegments(const void* packed, size_t in_elem_bytes,
                        void* const* dsts, const int64_t* sizes, int n,
                        Segment* segments);

// dst[i] = Out(float(src[i]) * scale) for every segment of the device table
// `segments` (the multiplication is skipped when scale == 1). One launch.
template <typename In, typename Out>
cudaError_t LaunchPack(const Segment* segments, int num_segments,
                       const CopyPlan& plan, float scale, cudaStream_t stream);

// dst[i] = Out(src[i]) for every segment of the device table. One launch.
template <typename In, typename Out>
cudaError_t LaunchUnpack(const Segment* segments, int num_segments,
                         const CopyPlan& plan, cudaStream_t stream);

// output[i] = Out(scale * sum_j float(inputs[j][i])), summed in float32 in the
// order j = 0..num_inputs-1. `inputs` is a HOST array of `num_inputs`
// (1..kMaxReduceInputs) device pointers. One launch.
template <typename In, typename Out>
cudaError_t LaunchReduce(const In* const* inputs, int num_inputs, Out* output,
                         int64_t count, float scale, cudaStream_t stream);

}  // namespace gpu
}  // namespace smdist

#endif  // SMDIST_KERNELS_GPU_SMDIST_GPU_H_
