"""The public entry points: plan, optimize, verify."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings

from . import implementations, keras_internals, profiles, rewrite, training_cost
from . import speed as speed_check
from .cost import FORWARD_BACKWARD, TIMING_BAND, Prediction, predict
from .errors import PlanError, UnsupportedModelError, VerificationError
from .graph import walk
from .model_class import keeps_class
from .planner import Plan, check_rtol, constraint_violation, make_plan, parse_memory_limit
from . import profile as profiling
from .spec import keras_class
from .verify import VerificationReport, verify as _verify
from .weights import RewrittenModel, keep_weight_layout, weight_layout

MODES = ("inference", "training")
"""inference: rewrite the graph first (fold BN, merge parallel branches, fuse activations: see
convrewrite.rewrite), exact at training=False only; training: plan the graph as it is."""

TRAINING_TIMED = "timed here" + FORWARD_BACKWARD
"""The prediction source of optimize(mode="training", measure=True)'s timings."""

SPEED_CHECK_ENV = "CONVREWRITE_CHECK_SPEED"
"""Set to "0" to make check_speed=None mean off (the test suite does, except where it tests the check)."""


def _resolve_cost_model(cost_model, target="auto"):
    """None/'rules' -> rule-based; a CostModel or a path -> that; 'auto' -> the profile for this device."""
    if cost_model is None or (isinstance(cost_model, str) and cost_model == "rules"):
        return None
    return profiles.resolve(cost_model, target=target)


def plan(model, cost_model="auto", allow=None, pac=None, batch: int = 8, memory_limit=None, rtol=None,
         target: str = "auto", mode: str = "inference") -> Plan:
    """Decide an implementation for every conv site of `model` (nothing is built).

    Args:
        model: a Keras model (Sequential, Functional, nested).
        cost_model: "auto" (this device's profile: exact, calibrated here, or measured now), a path to a
            profile JSON, a CostModel, or None / "rules" for the rule-based chooser.
        allow: implementation names the planner may pick from (`direct` is always allowed).
        pac: {"layers": [names] | regex, "guidance": "self" | input/layer name, "budget": 1.3 (optional),
            **PacConv2D options}.
        batch: the batch size predictions are for where the model leaves it unknown.
        memory_limit: the most working memory one conv call may take: bytes (int) or "2GB" / "1.5GiB";
            implementations estimated above it (planner.estimate_workspace_bytes) are not chosen.
        rtol: relative error bound; implementations whose expected error exceeds it are not chosen.
        target: the device the plan is for: "here", "other" (converting offline for another device: nothing
            is timed here) or "auto" (here, unless the profile is of another machine class).
        mode: "inference" (default): plan the model as the rewrite stage leaves it (BatchNormalization folded
            into convs, parallel branches merged, activations fused; `plan.rewrites` lists them); "training":
            plan the model as it is, by forward + backward predictions where the profile has them
            (`convrewrite profile --training`; `plan.prediction_note` says which were used).

    Returns:
        A Plan: one row per conv site with its candidates' predicted ms, each prediction's source and error
        band, the choice and why; `plan.summary()` ends with the predicted speedup and its band.

    Raises:
        PlanError: an unknown implementation, a bad pac= or constraint.
        ProfileError: the named profile is missing or corrupt.

    Example:
        >>> p = convrewrite.plan(keras.applications.ConvNeXtTiny(weights=None))
        >>> print(p.summary())
    """
    source, rewrites = rewritten(model, mode)
    cm, note = training_cost.for_mode(_resolve_cost_model(cost_model, target), mode)
    made = make_plan(walk(source), cm, allow=allow, policies=_policies(pac=pac),
                     batch=batch, memory_limit=memory_limit, rtol=rtol)
    made.mode, made.rewrites, made.prediction_note = mode, rewrites, note
    return made


def rewritten(model, mode: str = "inference"):
    """(the model the planner sees, [Rewrite dicts]): `model` rewritten by the rewrite stage for
    mode="inference", `model` itself for mode="training".

    Raises PlanError for any other mode."""
    if check_mode(mode) == "training":
        return model, []
    source, records = rewrite.apply(model)
    return source, [r.to_dict() for r in records]


