// The ring of heartbeats (see heartbeat.h).
#include "kernels/mpi/heartbeat.h"

#include <chrono>
#include <thread>

namespace smdist {
namespace mpi {

namespace {

constexpr int kHeartbeatTag = 7;
constexpr int kDrainTag = 8;
constexpr int64_t kMagic = 0x736d64697374LL;  // "smdist"
constexpr int kHeader = 3;                     // magic, rank, state
constexpr int kFactFields = 7;
constexpr int kFactsAt = kHeader + kMaxGroups;
constexpr int kLength = kFactsAt + Heartbeats::kMaxFactsPerMessage * kFactFields;
// Unacknowledged heartbeats to the successor before this rank stops adding
// more (a stopped successor does not receive them).
constexpr int kMaxOutstanding = 8;

Status Mpi(int err, const std::string& what) {
  Status s;
  if (err == MPI_SUCCESS) return s;
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  std::string text = MPI_Error_string(err, buf, &len) == MPI_SUCCESS
                         ? std::string(buf, len)
                         : "MPI error " + std::to_string(err);
  s.code = Code::kInternal;
  s.message = "tf_smdist: " + what + " failed: " + text;
  return s;
}

void Write(const Fact& f, int64_t* out) {
  out[0] = f.kind;
  out[1] = f.subject;
  out[2] = f.reporter;
  out[3] = f.group;
  out[4] = f.a;
  out[5] = f.b;
  out[6] = f.version;
}

Fact Read(const int64_t* in) {
  Fact f;
  f.kind = in[0];
  f.subject = in[1];
  f.reporter = in[2];
  f.group = in[3];
  f.a = in[4];
  f.b = in[5];
  f.version = in[6];
  return f;
}

}  // namespace

Status Heartbeats::Start(int rank, int size, MPI_Comm comm, double period) {
  rank_ = rank;
  size_ = size;
  pred_ = (rank + size - 1) % size;
  succ_ = (rank + 1) % size;
  comm_ = comm;
  period_ = period;
  recv_buf_.assign(kLength, 0);
  pred_started_.assign(kMaxGroups, 0);
  last_heard_ = std::chrono::duration<double>(
                    std::chrono::steady_clock::now().time_since_epoch())
                    .count();
  return PostReceive();
}

Status Heartbeats::PostReceive() {
  if (size_ == 1) return Status::Ok();
  return Mpi(MPI_Irecv(recv_buf_.data(), kLength, MPI_INT64_T, pred_, kHeartbeatTag, comm_,
                       &recv_),
             "posting the heartbeat receive");
}

Status Heartbeats::Send(double now, bool force, int64_t state,
                        const std::vector<int64_t>& started) {
  if (size_ == 1) return Status::Ok();
  bool pending = false;
  for (const auto& kv : known_) pending = pending || kv.second.forward;
  if (!force && !pending && now - last_sent_ < period_) return Status::Ok();
  if (static_cast<int>(sends_.size()) >= kMaxOutstanding) return Status::Ok();
  last_sent_ = now;
  sends_.emplace_back();
  Message& m = sends_.back();
  m.buf.assign(kLength, 0);
  m.buf[0] = kMagic;
  m.buf[1] = rank_;
  m.buf[2] = state;
  for (int g = 0; g < kMaxGroups; ++g) m.buf[kHeader + g] = started[g];
  int n = 0;
  for (auto& kv : known_) {
    if (!kv.second.forward || n == kMaxFactsPerMessage) continue;
    Write(kv.second.fact, &m.buf[kFactsAt + kFactFields * n]);
    kv.second.forward = false;
    ++n;
  }
  int err = MPI_Isend(m.buf.data(), kLength, MPI_INT64_T, succ_, kHeartbeatTag, comm_, &m.mpi);
  if (err != MPI_SUCCESS) {
    sends_.pop_back();
    return Mpi(err, "sending a heartbeat to rank " + std::to_string(succ_));
  }
  ++sent_;
  return Status::Ok();
}

Status Heartbeats::Poll(double now) {
  if (size_ == 1) return Status::Ok();
  for (auto it = sends_.begin(); it != sends_.end();) {
    int done = 0;
    int err = MPI_Test(&it->mpi, &done, MPI_STATUS_IGNORE);
    if (err != MPI_SUCCESS) return Mpi(err, "completing a heartbeat send");
    it = done ? sends_.erase(it) : std::next(it);
  }
  while (recv_ != MPI_REQUEST_NULL) {
    int done = 0;
    int err = MPI_Test(&recv_, &done, MPI_STATUS_IGNORE);
    if (err != MPI_SUCCESS) return Mpi(err, "receiving a heartbeat");
    if (!done) break;
    if (recv_buf_[0] == kMagic && recv_buf_[1] == pred_) {
      ++received_;
      last_heard_ = now;
      pred_state_ = recv_buf_[2];
      for (int g = 0; g < kMaxGroups; ++g) pred_started_[g] = recv_buf_[kHeader + g];
      for (int k = 0; k < kMaxFactsPerMessage; ++k) {
        Learn(Read(&recv_buf_[kFactsAt + kFactFields * k]), now);
      }
    }
    Status s = PostReceive();
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

void Heartbeats::Learn(const Fact& fact, double now) {
  // A fact about this rank, or one it reported, has gone round the ring.
  if (fact.kind == Fact::kNone || fact.subject == rank_ || fact.reporter == rank_) return;
  Key key{fact.subject, fact.kind, fact.reporter};
  auto it = known_.find(key);
  if (it != known_.end() && it->second.fact.version >= fact.version) return;
  known_[key] = Known{fact, now, true};
}

void Heartbeats::Publish(Fact fact, double now) {
  if (size_ == 1) return;
  fact.reporter = rank_;
  Key key{fact.subject, fact.kind, fact.reporter};
  auto it = published_.find(key);
  if (it != published_.end() && now - it->second < period_) return;
  published_[key] = now;
  fact.version = next_version_++;
  known_[key] = Known{fact, now, true};
}

bool Heartbeats::AnyPeerDown(double now, bool or_leaving) const {
  if (size_ == 1) return false;
  if (now - last_heard_ > fact_ttl() || pred_state_ == kFailed ||
      (or_leaving && pred_state_ == kFinishing)) {
    return true;
  }
  for (const Fact& f : Facts(now)) {
    if (f.kind == Fact::kDead || f.kind == Fact::kFailed ||
        (or_leaving && f.kind == Fact::kFinishing)) {
      return true;
    }
  }
  return false;
}

std::vector<Fact> Heartbeats::Facts(double now) const {
  std::vector<Fact> out;
  for (const auto& kv : known_) {
    const Fact& f = kv.second.fact;
    if (f.subject == pred_ || now - kv.second.learned > fact_ttl()) continue;
    out.push_back(f);
  }
  return out;
}

Status Heartbeats::Drain(MPI_Comm ctrl, double deadline,
                         const std::function<std::string()>& report) {
  if (size_ == 1) return Status::Ok();
  drain_sent_ = sent_;
  drain_expected_ = -1;
  MPI_Request reqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  Status s = Mpi(MPI_Irecv(&drain_expected_, 1, MPI_INT64_T, pred_, kDrainTag, ctrl, &reqs[0]),
                 "agreeing on heartbeat counts at shutdown");
  if (s.ok()) {
    s = Mpi(MPI_Isend(&drain_sent_, 1, MPI_INT64_T, succ_, kDrainTag, ctrl, &reqs[1]),
            "agreeing on heartbeat counts at shutdown");
  }
  if (!s.ok()) return s;
  for (;;) {
    int done = 0;
    s = Mpi(MPI_Testall(2, reqs, &done, MPI_STATUSES_IGNORE),
            "agreeing on heartbeat counts at shutdown");
    if (!s.ok()) return s;
    double now = std::chrono::duration<double>(
                     std::chrono::steady_clock::now().time_since_epoch())
                     .count();
    s = Poll(now);
    if (!s.ok()) return s;
    if (done && received_ >= drain_expected_ && sends_.empty()) break;
    // A failed or dead peer never drains: give up now, not at the deadline.
    if (AnyPeerDown(now, false)) {
      Status t;
      t.code = Code::kFailedPrecondition;
      t.message = "tf_smdist: shutting down rank " + std::to_string(rank_) +
                  ": a peer failed, so the heartbeats were not drained." + report();
      return t;
    }
    if (now > deadline) {
      Status t;
      t.code = Code::kDeadlineExceeded;
      t.message = done ? "tf_smdist: heartbeats were not drained at shutdown."
                       : "tf_smdist: shutting down rank " + std::to_string(rank_) +
                             ": the other ranks did not reach shutdown in time." + report();
      return t;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  if (recv_ != MPI_REQUEST_NULL) {
    s = Mpi(MPI_Cancel(&recv_), "cancelling the heartbeat receive");
    if (s.ok()) s = Mpi(MPI_Wait(&recv_, MPI_STATUS_IGNORE), "cancelling the heartbeat receive");
  }
  return s;
}

}  // namespace mpi
}  // namespace smdist
