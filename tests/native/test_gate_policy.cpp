// The launch gate's policy (fracgpu/gate_policy.h), driven over simulated
// time: a fake clock, one device that runs the partitions' kernels one after
// another in launch order, and scripted jobs that launch through the gate as
// the shim's gate.cpp and launch.cpp do (a snapshot, the policy's answer, the
// answer applied). What a partition got is what the simulated device ran for
// it, not the policy's books. Deterministic, and well under a second.
#include "fracgpu/gate_policy.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <string>
#include <vector>

namespace policy = fracgpu::policy;

namespace {

int failures = 0;
#define EXPECT(cond, ...)                                                     \
    do {                                                                      \
        if (!(cond)) {                                                        \
            std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);       \
            std::printf(__VA_ARGS__);                                         \
            std::printf("\n");                                                \
            failures++;                                                       \
        }                                                                     \
    } while (0)

constexpr uint64_t kUs = 1'000, kMs = 1'000'000, kS = 1'000'000'000;
constexpr uint64_t kNever = UINT64_MAX;
// The simulated clock starts here (a monotonic clock is never near 0, which
// the shared state reads as "never"); the tests' times are relative to it.
constexpr uint64_t kEpoch = 1000 * kS;
constexpr uint64_t kNapNs = 20 * kUs;           // the gate's nap()
constexpr uint64_t kSlackNs = 1 * kUs;          // the shortest sleep: the timer slack the gate sets
constexpr uint64_t kRecheckNs = 1 * kMs;        // launch.cpp's kRecheckNs
constexpr uint64_t kPublishNs = 20 * kUs;       // launch.cpp's kPublishNs

// A job: one process of one partition, launching kernels of `kernel_ns`.
struct Job {
    double share = 0;
    bool share_promised = true;   // false: overcommitted (best effort)
    bool cap = false;
    int klass = policy::kNormal;
    uint64_t kernel_ns = 1 * kMs;
    uint64_t gap_ns = 0;          // host time between a launch (sync: a kernel's end) and the next launch
    bool sync = false;            // waits for each kernel before launching the next
    uint64_t period_ns = 0;       // with sync: a request every period (gap_ns unused)
    int depth = 2;                // without sync: kernels it keeps queued at most
    uint64_t start_ns = 0;        // launches from then ...
    uint64_t stop_ns = kNever;    // ... until then
    uint64_t pause_ns = 0, resume_ns = 0;   // and launches nothing in between
};

struct Kernel {
    int p;
    uint64_t len;
};

// One device, its partitions' jobs, and the clock.
class World {
public:
    explicit World(std::vector<Job> jobs) : jobs_(std::move(jobs)), n_(jobs_.size()), c_(n_) {
        for (int i = 0; i < n_; i++) {
            policy::Partition &p = d_.partitions[i];
            p.in_use = true;
            p.share = jobs_[i].share;
            p.share_promised = jobs_[i].share_promised;
            p.capped = jobs_[i].cap;
            p.klass = jobs_[i].klass;
            Job &j = jobs_[i];
            j.start_ns += kEpoch, j.pause_ns += kEpoch, j.resume_ns += kEpoch;
            if (j.stop_ns != kNever) j.stop_ns += kEpoch;
            c_[i].next = j.start_ns;
        }
        now_ = kEpoch;
    }

    // Runs until `end`: the device, and each job's next step when its time comes.
    void run(uint64_t end) {
        end += kEpoch;
        while (true) {
            uint64_t t = device_next();
            int who = -1;
            for (int i = 0; i < n_; i++)
                if (c_[i].next < t) t = c_[i].next, who = i;
            if (t >= end) break;
            now_ = t;
            if (who < 0) complete();
            else step(who);
        }
        now_ = end;
    }

