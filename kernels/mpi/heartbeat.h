// Liveness of the world's ranks for the communication thread (comm.cc): a
// ring of heartbeats whose cost per rank does not grow with the job.
//
// Each rank sends one heartbeat per period to its successor (rank + 1) and
// watches its predecessor (rank - 1). A heartbeat carries the sender's state
// (running, failed, finishing), how many collectives it started in each
// world ordering group, and up to kMaxFactsPerMessage "facts": what a rank
// found out about its predecessor (dead or stopped, failed, leaving, not
// joining a collective). A rank forwards each new fact to its successor at
// once, so a fact goes round the ring (and reaches every live rank even when
// the ring is broken at the dead rank itself, where it ends) in a few
// message latencies; the watchdog's error then names the rank on every rank.
// Facts are refreshed every period while they hold and expire otherwise.
#ifndef TF_SMDIST_KERNELS_MPI_HEARTBEAT_H_
#define TF_SMDIST_KERNELS_MPI_HEARTBEAT_H_

// The C API only: skip the deprecated C++ bindings (extra link symbols).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/mpi/comm.h"

namespace smdist {
namespace mpi {

enum PeerState : int64_t { kRunning = 0, kFailed = 1, kFinishing = 2 };

// What one rank found out about another (its predecessor).
struct Fact {
  enum Kind : int64_t { kNone = 0, kDead = 1, kFailed = 2, kFinishing = 3, kNotJoined = 4 };
  int64_t kind = kNone;
  int64_t subject = -1;   // the rank the fact is about
  int64_t reporter = -1;  // the rank that found it out
  int64_t group = -1;     // kNotJoined: the world ordering group
  int64_t a = 0;          // kDead: milliseconds silent; kNotJoined: started
  int64_t b = 0;          // kNotJoined: the collective number waited on
  int64_t version = 0;    // increases with every refresh by the reporter
};

class Heartbeats {
 public:
  static constexpr int kMaxFactsPerMessage = 8;

  // Posts the first receive. `period` is the heartbeat period in seconds.
  Status Start(int rank, int size, MPI_Comm comm, double period);

  // Sends a heartbeat to the successor when the period has passed, when a
  // fact is waiting to be forwarded, or when `force`.
  Status Send(double now, bool force, int64_t state, const std::vector<int64_t>& started);

  // Completes finished sends and reads every heartbeat that arrived.
  Status Poll(double now);

  // Records what this rank found out about its predecessor; forwarded at
  // once when new, then refreshed at most once per period while it holds.
  void Publish(Fact fact, double now);

  // Before MPI_Finalize: agree with the neighbours on how many heartbeats
  // each sent the other (over `ctrl`) and receive all of them, so that none
  // is in flight. Polls until `deadline`; `report` describes the peers.
  Status Drain(MPI_Comm ctrl, double deadline, const std::function<std::string()>& report);

  // Whether a heartbeat sent to the successor has not completed yet.
  bool sending() const { return !sends_.empty(); }
  // Whether a peer is known to be dead (silent), stopped or failed, and with
  // `or_leaving` also leaving (shutting down): the predecessor from its own
  // heartbeats, the others from the ring's facts.
  bool AnyPeerDown(double now, bool or_leaving) const;
  int predecessor() const { return pred_; }
  double last_heard() const { return last_heard_; }
  int64_t pred_state() const { return pred_state_; }
  int64_t pred_started(int group) const { return pred_started_[group]; }
  // Facts about ranks other than this one and its predecessor that are
  // still fresh.
  std::vector<Fact> Facts(double now) const;
  // Seconds a fact stays without a refresh.
  double fact_ttl() const { return 3 * period_ + 1; }

 private:
  struct Message {
    std::vector<int64_t> buf;
    MPI_Request mpi = MPI_REQUEST_NULL;
  };
  struct Known {
    Fact fact;
    double learned = 0;      // local time of the latest version
    bool forward = false;    // a version not yet sent to the successor
  };
  using Key = std::tuple<int64_t, int64_t, int64_t>;  // subject, kind, reporter

  Status PostReceive();
  void Learn(const Fact& fact, double now);

  int rank_ = 0;
  int size_ = 1;
  int pred_ = 0;
  int succ_ = 0;
  MPI_Comm comm_ = MPI_COMM_NULL;
  double period_ = 1.0;
  double last_sent_ = -1e9;
  std::vector<int64_t> recv_buf_;
  MPI_Request recv_ = MPI_REQUEST_NULL;
  std::list<Message> sends_;
  int64_t sent_ = 0;      // heartbeats sent to the successor
  int64_t received_ = 0;  // heartbeats received from the predecessor
  double last_heard_ = 0;
  int64_t pred_state_ = kRunning;
  std::vector<int64_t> pred_started_;
  std::map<Key, Known> known_;
  std::map<Key, double> published_;  // own facts: when last refreshed
  int64_t next_version_ = 1;
  // The shutdown count exchange (members: MPI may still write them if the
  // exchange is abandoned at the deadline).
  int64_t drain_sent_ = 0;
  int64_t drain_expected_ = -1;
};

}  // namespace mpi
}  // namespace smdist

#endif  // TF_SMDIST_KERNELS_MPI_HEARTBEAT_H_
