"""A fine-tuning step (forward + backward + SGD update) of the original and of `optimize(mode="training")`,
side by side in one process (interleaved, warm-up excluded, medians), with the gradients first compared with
the original's in float64 (a variable's gradient that is a sum cancelling to near zero, such as a BN gamma's,
is far from float64 in the float32 original too: both errors are printed).

    python benchmarks/training_step.py                    # replk (31x31 + 5x5 depthwise with BN), batch 8
    python benchmarks/training_step.py restoration --cost-model profile.json --compare
    python benchmarks/training_step.py restoration --measure   # plan from forward+backward timings made now

mode="training" keeps BatchNormalization (updating its statistics) and the parallel branches, so the model
trains as the original does. The plan comes from the profile's forward + backward predictions where it has
them (`convrewrite profile --training`), else from its inference predictions (the plan's note says which),
or, with --measure, from forward + backward timings of the model's own conv shapes (optimize(measure=True)).
--compare also times the plan the same profile's inference predictions give, in the same rounds.
"""

import argparse
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite.timing import time_interleaved  # noqa: E402
from convrewrite.verify import relative_error  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_models", Path(__file__).with_name("models.py"))
bench_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_models)


def gradients(model, x, y):
    """{variable path: gradient} of the mean squared error at training=True."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    return {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}


def step_fn(model, x, y):
    optimizer = keras.optimizers.SGD(1e-4)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    return step


def without_training(cost_model):
    """A copy of a profile without its forward + backward section: plans from its inference predictions."""
    import copy

    cm = copy.copy(cost_model)
    cm.training_measurements, cm.training_fits = [], {}
    cm.__dict__.pop("_tables", None)  # the copy keeps its own lookup tables
    return cm


def reference_gradients(name, model, x, y):
    """The original's gradients in float64 (the same model built under the float64 policy, its weights
    copied): what both float32 models' gradients are held against."""
    keras.config.set_dtype_policy("float64")
    try:
        exact = bench_models.MODELS[name]()
    finally:
        keras.config.set_dtype_policy("float32")
    exact.set_weights(model.get_weights())
    return gradients(exact, tf.cast(x, "float64"), tf.cast(y, "float64"))


def worst_gradient_error(reference, grads):
    """(worst normwise relative error over the trainable variables, its variable path) of `grads` against
    `reference` ({path: gradient}, the same variables in the same order: a replacement layer keeps its
    kernel's place)."""
    errors = {path: relative_error(b.reshape(a.shape) if b.size == a.size else b, a)
              for (path, a), b in zip(reference.items(), grads.values())}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def plan_counts(fast) -> dict:
    counts = {}
    for c in fast.convrewrite_plan.choices().values():
        counts[c] = counts.get(c, 0) + 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="replk", help=f"one of {', '.join(bench_models.MODELS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--measure", action="store_true", help="plan from forward+backward timings of its shapes")
    parser.add_argument("--cost-model", default="auto", help="profile to plan with (default auto); one made with "
                                                             "`convrewrite profile --training` predicts training steps")
    parser.add_argument("--compare", action="store_true",
                        help="also time the plan the profile's inference predictions give (same rounds)")
    parser.add_argument("--grad-rtol", type=float, default=1e-4,
                        help="gradient error vs float64 reported as ok (or within 10x the original float32's)")
    args = parser.parse_args()
    model = bench_models.MODELS[args.model]()
    cm = convrewrite.profiles.resolve(args.cost_model)
    plans = {"training plan": convrewrite.optimize(model, mode="training", batch=args.batch, measure=args.measure,
                                                   cost_model=cm)}
    if args.compare:
        plans["inference-predicted plan"] = convrewrite.optimize(model, mode="training", batch=args.batch,
                                                                 cost_model=without_training(cm))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch,) + tuple(model.inputs[0].shape[1:])).astype("float32"))
    y = tf.constant(rng.standard_normal((args.batch,) + tuple(model.outputs[0].shape[1:])).astype("float32"))
    exact = reference_gradients(args.model, model, x, y)
    original_error = worst_gradient_error(exact, gradients(model, x, y))
    grads = {name: worst_gradient_error(exact, gradients(fast, x, y)) for name, fast in plans.items()}
    steps = {"original": step_fn(model, x, y), **{name: step_fn(fast, x, y) for name, fast in plans.items()}}
    res = time_interleaved(steps, repeats=args.repeats, warmup=2)
    o = res["original"]["median"]
    print(f"{args.model}: training step (fwd+bwd+SGD), batch {args.batch}, {args.repeats} interleaved rounds, "
          f"original {o:.4f} s/step; gradients against float64, worst variable of {len(exact)}: original "
          f"{original_error[0]:.1e} ({original_error[1]})")
    for name, fast in plans.items():
        f, (err, worst) = res[name]["median"], grads[name]
        plan = fast.convrewrite_plan
        total = plan.predicted_total()
        predicted = f"predicted {total[0] / total[1]:.2f}x" if total else "no prediction"
        print(f"  {name}: {f:.4f} s/step  step-time ratio {o / f:.2f}x ({predicted})  worst gradient rel err "
              f"{err:.1e} vs float64 ({worst}: {'ok' if err <= max(args.grad_rtol, 10 * original_error[0]) else 'FAIL'}"
              f" at max({args.grad_rtol:g}, 10x the original's))  "
              f"plan {plan_counts(fast)}")
        print(f"    {plan.prediction_note or 'no cost model'}")


if __name__ == "__main__":
    main()
