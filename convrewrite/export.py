"""An optimized model exported for another runtime, and checked there.

Keras's `model.export(path, format=F)` writes the artifact; each runtime then loads it on its own terms
(`tf.saved_model.load`, onnxruntime, OpenVINO, ai-edge-litert). Not every replacement layer converts to every
format: `Implementation.export_formats` says which formats carry it (measured with
benchmarks/export_matrix.py), and `implementations_for(F)` is what a plan meant for F may choose from. What
was exported is verified by running the artifact in its runtime against the original model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from .errors import PlanError

__all__ = ["FORMATS", "RUNTIME_PACKAGES", "implementations_for", "missing_packages", "artifact_path", "export_model",
           "load_runner", "compare_outputs"]

FORMATS = ("tf_saved_model", "onnx", "openvino", "litert")
"""The formats of Keras's `model.export` on the TensorFlow backend (also written from JAX, through TensorFlow)."""

RUNTIME_PACKAGES = {"tf_saved_model": ("tensorflow",), "onnx": ("tf2onnx", "onnxruntime"),
                    "openvino": ("openvino",), "litert": ("ai_edge_litert",)}
"""What exporting to a format and running the artifact needs installed (import names)."""

_SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "litert": ".tflite"}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise PlanError(f"Received export format {fmt!r}; expected one of {', '.join(map(repr, FORMATS))}.")


def implementations_for(fmt: str, allow=None) -> List[str]:
    """The implementations (of `allow`, default all) whose layers export to `fmt` and compute the same there:
    pass as `plan(..., allow=...)` / `optimize(..., allow=...)` for a model meant for that format."""
    from . import implementations

    _check_format(fmt)
    return [n for n in implementations.names() if (allow is None or n in allow or n == "direct")
            and fmt in implementations.get(n).export_formats]


def missing_packages(fmt: str) -> List[str]:
    """The packages exporting to `fmt` and running the artifact need that are not installed: TensorFlow, through
    which Keras exports every format on either backend, and the format's own (RUNTIME_PACKAGES)."""
    _check_format(fmt)
    needed = dict.fromkeys(("tensorflow",) + RUNTIME_PACKAGES[fmt])
    return [p for p in needed if importlib.util.find_spec(p) is None]


def artifact_path(folder: Path, fmt: str) -> Path:
    """Where an artifact of `fmt` goes inside `folder`: the folder itself for a SavedModel, else model<suffix>
    (OpenVINO writes model.bin beside model.xml)."""
    return folder if fmt == "tf_saved_model" else folder / f"model{_SUFFIX[fmt]}"


def export_model(model, folder: Path, fmt: str) -> Path:
    """model.export into `folder` (created by the caller) in format `fmt`; returns the artifact's path."""
    from .verify import random_inputs  # (verify imports the layers: not at `convrewrite --help` time)

    _check_format(fmt)
    path = artifact_path(Path(folder), fmt)
    model(random_inputs(model, batch=1))  # Keras's ONNX export refuses a model that has never been called
    with _telemetry_declined(fmt):
        model.export(str(path), format=fmt, verbose=False)
    return path


@contextlib.contextmanager
def _telemetry_declined(fmt: str):
    """For an OpenVINO export: its converter's usage telemetry declined for this conversion. OpenVINO sends it by
    default, from a background sender whose forked children try the network (and, seen on this project's
    machines, left numpy's BLAS workers stopped in the parent); its converter skips it where the environment
    says CI=true, which is set for the conversion alone and then restored. Nothing is written to the user's
    home folder (OpenVINO's own opt-out tool would write a consent file there)."""
    if fmt != "openvino":
        yield
        return
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before


def load_runner(path: Path, fmt: str, n_outputs: Optional[int] = None) -> Callable:
    """run(inputs) -> list of numpy outputs (in the model's flattened output order) of the artifact at `path`,
    loaded in its runtime. OpenVINO compiles at float32 precision (its default on a CPU with bfloat16 units
    would be bfloat16: not what was verified). Inputs: one array, or a flat list in the model's input order.
    n_outputs: how many outputs the model has (a converted graph may list shape tensors after them)."""
    _check_format(fmt)
    run = {"tf_saved_model": _saved_model_runner, "onnx": _onnx_runner, "openvino": _openvino_runner,
           "litert": _litert_runner}[fmt](str(path))
    return lambda inputs: [np.asarray(o) for o in run(inputs)][:n_outputs]


def _saved_model_runner(path):
    import tensorflow as tf  # the SavedModel runtime, whichever Keras backend wrote the artifact

    loaded = tf.saved_model.load(path)
    return lambda inputs: tf.nest.flatten(loaded.serve(inputs))  # (holds `loaded`: its variables live with it)


def _onnx_runner(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(path)
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: session.run(None, dict(zip(names, _flat(inputs))))


def _openvino_runner(path):
    import openvino

    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda inputs: list(compiled(_flat(inputs)).values())


def _litert_runner(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(path)

    def run(inputs):
        details, arrays = interpreter.get_input_details(), _flat(inputs)
        for d, a in zip(details, arrays):
            interpreter.resize_tensor_input(d["index"], a.shape)
        interpreter.allocate_tensors()
        for d, a in zip(details, arrays):
            interpreter.set_tensor(d["index"], a)
        interpreter.invoke()
        return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    return run


def _flat(inputs) -> list:
    import keras

    return [np.asarray(a) for a in keras.tree.flatten(inputs)]


def compare_outputs(got: list, want: list, rtol: float) -> Optional[str]:
    """None where every output agrees (`verify.relative_error` <= rtol: normwise over the finite values, NaN /
    +Inf / -Inf where `want` has them), else one line saying which output differs and by how much."""
    from .verify import relative_error

    if len(got) != len(want):
        return f"the artifact gives {len(got)} outputs, the original {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        err = relative_error(g, w)  # inf where the shapes or the NaN/+Inf/-Inf patterns differ
        if err > rtol:
            return f"output {i}: relative error {err:.1e} > tolerance {rtol:.0e}" + (
                " (its shape or NaN/Inf pattern differs from the original's)" if err == float("inf") else "")
    return None
