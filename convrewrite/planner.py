"""Plan: which implementation each convolution site gets, and why.

A plan is made from a walked model (`ModelGraph`) by a chooser. Without a cost model the chooser is a
rule: `depthwise` where it applies (a grouped Conv2D with one channel per group runs 10-25x faster through
the depthwise kernel on CPU), else `direct`. With a cost model it picks the lowest predicted time.
Users may edit a plan by hand (`plan.force("conv3", "direct")`) before applying it.

Constraints (`make_plan(..., allow=, memory_limit=, rtol=, pac=)`) remove candidates before the choice;
each removed candidate keeps its reason in `PlanRow.candidates`, and the row's reason names it. The
working-memory and error estimates they use are `estimate_workspace_bytes` and `estimate_rel_error`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Dict, List, Optional

from . import implementations
from .errors import PlanError
from .spec import ConvSpec


@dataclasses.dataclass
class PlanRow:
    """The decision for one site. `predicted_ms` maps implementation -> predicted time where known."""

    site: str
    spec: ConvSpec
    choice: str
    reason: str
    candidates: Dict[str, str] = dataclasses.field(default_factory=dict)  # name -> "" or why not applicable
    options: Dict[str, object] = dataclasses.field(default_factory=dict)
    predicted_ms: Dict[str, float] = dataclasses.field(default_factory=dict)
    aliases: List[str] = dataclasses.field(default_factory=list)  # the layer's other paths (nested models)
    # implementation -> {"source": where its prediction came from, "band": expected relative error or None}
    provenance: Dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def speedup(self) -> Optional[float]:
        """Predicted time of `direct` over the chosen implementation's, where both are predicted."""
        if "direct" in self.predicted_ms and self.choice in self.predicted_ms and self.predicted_ms[self.choice] > 0:
            return self.predicted_ms["direct"] / self.predicted_ms[self.choice]
        return None

    def to_dict(self):
        return {
            "site": self.site,
            "spec": self.spec.to_dict(),
            "choice": self.choice,
            "reason": self.reason,
            "candidates": dict(self.candidates),
            "options": dict(self.options),
            "predicted_ms": dict(self.predicted_ms),
            "aliases": list(self.aliases),
            "provenance": {k: dict(v) for k, v in self.provenance.items()},
        }

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["spec"] = ConvSpec.from_dict(d["spec"])
        return cls(**d)


