// Framework-free MPI communication thread for tf_smdist.
//
// One background thread per process owns every MPI call (MPI is initialised
// on it with MPI_THREAD_FUNNELED, so no other thread ever enters MPI). Callers
// enqueue requests; the thread starts them as non-blocking collectives in a
// fixed order and polls them with MPI_Test, so that it can also
//   * run collectives of several independent groups at once (each group has
//     its own duplicated communicator, so their orders never interfere),
//   * send heartbeats round a ring of the ranks (heartbeat.h), and
//   * enforce a deadline: a collective that does not complete in time fails
//     with an error naming the rank(s) that are dead, stopped or late.
//
// Ordering: inside a group, requests carry an index in [0, group_size) and
// are started strictly in index order, cycling (the bucket plan's order, which
// is the same on every rank, so no negotiation round is needed). A group of
// size 1 is started in arrival order.
//
// Communicators: `comm` 0 is the world. CreateComm makes a communicator over
// a subset of the world's ranks (a pipeline stage's data-parallel group, a
// Horovod process set); it has its own ordering groups (kMaxSubGroups of
// them), so its collectives never interfere with the world's. Ranks inside
// such a communicator are numbered 0..n-1 in the order of `ranks`.
//
// Point to point (kSend / kRecv) is started on arrival, never ordered: MPI
// matches a send to a receive by (communicator, source, tag), so any issue
// order on either side completes. `peer` is a rank of `comm`.
#ifndef TF_SMDIST_KERNELS_MPI_COMM_H_
#define TF_SMDIST_KERNELS_MPI_COMM_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace smdist {
namespace mpi {

// Element types understood by the collectives. float16/bfloat16 are 16-bit
// words summed through float32 by a user-defined MPI reduction.
enum class DataType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kUint8 = 6,
  kInt8 = 7,
  kInt16 = 8,
  kUint16 = 9,
  kBool = 10,  // one byte per element; sum/max = logical or, min/prod = and
};

enum class Reduction : int { kSum = 0, kMin = 1, kMax = 2, kProd = 3 };

enum class Kind : int {
  kAllreduce = 0,
  kBroadcast = 1,
  kAllgather = 2,      // `count` elements from every rank
  kBarrier = 3,
  kAllgatherv = 4,     // counts[r] elements from rank r, concatenated
  kAlltoallv = 5,      // counts[r] elements to rank r; recv_counts[r] from r
  kReduceScatter = 6,  // reduce count = sum(counts); rank r keeps counts[r]
  kSend = 7,           // `count` elements of `send` to `peer` with `tag`
  kRecv = 8,           // `count` elements into `recv` from `peer` with `tag`
  kBenchmark = 9,      // `index` blocking MPI_Allreduce calls of `count` float32
                       // on `comm`, run when no other work is queued; writes
                       // the seconds per call (a double) to `recv`
};

// Error classes, mapped to TensorFlow / Python errors by the callers.
enum class Code : int {
  kOk = 0,
  kInvalidArgument = 1,
  kDeadlineExceeded = 2,  // watchdog: a peer is dead, stopped or late
  kFailedPrecondition = 3,  // not initialised, shut down
  kInternal = 4,  // MPI returned an error
};

struct Status {
  Code code = Code::kOk;
  std::string message;
  bool ok() const { return code == Code::kOk; }
  static Status Ok() { return Status(); }
};

using DoneCallback = std::function<void(const Status&)>;

struct Request {
  Kind kind = Kind::kAllreduce;
  std::string name;          // for error messages
  int comm = 0;              // communicator id: 0 = world, else from CreateComm
  int group = 0;             // ordering group of `comm`: [0, kMaxGroups) for the
                             // world, [0, kMaxSubGroups) for other communicators
  int index = 0;             // position inside the group's cycle
  int group_size = 1;        // length of the group's cycle
  const void* send = nullptr;  // allgather(v), alltoallv, reduce-scatter, send.
                               // nullptr for allgatherv: in place (this rank's
                               // part already at its offset in recv); for
                               // reduce-scatter: in place (recv holds all
                               // sum(counts) inputs, the result goes first)
                               // allreduce: this rank's values, read only,
                               // not overlapping recv; nullptr: in place
                               // (they are in recv)
  void* recv = nullptr;        // in place for broadcast
  int64_t count = 0;           // elements (per rank for allgather)
  std::vector<int64_t> counts;       // per rank of `comm` (allgatherv,
                                     // alltoallv send, reduce-scatter)
  std::vector<int64_t> recv_counts;  // per rank of `comm` (alltoallv receive)
  DataType dtype = DataType::kFloat32;
  Reduction reduction = Reduction::kSum;
  int root = 0;                // broadcast only: a rank of `comm`
  int peer = -1;               // send / recv: a rank of `comm`
  int tag = 0;                 // send / recv: in [0, 2^20)
  DoneCallback done;
  // Optional continuation (compound collectives, such as an all-gather of
  // sizes followed by the all-gatherv they size). Called on the
  // communication thread once this request completed successfully. A non-ok
  // status fails this request with it. Otherwise, if it set `next->done`,
  // the thread starts `*next` at once in the same (comm, group), before any
  // other request of that group, and this request's `done` is not called
  // (`next->done` is the final one); else this request's `done` gets Ok.
  // While a request with `then` is in flight its group starts nothing else,
  // so the order of collectives stays the same on every rank.
  std::function<Status(Request* next)> then;
  // Deadline of this request in seconds, for a wait known to be long (the
  // other ranks wait while rank 0 alone profiles a model): 0 takes the
  // communicator's `Options::timeout_s`. Past that usual limit the request
  // still fails at once if a peer is dead, stopped, failed or leaving; it
  // waits on only for a peer that is alive and late.
  double timeout_s = 0.0;
};

