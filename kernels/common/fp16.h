// IEEE binary16 (float16) and bfloat16 <-> binary32 conversions, round to
// nearest even, shared by the CPU kernels, the MPI reductions and the GPU
// harness's host-side reference. Header-only and framework-free.
//
// Written branch-free over 32-bit words so that loops over them vectorise,
// and with only normal float arithmetic, so they stay exact under the
// flush-denormals mode that TensorFlow's worker threads run in.
#ifndef TF_SMDIST_KERNELS_COMMON_FP16_H_
#define TF_SMDIST_KERNELS_COMMON_FP16_H_

#include <cstdint>
#include <cstring>

namespace smdist {
namespace fp16 {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// binary16 -> binary32, exact, subnormals and non-finite values kept.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t shifted = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = shifted & 0x0f800000u;
  const uint32_t normal = shifted + (static_cast<uint32_t>(127 - 15) << 23);
  const uint32_t nonfinite = normal + (static_cast<uint32_t>(128 - 16) << 23);
  // Subnormal or zero: 2^-14 * (1 + m / 1024) - 2^-14, all normal floats.
  const uint32_t subnormal = FloatBits(BitsFloat(normal + (1u << 23)) -
                                       BitsFloat(113u << 23));
  const uint32_t r =
      exp == 0x0f800000u ? nonfinite : (exp == 0 ? subnormal : normal);
  return BitsFloat(sign | r);
}

// binary32 -> binary16, round to nearest even; overflow gives infinity and
// NaN stays NaN (quiet).
inline uint16_t FloatToHalf(float f) {
  uint32_t u = FloatBits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // Too large for a normal half (or inf / NaN).
  const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Result would be a subnormal half: let the FPU round by adding a magic.
  const uint32_t denorm_magic = ((127 - 15) + (23 - 10) + 1) << 23;
  const uint32_t sub =
      FloatBits(BitsFloat(u) + BitsFloat(denorm_magic)) - denorm_magic;
  // Normal half: rebias the exponent and round the mantissa to even.
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t norm =
      (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  const uint32_t r = u >= 0x47800000u ? big : (u < 0x38800000u ? sub : norm);
  return static_cast<uint16_t>(r | (sign >> 16));
}

inline float BFloat16ToFloat(uint16_t b) {
  return BitsFloat(static_cast<uint32_t>(b) << 16);
}

// binary32 -> bfloat16, round to nearest even; NaN stays NaN (quiet).
inline uint16_t FloatToBFloat16(float f) {
  const uint32_t u = FloatBits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? nan : rounded);
}

}  // namespace fp16
}  // namespace smdist

#endif  // TF_SMDIST_KERNELS_COMMON_FP16_H_
