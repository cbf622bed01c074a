// Name-matched collectives over the MPI communication thread (see negotiator.h).
#include "kernels/mpi/negotiator.h"

#include "kernels/common/fp16.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <set>
#include <sstream>
#include <utility>

namespace smdist {
namespace hvd {

namespace {

// Bytes per rank of the first, fixed-size gather of a cycle (longer
// announcements take a second gather of the rest): 32 KB over the set,
// between 1 and 4 KB per rank, so the gather stays small for large sets.
int64_t SlotBytes(int size) {
  return std::max<int64_t>(1024, std::min<int64_t>(4096, (32 << 10) / std::max(1, size)));
}
// All-reduces of at most this many bytes carry their values in the
// announcement: every rank reduces them from the gathered announcements, so
// they need no collective of their own (one round trip instead of two).
// Half the slot, which leaves room for the names.
int64_t InlineBytes(int size) { return SlotBytes(size) / 2; }
// The world's ordering groups reserved for the global process set (the
// bucket plans of the data-parallel strategy take groups 1..61).
constexpr int kWorldNegoGroup = 62;
constexpr int kWorldDataGroup = 63;

double Now() {
  using Clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

int64_t ElementSize(mpi::DataType dtype) {
  switch (dtype) {
    case mpi::DataType::kFloat64:
    case mpi::DataType::kInt64:
      return 8;
    case mpi::DataType::kFloat32:
    case mpi::DataType::kInt32:
      return 4;
    case mpi::DataType::kFloat16:
    case mpi::DataType::kBFloat16:
    case mpi::DataType::kInt16:
    case mpi::DataType::kUint16:
      return 2;
    case mpi::DataType::kUint8:
    case mpi::DataType::kInt8:
    case mpi::DataType::kBool:
      return 1;
  }
  return 1;
}

const char* DataTypeName(mpi::DataType dtype) {
  switch (dtype) {
    case mpi::DataType::kFloat32: return "float32";
    case mpi::DataType::kFloat64: return "float64";
    case mpi::DataType::kFloat16: return "float16";
    case mpi::DataType::kBFloat16: return "bfloat16";
    case mpi::DataType::kInt32: return "int32";
    case mpi::DataType::kInt64: return "int64";
    case mpi::DataType::kUint8: return "uint8";
    case mpi::DataType::kInt8: return "int8";
    case mpi::DataType::kInt16: return "int16";
    case mpi::DataType::kUint16: return "uint16";
    case mpi::DataType::kBool: return "bool";
  }
  return "unknown";
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t RowElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

mpi::Reduction ToReduction(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMin: return mpi::Reduction::kMin;
    case ReduceOp::kMax: return mpi::Reduction::kMax;
    case ReduceOp::kProduct: return mpi::Reduction::kProd;
    default: return mpi::Reduction::kSum;
  }
}

mpi::Status Error(mpi::Code code, const std::string& message) {
  mpi::Status s;
  s.code = code;
  s.message = message;
  return s;
}

// Rows of a reduce-scatter kept by `rank`: as even as possible, the lower
// ranks get one more.
int64_t ScatterRows(int64_t rows, int size, int rank) {
  return rows / size + (rank < rows % size ? 1 : 0);
}

// acc <- acc (op) x, elementwise, in T's arithmetic (16-bit floats through
// float, rounded once per step; bool: or for sum/max, and for min/product).
template <typename T>
void ReduceInto(ReduceOp op, T* acc, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    switch (op) {
      case ReduceOp::kMin: acc[i] = x[i] < acc[i] ? x[i] : acc[i]; break;
      case ReduceOp::kMax: acc[i] = x[i] > acc[i] ? x[i] : acc[i]; break;
      case ReduceOp::kProduct: acc[i] = static_cast<T>(acc[i] * x[i]); break;
      default: acc[i] = static_cast<T>(acc[i] + x[i]); break;
    }
  }
}

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
void Reduce16(ReduceOp op, uint16_t* acc, const uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float a = ToFloat(acc[i]), b = ToFloat(x[i]);
    float r = op == ReduceOp::kMin   ? (b < a ? b : a)
              : op == ReduceOp::kMax ? (b > a ? b : a)
              : op == ReduceOp::kProduct ? a * b
                                         : a + b;
    acc[i] = FromFloat(r);
  }
}

void ReduceBool(ReduceOp op, uint8_t* acc, const uint8_t* x, int64_t n) {
  bool conj = op == ReduceOp::kMin || op == ReduceOp::kProduct;
  for (int64_t i = 0; i < n; ++i) {
    acc[i] = conj ? (acc[i] && x[i]) : (acc[i] || x[i]);
  }
}

void Reduce(mpi::DataType dtype, ReduceOp op, void* acc, const void* x, int64_t n) {
  if (op == ReduceOp::kAverage) op = ReduceOp::kSum;  // the caller scales
  switch (dtype) {
    case mpi::DataType::kFloat32:
      ReduceInto(op, static_cast<float*>(acc), static_cast<const float*>(x), n);
      break;
    case mpi::DataType::kFloat64:
      ReduceInto(op, static_cast<double*>(acc), static_cast<const double*>(x), n);
      break;
    case mpi::DataType::kInt32:
      ReduceInto(op, static_cast<int32_t*>(acc), static_cast<const int32_t*>(x), n);
      break;
    case mpi::DataType::kInt64:
      ReduceInto(op, static_cast<int64_t*>(acc), static_cast<const int64_t*>(x), n);
      break;
    case mpi::DataType::kUint8:
      ReduceInto(op, static_cast<uint8_t*>(acc), static_cast<const uint8_t*>(x), n);
      break;
    case mpi::DataType::kInt8:
      ReduceInto(op, static_cast<int8_t*>(acc), static_cast<const int8_t*>(x), n);
      break;
    case mpi::DataType::kInt16:
      ReduceInto(op, static_cast<int16_t*>(acc), static_cast<const int16_t*>(x), n);
      break;
    case mpi::DataType::kUint16:
      ReduceInto(op, static_cast<uint16_t*>(acc), static_cast<const uint16_t*>(x), n);
      break;
    case mpi::DataType::kFloat16:
      Reduce16<fp16::HalfToFloat, fp16::FloatToHalf>(
          op, static_cast<uint16_t*>(acc), static_cast<const uint16_t*>(x), n);
      break;
    case mpi::DataType::kBFloat16:
      Reduce16<fp16::BFloat16ToFloat, fp16::FloatToBFloat16>(
          op, static_cast<uint16_t*>(acc), static_cast<const uint16_t*>(x), n);
      break;
    case mpi::DataType::kBool:
      ReduceBool(op, static_cast<uint8_t*>(acc), static_cast<const uint8_t*>(x), n);
      break;
  }
}

class Writer {
 public:
  void U8(int v) { out_.push_back(static_cast<char>(v)); }
  void I32(int32_t v) { Raw(&v, sizeof(v)); }
  void I64(int64_t v) { Raw(&v, sizeof(v)); }
  void F64(double v) { Raw(&v, sizeof(v)); }
  void Str(const std::string& s) {
    I32(static_cast<int32_t>(s.size()));
    out_.append(s);
  }
  void I64s(const std::vector<int64_t>& v) {
    I32(static_cast<int32_t>(v.size()));
    for (int64_t x : v) I64(x);
  }
  void Bytes(const void* p, size_t n) {
    I32(static_cast<int32_t>(n));
    Raw(p, n);
  }
  const std::string& str() const { return out_; }