    // Device time the device ran partition p's kernels within [from, to).
    uint64_t ran(int p, uint64_t from, uint64_t to) const {
        from += kEpoch, to += kEpoch;
        uint64_t sum = 0;
        for (const auto &s : runs_)
            if (s.p == p) sum += overlap(s.start, s.end, from, to);
        return sum;
    }
    double fraction(int p, uint64_t from, uint64_t to) const { return (double)ran(p, from, to) / (double)(to - from); }
    // Of partition p's launches from `from` on, how long they waited at the gate, at quantile q.
    uint64_t wait_quantile(int p, uint64_t from, double q) const {
        std::vector<uint64_t> w;
        from += kEpoch;
        for (const auto &x : c_[p].waits)
            if (x.first >= from) w.push_back(x.second);
        if (w.empty()) return 0;
        std::sort(w.begin(), w.end());
        return w[std::min(w.size() - 1, (size_t)(q * (double)w.size()))];
    }
    // How long partition p's first launch from `from` on waited at the gate.
    uint64_t first_wait(int p, uint64_t from) const {
        for (const auto &x : c_[p].waits)
            if (x.first - x.second >= from + kEpoch) return x.second;
        return kNever;
    }

    // The one-line view of the run for a failing test.
    std::string shares(uint64_t from, uint64_t to) const {
        std::string s;
        char buf[48];
        for (int i = 0; i < n_; i++) {
            std::snprintf(buf, sizeof buf, "%s%.1f%%", i ? " " : "", 100 * fraction(i, from, to));
            s += buf;
        }
        return s;
    }

private:
    struct Run {
        int p;
        uint64_t start, end;
    };
    // A job's process as the shim keeps it (launch.cpp's DeviceView and the wait in gate.cpp).
    struct Client {
        uint64_t next = 0;            // when it next acts
        uint64_t want = 0;            // when the launch it is making was wanted (0: none pending)
        uint64_t request = 0;         // when its last launch was wanted
        bool waiting_turn = false;    // inside wait_turn()
        bool sleeping = false;        // on the owner word: woken when the device is freed
        bool starting = false;        // took the device, waiting for others' work to drain
        bool blocked = false;         // waits for its own kernels (sync, or the queue full)
        int queued = 0;
        policy::Mode mode = policy::kAlone;
        uint64_t next_check = 0, published = 0;
        bool outranked = false;
        bool yield_queue = false;     // a high partition is busy: one kernel queued at most
        policy::SaturationWindow window;
        uint64_t refilled_ns = 0;     // the partition's bucket's last refill (one job per partition)
        std::vector<std::pair<uint64_t, uint64_t>> waits;   // (launched at, waited)
    };

    static uint64_t overlap(uint64_t a, uint64_t b, uint64_t from, uint64_t to) {
        uint64_t lo = std::max(a, from), hi = std::min(b, to);
        return hi > lo ? hi - lo : 0;
    }

    uint64_t device_next() const { return queue_.empty() ? kNever : running_end_; }

    // The kernel at the head of the queue completes; the next starts.
    void complete() {
        Kernel k = queue_.front();
        queue_.pop_front();
        runs_.push_back({k.p, now_ - k.len, now_});
        policy::Partition &p = d_.partitions[k.p];
        p.inflight--;
        p.last_done_ns = now_;
        p.busy_ns += k.len;
        Client &c = c_[k.p];
        c.queued--;
        if (p.capped || policy::held_to_share(p)) p.tokens_ns -= (int64_t)k.len;
        if (c.blocked) {
            c.blocked = false;
            c.next = now_ + (jobs_[k.p].sync ? jobs_[k.p].gap_ns : 0);
            if (jobs_[k.p].period_ns) c.next = std::max(now_, c.request + jobs_[k.p].period_ns);
        }
        if (!queue_.empty()) running_end_ = now_ + queue_.front().len;
    }

    void launch(int i) {
        Client &c = c_[i];
        policy::Partition &p = d_.partitions[i];
        p.inflight++;
        p.last_launch_ns = now_;
        c.waits.push_back({now_, now_ - c.want});
        c.want = 0;
        if (queue_.empty()) running_end_ = now_ + jobs_[i].kernel_ns;
        queue_.push_back({i, jobs_[i].kernel_ns});
        c.queued++;
        const Job &j = jobs_[i];
        if (j.sync || c.queued >= (c.yield_queue ? 1 : j.depth)) c.blocked = true, c.next = kNever;
        else c.next = now_ + j.gap_ns;
    }

