"""The implementation interface and the registry that lists what exists.

An implementation module defines an `Implementation` subclass next to its layers and registers itself
(`register(MyImplementation())` at its end); `convrewrite.implementations` imports the built-in ones so
they are listed. This module imports no implementation, so a layer module importing it closes no cycle,
and a third-party implementation registered from outside is planned, built, verified and timed like the
built-ins.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

import numpy as np

from .errors import PlanError
from .spec import ConvSpec

_REGISTRY: Dict[str, "Implementation"] = {}

FLOAT32_ROUNDOFF = 2.0 ** -24
REORDER_ERROR_FACTOR = 3.0
"""Kernels computing the same sum in another order (depthwise for a grouped Conv2D, PAC at conversion)
differ from Keras's by ~FLOAT32_ROUNDOFF x log2(terms); measured up to 0.45x of 3x that (depthwise k 3..51)."""


@dataclasses.dataclass
class SitePolicy:
    """What a user policy selected: the site paths, the options their layers get, an optional latency budget
    (a factor >= 1 of the predicted conv time), and whether a pattern (not names) selected them: a pattern
    skips a site a constraint rules out, a name makes that an error."""

    sites: set
    options: dict
    budget: Optional[float] = None
    by_pattern: bool = False


def itemsize(dtype: str) -> int:
    """Bytes per value of a dtype name; float32 for anything not 16- or 64-bit."""
    name = str(dtype)
    return 8 if "64" in name else (2 if "16" in name else 4)