def check_mode(mode: str) -> str:
    """`mode` if it is one of MODES, else PlanError."""
    if mode not in MODES:
        raise PlanError(f"Received mode={mode!r}; expected 'inference' (fold BatchNormalization, merge parallel "
                        f"branches, fuse activations before planning) or 'training' (keep the graph as it is).")
    return mode


def _source(model, plan: Plan):
    """The model `plan` was made on: `model` rewritten again where the plan lists rewrites (deterministic)."""
    return rewrite.apply(model)[0] if plan.rewrites else model


def _policies(**given) -> dict:
    """{implementation name: policy} from the keyword arguments that select sites for an implementation
    (`pac=` for PAC: see Implementation.policy_keyword)."""
    by_keyword = implementations.policy_implementations()
    unknown = [k for k, v in given.items() if v and k not in by_keyword]
    if unknown:
        raise PlanError(f"Received {unknown[0]}=...; no registered implementation takes that policy (expected one of "
                        f"{sorted(by_keyword)}).")
    return {by_keyword[k].name: v for k, v in given.items() if v and k in by_keyword}


def build(model, plan: Plan):
    """Rebuild `model` as `plan` says (after the rewrites it lists), without verification. The original is
    left untouched."""
    return _build(_source(model, plan), plan)


def _build(model, plan: Plan):
    """Rebuild `model`, the model `plan` was made on, as `plan` says."""
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

    # the optimized model reads and writes the weight files of the model planned (the original, unless the
    # rewrite stage folded or merged layers: then their weights are not the original's anyway)
    layout = weight_layout(model)

    def model_class(**kwargs):
        return RewrittenModel(convrewrite_weight_layout=layout, **kwargs)

    new = graph.rebuild(substitute, model_class=model_class)
    if keeps_class(new):  # the original's own class: its config rebuilds it from constructor arguments
        keep_weight_layout(new, layout)
        keras_internals.set_build_state(new, PLAN_STATE, {"plan": plan.to_dict(),
                                                          "sites": [s.path for s in graph.all_sites()]})
    return new


PLAN_STATE = "convrewrite_plan"
"""Key of the plan a `.keras` file of an optimized model of the user's own Functional class carries (in its build
config), so that loading applies it again: the class's config rebuilds the plain model from constructor
arguments, and the file's weights are laid out for the optimized one."""


def _apply_saved_plan(model, state):
    """On loading a `.keras` file: `model` as Keras rebuilt it from its class's config (plain layers, weights not
    read yet) rebuilt as the saved plan says, for the file's weights to fill.

    Sites are matched by position, not by path: a class may name its layers after the model (keras_hub's
    DINOV2 names them "<model name>_embeddings" when its config carries the name), so the paths the plan
    was made with need not exist in the loaded model."""
    plan = Plan.from_dict(state["plan"])
    source = _source(model, plan)
    sites = walk(source).all_sites()
    saved = list(state["sites"])
    rows = {r.site: r for r in plan}
    mismatch = len(sites) != len(saved) or any(
        path in rows and (rows[path].spec.kind, rows[path].spec.kernel, rows[path].spec.filters)
        != (site.spec.kind, site.spec.kernel, site.spec.filters) for path, site in zip(saved, sites))
    if mismatch:
        raise UnsupportedModelError(
            f"Model '{model.name}' ({type(model).__name__}) loaded from its config has {len(sites)} conv sites that "
            f"do not match the {len(saved)} its saved optimized version was planned on; expected the same class "
            f"and constructor arguments as when it was saved.")
    rename = {path: site.path for path, site in zip(saved, sites)}
    for row in plan:
        row.site = rename.get(row.site, row.site)
        row.aliases = [rename.get(a, a) for a in row.aliases]
    new = _build(source, plan)
    new.convrewrite_plan = plan
    return new


keras_internals.hook_loaded_model(PLAN_STATE, _apply_saved_plan)


