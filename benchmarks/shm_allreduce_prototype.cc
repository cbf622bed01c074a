// A shared-memory all-reduce prototype against blocking MPI_Allreduce, in C++
// outside TensorFlow (the README's all-reduce section reports what it found;
// the engine does not use it). Each rank copies its input into its own slot
// of a shared window (two slots, alternating, so one chunk's copies overlap
// the peers' reads of the previous one), sums its 1/n-th of every rank's
// slot, publishes that, and copies the other ranks' sums back; release/acquire
// counters order the phases. float32 sums, in place.
//
//   mpicxx -O3 -std=c++17 benchmarks/shm_allreduce_prototype.cc -o /tmp/shm_proto
//   mpirun -np 2 /tmp/shm_proto BYTES [CHUNK_BYTES]
//
// Prints, three times, the milliseconds per call of each and their ratio,
// with a sanity row (MPI_Allreduce timed again against itself), then whether
// the prototype's sums are exact.
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <sched.h>

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Per-rank counters, each on its own cache line: the last chunk number this
// rank copied in, summed its part of, and finished reading.
struct alignas(64) Counters {
  alignas(64) std::atomic<int64_t> arrived;
  alignas(64) std::atomic<int64_t> reduced;
  alignas(64) std::atomic<int64_t> done;
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  if (argc < 2) {
    if (rank == 0) std::fprintf(stderr, "usage: %s BYTES [CHUNK_BYTES]\n", argv[0]);
    MPI_Finalize();
    return 2;
  }
  const int64_t count = std::atoll(argv[1]) / 4;
  const int64_t chunk_bytes = argc > 2 ? std::atoll(argv[2]) : (1 << 20);
  const int64_t chunk = chunk_bytes / 4;
  const size_t header = 4096;  // keeps the slots page aligned
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  MPI_Win win;
  char* base = nullptr;
  MPI_Win_allocate_shared(static_cast<MPI_Aint>(header + 2 * chunk_bytes), 4096, MPI_INFO_NULL,
                          node, &base, &win);
  std::vector<char*> segs(n);
  for (int k = 0; k < n; ++k) {
    MPI_Aint size = 0;
    int disp = 0;
    MPI_Win_shared_query(win, k, &size, &disp, &segs[k]);
  }
  Counters* mine = new (base) Counters();
  mine->arrived.store(0);
  mine->reduced.store(0);
  mine->done.store(0);
  MPI_Barrier(MPI_COMM_WORLD);

  auto counters = [&](int k) { return reinterpret_cast<Counters*>(segs[k]); };
  auto slot = [&](int k, int64_t s) {
    return reinterpret_cast<float*>(segs[k] + header + (s & 1) * chunk_bytes);
  };
  auto wait_all = [&](std::atomic<int64_t> Counters::*field, int64_t at_least) {
    for (int k = 0; k < n; ++k) {
      while ((counters(k)->*field).load(std::memory_order_acquire) < at_least) sched_yield();
    }
  };
  int64_t seq = 0;
  std::vector<float*> src(n);
  auto allreduce = [&](float* x, int64_t total) {
    for (int64_t at = 0; at < total; at += chunk) {
      const int64_t m = std::min(chunk, total - at);
      ++seq;
      if (seq > 2) wait_all(&Counters::done, seq - 2);  // the slot is free again
      float* own = slot(rank, seq);
      std::memcpy(own, x + at, m * 4);
      mine->arrived.store(seq, std::memory_order_release);
      wait_all(&Counters::arrived, seq);
      const int64_t lo = m * rank / n, hi = m * (rank + 1) / n;
      for (int k = 0; k < n; ++k) src[k] = slot(k, seq);
      float* out = x + at;
      for (int64_t i = lo; i < hi; ++i) {
        float s = src[0][i];
        for (int k = 1; k < n; ++k) s += src[k][i];
        out[i] = s;
        own[i] = s;
      }
      mine->reduced.store(seq, std::memory_order_release);
      for (int k = 0; k < n; ++k) {
        if (k == rank) continue;
        while (counters(k)->reduced.load(std::memory_order_acquire) < seq) sched_yield();
        const int64_t l = m * k / n, h = m * (k + 1) / n;
        std::memcpy(out + l, slot(k, seq) + l, (h - l) * 4);
      }
      mine->done.store(seq, std::memory_order_release);
    }
  };

  std::vector<float> buf(count, 1.0f);
  const int64_t bytes = count * 4;
  const int iters = bytes >= (16 << 20) ? 20 : bytes >= (1 << 20) ? 200 : 2000;
  auto time_mpi = [&]() {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t = Now();
    for (int i = 0; i < iters; ++i) {
      MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                    MPI_COMM_WORLD);
    }
    return (Now() - t) / iters;
  };
  for (int round = 0; round < 3; ++round) {
    MPI_Barrier(MPI_COMM_WORLD);
    double t = Now();
    for (int i = 0; i < iters; ++i) allreduce(buf.data(), count);
    const double shm = (Now() - t) / iters;
    const double mpi = time_mpi();
    const double mpi_again = time_mpi();  // sanity: against itself, no gain possible
    if (rank == 0) {
      std::printf(
          "bytes %lld: shared memory %.4f ms, MPI_Allreduce %.4f ms, ratio %.2f; "
          "sanity: MPI_Allreduce again %.4f ms, ratio %.2f\n",
          static_cast<long long>(bytes), shm * 1e3, mpi * 1e3, shm / mpi, mpi_again * 1e3,
          mpi_again / mpi);
    }
  }
  // Exactness: rank r holds r + 1 + (i mod 7); the sums are small integers.
  std::vector<float> v(count);
  for (int64_t i = 0; i < count; ++i) v[i] = static_cast<float>(rank + 1 + i % 7);
  allreduce(v.data(), count);
  bool ok = true;
  for (int64_t i = 0; i < count && ok; ++i) {
    ok = v[i] == static_cast<float>(n * (n + 1) / 2 + n * (i % 7));
  }
  if (rank == 0) std::printf("exact: %s\n", ok ? "yes" : "NO");
  MPI_Barrier(MPI_COMM_WORLD);
  MPI_Win_free(&win);
  MPI_Comm_free(&node);
  MPI_Finalize();
  return ok ? 0 : 1;
}
