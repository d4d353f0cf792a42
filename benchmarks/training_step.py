"""A fine-tuning step (forward + backward + SGD update) of the original and of `optimize(mode="training")`,
side by side in one process (interleaved, warm-up excluded, medians), with the gradients compared first.

    python benchmarks/training_step.py                    # replk (31x31 + 5x5 depthwise with BN), batch 8
    python benchmarks/training_step.py restoration --repeats 15
    python benchmarks/training_step.py restoration --measure   # plan from forward+backward timings

mode="training" keeps BatchNormalization (updating its statistics) and the parallel branches, so the model
trains as the original does. The plan comes from the cost model's inference predictions, or, with
--measure, from forward + backward timings of the model's own conv shapes (optimize(measure=True)).
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="replk", help=f"one of {', '.join(bench_models.MODELS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--measure", action="store_true", help="plan from forward+backward timings of its shapes")
    args = parser.parse_args()
    model = bench_models.MODELS[args.model]()
    fast = convrewrite.optimize(model, mode="training", batch=args.batch, measure=args.measure)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch,) + tuple(model.inputs[0].shape[1:])).astype("float32"))
    y = tf.constant(rng.standard_normal((args.batch,) + tuple(model.outputs[0].shape[1:])).astype("float32"))
    g_orig, g_fast = gradients(model, x, y), gradients(fast, x, y)
    # the same layers in the same order hold the same variables (a replacement layer keeps its kernel's place)
    errors = {path: relative_error(b.reshape(a.shape) if b.size == a.size else b, a)
              for (path, a), b in zip(g_orig.items(), g_fast.values())}
    worst = max(errors, key=errors.get)
    res = time_interleaved({"original": step_fn(model, x, y), "optimized": step_fn(fast, x, y)},
                           repeats=args.repeats, warmup=2)
    o, f = res["original"]["median"], res["optimized"]["median"]
    counts = {}
    for c in fast.convrewrite_plan.choices().values():
        counts[c] = counts.get(c, 0) + 1
    how = "forward+backward timings" if args.measure else "the cost model's predictions"
    print(f"{args.model}: training step (fwd+bwd+SGD), batch {args.batch}, {args.repeats} interleaved rounds, "
          f"planned from {how}")
    print(f"original {o:.4f} s  optimized(mode='training') {f:.4f} s  speedup {o / f:.2f}x  "
          f"worst gradient rel err {errors[worst]:.1e} ({worst}) over {len(g_orig)} variables  plan {counts}")


if __name__ == "__main__":
    main()
