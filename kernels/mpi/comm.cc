// Framework-free MPI communication thread for tf_smdist (see comm.h).
//
// The thread's state is `Communicator::Impl`. Its parts:
//   * CommState / Group: the communicators (world, control, CreateComm's)
//     and their ordering groups: the scheduler that starts each group's
//     requests in index order and completes them in order;
//   * point-to-point requests, started on arrival and completed in any order;
//   * Heartbeats (heartbeat.h): a ring of liveness messages; Detect turns
//     what this rank sees of its predecessor into facts the ring carries;
//   * the watchdog (CheckDeadlines / PeersReport): fails everything with an
//     error naming the dead, stopped or late ranks once a request is late.
#include "kernels/mpi/comm.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <future>
#include <list>
#include <map>
#include <memory>
#include <sstream>

#include "kernels/common/fp16.h"
#include "kernels/mpi/heartbeat.h"

namespace smdist {
namespace mpi {

namespace {

constexpr int kControlComm = -1;  // internal: CreateComm's checks
constexpr int64_t kIntMax = 0x7fffffff;

double Now() {
  using Clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}


const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kAllreduce: return "allreduce";
    case Kind::kBroadcast: return "broadcast";
    case Kind::kAllgather: return "allgather";
    case Kind::kBarrier: return "barrier";
    case Kind::kAllgatherv: return "allgatherv";
    case Kind::kAlltoallv: return "alltoallv";
    case Kind::kReduceScatter: return "reduce-scatter";
    case Kind::kSend: return "send";
    case Kind::kRecv: return "recv";
    case Kind::kBenchmark: return "benchmark";
  }
  return "collective";
}

bool IsPointToPoint(Kind kind) { return kind == Kind::kSend || kind == Kind::kRecv; }

std::string MpiErrorString(int err) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(err, buf, &len) != MPI_SUCCESS) {
    return "MPI error " + std::to_string(err);
  }
  return std::string(buf, len);
}

Status MpiStatus(int err, const std::string& what) {
  Status s;
  if (err == MPI_SUCCESS) return s;
  s.code = Code::kInternal;
  s.message = "tf_smdist: " + what + " failed: " + MpiErrorString(err);
  return s;
}

// --- 16-bit float reductions through float32 --------------------------------

template <int kReduction>
inline float Combine(float a, float b) {
  switch (static_cast<Reduction>(kReduction)) {
    case Reduction::kSum: return a + b;
    case Reduction::kMin: return b < a ? b : a;
    case Reduction::kMax: return b > a ? b : a;
    case Reduction::kProd: return a * b;
  }
  return a + b;
}

template <int kReduction, bool kBFloat16>
void Reduce16(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    if (kBFloat16) {
      b[i] = fp16::FloatToBFloat16(
          Combine<kReduction>(fp16::BFloat16ToFloat(b[i]), fp16::BFloat16ToFloat(a[i])));
    } else {
      b[i] = fp16::FloatToHalf(
          Combine<kReduction>(fp16::HalfToFloat(b[i]), fp16::HalfToFloat(a[i])));
    }
  }
}

using ReduceFn = void (*)(void*, void*, int*, MPI_Datatype*);
constexpr ReduceFn kHalfOps[4] = {&Reduce16<0, false>, &Reduce16<1, false>,
                                  &Reduce16<2, false>, &Reduce16<3, false>};
constexpr ReduceFn kBFloat16Ops[4] = {&Reduce16<0, true>, &Reduce16<1, true>,
                                      &Reduce16<2, true>, &Reduce16<3, true>};

// Sums and products of 8-bit integers wrap (modulo 256), as TensorFlow's and
// Horovod's do: Open MPI 4.1's AVX MPI_SUM / MPI_PROD saturate them instead
// (-100 + -72 gave 127), so these replace them. Two's complement makes the
// bits the same for int8 and uint8.
template <bool kProd>
void Reduce8(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint8_t* a = static_cast<const uint8_t*>(in);
  uint8_t* b = static_cast<uint8_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    b[i] = kProd ? static_cast<uint8_t>(a[i] * b[i]) : static_cast<uint8_t>(a[i] + b[i]);
  }
}

MPI_Datatype ToMpi(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return MPI_FLOAT;
    case DataType::kFloat64: return MPI_DOUBLE;
    case DataType::kFloat16: return MPI_UINT16_T;
    case DataType::kBFloat16: return MPI_UINT16_T;
    case DataType::kInt32: return MPI_INT32_T;
    case DataType::kInt64: return MPI_INT64_T;
    case DataType::kUint8: return MPI_UINT8_T;
    case DataType::kInt8: return MPI_INT8_T;
    case DataType::kInt16: return MPI_INT16_T;
    case DataType::kUint16: return MPI_UINT16_T;
    case DataType::kBool: return MPI_UINT8_T;
  }
  return MPI_BYTE;
}

bool ValidDataType(DataType d) {
  int v = static_cast<int>(d);
  return v >= 0 && v <= static_cast<int>(DataType::kBool);
}

bool ValidReduction(Reduction r) {
  int v = static_cast<int>(r);
  return v >= 0 && v <= static_cast<int>(Reduction::kProd);
}

std::string RankList(const int64_t* ranks, int64_t n) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < n; ++i) os << (i ? ", " : "") << ranks[i];
  os << "]";
  return os.str();
}

// Prefix sums of `counts` as MPI's int counts and displacements; false when
// a count or the total does not fit in an int.
bool CountsAndDisplacements(const std::vector<int64_t>& counts, int* out_counts,
                            int* out_displs) {
  int64_t total = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] < 0 || counts[i] > kIntMax || total > kIntMax) return false;
    out_counts[i] = static_cast<int>(counts[i]);
    out_displs[i] = static_cast<int>(total);
    total += counts[i];
  }
  return total <= kIntMax;
}

}  // namespace

double EnvDouble(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  double d = std::strtod(v, &end);
  return (end != v && d >= 0) ? d : fallback;
}

size_t DataTypeSize(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return 4;
    case DataType::kFloat64: return 8;
    case DataType::kFloat16: return 2;
    case DataType::kBFloat16: return 2;
    case DataType::kInt32: return 4;
    case DataType::kInt64: return 8;
    case DataType::kUint8: return 1;
    case DataType::kInt8: return 1;
    case DataType::kInt16: return 2;
    case DataType::kUint16: return 2;
    case DataType::kBool: return 1;
  }
  return 1;
}

namespace {

// Reusable scratch buffers of the communication thread. A fresh 32 MB buffer
// costs about 25 ms here (page faults, zero filling), as much as the transfer
// it serves. Only the communication thread takes and gives back buffers.
class ScratchPool {
 public:
  // The smallest kept buffer of at least `bytes` (else a new one); its size
  // in `*size`.
  std::unique_ptr<char[]> Take(size_t bytes, size_t* size) {
    bytes = std::max<size_t>(bytes, 1);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second >= bytes && (best == free_.end() || it->second < best->second)) best = it;
    }
    if (best == free_.end()) {
      *size = bytes;
      return std::unique_ptr<char[]>(new char[bytes]);
    }
    std::unique_ptr<char[]> buf = std::move(best->first);
    *size = best->second;
    free_.erase(best);
    return buf;
  }

  // Keeps `buf` for a later Take (up to a few buffers).
  void Give(std::unique_ptr<char[]> buf, size_t size) {
    if (buf && free_.size() < kKeep) free_.emplace_back(std::move(buf), size);
  }

 private:
  static constexpr size_t kKeep = 4;
  std::vector<std::pair<std::unique_ptr<char[]>, size_t>> free_;
};

// An all-reduce built from point-to-point messages: a ring reduce-scatter
// then a ring all-gather, each step's block split into chunks so the sum of
// one chunk overlaps the transfer of the next. Open MPI's non-blocking
// MPI_Iallreduce (its ring algorithm, set in Communicator::Init) is as fast
// up to tens of MB, but its time jumps above that (RingBytes); this keeps
// its scratch buffers, and the communication thread still polls for
// failures between steps. Every rank
// ends with the same bits: each block is reduced on one rank, then copied.
// With a separate input `in` (not nullptr), this rank's values are read from
// it and `buf` only receives: blocks arrive straight into `buf` and are
// reduced there with the input, so no copy of the input is needed (the
// reductions are commutative).
class RingAllreduce {
 public:
  RingAllreduce(const char* in, char* buf, int64_t count, size_t elem_size,
                MPI_Datatype dtype, MPI_Op op, MPI_Comm comm, int rank, int size, int tag,
                int64_t chunk_bytes, ScratchPool* pool)
      : in_(in), buf_(buf), esize_(elem_size), dtype_(dtype), op_(op), comm_(comm),
        rank_(rank), size_(size), tag_(tag), pool_(pool) {
    chunk_ = std::max<int64_t>(1, chunk_bytes / static_cast<int64_t>(elem_size));
    offsets_.resize(size + 1);
    for (int b = 0; b <= size; ++b) offsets_[b] = count * b / size;
    int64_t largest = 0;
    for (int b = 0; b < size; ++b) largest = std::max(largest, offsets_[b + 1] - offsets_[b]);
    if (in_ == nullptr) tmp_ = pool->Take(static_cast<size_t>(largest) * esize_, &tmp_size_);
  }
  RingAllreduce(const RingAllreduce&) = delete;
  RingAllreduce& operator=(const RingAllreduce&) = delete;
  ~RingAllreduce() {
    if (tmp_) pool_->Give(std::move(tmp_), tmp_size_);
  }

