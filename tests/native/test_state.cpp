// The shared state's process table, natively (and under the sanitizers in CI):
// a job's holder keeps the slots of its ended processes, with their counters,
// until it collects them; without a living holder a slot is freed at once.
// Exits non-zero on the first failure, naming it.
#include "fracgpu/state.h"

#include <cstdio>
#include <cstdlib>
#include <signal.h>
#include <string>
#include <sys/wait.h>
#include <vector>
#include <unistd.h>

#include "expect.h"

namespace {

int failures = 0;

const char *kUuid = "GPU-00000000-0000-0000-0000-0000000000aa";

// A child that joins `partition` (made for it, ephemeral) with `holder`,
// charges `bytes` and some device time, then ends (leaving its slot, or not).
pid_t job_process(const std::string &dir, const char *partition, int holder, uint64_t bytes, bool leave) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    fracgpu::Region r;
    std::string err;
    uint64_t limit = 1 << 20;
    if (!r.open(dir, kUuid, "test GPU", 1 << 30, true, &err)) _exit(10);
    // A named partition is joined as it is; otherwise the job makes its private one.
    int slot = r.join(partition, getpid(), "job", r.find_partition(partition) >= 0 ? nullptr : &limit, &err, 0, 0,
                      holder);
    if (slot < 0 || !r.charge(slot, bytes)) _exit(11);
    r.raw()->processes[slot].device_ns.fetch_add(7000);
    if (leave) r.leave(slot);
    _exit(0);
}

int wait_for(pid_t pid) {
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

const fracgpu::PartitionInfo *find(const std::vector<fracgpu::PartitionInfo> &parts, const char *name) {
    for (auto &p : parts)
        if (p.name == name) return &p;
    return nullptr;
}

// Each of `n` children, let go at once, runs `job` (which returns a count,
// 0..255), reports it, and keeps its slots until all have reported. Returns
// the counts.
template <class Job>
std::vector<int> at_once(int n, Job job) {
    int go[2], done[2], release[2];
    if (pipe(go) || pipe(done) || pipe(release)) return {};
    std::vector<pid_t> kids;
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            close(go[1]);
            close(release[1]);
            char c;
            if (read(go[0], &c, 1) < 0) _exit(20);   // EOF: go
            unsigned char count = (unsigned char)job(i);
            if (write(done[1], &count, 1) != 1) _exit(21);
            if (read(release[0], &c, 1) < 0) _exit(22);   // EOF: all reported
            _exit(0);
        }
        kids.push_back(pid);
    }
    close(go[0]);
    close(go[1]);
    std::vector<int> counts;
    for (int i = 0; i < n; i++) {
        unsigned char count;
        if (read(done[0], &count, 1) == 1) counts.push_back(count);
    }
    close(release[1]);
    for (pid_t pid : kids) wait_for(pid);
    close(done[0]);
    close(done[1]);
    close(release[0]);
    return counts;
}

// Of 8 processes making a private partition of 3/4 of the GPU at once,
// exactly one gets it, the others are refused with the reason; and processes
// without a promise, charging at once, together never take what was promised.
bool race_for_promises(const std::string &dir) {
    int before = failures;
    const uint64_t total = 1 << 30, quarter = total / 4;
    std::vector<int> joined = at_once(8, [&](int i) {
        fracgpu::Region c;
        std::string e;
        uint64_t limit = 3 * quarter;
        if (!c.open(dir, kUuid, "test GPU", total, true, &e)) return 9;
        if (c.join("race-" + std::to_string(i), getpid(), "job", &limit, &e) >= 0) return 1;
        return e.find(fracgpu::kDoesNotFit) != std::string::npos &&
               e.find("already promised 768MiB (race-") != std::string::npos ? 0 : 8;
    });
    int winners = 0;
    for (int j : joined) {
        EXPECT(j == 0 || j == 1);
        winners += j == 1;
    }
    EXPECT(joined.size() == 8 && winners == 1);

    fracgpu::Region r;
    std::string err;
    EXPECT(r.open(dir, kUuid, "test GPU", total, false, &err));
    EXPECT(r.reap() == 1);   // the winner's slot; its partition goes with it
    EXPECT(r.create_partition("promised", 3 * quarter, 0, 0, &err));
    const uint64_t block = 8 << 20;
    std::vector<int> blocks = at_once(8, [&](int i) {
        fracgpu::Region c;
        std::string e;
        uint64_t none = 0;
        if (!c.open(dir, kUuid, "test GPU", total, false, &e)) return 255;
        int slot = c.join("pool-" + std::to_string(i), getpid(), "job", &none, &e);
        if (slot < 0) return 254;
        int n = 0;
        while (n < 200 && c.charge(slot, block)) n++;
        return n;
    });
    int sum = 0;
    for (int b : blocks) sum += b;
    EXPECT(blocks.size() == 8 && (uint64_t)sum * block == quarter);   // all of what nobody was promised, no more
    EXPECT(r.reap() == 8 && r.remove_partition("promised", &err));
    return failures == before;
}

}  // namespace

