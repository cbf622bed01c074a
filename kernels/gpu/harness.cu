// Standalone check and benchmark of the tf_smdist CUDA kernels (no
// TensorFlow). Built and run by run_checks.sh.
//
// Checks every kernel against a CPU reference on fresh random data: all 9
// dtype pairs, odd sizes, misaligned offsets, outputs (and guard regions
// around them) poisoned first so unwritten or overwritten elements show.
// Then times each kernel with CUDA events (median of --reps runs after
// warm-up, L2 flushed before each run) against a device-to-device cudaMemcpy
// of the same bytes, and prints a table last.
//
// Usage: smdist_gpu_harness [--seed N] [--reps N] [--no-bench | --bench-only]
//                           [--tune]
//        smdist_gpu_harness --host-selftest   (CPU only: reference conversions)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../common/fp16.h"

#include "smdist_gpu.h"

#define CHECK_CUDA(...)                                                    \
  do {                                                                     \
    const cudaError_t err_ = (__VA_ARGS__);                                \
    if (err_ != cudaSuccess) {                                             \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__,   \
                   #__VA_ARGS__, cudaGetErrorString(err_));                \
      std::exit(2);                                                        \
    }                                                                      \
  } while (0)

namespace smdist {
namespace gpu {
namespace harness {
namespace {

// ------------------------------------------------------------- dtypes ---

enum class DT { kF32 = 0, kF16 = 1, kBF16 = 2 };
constexpr DT kAllTypes[] = {DT::kF32, DT::kF16, DT::kBF16};

size_t Bytes(DT t) { return t == DT::kF32 ? 4 : 2; }
const char* Name(DT t) {
  return t == DT::kF32 ? "f32" : (t == DT::kF16 ? "f16" : "bf16");
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<In>{}, Tag<Out>{}) for the runtime pair.
template <typename F>
void Dispatch(DT in, DT out, F&& f) {
  auto with_out = [&](auto in_tag) {
    switch (out) {
      case DT::kF32: f(in_tag, Tag<float>{}); break;
      case DT::kF16: f(in_tag, Tag<__half>{}); break;
      case DT::kBF16: f(in_tag, Tag<__nv_bfloat16>{}); break;
    }
  };
  switch (in) {
    case DT::kF32: with_out(Tag<float>{}); break;
    case DT::kF16: with_out(Tag<__half>{}); break;
    case DT::kBF16: with_out(Tag<__nv_bfloat16>{}); break;
  }
}

// ------------------------------------------- CPU reference conversions ---
// The project's one host implementation (kernels/common/fp16.h), written from
// the IEEE formats, independent of cuda_fp16.h / cuda_bf16.h (the
// --host-selftest mode compares them with those headers' host code).

uint32_t FloatBits(float f) { return smdist::fp16::FloatBits(f); }
float BitsFloat(uint32_t u) { return smdist::fp16::BitsFloat(u); }
uint16_t FloatToHalfBits(float f) { return smdist::fp16::FloatToHalf(f); }
float HalfBitsToFloat(uint16_t h) { return smdist::fp16::HalfToFloat(h); }
uint16_t FloatToBf16Bits(float f) { return smdist::fp16::FloatToBFloat16(f); }
float Bf16BitsToFloat(uint16_t b) { return smdist::fp16::BFloat16ToFloat(b); }

// Element i of a host buffer of type t, as float.
float LoadF(DT t, const std::vector<uint8_t>& buf, int64_t i) {
  if (t == DT::kF32) {
    float f;
    std::memcpy(&f, buf.data() + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, buf.data() + 2 * i, 2);
  return t == DT::kF16 ? HalfBitsToFloat(h) : Bf16BitsToFloat(h);
}

uint32_t LoadBits(DT t, const std::vector<uint8_t>& buf, int64_t i) {
  if (t == DT::kF32) {
    uint32_t u;
    std::memcpy(&u, buf.data() + 4 * i, 4);
    return u;
  }
  uint16_t h;
  std::memcpy(&h, buf.data() + 2 * i, 2);
  return h;
}

uint32_t FloatToBits(DT t, float f) {
  switch (t) {
    case DT::kF32: return FloatBits(f);
    case DT::kF16: return FloatToHalfBits(f);
    case DT::kBF16: return FloatToBf16Bits(f);
  }
  return 0;
}

void StoreBits(DT t, std::vector<uint8_t>* buf, int64_t i, uint32_t bits) {
  if (t == DT::kF32) {
    std::memcpy(buf->data() + 4 * i, &bits, 4);
  } else {
    const uint16_t h = static_cast<uint16_t>(bits);
    std::memcpy(buf->data() + 2 * i, &h, 2);
  }
}

bool IsNanBits(DT t, uint32_t b) {
  if (t == DT::kF32) return (b & 0x7FFFFFFFu) > 0x7F800000u;
  if (t == DT::kF16) return (b & 0x7FFFu) > 0x7C00u;
  return (b & 0x7FFFu) > 0x7F80u;
}

// The reference for one packed / unpacked element (raw copy when the types
// match and scale is 1, else float(x) * scale rounded to nearest even).
uint32_t RefCopy(DT in, DT out, const std::vector<uint8_t>& buf, int64_t i,
                 float scale) {
  if (in == out && scale == 1.0f) return LoadBits(in, buf, i);
  float f = LoadF(in, buf, i);
  if (scale != 1.0f) f *= scale;
  return FloatToBits(out, f);
}

constexpr uint8_t kPoison = 0xA5;

// --------------------------------------------------------- random data ---

std::mt19937_64 rng;

int64_t RandInt(int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// Random finite values, with special values mixed in at the front.
void FillRandom(DT t, std::vector<uint8_t>* buf, int64_t n, bool specials) {
  static const float kSpecials[] = {
      0.0f, -0.0f, 1e-8f, -6e-8f, 65504.0f, 65520.0f, -1e5f,
      INFINITY, -INFINITY, NAN, 1e-40f, 1.0f + 1.0f / 2048, 3.0e38f,
      1.00390625f, 2.9802322e-08f};
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  for (int64_t i = 0; i < n; ++i) {
    float f = u(rng);
    if (specials && i < static_cast<int64_t>(sizeof(kSpecials) / 4)) {
      f = kSpecials[i];
    }
    StoreBits(t, buf, i, FloatToBits(t, f));
  }
}

int64_t RandSize() {
  static const int64_t kEdge[] = {0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33,
                                  255, 1023, 1025, 4095, 4097, 8193};
  const int64_t r = RandInt(0, 9);
  if (r < 4) return kEdge[RandInt(0, sizeof(kEdge) / 8 - 1)];
  if (r < 9) return RandInt(1, 20000);
  return RandInt(50000, 300001);
}

// ------------------------------------------------------ device buffers ---

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1)));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  char* bytes_at(size_t off) const { return static_cast<char*>(ptr) + off; }
};

void Upload(const DeviceBuffer& d, const std::vector<uint8_t>& h) {
  CHECK_CUDA(cudaMemcpy(d.ptr, h.data(), h.size(), cudaMemcpyHostToDevice));
}
void Download(std::vector<uint8_t>* h, const DeviceBuffer& d) {
  CHECK_CUDA(cudaMemcpy(h->data(), d.ptr, h->size(), cudaMemcpyDeviceToHost));
}

// ------------------------------------------------------------- checks ---

struct Tally {
  int passed = 0;
  int failed = 0;
};
Tally tally;

// Compares `got` against `want` (bits; NaN matches any NaN) over the whole
// arena; prints the first few mismatches. Returns the number of mismatches.
int64_t Compare(const char* what, DT t, const std::vector<uint8_t>& got,
                const std::vector<uint8_t>& want, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t g = LoadBits(t, got, i);
    const uint32_t w = LoadBits(t, want, i);
    if (g == w || (IsNanBits(t, g) && IsNanBits(t, w))) continue;
    if (bad < 5) {
      std::printf("  MISMATCH %s at arena element %lld: got 0x%08x want 0x%08x\n",
                  what, static_cast<long long>(i), g, w);
    }
    ++bad;
  }
  return bad;
}

void Record(bool ok, const std::string& label) {
  if (ok) {
    ++tally.passed;
  } else {
    ++tally.failed;
    std::printf("FAIL %s\n", label.c_str());
  }
}

struct PlanVariant {
  int64_t chunk_elems;
  int grid;
  const char* name;
};
const PlanVariant kPlanVariants[] = {
    {0, 0, "auto"}, {8, 0, "chunk8"}, {24, 3, "chunk24-grid3"},
    {2048, 1, "grid1"}, {0, 2, "grid2"}};

// Pack (is_pack) or unpack one random bucket; checks the whole output arena.
void CheckCopy(bool is_pack, DT in, DT out, std::vector<int64_t> sizes,
               float scale, const PlanVariant& pv) {
  const int n = static_cast<int>(sizes.size());
  const size_t sin = Bytes(in);
  const size_t sout = Bytes(out);
  int64_t total = 0;
  for (int64_t s : sizes) total += s;

  // Scattered side (pack: inputs; unpack: outputs): each tensor at a random
  // element gap after the previous one, so its alignment varies.
  std::vector<int64_t> scattered_off(n);
  int64_t scattered_len = 0;
  for (int i = 0; i < n; ++i) {
    scattered_len += RandInt(0, 9);
    scattered_off[i] = scattered_len;
    scattered_len += sizes[i];
  }
  scattered_len += 16;
  // Packed side: a random shift and guards on both sides.
  const int64_t guard = 64;
  const int64_t shift = RandInt(0, 7);
  const int64_t packed_len = guard + shift + total + guard;

  const DT scattered_t = is_pack ? in : out;
  const DT packed_t = is_pack ? out : in;
  std::vector<uint8_t> h_scat(scattered_len * Bytes(scattered_t));
  std::vector<uint8_t> h_pack(packed_len * Bytes(packed_t));
  if (is_pack) {
    FillRandom(in, &h_scat, scattered_len, true);
    std::memset(h_pack.data(), kPoison, h_pack.size());
  } else {
    FillRandom(in, &h_pack, packed_len, false);
    // Specials inside the payload too.
    std::vector<uint8_t> tmp(std::min<int64_t>(total, 15) * sin);
    FillRandom(in, &tmp, std::min<int64_t>(total, 15), true);
    std::memcpy(h_pack.data() + (guard + shift) * sin, tmp.data(), tmp.size());
    std::memset(h_scat.data(), kPoison, h_scat.size());
  }
  DeviceBuffer d_scat(h_scat.size());
  DeviceBuffer d_pack(h_pack.size());
  Upload(d_scat, h_scat);
  Upload(d_pack, h_pack);

  std::vector<Segment> segs(n);
  std::vector<const void*> srcs(n);
  std::vector<void*> dsts(n);
  for (int i = 0; i < n; ++i) {
    void* p = d_scat.bytes_at(scattered_off[i] * Bytes(scattered_t));
    srcs[i] = p;
    dsts[i] = p;
  }
  void* packed_ptr = d_pack.bytes_at((guard + shift) * Bytes(packed_t));
  if (is_pack) {
    FillPackSegments(srcs.data(), sizes.data(), n, packed_ptr, sout,
                     segs.data());
  } else {
    FillUnpackSegments(packed_ptr, sin, dsts.data(), sizes.data(), n,
                       segs.data());
  }
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  const CopyPlan plan =
      PlanSegments(segs.data(), n, sin, sout, device, pv.chunk_elems, pv.grid);
  DeviceBuffer d_table(sizeof(Segment) * std::max(n, 1));
  CHECK_CUDA(cudaMemcpy(d_table.ptr, segs.data(), sizeof(Segment) * n,
                        cudaMemcpyHostToDevice));
  cudaError_t err = cudaSuccess;
  Dispatch(in, out, [&](auto ti, auto to) {
    using In = typename decltype(ti)::type;
    using Out = typename decltype(to)::type;
    const Segment* table = static_cast<const Segment*>(d_table.ptr);
    err = is_pack ? LaunchPack<In, Out>(table, n, plan, scale, nullptr)
                  : LaunchUnpack<In, Out>(table, n, plan, nullptr);
  });
  CHECK_CUDA(err);
  CHECK_CUDA(cudaDeviceSynchronize());

  // Reference: poisoned arena with the expected elements written.
  std::vector<uint8_t> want;
  std::vector<uint8_t> got;
  int64_t bad = 0;
  int64_t off = 0;
  if (is_pack) {
    want.assign(h_pack.size(), kPoison);
    for (int i = 0; i < n; ++i) {
      for (int64_t k = 0; k < sizes[i]; ++k) {
        StoreBits(out, &want, guard + shift + off + k,
                  RefCopy(in, out, h_scat, scattered_off[i] + k, scale));
      }
      off += sizes[i];
    }
    got.resize(h_pack.size());
    Download(&got, d_pack);
    bad = Compare("pack", out, got, want, packed_len);
  } else {
    want.assign(h_scat.size(), kPoison);
    for (int i = 0; i < n; ++i) {
      for (int64_t k = 0; k < sizes[i]; ++k) {
        StoreBits(out, &want, scattered_off[i] + k,
                  RefCopy(in, out, h_pack, guard + shift + off + k, 1.0f));
      }
      off += sizes[i];
    }
    got.resize(h_scat.size());
    Download(&got, d_scat);
    bad = Compare("unpack", out, got, want, scattered_len);
  }
  char label[256];
  std::snprintf(label, sizeof(label),
                "%s %s->%s n=%d total=%lld scale=%g plan=%s (chunk=%lld "
                "chunks=%lld grid=%d): %lld bad elements",
                is_pack ? "pack" : "unpack", Name(in), Name(out), n,
                static_cast<long long>(total), scale, pv.name,
                static_cast<long long>(plan.chunk_elems),
                static_cast<long long>(plan.num_chunks), plan.grid,
                static_cast<long long>(bad));
  Record(bad == 0, label);
}

void CheckReduce(DT in, DT out, int num_inputs, int64_t count, float scale,
                 bool coaligned) {
  const int64_t guard = 64;
  const int64_t common_shift = RandInt(0, 7);
  std::vector<int64_t> shifts(num_inputs);
  std::vector<std::vector<uint8_t>> h_in(num_inputs);
  std::vector<DeviceBuffer*> d_in;
  std::vector<const void*> ptrs(num_inputs);
  for (int k = 0; k < num_inputs; ++k) {
    shifts[k] = coaligned ? common_shift : RandInt(0, 7);
    const int64_t len = shifts[k] + count + 8;
    h_in[k].resize(len * Bytes(in));
    FillRandom(in, &h_in[k], len, false);
    if (k == num_inputs - 1 && count > 20) {  // non-finite values propagate
      StoreBits(in, &h_in[k], shifts[k] + 3, FloatToBits(in, NAN));
      StoreBits(in, &h_in[k], shifts[k] + 11, FloatToBits(in, INFINITY));
    }
    d_in.push_back(new DeviceBuffer(h_in[k].size()));
    Upload(*d_in.back(), h_in[k]);
    ptrs[k] = d_in.back()->bytes_at(shifts[k] * Bytes(in));
  }
  // The same element shift as the inputs (all bases are 256-byte aligned, so
  // every buffer reaches a 16-byte boundary at the same index), or random.
  const int64_t out_shift = coaligned ? common_shift : RandInt(0, 7);
  const int64_t out_len = guard + out_shift + count + guard;
  std::vector<uint8_t> h_out(out_len * Bytes(out), kPoison);
  DeviceBuffer d_out(h_out.size());
  Upload(d_out, h_out);
  void* out_ptr = d_out.bytes_at((guard + out_shift) * Bytes(out));

  cudaError_t err = cudaSuccess;
  Dispatch(in, out, [&](auto ti, auto to) {
    using In = typename decltype(ti)::type;
    using Out = typename decltype(to)::type;
    std::vector<const In*> typed(num_inputs);
    for (int k = 0; k < num_inputs; ++k) {
      typed[k] = static_cast<const In*>(ptrs[k]);
    }
    err = LaunchReduce<In, Out>(typed.data(), num_inputs,
                                static_cast<Out*>(out_ptr), count, scale,
                                nullptr);
  });
  CHECK_CUDA(err);
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<uint8_t> want(h_out.size(), kPoison);
  for (int64_t i = 0; i < count; ++i) {
    float acc = LoadF(in, h_in[0], shifts[0] + i);
    for (int k = 1; k < num_inputs; ++k) acc += LoadF(in, h_in[k], shifts[k] + i);
    StoreBits(out, &want, guard + out_shift + i, FloatToBits(out, acc * scale));
  }
  std::vector<uint8_t> got(h_out.size());
  Download(&got, d_out);
  const int64_t bad = Compare("reduce", out, got, want, out_len);
  for (DeviceBuffer* b : d_in) delete b;
  char label[256];
  std::snprintf(label, sizeof(label),
                "reduce %s->%s N=%d count=%lld scale=%g %s: %lld bad elements",
                Name(in), Name(out), num_inputs,
                static_cast<long long>(count), scale,
                coaligned ? "coaligned" : "random-offsets",
                static_cast<long long>(bad));
  Record(bad == 0, label);
}

void RunChecks() {
  for (DT in : kAllTypes) {
    for (DT out : kAllTypes) {
      for (int is_pack = 1; is_pack >= 0; --is_pack) {
        for (const PlanVariant& pv : kPlanVariants) {
          for (float scale : {1.0f, 0.37f}) {
            if (!is_pack && scale != 1.0f) continue;
            std::vector<int64_t> sizes(RandInt(1, 40));
            for (int64_t& s : sizes) s = RandSize();
            CheckCopy(is_pack, in, out, sizes, scale, pv);
          }
        }
        // One segment; one bucket of about 3.5 M elements (auto plan uses the
        // largest chunks); empty segments only.
        CheckCopy(is_pack, in, out, {RandInt(1, 100) * 2 + 1}, 0.5f,
                  kPlanVariants[0]);
        CheckCopy(is_pack, in, out,
                  {1000003, 7, 0, 2500000 + RandInt(0, 16), 1, 24},
                  is_pack ? -3.0f : 1.0f, kPlanVariants[0]);
        CheckCopy(is_pack, in, out, {0, 0, 5, 0}, 2.0f, kPlanVariants[0]);
      }
      for (int n = 1; n <= kMaxReduceInputs; ++n) {
        if (n > 8 && n != 12 && n != kMaxReduceInputs) continue;
        for (bool coaligned : {true, false}) {
          const int64_t count =
              n % 3 == 0 ? RandInt(1, 9) : RandInt(1000, 300001);
          CheckReduce(in, out, n, count, n == 2 ? 1.0f : 1.0f / n, coaligned);
        }
      }
      CheckReduce(in, out, 8, 1 << 22 | 3, 0.125f, true);
    }
  }
  std::printf("CHECKS: %d passed, %d failed\n", tally.passed, tally.failed);
}

// --------------------------------------------------------- benchmarks ---

struct Timer {
  cudaEvent_t start, stop;
  DeviceBuffer flush;
  explicit Timer(size_t flush_bytes) : flush(flush_bytes) {
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
  }
  ~Timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  // One timed run (ms) with the L2 flushed first.
  float Once(const std::function<void()>& fn) {
    static int value = 0;
    CHECK_CUDA(cudaMemsetAsync(flush.ptr, ++value & 0xFF, flush.bytes));
    CHECK_CUDA(cudaEventRecord(start));
    fn();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  }
};

float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

struct Row {
  std::string op, types, layout;
  double mib;
  int segs;
  double kernel_us, gbps, copy_gbps, ratio;
};

int reps = 30;
constexpr int kWarmup = 5;

// Times `fn` (moving `traffic` bytes read + written) against a D2D memcpy of
// traffic / 2 bytes, interleaved; medians of `reps` runs each.
Row TimeAgainstCopy(Timer* timer, const std::function<void()>& fn,
                    int64_t traffic, DeviceBuffer* copy_src,
                    DeviceBuffer* copy_dst) {
  const size_t copy_bytes = static_cast<size_t>(traffic / 2);
  auto copy = [&]() {
    CHECK_CUDA(cudaMemcpyAsync(copy_dst->ptr, copy_src->ptr, copy_bytes,
                               cudaMemcpyDeviceToDevice));
  };
  for (int i = 0; i < kWarmup; ++i) {
    fn();
    copy();
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaGetLastError());
  std::vector<float> tk, tc;
  for (int r = 0; r < reps; ++r) {
    tk.push_back(timer->Once(fn));
    tc.push_back(timer->Once(copy));
  }
  CHECK_CUDA(cudaGetLastError());
  Row row;
  const double mk = Median(tk), mc = Median(tc);
  row.kernel_us = mk * 1e3;
  row.gbps = traffic / (mk * 1e-3) / 1e9;
  row.copy_gbps = 2.0 * copy_bytes / (mc * 1e-3) / 1e9;
  row.ratio = row.gbps / row.copy_gbps;
  return row;
}

// Segment sizes summing to `total`: log-uniform between 256 and 4 M
// elements, rounded to multiples of 8 ("aligned") or made odd ("odd").
std::vector<int64_t> BucketSizes(int64_t total, bool aligned) {
  std::vector<int64_t> sizes;
  int64_t left = total;
  std::uniform_real_distribution<double> u(std::log(256.0), std::log(4.0e6));
  while (left > 0) {
    int64_t s = static_cast<int64_t>(std::exp(u(rng)));
    s = aligned ? (s + 7) / 8 * 8 : (s | 1);
    s = std::min(s, left);
    sizes.push_back(s);
    left -= s;
  }
  return sizes;
}

std::vector<Row> rows;

void BenchCopy(Timer* timer, bool is_pack, DT in, DT out, double mib,
               bool aligned, DeviceBuffer* scratch_a, DeviceBuffer* scratch_b,
               const PlanVariant* pv = nullptr, bool with_upload = false,
               std::vector<Row>* sink = nullptr) {
  const int64_t total =
      static_cast<int64_t>(mib * (1 << 20)) / static_cast<int64_t>(Bytes(in));
  const std::vector<int64_t> sizes = BucketSizes(total, aligned);
  const int n = static_cast<int>(sizes.size());
  // Scattered tensors, each at a 256-byte aligned address (as an allocator
  // gives them), in scratch_a; the packed buffer in scratch_b.
  const DT scattered_t = is_pack ? in : out;
  std::vector<void*> ptrs(n);
  size_t off = 0;
  for (int i = 0; i < n; ++i) {
    ptrs[i] = scratch_a->bytes_at(off);
    off += (sizes[i] * Bytes(scattered_t) + 255) / 256 * 256;
  }
  if (off > scratch_a->bytes) {
    std::fprintf(stderr, "scratch too small\n");
    std::exit(2);
  }
  std::vector<Segment> segs(n);
  if (is_pack) {
    std::vector<const void*> srcs(ptrs.begin(), ptrs.end());
    FillPackSegments(srcs.data(), sizes.data(), n, scratch_b->ptr, Bytes(out),
                     segs.data());
  } else {
    FillUnpackSegments(scratch_b->ptr, Bytes(in), ptrs.data(), sizes.data(), n,
                       segs.data());
  }
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  const CopyPlan plan =
      PlanSegments(segs.data(), n, Bytes(in), Bytes(out), device,
                   pv ? pv->chunk_elems : 0, pv ? pv->grid : 0);
  DeviceBuffer d_table(sizeof(Segment) * n);
  CHECK_CUDA(cudaMemcpy(d_table.ptr, segs.data(), sizeof(Segment) * n,
                        cudaMemcpyHostToDevice));
  const float scale = is_pack ? 0.5f : 1.0f;
  std::function<void()> fn;
  Dispatch(in, out, [&](auto ti, auto to) {
    using In = typename decltype(ti)::type;
    using Out = typename decltype(to)::type;
    const Segment* table = static_cast<const Segment*>(d_table.ptr);
    const Segment* host = segs.data();
    fn = [=]() {
      if (with_upload) {  // what an adapter does per call: pageable H2D copy
        CHECK_CUDA(cudaMemcpyAsync(const_cast<Segment*>(table), host,
                                   sizeof(Segment) * n,
                                   cudaMemcpyHostToDevice));
      }
      CHECK_CUDA(is_pack ? LaunchPack<In, Out>(table, n, plan, scale, nullptr)
                         : LaunchUnpack<In, Out>(table, n, plan, nullptr));
    };
  });
  const int64_t traffic = total * static_cast<int64_t>(Bytes(in) + Bytes(out));
  Row row = TimeAgainstCopy(timer, fn, traffic, scratch_a, scratch_b);
  row.op = std::string(is_pack ? "pack" : "unpack") +
           (with_upload ? "+H2D-table" : "");
  row.types = std::string(Name(in)) + "->" + Name(out);
  row.layout = aligned ? "aligned" : "odd";
  if (pv) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "c%lld/g%d", (long long)plan.chunk_elems,
                  plan.grid);
    row.layout += std::string(" ") + buf;
  }
  row.mib = mib;
  row.segs = n;
  (sink ? sink : &rows)->push_back(row);
}