  // Advances as far as the messages allow; `*done` once every rank's data is
  // summed into `buf`. Returns an MPI error code.
  int Progress(bool* done) {
    *done = false;
    while (phase_ < 2) {
      if (!posted_) {
        int err = PostStep();
        if (err != MPI_SUCCESS) return err;
      }
      while (reduced_ < recvs_.size()) {
        int flag = 0;
        int err = MPI_Test(&recvs_[reduced_], &flag, MPI_STATUS_IGNORE);
        if (err != MPI_SUCCESS) return err;
        if (!flag) return MPI_SUCCESS;
        if (phase_ == 0) {
          int64_t at = offsets_[recv_block_] + static_cast<int64_t>(reduced_) * chunk_;
          int64_t n = std::min(chunk_, offsets_[recv_block_ + 1] - at);
          const char* in = in_ != nullptr
                               ? in_ + at * esize_
                               : tmp_.get() + static_cast<size_t>(reduced_) * chunk_ * esize_;
          err = MPI_Reduce_local(in, buf_ + at * esize_, static_cast<int>(n), dtype_, op_);
          if (err != MPI_SUCCESS) return err;
        }
        ++reduced_;
      }
      int flag = 0;
      int err = MPI_Testall(static_cast<int>(sends_.size()), sends_.data(), &flag,
                            MPI_STATUSES_IGNORE);
      if (err != MPI_SUCCESS) return err;
      if (!flag) return MPI_SUCCESS;
      posted_ = false;
      if (++step_ == size_ - 1) {
        step_ = 0;
        ++phase_;
      }
    }
    *done = true;
    return MPI_SUCCESS;
  }

 private:
  int Block(int b) const { return ((b % size_) + size_) % size_; }

  // Reduce-scatter step s: send block r - s, receive block r - s - 1 and add
  // it in; rank r then holds the sum of block r + 1. All-gather step s: send
  // block r + 1 - s, receive block r - s. Out of place, the first step sends
  // from the input (nothing is summed yet) and every block is received into
  // `buf`: the reduce-scatter's block before it is summed, the all-gather's
  // over partial sums already sent.
  int PostStep() {
    int right = (rank_ + 1) % size_;
    int left = (rank_ + size_ - 1) % size_;
    int send_block = phase_ == 0 ? Block(rank_ - step_) : Block(rank_ + 1 - step_);
    recv_block_ = phase_ == 0 ? Block(rank_ - step_ - 1) : Block(rank_ - step_);
    recvs_.clear();
    sends_.clear();
    reduced_ = 0;
    for (int64_t at = offsets_[recv_block_]; at < offsets_[recv_block_ + 1]; at += chunk_) {
      int64_t n = std::min(chunk_, offsets_[recv_block_ + 1] - at);
      char* into = phase_ == 0 && in_ == nullptr
                       ? tmp_.get() + (at - offsets_[recv_block_]) * esize_
                       : buf_ + at * esize_;
      recvs_.push_back(MPI_REQUEST_NULL);
      int err = MPI_Irecv(into, static_cast<int>(n), dtype_, left, tag_, comm_, &recvs_.back());
      if (err != MPI_SUCCESS) return err;
    }
    const char* from = phase_ == 0 && step_ == 0 && in_ != nullptr ? in_ : buf_;
    for (int64_t at = offsets_[send_block]; at < offsets_[send_block + 1]; at += chunk_) {
      int64_t n = std::min(chunk_, offsets_[send_block + 1] - at);
      sends_.push_back(MPI_REQUEST_NULL);
      int err = MPI_Isend(from + at * esize_, static_cast<int>(n), dtype_, right, tag_, comm_,
                          &sends_.back());
      if (err != MPI_SUCCESS) return err;
    }
    posted_ = true;
    return MPI_SUCCESS;
  }

  const char* in_;  // this rank's values, or nullptr: in `buf_` (in place)
  char* buf_;
  size_t esize_;
  MPI_Datatype dtype_;
  MPI_Op op_;
  MPI_Comm comm_;
  int rank_;
  int size_;
  int tag_;
  int64_t chunk_ = 1;
  std::vector<int64_t> offsets_;  // element offset of each block, and the end
  ScratchPool* pool_;
  std::unique_ptr<char[]> tmp_;  // the received block of a reduce-scatter step
  size_t tmp_size_ = 0;
  int phase_ = 0;                 // 0: reduce-scatter, 1: all-gather, 2: done
  int step_ = 0;
  bool posted_ = false;
  int recv_block_ = 0;
  std::vector<MPI_Request> recvs_;
  std::vector<MPI_Request> sends_;
  size_t reduced_ = 0;  // receives of this step completed (and summed)
};

struct InFlight {
  Request request;
  MPI_Request mpi = MPI_REQUEST_NULL;
  std::shared_ptr<RingAllreduce> ring;  // instead of `mpi` for large all-reduces
  double start = 0;
  int64_t seq = 0;        // 1-based number of this request in its group
  std::vector<int> ints;  // MPI's counts and displacements (v-collectives)
};

// One ordering group of a communicator: requests start in index order.
struct Group {
  MPI_Comm comm = MPI_COMM_NULL;
  int cycle = 0;  // group_size seen first (0: none yet)
  int next_index = 0;
  std::map<int, std::deque<Request>> waiting;
  std::map<int, double> waiting_since;
  std::deque<InFlight> inflight;
  int64_t started = 0;
  bool hold = false;  // a request with `then` is in flight: start nothing else

  bool idle() const { return waiting.empty() && inflight.empty(); }
};

struct CommState {
  int id = 0;
  int rank = 0;
  int size = 1;
  std::vector<int> world_ranks;  // world rank of each rank of this comm
  std::vector<Group> groups;
  MPI_Comm p2p = MPI_COMM_NULL;  // point-to-point requests
  std::list<InFlight> p2p_inflight;
  bool destroying = false;
  std::vector<std::shared_ptr<std::promise<Status>>> destroy_waiters;

  bool idle() const {
    if (!p2p_inflight.empty()) return false;
    for (const Group& g : groups) {
      if (!g.idle()) return false;
    }
    return true;
  }
  int WorldRank(int r) const {
    if (id == 0 || r < 0 || r >= static_cast<int>(world_ranks.size())) return r;
    return world_ranks[r];
  }
  std::string Describe(int r) const {
    if (id == 0 || r < 0 || r >= static_cast<int>(world_ranks.size())) {
      return "rank " + std::to_string(r);
    }
    return "rank " + std::to_string(r) + " (world rank " + std::to_string(world_ranks[r]) +
           ") of communicator " + std::to_string(id);
  }
};

}  // namespace

struct Communicator::Impl {
  explicit Impl(Communicator* owner) : c(*owner) {}

  Communicator& c;
  bool we_initialised = false;
  ScratchPool scratch;  // first: outlives the rings that give buffers back
  std::map<int, std::unique_ptr<CommState>> comms;  // by id
  MPI_Comm hb_comm = MPI_COMM_NULL;
  MPI_Comm ctrl_comm = MPI_COMM_NULL;
  MPI_Op half_ops[4] = {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL};
  MPI_Op byte_sum = MPI_OP_NULL;   // wrapping 8-bit sum (Reduce8)
  MPI_Op byte_prod = MPI_OP_NULL;  // wrapping 8-bit product
  MPI_Op bf16_ops[4] = {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL};
  Heartbeats heartbeats;
  std::deque<Request> benchmarks;  // run when no other work is queued
  Status failure;  // sticky watchdog / MPI failure
  int64_t my_state = kRunning;
  int64_t sent_state = kRunning;  // the state of the latest heartbeat sent
  double spin_s = 0.002;
  // Sleep between polls once spinning ends: from recv_poll_us, doubling
  // after each idle poll up to recv_poll_max_us, back to the start on any
  // activity or new request (see Wait).
  int64_t recv_poll_us = 50;
  int64_t recv_poll_max_us = 500;
  int64_t recv_poll_next_us = 50;
  double spin_until = 0;
  std::map<int, double> gone_since;  // world rank -> when first known failed or left
  double last_activity = 0;
  int64_t send_poll_us = 500;  // 0: sends are polled like receives (see Setup)
  // All-reduces of at least `ring_bytes` run as RingAllreduce, in chunks;
  // negative: RingBytes picks it by the communicator's size.
  int64_t ring_bytes = -1;
  int64_t ring_chunk_bytes = 1 << 20;
  std::vector<std::shared_ptr<RingAllreduce>> abandoned_rings;  // after a failure

  const Options& options() const { return c.options_; }

  // --- set-up and tear-down -------------------------------------------------

