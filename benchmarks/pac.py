"""PacConv2D versus Keras Conv2D: forward and forward+backward time per strategy, plus peak memory.

    python benchmarks/pac.py               # k = 3, 5, 7 at 4x64x64, 32 -> 32, 8 guidance channels
    python benchmarks/pac.py --quick       # k = 3 only, fewer rounds
    python benchmarks/pac.py --no-memory   # timings only (the memory columns start 2 processes per cell)
    KERAS_BACKEND=jax python benchmarks/pac.py --quick   # on JAX (timings only)

Time: every variant is compiled for the active Keras backend with convrewrite.timing.compiled. On
TensorFlow that is a tf.function (no XLA around it: Keras does not use XLA on CPU by default; the layer's
own small-op parts run as XLA computations inside it, see backend.jit); on JAX, one jax.jit that takes the
layer's weights as arguments. Forward+backward is `backend.forward_backward` (the gradients of
sum(y * y) with respect to the input and the trainable weights) inside that compiled call. Variants are
timed interleaved round by round with convrewrite.timing.time_interleaved after warm-up calls (tracing /
compilation excluded); medians are reported, and ratios to Conv2D in the same round set, since the machine
is shared. A small-Cin row (3 -> 32) checks the `auto` rule where it picks `patch`. The header names the
backend (KERAS_BACKEND, default tensorflow) and the device (`convrewrite.device.describe`).

Peak memory is *measured*: each variant runs in a fresh Python process, which creates the inputs and the
layer (built on a small crop), traces the tf.function (not yet run), resets and reads its peak RSS
(Linux: "5" into /proc/self/clear_refs, then VmHWM from /proc/self/status), runs it once and reads the
peak again. The growth is everything the first run touched: the intermediates, the output (and for
fwd+bwd the gradients), padded copies, and TensorFlow's own first-run allocations (the Conv2D row is
that baseline). Not ru_maxrss: a child process inherits its parent's peak there, which hides the growth.
On CPU tf.config.experimental.get_memory_info is unavailable and tracemalloc does not see TensorFlow's
allocator, hence RSS. `auto` reuses its chosen strategy's numbers. The memory columns are measured on
TensorFlow only (on JAX they are skipped, with a note, and print as nan).
The analytic column is the forward formula of pac_contract's docstring (float32 intermediates besides
x, guidance and output), for comparison.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import logging  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite.layers import backend  # noqa: E402
from convrewrite.layers.pac import PacConv2D, choose_strategy  # noqa: E402
from convrewrite.timing import compiled, time_interleaved  # noqa: E402

# one tf.function per variant is intended; silence TensorFlow's retracing notice (its logger; unused on JAX)
logging.getLogger("tensorflow").setLevel(logging.ERROR)


def analytic_bytes(strategy, n, h, w, c, o, f, k):
    """Analytic peak forward bytes of the intermediates (float32), 'same' padding, stride 1."""
    p, t = n * h * w, k * k
    if strategy == "conv":
        return 0
    kernel = p * 2 * t  # d2 (one XLA computation, the guidance taps fused into it) and K
    if strategy == "wide":
        pad = k // 2 * 2
        return 4 * (kernel + n * (h + pad) * (w + pad) * t * o)  # every tap's product at every padded pixel
    if strategy == "patch":
        return 4 * (kernel + 2 * p * t * c)  # the taps / patch tensor and its K-scaled copy
    return 4 * (kernel + p * (c + 2 * o))  # one tap's slice, its partial product and the running sum


def _variant(name, x, g, o, k, conv_weights=None):
    """The Conv2D or a PacConv2D, built on a small crop (a full-size eager call would set the peak RSS)."""
    xs, gs = x[:, :8, :8], g[:, :8, :8]
    if name == "conv":
        layer = keras.layers.Conv2D(o, k, padding="same")
        layer(xs)
    else:
        layer = PacConv2D(o, k, padding="same", strategy=name)
        layer([xs, gs])
    if conv_weights is not None:
        layer.set_weights(conv_weights)
    return layer


def _fwd(layer, x, g, is_conv):
    """A zero-argument call of the compiled forward (x and g are its arguments, the weights too on JAX)."""
    f = compiled(lambda t, u: layer(t) if is_conv else layer([t, u]), layers=[layer])
    return lambda: f(x, g)


def _fwd_bwd(layer, x, g, is_conv):
    """A zero-argument call of the compiled forward + backward: the gradients of sum(y * y) with respect to x
    and the layer's trainable weights."""
    def step(t, u):
        def squared(v):
            y = layer(v) if is_conv else layer([v, u])
            return y * y

        return backend.forward_backward(squared, t, layer.trainable_variables)

    f = compiled(step, layers=[layer])
    return lambda: f(x, g)


def _tensors(n, h, w, c, f):
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.standard_normal((n, h, w, c)).astype("float32"))
    g = keras.ops.convert_to_tensor(rng.standard_normal((n, h, w, f)).astype("float32"))
    return x, g


