// Framework-free CPU compute for tf_smdist: pack, unpack and N-way reduce.
//
// The hot loops are written branch-free over fixed-size chunks so that the
// compiler vectorises them; they are compiled for a baseline x86-64 target
// and, where the compiler supports it, cloned for AVX2 (chosen at load time),
// so the shipped library stays portable.
#include "kernels/cpu/smdist_cpu.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels/common/fp16.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SMDIST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SMDIST_CLONES
#endif

namespace smdist {
namespace {

constexpr int64_t kChunk = 2048;  // elements per pass over > 8 inputs (8 KiB)

struct F32 {
  using Storage = float;
  static float Load(float v) { return v; }
  static float Store(float v) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  static float Load(uint16_t v) { return fp16::HalfToFloat(v); }
  static uint16_t Store(float v) { return fp16::FloatToHalf(v); }
};
struct BF16 {
  using Storage = uint16_t;
  static float Load(uint16_t v) { return fp16::BFloat16ToFloat(v); }
  static uint16_t Store(float v) { return fp16::FloatToBFloat16(v); }
};

// dst[i] = Out(scale * In(src[i])) for i in [0, n).
template <typename In, typename Out>
SMDIST_CLONES void CastScaleLoop(const typename In::Storage* __restrict src,
                                 typename Out::Storage* __restrict dst,
                                 int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Out::Store(In::Load(src[i]) * scale);
}

template <typename In, typename Out>
SMDIST_CLONES void CastLoop(const typename In::Storage* __restrict src,
                            typename Out::Storage* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Out::Store(In::Load(src[i]));
}

template <typename In, typename Out>
void CastScale(const void* src, void* dst, int64_t n, float scale) {
  const auto* s = static_cast<const typename In::Storage*>(src);
  auto* d = static_cast<typename Out::Storage*>(dst);
  if (scale == 1.0f) {
    if (std::is_same<In, Out>::value) {
      std::memcpy(d, s, n * sizeof(*d));
    } else {
      CastLoop<In, Out>(s, d, n);
    }
  } else {
    CastScaleLoop<In, Out>(s, d, n, scale);
  }
}

using CastFn = void (*)(const void*, void*, int64_t, float);

template <typename In>
CastFn PickCastOut(DType out) {
  switch (out) {
    case DType::kFloat16:
      return &CastScale<In, F16>;
    case DType::kBFloat16:
      return &CastScale<In, BF16>;
    default:
      return &CastScale<In, F32>;
  }
}

CastFn PickCast(DType in, DType out) {
  switch (in) {
    case DType::kFloat16:
      return PickCastOut<F16>(out);
    case DType::kBFloat16:
      return PickCastOut<BF16>(out);
    default:
      return PickCastOut<F32>(out);
  }
}

// One pass over K inputs at once: dst[j] = Out(scale * (((s0 + s1) + s2) ..))
// for j in [begin, end), every input a sequential stream. `dst` may be one of
// the inputs (the op reuses an input's buffer): element j is read before it
// is written and no iteration touches another's elements, so there is no
// loop-carried dependence (ivdep).
template <typename In, typename Out, int K>
SMDIST_CLONES void SumFixed(const void* const* srcs, void* out, float scale,
                            int64_t begin, int64_t end) {
  using SIn = typename In::Storage;
  const SIn* p[K];
  for (int k = 0; k < K; ++k) p[k] = static_cast<const SIn*>(srcs[k]);
  auto* dst = static_cast<typename Out::Storage*>(out);
#pragma GCC ivdep
  for (int64_t j = begin; j < end; ++j) {
    float acc = In::Load(p[0][j]);
#pragma GCC unroll 8
    for (int k = 1; k < K; ++k) acc += In::Load(p[k][j]);
    dst[j] = Out::Store(acc * scale);
  }
}

// acc[j] = ((acc[j] + s0[j]) + s1[j]) .. for j in [0, n): the next group of
// up to 8 inputs added to a float32 chunk, in input order.
template <typename In, int K>
SMDIST_CLONES void AddFixed(const void* const* srcs, int64_t offset,
                            float* __restrict acc, int64_t n) {
  using SIn = typename In::Storage;
  const SIn* p[K];
  for (int k = 0; k < K; ++k) p[k] = static_cast<const SIn*>(srcs[k]) + offset;
  for (int64_t j = 0; j < n; ++j) {
    float a = acc[j];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) a += In::Load(p[k][j]);
    acc[j] = a;
  }
}

constexpr int kMaxFixed = 8;

template <typename In, typename Out>
void SumUpTo8(const void* const* srcs, int k, void* out, float scale,
              int64_t begin, int64_t end) {
  switch (k) {
    case 1: return SumFixed<In, Out, 1>(srcs, out, scale, begin, end);
    case 2: return SumFixed<In, Out, 2>(srcs, out, scale, begin, end);
    case 3: return SumFixed<In, Out, 3>(srcs, out, scale, begin, end);
    case 4: return SumFixed<In, Out, 4>(srcs, out, scale, begin, end);
    case 5: return SumFixed<In, Out, 5>(srcs, out, scale, begin, end);
    case 6: return SumFixed<In, Out, 6>(srcs, out, scale, begin, end);
    case 7: return SumFixed<In, Out, 7>(srcs, out, scale, begin, end);
    default: return SumFixed<In, Out, 8>(srcs, out, scale, begin, end);
  }
}

template <typename In>
void AddUpTo8(const void* const* srcs, int k, int64_t offset, float* acc,
              int64_t n) {
  switch (k) {
    case 1: return AddFixed<In, 1>(srcs, offset, acc, n);
    case 2: return AddFixed<In, 2>(srcs, offset, acc, n);
    case 3: return AddFixed<In, 3>(srcs, offset, acc, n);
    case 4: return AddFixed<In, 4>(srcs, offset, acc, n);
    case 5: return AddFixed<In, 5>(srcs, offset, acc, n);
    case 6: return AddFixed<In, 6>(srcs, offset, acc, n);
    case 7: return AddFixed<In, 7>(srcs, offset, acc, n);
    default: return AddFixed<In, 8>(srcs, offset, acc, n);
  }
}

template <typename Out>
SMDIST_CLONES void StoreChunk(const float* __restrict acc,
                              typename Out::Storage* dst, int64_t n,
                              float scale) {
  for (int64_t j = 0; j < n; ++j) dst[j] = Out::Store(acc[j] * scale);
}

// Up to 8 inputs: one streaming pass. More: a float32 chunk in L1 gets the
// first 8, then each further group of up to 8, then is scaled and stored;
// the additions stay in input order either way.
template <typename In, typename Out>
void Reduce(const void* const* srcs, int num_srcs, void* out, float scale,
            int64_t begin, int64_t end) {
  if (num_srcs <= kMaxFixed) {
    SumUpTo8<In, Out>(srcs, num_srcs, out, scale, begin, end);
    return;
  }
  auto* dst = static_cast<typename Out::Storage*>(out);
  alignas(64) float acc[kChunk];
  for (int64_t c = begin; c < end; c += kChunk) {
    const int64_t n = std::min(kChunk, end - c);
    // acc[j - c] = sum of the first 8 inputs at j, unscaled.
    SumFixed<In, F32, kMaxFixed>(srcs, acc - c, 1.0f, c, c + n);
    for (int k = kMaxFixed; k < num_srcs; k += kMaxFixed) {
      AddUpTo8<In>(srcs + k, std::min(kMaxFixed, num_srcs - k), c, acc, n);
    }
    StoreChunk<Out>(acc, dst + c, n, scale);
  }
}

using ReduceFn = void (*)(const void* const*, int, void*, float, int64_t,
                          int64_t);

template <typename In>
ReduceFn PickReduceOut(DType out) {
  switch (out) {
    case DType::kFloat16:
      return &Reduce<In, F16>;
    case DType::kBFloat16:
      return &Reduce<In, BF16>;
    default:
      return &Reduce<In, F32>;
  }
}

}  // namespace

