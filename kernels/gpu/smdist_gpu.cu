// CUDA kernels for tf_smdist: segmented pack/unpack (cast, scale) and N-way
// sum with float32 accumulation. See smdist_gpu.h for the contract.

#include "smdist_gpu.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <mutex>
#include <type_traits>

namespace smdist {
namespace gpu {
namespace {

// ---------------------------------------------------------------- types ---

template <typename T>
struct Conv;

template <>
struct Conv<float> {
  __device__ __forceinline__ static float ToFloat(float x) { return x; }
  __device__ __forceinline__ static float FromFloat(float x) { return x; }
  __device__ __forceinline__ static void FromFloat2(float a, float b,
                                                    float* out) {
    out[0] = a;
    out[1] = b;
  }
};

template <>
struct Conv<__half> {
  __device__ __forceinline__ static float ToFloat(__half x) {
    return __half2float(x);
  }
  __device__ __forceinline__ static __half FromFloat(float x) {
    return __float2half_rn(x);
  }
  // Two conversions in one packed instruction; out is 4-byte aligned.
  __device__ __forceinline__ static void FromFloat2(float a, float b,
                                                    __half* out) {
    *reinterpret_cast<__half2*>(out) = __floats2half2_rn(a, b);
  }
};

template <>
struct Conv<__nv_bfloat16> {
  // bfloat16 is the upper half of a float32: widening is a shift (exact for
  // every value, NaN and subnormals included).
  __device__ __forceinline__ static float ToFloat(__nv_bfloat16 x) {
    return __uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(x))
                           << 16);
  }
  __device__ __forceinline__ static __nv_bfloat16 FromFloat(float x) {
    return __float2bfloat16_rn(x);
  }
  // Two conversions in one packed instruction; out is 4-byte aligned.
  __device__ __forceinline__ static void FromFloat2(float a, float b,
                                                    __nv_bfloat16* out) {
    *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(a, b);
  }
};

// Elements per vector: 16 bytes of the WIDER type, so that the wide side
// moves 16-byte words and the narrow side 8-byte words, each warp access
// covering a contiguous span (float <-> half: 4 elements, 16 B and 8 B).
template <typename In, typename Out>
struct VecTraits {
  static constexpr int kElems =
      16 / static_cast<int>(sizeof(In) > sizeof(Out) ? sizeof(In)
                                                     : sizeof(Out));
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The first element index h (0 <= h < kElems) at which both `src + h` and
// `dst + h` are aligned to a whole vector, or -1 if no such index exists
// (then the scalar path runs).
template <typename In, typename Out>
__host__ __device__ __forceinline__ int CoAlignedHead(uintptr_t src,
                                                      uintptr_t dst) {
  constexpr int V = VecTraits<In, Out>::kElems;
  if (src % sizeof(In) != 0 || dst % sizeof(Out) != 0) return -1;
  const int phase_in = static_cast<int>((src / sizeof(In)) % V);
  const int phase_out = static_cast<int>((dst / sizeof(Out)) % V);
  if (phase_in != phase_out) return -1;
  return (V - phase_in) % V;
}

// ------------------------------------------------------- segmented copy ---

// Vectors per thread per pass of the aligned copy path; a default chunk is
// one such pass of a whole block.
constexpr int kVecUnroll = 4;

enum CopyMode { kRawCopy = 0, kCast = 1, kCastScale = 2 };

template <typename In, typename Out, int kMode>
__device__ __forceinline__ Out Convert(In x, float scale) {
  if constexpr (kMode == kRawCopy) {
    return x;
  } else {
    float f = Conv<In>::ToFloat(x);
    if constexpr (kMode == kCastScale) f *= scale;
    return Conv<Out>::FromFloat(f);
  }
}

// Converts a whole vector, two elements per packed conversion.
template <typename In, typename Out, int kMode, int V>
__device__ __forceinline__ void ConvertVec(const Vec<In, V>& x, Vec<Out, V>* y,
                                           float scale) {
  static_assert(V % 2 == 0, "vectors hold an even number of elements");
  if constexpr (kMode == kRawCopy) {
    *y = x;
  } else {
#pragma unroll
    for (int k = 0; k < V; k += 2) {
      float a = Conv<In>::ToFloat(x.v[k]);
      float b = Conv<In>::ToFloat(x.v[k + 1]);
      if constexpr (kMode == kCastScale) {
        a *= scale;
        b *= scale;
      }
      Conv<Out>::FromFloat2(a, b, &y->v[k]);
    }
  }
}

// Bytes of independent scalar loads per thread per pass of the misaligned
// path, in flight before the first store.
constexpr int kScalarBytesInFlight = 32;

#ifndef SMDIST_STREAMING_LOADS
#define SMDIST_STREAMING_LOADS 1
#endif

// Raw words of 2, 4, 8 and 16 bytes, for loads and stores that name the
// global space (pointers read from the segment table would otherwise compile
// to generic accesses).
template <int kBytes>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

// A global load of an element or vector. Streaming (evict-first) by default:
// every element is read once, and the segment table should stay in L1.
template <typename T>
__device__ __forceinline__ T LoadGlobal(const T* p) {
  using W = typename Word<static_cast<int>(sizeof(T))>::type;
  union {
    T v;
    W w;
  } u;
#if SMDIST_STREAMING_LOADS
  u.w = __ldcs(reinterpret_cast<const W*>(p));
#else
  u.w = __ldg(reinterpret_cast<const W*>(p));
#endif
  return u.v;
}

// A global store of an element or vector (write-back, the default policy).
template <typename T>
__device__ __forceinline__ void StoreGlobal(T* p, const T& value) {
  using W = typename Word<static_cast<int>(sizeof(T))>::type;
  union {
    T v;
    W w;
  } u;
  u.v = value;
  __stwb(reinterpret_cast<W*>(p), u.w);
}

// Where one chunk's elements are: [begin, end) of `src` and `dst`.
struct ChunkRef {
  const void* src;
  void* dst;
  int64_t begin;
  int64_t end;
};

// The chunk's segment is the last one whose first chunk is <= chunk (empty
// segments own no chunk, so they are skipped). Each warp searches on its own,
// its 32 lanes probing 32 evenly spaced table entries per round: one round of
// loads for up to 32 segments, two for up to 1024. Needs all 32 lanes.
__device__ __forceinline__ ChunkRef Locate(const Segment* __restrict__ segments,
                                          int num_segments, int64_t chunk,
                                          int64_t chunk_elems) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  int lo = 0;
  int hi = num_segments - 1;
  for (;;) {
    const int step = (hi - lo + 32) >> 5;  // ceil(span / 32)
    const int p = lo + lane * step;
    Segment seg = {nullptr, nullptr, 0, 0};
    bool ok = false;
    if (p <= hi) {
      seg = segments[p];
      ok = seg.first_chunk <= chunk;
    }
    // Lane 0 probes `lo`, which always qualifies, so the mask is non-zero.
    const unsigned mask = __ballot_sync(0xffffffffu, ok);
    const int best = 31 - __clz(mask);
    if (step == 1) {
      ChunkRef ref;
      ref.src = reinterpret_cast<const void*>(__shfl_sync(
          0xffffffffu, reinterpret_cast<unsigned long long>(seg.src), best));
      ref.dst = reinterpret_cast<void*>(__shfl_sync(
          0xffffffffu, reinterpret_cast<unsigned long long>(seg.dst), best));
      const long long size = __shfl_sync(
          0xffffffffu, static_cast<long long>(seg.size), best);
      const long long first = __shfl_sync(
          0xffffffffu, static_cast<long long>(seg.first_chunk), best);
      ref.begin = (chunk - first) * chunk_elems;
      ref.end = min(ref.begin + chunk_elems, static_cast<int64_t>(size));
      return ref;
    }
    lo += best * step;
    hi = min(hi, lo + step - 1);
  }
}

// Copies one chunk; calls `after_first_loads()` exactly once, right after the
// first pass's loads are issued, so that the next chunk's table lookup runs
// while those loads are in flight.
template <typename In, typename Out, int kMode, typename AfterLoads>
__device__ __forceinline__ void CopyChunk(const ChunkRef& ref, float scale,
                                          AfterLoads&& after_first_loads) {
  using VT = VecTraits<In, Out>;
  constexpr int V = VT::kElems;
  using InVec = Vec<In, V>;
  using OutVec = Vec<Out, V>;
  const int t = static_cast<int>(threadIdx.x);
  const In* src = static_cast<const In*>(ref.src);
  Out* dst = static_cast<Out*>(ref.dst);
  const int64_t begin = ref.begin;
  const int64_t end = ref.end;
  const int head = CoAlignedHead<In, Out>(reinterpret_cast<uintptr_t>(src),
                                          reinterpret_cast<uintptr_t>(dst));
  if (head >= 0) {
    // chunk_elems is a multiple of V, so begin + head is aligned too.
    const int64_t vbegin = min(begin + head, end);
    const int64_t nvec = (end - vbegin) / V;
    const int64_t vend = vbegin + nvec * V;
    if (t < vbegin - begin) {
      StoreGlobal(dst + begin + t,
                  Convert<In, Out, kMode>(LoadGlobal(src + begin + t), scale));
    }
    if (t < end - vend) {
      StoreGlobal(dst + vend + t,
                  Convert<In, Out, kMode>(LoadGlobal(src + vend + t), scale));
    }
    const InVec* vsrc = reinterpret_cast<const InVec*>(src + vbegin);
    OutVec* vdst = reinterpret_cast<OutVec*>(dst + vbegin);
    constexpr int64_t kStep = kThreadsPerBlock * kVecUnroll;
    for (int64_t base = 0;; base += kStep) {
      InVec x[kVecUnroll];
#pragma unroll
      for (int u = 0; u < kVecUnroll; ++u) {
        const int64_t j = base + u * kThreadsPerBlock + t;
        if (j < nvec) x[u] = LoadGlobal(vsrc + j);
      }
      if (base == 0) after_first_loads();
#pragma unroll
      for (int u = 0; u < kVecUnroll; ++u) {
        const int64_t j = base + u * kThreadsPerBlock + t;
        if (j < nvec) {
          OutVec y;
          ConvertVec<In, Out, kMode, V>(x[u], &y, scale);
          StoreGlobal(vdst + j, y);
        }
      }
      if (base + kStep >= nvec) break;
    }
  } else {
    constexpr int kScalarUnroll =
        kScalarBytesInFlight / static_cast<int>(sizeof(In));
    constexpr int64_t kStep = kThreadsPerBlock * kScalarUnroll;
    for (int64_t base = begin;; base += kStep) {
      In x[kScalarUnroll];
#pragma unroll
      for (int u = 0; u < kScalarUnroll; ++u) {
        const int64_t i = base + u * kThreadsPerBlock + t;
        if (i < end) x[u] = LoadGlobal(src + i);
      }
      if (base == begin) after_first_loads();
#pragma unroll
      for (int u = 0; u < kScalarUnroll; ++u) {
        const int64_t i = base + u * kThreadsPerBlock + t;
        if (i < end) {
          StoreGlobal(dst + i, Convert<In, Out, kMode>(x[u], scale));
        }
      }
      if (base + kStep >= end) break;
    }
  }
}

// One launch per bucket: blocks walk the chunks of all segments with a
// grid-stride loop; each chunk finds its segment by binary search over
// `first_chunk`, and the search for a block's next chunk overlaps the loads
// of its current one. Warps never wait for each other (no barriers).
template <typename In, typename Out, int kMode>
__global__ void __launch_bounds__(kThreadsPerBlock)
    SegmentedCopyKernel(const Segment* __restrict__ segments, int num_segments,
                        int64_t num_chunks, int64_t chunk_elems, float scale) {
  int64_t chunk = blockIdx.x;
  if (chunk >= num_chunks) return;
  ChunkRef cur = Locate(segments, num_segments, chunk, chunk_elems);
  for (;;) {
    const int64_t next = chunk + gridDim.x;
    const bool has_next = next < num_chunks;
    ChunkRef upcoming = cur;
    CopyChunk<In, Out, kMode>(cur, scale, [&]() {
      if (has_next) {
        upcoming = Locate(segments, num_segments, next, chunk_elems);
      }
    });
    if (!has_next) break;
    cur = upcoming;
    chunk = next;
  }
}

template <typename In, typename Out>
cudaError_t LaunchCopy(const Segment* segments, int num_segments,
                       const CopyPlan& plan, float scale, cudaStream_t stream) {
  if (plan.num_chunks == 0) return cudaSuccess;
  if (segments == nullptr || num_segments <= 0 || plan.num_chunks < 0 ||
      plan.grid <= 0 || plan.chunk_elems <= 0 ||
      plan.chunk_elems % VecTraits<In, Out>::kElems != 0) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(plan.grid));
  const dim3 block(kThreadsPerBlock);
  if constexpr (std::is_same<In, Out>::value) {
    if (scale == 1.0f) {
      SegmentedCopyKernel<In, Out, kRawCopy><<<grid, block, 0, stream>>>(
          segments, num_segments, plan.num_chunks, plan.chunk_elems, scale);
    } else {
      SegmentedCopyKernel<In, Out, kCastScale><<<grid, block, 0, stream>>>(
          segments, num_segments, plan.num_chunks, plan.chunk_elems, scale);
    }
  } else {
    if (scale == 1.0f) {
      SegmentedCopyKernel<In, Out, kCast><<<grid, block, 0, stream>>>(
          segments, num_segments, plan.num_chunks, plan.chunk_elems, scale);
    } else {
      SegmentedCopyKernel<In, Out, kCastScale><<<grid, block, 0, stream>>>(
          segments, num_segments, plan.num_chunks, plan.chunk_elems, scale);
    }
  }
  return cudaGetLastError();
}