def peak_rss_bytes(reset=False):
    """This process's peak resident set size (bytes); reset=True first lowers the peak to the current RSS.

    Linux: VmHWM of /proc/self/status (per address space, so a fresh process starts from its own RSS),
    reset through /proc/self/clear_refs. Elsewhere: ru_maxrss (bytes on macOS), which cannot be reset."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_child(name, mode, n, h, w, c, o, f, k):
    """In a fresh process: print the peak-RSS growth, in bytes, of the first run of one traced variant.
    TensorFlow only (a traced tf.function's concrete function)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((n, h, w, c)), tf.float32)
    g = tf.constant(rng.standard_normal((n, h, w, f)), tf.float32)
    layer = _variant(name, x, g, o, k)
    fn = _tf_traced(layer, x, g, name == "conv", mode)
    before = peak_rss_bytes(reset=True)
    out = fn()
    float(tf.reduce_sum(tf.nest.flatten(out)[0]))
    print(peak_rss_bytes() - before)


def _tf_traced(layer, x, g, is_conv, mode):
    """The variant's tf.function traced for x and g (a concrete function, not yet run): the memory child's."""
    import tensorflow as tf

    if mode == "fwd":
        fn = tf.function(lambda: layer(x) if is_conv else layer([x, g]))
    else:
        @tf.function
        def fn():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x) if is_conv else layer([x, g])
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x] + layer.trainable_variables)
    return fn.get_concrete_function()


def measured_bytes(name, mode, shape):
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-child", name, mode,
                          *map(str, shape)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory child {name} {mode} {shape} failed:\n{res.stderr[-2000:]}")
    return int(res.stdout.split()[-1])


def bench(n, h, w, c, o, f, k, repeats):
    x, g = _tensors(n, h, w, c, f)
    conv = _variant("conv", x, g, o, k)
    layers = {"conv": conv}
    for strategy in ("patch", "shift", "wide", "auto"):
        layers[strategy] = _variant(strategy, x, g, o, k, conv.get_weights())
    fns = {}
    for name, layer in layers.items():
        fns[f"fwd/{name}"] = _fwd(layer, x, g, name == "conv")
        fns[f"fwd+bwd/{name}"] = _fwd_bwd(layer, x, g, name == "conv")
    times = time_interleaved(fns, repeats=repeats, warmup=2)
    return [(name, times[f"fwd/{name}"]["median"], times[f"fwd+bwd/{name}"]["median"]) for name in layers]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the measured peak-memory columns")
    ap.add_argument("--peak-child", nargs=9, metavar="ARG", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        name, mode, *dims = args.peak_child
        return peak_child(name, mode, *map(int, dims))
    repeats = args.repeats or (7 if args.quick else 15)
    fp = convrewrite.fingerprint()
    print(f"{fp['backend']} {fp.get(fp['backend'])}, keras {keras.__version__}; device: {convrewrite.device.describe(fp)}")
    if not args.no_memory and backend.BACKEND != "tensorflow":
        print(f"peak memory: measured on TensorFlow only (a traced tf.function in a child process); skipped on "
              f"{backend.BACKEND}")
        args.no_memory = True
    cases = [(4, 64, 64, 32, 32, 8, k) for k in ((3,) if args.quick else (3, 5, 7))]
    cases.append((4, 64, 64, 3, 32, 8, 3))
    print(f"{'shape':30s} {'variant':10s} {'fwd ms':>7s} {'x conv':>6s} {'fwd+bwd ms':>10s} {'x conv':>6s} "
          f"{'peak MB fwd':>11s} {'fwd+bwd':>7s} {'analytic':>8s}")
    print(f"{'':30s} {'':10s} {'':>7s} {'':>6s} {'':>10s} {'':>6s} {'(measured':>11s} {'RSS)':>7s} "
          f"{'fwd MB':>8s}")
    for n, h, w, c, o, f, k in cases:
        shape = (n, h, w, c, o, f, k)
        rows = bench(*shape, repeats)
        mem = {}
        if not args.no_memory:
            for name in ("conv", "patch", "shift", "wide"):
                mem[name] = tuple(measured_bytes(name, mode, shape) / 2**20 for mode in ("fwd", "fwd+bwd"))
        base_f, base_b = rows[0][1], rows[0][2]
        best_f = min(r[1] for r in rows if r[0] in ("patch", "shift", "wide"))
        label_shape = f"{n}x{h}x{w} {c}->{o} F={f} k={k}"
        for name, tf_, tb in rows:
            chosen = choose_strategy(k * k, c, o) if name == "auto" else name
            label = f"auto={chosen}" if name == "auto" else name
            fwd_mb, bwd_mb = mem.get(chosen, (float("nan"), float("nan")))
            print(f"{label_shape:30s} {label:10s} {tf_ * 1e3:7.2f} {tf_ / base_f:6.2f} {tb * 1e3:10.2f} "
                  f"{tb / base_b:6.2f} {fwd_mb:11.1f} {bwd_mb:7.1f} {analytic_bytes(chosen, *shape) / 2**20:8.1f}")
        print(f"{label_shape:30s} auto / best strategy (fwd): {rows[-1][1] / best_f:.2f}")


if __name__ == "__main__":
    main()