 private:
  void Raw(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string out_;
};

class Reader {
 public:
  explicit Reader(const std::string& s) : s_(s) {}
  bool ok() const { return ok_; }
  int U8() {
    if (!Need(1)) return 0;
    return static_cast<unsigned char>(s_[pos_++]);
  }
  int32_t I32() { return Get<int32_t>(); }
  int64_t I64() { return Get<int64_t>(); }
  double F64() { return Get<double>(); }
  std::string Str() {
    int32_t n = I32();
    if (n < 0 || !Need(static_cast<size_t>(n))) return std::string();
    std::string out = s_.substr(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return out;
  }
  std::vector<int64_t> I64s() {
    int32_t n = I32();
    std::vector<int64_t> out;
    if (n < 0 || !Need(static_cast<size_t>(n) * 8)) return out;
    for (int32_t i = 0; i < n; ++i) out.push_back(I64());
    return out;
  }

 private:
  template <typename T>
  T Get() {
    T v{};
    if (!Need(sizeof(T))) return v;
    std::memcpy(&v, s_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  bool Need(size_t n) {
    if (pos_ + n > s_.size()) ok_ = false;
    return ok_;
  }
  const std::string& s_;
  size_t pos_ = 0;
  bool ok_ = true;
};

}  // namespace

struct Negotiator::NameSet {
  std::mutex mu;
  std::set<std::string> names;
};

const char* OpTypeName(OpType type) {
  switch (type) {
    case OpType::kAllreduce: return "allreduce";
    case OpType::kAllgather: return "allgather";
    case OpType::kBroadcast: return "broadcast";
    case OpType::kAlltoall: return "alltoall";
    case OpType::kReducescatter: return "reducescatter";
    case OpType::kBarrier: return "barrier";
    case OpType::kJoin: return "join";
  }
  return "collective";
}

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kAverage: return "Average";
    case ReduceOp::kSum: return "Sum";
    case ReduceOp::kAdasum: return "Adasum";
    case ReduceOp::kMin: return "Min";
    case ReduceOp::kMax: return "Max";
    case ReduceOp::kProduct: return "Product";
  }
  return "unknown";
}

// What one rank announced for a name.
struct Negotiator::Meta {
  bool present = false;
  OpType type = OpType::kAllreduce;
  mpi::DataType dtype = mpi::DataType::kFloat32;
  std::vector<int64_t> shape;
  ReduceOp reduce_op = ReduceOp::kSum;
  double prescale = 1.0;
  double postscale = 1.0;
  int root = 0;
  std::vector<int64_t> splits;
  std::string values;  // small all-reduces: this rank's (prescaled) values
  int64_t cycle = 0;
};

struct Negotiator::Pending {
  int64_t order = 0;
  double first_seen = 0;
  int count = 0;
  bool warned = false;  // rank 0: the stall warning was printed
  std::vector<Meta> ranks;
  const Meta& any() const {
    for (const Meta& m : ranks) {
      if (m.present) return m;
    }
    return ranks[0];
  }
};

Negotiator::Negotiator(int comm, int nego_group, int data_group, int rank, int size,
                       const NegotiatorOptions& options)
    : comm_(comm),
      nego_group_(nego_group),
      data_group_(data_group),
      rank_(rank),
      size_(size),
      options_(options) {
  names_ = std::make_shared<NameSet>();
  thread_ = std::thread([this] { Loop(); });
}

Negotiator::~Negotiator() { Stop(); }

mpi::Status Negotiator::Enqueue(Entry entry) {
  std::vector<Entry> one;
  one.push_back(std::move(entry));
  return EnqueueGroup(std::move(one));
}

mpi::Status Negotiator::EnqueueGroup(std::vector<Entry> entries) {
  std::shared_ptr<NameSet> names = names_;
  {
    std::lock_guard<std::mutex> lock(names->mu);
    std::set<std::string> batch;
    for (const Entry& e : entries) {
      if (names->names.count(e.name) || batch.count(e.name)) {
        return Error(mpi::Code::kInvalidArgument,
                     std::string("tf_smdist.horovod: a ") + OpTypeName(e.type) +
                         " named '" + e.name +
                         "' is already pending on this rank (rank " + std::to_string(rank_) +
                         "). Received: name='" + e.name +
                         "' twice. Give concurrent collectives distinct names.");
      }
      batch.insert(e.name);
    }
  }
  bool start = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ || failed_) {
      return failed_ ? failure_
                     : Error(mpi::Code::kFailedPrecondition,
                             "tf_smdist.horovod has been shut down; call hvd.init() again.");
    }
    {
      std::lock_guard<std::mutex> names_lock(names->mu);
      for (Entry& e : entries) {
        names->names.insert(e.name);
        EntryDoneFn done = std::move(e.done);
        std::string name = e.name;
        e.done = [names, name, done](const mpi::Status& s, int join_rank) {
          {
            std::lock_guard<std::mutex> l(names->mu);
            names->names.erase(name);
          }
          done(s, join_rank);
        };
      }
    }
    for (Entry& e : entries) incoming_.push_back(std::move(e));
    // Nothing pending and no cycle running: this request starts one now
    // (an eager call's latency). Otherwise the running cycle, or the pacing
    // thread once the cycle time has passed, takes it.
    if (!cycle_active_ && !table_pending_) {
      cycle_active_ = true;
      start = true;
    }
  }
  if (start) PostCycle();
  return mpi::Status::Ok();
}

void Negotiator::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::string Negotiator::EagerName(const char* kind) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = ++eager_counts_[kind];
  return std::string(kind) + ".eager." + std::to_string(n);
}

