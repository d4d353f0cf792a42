"""Does a new device get the same plan every time? `optimize` from a fresh cache, several times, compared.

    python benchmarks/first_plan.py                         # replk, 5 runs
    python benchmarks/first_plan.py restoration large_kernel --runs 5
    python benchmarks/first_plan.py replk --simulate amd-zen4   # as a CPU that no shipped profile describes

Each run is a new process with an empty user cache (CONVREWRITE_CACHE), as on a machine that never ran
convrewrite: `auto` must calibrate a shipped profile of this machine class or measure a quick profile. It
prints, per run: which profile `auto` took (or that it measured one) and why, the seconds that took, the
implementations measured beside a calibrated profile, the plan's choices and the speed check's verdict with
its interval. Then, per model, whether every run gave the same plan. Names this device by its full
fingerprint first. (Models: `benchmarks/models.py`'s.)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = r'''
import json, os, sys, time, warnings
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.simplefilter("ignore")
import convrewrite
from convrewrite import profiles
import models
start = time.perf_counter()
cm = profiles.resolve("auto")
resolved = time.perf_counter() - start
out = {"profile": str(cm.path.name if cm.path else cm.name), "trust": cm.trust, "resolve_s": resolved,
       "calibration": cm.calibration.describe() if cm.calibration else None,
       "supplement": cm.describe_supplement() if cm.supplement else None, "plans": {}}
for name in sys.argv[2:]:
    fast = convrewrite.optimize(models.MODELS[name](), cost_model=cm)
    out["plans"][name] = {"choices": fast.convrewrite_plan.choices(), "speed": fast.convrewrite_speed.describe()}
print("RESULT " + json.dumps(out))
'''


def one_run(models, simulate):
    env = dict(os.environ, CONVREWRITE_CACHE=tempfile.mkdtemp(prefix="first-plan-"))
    env.pop("CONVREWRITE_CHECK_SPEED", None)  # the speed check as users get it
    if simulate:
        env["CONVREWRITE_SIMULATE_DEVICE"] = simulate
    proc = subprocess.run([sys.executable, "-c", RUN, str(Path(__file__).resolve().parent), *models],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["replk"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--simulate", default=None, metavar="NAME",
                        help="CONVREWRITE_SIMULATE_DEVICE for every run (see convrewrite.device.SIMULATED_DEVICES)")
    args = parser.parse_args()
    if args.simulate:
        os.environ["CONVREWRITE_SIMULATE_DEVICE"] = args.simulate
    from convrewrite import device

    print(f"device: {device.describe(device.fingerprint())}")
    results = []
    for i in range(args.runs):
        r = one_run(args.models, args.simulate)
        results.append(r)
        print(f"run {i + 1}: {r['profile']} ({r['trust']}, {r['resolve_s']:.0f} s)"
              + (f"; {r['calibration']}" if r["calibration"] else "")
              + (f"; {r['supplement']}" if r["supplement"] else ""), flush=True)
        for name, p in r["plans"].items():
            counts = {}
            for choice in p["choices"].values():
                counts[choice] = counts.get(choice, 0) + 1
            print(f"  {name}: {counts}; {p['speed']}", flush=True)
    for name in args.models:
        plans = [json.dumps(r["plans"][name]["choices"], sort_keys=True) for r in results]
        print(f"{name}: {len(set(plans))} distinct plan(s) in {len(plans)} fresh-cache runs")


if __name__ == "__main__":
    main()
