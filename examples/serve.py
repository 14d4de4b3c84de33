"""An inference-like server: it holds a model's weights and answers requests, each a buffer and a kernel.

Requests arrive every ``--period-ms``; each one takes ``--request-memory`` for its activations and
``--kernel-ms`` of GPU time, and is answered when its kernel is done. A request whose memory the GPU
refuses (CUDA_ERROR_OUT_OF_MEMORY: under ``fracgpu run --memory``, the quota) is answered "busy" and the
server goes on, as a server should, rather than crash. It prints the latency of the answered ones.

    fracgpu run --memory 512MiB --priority high --name serve -- python examples/serve.py

``--framework torch`` does the same with PyTorch tensors on a real GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.stdout.reconfigure(line_buffering=True)   # each line as it happens, also into a pipe or a log file


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else 0.0


def serve(args: argparse.Namespace, allocate, release, compute, name: str, total: int) -> None:
    """The request loop, the same for both frameworks: ``allocate(size)`` gives a buffer or None when
    the GPU refuses it; ``compute(buffer)`` runs a request's kernel and waits for it."""
    from _gpu import size_text

    print(f"serve: {name}, {size_text(total)} of memory as this job sees it")
    weights = allocate(args.weights)
    if weights is None:
        sys.exit(f"serve: the weights ({size_text(args.weights)}) do not fit")
    print(f"serve: weights {size_text(args.weights)}; serving {args.requests} requests, one every "
          f"{args.period_ms:g} ms")
    latencies, busy, held = [], 0, []
    next_request = time.monotonic()
    for n in range(args.requests):
        time.sleep(max(0.0, next_request - time.monotonic()))
        arrived = time.monotonic()
        next_request = arrived + args.period_ms / 1000
        buffer = allocate(args.request_memory)
        if buffer is None:
            busy += 1   # answered "busy": the client retries elsewhere; the server stays up
            continue
        compute(buffer)
        latencies.append((time.monotonic() - arrived) * 1000)
        if n < args.keep:   # a cache that grows with the first requests, as a KV cache does
            held.append(buffer)
        else:
            release(buffer)
    print(f"serve: {len(latencies)} answered, {busy} answered busy (memory refused at the quota); "
          f"latency p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms")


def main() -> None:
    from _gpu import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--period-ms", type=float, default=10.0)
    parser.add_argument("--kernel-ms", type=float, default=2.0)
    parser.add_argument("--weights", type=parse_size, default=parse_size("256MiB"))
    parser.add_argument("--request-memory", type=parse_size, default=parse_size("32MiB"))
    parser.add_argument("--keep", type=int, default=0,
                        help="requests whose memory is kept (a cache that grows), to show refusals at the quota")
    parser.add_argument("--framework", choices=["cuda", "torch"], default="cuda")
    args = parser.parse_args()
    if args.framework == "torch":
        import torch

        if not torch.cuda.is_available():
            sys.exit("serve: PyTorch sees no GPU (PyTorch does not run on the simulated one: use --framework cuda)")

        def allocate(size: int):
            try:
                return torch.empty(size, dtype=torch.uint8, device="cuda")
            except torch.cuda.OutOfMemoryError:
                return None

        def compute(buffer) -> None:
            buffer[:1 << 20].fill_(1)
            torch.cuda._sleep(int(args.kernel_ms * 1e6))
            torch.cuda.synchronize()

        serve(args, allocate, lambda buffer: None, compute, torch.cuda.get_device_name(),
              torch.cuda.mem_get_info()[1])
        return
    from _gpu import GPU

    gpu = GPU()

    def compute_cuda(buffer) -> None:
        gpu.fill(buffer, 1, min(args.request_memory, 1 << 20) // 4)   # its first MiB: the input
        gpu.spin(int(args.kernel_ms * 1e6))
        gpu.synchronize()

    serve(args, gpu.try_alloc, gpu.free, compute_cuda, gpu.name(), gpu.memory()[1])


if __name__ == "__main__":
    main()
