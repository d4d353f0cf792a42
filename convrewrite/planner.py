"""Plan: which implementation each convolution site gets, and why.

A plan is made from a walked model (`ModelGraph`) by a chooser. Without a cost model the chooser is a
rule: `depthwise` where it applies (a grouped Conv2D with one channel per group runs 10-25x faster through
the depthwise kernel on CPU), else `direct`. With a cost model it picks the lowest predicted time.
Users may edit a plan by hand (`plan.force("conv3", "direct")`) before applying it.
"""

from __future__ import annotations

import dataclasses
import json
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
            tail += f"; predicted conv time {total[0]:.3g} ms -> {total[1]:.3g} ms ({total[0] / total[1]:.2f}x)"
        if self.pac_overhead is not None:
            tail += f"; PAC overhead {self.pac_overhead:.2f}x predicted"
        if self.cost_model_name:
            tail += f"; cost model: {self.cost_model_name}"
        return "\n".join(out + [tail])

    def predicted_total(self):
        """(all-direct ms, chosen ms) summed over sites, or None if any site lacks a prediction."""
        if not self.rows or any("direct" not in r.predicted_ms or r.choice not in r.predicted_ms for r in self.rows):
            return None
        return sum(r.predicted_ms["direct"] for r in self.rows), sum(r.predicted_ms[r.choice] for r in self.rows)

    def to_dict(self):
        return {"cost_model": self.cost_model_name, "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d):
        return cls([PlanRow.from_dict(r) for r in d["rows"]], d.get("cost_model"))

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


def _choose(predicted_ms: Dict[str, float], margin: float = DIRECT_MARGIN):
    """(choice, reason): the first implementation in registry order within `margin` of the fastest."""
    fastest = min(predicted_ms, key=predicted_ms.get)
    for name in implementations.names():
        if name in predicted_ms and predicted_ms[name] <= margin * predicted_ms[fastest]:
            if name == fastest:
                return name, "lowest predicted time"
            return name, f"within {margin:g}x of {fastest}'s predicted time, and simpler"
    return fastest, "lowest predicted time"


def make_plan(model_graph, cost_model=None, allow=None, pac=None, batch: int = 8, margin: float = DIRECT_MARGIN) -> Plan:
    """Choose an implementation per site of a walked model.

    allow: implementation names the planner may choose (default: all registered except `pac`, which is
    only chosen where `pac` selects a site). `direct` is always allowed: it is the fallback.
    pac: {"layers": names | regex, "guidance": ..., "budget": 1.3 (optional), **PacConv2D options}; with a
    budget, as many selected sites become PAC as fit in budget x the predicted conv latency (cheapest
    overhead first), which needs a cost model.
    cost_model: an object with `predict_ms(impl_name, spec) -> float | None`; None means rule-based.
    batch: the batch size predictions are made for where the model leaves it unknown.
    """
    if allow is not None:
        unknown = [a for a in allow if a not in implementations.names()]
        if unknown:
            raise PlanError(f"Unknown implementations {unknown} in allow; expected names from {implementations.names()}.")
    pac_sites, pac_options, budget = _pac_policy(model_graph, pac)
    if budget is not None and cost_model is None:
        raise PlanError("pac budget needs a cost model to predict latency; pass cost_model='auto' or a profile path.")

    rows = []
    predictions = {}  # the same spec met twice is predicted (and measured) once
    for site in _unique_sites(model_graph.sites):
        cands = {}
        for name, (ok, why) in implementations.candidates(site.spec).items():
            if name == "pac" and site.path not in pac_sites:
                continue
            if allow is not None and name not in allow and name not in ("direct", "pac"):
                continue
            cands[name] = "" if ok else why
        if site.path in pac_sites and cands.get("pac", "missing") != "":
            raise PlanError(f"Site '{site.path}' ({site.spec.short()}) cannot become PAC: {cands.get('pac', 'pac is not registered')}.")
        predicted = {}
        if cost_model is not None:
            spec = site.spec if site.spec.batch else site.spec.with_input(batch=batch)
            if spec not in predictions:
                predictions[spec] = {n: cost_model.predict_ms(n, spec) for n, why in cands.items() if why == ""}
            predicted = {k: v for k, v in predictions[spec].items() if v is not None}
        speed = {k: v for k, v in predicted.items() if k != "pac"}
        if speed:
            choice, reason = _choose(speed, margin)
        else:
            choice, reason = rule_based_choice(site.spec, cands)
        row = PlanRow(site.path, site.spec, choice, reason, cands, {}, predicted, list(site.aliases))
        if site.path in pac_sites and budget is None:
            row.choice, row.reason, row.options = "pac", "pac policy selected this layer", dict(pac_options)
        rows.append(row)
    plan = Plan(rows, getattr(cost_model, "name", None))
    if budget is not None:
        _apply_pac_budget(plan, pac_sites, pac_options, budget)
    return plan


def _pac_policy(model_graph, pac):
    """(selected site paths, PacConv2D options, budget or None) from the user's `pac=` dict."""
    if not pac:
        return set(), {}, None
    pac = dict(pac)
    selector = pac.pop("layers", None)
    budget = pac.pop("budget", None)
    if selector is None:
        raise PlanError("pac= needs 'layers': a list of layer names or a regex; none was given.")
    if budget is not None and (not isinstance(budget, (int, float)) or budget < 1):
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
        selector = list(selector)
        unknown = [item for item in selector if not isinstance(item, re.Pattern) and not model_graph.find_sites([item])]
        if unknown:  # a misspelt name must not silently leave a layer unconverted
            raise PlanError(f"pac layers {unknown} name no conv site; expected names from {paths}.")
        found = model_graph.find_sites(selector)
    return {s.path for s in found}, pac, budget


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


def _unique_sites(sites):
    seen = set()
    for s in sites:
        if id(s.layer) not in seen:
            seen.add(id(s.layer))
            yield s