void BenchReduce(Timer* timer, DT in, DT out, int num_inputs, double mib,
                 DeviceBuffer* scratch_a, DeviceBuffer* scratch_b) {
  const int64_t count =
      static_cast<int64_t>(mib * (1 << 20)) / static_cast<int64_t>(Bytes(in));
  const size_t per_input = (count * Bytes(in) + 255) / 256 * 256;
  std::function<void()> fn;
  Dispatch(in, out, [&](auto ti, auto to) {
    using In = typename decltype(ti)::type;
    using Out = typename decltype(to)::type;
    std::vector<const In*> inputs(num_inputs);
    for (int k = 0; k < num_inputs; ++k) {
      inputs[k] = reinterpret_cast<const In*>(scratch_a->bytes_at(k * per_input));
    }
    Out* output = static_cast<Out*>(scratch_b->ptr);
    fn = [=]() {
      CHECK_CUDA(LaunchReduce<In, Out>(inputs.data(), num_inputs, output, count,
                                       1.0f / num_inputs, nullptr));
    };
  });
  const int64_t traffic =
      count * static_cast<int64_t>(num_inputs * Bytes(in) + Bytes(out));
  Row row = TimeAgainstCopy(timer, fn, traffic, scratch_a, scratch_b);
  row.op = "reduce";
  row.types = std::string(Name(in)) + "->" + Name(out);
  row.layout = "N=" + std::to_string(num_inputs);
  row.mib = mib;
  row.segs = num_inputs;
  rows.push_back(row);
}