// --------------------------------------------------------------- reduce ---

struct ReduceArgs {
  const void* inputs[kMaxReduceInputs];
  void* output;
  int64_t count;
  int num_inputs;
  int head;  // CoAlignedHead shared by every input and the output, or -1
  float scale;
};

// Inputs loaded per group before accumulating (bounds registers at N = 16).
constexpr int kReduceGroup = 4;

template <typename In, typename Out, int kMaxN>
__device__ __forceinline__ void ReduceScalar(const ReduceArgs& a, int64_t i) {
  float acc = Conv<In>::ToFloat(static_cast<const In*>(a.inputs[0])[i]);
#pragma unroll
  for (int k = 1; k < kMaxN; ++k) {
    if (k < a.num_inputs) {
      acc += Conv<In>::ToFloat(static_cast<const In*>(a.inputs[k])[i]);
    }
  }
  static_cast<Out*>(a.output)[i] = Conv<Out>::FromFloat(acc * a.scale);
}

// kMaxN >= num_inputs; the sum runs in input order 0, 1, ..., N-1.
template <typename In, typename Out, int kMaxN>
__global__ void __launch_bounds__(kThreadsPerBlock) ReduceKernel(ReduceArgs a) {
  constexpr int V = VecTraits<In, Out>::kElems;
  using InVec = Vec<In, V>;
  using OutVec = Vec<Out, V>;
  constexpr int kGroup = kMaxN < kReduceGroup ? kMaxN : kReduceGroup;
  const int64_t tid =
      static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreadsPerBlock;
  const int64_t count = a.count;

  if (a.head < 0) {
    for (int64_t i = tid; i < count; i += stride) {
      ReduceScalar<In, Out, kMaxN>(a, i);
    }
    return;
  }
  const int64_t vbegin = min(static_cast<int64_t>(a.head), count);
  const int64_t nvec = (count - vbegin) / V;
  const int64_t vend = vbegin + nvec * V;
  if (tid < vbegin) ReduceScalar<In, Out, kMaxN>(a, tid);
  if (tid < count - vend) ReduceScalar<In, Out, kMaxN>(a, vend + tid);

  for (int64_t j = tid; j < nvec; j += stride) {
    float acc[V];
#pragma unroll
    for (int g = 0; g < kMaxN; g += kGroup) {
      InVec x[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        if (g + k < a.num_inputs) {
          x[k] = reinterpret_cast<const InVec*>(
              static_cast<const In*>(a.inputs[g + k]) + vbegin)[j];
        }
      }
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        if (g + k == 0) {
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = Conv<In>::ToFloat(x[0].v[e]);
        } else if (g + k < a.num_inputs) {
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += Conv<In>::ToFloat(x[k].v[e]);
        }
      }
    }
    OutVec y;
#pragma unroll
    for (int e = 0; e < V; e += 2) {
      Conv<Out>::FromFloat2(acc[e] * a.scale, acc[e + 1] * a.scale, &y.v[e]);
    }
    reinterpret_cast<OutVec*>(static_cast<Out*>(a.output) + vbegin)[j] = y;
  }
}