def optimize(model, plan: Plan = None, cost_model="auto", allow=None, pac=None, verify=True, inputs=None,
             rtol=None, measure=False, batch: int = 8, memory_limit=None, check_speed=None, target: str = "auto",
             mode: str = "inference"):
    """A new keras.Model computing what `model` computes, each convolution in its fastest implementation.

    Args:
        model: the Keras model to optimize; it is left untouched.
        plan: a Plan to apply (e.g. edited with `force`); default: plan here (see `plan()`).
        cost_model, allow, pac, batch, memory_limit, target: as for `plan()`.
        verify: compare with the original per site and end to end; a site whose replacement differs
            beyond tolerance falls back to `direct` (recorded in the report).
        inputs: inputs to verify (and time) on, in the model's input structure; default random.
        rtol: the relative error allowed, per site and end to end (default by compute dtype: 1e-5 for
            float32); it also constrains a plan made here.
        measure: time the candidates on this model's own shapes at `batch` on this device first (tactic
            timing, cached per device fingerprint: in the profile you named, else the user cache). With
            mode="training", each is timed forward + backward, so the plan makes a training step fastest
            (not cached; the end-to-end speed check, which times inference, is then skipped). Without it,
            mode="training" plans by the profile's forward + backward predictions where it has them.
        check_speed: time the original and the optimized model end to end on the model's own input shapes
            (interleaved, warm-up excluded, about SPEED_BUDGET_S seconds) when the plan is for this device,
            and never return a model measurably slower: re-time the replaced sites and re-plan, and if it
            is still slower keep the original implementations. None means on (unless the environment
            variable CONVREWRITE_CHECK_SPEED is "0"); False turns it off.
        mode: "inference" (default): first rewrite the graph (fold BatchNormalization into convs, merge
            parallel conv branches, fuse activations; see convrewrite.rewrite), which is exact for
            `model(x, training=False)` only; "training": keep the graph (BN updates, branches) as it is.
            A given `plan` brings its own: the rewrites it lists are made again.

    Returns:
        A new keras.Model with `convrewrite_plan` (the Plan applied), `convrewrite_report` (the
        VerificationReport, with `.speed`) and `convrewrite_speed` (a SpeedCheck: measured next to predicted
        speedup, or why it was not measured).

    Raises:
        VerificationError: the model still differs beyond tolerance after falling back (it carries the
            report); the original is unchanged.

    Example:
        >>> fast = convrewrite.optimize(model)
        >>> print(fast.convrewrite_report.summary())
    """
    parse_memory_limit(memory_limit), check_rtol(rtol), profiles.check_target(target)  # fail before measuring
    check_mode(mode)
    if measure and target == "other":
        raise PlanError("measure=True times this device, but target='other' plans for another one; measure there "
                        "(convrewrite profile, or optimize(measure=True) on that device) and pass its profile.")
    if check_speed is None:
        check_speed = os.environ.get(SPEED_CHECK_ENV, "1") != "0"
    cm, given = None, plan is not None
    if given:
        plan = copy.deepcopy(plan)  # fallbacks edit the plan; the caller's stays as given
        source = _source(model, plan)
    else:
        source, rewrites = rewritten(model, mode)
        graph = walk(source)
        cm = _resolve_cost_model(cost_model, target)
        if measure:
            cm = cm or profiles.resolve("auto")
        cm, note = training_cost.for_mode(cm, mode)
        if measure:  # training: timed forward+backward here, the profile (its training view if any) for the rest
            cm = _measured(cm, graph, mode, allow, batch, memory_limit)
            note = training_cost.TIMED_HERE if mode == "training" else note
        plan = make_plan(graph, cm, allow=allow, policies=_policies(pac=pac), batch=batch, memory_limit=memory_limit,
                         rtol=rtol)
        plan.mode, plan.rewrites, plan.prediction_note = mode, rewrites, note
    models = _Models(model, source)
    new, report = _build_verified(models, plan, verify, inputs, rtol)
    plan.current = _current_implementations(source)  # what each site runs now: the speed check's baseline
    counterpart = _Float32Counterpart(models, plan, verify, inputs, rtol)
    speed = _check_speed(models, new, plan, check_speed, inputs, batch, target, float32=counterpart)
    if speed.float32 and not speed.float32["kept"]:  # reduced precision was not shown to pay here
        plan, new, report = counterpart.built
        speed = speed.as_float32()
    if speed.slower:
        planning = None if given else dict(allow=allow, policies=_policies(pac=pac), memory_limit=memory_limit)
        plan, new, report, speed = _recover_speed(models, plan, cm, speed, verify, inputs, rtol, batch, planning)
    if report is not None:
        report.speed = speed.to_dict()
        report.shared_layers = list(getattr(new, "convrewrite_shared_layers", ()))
        report.model_class = _class_note(model, new)
    _warn_about_copies(model, new)
    new.convrewrite_plan = plan
    new.convrewrite_report = report
    new.convrewrite_speed = speed
    return new


