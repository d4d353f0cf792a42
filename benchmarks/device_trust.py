"""Does the plan's promise hold on this machine? Plans made from each profile, measured side by side.

    python benchmarks/device_trust.py                          # large_kernel and restoration, batch 8
    python benchmarks/device_trust.py restoration --repeats 7
    python benchmarks/device_trust.py --fresh-device           # as a machine with no profile of its own

For each model it makes these plans and times the original and every optimized model interleaved, in one
process (warm-up excluded, medians):

- oracle: every candidate timed on the model's own conv shapes here (optimize(measure=True)'s tactic
  timings, nothing predicted): the best plan a cost model could make;
- before/<profile>: each shipped profile of this machine class used as it is, without calibration (what
  `auto` did before profiles were calibrated: a profile of the same CPU name was taken at its word);
- after/auto: `auto` as it is now (this device's own profile if one is shipped or cached; else another
  device's profile calibrated here, or a quick profile measured here). With --fresh-device the profiles of
  this exact device are hidden, so `auto` must calibrate or measure, as on a new machine.

Prints, per plan: predicted speedup (with its band), measured speedup, measured / oracle's measured
(target >= 0.9), and |predicted / measured - 1| (target <= 25%); then each shipped profile's calibration
here (canaries timed from scratch: outcome and seconds; target <= 3 s). Names this device by its full
fingerprint first.
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite import cost, device, profiles  # noqa: E402
from convrewrite.cost import CostModel  # noqa: E402
from convrewrite.graph import walk  # noqa: E402
from convrewrite.timing import compiled, time_interleaved  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_models", Path(__file__).with_name("models.py"))
bench_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_models)
MODELS = {"large_kernel": bench_models.large_kernel_model, "restoration": bench_models.restoration_model}


def plans_for(model, batch):
    """{label: Plan} for the oracle, each shipped profile as is, and auto."""
    here = device.fingerprint()
    oracle_cm = CostModel(here, [], {}, name="timed here")
    oracle_cm.trust = "this device"
    sites = [s.spec for s in walk(model).all_sites()]
    profiles.measure_tactics(oracle_cm, sites, batch=batch, progress=False, save=False)
    plans = {"oracle (all timed here)": convrewrite.plan(model, cost_model=oracle_cm, batch=batch)}
    shipped = [p for d in cost.SHIPPED_DIRS if d.is_dir() for p in sorted(d.glob("*.json"))]
    for path in shipped:
        cm = CostModel.load(path)
        if not device.same_class(cm.fingerprint, here):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            as_is = profiles.resolve(str(path), target="other")  # used at its word: no calibration
        plans[f"before/{path.stem}"] = convrewrite.plan(model, cost_model=as_is, batch=batch)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = profiles.resolve("auto")
    label = f"after/auto ({auto.trust}: {auto.name})"
    plans[label] = convrewrite.plan(model, cost_model=auto, batch=batch)
    for w in caught:
        print(f"  auto: {str(w.message)[:300]}")
    print(f"  auto chose its profile in {time.perf_counter() - start:.1f} s")
    return plans


def bench(name, batch, repeats):
    model = MODELS[name]()
    print(f"\n{name} (batch {batch})")
    plans = plans_for(model, batch)
    x = np.random.default_rng(0).standard_normal((batch,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    # plans with the same choices build the same model: time each distinct model once
    key_of = {label: tuple(sorted(plan.choices().items())) for label, plan in plans.items()}
    distinct = {}
    for label, plan in plans.items():
        distinct.setdefault(key_of[label], convrewrite.build(model, plan))
    fns = {"original": compiled(lambda: model(x, training=False))}
    for i, m in enumerate(distinct.values()):
        fns[f"plan{i}"] = compiled(lambda m=m: m(x, training=False))
    timed = time_interleaved(fns, repeats=repeats, warmup=1)
    res = {label: timed[f"plan{list(distinct).index(key_of[label])}"] for label in plans}
    orig = timed["original"]["median"]
    oracle = orig / res["oracle (all timed here)"]["median"]
    print(f"  {len(distinct)} distinct optimized models for {len(plans)} plans")
    print(f"  original {orig * 1e3:.1f} ms per batch (median of {repeats} interleaved rounds)")
    print(f"  {'plan':<62} {'predicted':>15} {'measured':>9} {'vs oracle':>9} {'pred err':>9}  choices")
    for label, plan in plans.items():
        measured = orig / res[label]["median"]
        total, band = plan.predicted_total(), plan.predicted_band()
        predicted = total[0] / total[1] if total else None
        pred_text = "-" if predicted is None else f"{predicted:.2f}x" + (f" +-{band:.0%}" if band is not None else "")
        err = "-" if predicted is None else f"{abs(predicted / measured - 1):.0%}"
        counts = {}
        for c in plan.choices().values():
            counts[c] = counts.get(c, 0) + 1
        print(f"  {label[:62]:<62} {pred_text:>15} {measured:>8.2f}x {measured / oracle:>8.2f}x {err:>9}  {counts}")


def calibration_times():
    """Each shipped profile of this class calibrated from scratch here: outcome and seconds."""
    here = device.fingerprint()
    print("\ncalibration of each shipped profile here (canaries timed from scratch)")
    for d in cost.SHIPPED_DIRS:
        for path in sorted(d.glob("*.json")) if d.is_dir() else []:
            cm = CostModel.load(path)
            if not device.same_class(cm.fingerprint, here):
                continue
            start = time.perf_counter()
            result = profiles.calibrate(cm, here, use_cache=False)
            print(f"  {path.name}: {time.perf_counter() - start:.2f} s, {result.describe()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {', '.join(MODELS)} (default: both)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fresh-device", action="store_true",
                        help="hide the profiles of this exact device, so auto calibrates or measures")
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; expected any of {list(MODELS)}")
    here = device.fingerprint()
    print(f"device: {device.describe(here)} (fingerprint id {device.fingerprint_id(here)})")
    # a user cache of this run's own: nothing measured earlier (tactics, calibrations) changes what it sees
    cost.CACHE_DIR = Path(tempfile.mkdtemp(prefix="convrewrite-bench-cache-"))
    if args.fresh_device:
        hidden = Path(tempfile.mkdtemp(prefix="convrewrite-bench-shipped-"))
        for d in cost.SHIPPED_DIRS:
            for path in sorted(d.glob("*.json")) if d.is_dir() else []:
                if not device.same_device(CostModel.load(path).fingerprint, here):
                    (hidden / path.name).write_bytes(path.read_bytes())
        cost.SHIPPED_DIRS = [hidden]
    calibration_times()
    for name in args.models or list(MODELS):
        bench(name, args.batch, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
