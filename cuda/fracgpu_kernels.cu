// The project's real CUDA kernels. The simulated driver implements kernels of
// the same names and parameters, so one client program runs unchanged on the
// simulated GPU and on a real one. extern "C": the names are looked up
// unmangled with cuModuleGetFunction.

// Occupies the SM(s) it runs on for `ns` nanoseconds of device global time.
// %globaltimer is a nanosecond clock common to all SMs, so every block stops
// at the same moment. Launch one block per SM to occupy the whole device.
extern "C" __global__ void fracgpu_spin(unsigned long long ns)
{
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}

// Writes `count` 32-bit copies of `value` from `dst`, whatever the launch
// shape: a grid-stride loop.
extern "C" __global__ void fracgpu_fill(unsigned long long dst, unsigned int value,
                                        unsigned long long count)
{
    unsigned int *p = reinterpret_cast<unsigned int *>(dst);
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < count; i += stride)
        p[i] = value;
}