  Status Setup() {
    int flag = 0;
    int err = MPI_Initialized(&flag);
    if (err != MPI_SUCCESS) return MpiStatus(err, "MPI_Initialized");
    if (!flag) {
      int provided = 0;
      err = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
      if (err != MPI_SUCCESS) return MpiStatus(err, "MPI_Init_thread");
      we_initialised = true;
    } else {
      int provided = 0;
      err = MPI_Query_thread(&provided);
      if (err != MPI_SUCCESS) return MpiStatus(err, "MPI_Query_thread");
      if (provided < MPI_THREAD_SERIALIZED) {
        Status s;
        s.code = Code::kFailedPrecondition;
        s.message =
            "MPI was already initialised by another library with a thread level "
            "below MPI_THREAD_SERIALIZED, so tf_smdist's communication thread "
            "may not call MPI. Received: provided thread level=" +
            std::to_string(provided) +
            ". Initialise MPI with MPI_THREAD_MULTIPLE (mpi4py: set "
            "mpi4py.rc.thread_level = 'multiple' before importing MPI), or let "
            "tf_smdist initialise it.";
        return s;
      }
    }
    // Every MPI failure is returned to us, never an abort of the process.
    err = MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (err != MPI_SUCCESS) return MpiStatus(err, "MPI_Comm_set_errhandler(MPI_COMM_WORLD)");
    err = MPI_Comm_rank(MPI_COMM_WORLD, &c.rank_);
    if (err != MPI_SUCCESS) return MpiStatus(err, "MPI_Comm_rank");
    err = MPI_Comm_size(MPI_COMM_WORLD, &c.size_);
    if (err != MPI_SUCCESS) return MpiStatus(err, "MPI_Comm_size");
    Status s = Dup(MPI_COMM_WORLD, &hb_comm);
    if (s.ok()) s = Dup(MPI_COMM_WORLD, &ctrl_comm);
    for (int i = 0; i < 4 && s.ok(); ++i) {
      s = MpiStatus(MPI_Op_create(kHalfOps[i], 1, &half_ops[i]), "MPI_Op_create");
      if (s.ok()) s = MpiStatus(MPI_Op_create(kBFloat16Ops[i], 1, &bf16_ops[i]), "MPI_Op_create");
    }
    if (s.ok()) s = MpiStatus(MPI_Op_create(&Reduce8<false>, 1, &byte_sum), "MPI_Op_create");
    if (s.ok()) s = MpiStatus(MPI_Op_create(&Reduce8<true>, 1, &byte_prod), "MPI_Op_create");
    if (!s.ok()) return s;
    std::vector<int> all(c.size_);
    for (int r = 0; r < c.size_; ++r) all[r] = r;
    s = AddComm(0, MPI_COMM_WORLD, c.rank_, all, kMaxGroups);
    if (!s.ok()) return s;
    // The control communicator: one ordering group over ctrl_comm itself.
    auto ctrl = std::make_unique<CommState>();
    ctrl->id = kControlComm;
    ctrl->rank = c.rank_;
    ctrl->size = c.size_;
    ctrl->world_ranks = all;
    ctrl->groups.resize(1);
    ctrl->groups[0].comm = ctrl_comm;
    comms[kControlComm] = std::move(ctrl);
    spin_s = EnvDouble("SMDIST_MPI_SPIN_US", 2000.0) * 1e-6;
    recv_poll_us = static_cast<int64_t>(
        std::max(1.0, EnvDouble("SMDIST_MPI_RECV_POLL_US", static_cast<double>(recv_poll_us))));
    recv_poll_max_us = std::max(
        recv_poll_us, static_cast<int64_t>(EnvDouble("SMDIST_MPI_RECV_POLL_MAX_US",
                                                     static_cast<double>(recv_poll_max_us))));
    recv_poll_next_us = recv_poll_us;
    if (std::getenv("SMDIST_MPI_RING_BYTES") != nullptr) {
      ring_bytes = static_cast<int64_t>(std::max(0.0, EnvDouble("SMDIST_MPI_RING_BYTES", 0.0)));
    }
    ring_chunk_bytes = static_cast<int64_t>(std::max(
        1024.0, EnvDouble("SMDIST_MPI_RING_CHUNK_BYTES", static_cast<double>(ring_chunk_bytes))));
    // Lazy send polling only where every rank shares this host's memory.
    MPI_Comm node = MPI_COMM_NULL;
    s = MpiStatus(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL,
                                      &node),
                  "MPI_Comm_split_type");
    if (!s.ok()) return s;
    int node_size = 0;
    s = MpiStatus(MPI_Comm_size(node, &node_size), "MPI_Comm_size");
    if (s.ok()) s = MpiStatus(MPI_Comm_free(&node), "MPI_Comm_free");
    if (!s.ok()) return s;
    double poll_default = node_size == c.size_ ? 500.0 : 0.0;
    send_poll_us = static_cast<int64_t>(
        std::max(0.0, EnvDouble("SMDIST_MPI_SEND_POLL_US", poll_default)));
    return heartbeats.Start(c.rank_, c.size_, hb_comm, options().heartbeat_s);
  }

  static Status Dup(MPI_Comm parent, MPI_Comm* out) {
    int err = MPI_Comm_dup(parent, out);
    if (err != MPI_SUCCESS) return MpiStatus(err, "MPI_Comm_dup");
    err = MPI_Comm_set_errhandler(*out, MPI_ERRORS_RETURN);
    return MpiStatus(err, "MPI_Comm_set_errhandler");
  }

  // Registers communicator `id` over `base` (duplicated for each ordering
  // group and for point-to-point; `base` itself is not kept).
  Status AddComm(int id, MPI_Comm base, int rank, const std::vector<int>& world_ranks,
                 int num_groups) {
    auto cs = std::make_unique<CommState>();
    cs->id = id;
    cs->rank = rank;
    cs->size = static_cast<int>(world_ranks.size());
    cs->world_ranks = world_ranks;
    cs->groups.resize(num_groups);
    for (Group& g : cs->groups) {
      Status s = Dup(base, &g.comm);
      if (!s.ok()) return s;
    }
    Status s = Dup(base, &cs->p2p);
    if (!s.ok()) return s;
    {
      std::lock_guard<std::mutex> lock(c.mu_);
      c.comm_info_[id] = {cs->rank, cs->size};
    }
    comms[id] = std::move(cs);
    return Status::Ok();
  }

  Status FreeComm(CommState* cs) {
    Status s;
    for (Group& g : cs->groups) {
      if (g.comm != MPI_COMM_NULL && g.comm != ctrl_comm && s.ok()) {
        s = MpiStatus(MPI_Comm_free(&g.comm), "MPI_Comm_free");
      }
    }
    if (cs->p2p != MPI_COMM_NULL && s.ok()) {
      s = MpiStatus(MPI_Comm_free(&cs->p2p), "MPI_Comm_free");
    }
    return s;
  }

  // Runs on the thread for CreateComm's members, after the rank lists were
  // checked equal on every rank.
  Status CreateComm(int id, const std::vector<int>& ranks) {
    if (!failure.ok()) return failure;
    MPI_Group world_group = MPI_GROUP_NULL;
    MPI_Group sub_group = MPI_GROUP_NULL;
    MPI_Comm sub = MPI_COMM_NULL;
    Status s = MpiStatus(MPI_Comm_group(ctrl_comm, &world_group), "MPI_Comm_group");
    if (s.ok()) {
      s = MpiStatus(MPI_Group_incl(world_group, static_cast<int>(ranks.size()), ranks.data(),
                                   &sub_group),
                    "MPI_Group_incl");
    }
    if (s.ok()) {
      s = MpiStatus(MPI_Comm_create_group(ctrl_comm, sub_group, id, &sub),
                    "MPI_Comm_create_group");
    }
    int rank = -1;
    if (s.ok()) s = MpiStatus(MPI_Comm_rank(sub, &rank), "MPI_Comm_rank");
    if (s.ok()) s = AddComm(id, sub, rank, ranks, kMaxSubGroups);
    if (sub != MPI_COMM_NULL && s.ok()) s = MpiStatus(MPI_Comm_free(&sub), "MPI_Comm_free");
    if (sub_group != MPI_GROUP_NULL && s.ok()) {
      s = MpiStatus(MPI_Group_free(&sub_group), "MPI_Group_free");
    }
    if (world_group != MPI_GROUP_NULL && s.ok()) {
      s = MpiStatus(MPI_Group_free(&world_group), "MPI_Group_free");
    }
    if (!s.ok()) Fail(s);
    return s;
  }

  void RequestDestroy(int id, std::shared_ptr<std::promise<Status>> waiter) {
    auto it = comms.find(id);
    if (!failure.ok()) {
      waiter->set_value(failure);
      return;
    }
    if (id <= 0 || it == comms.end()) {
      Status s;
      s.code = Code::kInvalidArgument;
      s.message = "tf_smdist: destroy_comm got an unknown communicator (never created, "
                  "already destroyed, or this rank is not a member). Received: comm=" +
                  std::to_string(id);
      waiter->set_value(s);
      return;
    }
    it->second->destroying = true;
    it->second->destroy_waiters.push_back(std::move(waiter));
  }

  // Frees communicators whose destruction was requested once they are idle.
  void FinishDestroys() {
    for (auto it = comms.begin(); it != comms.end();) {
      CommState& cs = *it->second;
      if (!cs.destroying || !cs.idle()) {
        ++it;
        continue;
      }
      Status s = FreeComm(&cs);
      {
        std::lock_guard<std::mutex> lock(c.mu_);
        c.comm_info_.erase(cs.id);
      }
      for (auto& w : cs.destroy_waiters) w->set_value(s);
      it = comms.erase(it);
      if (!s.ok()) Fail(s);
    }
  }

  // --- failure and the watchdog's report -------------------------------------

  void Fail(const Status& status) {
    if (!failure.ok()) return;
    failure = status;
    my_state = kFailed;
    for (auto& kv : comms) {
      CommState& cs = *kv.second;
      for (Group& g : cs.groups) {
        for (InFlight& f : g.inflight) {
          f.request.done(status);
          // Its receives may still land in the chunk buffer: keep it.
          if (f.ring) abandoned_rings.push_back(std::move(f.ring));
        }
        g.inflight.clear();
        for (auto& w : g.waiting) {
          for (Request& r : w.second) r.done(status);
        }
        g.waiting.clear();
        g.waiting_since.clear();
        g.hold = false;
      }
      for (InFlight& f : cs.p2p_inflight) f.request.done(status);
      cs.p2p_inflight.clear();
      for (auto& w : cs.destroy_waiters) w->set_value(status);
      cs.destroy_waiters.clear();
    }
    for (Request& r : benchmarks) r.done(status);
    benchmarks.clear();
  }

  void FailMpi(const Request& r, int err, const char* what) {
    Status s;
    s.code = Code::kInternal;
    std::ostringstream os;
    os << "tf_smdist: " << what << " for " << KindName(r.kind) << " '" << r.name
       << "' failed on rank " << c.rank_ << ": " << MpiErrorString(err) << "."
       << PeersReport(-1, 0, Now());
    s.message = os.str();
    Fail(s);
  }

  // What this rank sees of its predecessor becomes facts that the ring
  // carries to every rank (heartbeat.h): it is silent, failed, leaving, or
  // has not joined a world collective this rank has waited on for half the
  // timeout.
  void Detect(double now) {
    if (c.size_ == 1) return;
    const int pred = heartbeats.predecessor();
    double silent = now - heartbeats.last_heard();
    Fact f;
    f.subject = pred;
    if (silent > heartbeats.fact_ttl()) {
      f.kind = Fact::kDead;
      f.a = static_cast<int64_t>(silent * 1000);
      heartbeats.Publish(f, now);
    } else if (heartbeats.pred_state() == kFailed) {
      f.kind = Fact::kFailed;
      heartbeats.Publish(f, now);
    } else if (heartbeats.pred_state() == kFinishing) {
      f.kind = Fact::kFinishing;
      heartbeats.Publish(f, now);
    }
    auto world = comms.find(0);
    if (world == comms.end()) return;
    for (int gi = 0; gi < kMaxGroups; ++gi) {
      const Group& g = world->second->groups[gi];
      if (g.inflight.empty()) continue;
      const InFlight& front = g.inflight.front();
      if (now - front.start > options().timeout_s / 2 &&
          heartbeats.pred_started(gi) < front.seq) {
        Fact n;
        n.kind = Fact::kNotJoined;
        n.subject = pred;
        n.group = gi;
        n.a = heartbeats.pred_started(gi);
        n.b = front.seq;
        heartbeats.Publish(n, now);
      }
    }
  }

  // Names the world ranks that are dead, stopped, failed, leaving or (for
  // world group `group`, whose collective #`seq` is late) have not joined:
  // the predecessor from its own heartbeats, the others from the facts the
  // ring brought.
  static std::string LeftTraining(int64_t rank) {
    return " Rank " + std::to_string(rank) +
           " has left training and is shutting down: its script ended or exited, having run "
           "fewer steps than this rank (an early exit, or uneven data across ranks?).";
  }

  std::string PeersReport(int group, int64_t seq, double now) const {
    std::ostringstream os;
    int named = 0;
    if (c.size_ > 1) {
      const int p = heartbeats.predecessor();
      double silent = now - heartbeats.last_heard();
      if (heartbeats.pred_state() == kFailed) {
        os << " Rank " << p << " has itself failed (see its own error).";
        ++named;
      } else if (silent > heartbeats.fact_ttl()) {
        os << " Rank " << p << " sent no heartbeat for " << static_cast<int>(silent)
           << " s: it is dead or stopped.";
        ++named;
      } else if (heartbeats.pred_state() == kFinishing) {
        os << LeftTraining(p);
        ++named;
      } else if (group >= 0 && heartbeats.pred_started(group) < seq) {
        os << " Rank " << p << " is alive but has not joined this collective (it started "
           << heartbeats.pred_started(group) << " of this group, this rank waits on #" << seq
           << "): it is stalled, or it ran out of data / left the training loop early.";
        ++named;
      }
    }
    for (const Fact& f : heartbeats.Facts(now)) {
      switch (f.kind) {
        case Fact::kDead:
          os << " Rank " << f.subject << " sent no heartbeat for at least " << f.a / 1000
             << " s (seen by rank " << f.reporter << "): it is dead or stopped.";
          break;
        case Fact::kFailed:
          os << " Rank " << f.subject << " has itself failed (see its own error).";
          break;
        case Fact::kFinishing:
          os << LeftTraining(f.subject);
          break;
        case Fact::kNotJoined:
          os << " Rank " << f.subject << " is alive but has not joined collective #" << f.b
             << " of group " << f.group << " (it started " << f.a << "; seen by rank "
             << f.reporter << "): it is stalled, or it ran out of data / left the training "
             << "loop early.";
          break;
        default:
          continue;
      }
      ++named;
    }
    if (named == 0) os << " No rank could be named (every peer is alive and has joined).";
    return os.str();
  }

  // True when a peer is known to be dead, stopped, failed or leaving (not
  // merely late): from this rank's predecessor's heartbeats, and from the
  // facts the heartbeat ring brought about the others.
  bool AnyPeerGone(double now) const { return heartbeats.AnyPeerDown(now, true); }

  // The world ranks known to have failed (their Fail ran) or left (their
  // communication thread is shutting down: it completed everything it had
  // issued and will take part in nothing more, e.g. its script ended or
  // called sys.exit while this rank still waits on it): the predecessor
  // from its own heartbeats, the others from the ring's facts. Empty (no
  // allocation) while every peer is well.
  std::vector<int> GonePeers(double now) const {
    std::vector<int> gone;
    if (c.size_ == 1) return gone;
    if (heartbeats.pred_state() == kFailed || heartbeats.pred_state() == kFinishing) {
      gone.push_back(heartbeats.predecessor());
    }
    for (const Fact& f : heartbeats.Facts(now)) {
      if (f.kind == Fact::kFailed || f.kind == Fact::kFinishing) {
        gone.push_back(static_cast<int>(f.subject));
      }
    }
    return gone;
  }

  // The deadline of `r` after `waited` seconds: the usual one, or its own
  // longer `timeout_s` while every peer is alive.
  double LimitOf(const Request& r, double waited, double now) const {
    const double usual = options().timeout_s;
    if (r.timeout_s <= usual || waited <= usual) return usual;
    return AnyPeerGone(now) ? usual : r.timeout_s;
  }

  // A request that needs a peer known to have failed or left fails once
  // both the peer has been gone and the request has been in flight for
  // kGoneGraceS, not at the timeout. The grace lets a collective or receive
  // whose data the peer sent before it failed or left complete as it would
  // have, even one this rank starts only later (a broadcast that the root
  // finished, eagerly sent, before it left).
  static constexpr double kGoneGraceS = 0.5;

  // The peers known to have failed or left for at least kGoneGraceS.
  std::vector<int> GoneForAWhile(double now) {
    std::vector<int> gone;
    for (int w : GonePeers(now)) {
      double since = gone_since.emplace(w, now).first->second;
      if (now - since >= kGoneGraceS) gone.push_back(w);
    }
    return gone;
  }

  void CheckDeadlines(double now) {
    const std::string hint =
        " Every rank must run the same steps; if a step legitimately takes longer, raise "
        "the limit with SMDIST_MPI_TIMEOUT=<seconds>.";
    const std::vector<int> departed = GoneForAWhile(now);  // once, not per request
    auto has_gone = [&departed](int world_rank) {
      return std::find(departed.begin(), departed.end(), world_rank) != departed.end();
    };
    for (auto& kv : comms) {
      CommState& cs = *kv.second;
      // A rank of this communicator that has failed or left, or -1: it takes
      // part in no collective any more, so those in flight cannot complete.
      int gone = -1;
      for (int i = 0; i < cs.size && gone < 0 && !departed.empty(); ++i) {
        if (has_gone(cs.WorldRank(i))) gone = i;
      }
      for (size_t gi = 0; gi < cs.groups.size(); ++gi) {
        Group& g = cs.groups[gi];
        double limit = options().timeout_s;
        if (!g.inflight.empty()) {
          const Request& front = g.inflight.front().request;
          limit = LimitOf(front, now - g.inflight.front().start, now);
        }
        if (!g.inflight.empty() && gone >= 0 &&
            now - g.inflight.front().start >= kGoneGraceS) {
          const InFlight& f = g.inflight.front();
          std::ostringstream os;
          os << "tf_smdist: " << KindName(f.request.kind) << " '" << f.request.name << "' (";
          if (cs.id > 0) os << "communicator " << cs.id << ", ";
          os << "group " << gi << ") cannot complete on rank " << c.rank_ << " of " << c.size_
             << ": it needs " << cs.Describe(gone) << "." << PeersReport(-1, 0, now);
          Fail({Code::kFailedPrecondition, os.str()});
          return;
        }
        if (!g.inflight.empty() && now - g.inflight.front().start > limit) {
          const InFlight& f = g.inflight.front();
          std::ostringstream os;
          os << "tf_smdist: " << KindName(f.request.kind) << " '" << f.request.name << "' (";
          if (cs.id > 0) os << "communicator " << cs.id << ", ";
          os << "group " << gi << ", index " << f.request.index << ", #" << f.seq
             << " of the group) did not complete within " << limit << " s on rank "
             << c.rank_ << " of " << c.size_ << "."
             << PeersReport(cs.id == 0 ? static_cast<int>(gi) : -1, f.seq, now) << hint;
          Fail({Code::kDeadlineExceeded, os.str()});
          return;
        }
        for (auto& w : g.waiting_since) {
          if (now - w.second > options().timeout_s) {
            std::ostringstream os;
            os << "tf_smdist: on rank " << c.rank_ << ", collective index " << w.first
               << " of group " << gi;
            if (cs.id > 0) os << " of communicator " << cs.id;
            os << " waited " << options().timeout_s << " s for index " << g.next_index
               << " of the same group, which this rank never issued. Each bucket plan must "
                  "issue all of its buckets every step.";
            Fail({Code::kDeadlineExceeded, os.str()});
            return;
          }
        }
      }
      for (const InFlight& f : cs.p2p_inflight) {
        const Request& r = f.request;
        if (r.kind == Kind::kRecv && gone >= 0 && now - f.start >= kGoneGraceS &&
            has_gone(cs.WorldRank(r.peer))) {
          // A failed or departed rank sends nothing more: fail now, not at
          // the timeout.
          std::ostringstream os;
          os << "tf_smdist: recv '" << r.name << "' from " << cs.Describe(r.peer)
             << " with tag " << r.tag << " cannot complete on rank " << c.rank_ << " of "
             << c.size_ << "." << PeersReport(-1, 0, now);
          Fail({Code::kFailedPrecondition, os.str()});
          return;
        }
        const double limit = LimitOf(f.request, now - f.start, now);
        if (now - f.start <= limit) continue;
        std::ostringstream os;
        os << "tf_smdist: " << KindName(r.kind) << " '" << r.name << "' "
           << (r.kind == Kind::kSend ? "to " : "from ") << cs.Describe(r.peer) << " with tag "
           << r.tag << " did not complete within " << limit << " s on rank " << c.rank_
           << " of " << c.size_ << "." << PeersReport(-1, 0, now)
           << " The peer must issue the matching "
           << (r.kind == Kind::kSend ? "recv" : "send")
           << " with the same tag; if a step legitimately takes longer, raise the limit "
              "with SMDIST_MPI_TIMEOUT=<seconds>.";
        Fail({Code::kDeadlineExceeded, os.str()});
        return;
      }
    }
  }

  // --- accepting and starting requests ---------------------------------------

  // Checks `r` against its communicator; on error calls r.done and returns
  // nullptr.
  CommState* Validate(Request& r) {
    std::ostringstream os;
    auto it = comms.find(r.comm);
    CommState* cs = it == comms.end() ? nullptr : it->second.get();
    int kind = static_cast<int>(r.kind);
    if (cs == nullptr || cs->destroying) {
      os << "unknown communicator (never created, destroyed, or this rank is not a member). "
            "Received: comm="
         << r.comm;
    } else if (kind < 0 || kind > static_cast<int>(Kind::kBenchmark)) {
      os << "unknown request kind. Received: kind=" << kind;
    } else if (!ValidDataType(r.dtype)) {
      os << "unknown dtype. Received: dtype=" << static_cast<int>(r.dtype);
    } else if (!ValidReduction(r.reduction)) {
      os << "unknown reduction. Received: reduction=" << static_cast<int>(r.reduction);
    } else if (r.count < 0 || r.count > kIntMax) {
      os << "the element count must be in [0, 2^31). Received: count=" << r.count;
    } else if (r.kind == Kind::kBenchmark) {
      return cs;
    } else if (IsPointToPoint(r.kind)) {
      if (r.peer < 0 || r.peer >= cs->size) {
        os << "`peer` must be a rank of the communicator, in [0, " << cs->size
           << "). Received: peer=" << r.peer;
      } else if (r.tag < 0 || r.tag > kMaxTag) {
        os << "`tag` must be in [0, " << kMaxTag << "]. Received: tag=" << r.tag;
      } else {
        return cs;
      }
    } else if (r.group < 0 || r.group >= static_cast<int>(cs->groups.size())) {
      os << "`group` must be in [0, " << cs->groups.size() << ") for communicator " << r.comm
         << ". Received: group=" << r.group;
    } else if (r.group_size < 1 || r.index < 0 || r.index >= r.group_size) {
      os << "`index` must be in [0, group_size). Received: index=" << r.index
         << ", group_size=" << r.group_size;
    } else if (r.kind != Kind::kBenchmark && cs->groups[r.group].cycle != 0 &&
               cs->groups[r.group].cycle != r.group_size) {
      os << "every collective of one group must give the same group_size. Received: group="
         << r.group << ", group_size=" << r.group_size << " (earlier "
         << cs->groups[r.group].cycle << "). Use a separate group for each bucket plan.";
    } else if (r.kind == Kind::kBroadcast && (r.root < 0 || r.root >= cs->size)) {
      os << "`root` must be a rank in [0, " << cs->size << "). Received: root=" << r.root;
    } else if ((r.kind == Kind::kAllgatherv || r.kind == Kind::kAlltoallv ||
                r.kind == Kind::kReduceScatter) &&
               static_cast<int>(r.counts.size()) != cs->size) {
      os << "`counts` must have one entry per rank of the communicator (" << cs->size
         << "). Received: len(counts)=" << r.counts.size();
    } else if (r.kind == Kind::kAlltoallv &&
               static_cast<int>(r.recv_counts.size()) != cs->size) {
      os << "`recv_counts` must have one entry per rank of the communicator (" << cs->size
         << "). Received: len(recv_counts)=" << r.recv_counts.size();
    } else {
      std::vector<int> scratch(2 * r.counts.size() + 2);
      bool fits = CountsAndDisplacements(r.counts, scratch.data(),
                                         scratch.data() + r.counts.size());
      std::vector<int> scratch2(2 * r.recv_counts.size() + 2);
      fits = fits && CountsAndDisplacements(r.recv_counts, scratch2.data(),
                                            scratch2.data() + r.recv_counts.size());
      if (fits) return cs;
      os << "per-rank counts must be >= 0 and their sum below 2^31 elements. Received: "
            "counts of "
         << KindName(r.kind) << " '" << r.name << "'";
    }
    r.done({Code::kInvalidArgument, "tf_smdist: " + os.str()});
    return nullptr;
  }

  void Accept(Request r, double now) {
    if (!failure.ok()) {
      r.done(failure);
      return;
    }
    CommState* cs = Validate(r);
    if (cs == nullptr) return;
    if (r.kind == Kind::kBenchmark) {
      benchmarks.push_back(std::move(r));
      return;
    }
    if (IsPointToPoint(r.kind)) {
      StartPointToPoint(cs, std::move(r), now);
      return;
    }
    Group& g = cs->groups[r.group];
    g.cycle = r.group_size;
    int key = r.group_size == 1 ? 0 : r.index;
    if (g.waiting[key].empty()) g.waiting_since[key] = now;
    g.waiting[key].push_back(std::move(r));
  }

  void NoteTransfer(const Request& r, double now) {
    double bytes = static_cast<double>(r.count) * DataTypeSize(r.dtype);
    for (int64_t n : r.counts) bytes += static_cast<double>(n) * DataTypeSize(r.dtype);
    spin_until = std::max(spin_until, now + spin_s + bytes * 5e-9);
  }

  void StartPointToPoint(CommState* cs, Request r, double now) {
    // Only a receive is worth spinning for: a send on one host completes when
    // the receiver copies the data, whatever this thread does meanwhile.
    if (r.kind == Kind::kRecv || send_poll_us == 0) NoteTransfer(r, now);
    cs->p2p_inflight.emplace_back();
    InFlight& f = cs->p2p_inflight.back();
    f.start = now;
    f.request = std::move(r);
    const Request& q = f.request;
    int count = static_cast<int>(q.count);
    int err = q.kind == Kind::kSend
                  ? MPI_Isend(q.send, count, ToMpi(q.dtype), q.peer, q.tag, cs->p2p, &f.mpi)
                  : MPI_Irecv(q.recv, count, ToMpi(q.dtype), q.peer, q.tag, cs->p2p, &f.mpi);
    if (err != MPI_SUCCESS) {
      Request failed = std::move(f.request);
      cs->p2p_inflight.pop_back();
      FailMpi(failed, err, "starting");
      failed.done(failure);
    }
  }

  MPI_Op SelectOp(DataType dtype, Reduction reduction) const {
    int k = static_cast<int>(reduction);
    if (dtype == DataType::kFloat16) return half_ops[k];
    if (dtype == DataType::kBFloat16) return bf16_ops[k];
    if (dtype == DataType::kBool) {
      return reduction == Reduction::kSum || reduction == Reduction::kMax ? MPI_LOR : MPI_LAND;
    }
    if (dtype == DataType::kInt8 || dtype == DataType::kUint8) {
      if (reduction == Reduction::kSum) return byte_sum;
      if (reduction == Reduction::kProd) return byte_prod;
    }
    switch (reduction) {
      case Reduction::kSum: return MPI_SUM;
      case Reduction::kMin: return MPI_MIN;
      case Reduction::kMax: return MPI_MAX;
      case Reduction::kProd: return MPI_PROD;
    }
    return MPI_SUM;
  }

  // The size from which an all-reduce over `n` ranks runs as RingAllreduce.
  // Below it, Open MPI's MPI_Iallreduce (its ring, see Setup) was as fast as
  // the blocking call and up to 1.3x faster than RingAllreduce here (1-48 MB
  // on 2 processes); above it the MPI call's time jumps (2 processes: 10 ms
  // at 48 MB, 23 ms at 56 MB, where RingAllreduce takes 13; 3 processes:
  // from about 24 MB), while RingAllreduce keeps its scratch buffers.
  int64_t RingBytes(int n) const {
    if (ring_bytes >= 0) return ring_bytes;
    return (int64_t{48} << 20) / std::max(1, n - 1);
  }

  // Posts the non-blocking collective of `f` on `comm`.
  int Post(InFlight& f, const CommState& cs, MPI_Comm comm) {
    const Request& r = f.request;
    MPI_Datatype dt = ToMpi(r.dtype);
    int count = static_cast<int>(r.count);
    int n = cs.size;
    switch (r.kind) {
      case Kind::kAllreduce:
        if (count == 0) return MPI_SUCCESS;
        if (n > 1 && count >= n &&
            static_cast<int64_t>(count) * static_cast<int64_t>(DataTypeSize(r.dtype)) >=
                RingBytes(n)) {
          f.ring = std::make_shared<RingAllreduce>(
              static_cast<const char*>(r.send),
              static_cast<char*>(r.recv), count, DataTypeSize(r.dtype), dt,
              SelectOp(r.dtype, r.reduction), comm, cs.rank, n,
              static_cast<int>(1 + f.seq % 30000), ring_chunk_bytes, &scratch);
          bool done = false;
          return f.ring->Progress(&done);
        }
        return MPI_Iallreduce(r.send == nullptr ? MPI_IN_PLACE : r.send, r.recv, count, dt,
                              SelectOp(r.dtype, r.reduction), comm, &f.mpi);
      case Kind::kBroadcast:
        if (count == 0) return MPI_SUCCESS;
        return MPI_Ibcast(r.recv, count, dt, r.root, comm, &f.mpi);
      case Kind::kAllgather:
        return MPI_Iallgather(r.send, count, dt, r.recv, count, dt, comm, &f.mpi);
      case Kind::kBarrier:
        return MPI_Ibarrier(comm, &f.mpi);
      case Kind::kAllgatherv: {
        f.ints.assign(2 * n, 0);
        CountsAndDisplacements(r.counts, f.ints.data(), f.ints.data() + n);
        const void* send = r.send == nullptr ? MPI_IN_PLACE : r.send;
        return MPI_Iallgatherv(send, f.ints[cs.rank], dt, r.recv, f.ints.data(),
                               f.ints.data() + n, dt, comm, &f.mpi);
      }
      case Kind::kAlltoallv: {
        f.ints.assign(4 * n, 0);
        int* sc = f.ints.data();
        int* rc = sc + 2 * n;
        CountsAndDisplacements(r.counts, sc, sc + n);
        CountsAndDisplacements(r.recv_counts, rc, rc + n);
        return MPI_Ialltoallv(r.send, sc, sc + n, dt, r.recv, rc, rc + n, dt, comm, &f.mpi);
      }
      case Kind::kReduceScatter: {
        f.ints.assign(2 * n, 0);
        CountsAndDisplacements(r.counts, f.ints.data(), f.ints.data() + n);
        const void* send = r.send == nullptr ? MPI_IN_PLACE : r.send;
        return MPI_Ireduce_scatter(send, r.recv, f.ints.data(), dt,
                                   SelectOp(r.dtype, r.reduction), comm, &f.mpi);
      }
      case Kind::kSend:
      case Kind::kRecv:
      case Kind::kBenchmark:
        break;
    }
    return MPI_ERR_OTHER;
  }

  void Start(CommState& cs, Group& g, Request r, double now) {
    NoteTransfer(r, now);
    InFlight f;
    f.start = now;
    f.seq = ++g.started;
    f.request = std::move(r);
    int err = Post(f, cs, g.comm);
    if (err != MPI_SUCCESS) {
      Request failed = std::move(f.request);
      FailMpi(failed, err, "starting");
      failed.done(failure);
      return;
    }
    g.hold = static_cast<bool>(f.request.then);
    g.inflight.push_back(std::move(f));
  }

  // Starts every request whose turn has come, in index order.
  bool StartReady(double now) {
    bool busy = false;
    for (auto& kv : comms) {
      CommState& cs = *kv.second;
      for (Group& g : cs.groups) {
        while (failure.ok() && !g.hold) {
          auto it = g.waiting.find(g.next_index);
          if (it == g.waiting.end() || it->second.empty()) break;
          Request r = std::move(it->second.front());
          it->second.pop_front();
          if (it->second.empty()) {
            g.waiting.erase(it);
            g.waiting_since.erase(g.next_index);
          } else {
            g.waiting_since[g.next_index] = now;
          }
          g.next_index = (g.next_index + 1) % std::max(1, g.cycle);
          Start(cs, g, std::move(r), now);
          busy = true;
        }
        if (!failure.ok()) return busy;
      }
    }
    return busy;
  }

  // Completes finished requests: each group's in order, point to point in
  // any order. Returns whether a collective (or, with `send_poll_us == 0`,
  // a message) completed; sets `*inflight`
  // (anything in flight) and `*eager` (a collective or a receive in flight:
  // someone waits on this thread's polling).
  bool Complete(bool* inflight, bool* eager) {
    bool busy = false;
    *inflight = false;
    *eager = false;
    for (auto& kv : comms) {
      CommState& cs = *kv.second;
      for (Group& g : cs.groups) {
        busy = CompleteGroup(cs, g) || busy;
        if (!failure.ok()) return true;
        *eager = *eager || !g.inflight.empty();
      }
      bool messages = CompletePointToPoint(cs);
      if (!failure.ok()) return true;
      busy = busy || (messages && send_poll_us == 0);
      for (const InFlight& f : cs.p2p_inflight) {
        *eager = *eager || f.request.kind == Kind::kRecv || send_poll_us == 0;
      }
      *inflight = *inflight || *eager || !cs.p2p_inflight.empty();
    }
    return busy;
  }

  bool CompleteGroup(CommState& cs, Group& g) {
    bool busy = false;
    while (!g.inflight.empty()) {
      InFlight& f = g.inflight.front();
      int done = 1;
      if (f.mpi != MPI_REQUEST_NULL || f.ring) {
        int err = TestInFlight(f, &done);
        if (err != MPI_SUCCESS) {
          FailMpi(f.request, err, "progressing");
          return true;
        }
      }
      if (!done) break;
      Request r = std::move(f.request);
      g.inflight.pop_front();
      g.hold = false;
      busy = true;
      if (r.then) {
        Request next;
        Status s = r.then(&next);
        if (!s.ok()) {
          r.done(s);
        } else if (next.done) {
          // Continue in the same group, ahead of everything else.
          next.comm = r.comm;
          next.group = r.group;
          next.index = r.index;
          next.group_size = r.group_size;
          next.timeout_s = r.timeout_s;
          Start(cs, g, std::move(next), Now());
          if (!failure.ok()) return true;
        } else {
          r.done(Status::Ok());
        }
      } else {
        r.done(Status::Ok());
      }
    }
    // Later collectives of the group may progress too.
    for (size_t k = 1; k < g.inflight.size(); ++k) {
      InFlight& f = g.inflight[k];
      if (f.mpi == MPI_REQUEST_NULL && !f.ring) continue;
      int done = 0;
      int err = TestInFlight(f, &done);
      if (err != MPI_SUCCESS) {
        FailMpi(f.request, err, "progressing");
        return true;
      }
    }
    return busy;
  }

  // Progresses the collective of `f`; `*done` once it has completed.
  static int TestInFlight(InFlight& f, int* done) {
    if (!f.ring) return MPI_Test(&f.mpi, done, MPI_STATUS_IGNORE);
    bool finished = false;
    int err = f.ring->Progress(&finished);
    *done = finished ? 1 : 0;
    return err;
  }

  bool CompletePointToPoint(CommState& cs) {
    bool busy = false;
    for (auto it = cs.p2p_inflight.begin(); it != cs.p2p_inflight.end();) {
      int done = 0;
      MPI_Status st;
      std::memset(&st, 0, sizeof(st));
      int err = MPI_Test(&it->mpi, &done, &st);
      const Request& r = it->request;
      int err_class = MPI_SUCCESS;
      if (err != MPI_SUCCESS && MPI_Error_class(err, &err_class) != MPI_SUCCESS) {
        err_class = MPI_ERR_OTHER;
      }
      if (err != MPI_SUCCESS && !(r.kind == Kind::kRecv && err_class == MPI_ERR_TRUNCATE)) {
        FailMpi(r, err, "progressing");
        return true;
      }
      if (!done && err == MPI_SUCCESS) {
        ++it;
        continue;
      }
      Request q = std::move(it->request);
      it = cs.p2p_inflight.erase(it);
      busy = true;
      Status s;
      if (q.kind == Kind::kRecv) {
        int got = -1;
        if (err == MPI_SUCCESS && MPI_Get_count(&st, ToMpi(q.dtype), &got) != MPI_SUCCESS) {
          got = -1;
        }
        if (err != MPI_SUCCESS || got != q.count) {
          std::ostringstream os;
          os << "tf_smdist: recv '" << q.name << "' from " << cs.Describe(q.peer)
             << " with tag " << q.tag << " expected " << q.count << " elements of "
             << DataTypeSize(q.dtype) << " bytes, but the message ";
          if (err != MPI_SUCCESS) {
            os << "is larger (" << MpiErrorString(err) << ")";
          } else {
            os << "holds " << got << " elements";
          }
          os << ". The sender and the receiver must agree on the shape and dtype of each "
                "message of a tag.";
          s = {Code::kInvalidArgument, os.str()};
        }
      }
      q.done(s);
    }
    return busy;
  }

  // Runs the queued benchmark requests (no other work is queued).
  void RunBenchmarks() {
    while (!benchmarks.empty() && failure.ok()) {
      Request r = std::move(benchmarks.front());
      benchmarks.pop_front();
      CommState* cs = comms.count(r.comm) ? comms[r.comm].get() : nullptr;
      if (cs == nullptr) {
        r.done({Code::kInvalidArgument, "tf_smdist: benchmark on an unknown communicator"});
        continue;
      }
      MPI_Comm comm = cs->groups[0].comm;
      std::vector<float> buf(static_cast<size_t>(std::max<int64_t>(r.count, 1)), 1.0f);
      int err = MPI_Barrier(comm);
      double t0 = MPI_Wtime();
      for (int i = 0; i < r.index && err == MPI_SUCCESS; ++i) {
        err = MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(r.count), MPI_FLOAT,
                            MPI_SUM, comm);
      }
      double seconds = (MPI_Wtime() - t0) / std::max(1, r.index);
      if (err != MPI_SUCCESS) {
        FailMpi(r, err, "running");
        r.done(failure);
        return;
      }
      if (r.recv != nullptr) std::memcpy(r.recv, &seconds, sizeof(seconds));
      r.done(Status::Ok());
    }
  }

  std::vector<int64_t> WorldStarted() const {
    std::vector<int64_t> started(kMaxGroups, 0);
    auto it = comms.find(0);
    if (it == comms.end()) return started;
    for (int g = 0; g < kMaxGroups; ++g) started[g] = it->second->groups[g].started;
    return started;
  }

  bool AnyWaiting() const {
    for (const auto& kv : comms) {
      for (const Group& g : kv.second->groups) {
        if (!g.waiting.empty()) return true;
      }
    }
    return false;
  }

  // --- the loop --------------------------------------------------------------

  void Main() {
    last_activity = Now();
    for (;;) {
      std::deque<Request> batch;
      std::deque<std::function<void()>> tasks;
      bool stop = false;
      {
        std::lock_guard<std::mutex> lock(c.mu_);
        batch.swap(c.incoming_);
        tasks.swap(c.tasks_);
        stop = c.stop_;
      }
      double now = Now();
      // Collective activity keeps the thread spinning a while (the next
      // request of a chain follows soon); messages do not (see Wait).
      bool busy = !tasks.empty();
      for (Request& r : batch) {
        busy = busy || !IsPointToPoint(r.kind) || send_poll_us == 0;
        Accept(std::move(r), now);
      }
      for (auto& task : tasks) task();
      if (failure.ok()) busy = StartReady(now) || busy;
      bool inflight = false;
      bool eager = false;
      if (failure.ok()) busy = Complete(&inflight, &eager) || busy;
      now = Now();
      Status hb = SendHeartbeat(now);
      if (hb.ok()) hb = heartbeats.Poll(now);
      if (!hb.ok()) Fail(hb);
      Detect(now);
      if (failure.ok()) CheckDeadlines(now);
      if (failure.ok()) FinishDestroys();
      if (busy) last_activity = now;
      if (busy || !batch.empty()) recv_poll_next_us = recv_poll_us;
      bool idle = failure.ok() ? !inflight && !AnyWaiting() : true;
      if (!failure.ok()) eager = false;
      if (!benchmarks.empty() && idle) {
        RunBenchmarks();
        last_activity = Now();
        continue;
      }
      if (stop && idle) break;
      Wait(now, inflight, eager);
    }
    Finish();
  }

  // Between polls: while a collective or a receive is in flight, yield the
  // core (spinning for about as long as the transfer should take, then
  // sleeps: MPI progresses non-blocking requests only inside MPI calls).
  // The sleeps grow from `recv_poll_us` to `recv_poll_max_us` while nothing
  // happens: a receive posted long before its data (the next stage's input
  // while the previous stage computes) then costs about 2,000 wake-ups a
  // second instead of 20,000, CPU that a stage sharing the core needs.
  // While only sends are in flight, sleep until a request arrives or
  // `send_poll_us` passes: on one host the receiver copies the data itself
  // (single-copy shared memory), so polling sends only releases them, and
  // spinning would take the core from the computation that shares it (a
  // pipeline stage pinned to one core); with `SMDIST_MPI_SEND_POLL_US=0`
  // sends are polled like receives (transports where the sender pushes the
  // data). Otherwise sleep until a request arrives or the next heartbeat is
  // due.
  void Wait(double now, bool inflight, bool eager) {
    if (inflight && !eager) {
      std::unique_lock<std::mutex> lock(c.mu_);
      c.cv_.wait_for(lock, std::chrono::microseconds(send_poll_us), [this] {
        return !c.incoming_.empty() || !c.tasks_.empty() || c.stop_;
      });
      return;
    }
    if (inflight) {
      if (now - last_activity < spin_s || now < spin_until) {
        if (WorkQueued()) return;  // queued by a request's `done` or a task
        sched_yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(recv_poll_next_us));
        recv_poll_next_us = std::min(recv_poll_max_us, 2 * recv_poll_next_us);
      }
      return;
    }
    std::unique_lock<std::mutex> lock(c.mu_);
    auto wait = AnyWaiting() ? std::chrono::milliseconds(20)
                             : std::chrono::milliseconds(static_cast<int>(
                                   std::max(1.0, 1000.0 * options().heartbeat_s / 4)));
    if (now - last_activity < spin_s) {
      bool queued = !c.incoming_.empty() || !c.tasks_.empty();
      lock.unlock();
      if (!queued) sched_yield();
      return;
    }
    c.cv_.wait_for(lock, wait,
                   [this] { return !c.incoming_.empty() || !c.tasks_.empty() || c.stop_; });
  }

  // Whether requests or tasks wait to be taken up: then the next poll comes
  // at once, without yielding the core first.
  bool WorkQueued() {
    std::lock_guard<std::mutex> lock(c.mu_);
    return !c.incoming_.empty() || !c.tasks_.empty();
  }

  // Sends this rank's heartbeat when one is due; a change of its state (it
  // failed) goes out at once.
  Status SendHeartbeat(double now) {
    Status s = heartbeats.Send(now, my_state != sent_state, my_state, WorldStarted());
    if (s.ok()) sent_state = my_state;
    return s;
  }

  void Finish() {
    Status final_status = failure;
    if (failure.ok()) {
      // Tell the peers this rank is leaving, then drain the heartbeats so
      // that none is in flight at MPI_Finalize.
      my_state = kFinishing;
      Status s = heartbeats.Send(Now(), true, my_state, WorldStarted());
      if (s.ok()) {
        double now = Now();
        s = heartbeats.Drain(ctrl_comm, now + options().timeout_s,
                             [this] { return PeersReport(-1, 0, Now()); });
      }
      final_status = s;
    }
    if (final_status.ok()) {
      for (auto& kv : comms) {
        if (final_status.ok()) final_status = FreeComm(kv.second.get());
      }
      for (int i = 0; i < 4 && final_status.ok(); ++i) {
        final_status = MpiStatus(MPI_Op_free(&half_ops[i]), "MPI_Op_free");
        if (final_status.ok()) {
          final_status = MpiStatus(MPI_Op_free(&bf16_ops[i]), "MPI_Op_free");
        }
      }
      if (final_status.ok()) final_status = MpiStatus(MPI_Op_free(&byte_sum), "MPI_Op_free");
      if (final_status.ok()) final_status = MpiStatus(MPI_Op_free(&byte_prod), "MPI_Op_free");
      if (final_status.ok()) final_status = MpiStatus(MPI_Comm_free(&hb_comm), "MPI_Comm_free");
      if (final_status.ok()) {
        final_status = MpiStatus(MPI_Comm_free(&ctrl_comm), "MPI_Comm_free");
      }
      if (final_status.ok() && we_initialised) {
        final_status = MpiStatus(MPI_Finalize(), "MPI_Finalize");
      }
    }
    if (!failure.ok()) {
      // The process may exit right after: make sure the successor's
      // heartbeat saying that this rank failed is on its way (a bounded
      // wait), so that the peers fail about half a second later, not at
      // their timeout.
      Status s = SendHeartbeat(Now());
      for (double until = Now() + 0.2; s.ok() && heartbeats.sending() && Now() < until;) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        s = heartbeats.Poll(Now());
      }
    }
    // After a failure MPI is left initialised on purpose (see comm.h).
    std::deque<Request> rest;
    std::deque<std::function<void()>> tasks;
    {
      std::lock_guard<std::mutex> lock(c.mu_);
      rest.swap(c.incoming_);
      tasks.swap(c.tasks_);
      c.stopped_ = true;
      c.shutdown_status_ = final_status;
      c.comm_info_.clear();
    }
    Status closed{Code::kFailedPrecondition, "the tf_smdist MPI communicator has been shut down"};
    if (!failure.ok()) closed = failure;
    for (Request& r : rest) r.done(closed);
    for (auto& kv : comms) {
      for (auto& w : kv.second->destroy_waiters) w->set_value(closed);
      kv.second->destroy_waiters.clear();
    }
    stopped = true;
    for (auto& task : tasks) task();  // they see `stopped` and report it
  }

  bool stopped = false;
};