void PrintRows(const std::vector<Row>& rs) {
  std::printf("%-17s %-10s %-16s %7s %5s %10s %9s %11s %6s\n", "op", "types",
              "layout", "MiB", "segs", "kernel_us", "GB/s", "memcpy_GB/s",
              "ratio");
  for (const Row& r : rs) {
    std::printf("%-17s %-10s %-16s %7.1f %5d %10.2f %9.1f %11.1f %6.3f\n",
                r.op.c_str(), r.types.c_str(), r.layout.c_str(), r.mib, r.segs,
                r.kernel_us, r.gbps, r.copy_gbps, r.ratio);
  }
}

void RunBench(bool tune) {
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  const size_t flush_bytes =
      std::max<size_t>(256u << 20, 4 * static_cast<size_t>(prop.l2CacheSize));
  Timer timer(flush_bytes);
  // Room for 100 MiB of float32 elements scattered at 256-byte alignment,
  // and for 8 reduce inputs of 25 MiB.
  DeviceBuffer a(size_t(240) << 20);
  DeviceBuffer b(size_t(240) << 20);
  CHECK_CUDA(cudaMemset(a.ptr, 0x3C, a.bytes));  // finite in every type
  CHECK_CUDA(cudaMemset(b.ptr, 0x3C, b.bytes));

  if (tune) {
    std::vector<Row> tuned;
    const int resident = ResidentBlocks(device);
    const std::pair<DT, DT> pairs[] = {{DT::kF32, DT::kF32},
                                       {DT::kF32, DT::kF16},
                                       {DT::kF16, DT::kF16},
                                       {DT::kBF16, DT::kF32}};
    for (double mib : {4.0, 25.0, 100.0}) {
      for (const auto& pr : pairs) {
        const int64_t def = DefaultChunkElems(Bytes(pr.first), Bytes(pr.second));
        for (int64_t chunk : {def / 2, def, 2 * def}) {
          for (int grid : {2 * resident, 1 << 30}) {
            PlanVariant pv = {chunk, grid, ""};
            BenchCopy(&timer, true, pr.first, pr.second, mib, true, &a, &b,
                      &pv, false, &tuned);
          }
        }
      }
    }
    std::printf("\n== tuning: pack, chunk elements c / grid blocks g "
                "(resident blocks %d) ==\n", resident);
    PrintRows(tuned);
  }

  for (double mib : {1.0, 4.0, 25.0, 100.0}) {
    for (DT in : kAllTypes) {
      for (DT out : kAllTypes) {
        if (mib == 1.0 && !(in == DT::kF32 && out != DT::kBF16)) continue;
        BenchCopy(&timer, true, in, out, mib, true, &a, &b);
      }
    }
  }
  for (double mib : {1.0, 4.0, 25.0, 100.0}) {
    for (DT in : kAllTypes) {
      for (DT out : kAllTypes) {
        if (mib == 1.0 && !(in != DT::kBF16 && out == DT::kF32)) continue;
        BenchCopy(&timer, false, in, out, mib, true, &a, &b);
      }
    }
  }
  for (double mib : {4.0, 25.0}) {
    BenchCopy(&timer, true, DT::kF32, DT::kF32, mib, false, &a, &b);
    BenchCopy(&timer, true, DT::kF32, DT::kBF16, mib, false, &a, &b);
    BenchCopy(&timer, false, DT::kF32, DT::kF32, mib, false, &a, &b);
    BenchCopy(&timer, false, DT::kBF16, DT::kF32, mib, false, &a, &b);
    BenchCopy(&timer, true, DT::kF16, DT::kF16, mib, false, &a, &b);
  }
  for (double mib : {4.0, 25.0}) {
    BenchCopy(&timer, true, DT::kF32, DT::kF32, mib, true, &a, &b, nullptr,
              true);
  }
  const std::pair<DT, DT> reduce_pairs[] = {{DT::kF32, DT::kF32},
                                            {DT::kF16, DT::kF16},
                                            {DT::kBF16, DT::kBF16},
                                            {DT::kBF16, DT::kF32},
                                            {DT::kF32, DT::kBF16}};
  for (const auto& pr : reduce_pairs) {
    for (int nin : {2, 4, 8}) {
      BenchReduce(&timer, pr.first, pr.second, nin, 25.0, &a, &b);
    }
  }
  BenchReduce(&timer, DT::kF32, DT::kF32, 2, 4.0, &a, &b);
  BenchReduce(&timer, DT::kF32, DT::kF32, 8, 4.0, &a, &b);

  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::printf("\n== %s: %d SMs, L2 %d MiB, driver %d, runtime %d; "
              "medians of %d runs after %d warm-up, L2 flushed before each; "
              "GB/s = (bytes read + written) / time; ratio = vs cudaMemcpy "
              "D2D of the same traffic ==\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20,
              driver, runtime, reps, kWarmup);
  PrintRows(rows);
  double worst = 1e9;
  for (const Row& r : rows) {
    if ((r.op == "pack" || r.op == "unpack") && r.layout == "aligned" &&
        r.mib >= 4.0) {
      worst = std::min(worst, r.ratio);
    }
  }
  std::printf("TARGET pack/unpack >= 0.85x memcpy for buckets >= 4 MiB "
              "(aligned layout): %s (lowest ratio %.4f)\n",
              worst >= 0.85 ? "MET" : "MISSED", worst);
}