int main() {
    char tmpl[] = "/tmp/fracgpu-state-test-XXXXXX";
    const char *dir = mkdtemp(tmpl);
    if (!dir) return 2;
    fracgpu::Region r;
    std::string err;
    if (!r.open(dir, kUuid, "test GPU", 1 << 30, true, &err)) {
        fprintf(stderr, "open: %s\n", err.c_str());
        return 2;
    }
    int me = getpid();

    // Killed (no leave) while we hold it: reaping keeps the slot, exited, memory given back.
    EXPECT(wait_for(job_process(dir, "held", me, 4096, false)) == 0);
    EXPECT(r.reap() == 1);
    auto procs = r.processes();
    EXPECT(procs.size() == 1 && procs[0].exited && procs[0].holder == me && procs[0].used == 0 &&
           procs[0].peak == 4096 && procs[0].device_ns == 7000);
    auto parts = r.partitions();
    const fracgpu::PartitionInfo *held = find(parts, "held");
    EXPECT(held && held->used == 0 && held->peak == 4096 && held->processes == 0);
    EXPECT(r.reap() == 0);                 // still held: nothing more to do
    EXPECT(r.collect(me + 1) == 0);        // another holder's call frees nothing of ours
    EXPECT(r.collect(me) == 1);
    EXPECT(r.processes().empty());
    EXPECT(!find(r.partitions(), "held"));   // its ephemeral partition went with its last slot

    // Leaving normally while held: the same.
    EXPECT(wait_for(job_process(dir, "left", me, 100, true)) == 0);
    procs = r.processes();
    EXPECT(procs.size() == 1 && procs[0].exited && procs[0].device_ns == 7000);
    EXPECT(r.collect(me) == 1 && !find(r.partitions(), "left"));

    // No holder: freed at once.
    EXPECT(wait_for(job_process(dir, "free", 0, 100, false)) == 0);
    EXPECT(r.reap() == 1 && r.processes().empty() && !find(r.partitions(), "free"));

    // A holder that is already gone when the process joins counts as none.
    pid_t gone = fork();
    if (gone == 0) _exit(0);
    wait_for(gone);
    EXPECT(wait_for(job_process(dir, "orphan", gone, 100, true)) == 0);
    EXPECT(r.processes().empty() && !find(r.partitions(), "orphan"));

    // A holder that dies before collecting: its kept slots are freed by the next reap.
    pid_t holder = fork();
    if (holder == 0) {
        pause();
        _exit(0);
    }
    EXPECT(wait_for(job_process(dir, "lost", holder, 100, false)) == 0);
    EXPECT(r.reap() == 1 && r.processes().size() == 1);
    kill(holder, SIGKILL);
    wait_for(holder);
    EXPECT(r.reap() == 1 && r.processes().empty() && !find(r.partitions(), "lost"));

    // A named partition keeps going; removing it frees the held slots in it.
    EXPECT(r.create_partition("team", 0, 0, 0, &err));
    pid_t p = fork();
    if (p == 0) {
        fracgpu::Region c;
        std::string e;
        if (!c.open(dir, kUuid, "test GPU", 1 << 30, true, &e) || c.join("team", getpid(), "job", nullptr, &e, 0, 0, me) < 0)
            _exit(11);
        _exit(0);
    }
    EXPECT(wait_for(p) == 0);
    EXPECT(r.reap() == 1 && r.processes().size() == 1);
    EXPECT(r.remove_partition("team", &err));
    EXPECT(r.processes().empty());

    // A process starting frees the slots of dead ones (found by pid, before it takes the
    // lock), so what they held goes back; and its slot keeps how long it waited for the lock.
    EXPECT(r.create_partition("shared", 0, 0, 0, &err));
    EXPECT(wait_for(job_process(dir, "shared", 0, 4096, false)) == 0);   // dies holding 4096 bytes
    EXPECT(r.processes().size() == 1 && find(r.partitions(), "shared")->used == 4096);
    int slot = r.join("shared", me, "starter", nullptr, &err);
    procs = r.processes();
    EXPECT(slot >= 0 && procs.size() == 1 && procs[0].pid == me && procs[0].join_wait_ns > 0);
    EXPECT(find(r.partitions(), "shared")->used == 0);
    r.leave(slot);
    EXPECT(r.processes().empty() && r.remove_partition("shared", &err));

    // A process killed between the two steps of a charge (the partition's total, then its
    // own share) leaves bytes no process holds: once no live process is left in the
    // partition, its books are 0 again. While another lives, they are left as they are.
    {
        EXPECT(r.create_partition("torn", 0, 0, 0, &err));
        int mine = r.join("torn", me, "watcher", nullptr, &err);
        EXPECT(mine >= 0);
        pid_t child = fork();
        if (child == 0) {
            fracgpu::Region c;
            std::string e;
            if (!c.open(dir, kUuid, "test GPU", 1 << 30, true, &e)) _exit(10);
            int s = c.join("torn", getpid(), "job", nullptr, &e);
            if (s < 0 || !c.charge(s, 4096)) _exit(11);
            c.raw()->partitions[c.raw()->processes[s].partition].used.fetch_add(1 << 20);   // the torn step
            _exit(0);
        }
        EXPECT(wait_for(child) == 0);
        EXPECT(r.reap() == 1);
        EXPECT(find(r.partitions(), "torn")->used == (1 << 20));   // the watcher lives: not guessed at
        r.leave(mine);
        EXPECT(find(r.partitions(), "torn")->used == 0);
        EXPECT(r.processes().empty() && r.remove_partition("torn", &err));
    }

    // The node agent adopts a process nobody records: its slot is then kept when it ends, and
    // collected slot by slot. A figure the agent took stands over the process's own "not listed".
    {
        EXPECT(r.create_partition("kept", 0, 0, 0, &err));
        int go[2];
        EXPECT(pipe(go) == 0);
        pid_t child = fork();
        if (child == 0) {
            close(go[1]);
            fracgpu::Region c;
            std::string e;
            if (!c.open(dir, kUuid, "test GPU", 1 << 30, true, &e)) _exit(10);
            int s = c.join("kept", getpid(), "job", nullptr, &e);
            if (s < 0 || !c.charge(s, 1 << 16)) _exit(11);
            if (c.reconcile(s, getpid(), false, 0, 1 << 16) != 0) _exit(12);   // before any figure: unknown
            char ch;
            if (read(go[0], &ch, 1) < 0) _exit(13);   // EOF: the parent is done checking
            if (c.reconcile(s, getpid(), false, 0, 1 << 16) != 4096) _exit(14);   // the agent's figure stands
            _exit(0);
        }
        close(go[0]);
        std::vector<fracgpu::ProcessInfo> live;
        for (int i = 0; i < 500 && live.empty(); i++) {
            live = r.processes();
            if (live.empty() || live[0].truth != fracgpu::kTruthUnknown) {
                live.clear();
                usleep(2000);
            }
        }
        EXPECT(live.size() == 1 && live[0].pid == child && live[0].holder == 0);
        if (live.size() == 1) {
            const fracgpu::ProcessInfo k = live[0];
            EXPECT(!r.adopt(k.slot, k.pid, k.start_time + 1, me));          // not that process: refused
            EXPECT(r.adopt(k.slot, k.pid, k.start_time, me));
            EXPECT(!r.adopt(k.slot, k.pid, k.start_time, getppid()));      // held by a live other: refused
            EXPECT(r.reconcile(k.slot, k.pid, true, (1 << 16) + 4096, 1 << 16) == 4096);
            EXPECT(find(r.partitions(), "kept")->used == (1 << 16) + 4096);
            close(go[1]);
            EXPECT(wait_for(child) == 0);
            EXPECT(r.reap() == 1);
            live = r.processes();
            EXPECT(live.size() == 1 && live[0].exited && live[0].holder == me);
            EXPECT(find(r.partitions(), "kept")->used == 0);                // its memory, drift included, is back
            EXPECT(r.collect(me, k.slot + 1) == 0);
            EXPECT(r.collect(me, k.slot) == 1);
            EXPECT(r.processes().empty());
        }
        EXPECT(r.remove_partition("kept", &err));
    }

    // Killed while holding the state lock: a child that does nothing but take it
    // (creating and removing a partition), killed at random moments, 200 times;
    // the lock is robust, so every time the next caller gets it and the table is intact.
    srand(7);
    int recovered = 0;
    for (int i = 0; i < 200; i++) {
        pid_t locker = fork();
        if (locker == 0) {
            fracgpu::Region c;
            std::string e;
            if (!c.open(dir, kUuid, "test GPU", 1 << 30, true, &e)) _exit(11);
            for (;;) {
                c.create_partition("churn", 0, 0, 0, &e);
                c.remove_partition("churn", &e);
            }
        }
        usleep((useconds_t)(rand() % 3000));
        kill(locker, SIGKILL);
        wait_for(locker);
        // The lock is free again (create/remove wait for it, with no deadline): take it twice.
        std::string e;
        if (!find(r.partitions(), "churn")) EXPECT(r.create_partition("churn", 0, 0, 0, &e));
        EXPECT(r.remove_partition("churn", &e));
        recovered++;
    }
    EXPECT(recovered == 200 && r.partitions().empty());

    // Promises, raced by processes started at once.
    EXPECT(race_for_promises(dir));

    r.close();
    std::string cmd = std::string("rm -rf ") + dir;
    if (system(cmd.c_str()) != 0) failures++;
    if (failures) fprintf(stderr, "%d failure(s)\n", failures);
    else printf("state: all passed\n");
    return failures ? 1 : 0;
}