Communicator& Communicator::Get() {
  static Communicator* instance = new Communicator();  // never destroyed
  return *instance;
}

bool Communicator::initialized() const {
  std::lock_guard<std::mutex> lock(mu_);
  return init_done_ && init_status_.ok() && !stopped_;
}

Status Communicator::Init(const Options& options) {
  std::unique_lock<std::mutex> lock(mu_);
  if (init_called_) {
    cv_.wait(lock, [this] { return init_done_; });
    return init_status_;
  }
  init_called_ = true;
  options_ = options;
  impl_ = new Impl(this);
  // MPI parameters are set here, before the thread exists and before MPI
  // reads them. Open MPI's non-blocking all-reduce (coll/libnbc) picks
  // binomial / recursive doubling for few processes, about 2x slower than
  // the blocking MPI_Allreduce from 256 KB up; its ring algorithm matches the
  // blocking one (measured: 16 MB, 2 processes, 3.4 ms vs 13.1 ms). A value
  // the user set is kept.
  setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", 0);
  thread_ = std::thread([this] { ThreadMain(); });
  cv_.wait(lock, [this] { return init_done_; });
  return init_status_;
}

void Communicator::ThreadMain() {
  Status init = impl_->Setup();
  {
    std::lock_guard<std::mutex> lock(mu_);
    init_status_ = init;
    init_done_ = true;
  }
  cv_.notify_all();
  if (!init.ok()) return;
  impl_->Main();
}

