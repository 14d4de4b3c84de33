// A partition's memory as its jobs see it: see fracgpu/view.h.
#include "fracgpu/view.h"

#include "fracgpu/state.h"

#include <sys/stat.h>

namespace fracgpu {

ViewStatus read_partition_memory(const std::string &state_dir, const std::string &uuid,
                                 const std::string &partition, uint64_t real_free, bool reap, MemoryView *out,
                                 std::string *err) {
    struct stat st;
    if (state_dir.empty() || stat(state_dir.c_str(), &st) != 0) return ViewStatus::kAbsent;
    Region region;
    std::string why;
    if (!region.open(state_dir, uuid, "", 0, /*create=*/false, &why)) {
        // No region for this GPU is the ordinary case of a GPU fracgpu never
        // used; anything else (damaged, foreign, unsafe) is worth a word.
        bool exists = false;
        for (const std::string &path : region_files(state_dir))
            if (path.find(uuid) != std::string::npos) exists = true;
        if (!exists) return ViewStatus::kAbsent;
        if (err) *err = why;
        return ViewStatus::kError;
    }
    if (reap) region.reap();
    int idx = region.find_partition(partition);
    if (idx < 0) return ViewStatus::kAbsent;
    const SharedRegion *r = region.raw();
    const SharedPartition &p = r->partitions[idx];
    *out = memory_view(memory_ceiling(*r, idx), r->total_memory, p.used.load(std::memory_order_relaxed), real_free);
    return ViewStatus::kFound;
}

}  // namespace fracgpu