Counters Negotiator::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

// The pacing thread. Cycles run on the communication thread (RunCycle): the
// announcement's gather, the decision and the collectives it starts follow
// each other there without a hand-off between threads. This thread only
// starts the cycles that wait for the cycle time (names still pending on
// some member keep every member cycling), and on Stop waits for the set to
// drain.
void Negotiator::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (cycle_active_) {
      cv_.wait(lock, [this] { return !cycle_active_; });
      continue;
    }
    if (failed_) break;
    if (table_pending_) {
      // A cycle left names pending: the next starts a cycle time after the
      // last began (this also gathers a burst of requests into one cycle).
      auto start_at = std::chrono::steady_clock::time_point(
          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
              std::chrono::duration<double>(last_start_ + options_.cycle_time_s)));
      if (std::chrono::steady_clock::now() < start_at) {
        cv_.wait_until(lock, start_at);
        continue;
      }
    } else if (incoming_.empty()) {
      if (stop_) break;  // nothing pending anywhere
      cv_.wait(lock);
      continue;
    }
    // Names pending, or requests waiting (not expected: EnqueueGroup and
    // EndCycle start cycles for theirs): start a cycle.
    cycle_active_ = true;
    lock.unlock();
    PostCycle();
    lock.lock();
  }
  // Whatever is left can no longer complete.
  mpi::Status closed = failed_ ? failure_
                               : Error(mpi::Code::kFailedPrecondition,
                                       "tf_smdist.horovod was shut down before this collective "
                                       "completed on every rank.");
  for (Entry& e : incoming_) local_.emplace(e.name, std::move(e));
  incoming_.clear();
  lock.unlock();
  FailAll(closed);
}

void Negotiator::PostCycle() {
  if (mpi::Communicator::Get().Post([this] { RunCycle(); })) return;
  EndCycle(Error(mpi::Code::kFailedPrecondition,
                 "the tf_smdist MPI communicator has been shut down, so this collective "
                 "cannot be negotiated."),
           {}, 0);
}

void Negotiator::FailLocal(const std::string& name, const mpi::Status& status) {
  auto it = local_.find(name);
  if (it == local_.end()) return;
  Entry e = std::move(it->second);
  local_.erase(it);
  e.done(status, -1);
}

void Negotiator::FailAll(const mpi::Status& status) {
  std::map<std::string, Entry> local;
  local.swap(local_);
  for (auto& kv : local) kv.second.done(status, -1);
  table_.clear();
}

// Gathers every member's announcement `mine` (on the communication thread,
// without blocking it), then calls `then` there with the status and the
// announcements in rank order.
void Negotiator::Exchange(std::string mine, ExchangeDone then) {
  std::string label = "negotiation of tf_smdist.horovod collectives";
  if (!local_.empty()) {
    label += " (this rank has issued";
    int n = 0;
    for (const auto& kv : local_) {
      if (n++ == 4) {
        label += " ...";
        break;
      }
      label += " '" + kv.first + "'";
    }
    label += ", which the late ranks have not)";
  }
  // The gathers' state; the negotiator itself outlives them (a cycle runs
  // until EndCycle, and Stop waits for that).
  struct Gather {
    std::string label, mine;
    std::vector<char> send, recv, send2, recv2;
    int64_t rest = 0;
    std::vector<int64_t> lens;
  };
  auto g = std::make_shared<Gather>();
  g->label = std::move(label);
  g->mine = std::move(mine);
  const int64_t slot = SlotBytes(size_);
  auto enqueue = [this, g](std::vector<char>* send, std::vector<char>* recv, int64_t count,
                           mpi::DoneCallback done) {
    mpi::Request r;
    r.kind = mpi::Kind::kAllgather;
    r.name = g->label;
    r.comm = comm_;
    r.group = nego_group_;
    r.send = send->data();
    r.recv = recv->data();
    r.count = count;
    r.dtype = mpi::DataType::kUint8;
    r.done = std::move(done);
    mpi::Communicator::Get().Enqueue(std::move(r));
  };
  // Both callbacks run on the communication thread.
  auto finish = [this, g, slot, then](const mpi::Status& s) {
    std::vector<std::string> all;
    if (s.ok()) {
      all.assign(size_, std::string());
      for (int i = 0; i < size_; ++i) {
        all[i].assign(g->recv.data() + slot * i + 8,
                      static_cast<size_t>(std::min<int64_t>(g->lens[i], slot - 8)));
        if (g->lens[i] > slot - 8) {
          all[i].append(g->recv2.data() + g->rest * i,
                        static_cast<size_t>(g->lens[i] - (slot - 8)));
        }
      }
    }
    then(s, all);
  };
  g->send.assign(static_cast<size_t>(slot), 0);
  int64_t len = static_cast<int64_t>(g->mine.size());
  std::memcpy(g->send.data(), &len, sizeof(len));
  std::memcpy(g->send.data() + 8, g->mine.data(),
              static_cast<size_t>(std::min<int64_t>(len, slot - 8)));
  g->recv.assign(static_cast<size_t>(slot * size_), 0);
  enqueue(&g->send, &g->recv, slot, [this, g, slot, enqueue, finish](const mpi::Status& s) {
    if (!s.ok()) {
      finish(s);
      return;
    }
    g->lens.assign(size_, 0);
    int64_t max_len = 0;
    for (int i = 0; i < size_; ++i) {
      std::memcpy(&g->lens[i], g->recv.data() + slot * i, sizeof(int64_t));
      max_len = std::max(max_len, g->lens[i]);
    }
    if (max_len <= slot - 8) {
      finish(s);
      return;
    }
    // Longer announcements: a second gather of the rest.
    g->rest = max_len - (slot - 8);
    int64_t mine_len = static_cast<int64_t>(g->mine.size());
    g->send2.assign(static_cast<size_t>(g->rest), 0);
    if (mine_len > slot - 8) {
      std::memcpy(g->send2.data(), g->mine.data() + (slot - 8),
                  static_cast<size_t>(mine_len - (slot - 8)));
    }
    g->recv2.assign(static_cast<size_t>(g->rest * size_), 0);
    enqueue(&g->send2, &g->recv2, g->rest, finish);
  });
}

