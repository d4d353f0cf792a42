"""The public entry points: plan, optimize, verify."""

from __future__ import annotations

import copy

from . import cost, implementations
from .errors import VerificationError
from .graph import walk
from .planner import Plan, check_rtol, make_plan, parse_memory_limit
from .spec import keras_class
from .verify import VerificationReport, verify as _verify


def _resolve_cost_model(cost_model):
    """None/'rules' -> rule-based; a CostModel or a path -> that; 'auto' -> the profile for this device."""
    if cost_model is None or (isinstance(cost_model, str) and cost_model == "rules"):
        return None
    return cost.resolve(cost_model)


def plan(model, cost_model="auto", allow=None, pac=None, batch: int = 8, memory_limit=None, rtol=None) -> Plan:
    """Decide an implementation for every conv site of `model` (nothing is built).

    cost_model: "auto" (the profile shipped or measured for this device), a path to a profile JSON, a
    CostModel, or None for the rule-based chooser. allow: names the planner may pick from.
    pac: {"layers": [names] | regex, "guidance": "self" | input/layer name, "budget": 1.3 (optional),
    **PacConv2D options}. batch: the batch size predictions are for where the model leaves it unknown.
    memory_limit: the most working memory one conv call may take: bytes (int) or a string like "2GB" or
    "1.5GiB"; implementations estimated above it (planner.estimate_workspace_bytes) are not chosen.
    rtol: relative error bound; implementations whose expected error (planner.estimate_rel_error) exceeds
    it are not chosen. `direct` is always allowed.
    """
    return make_plan(walk(model), _resolve_cost_model(cost_model), allow=allow, pac=pac, batch=batch,
                     memory_limit=memory_limit, rtol=rtol)


def build(model, plan: Plan):
    """Rebuild `model` as `plan` says, without verification. The original is left untouched."""
    graph = walk(model)
    rows = {path: r for r in plan for path in [r.site, *r.aliases]}

    def substitute(site):
        row = rows.get(site.path)
        if row is None:
            return None
        if row.choice == "direct":
            # Keras's own layer stays as it is; a replacement layer (re-planning an optimized model) goes back
            return None if type(site.layer) is keras_class(site.layer) else (implementations.get("direct"), {})
        return implementations.get(row.choice), dict(row.options)

    return graph.rebuild(substitute)


def optimize(model, plan: Plan = None, cost_model="auto", allow=None, pac=None, verify=True, inputs=None,
             rtol=None, measure=False, batch: int = 8, memory_limit=None):
    """A new keras.Model computing what `model` computes, each convolution in its fastest implementation.

    Verifies by default: any site whose replacement differs from the original beyond tolerance falls back
    to `direct` (recorded in the report), and if the model still differs a VerificationError is raised.
    The returned model carries `convrewrite_plan` and `convrewrite_report` attributes.
    rtol: the relative error allowed, per site and end to end (default: by compute dtype, 1e-5 for
    float32); given, it also constrains the plan: implementations expected to exceed it are not chosen.
    memory_limit: the most working memory one conv call may take (bytes, or "2GB" / "1.5GiB"); see plan().
    Both constrain only a plan made here, not a `plan` given.
    measure: time the candidates on this model's real shapes at `batch` on this device (tactic timing),
    keyed by this device's fingerprint and cached: in the profile file if you named one, else (auto or a
    shipped profile) in the user cache (~/.cache/convrewrite/tactics/); the next call reuses them.
    Implementations excluded by memory_limit are not timed.
    """
    parse_memory_limit(memory_limit), check_rtol(rtol)  # bad values fail before any measuring
    if plan is not None:
        plan = copy.deepcopy(plan)  # fallbacks edit the plan; the caller's stays as given
    else:
        graph = walk(model)
        cm = _resolve_cost_model(cost_model)
        if measure:
            cm = cm or cost.resolve("auto")
            cm.measure_specs([s.spec for s in graph.all_sites()], allow=allow, batch=batch, memory_limit=memory_limit)
        plan = make_plan(graph, cm, allow=allow, pac=pac, batch=batch, memory_limit=memory_limit, rtol=rtol)
    new = build(model, plan)
    report = None
    if verify:
        report = _verify(model, new, inputs=inputs, rtol=rtol, plan=plan)
        failing = [s for s in report.failing_sites if plan.row(s).choice != "direct"]
        if failing:
            fallbacks = []
            for site in failing:
                row = plan.row(site)
                check = next(c for c in report.sites if c.name == site)
                fallbacks.append({"site": site, "from": row.choice, "to": "direct",
                                  "why": f"rel error {check.rel_error:.2e} > {check.tolerance:.0e}"})
                plan.force(site, "direct", reason=f"fell back from {row.choice}: verification failed")
            new = build(model, plan)
            report = _verify(model, new, inputs=inputs, rtol=rtol, plan=plan)
            report.fallbacks = fallbacks
        if not report.passed:
            raise VerificationError(_failure_message(model, report), report=report)
    new.convrewrite_plan = plan
    new.convrewrite_report = report
    return new


def _failure_message(model, report) -> str:
    """One sentence on what failed and what was (or was not) done about it, then the report's table."""
    failing = [c.name for c in report.checks if not c.passed]
    if report.fallbacks:
        done = (f"even after falling back to direct at {[f['site'] for f in report.fallbacks]}")
    elif report.failing_sites:
        done = "and no site fell back, since every failing site already runs Keras's own layer (direct)"
    else:
        done = ("and no site fell back, since every per-site check passed (the difference only shows end "
                "to end)")
    nonfinite = [c.name for c in report.checks if c.nonfinite_mismatches]
    detail = f" (NaN/Inf pattern differs at {nonfinite})" if nonfinite else ""
    return (f"Optimized model '{model.name}' differs from the original beyond tolerance at {failing}{detail} "
            f"{done}; the original is unchanged.\n" + report.summary())


def verify(original, new, inputs=None, rtol=None, sites=True, seed=0) -> VerificationReport:
    """Compare `new` with `original`: per output end to end and per conv site (see convrewrite.verify)."""
    return _verify(original, new, inputs=inputs, rtol=rtol, sites=sites, seed=seed, plan=getattr(new, "convrewrite_plan", None))