constexpr int kMaxDevices = 64;

}  // namespace

// ------------------------------------------------------------ host side ---

const DeviceInfo& GetDeviceInfo(int device) {
  static DeviceInfo infos[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  // Used when the device cannot be queried: an H100-sized part.
  static const DeviceInfo kFallback = {132, 2048, 50 << 20};
  if (device < 0 || device >= kMaxDevices) return kFallback;
  std::call_once(once[device], [device]() {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
      infos[device].multiprocessors = std::max(1, prop.multiProcessorCount);
      infos[device].max_threads_per_multiprocessor =
          std::max(kThreadsPerBlock, prop.maxThreadsPerMultiProcessor);
      infos[device].l2_bytes = prop.l2CacheSize;
    } else {
      (void)cudaGetLastError();  // reset the (non-sticky) error
      infos[device] = kFallback;
    }
  });
  return infos[device];
}

int ResidentBlocks(int device) {
  const DeviceInfo& info = GetDeviceInfo(device);
  return info.multiprocessors *
         (info.max_threads_per_multiprocessor / kThreadsPerBlock);
}

namespace {
#ifndef SMDIST_GRID_WAVES
#define SMDIST_GRID_WAVES 32
#endif
// Input bytes per chunk by default.
constexpr int64_t kChunkInputBytes = 16 << 10;
// The grid holds at most this many device-fills of blocks (measured on an
// H200: one chunk per block, leaving the balance to the block scheduler,
// beat persistent grids of 1, 2 and 4 fills).
constexpr int64_t kMaxGridWaves = SMDIST_GRID_WAVES;
}  // namespace

