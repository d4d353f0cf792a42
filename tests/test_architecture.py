"""The package's shape: no import cycles, implementations that answer for themselves (the planner, cost
model and profiler name none but `direct`), a third-party implementation that works like a built-in, and
functions short enough to read whole."""

import ast
from pathlib import Path

import keras
import networkx as nx
import numpy as np
import pytest

import convrewrite
from convrewrite import cost, implementations, profiles
from convrewrite.cost import CostModel

PACKAGE = Path(convrewrite.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """Every package module `path` imports, at any depth (function-level imports included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            if not target.startswith("convrewrite"):
                continue
            for alias in node.names:  # `from . import x` imports the module x; `from .m import f` imports m
                sub = f"{target}.{alias.name}"
                exists = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or \
                    (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists()
                yield sub if exists else target
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("convrewrite"))


def test_no_import_cycles_function_level_included():
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        for target in _imports(path):
            graph.add_edge(_module_name(path), target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


@pytest.mark.parametrize("module", ["planner.py", "cost.py", "fitting.py", "profile_format.py", "plotting.py",
                                    "profile.py", "profiles.py", "calibration.py",
                                    "device.py", "speed.py", "api.py"])
def test_no_implementation_named_but_direct(module):
    names = set(implementations.names()) - {"direct"}
    literals = [(node.lineno, node.value) for node in ast.walk(ast.parse((PACKAGE / module).read_text()))
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]
    assert not literals, f"{module} names implementations {literals}; ask the implementation instead"


MAX_FUNCTION_LINES = 50
LONG_FUNCTIONS = {
    # function: why it is long
    "convrewrite.cli.build_parser": "one add_argument per option, in the order --help lists them",
}


def test_functions_are_short_enough_to_read_whole():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body  # docstrings are documentation
                lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
                name = f"{_module_name(path)}.{node.name}"
                if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long.append((name, lines))
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a reason in LONG_FUNCTIONS: {long}"


# ---- a third-party implementation, registered from outside the package -----------------------------
class _MirroredConv(keras.layers.Conv2D):
    """A Conv2D that convolves the left-right mirrored image with the mirrored kernel and mirrors back:
    the same result by another route, as a third party's implementation would be."""

    def call(self, x):
        flip = keras.ops.flip
        y = keras.ops.conv(flip(x, axis=2), flip(self.kernel, axis=1), strides=self.strides, padding=self.padding)
        y = flip(y, axis=2)
        if self.use_bias:
            y = y + self.bias
        return self.activation(y)


class _Mirrored(implementations.Implementation):
    name = "mirrored"
    description = "test-only: a mirrored Conv2D (third-party implementation)"
    layer_classes = (_MirroredConv,)
    simplicity = 40

    def applicable(self, spec):
        ok = (spec.kind == "conv2d" and spec.groups == 1 and spec.dilation == (1, 1) and spec.strides == (1, 1)
              and spec.data_format == "channels_last" and spec.kernel[1] % 2 == 1)
        return ok, "" if ok else "stride-1, undilated, odd-width, channels_last dense Conv2D only"

    def make_layer(self, layer, spec, **options):
        return _MirroredConv.from_config(layer.get_config())


@pytest.fixture
def mirrored(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(profiles, "_AUTO_CACHE", {})
    implementations.register(_Mirrored())
    yield
    implementations.unregister("mirrored")


def test_a_third_party_implementation_is_planned_built_verified_and_timed(mirrored, rng):
    x = keras.Input((12, 12, 4))
    model = keras.Model(x, keras.layers.Conv2D(6, 3, padding="same", name="c")(x))
    model.get_layer("c").set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.get_layer("c").get_weights()])
    plan = convrewrite.plan(model, cost_model=None).force("c", "mirrored")
    fast = convrewrite.optimize(model, plan=plan, check_speed=False)
    assert isinstance(fast.get_layer("c"), _MirroredConv) and fast.convrewrite_report.passed
    data = rng.standard_normal((2, 12, 12, 4)).astype("float32")
    np.testing.assert_allclose(fast(data), model(data), rtol=1e-5, atol=1e-5)
    # measure=True times it like the built-ins, and the planner may then choose it on those timings
    cm = CostModel(convrewrite.fingerprint(), [], {}, name="empty")
    profiles.measure_tactics(cm, [plan.row("c").spec], batch=2, progress=False, save=False)
    timed = next(iter(cm.tactics().values()))
    assert {"direct", "mirrored"} <= set(timed)
    chosen = convrewrite.plan(model, cost_model=cm, batch=2).row("c")
    assert chosen.provenance["mirrored"]["source"] == "timed here"