void Communicator::Enqueue(Request request) {
  Status s;
  if (request.comm < 0) {
    s = {Code::kInvalidArgument,
         "tf_smdist: `comm` must be 0 (the world) or an id from CreateComm. Received: comm=" +
             std::to_string(request.comm)};
    request.done(s);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (init_done_ && init_status_.ok() && !stop_) {
      incoming_.push_back(std::move(request));
    } else {
      s.code = Code::kFailedPrecondition;
      s.message = !init_done_ || !init_status_.ok()
                      ? "the tf_smdist MPI communicator is not initialised; call "
                        "tf_smdist.data_parallel.cluster.initialize() first"
                      : "the tf_smdist MPI communicator has been shut down";
    }
  }
  if (s.ok()) {
    cv_.notify_all();
  } else {
    request.done(s);
  }
}

Status Communicator::Run(Request request) {
  auto promise = std::make_shared<std::promise<Status>>();
  std::future<Status> future = promise->get_future();
  request.done = [promise](const Status& s) { promise->set_value(s); };
  Enqueue(std::move(request));
  return future.get();
}

Status Communicator::RunControl(Request request) {
  auto promise = std::make_shared<std::promise<Status>>();
  std::future<Status> future = promise->get_future();
  request.done = [promise](const Status& s) { promise->set_value(s); };
  request.comm = kControlComm;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!init_done_ || !init_status_.ok() || stop_) {
      return {Code::kFailedPrecondition,
              "the tf_smdist MPI communicator is not initialised or was shut down"};
    }
    incoming_.push_back(std::move(request));
  }
  cv_.notify_all();
  return future.get();
}