    // gate.cpp's charge_turn(), release() and refill().
    void charge_turn(int p, uint64_t now) {
        uint64_t start = d_.lease_start_ns;
        d_.lease_start_ns = now;
        if (p >= 0) d_.partitions[p].vtime_ns += policy::turn_charge(d_, p, start, now);
    }
    void release(int from, uint64_t end) {
        if (d_.owner != from) return;
        charge_turn(from, end);
        d_.owner = -1;
        for (Client &c : c_)   // the futex wake
            if (c.sleeping) c.sleeping = false, c.next = now_;
    }
    void refill(int i) {
        policy::Partition &p = d_.partitions[i];
        uint64_t &last = c_[i].refilled_ns;
        if (last == 0) {
            last = now_, p.tokens_ns = 0;
            return;
        }
        if (now_ <= last) return;
        p.tokens_ns = policy::refilled(p, p.tokens_ns, now_ - last);
        last = now_;
    }

    // One step of job i at now_: what gated() and wait_turn() do, on the snapshot.
    void step(int i) {
        Client &c = c_[i];
        const Job &j = jobs_[i];
        policy::Partition &mine = d_.partitions[i];
        c.next = kNever;
        c.sleeping = false;
        if (c.starting) return start_turn(i);
        if (!c.want) {   // a new launch, unless the job has stopped or pauses
            if (now_ >= j.stop_ns) return;
            if (now_ >= j.pause_ns && now_ < j.resume_ns) {
                c.next = j.resume_ns;
                return;
            }
            c.want = now_;
            c.request = now_;
        }
        if (!c.waiting_turn) {
            // gated(): publish, look again every kRecheckNs, launch straight through or in turns.
            uint64_t prev_launch = c.published;
            if (now_ - c.published >= kPublishNs) c.published = now_, mine.last_launch_ns = now_;
            if (now_ >= c.next_check) {
                c.next_check = now_ + kRecheckNs;
                policy::Outlook o = policy::decide(d_, i, now_);
                if (o.ask_saturation) policy::settle(o, d_, i, policy::measure_saturation(c.window, d_, now_));
                c.mode = o.mode;
                c.outranked = o.outranked;
                c.yield_queue = o.yield_queue;
                if (o.give_back) release(i, now_);
            }
            if (c.mode != policy::kGate) {
                if (d_.owner < 0 || d_.owner == i) return launch(i);
                c.mode = policy::kGate;
                c.next_check = now_ + kRecheckNs;
            }
            bool allowance = policy::has_allowance(mine);
            if (policy::in_turn(d_.owner, i, d_.lease_until_ns, now_, c.outranked, allowance, mine.tokens_ns))
                return launch(i);
            c.waiting_turn = true;
            if (mine.waiting_ns == 0) {
                mine.waiting_ns = now_;
                if (policy::returning(d_, i, now_, prev_launch)) mine.vtime_ns = policy::caught_up_vtime(d_, i, now_);
            }
        }
        for (int guard = 0; guard < 64; guard++) {
            if (policy::has_allowance(mine)) {
                refill(i);
                policy::Allowance a = policy::allowance(d_, i, now_);
                if (a.forgive) mine.tokens_ns = 0;
                if (a.stand_aside) {
                    mine.waiting_ns = 0;
                    if (mine.inflight == 0) release(i, now_);
                    c.next = now_ + std::max(a.sleep_ns, kSlackNs);
                    return;
                }
                if (mine.waiting_ns == 0) mine.waiting_ns = now_;
            }
            policy::Step s = policy::turn_step(d_, i, now_, c.outranked);
            switch (s.action) {
            case policy::Step::kLaunch: return turn_launch(i);
            case policy::Step::kRenew:
                charge_turn(i, now_);
                d_.lease_until_ns = now_ + policy::kLeaseNs;
                return turn_launch(i);
            case policy::Step::kHandOver: release(i, now_); continue;
            case policy::Step::kFree: release(s.partition, s.end_ns); continue;
            case policy::Step::kTakeFrom:
                charge_turn(s.partition, now_);
                d_.owner = i;
                return start_turn(i);
            case policy::Step::kTake:
                d_.owner = i;
                return start_turn(i);
            case policy::Step::kSleep:
                c.sleeping = true;
                c.next = now_ + s.sleep_ns;
                return;
            case policy::Step::kDrain:
            case policy::Step::kNap: c.next = now_ + kNapNs; return;
            }
        }
        EXPECT(false, "partition %d's wait did not settle at %llu ns", i, (unsigned long long)now_);
        c.next = now_ + kNapNs;
    }
    void start_turn(int i) {
        Client &c = c_[i];
        if (policy::others_inflight(d_, i, now_)) {
            c.starting = true;
            c.next = now_ + kNapNs;
            return;
        }
        c.starting = false;
        d_.lease_start_ns = now_;
        d_.lease_until_ns = now_ + policy::kLeaseNs;
        turn_launch(i);
    }
    void turn_launch(int i) {
        Client &c = c_[i];
        c.waiting_turn = false;
        c.published = now_;
        d_.partitions[i].waiting_ns = 0;
        launch(i);
    }

