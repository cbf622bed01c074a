// Framework-free MPI communication thread for tf_smdist (see comm.h).
#include "kernels/mpi/comm.h"

// The C API only: skip the deprecated C++ bindings (extra link symbols).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <future>
#include <sstream>

namespace smdist {
namespace mpi {

namespace {

constexpr int kHeartbeatTag = 7;
constexpr int64_t kHeartbeatMagic = 0x736d64697374LL;  // "smdist"
constexpr int kHeartbeatHeader = 3;  // magic, rank, state
constexpr int kHeartbeatLen = kHeartbeatHeader + kMaxGroups;
constexpr int kMaxOutstandingHeartbeats = 8;

enum PeerState : int64_t { kRunning = 0, kFailed = 1, kFinishing = 2 };

double Now() {
  using Clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

double EnvDouble(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  double d = std::strtod(v, &end);
  return (end != v && d >= 0) ? d : fallback;
}

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kAllreduce: return "allreduce";
    case Kind::kBroadcast: return "broadcast";
    case Kind::kAllgather: return "allgather";
    case Kind::kBarrier: return "barrier";
  }
  return "collective";
}

// IEEE half <-> float, round to nearest even.
float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  uint32_t absx = x & 0x7fffffff;
  if (absx >= 0x7f800000) {  // inf or nan
    return sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0);
  }
  if (absx >= 0x477ff000) return sign | 0x7c00;  // overflow to inf
  if (absx < 0x38800000) {  // subnormal or zero in half
    float a;
    std::memcpy(&a, &absx, sizeof(a));
    // a * 2^24 rounded to nearest even gives the subnormal mantissa.
    float scaled = a * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  uint32_t exp = (absx >> 23) - 127 + 15;
  uint32_t man = absx & 0x7fffff;
  uint32_t half = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;
  return sign | static_cast<uint16_t>(half);
}

float BFloat16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t FloatToBFloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x40);
  uint32_t lsb = (x >> 16) & 1;
  x += 0x7fff + lsb;
  return static_cast<uint16_t>(x >> 16);
}

void HalfSum(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = FloatToHalf(HalfToFloat(a[i]) + HalfToFloat(b[i]));
}

void BFloat16Sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    b[i] = FloatToBFloat16(BFloat16ToFloat(a[i]) + BFloat16ToFloat(b[i]));
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
  }
  return MPI_BYTE;
}

std::string MpiErrorString(int err) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(err, buf, &len);
  return std::string(buf, len);
}

}  // namespace

size_t DataTypeSize(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return 4;
    case DataType::kFloat64: return 8;
    case DataType::kFloat16: return 2;
    case DataType::kBFloat16: return 2;
    case DataType::kInt32: return 4;
    case DataType::kInt64: return 8;
    case DataType::kUint8: return 1;
  }
  return 1;
}

struct InFlight {
  Request request;
  MPI_Request mpi = MPI_REQUEST_NULL;
  double start = 0;
  int64_t seq = 0;  // 1-based number of this collective in its group
};

struct Group {
  MPI_Comm comm = MPI_COMM_NULL;
  int cycle = 0;       // group_size seen first (0: none yet)
  int next_index = 0;
  std::map<int, std::deque<Request>> waiting;
  std::map<int, double> waiting_since;
  std::deque<InFlight> inflight;
  int64_t started = 0;
};

struct HeartbeatSend {
  std::vector<int64_t> buf;
  MPI_Request mpi = MPI_REQUEST_NULL;
  int peer = 0;
};

struct Communicator::Impl {
  bool we_initialised = false;
  Group groups[kMaxGroups];
  MPI_Comm hb_comm = MPI_COMM_NULL;
  MPI_Comm ctrl_comm = MPI_COMM_NULL;
  MPI_Op half_sum = MPI_OP_NULL;
  MPI_Op bf16_sum = MPI_OP_NULL;
  std::vector<int64_t> hb_recv_buf;
  MPI_Request hb_recv = MPI_REQUEST_NULL;
  std::deque<HeartbeatSend> hb_sends;
  std::vector<int> hb_outstanding;
  std::vector<int64_t> hb_sent_to;
  std::vector<int64_t> hb_recv_from;
  std::vector<double> last_heard;
  std::vector<int64_t> peer_state;
  std::vector<std::vector<int64_t>> peer_started;
  double last_hb = -1e9;
  double spin_s = 0.002;
  int64_t my_state = kRunning;
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
  impl_ = new Impl();
  impl_->spin_s = EnvDouble("SMDIST_MPI_SPIN_US", 2000.0) * 1e-6;
  thread_ = std::thread([this] { ThreadMain(); });
  cv_.wait(lock, [this] { return init_done_; });
  return init_status_;
}

