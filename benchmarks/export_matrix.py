"""Which implementation goes to which runtime: each implementation forced on every site of a small model it
applies to, then compiled with XLA and exported with Keras's own `model.export` to every format Keras offers
on TensorFlow, loaded in its runtime, and compared with the original model run the same way.

    python benchmarks/export_matrix.py                      # every implementation x every format
    python benchmarks/export_matrix.py --impls fft,direct --formats onnx,openvino

The model: a 15x15 conv + BN, 31x31 and 13x13 depthwise convs, a 13x13 separable conv, a 21x21 transposed conv
and a strided 3x3 conv, batch 2 fixed, random weights. Each (implementation, format) cell runs in its own
process (a converter that crashes or hangs costs that cell alone, `--timeout` seconds at most) and prints
"ok <normwise error>" or the first line of why it failed. OpenVINO compiles with INFERENCE_PRECISION_HINT=f32
(its default on a CPU with bfloat16 units is bfloat16). Needs the runtimes: pip install tf2onnx onnxruntime
openvino ai-edge-litert.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

FORMATS = ("xla", "tf_saved_model", "onnx", "openvino", "litert")


def build_model():
    import keras
    import numpy as np

    x = keras.Input((32, 32, 8), batch_size=2)
    y = keras.layers.Conv2D(8, 15, padding="same", name="c15")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.DepthwiseConv2D(31, padding="same", name="dw31")(y)
    y = keras.layers.DepthwiseConv2D(13, padding="same", name="dw13")(y)
    y = keras.layers.SeparableConv2D(8, 13, padding="same", name="sep13")(y)
    y = keras.layers.Conv2DTranspose(8, 21, padding="same", name="t21")(y)
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s3")(y)
    model = keras.Model(x, y)
    rng = np.random.default_rng(0)
    for w in model.weights:
        if "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 2, w.shape).astype("float32"))
        else:
            w.assign((rng.standard_normal(w.shape) / np.sqrt(max(np.prod(w.shape[:-1]), 1))).astype("float32"))
    return model


def run_in(model, fmt, x, folder):
    """model's output on x, compiled or exported as `fmt` and run in that runtime."""
    if fmt == "xla":
        import tensorflow as tf

        return tf.function(model, jit_compile=True)(x)
    if fmt == "tf_saved_model":
        import tensorflow as tf

        model.export(folder, format=fmt, verbose=False)
        loaded = tf.saved_model.load(folder)
        return loaded.serve(x)
    if fmt == "onnx":
        import onnxruntime

        model.export(folder + "/m.onnx", format=fmt, verbose=False)
        session = onnxruntime.InferenceSession(folder + "/m.onnx")
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    if fmt == "openvino":
        import openvino

        model.export(folder + "/m.xml", format=fmt, verbose=False)
        compiled = openvino.Core().compile_model(folder + "/m.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled(x)[0]
    if fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        model.export(folder + "/m.tflite", format=fmt, verbose=False)
        interpreter = Interpreter(folder + "/m.tflite")
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def cell(impl, fmt):
    """One (implementation, format) cell, in this process: prints its result line."""
    os.environ.setdefault("CONVREWRITE_CHECK_SPEED", "0")
    import numpy as np

    import convrewrite
    from convrewrite import registry

    model = build_model()
    plan = convrewrite.plan(model, cost_model=None)
    sites = [row.site for row in plan if registry.get(impl).applicable(row.spec)[0]]
    if not sites:
        print("RESULT n/a (applies to no site)")
        return
    for site in sites:
        plan.force(site, impl)
    fast = convrewrite.optimize(model, plan=plan)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 8)).astype("float32")
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        want = np.asarray(run_in(model, fmt, x, a))
        try:
            got = np.asarray(run_in(fast, fmt, x, b))
        except Exception as exc:  # the cell's result is the failure, reported in one line
            lines = [line for line in str(exc).splitlines() if line.strip()]
            print(f"RESULT fails: {type(exc).__name__}: {(lines[0] if lines else '')[:160]}")
            return
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"RESULT {'ok' if err <= 1e-5 else 'WRONG'} {err:.1e} ({len(sites)} sites)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", help="comma-separated implementations (default: all but the bf16 variants)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    parser.add_argument("--cell", nargs=2, metavar=("IMPL", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        cell(*args.cell)
        return
    from convrewrite import registry

    impls = args.impls.split(",") if args.impls else [n for n in registry.names() if not n.endswith("-bf16")]
    formats = args.formats.split(",")
    print("implementation".ljust(16) + "".join(f.ljust(34) for f in formats))
    for impl in impls:
        row = []
        for fmt in formats:
            try:
                out = subprocess.run([sys.executable, __file__, "--cell", impl, fmt], capture_output=True, text=True,
                                     timeout=args.timeout)
                lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                row.append(lines[-1] if lines else f"crashed (exit {out.returncode})")
            except subprocess.TimeoutExpired:
                row.append(f"no answer in {args.timeout} s")
        print(impl.ljust(16) + "".join(r[:32].ljust(34) for r in row), flush=True)


if __name__ == "__main__":
    main()