size_t DTypeSize(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : 2;
}

void PackRange(const void* const* srcs, const int64_t* offsets, int num_srcs,
               DType in_type, void* packed, DType out_type, float scale,
               int64_t begin, int64_t end) {
  if (begin >= end) return;
  const CastFn cast = PickCast(in_type, out_type);
  const size_t in_size = DTypeSize(in_type);
  const size_t out_size = DTypeSize(out_type);
  // First input whose range ends after `begin`.
  int k = static_cast<int>(std::upper_bound(offsets, offsets + num_srcs + 1,
                                            begin) -
                           offsets) - 1;
  for (int64_t pos = begin; pos < end && k < num_srcs; ++k) {
    const int64_t stop = std::min(end, offsets[k + 1]);
    if (stop <= pos) continue;
    const int64_t local = pos - offsets[k];
    cast(static_cast<const char*>(srcs[k]) + local * in_size,
         static_cast<char*>(packed) + pos * out_size, stop - pos, scale);
    pos = stop;
  }
}

void UnpackRange(const void* packed, DType in_type, void* const* dsts,
                 const int64_t* offsets, int num_dsts, DType out_type,
                 int64_t begin, int64_t end) {
  if (begin >= end) return;
  const CastFn cast = PickCast(in_type, out_type);
  const size_t in_size = DTypeSize(in_type);
  const size_t out_size = DTypeSize(out_type);
  int k = static_cast<int>(std::upper_bound(offsets, offsets + num_dsts + 1,
                                            begin) -
                           offsets) - 1;
  for (int64_t pos = begin; pos < end && k < num_dsts; ++k) {
    const int64_t stop = std::min(end, offsets[k + 1]);
    if (stop <= pos) continue;
    const int64_t local = pos - offsets[k];
    cast(static_cast<const char*>(packed) + pos * in_size,
         static_cast<char*>(dsts[k]) + local * out_size, stop - pos, 1.0f);
    pos = stop;
  }
}

void ReduceRange(const void* const* srcs, int num_srcs, DType in_type,
                 void* out, DType out_type, float scale, int64_t begin,
                 int64_t end) {
  if (begin >= end || num_srcs <= 0) return;
  ReduceFn fn;
  switch (in_type) {
    case DType::kFloat16:
      fn = PickReduceOut<F16>(out_type);
      break;
    case DType::kBFloat16:
      fn = PickReduceOut<BF16>(out_type);
      break;
    default:
      fn = PickReduceOut<F32>(out_type);
  }
  fn(srcs, num_srcs, out, scale, begin, end);
}

}  // namespace smdist
