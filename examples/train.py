"""A training-like job: it holds its weights, sizes its batch to what the GPU lets it have, and runs steps.

It asks for a batch of ``--batch`` bytes; refused with CUDA_ERROR_OUT_OF_MEMORY (under ``fracgpu run
--memory``, the quota), it halves the batch and tries again, as training scripts do when a batch does not
fit. Each step writes its first sample (1 MiB of the batch) with a kernel, computes for ``--step-ms``, and
reads a value back.

    fracgpu run --memory 1GiB --name train -- python examples/train.py --batch 2GiB

``--framework torch`` does the same with PyTorch tensors (a real GPU: PyTorch's CUDA runtime does not run
on the simulated one); ``cuda`` (the default) uses cuda-bindings, which runs on either.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.stdout.reconfigure(line_buffering=True)   # each line as it happens, also into a pipe or a log file

SAMPLE = 1 << 20   # what each step writes and checks: the simulated GPU's kernels write host memory, at its speed


def with_cuda(args: argparse.Namespace) -> None:
    from _gpu import GPU, size_text

    gpu = GPU()
    free, total = gpu.memory()
    print(f"train: {gpu.name()}, {size_text(total)} of memory as this job sees it")
    weights = gpu.try_alloc(args.weights)
    if weights is None:
        sys.exit(f"train: the weights ({size_text(args.weights)}) do not fit in {size_text(free)}")
    print(f"train: weights {size_text(args.weights)}")
    batch, size = None, args.batch
    while batch is None:
        batch = gpu.try_alloc(size)
        if batch is None:
            if size <= args.weights // 16:
                sys.exit(f"train: not even a batch of {size_text(size)} fits; give the job more memory")
            print(f"train: a batch of {size_text(size)} was refused (CUDA_ERROR_OUT_OF_MEMORY); "
                  f"trying {size_text(size // 2)}")
            size //= 2
    words, start = min(size, SAMPLE) // 4, time.monotonic()
    for step in range(args.steps):
        gpu.fill(batch, step, words)
        gpu.spin(int(args.step_ms * 1e6))
        if gpu.read_word(batch, words - 1) != step:
            sys.exit(f"train: step {step} read back a value its kernel did not write")
    gpu.free(batch)
    gpu.free(weights)
    print(f"train: batch {size_text(size)}, {args.steps} steps in {time.monotonic() - start:.2f} s, "
          "every step's writes read back")


def with_torch(args: argparse.Namespace) -> None:
    import torch
    from _gpu import size_text

    if not torch.cuda.is_available():
        sys.exit("train: PyTorch sees no GPU (PyTorch does not run on the simulated one: use --framework cuda)")
    free, total = torch.cuda.mem_get_info()
    print(f"train: {torch.cuda.get_device_name()}, {size_text(total)} of memory as this job sees it")
    weights = torch.empty(args.weights, dtype=torch.uint8, device="cuda")
    size = args.batch
    while True:
        try:
            batch = torch.empty(size // 4, dtype=torch.int32, device="cuda")
            sample = batch[:SAMPLE // 4]
            break
        except torch.cuda.OutOfMemoryError:
            print(f"train: a batch of {size_text(size)} was refused (out of memory); trying {size_text(size // 2)}")
            torch.cuda.empty_cache()
            size //= 2
            if size <= args.weights // 16:
                sys.exit("train: no batch fits; give the job more memory")
    start = time.monotonic()
    for step in range(args.steps):
        sample.fill_(step)
        torch.cuda._sleep(int(args.step_ms * 1e6))   # cycles, roughly ns on current GPUs: stands in for compute
        if int(sample[-1]) != step:
            sys.exit(f"train: step {step} read back a value it did not write")
    del sample, batch, weights
    print(f"train: batch {size_text(size)}, {args.steps} steps in {time.monotonic() - start:.2f} s, "
          "every step's writes read back")


def main() -> None:
    from _gpu import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=parse_size, default=parse_size("2GiB"), help="batch to ask for first")
    parser.add_argument("--weights", type=parse_size, default=parse_size("256MiB"), help="memory the weights hold")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--step-ms", type=float, default=5.0, help="GPU time per step, in milliseconds")
    parser.add_argument("--framework", choices=["cuda", "torch"], default="cuda")
    args = parser.parse_args()
    (with_torch if args.framework == "torch" else with_cuda)(args)


if __name__ == "__main__":
    main()