class Plan:
    """An ordered list of PlanRows, one per conv site, editable with `force`."""

    def __init__(self, rows: List[PlanRow], cost_model_name: Optional[str] = None):
        self.rows = list(rows)
        self.cost_model_name = cost_model_name
        self.pac_overhead: Optional[float] = None  # predicted conv latency with PAC / without, under a budget
        self.cost_model_note: Optional[str] = None  # set where the profile was measured on another device
        self.trust: Optional[str] = None  # the profile's trust on the planned device (cost.TRUST_LEVELS)
        self.calibration: Optional[dict] = None  # the profile's calibration here, where it was calibrated
        self.constraints: Dict[str, object] = {}  # {"memory_limit": bytes, "rtol": float} as planned with

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def row(self, name: str) -> PlanRow:
        """The row for a site path ("backbone/conv3") or a bare layer name, if unique."""
        exact = [r for r in self.rows if r.site == name or name in r.aliases]
        if exact:
            return exact[0]
        by_name = [r for r in self.rows if r.site.rsplit("/", 1)[-1] == name]
        if len(by_name) == 1:
            return by_name[0]
        if by_name:
            raise PlanError(f"Layer name {name!r} matches several sites {[r.site for r in by_name]}; expected a full path.")
        raise PlanError(f"No conv site named {name!r} in this plan; expected one of {[r.site for r in self.rows]}.")

    def force(self, name, implementation: str, reason: str = "forced by user", **options) -> "Plan":
        """Set the implementation for a site (a name/path, or a compiled regex matching several).

        Raises PlanError if the implementation is unknown or does not apply to the site's spec."""
        rows = [r for r in self.rows if name.fullmatch(r.site)] if isinstance(name, re.Pattern) else [self.row(name)]
        if not rows:
            raise PlanError(f"Pattern {name.pattern!r} matches no conv site; expected one of {[r.site for r in self.rows]}.")
        impl = implementations.get(implementation)
        for row in rows:
            ok, why = impl.applicable(row.spec)
            if not ok:
                raise PlanError(f"Implementation {implementation!r} does not apply to site '{row.site}' ({row.spec.short()}): {why}.")
            why = constraint_violation(implementation, row.spec, self.constraints.get("memory_limit"),
                                       self.constraints.get("rtol"), options)
            if why:  # the summary states the plan's limits: a forced choice must keep them
                raise PlanError(f"Implementation {implementation!r} at site '{row.site}' ({row.spec.short()}) {why}; "
                                f"expected a choice within the limits this plan was made with (plan again without them "
                                f"to force it).")
            row.choice, row.reason, row.options = implementation, reason, dict(options)
        return self

    def choices(self) -> Dict[str, str]:
        return {r.site: r.choice for r in self.rows}

    def summary(self) -> str:
        """A fixed-width table: site, spec, candidates' predicted ms (where known), choice, speedup, reason."""
        header = ["site", "spec", "choice", "predicted ms (candidates)", "speedup", "reason"]
        lines = []
        for r in self.rows:
            preds = " ".join(f"{k}={v:.3g}" for k, v in sorted(r.predicted_ms.items(), key=lambda kv: kv[1]))
            sp = f"{r.speedup:.2f}x" if r.speedup else "-"
            lines.append([r.site, r.spec.short(), r.choice, preds or "-", sp, r.reason])
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
        out += [fmt.format(*map(str, line)) for line in lines]
        counts = {}
        for r in self.rows:
            counts[r.choice] = counts.get(r.choice, 0) + 1
        tail = f"{len(self.rows)} conv sites: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        total = self.predicted_total()
        if total:
            band = self.predicted_band()
            quoted = f"{total[0] / total[1]:.2f}x" + (f" +-{band:.0%}" if band is not None else ", error unknown")
            tail += f"; predicted conv time {total[0]:.3g} ms -> {total[1]:.3g} ms ({quoted})"
            sources = self.prediction_sources()
            if sources:
                tail += "; predictions: " + ", ".join(f"{n} {k}" for k, n in sources.items())
        if self.pac_overhead is not None:
            tail += f"; PAC overhead {self.pac_overhead:.2f}x predicted"
        if self.constraints.get("memory_limit") is not None:
            tail += f"; memory limit {_format_bytes(self.constraints['memory_limit'])}"
        if self.constraints.get("rtol") is not None:
            tail += f"; rtol {self.constraints['rtol']:g}"
        if self.cost_model_name:
            tail += f"; cost model: {self.cost_model_name}"
            if self.cost_model_note:
                tail += f" ({self.cost_model_note})"
        return "\n".join(out + [tail])

    def _chosen_and_direct(self):
        """[(direct (ms, provenance), chosen (ms, provenance))] per row, for totals."""
        return [((r.predicted_ms["direct"], r.provenance.get("direct", {})),
                 (r.predicted_ms[r.choice], r.provenance.get(r.choice, {}))) for r in self.rows]

    def predicted_band(self) -> Optional[float]:
        """The relative error band of the predicted total speedup, or None where a prediction has none.

        Each total's band is the time-weighted mean of its sites' bands (errors of one device's profile
        lean the same way, so they are not assumed to cancel); the speedup's band combines the two totals'
        in quadrature (their errors are those of different kernels)."""
        if self.predicted_total() is None:
            return None
        pairs = self._chosen_and_direct()
        bands = []
        for side in (0, 1):
            items = [p[side] for p in pairs]
            if any(prov.get("band") is None for _, prov in items):
                return None
            total = sum(ms for ms, _ in items)
            bands.append(sum(ms * prov["band"] for ms, prov in items) / total if total else 0.0)
        return math.hypot(*bands)

    def prediction_sources(self) -> Dict[str, int]:
        """{source: count} over the chosen implementations' predictions (see cost.Prediction)."""
        counts: Dict[str, int] = {}
        for r in self.rows:
            source = r.provenance.get(r.choice, {}).get("source")
            if source:
                counts[source] = counts.get(source, 0) + 1
        return counts

    def predicted_total(self):
        """(all-direct ms, chosen ms) summed over sites, or None if any site lacks a prediction."""
        if not self.rows or any("direct" not in r.predicted_ms or r.choice not in r.predicted_ms for r in self.rows):
            return None
        return sum(r.predicted_ms["direct"] for r in self.rows), sum(r.predicted_ms[r.choice] for r in self.rows)

    def to_dict(self):
        total = self.predicted_total()
        speedup = None if not total else {"value": total[0] / total[1], "band": self.predicted_band(),
                                          "sources": self.prediction_sources()}
        return {"cost_model": self.cost_model_name, "cost_model_note": self.cost_model_note, "trust": self.trust,
                "calibration": self.calibration, "predicted_speedup": speedup,
                "pac_overhead": self.pac_overhead, "constraints": dict(self.constraints),
                "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d):
        plan = cls([PlanRow.from_dict(r) for r in d["rows"]], d.get("cost_model"))
        plan.cost_model_note = d.get("cost_model_note")
        plan.trust, plan.calibration = d.get("trust"), d.get("calibration")
        plan.pac_overhead = d.get("pac_overhead")
        plan.constraints = dict(d.get("constraints") or {})
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __repr__(self):
        return f"<Plan {len(self.rows)} sites: {self.choices()}>"


def rule_based_choice(spec: ConvSpec, applicable: Dict[str, str]):
    """(choice, reason) without measurements: depthwise where it applies, else direct."""
    if "depthwise" in applicable and applicable["depthwise"] == "":
        return "depthwise", "rule: one channel per group runs through the depthwise kernel"
    return "direct", "rule: Keras's own kernel"


DIRECT_MARGIN = 1.1
"""A more elaborate implementation is chosen over a simpler one only if predicted at least this much
faster: a difference within 10% is within the cost model's error, and the simpler choice then costs at
most that. Simplicity is registry order: direct, depthwise, fft, fft-tiled, ..."""


def choose(predicted_ms: Dict[str, float], margin: float = DIRECT_MARGIN):
    """(choice, reason): the first implementation in registry order within `margin` of the fastest."""
    fastest = min(predicted_ms, key=predicted_ms.get)
    for name in implementations.names():
        if name in predicted_ms and predicted_ms[name] <= margin * predicted_ms[fastest]:
            if name == fastest:
                return name, "lowest predicted time"
            return name, f"within {margin:g}x of {fastest}'s predicted time, and simpler"
    return fastest, "lowest predicted time"


# ---- constraint estimates -------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_limit(value) -> Optional[int]:
    """Bytes from `memory_limit`: None (no limit), a positive number of bytes, or a string such as
    "512MB", "2GB" (powers of 1000) or "1.5GiB" (powers of 1024). Raises PlanError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*", value.lower())
        if m:
            value = float(m.group(1)) * _UNITS[m.group(2) or ""]
        else:
            raise PlanError(f"Received memory_limit={value!r}; expected bytes as a number or a string like '512MB', "
                            f"'2GB' or '1.5GiB'.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"Received memory_limit={value!r}; expected a positive number of bytes or a string like '2GB'.")
    if int(value) < 1:
        raise PlanError(f"Received memory_limit={value!r}; expected at least one byte.")
    return int(value)


def check_rtol(rtol) -> Optional[float]:
    """`rtol` as a float (None stays None); PlanError unless it is a finite number >= 0."""
    if rtol is None:
        return None
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or rtol < 0:
        raise PlanError(f"Received rtol={rtol!r}; expected a relative error >= 0 such as 1e-5 (0: exact, i.e. "
                        f"direct only), or None.")
    return float(rtol)


def _format_bytes(n) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def estimate_workspace_bytes(impl_name: str, spec: ConvSpec, options: Optional[dict] = None) -> Optional[float]:
    """Peak working memory of one call of `impl_name` on `spec` (bytes, at spec.batch or 1), estimated from
    the implementation's cost features. It sums every large intermediate as if all were alive at once, so
    it errs high. None where it depends on a spatial size the spec leaves unknown.

    - FFT (features with fft_h/fft_w): input and output, the zero-padded real blocks that are transformed
      (4 bytes x fft_h x fft_w per forward and inverse transform), the activation spectra twice (8 bytes
      per bin and transform: the spectra and their transposed copy for the per-bin matmul), the cached
      kernel spectra (spectrum_bytes), and the weights.
    - PAC (pac_kernel_evals = batch x output pixels x taps): input and output, the padded input, the
      distances and adaptive kernel (3 values per evaluation), two taps of guidance, and the contraction:
      the tap slices, their stack and its K-scaled copy (3 x evaluations x Cin) for strategy 'patch', one
      tap's x, its scaled copy and two partial sums (pixels x (2 Cin + 2 Cout)) for 'shift', the
      (padded pixels x kh*kw*Cout) product and two sums for 'wide' (see layers/pac.py `pac_contract`).
    Checked against the growth of the process's peak RSS over one compiled call (CPU, TF 2.21): where the
    estimate is over ~50 MB, FFT and fft-tiled grew 0.5-0.6x of it, PAC 0.6-0.8x, direct 0.9x; below
    that the allocator's own overhead (10-30 MB, varying run to run) dominates.
    - anything else (direct, depthwise, implementations without such features): input + output + weights,
      what the kernel itself reads and writes.
    """
    impl = implementations.get(impl_name)
    try:
        f = impl.features(spec)
    except ValueError:  # features that need the spatial size (FFT plans) when the spec leaves it unknown
        return None
    item = max(4, _itemsize(spec.dtype))
    b = spec.batch or 1
    known = spec.height is not None and spec.width is not None
    ho, wo = spec.output_hw()
    n_in = b * (spec.height or 0) * (spec.width or 0) * spec.in_channels
    n_out = b * (ho or 0) * (wo or 0) * spec.filters
    kh, kw = spec.kernel
    weights = item * kh * kw * (spec.in_channels // spec.groups) * spec.filters
    base = item * (n_in + n_out) + weights
    if "fft_h" in f:
        if not known and f.get("tiles", 1) <= 1 and not n_in:
            return None
        transforms = f["forward_transforms"] + f["inverse_transforms"]
        return base + 4.0 * f["fft_h"] * f["fft_w"] * transforms + 16.0 * f["bins"] * transforms + f.get("spectrum_bytes", 0.0)
    if "pac_kernel_evals" in f:
        if not known:
            return None
        from .layers.pac import choose_strategy

        evals, pixels = f["pac_kernel_evals"], b * (ho or 0) * (wo or 0)
        padded = b * (spec.height + kh) * (spec.width + kw) * spec.in_channels
        strategy = (options or {}).get("strategy") or "auto"  # the user's pac= strategy, else auto's pick
        if strategy == "auto":
            strategy = choose_strategy(kh * kw, spec.in_channels, spec.filters, strides=spec.strides)
        if strategy == "patch":
            contraction = 3.0 * evals * spec.in_channels  # the tap slices, their stack, its K-scaled copy
        elif strategy == "wide":
            # the T*O-wide product per padded pixel, counted twice: measured peak RSS grew 1.5-1.7x of it
            contraction = 2.0 * padded / spec.in_channels * kh * kw * spec.filters + 2.0 * pixels * spec.filters
        else:
            contraction = pixels * (2.0 * spec.in_channels + 2.0 * spec.filters)  # a tap, its scaled copy, 2 sums
        return base + 4.0 * (3.0 * evals + padded + 2.0 * pixels * spec.in_channels + contraction)
    return float(base)


def _itemsize(dtype: str) -> int:
    name = str(dtype)
    return 8 if "64" in name else (2 if "16" in name else 4)


FLOAT32_ROUNDOFF = 2.0 ** -24
FFT_ERROR_SCALE = 5e-8
FFT_ERROR_TERMS_CAP = 13.0
"""Normwise relative error of FFT convolution vs Keras's float32 kernel <= FFT_ERROR_SCALE x log2(transform
points) x min(log2(terms per output), FFT_ERROR_TERMS_CAP): rounding grows with the transform's depth and
with the reduction length (taps x channels per group), which stops adding error beyond ~8k terms (32->32
convs at k=31 and 51 measured 5e-7..9e-7). Calibrated on 30 specs x (fft, fft-tiled) (dense, grouped and
depthwise, k 3..51, 14..224 px, 1..1024 channels per group, strides 1-2, random normal data, batch 1): the
largest measured error was 0.65x this estimate, the median 0.16x; the README's fft_vs_direct errors (4e-7
at k=3 .. 2.7e-6 at k=51 depthwise) are 0.1-0.4x it, and it stays below the float32 default tolerance 1e-5
for those specs (8.4e-6 at k=51 dense, 7.2e-6 depthwise)."""
REORDER_ERROR_FACTOR = 3.0
"""Kernels computing the same sum in another order (depthwise for a grouped Conv2D, PAC at conversion)
differ from Keras's by ~FLOAT32_ROUNDOFF x log2(terms); measured up to 0.45x of 3x that (depthwise k 3..51)."""


