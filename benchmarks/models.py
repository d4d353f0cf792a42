"""Original vs optimized models, side by side in one process (interleaved, warm-up excluded, medians).

    python benchmarks/models.py                       # all models
    python benchmarks/models.py convnext_tiny --batch 8 --repeats 5
    python benchmarks/models.py --cost-model rules    # the rule-based chooser instead of the cost model
    python benchmarks/models.py convnext_tiny --also-rules   # cost-model plan and rule-based plan, interleaved
    python benchmarks/models.py large_kernel --measure       # plan from timings of the model's own shapes
    python benchmarks/models.py resnet50 --rtol 1e-3 1e-2    # float32 plan beside plans under error budgets
    python benchmarks/models.py resnet50 repvgg --bound --repeats 21   # also time the re-parameterization bound
    python benchmarks/models.py replk --mode training        # plan without the rewrite stage
    KERAS_BACKEND=jax python benchmarks/models.py restoration --cost-model PROFILE.json   # on JAX

Every variant is one compiled call for the active Keras backend (`convrewrite.timing.compiled`: a tf.function
on TensorFlow, a jax.jit taking the model's weights as arguments on JAX), inference, on the same input.

Prints, per model: original and optimized median seconds per batch, the speedup, the end-to-end relative
error, and what the plan chose (and the rewrite stage did). With --bound, also the upper bound of what the
rewrite stage can give, timed in the same interleaved rounds: the model with every BatchNormalization a
pass-through (not equal to the original), or, for the re-parameterized examples, the merged structure on
Keras's own layers; `of bound` is the achieved speedup's share of the bound's. The header names the backend
(KERAS_BACKEND, default tensorflow) and the device (`convrewrite.device.describe`).
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite import rewrite  # noqa: E402
from convrewrite.graph import walk  # noqa: E402
from convrewrite.timing import compiled, median_interval, time_interleaved  # noqa: E402
from convrewrite.verify import relative_error  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "reparam_models", Path(__file__).resolve().parent.parent / "examples" / "reparam_models.py")
reparam_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reparam_models)


def large_kernel_model():
    """RepLKNet/SLaK-style: 31x31 and 13x13 depthwise blocks with 1x1 mixing."""
    x = inp = keras.Input((56, 56, 128))
    for i, k in enumerate([31, 13, 31, 13]):
        y = keras.layers.DepthwiseConv2D(k, padding="same", name=f"lk_dw{i}_{k}")(x)
        y = keras.layers.BatchNormalization()(y)
        y = keras.layers.Conv2D(128, 1, activation="gelu", name=f"lk_pw{i}")(y)
        x = keras.layers.Add()([x, y])
    return keras.Model(inp, x, name="large_kernel")


def restoration_model():
    """Image-restoration style: wide dense convs (21x21, 15x15) at full resolution."""
    x = inp = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="stem")(x)
    x = keras.layers.Conv2D(32, 21, padding="same", activation="relu", name="wide21")(x)
    x = keras.layers.Conv2D(32, 15, padding="same", activation="relu", name="wide15")(x)
    x = keras.layers.Conv2D(32, 21, padding="same", activation="relu", name="wide21b")(x)
    x = keras.layers.Conv2D(3, 3, padding="same", name="out")(x)
    return keras.Model(inp, x, name="restoration")


MODELS = {
    "convnext_tiny": lambda: keras.applications.ConvNeXtTiny(weights=None),
    "large_kernel": large_kernel_model,
    "restoration": restoration_model,
    "resnet50": lambda: keras.applications.ResNet50(weights=None),
    "mobilenet_v2": lambda: keras.applications.MobileNetV2(weights=None),
    "efficientnet_b0": lambda: keras.applications.EfficientNetB0(weights=None),
    "repvgg": lambda: reparam_models.randomize_batchnorm(reparam_models.repvgg_model()),
    "replk": lambda: reparam_models.randomize_batchnorm(reparam_models.replk_model()),
}
MERGED_BOUND = {"repvgg", "replk"}  # their bound is the merged structure; the others' is "no BatchNormalization"


def without_batchnorm(model):
    """The upper bound of folding: `model` with every BatchNormalization of its outer graph a pass-through."""
    mg = walk(model)
    replace = {key: (lambda tensor_of, x=data["node"].input_tensors[0]: tensor_of(x))
               for key, data in mg.graph.nodes(data=True) if isinstance(data["op"], keras.layers.BatchNormalization)}
    return mg.rebuild(lambda site: None, replace_nodes=replace)


def upper_bound(name, model):
    return rewrite.apply(model)[0] if name in MERGED_BOUND else without_batchnorm(model)


def bench(name, batch, repeats, cost_model, also_rules=False, measure=False, bound=False, mode="inference", rtols=()):
    model = MODELS[name]()
    cm = None if cost_model == "rules" else cost_model
    variants = {"optimized": convrewrite.optimize(model, cost_model=cm, measure=measure, batch=batch, mode=mode)}
    for rtol in rtols:  # error budgets: reduced precision where the device runs it natively
        variants[f"rtol {rtol:g}"] = convrewrite.optimize(model, cost_model=cm, measure=measure, batch=batch,
                                                          mode=mode, rtol=rtol)
    if also_rules:
        variants["rules"] = convrewrite.optimize(model, cost_model=None, mode=mode)
    if bound:
        variants["bound"] = upper_bound(name, model)
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"))
    calls = {"original": compiled(lambda t: model(t, training=False), layers=[model])}
    for key, m in variants.items():
        calls[key] = compiled(lambda t, m=m: m(t, training=False), layers=[m])
    fns = {key: (lambda f=f: f(x)) for key, f in calls.items()}
    res = time_interleaved(fns, repeats=repeats, warmup=1)
    o = res["original"]["median"]
    for key, m in variants.items():
        if key == "bound":
            continue
        err = relative_error(keras.ops.convert_to_numpy(fns[key]()), keras.ops.convert_to_numpy(fns["original"]()))
        plan = m.convrewrite_plan
        counts = {}
        for c in plan.choices().values():
            counts[c] = counts.get(c, 0) + 1
        done = {}
        for r in plan.rewrites:
            done[r["kind"]] = done.get(r["kind"], 0) + 1
        f = res[key]["median"]
        label = name if key == "optimized" else f"  ({key})"
        share = ""
        if bound:
            b = res["bound"]["median"]
            share = f" {o / b:>7.2f}x {(o / f - 1) / (o / b - 1) if o > b else float('nan'):>8.0%}"
        print(f"{label:<16} {o:>10.4f} {f:>10.4f} {o / f:>8.2f}x{share} {err:>9.1e}  {counts} {done or ''}", flush=True)
        lo, hi = median_interval([a / b for a, b in zip(res["original"]["samples"], res[key]["samples"])])
        print(f"{'':<16} this run's 95% interval [{lo:.2f}, {hi:.2f}]; optimize's {m.convrewrite_speed.describe()}",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cost-model", default="auto")
    parser.add_argument("--also-rules", action="store_true", help="also time the rule-based plan, interleaved")
    parser.add_argument("--rtol", type=float, nargs="+", default=(), metavar="RTOL",
                        help="also time plans under these error budgets (e.g. 1e-3 1e-2), interleaved with the "
                             "float32 plan: they admit bfloat16 sites where the device runs bfloat16 natively")
    parser.add_argument("--measure", action="store_true",
                        help="plan from timings of the model's own conv shapes (optimize(measure=True), cached per device)")
    parser.add_argument("--bound", action="store_true",
                        help="also time the rewrite stage's upper bound (BN removed, or the merged structure)")
    parser.add_argument("--mode", default="inference", choices=["inference", "training"],
                        help="optimize(mode=...): 'training' skips the rewrite stage")
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; expected any of {list(MODELS)}")
    args.models = args.models or list(MODELS)
    fp = convrewrite.fingerprint()
    print(f"{fp['backend']} {fp.get(fp['backend'])}, keras {keras.__version__}; device: {convrewrite.device.describe(fp)}")
    print(f"batch {args.batch}, {args.repeats} interleaved rounds, median seconds per batch")
    bound = f" {'bound':>8} {'of bound':>8}" if args.bound else ""
    print(f"{'model':<16} {'original':>10} {'optimized':>10} {'speedup':>9}{bound} {'rel err':>9}  plan, rewrites")
    for name in args.models:
        bench(name, args.batch, args.repeats, args.cost_model, args.also_rules, args.measure, args.bound, args.mode,
              args.rtol)


if __name__ == "__main__":
    main()
