"""Equivalence checks: per conv site and end to end, on random or user-given inputs.

Errors are normwise relative: max |new - original| / max |original| over the whole tensor, so a value
near zero does not blow the figure up and a single wrong pixel still shows. Where the site is cheap
enough, the numpy float64 reference is computed too, and both layers' errors against it are reported.
"""

from __future__ import annotations

import dataclasses
import json
from typing import List, Optional

import numpy as np

from . import implementations, keras_internals
from .graph import input_struct, walk
from .model_class import overrides_predict

REWRITE_LABELS = {"fold_bn": "bn", "merge_branches": "merge", "fuse_activation": "act"}  # the report's impl column
REFERENCE_MAX_MACS = 2e8  # float64 numpy reference above this many MACs costs seconds: skip it


def default_tolerance(dtype_name: str) -> float:
    """Relative error bar for a compute dtype / policy name."""
    name = str(dtype_name)
    if "bfloat16" in name:
        return 3e-2
    if "float16" in name:
        return 1e-2
    if "float64" in name:
        return 1e-10
    return 1e-5


def nonfinite_mismatches(actual, expected) -> int:
    """How many positions differ in kind between the two: NaN vs not NaN, +Inf vs not +Inf, -Inf vs not -Inf.

    Two results are only equivalent when their non-finite values land in the same places with the same
    kind; shapes that differ count as every position."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return max(actual.size, expected.size, 1)
    bad = ((np.isnan(actual) != np.isnan(expected))
           | ((actual == np.inf) != (expected == np.inf))
           | ((actual == -np.inf) != (expected == -np.inf)))
    return int(np.count_nonzero(bad))


def relative_error(actual, expected) -> float:
    """Normwise relative error of the finite parts: max |actual - expected| / max |expected| over the
    positions where both are finite; inf when the shapes differ or the non-finite patterns do (NaN where
    NaN, +Inf where +Inf, -Inf where -Inf is required; see `nonfinite_mismatches`)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if not expected.size:
        return 0.0
    if nonfinite_mismatches(actual, expected):
        return float("inf")
    finite = np.isfinite(expected)
    if not finite.any():
        return 0.0
    a, e = actual[finite], expected[finite]
    scale = float(np.max(np.abs(e)))
    err = float(np.max(np.abs(a - e)))
    return err / scale if scale > 0 else err