int64_t DefaultChunkElems(size_t in_elem_bytes, size_t out_elem_bytes) {
  // 16 KiB of input per chunk (measured best on an H200 for every pair: less
  // leaves the per-block start-up exposed, more leaves a longer tail), and at
  // least one full pass of a block.
  const int64_t in_bytes = static_cast<int64_t>(
      std::min<size_t>(16, std::max<size_t>(1, in_elem_bytes)));
  const int64_t wide = static_cast<int64_t>(std::min<size_t>(
      16, std::max<size_t>(1, std::max(in_elem_bytes, out_elem_bytes))));
  const int64_t pass = kThreadsPerBlock * (16 / wide) * kVecUnroll;
  return std::max<int64_t>(pass, kChunkInputBytes / in_bytes);
}

CopyPlan PlanSegments(Segment* segments, int num_segments,
                      size_t in_elem_bytes, size_t out_elem_bytes, int device,
                      int64_t chunk_elems, int grid) {
  const int64_t resident = ResidentBlocks(device);
  if (chunk_elems <= 0) {
    chunk_elems = DefaultChunkElems(in_elem_bytes, out_elem_bytes);
  } else {
    chunk_elems = (chunk_elems + 7) / 8 * 8;
  }
  int64_t chunks = 0;
  for (int i = 0; i < num_segments; ++i) {
    segments[i].first_chunk = chunks;
    const int64_t size = std::max<int64_t>(segments[i].size, 0);
    chunks += (size + chunk_elems - 1) / chunk_elems;
  }
  CopyPlan plan;
  plan.chunk_elems = chunk_elems;
  plan.num_chunks = chunks;
  int64_t blocks = grid > 0 ? grid : resident * kMaxGridWaves;
  blocks = std::min<int64_t>(blocks, std::max<int64_t>(chunks, 1));
  plan.grid = static_cast<int>(std::min<int64_t>(blocks, INT_MAX));
  return plan;
}

