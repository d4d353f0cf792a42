"""What plan(mode="training") predicts: a training step's forward + backward, where the profile knows it.

A profile made with `convrewrite profile --training` holds forward + backward timings per implementation
on a grid and their fits (`CostModel.training_fits`); `TrainingCostModel` answers the planner from those,
with the profile's trust and calibration, so the plan makes a fine-tuning step fastest. A profile without
them (the default quick profile, any profile before format version 4, a plain object predicting
milliseconds) is used as before, for its inference predictions, and the plan's `prediction_note` says so.
"""

from __future__ import annotations

from typing import Optional, Tuple

from .cost import Prediction

WITH_TRAINING = "mode=training: forward+backward predictions (the profile's training timings)"
WITHOUT_TRAINING = ("mode=training: inference predictions (the profile has no forward+backward timings: "
                    "`convrewrite profile --training` adds them, optimize(measure=True) times them here)")
TIMED_HERE = "mode=training: forward+backward timed here on the model's own shapes"


class TrainingCostModel:
    """A CostModel seen through its forward + backward predictions (`CostModel.prediction(training=True)`).

    An implementation the training section does not cover predicts None, so it does not compete: comparing
    one implementation's forward + backward with another's forward alone would favour the latter."""

    def __init__(self, cost_model):
        self.cost_model = cost_model

    def prediction(self, impl_name: str, spec) -> Optional[Prediction]:
        return self.cost_model.prediction(impl_name, spec, training=True)

    def predict_ms(self, impl_name: str, spec) -> Optional[float]:
        p = self.prediction(impl_name, spec)
        return None if p is None else p.ms

    # what plans record of their cost model (planner._new_plan, planner.target_fingerprint)
    name = property(lambda self: self.cost_model.name)
    match_note = property(lambda self: self.cost_model.match_note)
    trust = property(lambda self: self.cost_model.trust)
    calibration = property(lambda self: self.cost_model.calibration)
    fingerprint = property(lambda self: self.cost_model.fingerprint)

    def __repr__(self):
        return f"<TrainingCostModel of {self.cost_model!r}>"


def for_mode(cost_model, mode: str) -> Tuple[object, Optional[str]]:
    """(the cost model to plan `mode` with, the plan's prediction note or None): for mode="training", the
    profile's forward + backward view where it has training fits, else the profile itself with a note that
    its predictions are of inference; for mode="inference" (or rule-based planning) `cost_model` as is."""
    if mode != "training" or cost_model is None:
        return cost_model, None
    if getattr(cost_model, "has_training", False):
        return TrainingCostModel(cost_model), WITH_TRAINING
    return cost_model, WITHOUT_TRAINING
