"""The re-parameterizing rewrite stage: fewer, larger convolutions for inference, before planning.

Each rewrite is a small pattern module stating its exactness conditions in its docstring:
- fold_bn: conv -> BatchNormalization becomes one conv;
- merge_branches: convs (and identities) on one input summed by an Add become one conv;
- fuse_activation: conv -> Activation / ReLU becomes one conv with that activation.
They run in that order (a conv -> BN branch is folded before its block is merged; a merged block's ReLU is
fused after), each over the outermost graph, each rebuilding the model (again while it still matches: a sum
(a + b) + c merges in two rounds). Before them, every nested model (a Functional or Sequential model used as a
layer, called once) gets the whole stage of its own (nested.py); patterns do not cross its boundary. The
planner then sees one conv per site. Only inference is preserved: BN statistics no longer update (optimize(mode="training") skips this).
"""

from __future__ import annotations

from typing import List, Tuple

from ..graph import walk
from . import fold_bn, fuse_activation, merge_branches, nested
from .record import Rewrite, by_site, node_of

PASSES = (fold_bn, merge_branches, fuse_activation)

MAX_ROUNDS = 8
"""How often one pass runs again on its own result while it still matches (each round rebuilds the model)."""

__all__ = ["PASSES", "Rewrite", "apply", "by_site", "node_of"]


def apply(model, passes=PASSES) -> Tuple[object, List[Rewrite]]:
    """(the rewritten model, [Rewrite] in the order applied); `model` itself where nothing matched.

    The new model is an ordinary keras.Model whose layers keep their names (a merged block is named after
    its largest conv); the original is left untouched. Each record's node keys are the original's: a later
    pass meets an earlier rewrite's conv ("site:0") where the original has the end of the span it replaced."""
    records, original_key = [], {}
    mg = walk(model)  # first, each nested model (called once) gets the whole stage of its own (nested.py)
    replace, found = nested.rewrite(mg, lambda inner: apply(inner, passes))
    if replace:
        model = mg.rebuild(lambda site: None, replace_nodes=replace)
    records.extend(found)
    for rule in passes:
        for _ in range(MAX_ROUNDS):  # again while it matches: a sum (b1 + b2) + b3 merges in two rounds
            mg = walk(model)
            replace, found = rule.rewrite(mg)
            if replace:
                model = mg.rebuild(lambda site: None, replace_nodes=replace)
            for r in found:
                r.input, r.output = original_key.get(r.input, r.input), original_key.get(r.output, r.output)
                original_key[f"{r.site}:0"] = r.output  # rewrites only match layers called once
            records.extend(found)
            if not replace:
                break
    return model, records