void FillPackSegments(const void* const* srcs, const int64_t* sizes, int n,
                      void* packed, size_t out_elem_bytes, Segment* segments) {
  char* out = static_cast<char*>(packed);
  int64_t offset = 0;
  for (int i = 0; i < n; ++i) {
    segments[i].src = srcs[i];
    segments[i].dst = out + offset * static_cast<int64_t>(out_elem_bytes);
    segments[i].size = sizes[i];
    segments[i].first_chunk = 0;
    offset += sizes[i];
  }
}

void FillUnpackSegments(const void* packed, size_t in_elem_bytes,
                        void* const* dsts, const int64_t* sizes, int n,
                        Segment* segments) {
  const char* in = static_cast<const char*>(packed);
  int64_t offset = 0;
  for (int i = 0; i < n; ++i) {
    segments[i].src = in + offset * static_cast<int64_t>(in_elem_bytes);
    segments[i].dst = dsts[i];
    segments[i].size = sizes[i];
    segments[i].first_chunk = 0;
    offset += sizes[i];
  }
}

template <typename In, typename Out>
cudaError_t LaunchPack(const Segment* segments, int num_segments,
                       const CopyPlan& plan, float scale, cudaStream_t stream) {
  return LaunchCopy<In, Out>(segments, num_segments, plan, scale, stream);
}

