"""FFT and the other replacement layers vs Keras's own layer, kernel sizes 3..51, in one process.

For each kernel size it builds Keras's layer and every replacement that applies with the same weights (the
full-image FFT layer and its matmul transform (`transform="matmul"`, implementation `fft-matmul`: the DFTs
as matrix products, channels last) always; `WideDepthwiseConv2D`, the depthwise kernel zero-padded to width 14, where the
kernel width is in TensorFlow's slow band 12..13), compiles each for the active Keras backend
(`convrewrite.timing.compiled`: a tf.function on TensorFlow, a jax.jit taking the weights as arguments on JAX;
inference), runs them interleaved (warm-up excluded; each call waits for its result) and prints median times,
ratios (Keras / replacement: > 1 means faster than Keras), the best ratio of any replacement, and the largest
relative error vs Keras (max |difference| / max |Keras output|).
Every size is printed, including those where the replacements lose; the crossover is the smallest kernel from
which the FFT stays faster.

Fraction of peak: each variant's own arithmetic per second (Keras and the wide kernel: 2 x the MACs of the
kernel they run, zero taps included; FFT: `fft_cost_features`' flops, transforms and per-bin products; matmul:
`matmul_cost_features`' flops, the DFT matrix products and per-bin products) over
the cores' nominal fp32 peak (`nominal_peak_gflops`: CPUs x clock x 64 flops per cycle with AVX-512; --peak
overrides it). The best rate of a 2048^3 keras.ops.matmul, compiled the same way, is printed beside it for
scale. The peak columns are printed on CPU devices only, or wherever --peak gives the peak (a GPU's nominal
rate is not read from anywhere). "cpu ratio" is the FFT ratio of this process's CPU time (all its threads):
on a shared machine the wall-clock ratio swings with other processes' load, the CPU-time one less (on a GPU
it is the host side's time only).

The header names the backend (KERAS_BACKEND, default tensorflow) and the device
(`convrewrite.device.describe`).

    python benchmarks/fft_vs_direct.py            # dense 8x64x64 32->32 and depthwise 8x56x56x128
    python benchmarks/fft_vs_direct.py --quick    # fewer sizes and repetitions
    KERAS_BACKEND=jax python benchmarks/fft_vs_direct.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D, WideDepthwiseConv2D  # noqa: E402
from convrewrite.layers.fft import fft_cost_features, matmul_cost_features  # noqa: E402
from convrewrite.layers.wide import default_run_kernel  # noqa: E402
from convrewrite.spec import ConvSpec  # noqa: E402
from convrewrite.timing import compiled  # noqa: E402

FULL_SIZES = (3, 5, 7, 9, 11, 13, 15, 17, 21, 25, 31, 41, 51)
QUICK_SIZES = (3, 5, 7, 9, 11, 13, 15, 21, 31)


def rel_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def wait(result):
    """Block until `result` is computed: a JAX array's block_until_ready (no copy to the host), else the
    tensor's value on the host (TensorFlow's .numpy())."""
    if hasattr(result, "block_until_ready"):
        result.block_until_ready()
    else:
        keras.ops.convert_to_numpy(result)
    return result


def to_numpy(t):
    return keras.ops.convert_to_numpy(t)


def median_ms(times):
    return 1e3 * statistics.median(times)


def matmul_gflops(n=2048, reps=5):
    """This device's best fp32 matmul rate (GFLOP/s): an n^3 keras.ops.matmul (compiled), fastest of `reps`
    after a warm-up."""
    rng = np.random.default_rng(0)
    a, b = (keras.ops.convert_to_tensor(rng.standard_normal((n, n)).astype("float32")) for _ in range(2))
    f = compiled(lambda u, v: keras.ops.matmul(u, v))
    wait(f(a, b))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        wait(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / min(times) / 1e9


def nominal_peak_gflops():
    """fp32 peak from /proc/cpuinfo (Linux x86): CPUs x nominal clock (BogoMIPS / 2) x flops per cycle, assuming
    two FMA units per core: 64 with AVX-512 (2 x 16 lanes x 2 flops), 32 with AVX2. None where unreadable."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None
    mips = [float(line.split(":")[1]) for line in info.splitlines() if line.lower().startswith("bogomips")]
    if not mips:
        return None
    per_cycle = 64 if " avx512f" in info else 32
    return os.cpu_count() * mips[0] / 2 / 1e3 * per_cycle


def make_variants(kind, k, shape, filters):
    """{name: (built layer, flops per call)} with identical weights: Keras's layer first, then replacements."""
    rng = np.random.default_rng(k)
    if kind == "dense":
        ref = keras.layers.Conv2D(filters, k, padding="same")
        spec = ConvSpec(kind="conv2d", in_channels=shape[-1], filters=filters, kernel=(k, k), height=shape[1],
                        width=shape[2], batch=shape[0], padding="same")
    else:
        ref = keras.layers.DepthwiseConv2D(k, padding="same")
        spec = ConvSpec(kind="depthwise_conv2d", in_channels=shape[-1], filters=shape[-1], kernel=(k, k),
                        height=shape[1], width=shape[2], batch=shape[0], padding="same", groups=shape[-1])
    ref.build(shape)
    ref.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.1 for w in ref.get_weights()])
    macs = float(spec.macs())
    variants = {"keras": (ref, 2 * macs)}
    fft_cls = FFTConv2D if kind == "dense" else FFTDepthwiseConv2D
    variants["fft"] = (fft_cls(**ref.get_config(), tile_size="full"), fft_cost_features(spec, "full")["flops"])
    variants["mm"] = (fft_cls(**ref.get_config(), transform="matmul"), matmul_cost_features(spec)["flops"])
    run = default_run_kernel((k, k))
    if kind == "depthwise" and run != (k, k):
        variants["wide"] = (WideDepthwiseConv2D(**ref.get_config(), run_kernel_size=run), 2 * macs * run[1] / k)
    for name, (layer, _) in variants.items():
        if name != "keras":
            layer.build(shape)
            layer.set_weights(ref.get_weights())
    return variants