// CPU only: the reference conversions against cuda_fp16.h / cuda_bf16.h host
// code on a stride through every float bit pattern and every 16-bit pattern.
int HostSelfTest() {
  int64_t bad = 0;
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 997) {
    const float f = BitsFloat(static_cast<uint32_t>(u));
    const __half h = __float2half_rn(f);
    const __nv_bfloat16 b = __float2bfloat16_rn(f);
    uint16_t hb, bb;
    std::memcpy(&hb, &h, 2);
    std::memcpy(&bb, &b, 2);
    const uint16_t mh = FloatToHalfBits(f), mb = FloatToBf16Bits(f);
    const bool nan = std::isnan(f);
    if ((nan && !IsNanBits(DT::kF16, hb)) || (!nan && hb != mh) ||
        (nan && !IsNanBits(DT::kBF16, bb)) || (!nan && bb != mb)) {
      if (bad < 5) {
        std::printf("conv mismatch f=0x%08x half %04x/%04x bf16 %04x/%04x\n",
                    static_cast<uint32_t>(u), hb, mh, bb, mb);
      }
      ++bad;
    }
  }
  for (uint32_t v = 0; v <= 0xFFFF; ++v) {
    const uint16_t s = static_cast<uint16_t>(v);
    __half_raw hr;
    __nv_bfloat16_raw br;
    hr.x = s;
    br.x = s;
    const __half h(hr);
    const __nv_bfloat16 b(br);
    const float fh = __half2float(h), fb = __bfloat162float(b);
    const float mh = HalfBitsToFloat(s), mb = Bf16BitsToFloat(s);
    if (!((std::isnan(fh) && std::isnan(mh)) || FloatBits(fh) == FloatBits(mh)) ||
        !((std::isnan(fb) && std::isnan(mb)) || FloatBits(fb) == FloatBits(mb))) {
      if (bad < 5) std::printf("widen mismatch 0x%04x\n", v);
      ++bad;
    }
  }
  std::printf("HOST SELFTEST: %lld mismatches\n", static_cast<long long>(bad));
  return bad == 0 ? 0 : 1;
}

}  // namespace
}  // namespace harness
}  // namespace gpu
}  // namespace smdist