template <typename In, typename Out>
cudaError_t LaunchUnpack(const Segment* segments, int num_segments,
                         const CopyPlan& plan, cudaStream_t stream) {
  return LaunchCopy<In, Out>(segments, num_segments, plan, 1.0f, stream);
}

template <typename In, typename Out>
cudaError_t LaunchReduce(const In* const* inputs, int num_inputs, Out* output,
                         int64_t count, float scale, cudaStream_t stream) {
  if (num_inputs < 1 || num_inputs > kMaxReduceInputs || count < 0 ||
      inputs == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (count == 0) return cudaSuccess;
  ReduceArgs args;
  const uintptr_t out_addr = reinterpret_cast<uintptr_t>(output);
  int head = CoAlignedHead<In, Out>(reinterpret_cast<uintptr_t>(inputs[0]),
                                    out_addr);
  for (int k = 0; k < kMaxReduceInputs; ++k) {
    args.inputs[k] = k < num_inputs ? inputs[k] : nullptr;
    if (k < num_inputs && head >= 0 &&
        CoAlignedHead<In, Out>(reinterpret_cast<uintptr_t>(inputs[k]),
                               out_addr) != head) {
      head = -1;
    }
  }
  args.output = output;
  args.count = count;
  args.num_inputs = num_inputs;
  args.head = head;
  args.scale = scale;

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  constexpr int V = VecTraits<In, Out>::kElems;
  const int64_t work = head >= 0 ? (count + V - 1) / V : count;
  const int64_t blocks = std::min<int64_t>(
      (work + kThreadsPerBlock - 1) / kThreadsPerBlock,
      static_cast<int64_t>(ResidentBlocks(device)) * 2);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks, 1)));
  const dim3 block(kThreadsPerBlock);
  if (num_inputs == 1) {
    ReduceKernel<In, Out, 1><<<grid, block, 0, stream>>>(args);
  } else if (num_inputs == 2) {
    ReduceKernel<In, Out, 2><<<grid, block, 0, stream>>>(args);
  } else if (num_inputs <= 4) {
    ReduceKernel<In, Out, 4><<<grid, block, 0, stream>>>(args);
  } else if (num_inputs <= 8) {
    ReduceKernel<In, Out, 8><<<grid, block, 0, stream>>>(args);
  } else {
    ReduceKernel<In, Out, kMaxReduceInputs><<<grid, block, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

#define SMDIST_INSTANTIATE_GPU(In, Out)                                     \
  template cudaError_t LaunchPack<In, Out>(const Segment*, int,             \
                                           const CopyPlan&, float,          \
                                           cudaStream_t);                   \
  template cudaError_t LaunchUnpack<In, Out>(const Segment*, int,           \
                                             const CopyPlan&, cudaStream_t); \
  template cudaError_t LaunchReduce<In, Out>(const In* const*, int, Out*,   \
                                             int64_t, float, cudaStream_t);

#define SMDIST_INSTANTIATE_GPU_FROM(In)        \
  SMDIST_INSTANTIATE_GPU(In, float)            \
  SMDIST_INSTANTIATE_GPU(In, __half)           \
  SMDIST_INSTANTIATE_GPU(In, __nv_bfloat16)

SMDIST_INSTANTIATE_GPU_FROM(float)
SMDIST_INSTANTIATE_GPU_FROM(__half)
SMDIST_INSTANTIATE_GPU_FROM(__nv_bfloat16)

#undef SMDIST_INSTANTIATE_GPU_FROM
#undef SMDIST_INSTANTIATE_GPU

}  // namespace gpu
}  // namespace smdist
