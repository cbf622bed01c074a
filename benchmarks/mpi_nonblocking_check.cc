// Is Open MPI's non-blocking all-reduce, polled with MPI_Test as the
// communication thread polls it, slower than the blocking MPI_Allreduce?
// One thread per rank, no TensorFlow. Rows (per round, times per call):
//   blocking in place          MPI_Allreduce(MPI_IN_PLACE, buf)   the reference
//   non-blocking in place      MPI_Iallreduce(MPI_IN_PLACE, buf) + MPI_Test loop
//   non-blocking out of place  MPI_Iallreduce(a -> b) + MPI_Test loop, the two
//                              buffers swapped every call (each call reduces
//                              the previous result, as a chain of ops does)
//   sanity                     blocking in place again (no gain is possible)
// The non-blocking algorithm is the ring the engine selects
// (OMPI_MCA_coll_libnbc_iallreduce_algorithm=1, unless set).
//
// Build and run:
//   mpicxx -O2 -std=c++17 benchmarks/mpi_nonblocking_check.cc -o /tmp/nbc_check
//   mpirun -np 2 /tmp/nbc_check BYTES [CALLS] [ROUNDS]
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

enum Mode { kBlocking, kNonBlockingInPlace, kNonBlockingOutOfPlace, kSanity, kModes };

const char* const kNames[kModes] = {"blocking in place", "non-blocking in place",
                                    "non-blocking out of place", "sanity: blocking again"};

void Wait(MPI_Request* request) {
  int done = 0;
  while (!done) MPI_Test(request, &done, MPI_STATUS_IGNORE);
}

double TimeCalls(Mode mode, std::vector<float>& a, std::vector<float>& b, int calls) {
  const int n = static_cast<int>(a.size());
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = MPI_Wtime();
  for (int i = 0; i < calls; ++i) {
    if (i % 16 == 0) {  // keep the sums finite
      std::fill(a.begin(), a.end(), 1.0f);
      std::fill(b.begin(), b.end(), 1.0f);
    }
    float* in = (i % 2) ? b.data() : a.data();
    float* out = (i % 2) ? a.data() : b.data();
    MPI_Request request;
    switch (mode) {
      case kBlocking:
      case kSanity:
        MPI_Allreduce(MPI_IN_PLACE, a.data(), n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        break;
      case kNonBlockingInPlace:
        MPI_Iallreduce(MPI_IN_PLACE, a.data(), n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                       &request);
        Wait(&request);
        break;
      case kNonBlockingOutOfPlace:
        MPI_Iallreduce(in, out, n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &request);
        Wait(&request);
        break;
      case kModes:
        break;
    }
  }
  return (MPI_Wtime() - start) / calls * 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", 0);
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const long bytes = argc > 1 ? atol(argv[1]) : (1L << 20);
  const int calls = argc > 2 ? atoi(argv[2]) : 200;
  const int rounds = argc > 3 ? atoi(argv[3]) : 5;
  std::vector<float> a(std::max<long>(1, bytes / 4), 1.0f), b(a.size(), 1.0f);
  std::vector<std::vector<double>> ms(kModes);
  for (int round = 0; round < rounds; ++round) {
    for (int mode = 0; mode < kModes; ++mode) {  // interleaved rounds
      ms[mode].push_back(TimeCalls(static_cast<Mode>(mode), a, b, calls));
    }
  }
  if (rank == 0) {
    std::vector<double> median(kModes);
    for (int mode = 0; mode < kModes; ++mode) {
      std::vector<double> v = ms[mode];
      std::sort(v.begin(), v.end());
      median[mode] = v[v.size() / 2];
    }
    std::printf("%ld bytes, medians of %d rounds of %d calls\n", bytes, rounds, calls);
    for (int mode = 0; mode < kModes; ++mode) {
      std::printf("  %-26s %.4f ms  %.2fx the blocking call\n", kNames[mode], median[mode],
                  median[mode] / median[kBlocking]);
    }
  }
  MPI_Finalize();
  return 0;
}