def max_abs_difference(actual, expected) -> float:
    """max |actual - expected| over the positions where both are finite (inf for different shapes)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    both = np.isfinite(actual) & np.isfinite(expected)
    return float(np.max(np.abs(actual[both] - expected[both]))) if both.any() else 0.0


@dataclasses.dataclass
class Check:
    """One comparison. kind: 'site' (one layer in isolation), 'rewrite' (a span of the original the rewrite
    stage replaced, against the layer that replaced it; implementation names the rewrites) or 'output' (one
    model output)."""

    name: str
    kind: str
    rel_error: float
    max_abs: float
    tolerance: float
    passed: bool
    implementation: str = ""
    rel_error_new_vs_reference: Optional[float] = None
    rel_error_original_vs_reference: Optional[float] = None
    nonfinite_mismatches: int = 0  # positions whose NaN / +Inf / -Inf pattern differs (then rel_error is inf)
    inputs: str = "random"  # "random" (a fresh normal sample) or "given" (what the site saw on the user's inputs)


@dataclasses.dataclass
class VerificationReport:
    checks: List[Check]
    fallbacks: List[dict] = dataclasses.field(default_factory=list)  # {"site", "from", "to", "why"}
    speed: Optional[dict] = None  # set by optimize: speed.SpeedCheck.to_dict(), measured next to predicted
    shared_layers: List[str] = dataclasses.field(default_factory=list)  # kept as the original's objects (see graph.recreate)
    model_class: str = ""  # set by optimize where the optimized model is not of the original's class, or lacks
    # attributes of it: what and why

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failing_sites(self) -> List[str]:
        return [c.name for c in self.checks if c.kind == "site" and not c.passed]

    @property
    def outputs(self) -> List[Check]:
        return [c for c in self.checks if c.kind == "output"]

    @property
    def sites(self) -> List[Check]:
        return [c for c in self.checks if c.kind == "site"]

    def to_dict(self):
        return {"passed": self.passed, "checks": [dataclasses.asdict(c) for c in self.checks], "fallbacks": self.fallbacks,
                "speed": self.speed, "shared_layers": self.shared_layers, "model_class": self.model_class}

    def to_json(self):
        return json.dumps(self.to_dict(), indent=1)

    def summary(self) -> str:
        # columns as wide as the longest entry, so long nested site paths never shift them
        w = max([40] + [len(f"{c.kind}:{c.name}") for c in self.checks])
        iw = max([12] + [len(c.implementation or "") for c in self.checks])
        lines = [f"{'check':<{w}} {'impl':<{iw}} {'rel err':>10} {'vs f64 ref':>10} {'tol':>8}  result"]
        for c in self.checks:
            ref = "-" if c.rel_error_new_vs_reference is None else f"{c.rel_error_new_vs_reference:.2e}"
            label = f"{c.kind}:{c.name}"
            note = f" ({c.nonfinite_mismatches} positions with a different NaN/Inf pattern)" if c.nonfinite_mismatches else ""
            lines.append(f"{label:<{w}} {c.implementation:<{iw}} {c.rel_error:>10.2e} {ref:>10} {c.tolerance:>8.0e}  "
                         f"{'ok' if c.passed else 'FAIL'}{note}")
        kinds = sorted({c.inputs for c in self.checks})
        if kinds:
            lines.append("inputs: " + ", ".join({"given": "the given inputs (each site: what it sees on them)",
                                                 "random": "random normal"}.get(k, k) for k in kinds))
        for f in self.fallbacks:
            lines.append(f"fell back: {f['site']} {f['from']} -> {f['to']} ({f['why']})")
        if self.shared_layers:
            lines.append(f"shared with the original (no config to re-create them; same variables): {self.shared_layers}")
        if self.model_class:
            lines.append(f"model class: {self.model_class}")
        lines.append("PASSED" if self.passed else f"FAILED: {[c.name for c in self.checks if not c.passed]}")
        if self.speed is not None:
            from .speed import SpeedCheck

            fields = {f.name for f in dataclasses.fields(SpeedCheck)}
            lines.append(SpeedCheck(**{k: v for k, v in self.speed.items() if k in fields}).describe())
        return "\n".join(lines)


def random_inputs(model, batch: int = 2, spatial: int = 32, seed: int = 0):
    """Random inputs shaped like `model.inputs` (unknown sizes: `batch`, `spatial`), in its input structure."""
    import keras

    rng = np.random.default_rng(seed)

    def make(t):
        shape = [batch if i == 0 and d is None else (spatial if d is None else d) for i, d in enumerate(t.shape)]
        dtype = keras.backend.standardize_dtype(t.dtype)
        if "int" in dtype:
            return rng.integers(0, 2, size=shape).astype(dtype)
        if dtype == "bool":
            return rng.integers(0, 2, size=shape).astype(bool)
        return rng.standard_normal(shape).astype(dtype)

    return keras.tree.map_structure(make, input_struct(model))


def _numpy(x):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32") if "16" in str(x.dtype) else x))


def _native(x):
    """x as a numpy array of its own dtype (float16 stays float16: a site is fed what it saw)."""
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def site_inputs(model, inputs) -> dict:
    """{site path: the input tensor (numpy) that site's layer receives on its first call when `model` runs
    on `inputs`} for every conv site, nested models included.

    Built from sub-models of the model's own graph (inputs -> each site's input tensor), so it is exactly
    what the site sees in that run; nested models are entered with what they receive."""
    out = {}
    _capture(walk(model), inputs, out)
    return out


def _capture(mg, inputs, out):
    import keras

    targets = []  # (site path or child graph, [KerasTensor, ...])
    for site in mg.own_sites:
        node = mg.graph.nodes[mg.node_for_layer_name(site.layer.name)]["node"]
        targets.append((site.path, [node.input_tensors[0]]))
    for child in mg.children.values():
        node = mg.graph.nodes[mg.node_for_layer_name(child.source.name)]["node"]
        targets.append((child, list(node.input_tensors)))
    if not targets:
        return
    flat = [t for _, tensors in targets for t in tensors]
    probe = keras.Model(keras_internals.io_structs(mg.model)[0], flat, name=f"{mg.model.name}_site_inputs")
    values = keras.tree.flatten(probe(inputs, training=False))
    i = 0
    for target, tensors in targets:
        got = values[i:i + len(tensors)]
        i += len(tensors)
        if isinstance(target, str):
            out.setdefault(target, _native(got[0]))
        else:
            _capture(target, got[0] if len(got) == 1 else got, out)


def check_site(site, new_layer, seed: int = 0, spatial: int = 16, batch: int = 2, rtol=None, reference=True,
               implementation=None, x=None) -> Check:
    """Compare a replacement layer with the original on `x` (what the site saw on the user's inputs), or,
    when x is None, on a fresh random normal input of the site's shape."""
    spec = site.spec
    given = x is not None
    if not given:
        rng = np.random.default_rng(seed)
        h = spec.height or spatial
        w = spec.width or spatial
        b = spec.batch or batch
        shape = (b, spec.in_channels, h, w) if spec.data_format == "channels_first" else (b, h, w, spec.in_channels)
        if spec.is_1d:  # (batch, steps, C): an unknown length covers the kernel (a long 1-D kernel exceeds `spatial`)
            w = spec.width or max(spatial, spec.effective_kernel[1])
            shape = (b, spec.in_channels, w) if spec.data_format == "channels_first" else (b, w, spec.in_channels)
        elif spec.kind == "conv3d":  # (batch, D, H, W, C)
            size = (spec.depth or spatial, h, w)
            shape = (b, spec.in_channels, *size) if spec.data_format == "channels_first" else (b, *size, spec.in_channels)
        x = rng.standard_normal(shape).astype("float32")
    impl = implementations.for_layer(new_layer)
    old = _numpy(site.layer(x))
    new = _numpy(impl.probe_call(new_layer, x))
    tol = default_tolerance(spec.dtype) if rtol is None else rtol
    err = relative_error(new, old)
    check = Check(site.path, "site", err, max_abs_difference(new, old), tol, bool(err <= tol),
                  implementation or impl.name, nonfinite_mismatches=nonfinite_mismatches(new, old),
                  inputs="given" if given else "random")
    if spec.is_1d:
        b, h, w = x.shape[0], 1, x.shape[2 if spec.data_format == "channels_first" else 1]
    elif spec.kind == "conv3d":  # the volume's depth counts in the MACs through spec.depth (checked below)
        b, h, w = x.shape[0], x.shape[-2 if spec.data_format == "channels_first" else -3], \
            x.shape[-1 if spec.data_format == "channels_first" else -2]
    elif spec.data_format == "channels_first":
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
    else:
        b, h, w = x.shape[0], x.shape[1], x.shape[2]
    if reference and (spec.with_input(b, h, w).macs() or 0) <= REFERENCE_MAX_MACS:
        from .reference import spec_forward

        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs give NaN/Inf, as they should
            ref = spec_forward(spec, np.asarray(x, np.float32), site.layer.get_weights(),
                               activation=getattr(site.layer, "activation", None))
        check.rel_error_new_vs_reference = relative_error(new, ref)
        check.rel_error_original_vs_reference = relative_error(old, ref)
    return check


def verify(original, new, inputs=None, rtol=None, sites=True, seed: int = 0, batch: int = 2, reference=True,
           plan=None, source=None) -> VerificationReport:
    """Compare two models: every output end to end, every conv site in isolation (if `sites`), and every
    span the rewrite stage replaced (if `plan` lists rewrites).

    inputs: arrays in the model's input structure; default random normal (batch 2, unknown sizes 32).
    Given, the per-site checks use them too: each site is fed what it receives when the planned model runs
    on them (see `site_inputs`); otherwise each site gets a random normal input of its own shape.
    rtol: tolerance; default by compute dtype (1e-5 float32, 1e-2 float16, 3e-2 bfloat16).
    plan: the Plan `new` was built from, to name each site's implementation in the report and replay its
    rewrites. source: the model the plan was made on (the original after its rewrites), whose conv layers
    the per-site checks hold the new ones against; default: the original, rewritten again where the plan
    lists rewrites (a folded conv compares with its folded self, not with the original's unfolded one).
    The end-to-end checks always compare with `original(inputs, training=False)`.
    Equivalent means: the same shapes, NaN / +Inf / -Inf at the same positions, and the finite parts
    within `rtol` in normwise relative error (see `relative_error`).
    """
    rewrites = list(getattr(plan, "rewrites", None) or [])
    if source is None:
        source = original
        if rewrites:
            from .rewrite import apply

            source = apply(original)[0]
    checks = _site_checks(source, new, inputs, rtol, seed, reference, plan) if sites else []
    if sites and rewrites:
        checks += check_rewrites(original, new, rewrites, rtol=rtol, seed=seed, batch=batch)
    return VerificationReport(checks + _output_checks(original, new, inputs, rtol, seed, batch))


def _site_checks(source, new, inputs, rtol, seed, reference, plan) -> List[Check]:
    """One check per conv site of `source` against the same-named layer of `new`."""
    checks = []
    new_layers = walk(new).layers
    seen = site_inputs(source, inputs) if inputs is not None else {}
    for site in walk(source).all_sites():
        new_layer = new_layers.get(site.path)
        if new_layer is None:
            checks.append(Check(site.path, "site", float("inf"), float("inf"), 0.0, False, "missing"))
            continue
        chosen = plan.choices().get(site.path) if plan is not None else None
        checks.append(check_site(site, new_layer, seed=seed, rtol=rtol, reference=reference, implementation=chosen,
                                 x=seen.get(site.path)))
    return checks


def _output_checks(original, new, inputs, rtol, seed, batch) -> List[Check]:
    """One check per model output: `new(inputs)` against `original(inputs, training=False)`."""
    import keras

    given = inputs is not None
    if not given:
        inputs = random_inputs(original, batch=batch, seed=seed)
    expected = keras.tree.flatten(original(inputs, training=False))
    actual = keras.tree.flatten(new(inputs, training=False))
    names = list(getattr(original, "output_names", None) or [])
    policy = getattr(original, "dtype_policy", None)
    compute = [getattr(layer, "compute_dtype", "float32") for layer in original.layers] + [getattr(policy, "name", "")]
    tol = rtol if rtol is not None else max(default_tolerance(c) for c in compute)
    names = [names[i] if i < len(names) else f"output_{i}" for i in range(len(expected))]
    checks = _compare_outputs(expected, actual, names, "output count", tol, given)
    if overrides_predict(original):
        # the class makes predict more than a call (a keras_hub Task runs its preprocessor there): what users
        # call must agree too, so a step the rebuild lost can never pass
        expected = keras.tree.flatten(original.predict(inputs, verbose=0))
        actual = keras.tree.flatten(new.predict(inputs, verbose=0))
        names = ["predict()"] if len(expected) == 1 else [f"predict()[{i}]" for i in range(len(expected))]
        checks += _compare_outputs(expected, actual, names, "predict() output count", tol, given)
    return checks


def _compare_outputs(expected, actual, names, count_name, tol, given) -> List[Check]:
    """One "output" check per pair of flat outputs (named `names`), and a failing `count_name` check where
    the two models return different numbers of outputs."""
    checks = []
    for name, e, a in zip(names, map(_numpy, expected), map(_numpy, actual)):
        err = relative_error(a, e)
        checks.append(Check(name, "output", err, max_abs_difference(a, e), tol, bool(err <= tol),
                            nonfinite_mismatches=nonfinite_mismatches(a, e), inputs="given" if given else "random"))
    if len(expected) != len(actual):
        checks.append(Check(count_name, "output", float("inf"), float("inf"), tol, False))
    return checks


def check_rewrites(original, new, rewrites, rtol=None, seed: int = 0, batch: int = 2, spatial: int = 16) -> List[Check]:
    """One 'rewrite' check per site the rewrite stage produced: the span of `original` it replaced (e.g.
    conv -> BN -> Add -> ReLU, cut out between the recorded input and output tensors, at training=False)
    against `new`'s layer of that name, on a fresh random normal input (unknown sizes: `batch`, `spatial`).

    rewrites: Plan.rewrites (rewrite.Rewrite dicts), combined per site."""
    import keras

    from .rewrite import Rewrite, by_site, node_of

    graph, new_layers = walk(original), walk(new).layers
    rng = np.random.default_rng(seed)
    checks = []
    for r in by_site([Rewrite.from_dict(d) for d in rewrites]):
        x_t = node_of(graph, r.input).outputs[r.input_index]  # in a nested model's graph for its rewrites
        span = keras.Model(x_t, node_of(graph, r.output).outputs[0], name=f"{r.site.replace('/', '_')}_rewritten_span")
        shape = [batch if i == 0 and d is None else (spatial if d is None else d) for i, d in enumerate(x_t.shape)]
        x = rng.standard_normal(shape).astype(keras.backend.standardize_dtype(x_t.dtype))
        new_layer = new_layers.get(r.site)
        if new_layer is None:
            checks.append(Check(r.site, "rewrite", float("inf"), float("inf"), 0.0, False, "missing"))
            continue
        expected = _numpy(span(x, training=False))
        actual = _numpy(implementations.for_layer(new_layer).probe_call(new_layer, x))
        tol = default_tolerance(new_layer.compute_dtype) if rtol is None else rtol
        err = relative_error(actual, expected)
        short = "+".join(REWRITE_LABELS.get(k, k) for k in r.kind.split("+"))
        checks.append(Check(r.site, "rewrite", err, max_abs_difference(actual, expected), tol, bool(err <= tol),
                            short, nonfinite_mismatches=nonfinite_mismatches(actual, expected)))
    return checks