void Communicator::Abort(const std::string& message) {
  Post([this, message] {
    impl_->Fail({Code::kFailedPrecondition,
                 "tf_smdist: rank " + std::to_string(rank_) + " stopped communicating: " +
                     message});
  });
}

bool Communicator::Post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!init_done_ || !init_status_.ok() || stop_) return false;
    tasks_.push_back(std::move(task));
  }
  cv_.notify_all();
  return true;
}

Status Communicator::CreateComm(const std::vector<int>& ranks, int* id) {
  *id = -1;
  if (!initialized()) {
    return {Code::kFailedPrecondition,
            "tf_smdist: create_comm needs the MPI communicator; call "
            "tf_smdist.data_parallel.cluster.initialize() first"};
  }
  std::lock_guard<std::mutex> create_lock(create_mu_);
  // Every rank shows its list to every other (watchdog-guarded), so that a
  // mismatch is the same error on every rank instead of a hang.
  std::vector<int64_t> mine(ranks.begin(), ranks.end());
  std::vector<int64_t> lengths(size_, 0);
  int64_t my_length = static_cast<int64_t>(mine.size());
  Request r;
  r.kind = Kind::kAllgather;
  r.name = "create_comm (rank list lengths)";
  r.send = &my_length;
  r.recv = lengths.data();
  r.count = 1;
  r.dtype = DataType::kInt64;
  Status s = RunControl(std::move(r));
  if (!s.ok()) return s;
  int64_t total = 0;
  for (int64_t n : lengths) total += n;
  std::vector<int64_t> all(static_cast<size_t>(std::max<int64_t>(total, 1)), 0);
  Request q;
  q.kind = Kind::kAllgatherv;
  q.name = "create_comm (rank lists)";
  q.send = mine.data();
  q.recv = all.data();
  q.counts = lengths;
  q.dtype = DataType::kInt64;
  s = RunControl(std::move(q));
  if (!s.ok()) return s;
  std::vector<int64_t> offsets(size_ + 1, 0);
  for (int i = 0; i < size_; ++i) offsets[i + 1] = offsets[i] + lengths[i];
  for (int other = 1; other < size_; ++other) {
    bool same = lengths[other] == lengths[0] &&
                std::equal(all.begin() + offsets[other], all.begin() + offsets[other + 1],
                           all.begin());
    if (!same) {
      return {Code::kFailedPrecondition,
              "tf_smdist: create_comm was called with different rank lists: rank 0 passed "
              "ranks=" + RankList(all.data(), lengths[0]) + " but rank " +
                  std::to_string(other) + " passed ranks=" +
                  RankList(all.data() + offsets[other], lengths[other]) +
                  ". Every rank must call create_comm in the same order with the same list."};
    }
  }
  std::vector<bool> seen(size_, false);
  for (int x : ranks) {
    if (x < 0 || x >= size_ || seen[x]) {
      return {Code::kInvalidArgument,
              "tf_smdist: create_comm needs distinct world ranks in [0, " +
                  std::to_string(size_) + "). Received: ranks=" +
                  RankList(mine.data(), my_length)};
    }
    seen[x] = true;
  }
  if (ranks.empty()) {
    return {Code::kInvalidArgument,
            "tf_smdist: create_comm needs at least one rank. Received: ranks=[]"};
  }
  int new_id = next_comm_id_++;
  if (!seen[rank_]) return Status::Ok();
  auto promise = std::make_shared<std::promise<Status>>();
  std::future<Status> future = promise->get_future();
  bool posted = Post([this, promise, new_id, ranks] {
    if (impl_->stopped) {
      promise->set_value({Code::kFailedPrecondition,
                          "the tf_smdist MPI communicator has been shut down"});
      return;
    }
    promise->set_value(impl_->CreateComm(new_id, ranks));
  });
  if (!posted) {
    return {Code::kFailedPrecondition, "the tf_smdist MPI communicator has been shut down"};
  }
  s = future.get();
  if (s.ok()) *id = new_id;
  return s;
}