    std::vector<Job> jobs_;
    int n_;
    policy::Device d_;
    std::vector<Client> c_;
    std::deque<Kernel> queue_;
    uint64_t running_end_ = 0;
    std::vector<Run> runs_;
    uint64_t now_ = 0;
};

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------
// Keeps the device busy: 1 ms kernels, two queued.
Job saturating(double share, int klass = policy::kNormal) {
    Job j;
    j.share = share;
    j.klass = klass;
    return j;
}
// Launches a kernel of `kernel_ns`, waits for it, works `gap_ns` on the host.
Job synchronising(double share, uint64_t kernel_ns, uint64_t gap_ns) {
    Job j;
    j.share = share;
    j.sync = true;
    j.kernel_ns = kernel_ns;
    j.gap_ns = gap_ns;
    return j;
}

bool near(double got, double want, double tolerance) { return std::fabs(got - want) <= tolerance; }

// ---------------------------------------------------------------------------
// Shares
// ---------------------------------------------------------------------------
void shares_follow_weights(const std::vector<double> &weights) {
    std::vector<Job> jobs;
    for (double w : weights) jobs.push_back(saturating(w));
    World w(jobs);
    w.run(3 * kS);
    for (size_t i = 0; i < weights.size(); i++)
        EXPECT(near(w.fraction((int)i, 1 * kS, 3 * kS), weights[i], 0.02), "%zu partitions: got %s",
               weights.size(), w.shares(1 * kS, 3 * kS).c_str());
}

void test_busy_partitions_get_their_shares_at_2_4_and_8() {
    shares_follow_weights({0.25, 0.75});
    shares_follow_weights({0.1, 0.2, 0.3, 0.4});
    shares_follow_weights({0.05, 0.05, 0.1, 0.1, 0.1, 0.15, 0.2, 0.25});
}

void test_partitions_without_a_share_split_what_the_shares_leave() {
    World w({saturating(0.5), saturating(0), saturating(0)});
    w.run(3 * kS);
    const double want[] = {0.5, 0.25, 0.25};
    for (int i = 0; i < 3; i++)
        EXPECT(near(w.fraction(i, 1 * kS, 3 * kS), want[i], 0.02), "got %s", w.shares(1 * kS, 3 * kS).c_str());
}

// A share overcommitted beside a promised one is weighed within what the
// promise leaves: 75% promised keeps its 75% beside a best-effort 75%.
void test_a_best_effort_share_never_dilutes_a_promised_one() {
    Job effort = saturating(0.75);
    effort.share_promised = false;
    World w({saturating(0.75), effort});
    w.run(3 * kS);
    EXPECT(near(w.fraction(0, 1 * kS, 3 * kS), 0.75, 0.02), "promised 75%% beside best effort 75%%: got %s",
           w.shares(1 * kS, 3 * kS).c_str());
}

