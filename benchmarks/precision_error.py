"""Calibrate convrewrite.precision's error estimate: the normwise relative error of each reduced-precision
variant vs its float32 layer on random convolutions (random normal inputs and weights).

    python benchmarks/precision_error.py [--n 40] [--seed 0]

Prints, per variant, the largest and median measured error and their ratio to the estimate
(`Implementation.expected_error`); the estimate must stay above every measured error.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import convrewrite  # noqa: E402, F401
from convrewrite import implementations  # noqa: E402
from convrewrite.profile import layer_from_spec  # noqa: E402
from convrewrite.spec import ConvSpec  # noqa: E402
from convrewrite.verify import relative_error  # noqa: E402


def random_spec(rng):
    k = int(rng.choice([1, 3, 5, 7, 9, 15]))
    kind = rng.choice(["dense", "grouped", "dw"])
    c = int(rng.choice([1, 4, 16, 64, 256])) if kind == "dense" else int(rng.choice([8, 32, 128]))
    f = int(rng.choice([4, 16, 64])) if kind == "dense" else c
    hw = int(rng.choice([8, 16, 32]))
    return ConvSpec(kind="depthwise_conv2d" if kind == "dw" else "conv2d", in_channels=c, filters=f, kernel=(k, k),
                    height=hw, width=hw, batch=2, padding="same", groups=1 if kind == "dense" else c)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    variants = [n for n in implementations.names() if implementations.get(n).precision != "float32"]
    errors = {n: [] for n in variants}
    for _ in range(args.n):
        spec = random_spec(rng)
        layer, shape = layer_from_spec(spec)
        x = rng.standard_normal(shape).astype("float32")
        reference = np.asarray(layer(x), dtype="float64")
        for name in variants:
            impl = implementations.get(name)
            if not impl.applicable(spec)[0]:
                continue
            new = impl.make_layer(layer, spec)
            new(x)
            impl.transfer_weights(layer, new, spec)
            err = relative_error(np.asarray(new(x), dtype="float64"), reference)
            errors[name].append((err, err / impl.expected_error(spec), spec.short()))
    for name, rows in errors.items():
        if not rows:
            print(f"{name}: not applicable here")
            continue
        errs = np.array([r[0] for r in rows])
        ratios = np.array([r[1] for r in rows])
        worst = max(rows)
        print(f"{name}: {len(rows)} specs, error max {errs.max():.2e} (on {worst[2]}), median {np.median(errs):.2e}; "
              f"measured / estimate max {ratios.max():.2f}, median {np.median(ratios):.2f}")


if __name__ == "__main__":
    main()
