// Plain C entry points of the Horovod-compatible engine for the Python
// control plane (start, process sets, counters, shutdown), loaded through
// ctypes from the MPI op library.
#include <cstring>
#include <string>
#include <vector>

#include "kernels/mpi/negotiator.h"

namespace {

int Report(const smdist::mpi::Status& s, char* err, int err_len) {
  if (!s.ok() && err != nullptr && err_len > 0) {
    std::strncpy(err, s.message.c_str(), static_cast<size_t>(err_len) - 1);
    err[err_len - 1] = '\0';
  }
  return static_cast<int>(s.code);
}

}  // namespace

extern "C" {

int smdist_hvd_init(double cycle_time_s, long long fusion_threshold, double stall_timeout_s,
                    double stall_warning_s, char* err, int err_len) {
  smdist::hvd::NegotiatorOptions options;
  options.cycle_time_s = cycle_time_s;
  options.fusion_threshold = fusion_threshold;
  options.stall_timeout_s = stall_timeout_s;
  options.stall_warning_s = stall_warning_s;
  return Report(smdist::hvd::Engine::Get().Init(options), err, err_len);
}

int smdist_hvd_initialized() { return smdist::hvd::Engine::Get().initialized() ? 1 : 0; }

int smdist_hvd_add_process_set(const int* ranks, int n, int* id, char* err, int err_len) {
  std::vector<int> list(ranks, ranks + n);
  return Report(smdist::hvd::Engine::Get().AddProcessSet(list, id), err, err_len);
}

int smdist_hvd_remove_process_set(int id, char* err, int err_len) {
  return Report(smdist::hvd::Engine::Get().RemoveProcessSet(id), err, err_len);
}

// Writes cycles, executions, fused executions, fused tensors, mismatches and
// stalls of set `id` to out[0..5]; returns 0, or -1 when this rank has no
// such set.
int smdist_hvd_counters(int id, long long* out) {
  auto set = smdist::hvd::Engine::Get().Find(id);
  if (set == nullptr) return -1;
  smdist::hvd::Counters c = set->counters();
  out[0] = c.cycles;
  out[1] = c.executions;
  out[2] = c.fused_executions;
  out[3] = c.fused_tensors;
  out[4] = c.mismatches;
  out[5] = c.stalls;
  return 0;
}

int smdist_hvd_shutdown(char* err, int err_len) {
  return Report(smdist::hvd::Engine::Get().Shutdown(), err, err_len);
}

}  // extern "C"