// One negotiation cycle, on the communication thread; EndCycle finishes it.
void Negotiator::RunCycle() {
  const double now = Now();
  std::deque<Entry> fresh;
  {
    std::lock_guard<std::mutex> lock(mu_);
    fresh.swap(incoming_);
    last_start_ = now;
  }
  Writer w;
  w.I32(static_cast<int32_t>(fresh.size()));
  for (Entry& e : fresh) {
    w.Str(e.name);
    w.U8(static_cast<int>(e.type));
    w.U8(static_cast<int>(e.dtype));
    w.U8(static_cast<int>(e.reduce_op));
    w.I32(e.root);
    w.F64(e.prescale);
    w.F64(e.postscale);
    w.I64s(e.shape);
    w.I64s(e.splits);
    int64_t bytes = NumElements(e.shape) * ElementSize(e.dtype);
    bool inline_values = e.type == OpType::kAllreduce && bytes <= InlineBytes(size_);
    w.Bytes(AllreduceValues(e), inline_values ? static_cast<size_t>(bytes) : 0);
    std::string name = e.name;
    local_.emplace(name, std::move(e));
  }
  // The set's rank 0 decides which names stalled, by its own clock, and
  // warns about those pending for longer than the warning time.
  std::vector<std::string> stalled;
  if (rank_ == 0) {
    for (const auto& kv : table_) {
      Pending& p = *kv.second;
      double waited = now - p.first_seen;
      if (waited > options_.stall_timeout_s) {
        stalled.push_back(kv.first);
      } else if (options_.stall_warning_s > 0 && waited > options_.stall_warning_s &&
                 !p.warned) {
        p.warned = true;
        std::fprintf(stderr,
                     "tf_smdist.horovod: warning: for %.0f s, %s; every pending "
                     "collective of the set fails once one has waited %g s "
                     "(HOROVOD_STALL_SHUTDOWN_TIME_SECONDS).\n",
                     waited, Describe(kv.first, p).c_str(), options_.stall_timeout_s);
      }
    }
  }
  w.I32(static_cast<int32_t>(stalled.size()));
  for (const std::string& s : stalled) w.Str(s);

  Exchange(w.str(), [this, now](const mpi::Status& s, const std::vector<std::string>& records) {
    EndCycle(s, records, now);
  });
}

void Negotiator::EndCycle(const mpi::Status& s, const std::vector<std::string>& records,
                          double now) {
  if (!s.ok()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      failed_ = true;
      failure_ = s;
      for (Entry& e : incoming_) local_.emplace(e.name, std::move(e));
      incoming_.clear();
    }
    FailAll(s);
    std::lock_guard<std::mutex> lock(mu_);
    table_pending_ = false;
    cycle_active_ = false;
    cv_.notify_all();  // under the lock: Stop may destroy this right after
    return;
  }
  ++cycle_;
  Decide(records, now);
  bool again = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++counters_.cycles;
    table_pending_ = !table_.empty();
    // Requests that came during the cycle start the next one at once when
    // nothing is left pending; pending names wait the cycle time (Loop).
    again = !table_pending_ && !incoming_.empty() && !failed_;
    if (!again) {
      cycle_active_ = false;
      cv_.notify_all();  // under the lock: Stop may destroy this right after
    }
  }
  if (again) RunCycle();
}

std::string Negotiator::Describe(const std::string& name, const Pending& p) const {
  std::ostringstream os;
  os << OpTypeName(p.any().type) << " of tensor '" << name << "' issued by rank";
  std::ostringstream missing;
  int n_have = 0, n_missing = 0;
  for (int r = 0; r < size_; ++r) {
    if (p.ranks[r].present) {
      os << (n_have++ ? ", " : (p.count > 1 ? "s " : " ")) << r;
    } else {
      missing << (n_missing++ ? ", " : "") << r;
    }
  }
  os << " is waiting for rank" << (n_missing > 1 ? "s " : " ") << missing.str()
     << ", which did not issue it";
  return os.str();
}

