"""A device profile measured within a time budget (for benchmarks/gpu.sh on a lent GPU machine).

`convrewrite profile --quick` writes nothing until its whole grid is timed, and on JAX every timing compiles
XLA computations of its own (on a GPU with cuDNN autotuning), so a grid may not finish in the minutes a lent
machine gives. This script first times the canaries (`convrewrite.profile.time_canaries`, as the CLI does),
then the same grid (`convrewrite.profile.grid(mode)`), spec by spec with `convrewrite.profile.time_spec` as
the CLI does (every applicable implementation, interleaved, 3 repeats), in a seeded random order (so a grid
cut short still spans its spec families), starting no spec once --budget seconds less --reserve (for the
fit and the save) are spent; then it fits and saves the profile. The profile's "mode" says
"<mode> (partial: i of n specs)" where the grid was cut short. A spec started before the deadline runs to
its end, so allow the process a little more than --budget.

    python benchmarks/gpu_profile.py -o profile.json --budget 220
    python benchmarks/gpu_profile.py -o profile.json --max-specs 2        # a tiny check of the pipeline
    python benchmarks/gpu_profile.py -o profile.json --copy-to cost_models  # also as cost_models/<slug>.json

--copy-to DIR also writes the profile as DIR/<convrewrite.device.slug(fingerprint)>.json, the name the
shipped profiles have. The last line printed is the path of that copy (or of -o).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite import profile as profiling  # noqa: E402
from convrewrite.cost import CostModel  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="profile JSON to write")
    ap.add_argument("--mode", default="quick", choices=("quick", "full"), help="which grid (default quick)")
    ap.add_argument("--budget", type=float, default=220.0, help="seconds for the whole run (default 220)")
    ap.add_argument("--reserve", type=float, default=10.0,
                    help="seconds of the budget kept for the fit and the save (default 10)")
    ap.add_argument("--max-specs", type=int, default=None, help="time at most this many specs of the grid")
    ap.add_argument("--copy-to", metavar="DIR", help="also write DIR/<device slug>.json")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    fp = convrewrite.fingerprint()
    print(f"{fp['backend']} {fp.get(fp['backend'])}; device: {convrewrite.device.describe(fp)}", flush=True)
    specs = profiling.grid(args.mode)
    order = np.random.default_rng(0).permutation(len(specs))
    limit = min(len(specs), args.max_specs or len(specs))
    t0 = time.perf_counter()
    canaries = profiling.time_canaries()
    print(f"canaries: {len(canaries)} timings in {time.perf_counter() - t0:.1f} s", flush=True)
    rows, timed = [], 0
    for i in order[:limit]:
        if time.perf_counter() - start > args.budget - args.reserve:
            break
        t0 = time.perf_counter()
        spec = specs[int(i)]
        result = profiling.time_spec(spec, repeats=3)
        rows.extend({"spec": spec.to_json(), "impl": impl, "seconds": s} for impl, s in result.items())
        timed += 1
        print(f"  spec {timed}/{limit} ({time.perf_counter() - t0:.1f} s, {len(result)} implementations): "
              f"{spec.short()}", flush=True)
    mode = args.mode if timed == len(specs) else f"{args.mode} (partial: {timed} of {len(specs)} specs)"
    cm = CostModel(fp, rows, mode=mode, canaries=canaries).fit()
    cm.save(args.output)
    v = cm.validation or {}
    print(f"wrote {args.output} ({mode}): {len(rows)} timings, implementations {sorted(cm.fits)}; held-out: "
          f"{(v.get('within_10pct_of_best') or 0):.0%} of predicted choices within 10% of the best; "
          f"{time.perf_counter() - start:.0f} s in all", flush=True)
    path = args.output
    if args.copy_to:
        os.makedirs(args.copy_to, exist_ok=True)
        path = os.path.join(args.copy_to, f"{convrewrite.device.slug(fp)}.json")
        shutil.copyfile(args.output, path)
    print(path)


if __name__ == "__main__":
    main()