def run_case(kind, shape, k, filters, reps, warmup):
    """{name: (median ms, median CPU s, flops)} of every variant, and the largest relative error vs Keras."""
    x = keras.ops.convert_to_tensor(np.random.default_rng(k).standard_normal(shape).astype("float32"))
    variants = make_variants(kind, k, shape, filters)
    fns = {name: compiled(lambda t, layer=layer: layer(t, training=False), layers=[layer])
           for name, (layer, _) in variants.items()}
    want = to_numpy(fns["keras"](x))
    err = max(rel_error(to_numpy(f(x)), want) for name, f in fns.items() if name != "keras")
    for _ in range(warmup):
        for f in fns.values():
            wait(f(x))
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(reps):  # interleaved, so load from other processes hits every variant alike
        for name, f in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            wait(f(x))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    fft, mm = variants["fft"][0].fft_layout, variants["mm"][0].fft_layout
    how = f"{fft.fft_shape[0]}x{fft.fft_shape[1]}; {mm.fft_shape[0]}x{mm.fft_shape[1]}"
    return {n: (median_ms(wall[n]), statistics.median(cpu[n]), variants[n][1]) for n in fns}, err, how


def print_case(kind, shape, filters, title, sizes, reps, warmup, peak):
    print(f"\n{title}")
    header = (f"{'k':>3}  {'keras ms':>9}  {'fft ms':>8}  {'ratio':>6}  {'mm ms':>8}  {'ratio':>6}  {'wide ms':>8}  "
              f"{'ratio':>6}  {'best':>6}  {'cpu ratio':>9}  {'rel err':>8}  "
              + (f"{'% peak keras/fft/mm/wide':>24}  " if peak else "") + "transform (fft; mm)")
    print(header)
    print("-" * len(header))
    crossover = None
    for k in sizes:
        res, err, how = run_case(kind, shape, k, filters, reps, warmup)
        keras_ms = res["keras"][0]
        ratios = {n: keras_ms / r[0] for n, r in res.items() if n != "keras"}
        if ratios["fft"] > 1 and crossover is None:
            crossover = k
        elif ratios["fft"] <= 1:
            crossover = None
        wide = (f"{res['wide'][0]:>8.2f}  {ratios['wide']:>5.2f}x" if "wide" in res else f"{'-':>8}  {'-':>6}")
        pct = "/".join(f"{100 * r[2] / (r[0] * 1e-3) / 1e9 / peak:.0f}" for r in res.values()) if peak else ""
        cpu_ratio = res["keras"][1] / res["fft"][1] if res["fft"][1] > 0 else float("nan")
        print(f"{k:>3}  {keras_ms:>9.2f}  {res['fft'][0]:>8.2f}  {ratios['fft']:>5.2f}x  {res['mm'][0]:>8.2f}  "
              f"{ratios['mm']:>5.2f}x  {wide}  {max(ratios.values()):>5.2f}x  {cpu_ratio:>8.2f}x  {err:>8.1e}  "
              + (f"{pct:>24}  " if peak else "") + how, flush=True)
    print(f"crossover ({kind}): FFT faster from k = {crossover} on" if crossover else
          f"crossover ({kind}): FFT never stays faster in this range")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer kernel sizes and repetitions")
    parser.add_argument("--sizes", type=int, nargs="*", help="kernel sizes (default: 3..51)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per layer")
    parser.add_argument("--peak", type=float, default=None,
                        help="fp32 peak GFLOP/s (default: from /proc/cpuinfo on CPU devices; none on a GPU)")
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    reps = args.reps or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    fp = convrewrite.fingerprint()
    backend = fp["backend"]
    on_cpu = fp["device_kind"] == "cpu"
    matmul = matmul_gflops()
    peak = args.peak or (on_cpu and (nominal_peak_gflops() or matmul)) or None
    scale = (f"% peak of {peak:.0f} GFLOP/s fp32 (a 2048^3 matmul runs at {matmul:.0f} here)" if peak else
             f"no % peak columns on a {fp['device_kind']} without --peak (a 2048^3 matmul runs at {matmul:.0f} "
             f"GFLOP/s here)")
    print(f"{backend} {fp.get(backend)}, keras {keras.__version__}, {os.cpu_count()} CPUs; medians of {reps} "
          f"interleaved runs after {warmup} warm-up; ratio = keras / replacement (> 1: faster than Keras); {scale}")
    print(f"device: {convrewrite.device.describe(fp)}")
    print_case("dense", (8, 64, 64, 32), 32, "Conv2D 8x64x64, 32->32, same", sizes, reps, warmup, peak)
    print_case("depthwise", (8, 56, 56, 128), None, "DepthwiseConv2D 8x56x56x128, same", sizes, reps, warmup, peak)


if __name__ == "__main__":
    main()