def test_private_keras_apis_only_in_the_adapter():
    """keras.src imports and private Keras attributes live in keras_internals.py alone."""
    private = ("keras.src", "_keras_history", "_nodes_by_depth", "_inbound_nodes", "_inputs_struct",
               "_outputs_struct", "_functional")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "keras_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                found += [(path.name, node.lineno, n) for n in names if n.startswith("keras.src")]
            elif isinstance(node, ast.Attribute) and node.attr in private:
                found.append((path.name, node.lineno, node.attr))
    assert not found, f"private Keras APIs outside keras_internals.py: {found}"


def test_every_subpackage_is_installed():
    """pyproject's explicit package list names every package folder (a regular, non-editable install ships
    only those: a new subpackage left out would import here and fail for users)."""
    import re

    listed = set(re.findall(r'"(convrewrite[\w.]*)"', (PACKAGE.parent / "pyproject.toml").read_text()))
    folders = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert folders <= listed, f"package folders missing from pyproject.toml's packages: {sorted(folders - listed)}"


def _third_party_imports(path: Path):
    """Top-level names of the non-convrewrite modules `path` imports, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module.split(".")[0]


def test_only_the_backend_modules_import_tensorflow_or_jax():
    """Backends behind one interface: tensorflow and jax are imported by layers/backend/ alone (and by the
    start-up filter, which imports TensorFlow to silence its start-up lines, and by the export module, which
    loads SavedModels in TensorFlow's runtime)."""
    allowed = {PACKAGE / "layers" / "backend" / "tensorflow_ops.py": {"tensorflow"},
               PACKAGE / "layers" / "backend" / "jax_ops.py": {"jax"},
               PACKAGE / "_quiet_import.py": {"tensorflow"},
               # loading an exported SavedModel needs TensorFlow's runtime, whichever Keras backend wrote it
               PACKAGE / "export.py": {"tensorflow"}}
    found = {}
    for path in PACKAGE.rglob("*.py"):
        backends = {m for m in _third_party_imports(path) if m in ("tensorflow", "jax", "jaxlib")}
        if backends - allowed.get(path, set()):
            found[str(path.relative_to(PACKAGE))] = sorted(backends)
    assert not found, f"backend libraries imported outside convrewrite/layers/backend/: {found}"


def test_both_backend_modules_export_the_same_interface():
    """One interface: every name one backend module exports, the other exports too (checked from their
    source, so that this runs on either backend)."""
    exports = {}
    for name in ("tensorflow_ops", "jax_ops"):
        tree = ast.parse((PACKAGE / "layers" / "backend" / f"{name}.py").read_text())
        (node,) = [n for n in tree.body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        exports[name] = set(ast.literal_eval(node.value))
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
            t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert exports[name] <= defined, f"{name} exports undefined names {exports[name] - defined}"
    assert exports["tensorflow_ops"] == exports["jax_ops"]


def test_another_keras_backend_gets_an_error_naming_the_backends_that_work():
    import subprocess
    import sys

    code = ("import convrewrite\n"
            "print(convrewrite.reference.conv2d is not None)\n"
            "try:\n    convrewrite.optimize\nexcept ImportError as e:\n    print('ERR', e)\n")
    env = {**__import__("os").environ, "KERAS_BACKEND": "numpy"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "True"  # the numpy reference still works
    # (Keras's numpy backend itself imports jax: where jax is missing, that is the error, and it says too
    # which backends to install)
    assert lines[1].startswith("ERR ") and "jax" in lines[1] and "tensorflow" in lines[1].lower(), lines
