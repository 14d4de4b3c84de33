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
#include <unistd.h>

namespace {

int failures = 0;

#define EXPECT(cond)                                                                \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond);      \
            failures++;                                                             \
        }                                                                           \
    } while (0)

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
    int slot = r.join(partition, getpid(), "job", &limit, &err, 0, 0, holder);
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

    r.close();
    std::string cmd = std::string("rm -rf ") + dir;
    if (system(cmd.c_str()) != 0) failures++;
    if (failures) fprintf(stderr, "%d failure(s)\n", failures);
    else printf("state: all passed\n");
    return failures ? 1 : 0;
}
