"""Per-matrix probe of the lean step's matmul kernels at a few rows: `F.linear(x, W)`, `mm(x, W^T)`
with W^T contiguous, and oneDNN with W reordered once (what `cold.runner.llama_step.Dense` runs).

    python scripts/linear_probe.py [--dtype float32] [--threads 2]

SmolLM2-135M's shapes. Each matrix is multiplied repeatedly, so it sits in the cache and a real
step (which streams every weight from memory) is slower: a probe for predictions, not a benchmark
(`scripts/step_time.py`, `cold bench`).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (in, out): qkv, o, gate_up, down, LM head
LAYERS = 30


def median_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps * 1e6)
    return sorted(rounds)[2]


def kernels(weight: torch.Tensor, x: torch.Tensor) -> dict:
    """name -> a call computing x @ weight^T."""
    transposed = weight.T.contiguous()
    found = {"linear": lambda: F.linear(x, weight), "mm_wt": lambda: torch.mm(x, transposed)}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
        found["reordered"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError as exc:  # e.g. bfloat16 without the instructions oneDNN needs for it
        print(f"no reordered kernel: {exc}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    per_step: dict[tuple[int, str], float] = {}
    for rows in (1, 2, 16, 32):
        for k, n in SHAPES:
            weight = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
            x = torch.randn(rows, k, generator=gen).to(dtype)
            head = n > 10000
            times = {name: median_us(fn, 20 if head else 200) for name, fn in kernels(weight, x).items()}
            for name, us in times.items():
                per_step[rows, name] = per_step.get((rows, name), 0.0) + us * (1 if head else LAYERS)
            print(f"rows {rows:3d} {k}x{n:6d}  " + "  ".join(f"{name} {us:8.1f} us" for name, us in times.items()), flush=True)
    print(f"a step's matmuls ({LAYERS} layers of 4 and the LM head), ms:")
    for (rows, name), us in sorted(per_step.items()):
        print(f"  rows {rows:3d} {name:10s} {us / 1000:6.1f}")


if __name__ == "__main__":
    main()
