"""Rewrite: what one rewrite did, in a form the plan keeps (JSON) and the verification can replay."""

from __future__ import annotations

import dataclasses
from typing import List

from . import matching as m


@dataclasses.dataclass
class Rewrite:
    """One rewrite of one site.

    kind: "fold_bn", "merge_branches" or "fuse_activation". site: the conv layer's name afterwards (it keeps
    a conv's name). before: the layers it replaces. input / output: node keys ("layer:call") of the original
    graph whose output tensors the rewritten span reads from / replaces (input_index: which output of the
    input node), so the span can be cut out of the original and compared with the new conv."""

    kind: str
    site: str
    before: List[str]
    input: str
    output: str
    input_index: int = 0

    @classmethod
    def make(cls, mg, kind, site, before, first_key, last_key):
        """The record of a span starting at node `first_key` (its input 0) and ending at `last_key`."""
        x = m.input_tensor(mg, first_key)
        producer = m.producer_key(mg, first_key, 0)
        outputs = mg.graph.nodes[producer]["node"].outputs
        index = next(i for i, t in enumerate(outputs) if t is x)
        return cls(kind, site, list(before), producer, last_key, index)

    def nested(self, prefix: str) -> "Rewrite":
        """This record of a nested model's rewrite as its parent names it: site, layers and node keys under
        `prefix` ("backbone/")."""
        return Rewrite(self.kind, prefix + self.site, [prefix + b for b in self.before], prefix + self.input,
                       prefix + self.output, self.input_index)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def node_of(mg, key: str):
    """The keras Node of a record's node key in walked graph `mg`: "conv:0" in its own graph, "backbone/bn:0"
    in the graph of the nested model at that path (nested.py); KeyError where there is none."""
    if key in mg.graph.nodes:
        return mg.graph.nodes[key]["node"]
    for child in mg.children.values():
        rest = child.prefix[len(mg.prefix):]
        if key.startswith(rest):
            try:
                return node_of(child, key[len(rest):])
            except KeyError:
                continue
    raise KeyError(key)


def by_site(records: List[Rewrite]) -> List[Rewrite]:
    """One combined record per conv site of the rewritten model: records that rewrote layers a later record
    consumed (a folded branch that was then merged, a merged conv whose activation was then fused) join it,
    spanning the latest record's input to its output; kind lists the rewrites in order ("fold_bn+merge...")."""
    groups = {}
    for r in records:
        joined = [g for name, g in list(groups.items()) if name == r.site or name in r.before]
        for g in joined:
            del groups[g.site]
        kinds = []
        for k in [k for g in joined for k in g.kind.split("+")] + [r.kind]:
            if k not in kinds:
                kinds.append(k)
        before = []
        for name in [n for g in joined for n in g.before] + r.before:
            if name not in before:
                before.append(name)
        groups[r.site] = Rewrite("+".join(kinds), r.site, before, r.input, r.output, r.input_index)
    return list(groups.values())