def _class_note(model, new) -> str:
    """'' where `new` is of `model`'s class (a Functional subclass or subclassed model kept as such, or a plain
    Functional) and carries everything over; else which class it is instead and why, and what was not kept."""
    import keras

    original, rebuilt = type(model), type(new)
    notes = []
    if rebuilt is not original and original is not keras_internals.functional_class():
        why = ("a Sequential model is rebuilt as a Functional graph of the same layers"
               if issubclass(original, keras.Sequential) else "its class cannot be kept around another graph")
        notes.append(f"{original.__name__} '{model.name}' is returned as a {rebuilt.__name__}: {why}.")
    lost = list(getattr(new, "convrewrite_dropped_attributes", ()))
    if lost:
        notes.append(f"Not carried over to the optimized model: {'; '.join(lost)}.")
    return " ".join(notes)


_COPY_WARNINGS = {
    "convrewrite_shared_layers": (
        "Optimized model of '{model}' shares {n} layer(s) with the original, since they cannot be re-created "
        "from their config: {names}. Their weights are the same variables in both models (training one changes "
        "the other); give them get_config()/from_config() to get copies."),
    "convrewrite_unsaved_swaps": (
        "Optimized model of '{model}': {names} override get_build_config()/build_from_config() without Keras's "
        "own, so a '.keras' file of it cannot record their swapped convolutions and loads their plain layers; "
        "re-apply the plan after loading: convrewrite.build(loaded, fast.convrewrite_plan)."),
}
"""What the rebuild could not copy faithfully (attributes graph.rebuild sets on the new model), as warnings."""


def _warn_about_copies(model, new):
    for attribute, message in _COPY_WARNINGS.items():
        paths = getattr(new, attribute, ())
        if paths:
            warnings.warn(message.format(model=model.name, n=len(paths), names=list(paths)[:5]), stacklevel=3)


def _measured(cm, graph, mode: str, allow, batch: int, memory_limit):
    """The cost model to plan with after timing the model's own conv shapes here (every size a layer is
    called at): inference timings go to `cm`'s tactic cache; for mode="training", forward + backward
    timings, which describe training only, answer for those shapes and are not cached."""
    specs = [spec for s in graph.all_sites() for spec in (getattr(s, "specs", None) or [s.spec])]
    if mode != "training":
        return profiles.measure_tactics(cm, specs, allow=allow, batch=batch, memory_limit=memory_limit)
    limit, timed = parse_memory_limit(memory_limit), {}
    for spec in specs:
        spec = spec if spec.batch else spec.with_input(batch=batch)
        names = [n for n in implementations.names() if (allow is None or n in allow or n == "direct")
                 and _for_speed(n) and not (limit and constraint_violation(n, spec, limit))]
        if spec not in timed and spec.height is not None and spec.width is not None:
            timed[spec] = profiling.time_spec(spec, allow=names, training=True)
    return _TimedSites(cm, timed, source=TRAINING_TIMED, exclusive=True)


class _Models:
    """The model to optimize (`original`: what the result must compute) and the model planned and built
    (`source`: the original after the rewrite stage, or the original itself)."""

    def __init__(self, original, source):
        self.original, self.source = original, source

    def build_and_verify(self, plan: Plan, inputs, rtol):
        """(new model, report): `plan` built on the source, verified against the original."""
        new = _build(self.source, plan)
        return new, _verify(self.original, new, inputs=inputs, rtol=rtol, plan=plan, source=self.source)