int main(int argc, char** argv) {
  namespace h = smdist::gpu::harness;
  bool bench = true, tune = false, checks = true;
  uint64_t seed = std::random_device{}();
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--host-selftest") return h::HostSelfTest();
    if (arg == "--no-bench") {
      bench = false;
    } else if (arg == "--bench-only") {
      checks = false;
    } else if (arg == "--tune") {
      tune = true;
    } else if (arg == "--seed" && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--reps" && i + 1 < argc) {
      h::reps = std::max(20, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr,
                   "usage: %s [--seed N] [--reps N>=20] [--no-bench | --bench-only] "
                   "[--tune] "
                   "| --host-selftest\n", argv[0]);
      return 2;
    }
  }
  h::rng.seed(seed);
  int count = 0;
  CHECK_CUDA(cudaGetDeviceCount(&count));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device 0: %s (sm_%d%d), seed %llu\n", prop.name, prop.major,
              prop.minor, static_cast<unsigned long long>(seed));
  if (checks) h::RunChecks();
  if (bench) h::RunBench(tune);
  if (h::tally.failed) {
    std::printf("RESULT: FAILED (%d checks failed)\n", h::tally.failed);
    return 1;
  }
  std::printf("RESULT: all %d checks passed\n", h::tally.passed);
  return 0;
}