Status Communicator::DestroyComm(int id) {
  if (id == 0) {
    return {Code::kInvalidArgument,
            "tf_smdist: the world communicator (comm=0) cannot be destroyed. Received: comm=0"};
  }
  auto promise = std::make_shared<std::promise<Status>>();
  std::future<Status> future = promise->get_future();
  bool posted = Post([this, promise, id] {
    if (impl_->stopped) {
      promise->set_value({Code::kFailedPrecondition,
                          "the tf_smdist MPI communicator has been shut down"});
      return;
    }
    impl_->RequestDestroy(id, promise);
  });
  if (!posted) {
    return {Code::kFailedPrecondition,
            "tf_smdist: the MPI communicator is not initialised or was shut down"};
  }
  return future.get();
}

int Communicator::CommRank(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = comm_info_.find(id);
  return it == comm_info_.end() ? -1 : it->second.first;
}

int Communicator::CommSize(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = comm_info_.find(id);
  return it == comm_info_.end() ? -1 : it->second.second;
}

double Communicator::TimeNativeAllreduce(int64_t count, int iters) {
  double seconds = -1.0;
  Request r;
  r.kind = Kind::kBenchmark;
  r.name = "native allreduce benchmark";
  r.count = count;
  r.index = iters;
  r.recv = &seconds;
  Status s = Run(std::move(r));
  return s.ok() ? seconds : -1.0;
}

Status Communicator::Shutdown() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (!init_called_) return Status::Ok();
    cv_.wait(lock, [this] { return init_done_; });
    if (!init_status_.ok()) {
      lock.unlock();
      std::lock_guard<std::mutex> join_lock(join_mu_);
      if (thread_.joinable()) thread_.join();
      return Status::Ok();
    }
    stop_ = true;
  }
  cv_.notify_all();
  std::lock_guard<std::mutex> join_lock(join_mu_);
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  return shutdown_status_;
}

}  // namespace mpi
}  // namespace smdist