// ---------------------------------------------------------------------------
// Caps
// ---------------------------------------------------------------------------
void test_a_capped_partition_stays_under_its_cap_even_alone() {
    Job j = saturating(0.3);
    j.cap = true;
    World w({j});
    w.run(2 * kS);
    double got = w.fraction(0, 0, 2 * kS);
    EXPECT(got <= 0.3 + 0.005 && got >= 0.27, "alone, capped at 30%%: got %.1f%%", 100 * got);
}

void test_a_capped_partition_beside_a_busy_one_gets_its_cap_and_leaves_the_rest() {
    Job j = saturating(0.2);
    j.cap = true;
    World w({j, saturating(0)});
    w.run(3 * kS);
    // A ceiling: never more; and most of it (when it has tokens again it may
    // wait for the other's turn to end, and its bucket holds kCapBucketNs).
    double capped = w.fraction(0, 1 * kS, 3 * kS);
    EXPECT(capped <= 0.2 + 0.005 && capped >= 0.85 * 0.2 && w.fraction(1, 1 * kS, 3 * kS) >= 0.8 - 0.005,
           "cap 20%% beside a busy partition: got %s", w.shares(1 * kS, 3 * kS).c_str());
}

// ---------------------------------------------------------------------------
// Work conservation
// ---------------------------------------------------------------------------
void test_an_idle_partitions_share_goes_to_the_busy_one() {
    Job idle = saturating(0.75);
    idle.start_ns = 10 * kS;
    World w({saturating(0.25), idle});
    w.run(2 * kS);
    EXPECT(w.fraction(0, 0, 2 * kS) >= 0.99, "a 25%% partition alone got %.1f%%", 100 * w.fraction(0, 0, 2 * kS));
}

// Partition 0 (25%) stops for two seconds, while partition 1 (75%) runs on
// alone, then comes back: it gets the device within a turn, and its share
// from then on, neither more (the other is not charged for its solitude) nor
// less (it owes nothing for having been away).
void test_a_partition_returning_from_idle_gets_its_share_at_once() {
    Job back = saturating(0.25);
    back.pause_ns = 1 * kS, back.resume_ns = 3 * kS;
    World w({back, saturating(0.75)});
    w.run(3400 * kMs);
    EXPECT(near(w.fraction(0, 3 * kS, 3400 * kMs), 0.25, 0.03), "back from idle, the 25%% partition got %s",
           w.shares(3 * kS, 3400 * kMs).c_str());
    EXPECT(w.fraction(1, 1100 * kMs, 3 * kS) >= 0.99, "alone, the 75%% partition got %.1f%%",
           100 * w.fraction(1, 1100 * kMs, 3 * kS));
    uint64_t first = w.first_wait(0, 3 * kS);
    EXPECT(first <= 2 * kMs, "back from idle, its first launch waited %.2f ms", (double)first / 1e6);
}

// Two services that leave the device idle most of the time (a 0.5 ms request
// every 5 ms, and a 0.1 ms one every 1 ms) do not wait for each other's turns.
void test_busy_partitions_on_an_unsaturated_device_do_not_take_turns() {
    Job slow = synchronising(0.5, 500 * kUs, 0), quick = synchronising(0.5, 100 * kUs, 0);
    slow.period_ns = 5 * kMs, quick.period_ns = 1 * kMs;
    World w({slow, quick});
    w.run(2 * kS);
    for (int i = 0; i < 2; i++) {
        uint64_t p90 = w.wait_quantile(i, 1 * kS, 0.9);
        EXPECT(p90 == 0, "service %d waited %.2f ms at the gate at p90", i, (double)p90 / 1e6);
    }
}

// ---------------------------------------------------------------------------
// Idle holders, and turns charged as held
// ---------------------------------------------------------------------------
// A job that synchronises after each kernel has nothing in flight between
// its kernel's end and its next launch: it is not idle then, and keeps its
// turn. Its share is the turns it holds (its kernels fill 3 ms of each
// 3.3 ms of them).
void test_a_holder_that_synchronises_keeps_its_turn_and_its_share() {
    World w({synchronising(0.25, 3 * kMs, 300 * kUs), saturating(0.75)});
    w.run(3 * kS);
    double want = 0.25 * 3.0 / 3.3;
    EXPECT(near(w.fraction(0, 1 * kS, 3 * kS), want, 0.01), "want %.1f%% for the synchronising job, got %s",
           100 * want, w.shares(1 * kS, 3 * kS).c_str());
}

