"""Reduced compute precision as implementation variants: `direct-bf16`, `depthwise-bf16`.

A variant runs its base implementation's layer under Keras's `mixed_bfloat16` policy: inputs and weights
are rounded to bfloat16, products accumulate in float32 (oneDNN's AMX / AVX-512 BF16 kernels on CPU),
the output is bfloat16 (the next float32 layer casts it back), the variables stay float32. It saves and
loads as that policy. The cost model predicts and the profiler times each variant like any implementation
(so a device where bfloat16 is not faster never gets it chosen), calibration covers it through its
canaries, and the planner admits it only under an error budget (`rtol`; see planner.make_plan): the
default float32 tolerance (1e-5) never changes precision.

Which precisions a device runs natively is read from its fingerprint, never assumed: bfloat16 on CPUs with
avx512_bf16 or amx_bf16, and on GPUs of compute capability 8.0 and newer. float16 variants are not offered
on CPUs (TF's CPU float16 convolutions are not faster, and float16's range (65504) would need an overflow
guard the error estimate does not model). FFT and PAC keep float32: the transforms would lose too much.
"""

from __future__ import annotations

from . import device
from .registry import Implementation, get, register

MIXED_POLICY = {"bfloat16": "mixed_bfloat16"}
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8}
PRECISION_ERROR_FACTOR = 2.0
"""Normwise relative error of a bfloat16 convolution (inputs and weights rounded to bfloat16, float32
accumulation, bfloat16 output) vs its float32 layer <= PRECISION_ERROR_FACTOR x 2^-8 (7.8e-3).
`python benchmarks/precision_error.py --n 40` (random normal data; dense, grouped and depthwise convs,
k 1..15, 1..256 channels): largest measured 6.75e-3 (0.86x of this), median 4.8e-3, on Xeon 6/167/1."""


def native_precisions(fp: dict = None) -> set:
    """The reduced precisions this device (or the fingerprint `fp`) computes natively."""
    fp = fp or device.fingerprint()
    out = set()
    if fp.get("device_kind") == "gpu":
        cc = tuple(fp.get("compute_capability") or (0, 0))
        if cc >= (8, 0):
            out.add("bfloat16")
        return out
    isa = set(((fp.get("hardware") or {}).get("cpu") or {}).get("isa") or ())
    if isa & {"avx512_bf16", "amx_bf16"}:
        out.add("bfloat16")
    return out


class ReducedPrecision(Implementation):
    """`base` run in a lower compute precision (see the module docstring)."""

    export_formats = frozenset()  # not measured in any export format yet (no bfloat16 CPU to verify on)

    def __init__(self, base_name: str, precision: str):
        self.base_name, self.precision = base_name, precision
        short = {"bfloat16": "bf16"}[precision]
        self.name = f"{base_name}-{short}"
        self.label = self.name
        self.description = f"{base_name} under Keras's {MIXED_POLICY[precision]} policy"

    @property
    def base(self) -> Implementation:
        return get(self.base_name)

    @property
    def simplicity(self):
        return self.base.simplicity + 5  # within the margin, full precision wins

    @property
    def descriptive_features(self):
        return self.base.descriptive_features

    def applicable(self, spec):
        ok, why = self.base.applicable(spec)
        if not ok:
            return ok, why
        if spec.dtype != "float32":
            return False, f"the layer already computes in {spec.dtype}"
        return True, ""

    def runs_on(self, fingerprint):
        # never assumed: emulated reduced precision is slower than float32, and its timings would say so
        # only on a device that was profiled
        if self.precision not in native_precisions(fingerprint):
            return False, (f"the device has no native {self.precision} (e.g. avx512_bf16 / amx_bf16, or a GPU of "
                           f"compute capability >= 8.0)")
        return True, ""

    def make_layer(self, layer, spec, **options):
        import keras

        new = self.base.make_layer(layer, spec, **options)
        new.dtype_policy = keras.DTypePolicy(MIXED_POLICY[self.precision])
        return new

    def transfer_weights(self, old_layer, new_layer, spec):
        self.base.transfer_weights(old_layer, new_layer, spec)

    def features(self, spec):
        return self.base.features(spec)

    def cost_regime(self, spec):
        return self.base.cost_regime(spec)

    def profile_applicable(self, spec):
        # Reduced precision pays on the small kernels most networks are made of (large ones go through
        # FFT in float32), so those are not timed; nor on a device without native units (never chosen).
        return (max(spec.kernel) <= 7 and self.runs_on(device.fingerprint())[0]
                and self.base.profile_applicable(spec))

    def canary_specs(self):
        return self.base.canary_specs()[:2]

    def workspace_bytes(self, spec, options=None):
        return self.base.workspace_bytes(spec, options)

    def expected_error(self, spec):
        return PRECISION_ERROR_FACTOR * UNIT_ROUNDOFF[self.precision] + self.base.expected_error(spec)


def register_variants():
    """Register the reduced-precision variants of Keras's own kernels."""
    for base in ("direct", "depthwise"):
        register(ReducedPrecision(base, "bfloat16"))


def is_reduced(impl: Implementation) -> bool:
    return getattr(impl, "precision", "float32") != "float32"


register_variants()
