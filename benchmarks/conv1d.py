"""FFT Conv1D / DepthwiseConv1D vs Keras's own layers, side by side in one process.

Two headline cases (an audio filterbank: Conv1D with 251 taps over 16000 samples, batch 8, 16 -> 16 channels;
a long-convolution sequence layer: DepthwiseConv1D with 1024 taps over 4096 steps, batch 8, 64 channels),
then a sweep of kernel sizes for each showing where the FFT starts to win. Every variant gets the same
weights, is compiled with tf.function (inference), and all run interleaved round by round after a warm-up;
medians are printed with ratios Keras / variant (> 1: faster than Keras) and the normwise relative error
against Keras. Variants:
  fft        FFTConv1D / FFTDepthwiseConv1D, one 1-D transform per sequence (tile_size="full")
  tiled      the same in overlap-save frames (tile_size=None: the layer's automatic tile)
  fft2d      FFTConv2D / FFTDepthwiseConv2D on the sequence as a 1 x n image (what a 1-D layer built on the 2-D
             machinery would run; shown to justify 1-D transforms), headline cases only

    python benchmarks/conv1d.py            # headline cases + both sweeps
    python benchmarks/conv1d.py --quick    # fewer sizes and repetitions
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from convrewrite.layers import FFTConv1D, FFTConv2D, FFTDepthwiseConv1D, FFTDepthwiseConv2D  # noqa: E402
from convrewrite.timing import compiled, time_interleaved  # noqa: E402


def rel_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def variants(depthwise, k, n, channels, batch, padding, with_2d):
    """{name: (callable, input)} with shared random weights; Keras first."""
    rng = np.random.default_rng(k)
    shape = (batch, n, channels)
    if depthwise:
        keras_layer = keras.layers.DepthwiseConv1D(k, padding=padding)
    else:
        keras_layer = keras.layers.Conv1D(channels, k, padding=padding)
    keras_layer.build(shape)
    weights = [rng.standard_normal(w.shape).astype("float32") / np.sqrt(k) for w in keras_layer.get_weights()]
    keras_layer.set_weights(weights)
    cls = FFTDepthwiseConv1D if depthwise else FFTConv1D
    out = {"keras": keras_layer}
    for name, tile in (("fft", "full"), ("tiled", None)):
        layer = cls.from_config({**keras_layer.get_config(), "tile_size": tile})
        layer.build(shape)
        layer.set_weights(weights)
        out[name] = layer
    x = rng.standard_normal(shape).astype("float32")
    calls = {name: (compiled(lambda t, lyr=lyr: lyr(t)), x) for name, lyr in out.items()}
    if with_2d and padding != "causal":
        if depthwise:
            layer2 = FFTDepthwiseConv2D((1, k), padding=padding, tile_size="full")
        else:
            layer2 = FFTConv2D(channels, (1, k), padding=padding, tile_size="full")
        layer2.build((batch, 1, n, channels))
        layer2.set_weights([weights[0][None], *weights[1:]])
        calls["fft2d"] = (compiled(lambda t: layer2(t)[:, 0]), x[:, None])
    return calls


def run_case(label, depthwise, k, n, channels, batch, padding="same", repeats=7, with_2d=False):
    calls = variants(depthwise, k, n, channels, batch, padding, with_2d)
    ref = np.asarray(calls["keras"][0](calls["keras"][1]))
    errors = {name: rel_error(fn(x), ref) for name, (fn, x) in calls.items() if name != "keras"}
    times = time_interleaved({name: (lambda fn=fn, x=x: fn(x)) for name, (fn, x) in calls.items()},
                             repeats=repeats, warmup=1)
    keras_ms = 1e3 * times["keras"]["median"]
    parts = [f"{label:<34} keras {keras_ms:8.2f} ms"]
    for name in calls:
        if name == "keras":
            continue
        ms = 1e3 * times[name]["median"]
        parts.append(f"{name} {ms:8.2f} ms x{keras_ms / ms:5.2f} (err {errors[name]:.1e})")
    print(" | ".join(parts), flush=True)
    return {name: keras_ms / (1e3 * times[name]["median"]) for name in calls if name != "keras"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer kernel sizes and repetitions")
    args = parser.parse_args()
    repeats = 5 if args.quick else 9
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} CPUs; ratios are Keras / variant")
    print("-- headline cases --")
    run_case("conv1d k251 8x16000 16->16 same", False, 251, 16000, 16, 8, repeats=repeats, with_2d=True)
    run_case("conv1d k251 8x16000 16->16 causal", False, 251, 16000, 16, 8, "causal", repeats=repeats)
    run_case("dw1d k1024 8x4096x64 same", True, 1024, 4096, 64, 8, repeats=repeats, with_2d=True)
    sizes = (3, 9, 15, 31, 63, 127, 251, 511) if args.quick else (3, 5, 9, 15, 21, 31, 63, 127, 251, 511, 1023)
    print("-- sweep: Conv1D 8x16000 16->16, same --")
    for k in sizes:
        run_case(f"conv1d k{k}", False, k, 16000, 16, 8, repeats=repeats)
    print("-- sweep: DepthwiseConv1D 8x4096x64, same --")
    for k in sizes + ((1024,) if args.quick else ()):
        run_case(f"dw1d k{k}", True, k, 4096, 64, 8, repeats=repeats)


if __name__ == "__main__":
    main()