def io_bytes(spec: ConvSpec) -> float:
    """Input + output + weights of one call on `spec` (bytes, at spec.batch or 1, at least 4 per value)."""
    item = max(4, itemsize(spec.dtype))
    b = spec.batch or 1
    ho, wo = spec.output_hw()
    n_in = b * (spec.height or 0) * (spec.width or 0) * spec.in_channels * (spec.depth or 1)
    n_out = b * (ho or 0) * (wo or 0) * spec.filters * (spec.output_depth() or 1)
    kh, kw = spec.kernel
    taps = kh * kw * spec.kernel_depth
    return float(item * (n_in + n_out) + item * taps * (spec.in_channels // spec.groups) * spec.filters)


def reduction_terms(spec: ConvSpec) -> int:
    """Terms summed per output value: taps x input channels per group."""
    depth = (spec.kernel_depth - 1) * spec.dilation_depth + 1  # 1 but for conv3d
    return spec.effective_kernel[0] * spec.effective_kernel[1] * depth * (spec.in_channels // spec.groups)


class Implementation:
    """Base class. Subclasses set `name`/`description` and override what differs.

    An implementation answers every question the planner, cost model and profiler ask of it, so none of
    them needs to know it by name: whether it applies, its layer, its cost features and regimes, its
    working memory (with the options it will run with), its expected error, how simple it is, whether it is
    chosen for speed or by a user policy, and its calibration canaries.
    """

    name: str = ""
    description: str = ""
    layer_classes: tuple = ()  # classes of the layers make_layer returns that only this implementation makes
    descriptive_features: frozenset = frozenset()  # features that describe sizes/ratios, not costs: not regressed on
    simplicity: int = 50
    """Rank for ties: within the planner's margin the simplest (lowest) implementation predicted wins."""
    chosen_for_speed: bool = True
    """False: chosen only where a user policy selects sites (see `policy_keyword`), never to save time, so it
    takes no part in speed choices, plan regret or the speed check's re-planning."""
    policy_keyword: str = ""
    """The keyword of plan()/optimize() whose value selects sites for this implementation ("" for none):
    see `select_sites`."""
    precision: str = "float32"
    """The compute precision the implementation's layer runs in; a lower one is admitted only under an
    error budget (plan(..., rtol=...)), see convrewrite.precision."""
    label: str = ""
    """How messages name it ("PAC"); the name where empty (see `__init_subclass__`)."""
    export_formats: frozenset = frozenset({"tf_saved_model", "onnx", "openvino", "litert"})
    """The `model.export` formats whose converters carry this implementation's layer and whose runtimes then
    compute what it computes (measured with benchmarks/export_matrix.py; see `convrewrite.export`). Every
    float32 implementation also compiles under XLA and exports to tf_saved_model (tests/test_export.py)."""
    rule: str = ""
    """Non-empty: without measurements the rule-based planner picks this implementation wherever it applies,
    for the reason given here (it is faster than Keras's own layer on every spec it applies to)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("label"):
            cls.label = cls.__dict__.get("name", "") or cls.label

    def applicable(self, spec: ConvSpec) -> Tuple[bool, str]:
        """(True, "") if this implementation computes `spec` exactly, else (False, why not)."""
        raise NotImplementedError

    def runs_on(self, fingerprint: dict) -> Tuple[bool, str]:
        """(True, "") if the device described by `fingerprint` (`convrewrite.device`; the device the plan is
        for, which is another one when converting for it) runs this implementation as intended, else
        (False, why not). Every device by default; e.g. a reduced-precision variant needs native units."""
        return True, ""

    def make_layer(self, layer, spec: ConvSpec, **options):
        """A new, unbuilt Keras layer computing what `layer` computes, named like it."""
        raise NotImplementedError

    def transfer_weights(self, old_layer, new_layer, spec: ConvSpec) -> None:
        """Copy `old_layer`'s weights into the built `new_layer` (values, never shared variables)."""
        new_layer.set_weights([np.array(w) for w in old_layer.get_weights()])

    def dependencies(self, spec: ConvSpec, options: dict):
        """Names of model inputs / layers whose outputs `call` needs besides the site's own input.

        The rebuild orders the graph so these are computed first (e.g. PAC's guidance)."""
        return []

    def call(self, new_layer, args, kwargs, context):
        """Call `new_layer` in the rebuilt graph where the original layer was called with (args, kwargs).

        context.resolve(name) returns the rebuilt symbolic tensor of a model input or of a layer's
        output (its first call); context.site is the Site being replaced, context.options its options."""
        return new_layer(*args, **kwargs)

    @property
    def drop_in(self) -> bool:
        """Whether its layer can stand wherever the original stood, called with the original's input alone
        (so it can be swapped into a custom layer or subclassed model, which have no graph to wire extra
        inputs through): true unless `call` needs the rebuild's context."""
        return type(self).call is Implementation.call

    def probe_call(self, new_layer, x):
        """Call the replacement on a lone input tensor `x` for per-site verification.

        Implementations that take extra inputs (guidance) feed random ones here: at conversion their
        output must not depend on them."""
        return new_layer(x)

    def canary_specs(self):
        """A few small specs (timed in ~10 ms each) covering this implementation's cost regimes, for
        calibration: a profile measured elsewhere is trusted here only if this implementation's times on
        them agree (see convrewrite.calibration). [] means it is never calibrated (its predictions from
        another device's profile then stay unverified)."""
        return []

    def check_options(self, options: dict, allowed) -> None:
        """PlanError where `options` (make_layer's keyword arguments) holds a name not in `allowed`."""
        unknown = set(options) - set(allowed)
        if unknown:
            raise PlanError(f"Received options {sorted(unknown)} for implementation {self.name!r}; expected only "
                            f"{', '.join(repr(a) for a in sorted(allowed))}.")

    def options_of(self, layer) -> dict:
        """The options that rebuild `layer` (one this implementation made) as it is, e.g. an FFT layer's
        tile size: how a re-optimized model's site is kept unchanged."""
        return {}

    def makes(self, layer) -> bool:
        """Whether `layer` is one this implementation makes (`for_layer`): an instance of `layer_classes` by
        default; an implementation whose layers share a class with another's tells them apart by config."""
        return bool(self.layer_classes) and isinstance(layer, self.layer_classes)

    def profile_applicable(self, spec: ConvSpec) -> bool:
        """Whether the profiler times this implementation on `spec` at all (besides its memory cap)."""
        return True

    def workspace_bytes(self, spec: ConvSpec, options: Optional[dict] = None) -> Optional[float]:
        """Peak working memory of one call on `spec` (bytes, at spec.batch or 1) with `options`: the kernel's
        input, output and weights by default. None where it depends on a size the spec leaves unknown."""
        return float(io_bytes(spec))

    def expected_error(self, spec: ConvSpec) -> float:
        """Expected normwise relative error vs Keras's own layer on `spec` (float32 compute), an upper
        estimate for random data. Default: the same sum in another order, REORDER_ERROR_FACTOR x
        FLOAT32_ROUNDOFF x log2(taps x Cin/groups) (a few 1e-7)."""
        return REORDER_ERROR_FACTOR * FLOAT32_ROUNDOFF * math.log2(max(reduction_terms(spec), 2))

    def select_sites(self, model_graph, policy) -> "SitePolicy":
        """The sites a user policy (`plan(..., <policy_keyword>=policy)`) hands to this implementation."""
        raise PlanError(f"Implementation {self.name!r} takes no site policy.")

    def cost_regime(self, spec: ConvSpec) -> str:
        """A label for specs this implementation runs through different code (e.g. 'dw' vs 'dense'): the cost
        model fits each regime's terms separately. '' means one regime."""
        return ""

    def features(self, spec: ConvSpec) -> Dict[str, float]:
        """Numbers the cost model regresses time on. Must not depend on anything but the spec."""
        macs = spec.macs() or 0
        n_in = (spec.batch or 1) * (spec.height or 0) * (spec.width or 0) * spec.in_channels * (spec.depth or 1)
        ho, wo = spec.output_hw()
        n_out = (spec.batch or 1) * (ho or 0) * (wo or 0) * spec.filters * (spec.output_depth() or 1)
        return {"macs": float(macs), "bytes": 4.0 * (n_in + n_out), "calls": 1.0}

    def __repr__(self):
        return f"<Implementation {self.name}>"



def canary_spec(kernel: int, in_channels: int, filters: int, size: int, groups: int = 1, depthwise: bool = False,
                batch: int = 2) -> ConvSpec:
    """A square, SAME-padded, stride-1 calibration spec (see Implementation.canary_specs)."""
    kind = "depthwise_conv2d" if depthwise else "conv2d"
    return ConvSpec(kind=kind, in_channels=in_channels, filters=filters, kernel=(kernel, kernel), height=size,
                    width=size, batch=batch, padding="same", groups=in_channels if depthwise else groups)


def register(impl: Implementation) -> Implementation:
    """Add an implementation to the registry (replacing one of the same name)."""
    if not impl.name:
        raise ValueError("Received an implementation without a name; expected a non-empty `name`.")
    _REGISTRY[impl.name] = impl
    return impl


def get(name: str) -> Implementation:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PlanError(f"Unknown implementation {name!r}; expected one of {sorted(_REGISTRY)}.") from None


def unregister(name: str) -> None:
    """Remove an implementation (e.g. one a test registered); `direct` stays: it is everyone's fallback."""
    if name == "direct":
        raise PlanError("Implementation 'direct' cannot be unregistered: it is the fallback of every site.")
    _REGISTRY.pop(name, None)


def names():
    """Registered implementation names, simplest first (see Implementation.simplicity)."""
    return sorted(_REGISTRY, key=lambda n: _REGISTRY[n].simplicity)


def speed_names():
    """The names chosen for speed (not by a user policy), simplest first."""
    return [n for n in names() if _REGISTRY[n].chosen_for_speed]


def policy_implementations() -> Dict[str, Implementation]:
    """{policy keyword: implementation} for implementations chosen by a user policy."""
    return {impl.policy_keyword: impl for impl in _REGISTRY.values() if impl.policy_keyword}


def for_layer(layer) -> Implementation:
    """The implementation that made `layer` (by its class), `direct` for Keras's own layers."""
    for impl in _REGISTRY.values():
        if impl.makes(layer):
            return impl
    return _REGISTRY["direct"]


def candidates(spec: ConvSpec, allowed=None):
    """{name: (applicable, reason)} for every registered implementation (filtered by `allowed`)."""
    out = {}
    for name in names():
        if allowed is not None and name not in allowed:
            continue
        out[name] = _REGISTRY[name].applicable(spec)
    return out
