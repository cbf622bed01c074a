// Name-matched collectives (Horovod semantics) over the MPI communication
// thread (comm.h). Framework-free.
//
// Callers (the TensorFlow kernels) hand a Negotiator named requests in any
// order. Each process set runs negotiation cycles, one at a time: every
// member gathers every member's announcements of the requests it received
// since the last cycle, so each holds the same table of pending names and
// computes the same decisions, in the same order, with no coordinator:
//   * a name issued on every member (or on every member that has not joined)
//     is ready; ready names are taken in the order they were first announced
//     (cycle, then rank, then the rank's own order);
//   * a ready name whose members disagree (collective, dtype, shape, reduce
//     op, root, scale factors) fails on every member with an error that lists
//     each rank's value;
//   * consecutive ready all-reduces of one dtype and reduce op are fused into
//     one buffer of at most the fusion threshold;
//   * a name pending for longer than the stall warning time makes the set's
//     rank 0 print a warning naming it and the ranks that have not issued
//     it; one pending for longer than the stall timeout (the clock of the
//     set's rank 0 decides, and announces it) stalls the set: every member
//     fails every collective it has pending (the stalled ones and those
//     that wait behind them) with an error naming the stalled names and the
//     ranks that did and did not issue them, and the set stays usable.
// Decided collectives are queued, in decision order, on a data ordering group
// of the set's communicator (arrival order). A cycle runs on the
// communication thread (a posted task; its gather is a non-blocking request
// like any other, and the decision runs in that request's completion), so a
// collective passes between threads only where TensorFlow hands it over and
// takes its result back. The set's own thread only paces the cycles that
// wait for the cycle time, and drains the set on Stop. No code here calls
// MPI: it only queues requests on the communication thread.
//
// A member enters a cycle when it has new requests, or when the previous
// cycle left names pending (the same on every member, so all continue
// together, and the stall timeout covers every name that some member issued
// while the others went on issuing other collectives). An idle member costs
// nothing; a member whose peers issue no collective at all waits inside the
// cycle's gather, and the communication thread's watchdog (its timeout)
// names both the waiting tensors and the ranks that did not come.
#ifndef TF_SMDIST_KERNELS_MPI_NEGOTIATOR_H_
#define TF_SMDIST_KERNELS_MPI_NEGOTIATOR_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels/mpi/comm.h"

namespace smdist {
namespace hvd {

enum class OpType : int {
  kAllreduce = 0,
  kAllgather = 1,
  kBroadcast = 2,
  kAlltoall = 3,
  kReducescatter = 4,
  kBarrier = 5,
  kJoin = 6,
};

// Horovod's reduce op numbers.
enum class ReduceOp : int {
  kAverage = 0,
  kSum = 1,
  kAdasum = 2,
  kMin = 3,
  kMax = 4,
  kProduct = 5,
};

// The name every rank's join request carries.
constexpr char kJoinName[] = "__smdist_join__";

const char* OpTypeName(OpType type);
const char* ReduceOpName(ReduceOp op);

// Allocates the output(s) once their shape is known (allgather, alltoall,
// reduce-scatter). `recv_splits` is the alltoall's rows received from each
// rank. Sets `*data` to the output buffer. Called on the communication
// thread.
using AllocateFn = std::function<mpi::Status(const std::vector<int64_t>& shape,
                                             const std::vector<int64_t>& recv_splits,
                                             void** data)>;
// Completion: status and, for join, the rank (of the set) that joined last.
// Called on the communication thread, or, when the set stops or the
// communication thread cannot take the cycle, on the caller's or the set's
// own thread.
using EntryDoneFn = std::function<void(const mpi::Status& status, int join_rank)>;

// One named request of this rank.
struct Entry {
  std::string name;
  OpType type = OpType::kAllreduce;
  mpi::DataType dtype = mpi::DataType::kFloat32;
  std::vector<int64_t> shape;
  ReduceOp reduce_op = ReduceOp::kSum;  // allreduce / reduce-scatter
  double prescale = 1.0;   // checked across ranks; applied by the caller
  double postscale = 1.0;  // checked across ranks; applied by the caller
  int root = 0;            // broadcast: a rank of the set
  std::vector<int64_t> splits;  // alltoall: rows sent to each rank of the set
  // allreduce: this rank's values (prescaled) are in `input`, or in `output`
  // when `input` is nullptr, and the result goes to `output`; broadcast: the
  // buffer broadcast in place; allgather / alltoall / reduce-scatter: `input`
  // is sent and `allocate` provides the output.
  const void* input = nullptr;
  void* output = nullptr;
  AllocateFn allocate;
  EntryDoneFn done;
};

// Where an all-reduce entry's own values are: `input`, else `output`.
inline const void* AllreduceValues(const Entry& e) {
  return e.input != nullptr ? e.input : e.output;
}

struct NegotiatorOptions {
  double cycle_time_s = 0.001;          // pause between cycles
  int64_t fusion_threshold = 64 << 20;  // bytes; 0 disables fusion
  double stall_timeout_s = 60.0;        // a name pending longer stalls the set
  double stall_warning_s = 30.0;        // a name pending longer is reported; 0: never
};

// Debug counters of one process set.
struct Counters {
  int64_t cycles = 0;
  int64_t executions = 0;        // collectives queued on the data group
  int64_t fused_executions = 0;  // all-reduces that carried > 1 tensor
  int64_t fused_tensors = 0;     // tensors carried by those
  int64_t mismatches = 0;
  int64_t stalls = 0;
};

class Negotiator {
 public:
  // `comm` is the communicator (0: the world), with `rank` and `size` this
  // rank's place in it; `nego_group` and `data_group` are two ordering
  // groups of `comm` reserved for this negotiator.
  Negotiator(int comm, int nego_group, int data_group, int rank, int size,
             const NegotiatorOptions& options);
  ~Negotiator();
  Negotiator(const Negotiator&) = delete;
  Negotiator& operator=(const Negotiator&) = delete;