std::string Negotiator::CheckMismatch(const std::string& name, const Pending& p) const {
  std::vector<int> ranks;
  for (int r = 0; r < size_; ++r) {
    if (p.ranks[r].present) ranks.push_back(r);
  }
  auto list = [&](const char* what, auto value_of) {
    std::ostringstream os;
    os << "Mismatched " << OpTypeName(p.any().type) << " " << what << " for tensor '"
       << name << "':";
    for (size_t i = 0; i < ranks.size(); ++i) {
      os << (i ? "," : "") << " rank " << ranks[i] << " has " << value_of(p.ranks[ranks[i]]);
    }
    os << ". Every rank must issue a collective of this name with the same " << what
       << ".";
    return os.str();
  };
  auto differs = [&](auto key) {
    for (int r : ranks) {
      if (!(key(p.ranks[r]) == key(p.ranks[ranks[0]]))) return true;
    }
    return false;
  };
  auto type_of = [](const Meta& m) { return static_cast<int>(m.type); };
  if (differs(type_of)) {
    std::ostringstream os;
    os << "Mismatched collective operations for tensor '" << name << "':";
    for (size_t i = 0; i < ranks.size(); ++i) {
      os << (i ? "," : "") << " rank " << ranks[i] << " did "
         << OpTypeName(p.ranks[ranks[i]].type);
    }
    os << ". Every rank must issue the same collective under one name.";
    return os.str();
  }
  OpType type = p.any().type;
  if (differs([](const Meta& m) { return static_cast<int>(m.dtype); })) {
    return list("data types", [](const Meta& m) { return std::string(DataTypeName(m.dtype)); });
  }
  auto shape_str = [](const Meta& m) { return ShapeString(m.shape); };
  if (type == OpType::kAllreduce || type == OpType::kBroadcast ||
      type == OpType::kReducescatter) {
    if (differs([](const Meta& m) { return m.shape; })) return list("shapes", shape_str);
  }
  if (type == OpType::kAllgather || type == OpType::kAlltoall) {
    auto trailing = [](const Meta& m) {
      if (m.shape.empty()) return std::vector<int64_t>{-1};
      return std::vector<int64_t>(m.shape.begin() + 1, m.shape.end());
    };
    if (differs(trailing)) return list("shapes (beyond the first dimension)", shape_str);
  }
  if (type == OpType::kAllreduce || type == OpType::kReducescatter) {
    if (differs([](const Meta& m) { return static_cast<int>(m.reduce_op); })) {
      return list("reduce ops",
                  [](const Meta& m) { return std::string(ReduceOpName(m.reduce_op)); });
    }
    if (differs([](const Meta& m) { return m.prescale; })) {
      return list("prescale factors", [](const Meta& m) { return std::to_string(m.prescale); });
    }
    if (differs([](const Meta& m) { return m.postscale; })) {
      return list("postscale factors",
                  [](const Meta& m) { return std::to_string(m.postscale); });
    }
  }
  if (type == OpType::kBroadcast) {
    if (differs([](const Meta& m) { return m.root; })) {
      return list("root ranks", [](const Meta& m) { return std::to_string(m.root); });
    }
    int root = p.any().root;
    if (root < 0 || root >= size_ || !p.ranks[root].present) {
      return "Broadcast of tensor '" + name + "' from root rank " + std::to_string(root) +
             ", which has joined (hvd.join) and cannot send it.";
    }
  }
  if (static_cast<int>(ranks.size()) < size_ &&
      (type == OpType::kAlltoall || type == OpType::kReducescatter)) {
    return std::string(OpTypeName(type)) + " of tensor '" + name +
           "' while some ranks have joined (hvd.join): only allreduce, allgather, "
           "broadcast and barrier accept joined ranks.";
  }
  if (type == OpType::kAlltoall) {
    for (int r : ranks) {
      if (static_cast<int>(p.ranks[r].splits.size()) != size_) {
        return list("splits", [](const Meta& m) { return ShapeString(m.splits); });
      }
    }
  }
  return std::string();
}

