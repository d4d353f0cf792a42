"""Rewrite inside nested models: a Functional or Sequential model used as a layer of another (a backbone
inside a classifier) gets the whole rewrite stage of its own, recursively.

Pattern: a node of the graph whose layer is a graph model (graph.ModelGraph.children), where the inner
model's own rewrites match.

Exact (as each inner rewrite is) when:
- the nested model is called once, in this graph and nowhere else (a second use would see the rewritten
  layers too), and not with training=True or a mask (the inner BN would then not run on its statistics);
- patterns do not cross its boundary: a conv outside followed by a BN inside is left as it is.
Then the nested model is replaced by its rewritten copy (same name, so site paths keep "backbone/conv"),
called on the same inputs; its records' names and node keys carry the path ("backbone/conv", "backbone/bn:0"),
which `record.node_of` resolves for the verification's replay.
"""

from __future__ import annotations

from .. import keras_internals
from . import matching as m

KIND = "nested"


def rewrite(mg, apply):
    """({node key: replacement}, [Rewrite]) for every nested model of `mg` whose rewrites matched; `apply` is
    the rewrite stage (model -> (rewritten model, records)), run on each nested model."""
    replace, records = {}, []
    for key in mg.ordered_nodes():
        inner = m.op(mg, key)
        if id(inner) not in mg.children or m.calls(mg, inner) != 1:
            continue
        node = mg.graph.nodes[key]["node"]
        kwargs = keras_internals.call_kwargs(node)
        if kwargs.get("training") is True or kwargs.get("mask") is not None:
            continue
        new, found = apply(inner)
        if not found:
            continue
        replace[key] = lambda tensor_of, new=new, node=node: _call(new, node, tensor_of)
        records.extend(r.nested(mg.children[id(inner)].prefix[len(mg.prefix):]) for r in found)
    return replace, records


def _call(model, node, tensor_of):
    """`model` called as `node` called the nested model, on the rebuilt tensors."""
    args, kwargs = keras_internals.fill_in(node, {id(t): tensor_of(t) for t in node.input_tensors})
    return model(*args, **kwargs)