def _build_verified(models: _Models, plan: Plan, verify: bool, inputs, rtol):
    """(new model, report): `plan` built on models.source, verified against models.original, and failing sites
    fallen back to `direct` (editing `plan`).

    Raises VerificationError where the model still differs after the fallbacks."""
    model = models.original
    if not verify:
        return _build(models.source, plan), None
    new, report = models.build_and_verify(plan, inputs, rtol)
    failing = [s for s in report.failing_sites if plan.row(s).choice != "direct"]
    if failing:
        fallbacks = []
        for site in failing:
            row = plan.row(site)
            check = next(c for c in report.sites if c.name == site)
            fallbacks.append({"site": site, "from": row.choice, "to": "direct",
                              "why": f"rel error {check.rel_error:.2e} > {check.tolerance:.0e}"})
            plan.force(site, "direct", reason=f"fell back from {row.choice}: verification failed")
        new, report = models.build_and_verify(plan, inputs, rtol)
        report.fallbacks = fallbacks
    if not report.passed:
        new, report = _fall_back_precision(models, plan, new, report, inputs, rtol)
    if not report.passed:
        raise VerificationError(_failure_message(model, report), report=report)
    return new, report


def _fall_back_precision(models, plan: Plan, new, report, inputs, rtol):
    """Every site passed alone but the model as a whole is beyond tolerance: put the reduced-precision sites
    back on full precision one by one, largest measured site error first, until the model is within it.
    Returns (new model, report); the report lists each fallback."""
    reduced = [c for c in report.sites if c.passed and _float32_base(plan.row(c.name).choice)]
    fallbacks = list(report.fallbacks)
    for check in sorted(reduced, key=lambda c: -c.rel_error):
        row = plan.row(check.name)
        base = _float32_base(row.choice)
        fallbacks.append({"site": check.name, "from": row.choice, "to": base,
                          "why": f"model beyond tolerance; largest reduced-precision site error {check.rel_error:.2e}"})
        plan.force(check.name, base, reason=f"fell back from {row.choice}: the model as a whole exceeded rtol")
        new, report = models.build_and_verify(plan, inputs, rtol)
        report.fallbacks = fallbacks
        if report.passed:
            break
    return new, report


def _float32_base(name: str):
    """The float32 implementation a reduced-precision one runs in lower precision (`direct-bf16` -> `direct`);
    None for a float32 implementation."""
    impl = implementations.get(name)
    return getattr(impl, "base_name", "direct") if impl.precision != "float32" else None


def _failure_message(model, report) -> str:
    """One sentence on what failed and what was (or was not) done about it, then the report's table."""
    failing = [c.name for c in report.checks if not c.passed]
    rewrites = [c.name for c in report.checks if c.kind == "rewrite" and not c.passed]
    if rewrites:
        done = (f"because the rewrite stage's result differs at {rewrites} (mode='training' skips that stage; "
                f"please report the model)")
    elif report.fallbacks:
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


class _Float32Counterpart:
    """`plan` with every reduced-precision site back on its float32 base implementation, built and verified
    when the speed check first asks for it (`model()`); `built`: its (plan, new model, report) then. The speed
    check times it beside the plan: an `rtol` plan is kept only where it is shown at least as fast."""

    def __init__(self, models: _Models, plan: Plan, verify: bool, inputs, rtol):
        self.models, self.plan, self.verify, self.inputs, self.rtol = models, plan, verify, inputs, rtol
        self.reduced = [r for r in plan if _float32_base(r.choice)]
        self.built = None

    def model(self):
        counterpart = copy.deepcopy(self.plan)
        for row in self.reduced:
            base = _float32_base(row.choice)
            counterpart.force(row.site, base, reason=f"{row.choice} measured no faster than float32 {base} here")
        new, report = _build_verified(self.models, counterpart, self.verify, self.inputs, self.rtol)
        counterpart.current = getattr(self.plan, "current", {})
        self.built = (counterpart, new, report)
        return new


