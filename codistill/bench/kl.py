"""`codistill bench kl`: the peak memory of a language model's KL term, whole against chunked.

One forward and backward pass of `payload_kl` (the term DML, codistillation and KD take) on a
batch of rows × vocabulary logits — by default 16 × 256 positions over a 32,000-token
vocabulary, 524 MB per fp32 copy — against a peer's whole logits and against its top-64
target, once unchunked and once in chunks of rows (`losses.KL_CHUNK_ELEMENTS`). Each arm runs
in a fresh Python process (a peak is a process's), `--rounds` times in alternating order;
reported: the peak resident memory above what the inputs and the gradient take, and the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TOP_K = 64

# One arm, in a fresh process: the inputs made first, the resident set measured, then the KL
# forward and backward, then the peak. Linux: ru_maxrss in KiB, the current set from statm.
ARM = """
import json, os, resource, sys, time
import torch
from codistill.methods.losses import payload_kl, top_k_targets
rows, vocab, chunk, target = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
student = torch.randn(rows, vocab, generator=g).requires_grad_()
teacher = torch.randn(rows, vocab, generator=g)
if target == "logits":
    payload = {"logits": teacher}
else:  # built 256 rows at a time: the peak must be the KL's, not the target's making
    parts = [top_k_targets(teacher[i:i + 256], 64, 1.0) for i in range(0, rows, 256)]
    payload = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    del teacher
student.grad = torch.ones_like(student)  # the gradient's memory counts as an input's (written: resident)
page = os.sysconf("SC_PAGE_SIZE")
before = int(open("/proc/self/statm").read().split()[1]) * page
started = time.perf_counter()
payload_kl(student, payload, 1.0, chunk_elements=chunk).backward()
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra_mb": (peak - before) / 2**20, "inputs_mb": before / 2**20, "seconds": seconds}))
"""


def _arm(rows: int, vocab: int, chunk: int, target: str) -> dict:
    from codistill.errors import RunError

    done = subprocess.run([sys.executable, "-c", ARM, str(rows), str(vocab), str(chunk), target],
                          capture_output=True, text=True)
    if done.returncode != 0:  # out of memory, say: the arm's own last line, not a CalledProcessError
        said = done.stderr.strip().splitlines()
        raise RunError(f"bench kl: the {target} arm ({rows} rows × {vocab} tokens) failed with exit code "
                       f"{done.returncode}: {said[-1][:300] if said else 'no message'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_arguments(args: argparse.Namespace) -> None:
    """Sizes a KL can be measured at: the top-64 arm needs more than 64 tokens to choose from."""
    from codistill.errors import check

    check(args.rows >= 1, "--rows", f"is the positions in the batch, at least 1; got {args.rows}")
    check(args.vocab > TOP_K, "--vocab", f"is the vocabulary size, above {TOP_K} (the top-{TOP_K} arm keeps "
                                         f"{TOP_K} of its tokens); got {args.vocab}")


def main(args: argparse.Namespace) -> int:
    from codistill.bench.common import write_json
    from codistill.methods.losses import KL_CHUNK_ELEMENTS

    check_arguments(args)
    rows, vocab = args.rows, args.vocab
    arms = [(target, name, chunk) for target in ("logits", "top64")
            for name, chunk in (("whole", 2**62), ("chunked", KL_CHUNK_ELEMENTS))]
    print(f"# codistill bench kl — {rows} rows × {vocab} tokens ({rows * vocab * 4 / 2**20:.0f} MB per fp32 copy), "
          f"forward + backward, {args.rounds} rounds, one fresh process per arm, order alternating", flush=True)
    seen: dict[tuple[str, str], list[dict]] = {(t, n): [] for t, n, _ in arms}
    for round_ in range(args.rounds):
        for target, name, chunk in arms if round_ % 2 == 0 else arms[::-1]:
            seen[target, name].append(_arm(rows, vocab, chunk, target))
    figures = {}
    print("\ntarget     KL        peak above inputs (median)   seconds (median)")
    for (target, name), runs in seen.items():
        row = {k: statistics.median(r[k] for r in runs) for k in ("extra_mb", "inputs_mb", "seconds")}
        figures[f"{target}_{name}"] = row
        print(f"  {target:<9}{name:<10}{row['extra_mb']:>10.0f} MB{'':>18}{row['seconds']:>8.2f}")
    write_json(args.out, figures)
    return 0