// The instant a synchronising holder's kernel ends, with its next launch to
// come: a waiting partition sleeps on, it does not take the device.
void test_a_holder_whose_queue_just_drained_is_not_idle() {
    policy::Device d;
    uint64_t now = 10 * kS;
    for (int i = 0; i < 2; i++) d.partitions[i].in_use = true, d.partitions[i].share = 0.5;
    d.owner = 0;
    d.lease_start_ns = now - 4 * kMs, d.lease_until_ns = now + 4 * kMs;
    d.partitions[0].last_launch_ns = now - 3 * kMs;   // its kernel ran 3 ms
    d.partitions[0].last_done_ns = now - 50 * kUs;    // and ended just now
    d.partitions[1].waiting_ns = now - 4 * kMs;
    policy::Step s = policy::turn_step(d, 1, now, false);
    EXPECT(s.action == policy::Step::kSleep, "the waiter's step is %d, not a sleep", (int)s.action);
    // Idle for longer than the idle gap: freed, charged until its work was done.
    s = policy::turn_step(d, 1, now + policy::kIdleGapNs, false);
    EXPECT(s.action == policy::Step::kFree && s.partition == 0 && s.end_ns == now - 50 * kUs,
           "after the idle gap the step is %d, ending at %llu", (int)s.action, (unsigned long long)s.end_ns);
}

// A job whose launches leave the device idle in its turns (100 us kernels,
// 400 us of host work between them) is charged its turns as held: the busy
// partition beside it holds the device half the time, as their equal weights say.
void test_turns_are_charged_as_held_not_as_used() {
    World w({synchronising(0.5, 100 * kUs, 400 * kUs), saturating(0.5)});
    w.run(3 * kS);
    double other = w.fraction(1, 1 * kS, 3 * kS);
    EXPECT(other >= 0.47, "the busy partition got %.1f%% beside one that fills a fifth of its turns",
           100 * other);
}

void test_a_turn_is_charged_at_most_the_turn_bound() {
    policy::Device d;
    d.partitions[0].in_use = true, d.partitions[0].share = 0.5;
    EXPECT(policy::turn_charge(d, 0, 1 * kS, 11 * kS) == (uint64_t)(policy::kMaxTurnNs / 0.5),
           "a 10 s turn is charged %llu", (unsigned long long)policy::turn_charge(d, 0, 1 * kS, 11 * kS));
    EXPECT(policy::turn_charge(d, 0, 1 * kS, 1 * kS + 4 * kMs) == 8 * kMs, "a 4 ms turn at 50%% is 8 ms");
    // A holder far past its turn, with work in flight that never completes
    // (its process vanished mid-launch), is freed.
    d.partitions[1].in_use = true, d.partitions[1].waiting_ns = 1;
    d.owner = 0, d.lease_until_ns = 1 * kS;
    d.partitions[0].inflight = 1, d.partitions[0].last_launch_ns = 1 * kS;
    uint64_t late = 1 * kS + policy::kMaxTurnNs;
    EXPECT(policy::turn_step(d, 1, late, false).action == policy::Step::kSleep, "freed at the bound");
    policy::Step s = policy::turn_step(d, 1, late + 1, false);
    EXPECT(s.action == policy::Step::kFree && s.end_ns == late + 1, "past the bound the step is %d", (int)s.action);
}

// ---------------------------------------------------------------------------
// Priority classes
// ---------------------------------------------------------------------------
void test_a_high_partition_takes_the_device_and_waits_at_most_a_kernel() {
    World w({saturating(0, policy::kHigh), saturating(0.5), saturating(0.5)});
    w.run(2 * kS);
    EXPECT(w.fraction(0, 500 * kMs, 2 * kS) >= 0.98, "high got %s", w.shares(500 * kMs, 2 * kS).c_str());
    uint64_t p99 = w.wait_quantile(0, 500 * kMs, 0.99);
    EXPECT(p99 <= 1 * kMs, "high waited %.2f ms at p99", (double)p99 / 1e6);
}