def _check_speed(models: _Models, new, plan: Plan, enabled: bool, inputs, batch: int,
                 target: str = "auto", float32=None) -> speed_check.SpeedCheck:
    """Measure `new` against the model it should beat, where that says something about the device planned
    for (not for target="other" or an unverified profile). The baseline is the original with only the
    policy-chosen sites (PAC) applied: their cost is the user's choice, the speed-chosen sites' is ours.
    float32: the plan's `_Float32Counterpart`, timed in the same rounds where the plan has reduced-precision
    sites; the result's `float32` says whether the plan was shown at least as fast as it."""
    model = models.original
    total = plan.predicted_total()
    result = speed_check.SpeedCheck(predicted=total[0] / total[1] if total else None, band=plan.predicted_band())
    if not enabled:
        result.not_measured = "check_speed=False"
    elif any(source.endswith(FORWARD_BACKWARD) for source in plan.prediction_sources()):
        result.not_measured = ("the plan is for training (forward+backward timings); the end-to-end check times "
                               "inference only")
    elif target == "other" or plan.trust == "unverified":
        result.not_measured = ("the profile is another device's (target='other' or unverified), so this device's "
                               "speed says nothing of it")
    elif not _replaced_for_speed(plan) and not plan.rewrites:
        result.not_measured = "no site was replaced for speed and the graph was not rewritten"
    else:
        # random finite data at the planned batch (or shaped like `inputs` where a size is unknown): the
        # user's values may hold NaN/Inf, which route FFT layers through Keras's branch, so timing them
        # would measure that branch
        x = speed_check.model_inputs(model, batch, like=inputs)
        if x is None:
            result.not_measured = "the model's input size is unknown; pass inputs= to time on data of their shape"
            return result
        policy_only = _policy_only(plan)
        baseline = (model if not _replaced_for_speed(policy_only) and not _policy_sites(plan)
                    else _build(models.source, policy_only))
        others = {"float32": float32.model()} if float32 is not None and float32.reduced else None
        measured = speed_check.measure(baseline, new, x, others=others)
        result = dataclasses.replace(measured, predicted=result.predicted, band=result.band, action="kept")
        if "float32" in measured.others:
            result.float32 = speed_check.against_float32(measured.others["float32"])
    return result


def _current_implementations(model) -> dict:
    """{site path: (implementation name, options)} of what each site of `model` runs now: `direct` for
    Keras's own layers, the implementation that made a replacement layer (re-optimizing an optimized model)."""
    out = {}
    for site in walk(model).sites:
        impl = implementations.for_layer(site.layer)
        for path in [site.path, *site.aliases]:
            out[path] = (impl.name, impl.options_of(site.layer))
    return out


def _replaced_for_speed(plan: Plan) -> list:
    """Rows whose choice changes what the site runs now, for speed (policy choices aside)."""
    current = getattr(plan, "current", {})
    return [r for r in plan if _for_speed(r.choice) and r.choice != current.get(r.site, ("direct", {}))[0]]


def _policy_sites(plan: Plan) -> list:
    return [r for r in plan if not _for_speed(r.choice)]


def _policy_only(plan: Plan) -> Plan:
    """A copy of `plan` with every speed-chosen site back on what it runs now (Keras's own layer, or the
    replacement a re-optimized model already had); policy-chosen sites kept."""
    current = getattr(plan, "current", {})
    plan = copy.deepcopy(plan)
    for row in _replaced_for_speed(plan):
        row.choice, options = current.get(row.site, ("direct", {}))
        row.options = dict(options)
        row.reason = "kept what the site ran: the optimized model measured slower than the original"
    return plan


