"""How good are the cost model's choices on specs it has never seen?

    python benchmarks/plan_regret.py [--profile auto|FILE] [--n 40] [--seed 123]

Draws `n` random specs from the profile grid's distribution with a different seed (so none is in the
profile), measures every applicable implementation on each, and compares the planner's choice with the
measured best: the share of specs within 10% of the best and the total regret. The choice is the one
`make_plan` makes (`planner.choose_for_spec`: the simplest implementation predicted within 10% of the
fastest), not the raw fastest prediction. `pac` takes no part (neither as choice nor as best): it computes
a different function once trained and is chosen only by the user's pac= policy.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from convrewrite import implementations, profiles  # noqa: E402
from convrewrite.planner import choose_for_spec  # noqa: E402
from convrewrite.profile import MAX_DIRECT_MACS, random_spec, time_spec  # noqa: E402

SPEED_CANDIDATES = implementations.speed_names()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="auto")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    cm = profiles.resolve(args.profile)
    known = {m["spec"] for m in cm.measurements}
    rng = np.random.default_rng(args.seed)
    hits, regret, best_total, n = 0, 0.0, 0.0, 0
    print(f"{'spec':<44} {'batch':>5} {'chosen':>10} {'best':>10} {'chosen/best':>11}")
    while n < args.n:
        spec = random_spec(rng, MAX_DIRECT_MACS["quick"])
        if spec.to_json() in known:
            continue
        times = time_spec(spec, allow=SPEED_CANDIDATES)
        # the candidates make_plan would offer: every timed (applicable) implementation, pac excluded
        chosen = choose_for_spec(spec, cm, {k: "" for k in times})[0]
        best = min(times, key=times.get)
        ratio = times[chosen] / times[best]
        hits += ratio <= 1.1
        regret += times[chosen] - times[best]
        best_total += times[best]
        n += 1
        print(f"{spec.short():<44} {spec.batch:>5} {chosen:>10} {best:>10} {ratio:>10.2f}x", flush=True)
    print(f"\nwithin 10% of the measured best: {hits}/{n} = {hits / n:.0%}; "
          f"total regret {regret / best_total:.1%} of the best total ({cm.name}, {cm.mode or 'custom'} profile)")


if __name__ == "__main__":
    main()