void Negotiator::Decide(const std::vector<std::string>& records, double now) {
  std::vector<std::string> stalled;
  for (int r = 0; r < size_; ++r) {
    Reader rd(records[r]);
    int32_t n = rd.I32();
    for (int32_t i = 0; i < n && rd.ok(); ++i) {
      Meta m;
      std::string name = rd.Str();
      m.present = true;
      m.type = static_cast<OpType>(rd.U8());
      m.dtype = static_cast<mpi::DataType>(rd.U8());
      m.reduce_op = static_cast<ReduceOp>(rd.U8());
      m.root = rd.I32();
      m.prescale = rd.F64();
      m.postscale = rd.F64();
      m.shape = rd.I64s();
      m.splits = rd.I64s();
      m.values = rd.Str();
      m.cycle = cycle_;
      auto& slot = table_[name];
      if (!slot) {
        slot.reset(new Pending());
        slot->order = next_order_++;
        slot->first_seen = now;
        slot->ranks.resize(size_);
      }
      if (!slot->ranks[r].present) ++slot->count;
      slot->ranks[r] = std::move(m);
    }
    int32_t ns = rd.I32();
    for (int32_t i = 0; i < ns && rd.ok(); ++i) {
      std::string name = rd.Str();
      if (r == 0) stalled.push_back(name);
    }
    if (!rd.ok()) {
      std::fprintf(stderr, "tf_smdist.horovod: malformed negotiation record from rank %d\n", r);
    }
  }
  // Ranks that joined contribute to the others' collectives.
  std::vector<bool> joined(size_, false);
  bool any_joined = false;
  auto join_it = table_.find(kJoinName);
  if (join_it != table_.end()) {
    for (int r = 0; r < size_; ++r) {
      joined[r] = join_it->second->ranks[r].present;
      any_joined = any_joined || joined[r];
    }
  }
  std::vector<std::pair<int64_t, std::string>> ready;
  for (const auto& kv : table_) {
    const Pending& p = *kv.second;
    bool ok = p.count == size_;
    if (!ok && any_joined && kv.first != kJoinName) {
      ok = true;
      for (int r = 0; r < size_; ++r) ok = ok && (p.ranks[r].present || joined[r]);
    }
    if (ok) ready.emplace_back(p.order, kv.first);
  }
  std::sort(ready.begin(), ready.end());
  std::vector<std::string> run;
  for (const auto& item : ready) {
    const std::string& name = item.second;
    const Pending& p = *table_[name];
    std::string mismatch = CheckMismatch(name, p);
    if (!mismatch.empty()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++counters_.mismatches;
      }
      FailLocal(name, Error(mpi::Code::kFailedPrecondition, "tf_smdist.horovod: " + mismatch));
      table_.erase(name);
      continue;
    }
    run.push_back(name);
  }
  // A stalled name stalls the set: every member fails every name still
  // pending (the others usually wait behind the stalled one, e.g. a
  // barrier on the ranks that never issued it), so that no rank waits
  // forever. The decision comes from the same records on every member, so
  // the tables stay equal and the set stays usable.
  std::vector<std::string> described;
  for (const std::string& name : stalled) {
    auto it = table_.find(name);
    if (it == table_.end() || std::find(run.begin(), run.end(), name) != run.end()) continue;
    described.push_back(Describe(name, *it->second));
  }
  if (!described.empty()) {
    std::ostringstream os;
    os << "tf_smdist.horovod: stalled for more than " << options_.stall_timeout_s << " s: ";
    for (size_t k = 0; k < described.size() && k < 8; ++k) {
      os << (k ? "; " : "") << described[k];
    }
    if (described.size() > 8) os << "; and " << described.size() - 8 << " more";
    os << ". Every pending collective of this process set fails on every rank. Every "
          "rank must issue every named collective (same names, e.g. the same model and "
          "data steps on every rank); raise the limit with "
          "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=<seconds> if a rank is legitimately late.";
    mpi::Status err = Error(mpi::Code::kDeadlineExceeded, os.str());
    if (local_.empty() || rank_ == 0) std::fprintf(stderr, "%s\n", err.message.c_str());
    std::vector<std::string> drop;
    for (const auto& kv : table_) {
      if (std::find(run.begin(), run.end(), kv.first) == run.end()) drop.push_back(kv.first);
    }
    for (const std::string& name : drop) {
      FailLocal(name, err);
      table_.erase(name);
    }
    std::lock_guard<std::mutex> lock(mu_);
    counters_.stalls += static_cast<int64_t>(described.size());
  }
  Execute(run);
}