  // Queues `entry`. Fails (without calling `entry.done`) when a request of
  // the same name is still pending on this rank, or after Stop.
  mpi::Status Enqueue(Entry entry);
  // Queues several entries at once: they are announced in the same cycle.
  mpi::Status EnqueueGroup(std::vector<Entry> entries);
  // Finishes the names pending on every member, fails local requests that
  // can no longer complete, and joins the thread.
  void Stop();

  // "<kind>.eager.<n>": the name of this rank's n-th unnamed request of
  // `kind` (eager calls, in program order, so the same on every rank).
  std::string EagerName(const char* kind);

  int rank() const { return rank_; }
  int size() const { return size_; }
  Counters counters() const;

 private:
  struct Meta;
  struct Pending;
  struct NameSet;
  using ExchangeDone =
      std::function<void(const mpi::Status&, const std::vector<std::string>&)>;
  void Loop();
  // Starts a cycle on the communication thread; the caller set cycle_active_.
  void PostCycle();
  void RunCycle();  // one negotiation cycle (communication thread)
  void EndCycle(const mpi::Status& s, const std::vector<std::string>& records, double now);
  void Exchange(std::string mine, ExchangeDone then);
  void Decide(const std::vector<std::string>& records, double now);
  void Execute(const std::vector<std::string>& names);
  void FailLocal(const std::string& name, const mpi::Status& status);
  void FailAll(const mpi::Status& status);
  std::string CheckMismatch(const std::string& name, const Pending& p) const;
  // "<collective> of tensor '<name>' issued by ranks .. is waiting for ranks
  // .., which did not issue it".
  std::string Describe(const std::string& name, const Pending& p) const;

  const int comm_;
  const int nego_group_;
  const int data_group_;
  const int rank_;
  const int size_;
  const NegotiatorOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Entry> incoming_;
  // Names pending on this rank; shared with completion callbacks, which may
  // run after the negotiator is gone.
  std::shared_ptr<NameSet> names_;
  bool stop_ = false;
  bool failed_ = false;
  mpi::Status failure_;
  Counters counters_;
  std::map<std::string, int64_t> eager_counts_;
  // Under mu_: a cycle is posted or running. The thread that sets it owns
  // local_, table_, next_order_ and cycle_ until the cycle's end clears it
  // (one cycle at a time, so they need no lock of their own).
  bool cycle_active_ = false;
  bool table_pending_ = false;  // table_ held names after the last cycle
  double last_start_ = -1e9;    // when the last cycle began (Now())

  // The running cycle only (see cycle_active_).
  std::map<std::string, Entry> local_;          // announced, not finished
  std::map<std::string, std::unique_ptr<Pending>> table_;  // same on every member
  int64_t next_order_ = 0;
  int64_t cycle_ = 0;
  std::thread thread_;
};

// Process sets: id 0 is the world; others are made by AddProcessSet.
class Engine {
 public:
  static Engine& Get();
  // Idempotent. Needs the communication thread (Communicator::Init).
  mpi::Status Init(const NegotiatorOptions& options);
  bool initialized() const;
  // Every rank of the world calls it in the same order with the same ranks.
  // Sets `*id` (the same on every rank); this rank may not be a member. As
  // in Horovod, the ids of removed sets are given out again, oldest first.
  mpi::Status AddProcessSet(const std::vector<int>& ranks, int* id);
  mpi::Status RemoveProcessSet(int id);
  // The negotiator of set `id` on this rank, or null (unknown id, or this
  // rank is not a member, or not initialised).
  std::shared_ptr<Negotiator> Find(int id) const;
  // Stops every negotiator (idempotent).
  mpi::Status Shutdown();

 private:
  Engine() = default;
  mutable std::mutex mu_;
  std::mutex create_mu_;  // AddProcessSet: one at a time
  bool initialized_ = false;
  NegotiatorOptions options_;
  int next_id_ = 1;
  std::deque<int> free_ids_;  // removed sets' ids, in removal order
  std::map<int, std::shared_ptr<Negotiator>> sets_;  // members only
  std::map<int, int> comms_;                          // set id -> comm id
};

}  // namespace hvd
}  // namespace smdist

#endif  // TF_SMDIST_KERNELS_MPI_NEGOTIATOR_H_