def estimate_rel_error(impl_name: str, spec: ConvSpec) -> float:
    """Expected normwise relative error of `impl_name` vs Keras's own layer on `spec` (float32 compute), an
    upper estimate for random data (see FFT_ERROR_SCALE and REORDER_ERROR_FACTOR for the calibration).

    direct: 0 (it is the reference). FFT (features with fft_h/fft_w): FFT_ERROR_SCALE x log2(fft_h x fft_w)
    x min(log2(taps x Cin/groups), 13). Others (depthwise, PAC at conversion): REORDER_ERROR_FACTOR x
    FLOAT32_ROUNDOFF x log2(taps x Cin/groups), a few 1e-7."""
    if impl_name == "direct":
        return 0.0
    taps = spec.effective_kernel[0] * spec.effective_kernel[1]
    terms = math.log2(max(taps * (spec.in_channels // spec.groups), 2))
    f = implementations.get(impl_name).features(spec)
    if "fft_h" in f:
        return FFT_ERROR_SCALE * math.log2(max(f["fft_h"] * f["fft_w"], 2.0)) * min(terms, FFT_ERROR_TERMS_CAP)
    return REORDER_ERROR_FACTOR * FLOAT32_ROUNDOFF * terms


def constraint_violation(impl_name: str, spec: ConvSpec, memory_limit: Optional[int] = None,
                         rtol: Optional[float] = None, options: Optional[dict] = None) -> str:
    """Why `impl_name` (built with `options`, e.g. a PAC strategy) breaks the memory limit (bytes) or
    tolerance on `spec`, or "" if it does not. `direct` never does: it is the fallback, and the reference
    the tolerance is measured against."""
    if impl_name == "direct":
        return ""
    if memory_limit is not None:
        need = estimate_workspace_bytes(impl_name, spec, options)
        if need is None:
            return "spatial size unknown, so its working memory cannot be checked against memory_limit"
        if need > memory_limit:
            return f"needs ~{_format_bytes(need)} working memory > memory_limit {_format_bytes(memory_limit)}"
    if rtol is not None:
        err = estimate_rel_error(impl_name, spec)
        if err > rtol:
            return f"expected error ~{err:.1e} > rtol {rtol:g}"
    return ""


def choose_for_spec(spec: ConvSpec, cost_model, candidates: Dict[str, str], margin: float = DIRECT_MARGIN):
    """(choice, reason, predicted ms, provenance) for one spec among `candidates` ({name: "" or why excluded}), as
    make_plan decides for a site that no PAC policy selects: the cost model's `choose` among the allowed
    candidates it predicts (pac never competes: it is chosen by policy), else the rule."""
    predicted, provenance = {}, {}
    if cost_model is not None:
        for name, why in candidates.items():
            if why:
                continue
            if hasattr(cost_model, "prediction"):  # a CostModel: the time with where it came from
                p = cost_model.prediction(name, spec)
                if p is not None:
                    predicted[name], provenance[name] = p.ms, {"source": p.source, "band": p.band}
            else:  # any object predicting milliseconds
                ms = cost_model.predict_ms(name, spec)
                if ms is not None:
                    predicted[name], provenance[name] = ms, {"source": "given", "band": None}
    speed = {k: v for k, v in predicted.items() if k != "pac"}
    if speed:
        choice, reason = choose(speed, margin)
    else:
        choice, reason = rule_based_choice(spec, candidates)
    return choice, reason, predicted, provenance


def make_plan(model_graph, cost_model=None, allow=None, pac=None, batch: int = 8, margin: float = DIRECT_MARGIN,
              memory_limit=None, rtol: Optional[float] = None) -> Plan:
    """Choose an implementation per site of a walked model.

    allow: implementation names the planner may choose (default: all registered except `pac`, which is
    only chosen where `pac` selects a site). `direct` is always allowed: it is the fallback.
    pac: {"layers": names | regex, "guidance": ..., "budget": 1.3 (optional), **PacConv2D options}; with a
    budget, as many selected sites become PAC as fit in budget x the predicted conv latency (cheapest
    overhead first), which needs a cost model.
    cost_model: an object with `predict_ms(impl_name, spec) -> float | None`; None means rule-based.
    batch: the batch size predictions (and memory estimates) are made for where the model leaves it unknown.
    memory_limit: the most working memory one convolution call may take, in bytes (int) or as a string
    like "2GB" / "1.5GiB"; candidates whose `estimate_workspace_bytes` exceeds it are excluded.
    rtol: the relative error the plan must stay within; candidates whose `estimate_rel_error` exceeds it
    are excluded (optimize verifies the result with the same rtol).
    Excluded candidates keep the reason in the row's `candidates`, and the row's reason lists them. A site
    a PAC policy names explicitly but a constraint excludes raises PlanError; a pattern just skips it.
    """
    if allow is not None:
        unknown = [a for a in allow if a not in implementations.names()]
        if unknown:
            raise PlanError(f"Unknown implementations {unknown} in allow; expected names from {implementations.names()}.")
    limit = parse_memory_limit(memory_limit)
    rtol = check_rtol(rtol)
    pac_sites, pac_options, budget, pac_pattern = _pac_policy(model_graph, pac)
    if budget is not None and cost_model is None:
        raise PlanError("pac budget needs a cost model to predict latency; pass cost_model='auto' or a profile path.")

    rows = []
    decisions = {}  # the same spec met twice is predicted (and measured) once
    for site in model_graph.sites:  # one per layer: the walk merges a layer's calls and nested paths
        spec = site.spec if site.spec.batch else site.spec.with_input(batch=batch)
        cands, constrained = {}, {}
        for name, (ok, why) in implementations.candidates(site.spec).items():
            if name == "pac" and site.path not in pac_sites:
                continue
            if allow is not None and name not in allow and name not in ("direct", "pac"):
                continue
            if ok and (limit is not None or rtol is not None):
                why = constraint_violation(name, spec, limit, rtol, pac_options if name == "pac" else None)
                if why:
                    constrained[name] = why
            cands[name] = why if (not ok or name in constrained) else ""
        left_out = ""
        if site.path in pac_sites and cands.get("pac", "missing") != "":
            if "pac" in constrained and pac_pattern:
                pac_sites = pac_sites - {site.path}
                left_out = f"; pac left out: {constrained['pac']}"
            else:
                raise PlanError(f"Site '{site.path}' ({site.spec.short()}) cannot become PAC: {cands.get('pac', 'pac is not registered')}.")
        key = (spec, tuple(sorted(cands.items())))
        if key not in decisions:
            decisions[key] = choose_for_spec(spec, cost_model, cands, margin)
        choice, reason, predicted, provenance = decisions[key]
        excluded = [f"{k} ({v})" for k, v in constrained.items() if k != "pac"]
        if excluded:
            reason += "; excluded: " + ", ".join(excluded)
        row = PlanRow(site.path, site.spec, choice, reason + left_out, cands, {}, dict(predicted), list(site.aliases),
                      {k: dict(v) for k, v in provenance.items()})
        if site.path in pac_sites and budget is None:
            row.choice, row.reason, row.options = "pac", "pac policy selected this layer", dict(pac_options)
        rows.append(row)
    plan = Plan(rows, getattr(cost_model, "name", None))
    plan.cost_model_note = getattr(cost_model, "match_note", None)
    plan.trust = getattr(cost_model, "trust", None)
    cal = getattr(cost_model, "calibration", None)
    plan.calibration = cal.to_dict() if cal is not None else None
    plan.constraints = {k: v for k, v in (("memory_limit", limit), ("rtol", rtol)) if v is not None}
    if budget is not None:
        _apply_pac_budget(plan, pac_sites, pac_options, budget)
    return plan


def _pac_policy(model_graph, pac):
    """(selected site paths, PacConv2D options, budget or None, selected by pattern?) from `pac=`."""
    if not pac:
        return set(), {}, None, False
    pac = dict(pac)
    selector = pac.pop("layers", None)
    budget = pac.pop("budget", None)
    if selector is None:
        raise PlanError("pac= needs 'layers': a list of layer names or a regex; none was given.")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget < 1):
        raise PlanError(f"Received pac budget={budget!r}; expected a latency factor >= 1 (e.g. 1.3).")
    if isinstance(selector, str) and not model_graph.find_sites([selector]):
        selector = re.compile(selector)
    paths = [s.path for s in model_graph.sites]
    if isinstance(selector, re.Pattern):
        # A pattern selects the sites PAC can replace among those it matches (".*" means "every Conv2D").
        found = [s for s in model_graph.find_sites(selector) if implementations.get("pac").applicable(s.spec)[0]]
        if not found:
            raise PlanError(f"pac layers {selector.pattern!r} match no Conv2D site PAC can replace; expected names "
                            f"or a regex matching some of {paths}.")
    else:
        selector = [selector] if isinstance(selector, str) else list(selector)  # one name, not its letters
        unknown = [item for item in selector if not isinstance(item, re.Pattern) and not model_graph.find_sites([item])]
        if unknown:  # a misspelt name must not silently leave a layer unconverted
            raise PlanError(f"pac layers {unknown} name no conv site; expected names from {paths}.")
        found = model_graph.find_sites(selector)
    return {s.path for s in found}, pac, budget, isinstance(selector, re.Pattern)


def _apply_pac_budget(plan: Plan, pac_sites, pac_options, budget: float):
    """Convert selected sites to PAC, cheapest predicted overhead first, while the total stays in budget."""
    base = sum(r.predicted_ms.get(r.choice, 0.0) for r in plan.rows)
    limit = budget * base
    total = base
    options = []
    for r in plan.rows:
        if r.site in pac_sites:
            if "pac" not in r.predicted_ms:
                raise PlanError(f"No predicted PAC time for site '{r.site}'; the cost model has no 'pac' measurements (re-profile).")
            options.append((r.predicted_ms["pac"] - r.predicted_ms.get(r.choice, 0.0), r))
    for overhead, r in sorted(options, key=lambda t: t[0]):
        if total + overhead <= limit:
            total += overhead
            r.choice, r.options = "pac", dict(pac_options)
            r.reason = f"pac within budget (+{overhead:.3g} ms)"
        else:
            r.reason = f"pac left out: +{overhead:.3g} ms would exceed the {budget:g}x budget"
    plan.pac_overhead = total / base if base else 1.0
