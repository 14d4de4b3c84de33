// The launch gate's policy (fracgpu/gate_policy.h): pure functions of a
// snapshot and a time.
#include "fracgpu/gate_policy.h"

#include <algorithm>
#include <climits>

namespace fracgpu {
namespace policy {

bool busy(const Partition &p, uint64_t now) {
    uint64_t last = p.last_launch_ns;
    return p.inflight > 0 || p.waiting_ns != 0 || (last && (now <= last || now - last < kActiveNs));
}

bool held_to_share(const Partition &p) { return p.klass == kHigh && !p.capped && p.share > 0; }

// What decide() learns in one pass over the partitions.
struct Survey {
    bool others_busy = false, others_exist = false, high_busy = false, higher_busy = false, mixed = false;
    double weight = 1.0;
};

static Survey survey(const Device &d, int me, uint64_t now) {
    const Partition &mine = d.partitions[me];
    bool mine_low = mine.klass == kLow;
    Survey s;
    double shared = 0, effort = 0;   // promised shares, and overcommitted (best-effort) ones
    int unshared = 0;
    for (int i = 0; i < kMaxPartitions; i++) {
        const Partition &q = d.partitions[i];
        if (!q.in_use) continue;
        if ((q.klass == kLow) == mine_low) {   // low's shares are not counted against the others'
            if (q.share > 0) (q.share_promised ? shared : effort) += q.share;
            else unshared++;
        }
        if (i == me) continue;
        s.others_exist = true;
        bool b = busy(q, now);
        s.others_busy = s.others_busy || b;
        s.high_busy = s.high_busy || (b && q.klass == kHigh);
        s.higher_busy = s.higher_busy || (b && q.klass > mine.klass);
        s.mixed = s.mixed || (b && q.klass != mine.klass);
    }
    // Best-effort shares divide what the promised ones leave, so they never dilute a promise.
    double left = shared < 0.95 ? 1.0 - shared : 0.05;
    double effort_scale = effort > left ? left / effort : 1.0;
    shared += effort * effort_scale;
    double rest = shared < 0.95 ? 1.0 - shared : 0.05;
    double share = mine.share_promised ? mine.share : mine.share * effort_scale;
    s.weight = share > 0 ? share : rest / (unshared ? unshared : 1);
    return s;
}

Outlook decide(const Device &d, int me, uint64_t now) {
    Survey s = survey(d, me, now);
    Outlook o;
    o.weight = s.weight;
    o.yield_queue = s.high_busy && d.partitions[me].klass != kHigh;
    o.outranked = s.higher_busy;
    // Partitions of different classes busy together always take turns:
    // priority is kept in turns.
    if (d.partitions[me].capped || (s.others_busy && s.mixed)) o.mode = kGate;
    else if (s.others_busy) o.mode = kGate, o.ask_saturation = true;
    else o.mode = s.others_exist ? kWatch : kAlone;
    o.give_back = o.mode != kGate && d.owner == me;
    return o;
}

void settle(Outlook &o, const Device &d, int me, bool saturated) {
    if (!o.ask_saturation) return;
    o.ask_saturation = false;
    if (!saturated) o.mode = kWatch;   // others are busy, so they exist
    // Nobody else takes turns: a lease still held is given back, its turn
    // charged until now and no further (a returning partition takes the device
    // without waiting, and finds virtual times as they were).
    o.give_back = o.mode != kGate && d.owner == me;
}

double weight_of(const Device &d, int p) {
    double w = survey(d, p, 0).weight;
    return w > 0 ? w : 1.0;
}

bool measure_saturation(SaturationWindow &w, const Device &d, uint64_t now) {
    if (now - w.at_ns < kRateWindowNs) return w.saturated;
    uint64_t used = 0;
    for (int i = 0; i < kMaxPartitions; i++) {
        uint64_t b = d.partitions[i].in_use ? d.partitions[i].busy_ns : 0;
        used += b >= w.busy_ns[i] ? b - w.busy_ns[i] : b;   // a partition made anew: all of its
        w.busy_ns[i] = b;
    }
    if (w.at_ns) {
        double rate = (double)used / (double)(now - w.at_ns);
        w.calm = rate < kUnsaturatedRate ? w.calm + 1 : 0;
        if (rate >= kSaturatedRate) w.saturated = true;
        else if (w.calm >= kCalmWindows) w.saturated = false;
    }
    w.at_ns = now;
    return w.saturated;
}

uint64_t turn_charge(const Device &d, int p, uint64_t start, uint64_t now) {
    if (p < 0 || start == 0 || now <= start || !d.partitions[p].in_use) return 0;
    uint64_t held = std::min(now - start, kMaxTurnNs);
    return (uint64_t)((double)held / weight_of(d, p));
}

int most_deserving(const Device &d) {
    int best = -1, best_class = -1;
    uint64_t best_v = 0;
    for (int i = 0; i < kMaxPartitions; i++) {
        const Partition &q = d.partitions[i];
        if (!q.in_use || q.waiting_ns == 0) continue;
        if (q.klass > best_class || (q.klass == best_class && q.vtime_ns < best_v))
            best = i, best_class = q.klass, best_v = q.vtime_ns;
    }
    return best;
}

bool others_waiting(const Device &d, int me, int klass) {
    for (int i = 0; i < kMaxPartitions; i++) {
        const Partition &q = d.partitions[i];
        if (i != me && q.in_use && q.waiting_ns != 0 && q.klass >= klass) return true;
    }
    return false;
}

bool others_inflight(const Device &d, int me, uint64_t now) {
    for (int i = 0; i < kMaxPartitions; i++) {
        const Partition &q = d.partitions[i];
        if (i == me || !q.in_use || q.inflight == 0) continue;
        if (now < q.last_launch_ns || now - q.last_launch_ns < kStaleInflightNs) return true;
    }
    return false;
}

bool others_busy(const Device &d, int me, uint64_t now) {
    for (int i = 0; i < kMaxPartitions; i++)
        if (i != me && d.partitions[i].in_use && busy(d.partitions[i], now)) return true;
    return false;
}

bool returning(const Device &d, int me, uint64_t now, uint64_t prev_launch) {
    return d.owner != me && (!prev_launch || now - prev_launch >= kActiveNs) && d.partitions[me].inflight == 0;
}

uint64_t caught_up_vtime(const Device &d, int me, uint64_t now) {
    uint64_t floor = UINT64_MAX;
    int klass = d.partitions[me].klass;
    for (int i = 0; i < kMaxPartitions; i++) {
        const Partition &q = d.partitions[i];
        if (i == me || !q.in_use || !busy(q, now) || q.klass != klass) continue;
        floor = std::min(floor, q.vtime_ns);
    }
    uint64_t v = d.partitions[me].vtime_ns;
    return floor != UINT64_MAX && v < floor ? floor : v;
}

uint64_t bucket_ns(const Partition &p) {
    return p.capped ? kCapBucketNs : (uint64_t)(p.share * (double)kPriorityWindowNs);
}

int64_t refilled(const Partition &p, int64_t tokens, uint64_t elapsed) {
    int64_t next = tokens + (int64_t)((double)elapsed * p.share);
    return std::min(next, (int64_t)bucket_ns(p));
}

Allowance allowance(const Device &d, int me, uint64_t now) {
    const Partition &mine = d.partitions[me];
    Allowance a;
    int64_t tokens = mine.tokens_ns;
    if (tokens < 0 && !mine.capped && !others_busy(d, me, now)) {
        // Alone, a high partition runs on; it owes nothing for that when others come.
        a.forgive = true;
        tokens = 0;
    }
    if (tokens >= 0) return a;
    // Out of allowance: not a candidate for the device meanwhile (others
    // neither yield to it nor wait for it); it sleeps about as long as the
    // bucket takes to refill.
    a.stand_aside = true;
    double wait_ns = (double)-tokens / mine.share;
    a.sleep_ns = wait_ns < (double)kStandAsideMaxNs ? (uint64_t)wait_ns : kStandAsideMaxNs;
    return a;
}

Step turn_step(const Device &d, int me, uint64_t now, bool outranked) {
    const Partition &mine = d.partitions[me];
    Step s;
    if (d.owner == me) {
        if (now < d.lease_until_ns && !(outranked && others_waiting(d, me, mine.klass + 1))) {
            s.action = Step::kLaunch;
        } else if (!others_waiting(d, me, mine.klass)) {
            s.action = Step::kRenew;
        } else {
            // The turn is over (or a higher class waits): hand the device over once our work has drained.
            s.action = mine.inflight == 0 ? Step::kHandOver : Step::kDrain;
        }
        return s;
    }
    if (d.owner >= 0) {
        const Partition &holder = d.partitions[d.owner];
        // Idle: nothing in flight, and nothing launched since its work was
        // last seen done (a holder whose queue just drained, synchronising
        // before its next launch, is not idle).
        uint64_t last = std::max(holder.last_launch_ns, holder.last_done_ns);
        bool high_holder = holder.klass == kHigh;
        uint64_t gap = high_holder ? kHighIdleGapNs : kIdleGapNs;
        bool idle = holder.inflight == 0 && holder.waiting_ns == 0 && now > last && now - last > gap;
        // A holder far past its turn is taken from even with work in flight
        // (a counter can only be wrong there if its process vanished).
        bool expired = now > d.lease_until_ns + kMaxTurnNs;
        if (!holder.in_use || idle || expired) {
            // An idle holder is charged until its work was last seen done, not for its idling.
            s.action = Step::kFree;
            s.partition = d.owner;
            s.end_ns = idle ? std::min(now, last) : now;
            return s;
        }
        if (mine.klass == kHigh && !high_holder) {
            if (most_deserving(d) == me) s.action = Step::kTakeFrom, s.partition = d.owner;
            return s;
        }
        // Sleep until the holder hands over, its turn ends, or it may have
        // gone idle (looked at again every gap / 4).
        uint64_t left = d.lease_until_ns > now ? d.lease_until_ns - now : 0;
        s.action = Step::kSleep;
        s.partition = d.owner;
        s.sleep_ns = std::clamp<uint64_t>(left, kMinSleepNs, gap / 4);
        return s;
    }
    if (most_deserving(d) == me && !others_inflight(d, me, now)) s.action = Step::kTake;
    return s;
}

}  // namespace policy
}  // namespace fracgpu