void Communicator::Enqueue(Request request) {
  Status s;
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

double Communicator::TimeNativeAllreduce(int64_t count, int iters) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!init_done_ || !init_status_.ok() || stop_) return -1.0;
  bench_count_ = count;
  bench_iters_ = iters;
  bench_pending_ = true;
  cv_.notify_all();
  cv_.wait(lock, [this] { return !bench_pending_; });
  return bench_result_;
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

Status Communicator::Fail(const Status& status) {
  // Called on the communication thread only.
  failure_ = status;
  impl_->my_state = kFailed;
  for (Group& g : impl_->groups) {
    for (InFlight& f : g.inflight) f.request.done(status);
    g.inflight.clear();
    for (auto& kv : g.waiting) {
      for (Request& r : kv.second) r.done(status);
    }
    g.waiting.clear();
    g.waiting_since.clear();
  }
  return status;
}

void Communicator::ThreadMain() {
  Impl& im = *impl_;
  Status init;
  int flag = 0;
  MPI_Initialized(&flag);
  if (!flag) {
    // Open MPI's non-blocking all-reduce (coll/libnbc) picks binomial /
    // recursive doubling for few processes, about 2x slower than the blocking
    // MPI_Allreduce from 256 KB up; its ring algorithm matches the blocking
    // one (measured: 16 MB, 2 processes, 3.4 ms vs 13.1 ms). Respect a value
    // the user set.
    setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", 0);
    int provided = 0;
    int err = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    if (err != MPI_SUCCESS) {
      init.code = Code::kInternal;
      init.message = "MPI_Init_thread failed: " + MpiErrorString(err);
    } else {
      im.we_initialised = true;
    }
  } else {
    int provided = 0;
    MPI_Query_thread(&provided);
    if (provided < MPI_THREAD_SERIALIZED) {
      init.code = Code::kFailedPrecondition;
      init.message =
          "MPI was already initialised by another library with a thread level "
          "below MPI_THREAD_SERIALIZED, so tf_smdist's communication thread "
          "may not call MPI. Received: provided thread level=" +
          std::to_string(provided) +
          ". Initialise MPI with MPI_THREAD_MULTIPLE (mpi4py: set "
          "mpi4py.rc.thread_level = 'multiple' before importing MPI), or let "
          "tf_smdist initialise it.";
    }
  }
  if (init.ok()) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    for (Group& g : im.groups) {
      MPI_Comm_dup(MPI_COMM_WORLD, &g.comm);
      MPI_Comm_set_errhandler(g.comm, MPI_ERRORS_RETURN);
    }
    MPI_Comm_dup(MPI_COMM_WORLD, &im.hb_comm);
    MPI_Comm_set_errhandler(im.hb_comm, MPI_ERRORS_RETURN);
    MPI_Comm_dup(MPI_COMM_WORLD, &im.ctrl_comm);
    MPI_Comm_set_errhandler(im.ctrl_comm, MPI_ERRORS_RETURN);
    MPI_Op_create(&HalfSum, 1, &im.half_sum);
    MPI_Op_create(&BFloat16Sum, 1, &im.bf16_sum);
    im.hb_recv_buf.assign(kHeartbeatLen, 0);
    im.hb_outstanding.assign(size_, 0);
    im.hb_sent_to.assign(size_, 0);
    im.hb_recv_from.assign(size_, 0);
    im.last_heard.assign(size_, Now());
    im.peer_state.assign(size_, kRunning);
    im.peer_started.assign(size_, std::vector<int64_t>(kMaxGroups, 0));
    if (size_ > 1) {
      MPI_Irecv(im.hb_recv_buf.data(), kHeartbeatLen, MPI_INT64_T, MPI_ANY_SOURCE,
                kHeartbeatTag, im.hb_comm, &im.hb_recv);
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    init_status_ = init;
    init_done_ = true;
  }
  cv_.notify_all();
  if (!init.ok()) return;

  // --- helpers -----------------------------------------------------------
  auto peers_report = [&](int group, int64_t seq, double now) {
    std::ostringstream os;
    int named = 0;
    double stale = 3.0 * options_.heartbeat_s + 1.0;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      if (im.peer_state[r] == kFailed) {
        os << " Rank " << r << " has itself failed (see its own error).";
        ++named;
      } else if (now - im.last_heard[r] > stale) {
        os << " Rank " << r << " sent no heartbeat for " << static_cast<int>(now - im.last_heard[r])
           << " s: it is dead or stopped.";
        ++named;
      } else if (im.peer_state[r] == kFinishing) {
        os << " Rank " << r << " has left training and is shutting down: it ran fewer "
           << "steps than this rank (uneven data across ranks?).";
        ++named;
      } else if (group >= 0 && im.peer_started[r][group] < seq) {
        os << " Rank " << r << " is alive but has not joined this collective (it started "
           << im.peer_started[r][group] << " of this group, this rank waits on #" << seq
           << "): it is stalled, or it ran out of data / left the training loop early.";
        ++named;
      }
    }
    if (named == 0) os << " No rank could be named (every peer is alive and has joined).";
    return os.str();
  };

  auto send_heartbeats = [&](double now, bool force) {
    if (size_ == 1) return;
    if (!force && now - im.last_hb < options_.heartbeat_s) return;
    im.last_hb = now;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_ || im.hb_outstanding[r] >= kMaxOutstandingHeartbeats) continue;
      im.hb_sends.emplace_back();
      HeartbeatSend& s = im.hb_sends.back();
      s.peer = r;
      s.buf.assign(kHeartbeatLen, 0);
      s.buf[0] = kHeartbeatMagic;
      s.buf[1] = rank_;
      s.buf[2] = im.my_state;
      for (int g = 0; g < kMaxGroups; ++g) s.buf[kHeartbeatHeader + g] = im.groups[g].started;
      MPI_Isend(s.buf.data(), kHeartbeatLen, MPI_INT64_T, r, kHeartbeatTag, im.hb_comm, &s.mpi);
      ++im.hb_outstanding[r];
      ++im.hb_sent_to[r];
    }
  };

  auto poll_heartbeats = [&](double now) {
    if (size_ == 1) return;
    for (auto it = im.hb_sends.begin(); it != im.hb_sends.end();) {
      int done = 0;
      MPI_Test(&it->mpi, &done, MPI_STATUS_IGNORE);
      if (done) {
        --im.hb_outstanding[it->peer];
        it = im.hb_sends.erase(it);
      } else {
        ++it;
      }
    }
    while (im.hb_recv != MPI_REQUEST_NULL) {
      int done = 0;
      MPI_Status st;
      MPI_Test(&im.hb_recv, &done, &st);
      if (!done) break;
      int src = st.MPI_SOURCE;
      if (src >= 0 && src < size_ && im.hb_recv_buf[0] == kHeartbeatMagic) {
        ++im.hb_recv_from[src];
        im.last_heard[src] = now;
        im.peer_state[src] = im.hb_recv_buf[2];
        for (int g = 0; g < kMaxGroups; ++g) {
          im.peer_started[src][g] = im.hb_recv_buf[kHeartbeatHeader + g];
        }
      }
      MPI_Irecv(im.hb_recv_buf.data(), kHeartbeatLen, MPI_INT64_T, MPI_ANY_SOURCE,
                kHeartbeatTag, im.hb_comm, &im.hb_recv);
    }
  };

  auto fail_mpi = [&](const Request& r, int err, const char* what) {
    Status s;
    s.code = Code::kInternal;
    std::ostringstream os;
    os << "tf_smdist: " << what << " for " << KindName(r.kind) << " '" << r.name
       << "' failed on rank " << rank_ << ": " << MpiErrorString(err) << "."
       << peers_report(-1, 0, Now());
    s.message = os.str();
    Fail(s);
  };

  // While collectives are in flight the thread polls MPI_Test (MPI only
  // progresses non-blocking collectives inside MPI calls), yielding the core
  // between polls; a large transfer keeps it polling for about as long as the
  // transfer should take, then it backs off to short sleeps.
  double spin_until = 0;
  auto start = [&](Group& g, int gi, Request r, double now) {
    double bytes = static_cast<double>(r.count) * DataTypeSize(r.dtype);
    spin_until = std::max(spin_until, now + im.spin_s + bytes * 5e-9);
    InFlight f;
    f.start = now;
    f.seq = ++g.started;
    int err = MPI_SUCCESS;
    MPI_Datatype dt = ToMpi(r.dtype);
    int count = static_cast<int>(r.count);
    switch (r.kind) {
      case Kind::kAllreduce: {
        MPI_Op op = MPI_SUM;
        if (r.dtype == DataType::kFloat16) {
          op = im.half_sum;
        } else if (r.dtype == DataType::kBFloat16) {
          op = im.bf16_sum;
        } else if (r.reduction == Reduction::kMin) {
          op = MPI_MIN;
        } else if (r.reduction == Reduction::kMax) {
          op = MPI_MAX;
        }
        if (size_ == 1 || count == 0) {
          f.mpi = MPI_REQUEST_NULL;
        } else {
          err = MPI_Iallreduce(MPI_IN_PLACE, r.recv, count, dt, op, g.comm, &f.mpi);
        }
        break;
      }
      case Kind::kBroadcast:
        if (size_ == 1 || count == 0) {
          f.mpi = MPI_REQUEST_NULL;
        } else {
          err = MPI_Ibcast(r.recv, count, dt, r.root, g.comm, &f.mpi);
        }
        break;
      case Kind::kAllgather:
        err = MPI_Iallgather(r.send, count, dt, r.recv, count, dt, g.comm, &f.mpi);
        break;
      case Kind::kBarrier:
        err = MPI_Ibarrier(g.comm, &f.mpi);
        break;
    }
    (void)gi;
    f.request = std::move(r);
    if (err != MPI_SUCCESS) {
      fail_mpi(f.request, err, "starting");
      return;
    }
    g.inflight.push_back(std::move(f));
  };

  auto validate = [&](Request& r) -> bool {
    std::ostringstream os;
    if (r.group < 0 || r.group >= kMaxGroups) {
      os << "`group` must be in [0, " << kMaxGroups << "). Received: group=" << r.group;
    } else if (r.group_size < 1 || r.index < 0 || r.index >= r.group_size) {
      os << "`index` must be in [0, group_size). Received: index=" << r.index
         << ", group_size=" << r.group_size;
    } else if (im.groups[r.group].cycle != 0 && im.groups[r.group].cycle != r.group_size) {
      os << "every collective of one group must give the same group_size. Received: group="
         << r.group << ", group_size=" << r.group_size << " (earlier "
         << im.groups[r.group].cycle << "). Use a separate group for each bucket plan.";
    } else if (r.count < 0 || r.count > 0x7fffffff) {
      os << "the element count must be in [0, 2^31). Received: count=" << r.count;
    } else if (r.kind == Kind::kBroadcast && (r.root < 0 || r.root >= size_)) {
      os << "`root` must be a rank in [0, " << size_ << "). Received: root=" << r.root;
    } else if (r.kind == Kind::kAllreduce && r.reduction != Reduction::kSum &&
               (r.dtype == DataType::kFloat16 || r.dtype == DataType::kBFloat16)) {
      os << "float16/bfloat16 all-reduce supports only reduction='sum'.";
    } else {
      return true;
    }
    Status s;
    s.code = Code::kInvalidArgument;
    s.message = "tf_smdist: " + os.str();
    r.done(s);
    return false;
  };

  // --- main loop ---------------------------------------------------------
  double last_activity = Now();
  bool finishing = false;
  for (;;) {
    std::deque<Request> batch;
    bool stop = false;
    bool bench = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch.swap(incoming_);
      stop = stop_;
      bench = bench_pending_;
    }
    double now = Now();
    for (Request& r : batch) {
      if (!failure_.ok()) {
        r.done(failure_);
        continue;
      }
      if (!validate(r)) continue;
      Group& g = im.groups[r.group];
      g.cycle = r.group_size;
      int key = r.group_size == 1 ? 0 : r.index;
      if (g.waiting[key].empty()) g.waiting_since[key] = now;
      g.waiting[key].push_back(std::move(r));
    }
    bool busy = !batch.empty();
    // Start every request whose turn has come, in index order.
    for (int gi = 0; gi < kMaxGroups && failure_.ok(); ++gi) {
      Group& g = im.groups[gi];
      for (;;) {
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
        start(g, gi, std::move(r), now);
        busy = true;
        if (!failure_.ok()) break;
      }
    }
    // Complete finished collectives (each group's in order).
    bool inflight = false;
    for (int gi = 0; gi < kMaxGroups && failure_.ok(); ++gi) {
      Group& g = im.groups[gi];
      while (!g.inflight.empty()) {
        InFlight& f = g.inflight.front();
        int done = 1;
        int err = MPI_SUCCESS;
        if (f.mpi != MPI_REQUEST_NULL) err = MPI_Test(&f.mpi, &done, MPI_STATUS_IGNORE);
        if (err != MPI_SUCCESS) {
          fail_mpi(f.request, err, "progressing");
          break;
        }
        if (!done) break;
        Request r = std::move(f.request);
        g.inflight.pop_front();
        r.done(Status::Ok());
        busy = true;
      }
      // Later collectives of the group may progress too.
      for (size_t k = 1; k < g.inflight.size(); ++k) {
        int done = 0;
        if (g.inflight[k].mpi != MPI_REQUEST_NULL) {
          MPI_Test(&g.inflight[k].mpi, &done, MPI_STATUS_IGNORE);
          if (done) g.inflight[k].mpi = MPI_REQUEST_NULL;
        }
      }
      inflight = inflight || !g.inflight.empty();
    }
    now = Now();
    if (!finishing) send_heartbeats(now, false);
    poll_heartbeats(now);
    // Watchdog.
    if (failure_.ok()) {
      for (int gi = 0; gi < kMaxGroups; ++gi) {
        Group& g = im.groups[gi];
        if (!g.inflight.empty() && now - g.inflight.front().start > options_.timeout_s) {
          const InFlight& f = g.inflight.front();
          Status s;
          s.code = Code::kDeadlineExceeded;
          std::ostringstream os;
          os << "tf_smdist: " << KindName(f.request.kind) << " '" << f.request.name
             << "' (group " << gi << ", index " << f.request.index << ", #" << f.seq
             << " of the group) did not complete within " << options_.timeout_s
             << " s on rank " << rank_ << " of " << size_ << "."
             << peers_report(gi, f.seq, now)
             << " Every rank must run the same steps; if a step legitimately takes "
                "longer, raise the limit with SMDIST_MPI_TIMEOUT=<seconds>.";
          s.message = os.str();
          Fail(s);
          break;
        }
        for (auto& kv : g.waiting_since) {
          if (now - kv.second > options_.timeout_s) {
            Status s;
            s.code = Code::kDeadlineExceeded;
            std::ostringstream os;
            os << "tf_smdist: on rank " << rank_ << ", collective index " << kv.first
               << " of group " << gi << " waited " << options_.timeout_s
               << " s for index " << g.next_index
               << " of the same group, which this rank never issued. Each bucket "
                  "plan must issue all of its buckets every step.";
            s.message = os.str();
            Fail(s);
            break;
          }
        }
        if (!failure_.ok()) break;
      }
    }
    if (busy) last_activity = now;
    bool idle = !inflight && failure_.ok();
    for (Group& g : im.groups) idle = idle && g.waiting.empty();
    if (!failure_.ok()) idle = true;
    if (bench && idle) {
      double result = -1.0;
      if (failure_.ok()) {
        std::vector<float> buf(static_cast<size_t>(std::max<int64_t>(bench_count_, 1)), 1.0f);
        MPI_Barrier(im.ctrl_comm);
        double t0 = MPI_Wtime();
        for (int i = 0; i < bench_iters_; ++i) {
          MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(bench_count_), MPI_FLOAT,
                        MPI_SUM, im.ctrl_comm);
        }
        result = (MPI_Wtime() - t0) / std::max(1, bench_iters_);
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        bench_pending_ = false;
        bench_result_ = result;
      }
      cv_.notify_all();
      last_activity = Now();
      continue;
    }
    if (stop && idle) break;
    if (inflight) {
      if (now - last_activity < im.spin_s || now < spin_until) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      continue;
    }
    std::unique_lock<std::mutex> lock(mu_);
    bool has_waiting = false;
    for (Group& g : im.groups) has_waiting = has_waiting || !g.waiting.empty();
    auto wait = has_waiting ? std::chrono::milliseconds(20)
                            : std::chrono::milliseconds(static_cast<int>(
                                  std::max(1.0, 1000.0 * options_.heartbeat_s / 4)));
    if (now - last_activity < im.spin_s) wait = std::chrono::milliseconds(0);
    if (wait.count() == 0) {
      lock.unlock();
      sched_yield();
    } else {
      cv_.wait_for(lock, wait,
                   [this] { return !incoming_.empty() || stop_ || bench_pending_; });
    }
  }

  // --- shutdown ----------------------------------------------------------
  finishing = true;
  Status final_status = failure_;
  if (failure_.ok() && size_ > 1) {
    // Tell the peers this rank is leaving, then agree on how many heartbeats
    // each pair exchanged so that every one of them is received before
    // MPI_Finalize.
    im.my_state = kFinishing;
    im.last_hb = -1e9;
    send_heartbeats(Now(), true);
    std::vector<int64_t> expected(size_, 0);
    MPI_Request req;
    MPI_Ialltoall(im.hb_sent_to.data(), 1, MPI_INT64_T, expected.data(), 1, MPI_INT64_T,
                  im.ctrl_comm, &req);
    double t0 = Now();
    for (;;) {
      int done = 0;
      MPI_Test(&req, &done, MPI_STATUS_IGNORE);
      double now = Now();
      poll_heartbeats(now);
      if (done) break;
      if (now - t0 > options_.timeout_s) {
        final_status.code = Code::kDeadlineExceeded;
        final_status.message =
            "tf_smdist: shutting down rank " + std::to_string(rank_) +
            ": the other ranks did not reach shutdown within " +
            std::to_string(options_.timeout_s) + " s." + peers_report(-1, 0, now);
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (final_status.ok()) {
      for (;;) {
        bool all = true;
        for (int r = 0; r < size_; ++r) all = all && im.hb_recv_from[r] >= expected[r];
        all = all && im.hb_sends.empty();
        double now = Now();
        if (all) break;
        if (now - t0 > options_.timeout_s) {
          final_status.code = Code::kDeadlineExceeded;
          final_status.message = "tf_smdist: heartbeats were not drained at shutdown.";
          break;
        }
        poll_heartbeats(now);
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
  }
  if (final_status.ok()) {
    if (im.hb_recv != MPI_REQUEST_NULL) {
      MPI_Cancel(&im.hb_recv);
      MPI_Wait(&im.hb_recv, MPI_STATUS_IGNORE);
    }
    MPI_Op_free(&im.half_sum);
    MPI_Op_free(&im.bf16_sum);
    for (Group& g : im.groups) MPI_Comm_free(&g.comm);
    MPI_Comm_free(&im.hb_comm);
    MPI_Comm_free(&im.ctrl_comm);
    if (im.we_initialised) MPI_Finalize();
  }
  // After a failure MPI is left initialised on purpose (see comm.h).
  std::deque<Request> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    rest.swap(incoming_);
    stopped_ = true;
    shutdown_status_ = final_status;
  }
  Status closed;
  closed.code = Code::kFailedPrecondition;
  closed.message = "the tf_smdist MPI communicator has been shut down";
  for (Request& r : rest) r.done(failure_.ok() ? closed : failure_);
}

}  // namespace mpi
}  // namespace smdist
