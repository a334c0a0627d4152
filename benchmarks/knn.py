"""Benchmark exact kNN (conngeo.geometry.knn) against sklearn brute force and the GEMM floor.

    .venv/bin/python benchmarks/knn.py                         # the default sizes (minutes)
    .venv/bin/python benchmarks/knn.py --sizes 5000x1024       # a quick run

Random float32 data, exact k-NN under L2, the point itself excluded. For each size, each method
runs in its own subprocess, so its peak memory is the growth of that process's max RSS
(resource.getrusage) after the data exist: tracemalloc does not see torch or BLAS allocations.

Methods:
  conngeo  conngeo.geometry.knn(x, k), default memory budget
  sklearn  NearestNeighbors(algorithm="brute", n_jobs=None).fit(x).kneighbors() (self excluded)
  gemm     the compute floor: X @ X.T in the same row blocks into a reused buffer, nothing else;
           2 N^2 D flops, the matmul that any exact brute-force kNN has to do

Threads: every method uses the library defaults (torch and sklearn's OpenMP both use all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

METHODS = ("conngeo", "sklearn", "gemm")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args) -> None:
    """Run one method once and print a JSON line: seconds, peak extra bytes."""
    import torch

    x = np.random.default_rng(args.seed).standard_normal((args.n, args.d), dtype=np.float32)
    xt = torch.from_numpy(x)  # shares memory with x
    if args.method == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        def run():
            nn = NearestNeighbors(n_neighbors=args.k, algorithm="brute", n_jobs=None).fit(x)
            return nn.kneighbors(return_distance=False)  # no query: each point excluded from its own
    elif args.method == "conngeo":
        from conngeo.geometry import knn

        def run():
            return knn(xt, args.k, max_block_bytes=args.max_block_bytes).numpy()
    else:
        from conngeo.geometry import block_rows

        rows = block_rows(args.n, 4, args.max_block_bytes)
        buf = torch.empty(rows, args.n)

        def run():
            for start in range(0, args.n, rows):
                stop = min(start + rows, args.n)
                torch.mm(xt[start:stop], xt.T, out=buf[: stop - start])

    before = maxrss_bytes()
    t = time.perf_counter()
    idx = run()
    seconds = time.perf_counter() - t
    peak = maxrss_bytes() - before
    if idx is not None and args.save:
        np.save(args.save, idx)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak}))


def run_method(method: str, n: int, d: int, args, save: str | None) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--d", str(d), "--k", str(args.k),
           "--seed", str(args.seed), "--max-block-bytes", str(args.max_block_bytes)]
    if save:
        cmd += ["--save", save]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        print(f"  {method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000x1024,20000x4096,50000x1024", help="comma-separated NxD list (default: %(default)s)")
    p.add_argument("--k", type=int, default=100, help="neighbours per point (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    p.add_argument("--max-block-bytes", type=int, default=256 * 2**20, help="conngeo/gemm distance block budget (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="rounds over all methods, interleaved so a busy machine slows all alike; the fastest run "
                   "of each method counts (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per method and size (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip comparing conngeo's neighbours with sklearn's")
    # internal: one method in a subprocess
    p.add_argument("--worker", choices=METHODS, dest="method", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        return worker(args)

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    print(f"exact kNN, k={args.k}, L2, float32, {os.cpu_count()} CPUs, block budget {args.max_block_bytes / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            n, d = (int(v) for v in size.lower().split("x"))
            print(f"\nN={n:,} D={d:,}   (N^2 float32 = {n * n * 4 / 2**20:,.0f} MiB; GEMM = {2 * n * n * d / 1e12:.2f} TFLOP)")
            runs = {m: [] for m in methods}
            saved = {m: os.path.join(tmp, f"{m}_{n}x{d}.npy") if m != "gemm" and not args.no_check else None for m in methods}
            for round_ in range(args.repeat):
                for m in methods:
                    r = run_method(m, n, d, args, saved[m] if round_ == 0 else None)
                    if r is not None:
                        runs[m].append(r)
            res = {m: {"seconds": min(r["seconds"] for r in rs), "peak_bytes": max(r["peak_bytes"] for r in rs)}
                   for m, rs in runs.items() if rs}
            for m, r in res.items():
                gflops = 2 * n * n * d / r["seconds"] / 1e9
                times = ", ".join(f"{r['seconds']:.2f}" for r in runs[m])
                print(f"  {m:8s} {r['seconds']:8.2f} s  peak +{r['peak_bytes'] / 2**20:8.0f} MiB  ({gflops:6.1f} GFLOP/s effective)"
                      + (f"  runs: {times}" if args.repeat > 1 else ""))
            if "conngeo" in res:
                c = res["conngeo"]
                if "sklearn" in res:
                    print(f"  vs sklearn brute: {res['sklearn']['seconds'] / c['seconds']:.2f} faster (below 1: slower)")
                if "gemm" in res:
                    print(f"  vs GEMM floor: {c['seconds'] / res['gemm']['seconds']:.2f} (time / floor time)")
                print(f"  conngeo peak memory: {c['peak_bytes'] / (n * n * 4):.1%} of N^2 float32, "
                      f"{c['peak_bytes'] / (n * d * 4):.2f}x the data")
                if saved.get("sklearn") and saved.get("conngeo") and "sklearn" in res:
                    a, b = np.load(saved["conngeo"]), np.load(saved["sklearn"])
                    same_set = np.mean([len(set(r) & set(s)) / args.k for r, s in zip(a, b)])
                    print(f"  agreement with sklearn: {np.mean(a == b):.4%} of slots identical, {same_set:.4%} of neighbour sets")


if __name__ == "__main__":
    main()