struct Options {
  double timeout_s = 60.0;    // deadline of one collective
  double heartbeat_s = 1.0;   // heartbeat period
};

// Number of independent ordering groups (pre-created communicators) of the
// world, and of each communicator made by CreateComm.
constexpr int kMaxGroups = 64;
constexpr int kMaxSubGroups = 8;
// Largest point-to-point tag.
constexpr int kMaxTag = (1 << 20) - 1;

size_t DataTypeSize(DataType dtype);

// The non-negative number in environment variable `name`, else `fallback`.
double EnvDouble(const char* name, double fallback);

class Communicator {
 public:
  // The process-wide instance.
  static Communicator& Get();

  // Starts the thread and initialises MPI on it; blocks until done. Calling
  // it again returns the first call's status.
  Status Init(const Options& options);
  bool initialized() const;
  int rank() const { return rank_; }
  int size() const { return size_; }
  double timeout_s() const { return options_.timeout_s; }

  // Queues `request`; `request.done` runs on the communication thread once
  // the collective completed or failed. Never blocks on MPI.
  void Enqueue(Request request);

  // Runs `request` and waits for it (Python control plane). Never from the
  // communication thread itself (a request's `done` or a posted task).
  Status Run(Request request);

  // Runs `task` on the communication thread, between polls; false if the
  // thread is not running (then `task` is dropped). A task posted while it
  // runs is run, even after a failure. Tasks may call Enqueue; they must not
  // block.
  bool Post(std::function<void()> task);

  // Makes a communicator over `ranks` (world ranks, distinct, in the order
  // that numbers them 0..n-1). Every rank of the world calls it, in the same
  // order and with the same `ranks` (checked: a mismatch is an error on every
  // rank). Sets `*id` to the new communicator's id (> 0) on its members and
  // to -1 on the other ranks. Blocks.
  Status CreateComm(const std::vector<int>& ranks, int* id);
  // Frees a communicator made by CreateComm once its queued work is done.
  // Every member calls it. Blocks.
  Status DestroyComm(int id);
  // This rank's rank in, and the size of, communicator `id` (-1 if unknown
  // or not a member).
  int CommRank(int id) const;
  int CommSize(int id) const;

  // Fails this rank's communication for good, with `message`: what is in
  // flight or queued fails with it, new requests are refused, and the peers
  // learn from the heartbeats that this rank failed (a collective or a
  // receive that needs it then fails half a second later instead of at the
  // timeout). For an error that leaves the peers waiting on this rank (a
  // pipeline stage whose step could not be built, an uncaught exception).
  // Does nothing when already failed, or before Init.
  void Abort(const std::string& message);

  // Completes queued work, drains heartbeats, finalises MPI and joins the
  // thread. After a watchdog failure MPI is not finalised: a collective in
  // flight cannot be cancelled, and MPI_Finalize would wait for it forever.
  Status Shutdown();

  // Times `iters` blocking MPI_Allreduce calls of `count` float32 elements on
  // the communication thread (MPI's own speed, for benchmarks). Returns the
  // seconds per call, or a negative value on error.
  double TimeNativeAllreduce(int64_t count, int iters);

 private:
  Communicator() = default;
  struct Impl;  // the communication thread's state (comm.cc)
  void ThreadMain();
  // Queues a request on the internal control communicator (CreateComm's
  // checks), which user requests cannot name.
  Status RunControl(Request request);

  Options options_;
  int rank_ = 0;
  int size_ = 1;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Request> incoming_;
  std::deque<std::function<void()>> tasks_;
  // (rank, size) of each communicator this rank belongs to, by id.
  std::map<int, std::pair<int, int>> comm_info_;
  int next_comm_id_ = 1;  // the same on every rank: CreateComm is collective
  std::mutex create_mu_;  // one CreateComm at a time
  bool init_done_ = false;
  bool init_called_ = false;
  Status init_status_;
  bool stop_ = false;
  bool stopped_ = false;
  Status shutdown_status_;
  std::mutex join_mu_;
  std::thread thread_;
  Impl* impl_ = nullptr;
};

}  // namespace mpi
}  // namespace smdist

#endif  // TF_SMDIST_KERNELS_MPI_COMM_H_
