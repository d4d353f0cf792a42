"""Plan: which implementation each convolution site gets, and why.

A plan is made from a walked model (`ModelGraph`) by a chooser. Without a cost model the chooser is a
rule: `depthwise` where it applies (a grouped Conv2D with one channel per group runs 10-25x faster through
the depthwise kernel on CPU), else `direct`. With a cost model it picks the lowest predicted time.
Users may edit a plan by hand (`plan.force("conv3", "direct")`) before applying it.

Constraints (`make_plan(..., allow=, memory_limit=, rtol=, policies=)`) remove candidates before the choice;
each removed candidate keeps its reason in `PlanRow.candidates`, and the row's reason names it. The
working-memory and error estimates they use are `estimate_workspace_bytes` and `estimate_rel_error`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Dict, List, Optional

from . import device, implementations
from .choice import DIRECT_MARGIN, choose  # noqa: F401  (re-exported: the planner's rule)
from .cost import Prediction, predict
from .errors import PlanError
from .rewrite.record import Rewrite, by_site
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
    # every distinct call's spec at the planned batch (a layer shared at several input sizes has several)
    specs: List[ConvSpec] = dataclasses.field(default_factory=list)

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
            "specs": [s.to_dict() for s in self.specs],
        }

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["spec"] = ConvSpec.from_dict(d["spec"])
        d["specs"] = [ConvSpec.from_dict(s) for s in d.get("specs", [])]
        return cls(**d)


class Plan:
    """An ordered list of PlanRows, one per conv site, editable with `force`."""

    def __init__(self, rows: List[PlanRow], cost_model_name: Optional[str] = None):
        self.rows = list(rows)
        self.cost_model_name = cost_model_name
        self.policy_overhead: Dict[str, float] = {}  # {impl: predicted conv latency with it / without}, under a budget
        self.cost_model_note: Optional[str] = None  # set where the profile was measured on another device
        self.trust: Optional[str] = None  # the profile's trust on the planned device (cost.TRUST_LEVELS)
        self.calibration: Optional[dict] = None  # the profile's calibration here, where it was calibrated
        self.constraints: Dict[str, object] = {}  # {"memory_limit": bytes, "rtol": float} as planned with
        self.target_fingerprint: Optional[dict] = None  # the device planned for (None: this one)
        self.mode: Optional[str] = None  # "inference": the graph was rewritten before planning; "training": not
        self.rewrites: List[dict] = []  # rewrite.Rewrite.to_dict() per rewrite applied, in order
        self.prediction_note: Optional[str] = None  # mode="training": whether predictions are forward+backward

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

        Raises PlanError if the implementation is unknown, does not apply to the site at one of the sizes it is
        called with, or breaks the limits the plan was made with there (checked at the planned batch)."""
        rows = [r for r in self.rows if name.fullmatch(r.site)] if isinstance(name, re.Pattern) else [self.row(name)]
        if not rows:
            raise PlanError(f"Pattern {name.pattern!r} matches no conv site; expected one of {[r.site for r in self.rows]}.")
        impl = implementations.get(implementation)
        ok, why = impl.runs_on(self.target_fingerprint or device.fingerprint())
        if not ok:
            raise PlanError(f"Implementation {implementation!r} cannot run on the device this plan is for: {why}.")
        for row in rows:
            for spec in row.specs or [row.spec]:
                ok, why = impl.applicable(spec)
                if not ok:
                    raise PlanError(f"Implementation {implementation!r} does not apply to site '{row.site}' "
                                    f"({spec.short()}): {why}.")
                why = constraint_violation(implementation, spec, self.constraints.get("memory_limit"),
                                           self.constraints.get("rtol"), options)
                if why:  # the summary states the plan's limits: a forced choice must keep them
                    raise PlanError(f"Implementation {implementation!r} at site '{row.site}' ({spec.short()}) {why}; "
                                    f"expected a choice within the limits this plan was made with (plan again "
                                    f"without them to force it).")
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
        for name, overhead in self.policy_overhead.items():
            tail += f"; {implementations.get(name).label} overhead {overhead:.2f}x predicted"
        if self.constraints.get("memory_limit") is not None:
            tail += f"; memory limit {_format_bytes(self.constraints['memory_limit'])}"
        if self.constraints.get("rtol") is not None:
            tail += f"; rtol {self.constraints['rtol']:g}"
        if self.prediction_note:
            tail += f"; {self.prediction_note}"
        if self.cost_model_name:
            tail += f"; cost model: {self.cost_model_name}"
            if self.cost_model_note:
                tail += f" ({self.cost_model_note})"
        return "\n".join(out + [tail] + self._rewrite_lines())

    def _rewrite_lines(self) -> List[str]:
        """What the rewrite stage did before planning: counts per kind, then one line per rewritten site."""
        if not self.rewrites:
            return []
        counts: Dict[str, int] = {}
        for r in self.rewrites:
            counts[r["kind"]] = counts.get(r["kind"], 0) + 1
        labels = {"fold_bn": "BatchNormalization folded", "merge_branches": "parallel-branch blocks merged",
                  "fuse_activation": "activations fused"}
        lines = [f"rewritten before planning (mode={self.mode}): "
                 + ", ".join(f"{n} {labels.get(k, k)}" for k, n in counts.items())]
        combined = by_site([Rewrite.from_dict(r) for r in self.rewrites])  # one line per resulting site
        return lines + [f"  {r.site} <- {' + '.join(r.before)}" for r in combined]

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
                "policy_overhead": dict(self.policy_overhead), "constraints": dict(self.constraints),
                "mode": self.mode, "rewrites": [dict(r) for r in self.rewrites],
                "prediction_note": self.prediction_note,
                "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d):
        plan = cls([PlanRow.from_dict(r) for r in d["rows"]], d.get("cost_model"))
        plan.cost_model_note = d.get("cost_model_note")
        plan.trust, plan.calibration = d.get("trust"), d.get("calibration")
        plan.policy_overhead = dict(d.get("policy_overhead") or {})
        plan.constraints = dict(d.get("constraints") or {})
        plan.mode = d.get("mode")
        plan.rewrites = [dict(r) for r in d.get("rewrites") or []]
        plan.prediction_note = d.get("prediction_note")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __repr__(self):
        return f"<Plan {len(self.rows)} sites: {self.choices()}>"