void test_a_high_partition_with_a_share_is_held_to_it_while_others_are_busy() {
    World w({saturating(0.3, policy::kHigh), saturating(0.7)});
    w.run(3 * kS);
    EXPECT(near(w.fraction(0, 1 * kS, 3 * kS), 0.3, 0.03), "high at 30%% got %s",
           w.shares(1 * kS, 3 * kS).c_str());
}

// Alone, a high partition with a share runs on; it owes nothing for that when
// another comes, which gets its part of the device at once.
void test_a_high_partition_owes_nothing_for_running_alone() {
    Job other = saturating(0.7);
    other.start_ns = 1 * kS;
    World w({saturating(0.3, policy::kHigh), other});
    w.run(1500 * kMs);
    EXPECT(w.fraction(0, 0, 1 * kS) >= 0.99, "alone, high got %.1f%%", 100 * w.fraction(0, 0, 1 * kS));
    EXPECT(near(w.fraction(0, 1 * kS, 1500 * kMs), 0.3, 0.05), "once the other came, high got %s",
           w.shares(1 * kS, 1500 * kMs).c_str());
}

// Low gets what the others leave (less the idle gap after each of normal's
// requests, before the device is taken from it), and a normal partition
// coming back takes the device from it within low's queue.
void test_a_low_partition_gets_what_the_others_leave() {
    Job low = saturating(0.5);
    low.klass = policy::kLow;
    World w({low, synchronising(0.5, 1 * kMs, 5 * kMs)});
    w.run(3 * kS);
    double normal = w.fraction(1, 1 * kS, 3 * kS), rest = w.fraction(0, 1 * kS, 3 * kS);
    EXPECT(rest >= 0.5, "low got %.1f%% of the %.1f%% normal left", 100 * rest, 100 * (1 - normal));
    uint64_t p99 = w.wait_quantile(1, 1 * kS, 0.99);
    EXPECT(p99 <= 2 * kMs, "normal waited %.2f ms at p99 behind low", (double)p99 / 1e6);
}

void test_low_waits_while_normal_is_busy() {
    Job low = saturating(0.5);
    low.klass = policy::kLow;
    World w({low, saturating(0.5)});
    w.run(2 * kS);
    EXPECT(w.fraction(0, 500 * kMs, 2 * kS) <= 0.01, "low got %s", w.shares(500 * kMs, 2 * kS).c_str());
}

}  // namespace

int main() {
    test_busy_partitions_get_their_shares_at_2_4_and_8();
    test_partitions_without_a_share_split_what_the_shares_leave();
    test_a_best_effort_share_never_dilutes_a_promised_one();
    test_a_capped_partition_stays_under_its_cap_even_alone();
    test_a_capped_partition_beside_a_busy_one_gets_its_cap_and_leaves_the_rest();
    test_an_idle_partitions_share_goes_to_the_busy_one();
    test_a_partition_returning_from_idle_gets_its_share_at_once();
    test_busy_partitions_on_an_unsaturated_device_do_not_take_turns();
    test_a_holder_that_synchronises_keeps_its_turn_and_its_share();
    test_a_holder_whose_queue_just_drained_is_not_idle();
    test_turns_are_charged_as_held_not_as_used();
    test_a_turn_is_charged_at_most_the_turn_bound();
    test_a_high_partition_takes_the_device_and_waits_at_most_a_kernel();
    test_a_high_partition_with_a_share_is_held_to_it_while_others_are_busy();
    test_a_high_partition_owes_nothing_for_running_alone();
    test_a_low_partition_gets_what_the_others_leave();
    test_low_waits_while_normal_is_busy();
    if (failures) std::printf("gate policy: %d failed\n", failures);
    else std::printf("gate policy: all passed\n");
    return failures ? 1 : 0;
}