def _recover_speed(models: _Models, plan: Plan, cm, first, verify, inputs, rtol, batch, planning):
    """The optimized model was measurably slower than its baseline: time the replaced sites on their real
    shapes (at the measured batch) and re-plan from those timings; if still slower (or the plan was given,
    so there is nothing to re-plan: `planning` is None), put the speed-chosen sites back on Keras's own
    kernels. `planning`: make_plan's allow, policies and memory_limit. Returns (plan, new model, report,
    SpeedCheck)."""
    attempts = [first]
    if planning is not None:  # a plan made here: re-plan from timings of the replaced sites
        timed = _time_replaced_sites(plan, first.batch or batch, planning["allow"])
        if cm is not None and hasattr(cm, "record_tactics"):
            cm.record_tactics(timed)  # this device's timings, reused by later plans
        current, mode, rewrites = plan.current, plan.mode, plan.rewrites
        plan = make_plan(walk(models.source), _TimedSites(cm, timed), batch=first.batch or batch, rtol=rtol, **planning)
        plan.mode, plan.rewrites = mode, rewrites
        new, report = _build_verified(models, plan, verify, inputs, rtol)
        plan.current = current
        again = _check_speed(models, new, plan, True, inputs, first.batch or batch)
        if not again.slower:
            again.action = "re-planned from timings of the replaced sites" + (
                "" if again.measured is not None else ": none is replaced for speed any more")
            again.history = [a.to_dict() for a in attempts]
            return plan, new, report, again
        attempts.append(again)
    current = plan.current
    plan = _policy_only(plan)
    new, report = _build_verified(models, plan, verify, inputs, rtol)
    plan.current = current
    last = attempts[-1]
    last.action = "kept the original implementations: the optimized model measured slower than the original"
    last.history = [a.to_dict() for a in attempts[:-1]]
    return plan, new, report, last


def _for_speed(name: str) -> bool:
    return implementations.get(name).chosen_for_speed


def _time_replaced_sites(plan: Plan, batch: int, allow):
    """{spec: {implementation: seconds}} timed here, at `batch`, for every site replaced for speed (at every
    size it is called with), over its applicable speed candidates (policy choices such as PAC are not timed)."""
    timed = {}
    for row in _replaced_for_speed(plan):
        names = [n for n, why in row.candidates.items()
                 if why == "" and _for_speed(n) and (allow is None or n in allow or n == "direct")]
        for spec in row.specs or [row.spec]:  # every size a shared layer is called at
            spec = spec.with_input(batch=row.spec.batch or batch)  # the model's own batch, else the measured one
            if spec not in timed and spec.height is not None and spec.width is not None:
                timed[spec] = profiling.time_spec(spec, allow=names)
    return timed


class _TimedSites:
    """A cost model that answers with timings made here where it has them, else asks `base` (if any).

    exclusive: on a spec timed here, an implementation the timing left out (one the profiler does not time on
    such shapes, `Implementation.profile_applicable`) gets no prediction instead of `base`'s, so that it does
    not compete with a prediction of another kind (forward + backward timings against a forward-only fit)."""

    def __init__(self, base, timed, source: str = "timed here", exclusive: bool = False):
        self.base, self.timed, self.source, self.exclusive = base, timed, source, exclusive
        self.name = getattr(base, "name", None) or "timed here"
        self.match_note = getattr(base, "match_note", None)
        self.trust = "this device"

    def prediction(self, impl_name, spec):
        if impl_name in self.timed.get(spec, {}):
            return Prediction(1e3 * self.timed[spec][impl_name], self.source, TIMING_BAND)
        if self.exclusive and spec in self.timed:
            return None
        return None if self.base is None else predict(self.base, impl_name, spec)


def verify(original, new, inputs=None, rtol=None, sites=True, seed=0) -> VerificationReport:
    """Compare `new` with `original`: per output end to end and per conv site.

    Args:
        original, new: the two Keras models (same inputs and outputs).
        inputs: arrays in the model's input structure; default random normal.
        rtol: tolerance; default by compute dtype (1e-5 float32, 1e-2 float16, 3e-2 bfloat16).
        sites: also compare every conv site in isolation.
        seed: the random inputs' seed.

    Returns:
        A VerificationReport (`passed`, `checks`, `summary()`, `to_json()`).

    Example:
        >>> print(convrewrite.verify(model, fast).summary())
    """
    return _verify(original, new, inputs=inputs, rtol=rtol, sites=sites, seed=seed, plan=getattr(new, "convrewrite_plan", None))