def rule_based_choice(spec: ConvSpec, applicable: Dict[str, str]):
    """(choice, reason) without measurements: the simplest implementation that applies and that runs faster
    than Keras's own layer wherever it applies (`Implementation.rule`), else direct."""
    for name in implementations.names():
        rule = implementations.get(name).rule
        if rule and applicable.get(name) == "":
            return name, f"rule: {rule}"
    return "direct", "rule: Keras's own kernel"


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
    """Peak working memory of one call of `impl_name` on `spec` built with `options` (bytes, at spec.batch
    or 1), as the implementation estimates it (`Implementation.workspace_bytes`); None where it depends on
    a spatial size the spec leaves unknown."""
    return implementations.get(impl_name).workspace_bytes(spec, options or {})


def estimate_rel_error(impl_name: str, spec: ConvSpec) -> float:
    """Expected normwise relative error of `impl_name` vs Keras's own layer on `spec` (float32 compute), as
    the implementation estimates it (`Implementation.expected_error`)."""
    return implementations.get(impl_name).expected_error(spec)


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
    make_plan decides for a site that no policy selects: the cost model's `choose` among the allowed
    candidates it predicts (implementations chosen by policy never compete), else the rule."""
    predicted, provenance = {}, {}
    if cost_model is not None:
        for name, why in candidates.items():
            p = None if why else predict(cost_model, name, spec)
            if p is not None:
                predicted[name], provenance[name] = p.ms, {"source": p.source, "band": p.band}
    speed = {k: v for k, v in predicted.items() if implementations.get(k).chosen_for_speed}
    if speed:
        choice, reason = choose(speed, margin)
    else:
        choice, reason = rule_based_choice(spec, candidates)
    return choice, reason, predicted, provenance


def make_plan(model_graph, cost_model=None, allow=None, policies=None, batch: int = 8, margin: float = DIRECT_MARGIN,
              memory_limit=None, rtol: Optional[float] = None) -> Plan:
    """Choose an implementation per site of a walked model.

    allow: implementation names the planner may choose for speed (default: all registered that are
    `chosen_for_speed`). `direct` is always allowed: it is the fallback.
    policies: {implementation name: policy} for implementations chosen by a user policy (e.g. PAC's
    {"layers": names | regex, "guidance": ..., "budget": 1.3 (optional), **options}; see the
    implementation's `select_sites`); with a budget, as many selected sites take it as fit in budget x the
    predicted conv latency (cheapest overhead first), which needs a cost model.
    cost_model: a CostModel (predictions with provenance) or any object with `predict_ms(impl_name, spec)
    -> float | None`; None means rule-based.
    batch: the batch size predictions (and memory estimates) are made for where the model leaves it unknown.
    memory_limit: the most working memory one convolution call may take, in bytes (int) or as a string
    like "2GB" / "1.5GiB"; candidates whose `estimate_workspace_bytes` exceeds it are excluded.
    rtol: the relative error the plan must stay within; candidates whose `estimate_rel_error` exceeds it
    are excluded (optimize verifies the result with the same rtol).
    Excluded candidates keep the reason in the row's `candidates`, and the row's reason lists them. A site
    a policy names explicitly but a constraint excludes raises PlanError; a pattern just skips it.
    """
    _check_allow(allow)
    limit, rtol = parse_memory_limit(memory_limit), check_rtol(rtol)
    selected = _select_policy_sites(model_graph, policies or {}, cost_model)
    target = target_fingerprint(cost_model)
    rows, decisions = [], {}  # the same spec met twice is predicted (and measured) once
    for site in model_graph.sites:  # one per layer: the walk merges a layer's calls and nested paths
        # a layer shared at several input sizes: every size must allow the choice, and predictions add up
        specs = [s if s.batch else s.with_input(batch=batch) for s in getattr(site, "specs", None) or [site.spec]]
        cands, constrained = _site_candidates(site, specs, allow, selected, limit, rtol, target)
        left_out = _drop_excluded_policy_sites(site, cands, constrained, selected)
        key = (tuple(specs), tuple(sorted(cands.items())))
        if key not in decisions:
            model = cost_model if len(specs) == 1 or cost_model is None else _AllCalls(cost_model, specs)
            decisions[key] = choose_for_spec(specs[0], model, cands, margin)
        choice, reason, predicted, provenance = decisions[key]
        excluded = [f"{k} ({v})" for k, v in constrained.items() if implementations.get(k).chosen_for_speed]
        if excluded:
            reason += "; excluded: " + ", ".join(excluded)
        row = PlanRow(site.path, site.spec, choice, reason + left_out, cands, {}, dict(predicted), list(site.aliases),
                      {k: dict(v) for k, v in provenance.items()}, list(specs))
        for name, policy in selected.items():
            if site.path in policy.sites and policy.budget is None:
                row.choice, row.reason, row.options = name, f"{name} policy selected this layer", dict(policy.options)
        rows.append(row)
    plan = _new_plan(rows, cost_model, limit, rtol)
    plan.target_fingerprint = target
    for name, policy in selected.items():
        if policy.budget is not None:
            _apply_budget(plan, name, policy)
    return plan


def _check_allow(allow):
    if allow is not None:
        unknown = [a for a in allow if a not in implementations.names()]
        if unknown:
            raise PlanError(f"Unknown implementations {unknown} in allow; expected names from {implementations.names()}.")


def _select_policy_sites(model_graph, policies: dict, cost_model) -> Dict[str, "implementations.SitePolicy"]:
    """{implementation name: SitePolicy} for every policy given (an empty or None policy selects nothing)."""
    selected = {}
    for name, policy in policies.items():
        if not policy:
            continue
        impl = implementations.get(name)
        chosen = impl.select_sites(model_graph, policy)
        if chosen.budget is not None and cost_model is None:
            raise PlanError(f"{impl.policy_keyword or name} budget needs a cost model to predict latency; pass "
                            f"cost_model='auto' or a profile path.")
        selected[name] = chosen
    return selected


def target_fingerprint(cost_model) -> dict:
    """The fingerprint of the device a plan is for: the profile's device where the plan is made for another
    one (an unverified profile: target "other"), else this device."""
    if getattr(cost_model, "trust", None) == "unverified" and getattr(cost_model, "fingerprint", None):
        return cost_model.fingerprint
    return device.fingerprint()


def _site_candidates(site, specs, allow, selected, limit, rtol, target):
    """({name: "" or why not}, {name: why a constraint excludes it}) for one site, called at `specs` (one
    per distinct input size): a candidate must apply (on the `target` device's fingerprint) and meet the
    constraints at every one. Implementations chosen by policy are candidates only where their policy
    selected the site."""
    cands, constrained = {}, {}
    for name, (ok, why) in implementations.candidates(site.spec).items():
        impl = implementations.get(name)
        if getattr(site, "kept", "") and name != "direct":
            ok, why = False, site.kept  # e.g. a conv held in a layer that cannot be copied
        if not impl.chosen_for_speed and site.path not in selected.get(name, _NO_POLICY).sites:
            continue
        if allow is not None and impl.chosen_for_speed and name not in allow and name != "direct":
            continue
        for other in specs[1:]:
            if ok:
                ok, why = impl.applicable(other)
                why = why if ok else f"at the call on {other.short()}: {why}"
        if ok:
            ok, why = impl.runs_on(target)
        if ok and impl.precision != "float32" and rtol is None:  # noted in candidates, not in every reason
            cands[name] = (f"computes in {impl.precision}: only under an error budget (rtol); the float32 "
                           f"default tolerance admits no lower precision")
            continue
        if ok and (limit is not None or rtol is not None):
            options = selected[name].options if name in selected else None
            for each in specs:
                why = why or constraint_violation(name, each, limit, rtol, options)
            if why:
                constrained[name] = why
        cands[name] = why if (not ok or name in constrained) else ""
    return cands, constrained


def _drop_excluded_policy_sites(site, cands, constrained, selected) -> str:
    """A policy-selected site its implementation cannot take: skipped (with a note for the row's reason)
    where a pattern selected it and a constraint excludes it, else a PlanError."""
    note = ""
    for name, policy in selected.items():
        if site.path not in policy.sites or cands.get(name, "missing") == "":
            continue
        if name in constrained and policy.by_pattern:
            policy.sites = policy.sites - {site.path}
            note += f"; {name} left out: {constrained[name]}"
        else:
            label = implementations.get(name).label
            raise PlanError(f"Site '{site.path}' ({site.spec.short()}) cannot become {label}: "
                            f"{cands.get(name, f'{name} is not registered')}.")
    return note


def _new_plan(rows, cost_model, limit, rtol) -> Plan:
    plan = Plan(rows, getattr(cost_model, "name", None))
    plan.cost_model_note = getattr(cost_model, "match_note", None)
    plan.trust = getattr(cost_model, "trust", None)
    cal = getattr(cost_model, "calibration", None)
    plan.calibration = cal.to_dict() if cal is not None else None
    plan.constraints = {k: v for k, v in (("memory_limit", limit), ("rtol", rtol)) if v is not None}
    return plan


def _apply_budget(plan: Plan, name: str, policy):
    """Give selected sites to `name`, cheapest predicted overhead first, while the total stays in budget."""
    base = sum(r.predicted_ms.get(r.choice, 0.0) for r in plan.rows)
    limit, total, options = policy.budget * base, base, []
    for r in plan.rows:
        if r.site in policy.sites:
            if name not in r.predicted_ms:
                raise PlanError(f"No predicted {implementations.get(name).label} time for site '{r.site}'; the cost "
                                f"model has no {name!r} measurements (re-profile).")
            options.append((r.predicted_ms[name] - r.predicted_ms.get(r.choice, 0.0), r))
    for overhead, r in sorted(options, key=lambda t: t[0]):
        if total + overhead <= limit:
            total += overhead
            r.choice, r.options = name, dict(policy.options)
            r.reason = f"{name} within budget (+{overhead:.3g} ms)"
        else:
            r.reason = f"{name} left out: +{overhead:.3g} ms would exceed the {policy.budget:g}x budget"
    plan.policy_overhead[name] = total / base if base else 1.0


class _AllCalls:
    """A cost model predicting one site's calls at all its input sizes: the sum over `specs` (None if any
    is unknown), whatever spec it is asked about; the band is the widest of the calls'."""

    def __init__(self, cost_model, specs):
        self.cost_model, self.specs = cost_model, specs

    def prediction(self, impl_name, spec):
        parts = [predict(self.cost_model, impl_name, s) for s in self.specs]
        if any(p is None for p in parts):
            return None
        bands = [p.band for p in parts]
        return Prediction(float(sum(p.ms for p in parts)), parts[0].source,
                          None if any(b is None for b in bands) else max(bands))


class _NoPolicy:
    sites = frozenset()


_NO_POLICY = _NoPolicy()