void Negotiator::Execute(const std::vector<std::string>& names) {
  mpi::Communicator& comm = mpi::Communicator::Get();
  auto base_request = [&](mpi::Kind kind, const std::string& name) {
    mpi::Request r;
    r.kind = kind;
    r.name = name;
    r.comm = comm_;
    r.group = data_group_;
    return r;
  };
  // Takes this rank's entry of `name` (absent when this rank joined).
  auto take = [&](const std::string& name, bool* have) {
    Entry e;
    auto it = local_.find(name);
    *have = it != local_.end();
    if (*have) {
      e = std::move(it->second);
      local_.erase(it);
    }
    return e;
  };
  int64_t executions = 0, fused = 0, fused_tensors = 0;
  size_t i = 0;
  while (i < names.size()) {
    std::unique_ptr<Pending> pending = std::move(table_[names[i]]);
    table_.erase(names[i]);
    const Meta meta = pending->any();
    const std::string& name = names[i];
    ++i;
    ++executions;
    int64_t meta_bytes = NumElements(meta.shape) * ElementSize(meta.dtype);
    if (meta.type == OpType::kAllreduce && meta_bytes > 0 &&
        meta_bytes <= InlineBytes(size_)) {
      // Every rank sent its values with the announcement: reduce them here,
      // in rank order (the same on every rank). Joined ranks add nothing.
      --executions;
      bool have = false;
      Entry e = take(name, &have);
      if (have) {
        bool first = true;
        for (int r = 0; r < size_; ++r) {
          const Meta& m = pending->ranks[r];
          if (!m.present) continue;
          if (first) {
            std::memcpy(e.output, m.values.data(), static_cast<size_t>(meta_bytes));
            first = false;
          } else {
            Reduce(meta.dtype, meta.reduce_op, e.output, m.values.data(),
                   NumElements(meta.shape));
          }
        }
        e.done(mpi::Status::Ok(), -1);
      }
      continue;
    }
    if (meta.type == OpType::kAllreduce) {
      // Consecutive all-reduces of one dtype and reduce op share a buffer.
      mpi::Reduction red = ToReduction(meta.reduce_op);
      int64_t esize = ElementSize(meta.dtype);
      std::vector<std::string> group{name};
      std::vector<int64_t> counts{NumElements(meta.shape)};
      int64_t total = counts[0];
      while (i < names.size() && options_.fusion_threshold > 0) {
        const Pending& next = *table_[names[i]];
        const Meta& m = next.any();
        int64_t c = NumElements(m.shape);
        if (m.type != OpType::kAllreduce || m.dtype != meta.dtype ||
            c * esize <= InlineBytes(size_) ||
            ToReduction(m.reduce_op) != red ||
            (total + c) * esize > options_.fusion_threshold) {
          break;
        }
        group.push_back(names[i]);
        counts.push_back(c);
        total += c;
        table_.erase(names[i]);
        ++i;
      }
      auto entries = std::make_shared<std::vector<Entry>>();
      auto have = std::make_shared<std::vector<bool>>();
      for (const std::string& n : group) {
        bool h = false;
        entries->push_back(take(n, &h));
        have->push_back(h);
      }
      mpi::Request r = base_request(mpi::Kind::kAllreduce, name);
      r.dtype = meta.dtype;
      r.reduction = red;
      r.count = total;
      if (group.size() == 1 && (*have)[0]) {
        r.send = (*entries)[0].input;  // nullptr: in place
        r.recv = (*entries)[0].output;
        r.done = [entries](const mpi::Status& s) { (*entries)[0].done(s, -1); };
      } else {
        if (group.size() > 1) {
          ++fused;
          fused_tensors += static_cast<int64_t>(group.size());
          r.name = name + " (fused with " + std::to_string(group.size() - 1) + " more)";
        }
        // The fusion buffer: this rank's tensors, zeros for those it joined.
        size_t buf_bytes = static_cast<size_t>(std::max<int64_t>(1, total * esize));
        std::shared_ptr<char> buf(new char[buf_bytes], std::default_delete<char[]>());
        int64_t off = 0;
        for (size_t k = 0; k < group.size(); ++k) {
          size_t bytes = static_cast<size_t>(counts[k] * esize);
          if ((*have)[k]) {
            if (bytes > 0) std::memcpy(buf.get() + off, AllreduceValues((*entries)[k]), bytes);
          } else {
            std::memset(buf.get() + off, 0, bytes);
          }
          off += counts[k] * esize;
        }
        r.recv = buf.get();
        r.done = [entries, have, buf, counts, esize](const mpi::Status& s) {
          if (s.code == mpi::Code::kDeadlineExceeded || s.code == mpi::Code::kInternal) {
            // MPI may still write a transfer it could not finish: keep it.
            new std::shared_ptr<char>(buf);
          }
          int64_t o = 0;
          for (size_t k = 0; k < entries->size(); ++k) {
            if ((*have)[k]) {
              if (s.ok() && counts[k] > 0) {
                std::memcpy((*entries)[k].output, buf.get() + o,
                            static_cast<size_t>(counts[k] * esize));
              }
              (*entries)[k].done(s, -1);
            }
            o += counts[k] * esize;
          }
        };
      }
      comm.Enqueue(std::move(r));
      continue;
    }
    bool have = false;
    auto entry = std::make_shared<Entry>(take(name, &have));
    int64_t esize = ElementSize(meta.dtype);
    switch (meta.type) {
      case OpType::kJoin: {
        int last = 0;
        int64_t last_cycle = -1;
        for (int r = 0; r < size_; ++r) {
          if (pending->ranks[r].cycle >= last_cycle) {
            last_cycle = pending->ranks[r].cycle;
            last = r;
          }
        }
        --executions;
        if (have) entry->done(mpi::Status::Ok(), last);
        break;
      }
      case OpType::kBarrier: {
        mpi::Request r = base_request(mpi::Kind::kBarrier, name);
        r.done = [entry, have](const mpi::Status& s) {
          if (have) entry->done(s, -1);
        };
        comm.Enqueue(std::move(r));
        break;
      }
      case OpType::kBroadcast: {
        mpi::Request r = base_request(mpi::Kind::kBroadcast, name);
        r.dtype = meta.dtype;
        r.root = meta.root;
        r.count = NumElements(meta.shape);
        std::shared_ptr<std::vector<char>> scratch;
        if (have) {
          r.recv = entry->output;
        } else {
          scratch = std::make_shared<std::vector<char>>(
              static_cast<size_t>(std::max<int64_t>(1, r.count * esize)));
          r.recv = scratch->data();
        }
        r.done = [entry, have, scratch](const mpi::Status& s) {
          if (have) entry->done(s, -1);
        };
        comm.Enqueue(std::move(r));
        break;
      }
      case OpType::kAllgather: {
        int64_t row = RowElements(meta.shape);
        std::vector<int64_t> counts(size_, 0);
        std::vector<int64_t> out_shape = meta.shape;
        if (out_shape.empty()) out_shape.push_back(0);  // scalars are checked by the op
        out_shape[0] = 0;
        bool even = true;
        for (int r = 0; r < size_; ++r) {
          const Meta& m = pending->ranks[r];
          int64_t rows = m.present && !m.shape.empty() ? m.shape[0] : 0;
          counts[r] = rows * row;
          out_shape[0] += rows;
          even = even && counts[r] == counts[0];
        }
        void* out = nullptr;
        mpi::Status alloc_status;
        if (have) alloc_status = entry->allocate(out_shape, {}, &out);
        std::shared_ptr<std::vector<char>> scratch;
        int64_t total = out_shape[0] * row;
        if (!have || !alloc_status.ok() || out == nullptr) {
          scratch = std::make_shared<std::vector<char>>(
              static_cast<size_t>(std::max<int64_t>(1, total * esize)));
          out = scratch->data();
        }
        mpi::Request r = base_request(even ? mpi::Kind::kAllgather : mpi::Kind::kAllgatherv,
                                      name);
        r.dtype = meta.dtype;
        r.send = have ? entry->input : out;
        r.recv = out;
        if (even) {
          r.count = counts[0];
        } else {
          r.counts = counts;
        }
        r.done = [entry, have, scratch, alloc_status](const mpi::Status& s) {
          if (have) entry->done(s.ok() ? alloc_status : s, -1);
        };
        comm.Enqueue(std::move(r));
        break;
      }
      case OpType::kAlltoall: {
        int64_t row = RowElements(meta.shape);
        std::vector<int64_t> send_counts(size_), recv_counts(size_), recv_splits(size_);
        std::vector<int64_t> out_shape = meta.shape;
        out_shape[0] = 0;
        for (int r = 0; r < size_; ++r) {
          send_counts[r] = (have ? entry->splits[r] : 0) * row;
          recv_splits[r] = pending->ranks[r].splits[rank_];
          recv_counts[r] = recv_splits[r] * row;
          out_shape[0] += recv_splits[r];
        }
        void* out = nullptr;
        mpi::Status alloc_status = entry->allocate(out_shape, recv_splits, &out);
        std::shared_ptr<std::vector<char>> scratch;
        if (!alloc_status.ok() || out == nullptr) {
          scratch = std::make_shared<std::vector<char>>(
              static_cast<size_t>(std::max<int64_t>(1, out_shape[0] * row * esize)));
          out = scratch->data();
        }
        mpi::Request r = base_request(mpi::Kind::kAlltoallv, name);
        r.dtype = meta.dtype;
        r.send = entry->input;
        r.recv = out;
        r.counts = send_counts;
        r.recv_counts = recv_counts;
        r.done = [entry, scratch, alloc_status](const mpi::Status& s) {
          entry->done(s.ok() ? alloc_status : s, -1);
        };
        comm.Enqueue(std::move(r));
        break;
      }
      case OpType::kReducescatter: {
        int64_t row = RowElements(meta.shape);
        int64_t rows = meta.shape.empty() ? 0 : meta.shape[0];
        std::vector<int64_t> counts(size_);
        for (int r = 0; r < size_; ++r) counts[r] = ScatterRows(rows, size_, r) * row;
        std::vector<int64_t> out_shape = meta.shape;
        out_shape[0] = ScatterRows(rows, size_, rank_);
        void* out = nullptr;
        mpi::Status alloc_status = entry->allocate(out_shape, {}, &out);
        std::shared_ptr<std::vector<char>> scratch;
        if (!alloc_status.ok() || out == nullptr) {
          scratch = std::make_shared<std::vector<char>>(
              static_cast<size_t>(std::max<int64_t>(1, counts[rank_] * esize)));
          out = scratch->data();
        }
        mpi::Request r = base_request(mpi::Kind::kReduceScatter, name);
        r.dtype = meta.dtype;
        r.reduction = ToReduction(meta.reduce_op);
        r.send = entry->input;
        r.recv = out;
        r.counts = counts;
        r.count = rows * row;
        r.done = [entry, scratch, alloc_status](const mpi::Status& s) {
          entry->done(s.ok() ? alloc_status : s, -1);
        };
        comm.Enqueue(std::move(r));
        break;
      }
      case OpType::kAllreduce:
        break;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  counters_.executions += executions;
  counters_.fused_executions += fused;
  counters_.fused_tensors += fused_tensors;
}

// --- Engine ------------------------------------------------------------------

Engine& Engine::Get() {
  static Engine* engine = new Engine();  // never destroyed
  return *engine;
}

bool Engine::initialized() const {
  std::lock_guard<std::mutex> lock(mu_);
  return initialized_;
}

mpi::Status Engine::Init(const NegotiatorOptions& options) {
  std::lock_guard<std::mutex> lock(mu_);
  if (initialized_) return mpi::Status::Ok();
  mpi::Communicator& comm = mpi::Communicator::Get();
  if (!comm.initialized()) {
    return Error(mpi::Code::kFailedPrecondition,
                 "the tf_smdist MPI communicator is not initialised; call "
                 "tf_smdist.data_parallel.cluster.initialize() first.");
  }
  options_ = options;
  sets_[0] = std::make_shared<Negotiator>(0, kWorldNegoGroup, kWorldDataGroup, comm.rank(),
                                          comm.size(), options);
  comms_[0] = 0;
  initialized_ = true;
  return mpi::Status::Ok();
}

mpi::Status Engine::AddProcessSet(const std::vector<int>& ranks, int* id) {
  // One set at a time; mu_ is not held while the ranks agree, so that
  // collectives already running can still find their sets.
  std::lock_guard<std::mutex> create_lock(create_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!initialized_) {
      return Error(mpi::Code::kFailedPrecondition,
                   "tf_smdist.horovod is not initialised; call hvd.init() first.");
    }
  }
  mpi::Communicator& comm = mpi::Communicator::Get();
  int comm_id = -1;
  mpi::Status s = comm.CreateComm(ranks, &comm_id);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  if (free_ids_.empty()) {
    *id = next_id_++;
  } else {
    *id = free_ids_.front();
    free_ids_.pop_front();
  }
  comms_[*id] = comm_id;
  if (comm_id >= 0) {
    // Groups 0 and 1 of the set's own communicator: nothing else uses it.
    sets_[*id] = std::make_shared<Negotiator>(comm_id, 0, 1, comm.CommRank(comm_id),
                                              comm.CommSize(comm_id), options_);
  }
  return mpi::Status::Ok();
}

mpi::Status Engine::RemoveProcessSet(int id) {
  std::shared_ptr<Negotiator> set;
  int comm_id = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (id == 0) {
      return Error(mpi::Code::kInvalidArgument,
                   "the global process set (id 0) cannot be removed. Received: "
                   "process_set_id=0.");
    }
    auto it = comms_.find(id);
    if (it == comms_.end()) {
      return Error(mpi::Code::kInvalidArgument,
                   "unknown process set. Received: process_set_id=" + std::to_string(id) +
                       ".");
    }
    comm_id = it->second;
    comms_.erase(it);
    free_ids_.push_back(id);
    auto s = sets_.find(id);
    if (s != sets_.end()) {
      set = s->second;
      sets_.erase(s);
    }
  }
  if (set != nullptr) set->Stop();
  if (comm_id >= 0) return mpi::Communicator::Get().DestroyComm(comm_id);
  return mpi::Status::Ok();
}

std::shared_ptr<Negotiator> Engine::Find(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sets_.find(id);
  return it == sets_.end() ? nullptr : it->second;
}

mpi::Status Engine::Shutdown() {
  std::map<int, std::shared_ptr<Negotiator>> sets;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!initialized_) return mpi::Status::Ok();
    sets.swap(sets_);
    comms_.clear();
    initialized_ = false;
    next_id_ = 1;
    free_ids_.clear();
  }
  // Sub-sets first: their members may wait on the world set's collectives.
  for (auto it = sets.rbegin(); it != sets.rend(); ++it) it->second->Stop();
  return mpi::Status::Ok();
}

}  // namespace hvd
}  // namespace smdist
