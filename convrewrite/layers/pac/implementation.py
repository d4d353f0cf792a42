"""PAC as an implementation: the Conv2D -> PacConv2D rewrite, exact at conversion, chosen by the user's
`pac=` policy (never for speed)."""

from __future__ import annotations

import math
import re

import numpy as np
from keras import ops

from ...errors import PlanError
from ...registry import Implementation, SitePolicy, canary_spec, io_bytes, register
from ...spec import ConvSpec
from .layers import PacConv2D
from .strategies import choose_strategy


# ---- the Conv2D -> PAC rewrite ------------------------------------------------------------------------
class PacImplementation(Implementation):
    """Turn a Conv2D site into a PacConv2D that equals it exactly at conversion and can learn adaptivity.

    Options (from `convrewrite.optimize(model, pac={"layers": ..., "guidance": ..., **options})`):
      guidance: "self" (the site's own input is the guidance) or the name of a model input or layer
        whose (first) output is the guidance; resized bilinearly to the site's input size if it differs.
      any other PacConv2D argument (kernel_type, learn_guidance_scale, strategy, kernel_blend).

    Exactness and learnability: the layer is built with kernel_blend = 0 (K' = 1 + b * (K - 1), b
    learnable, starting at 0), so at conversion its output is the Conv2D's for *any* guidance, while
    dLoss/db = sum dLoss/dK' * (K - 1) is nonzero wherever the guidance varies. (A guidance scale
    initialised at 0 inside the Gaussian would be exact too, but its gradient there is 0: it never moves.)
    normalize_kernel=True is refused: the normalised layer divides by the window's tap count, which no
    starting point of the blend undoes, so it could not equal the Conv2D at conversion.
    """

    name = "pac"
    export_formats = frozenset({"tf_saved_model", "openvino", "litert"})  # not onnx: its XLA-compiled taps
    # are a nested function call tf2onnx cannot convert (README, Export)
    description = "pixel-adaptive convolution (PacConv2D), equal to the Conv2D at conversion"
    layer_classes = (PacConv2D,)
    label = "PAC"
    simplicity = 90
    chosen_for_speed = False  # an adaptivity choice the user makes: pac={"layers": ...}
    policy_keyword = "pac"

    def profile_applicable(self, spec: ConvSpec):
        # PAC is an adaptivity choice made on small kernels; a 51x51 PAC would take minutes (and gigabytes
        # for its patches) to time and no plan would ever pick it.
        return max(spec.kernel) <= 7 and (spec.macs() or 0) <= 3e8

    def select_sites(self, model_graph, policy) -> SitePolicy:
        """The sites `pac={"layers": names | regex, "budget": 1.3 (optional), **options}` selects.

        A pattern selects the sites PAC can replace among those it matches (".*" means "every Conv2D"); a
        name must name a conv site (a misspelt name must not silently leave a layer unconverted)."""
        policy = dict(policy)
        selector = policy.pop("layers", None)
        budget = policy.pop("budget", None)
        if selector is None:
            raise PlanError("pac= needs 'layers': a list of layer names or a regex; none was given.")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget < 1):
            raise PlanError(f"Received pac budget={budget!r}; expected a latency factor >= 1 (e.g. 1.3).")
        if isinstance(selector, str) and not model_graph.find_sites([selector]):
            selector = re.compile(selector)
        paths = [s.path for s in model_graph.sites]
        if isinstance(selector, re.Pattern):
            # a conv held inside a layer has no graph to wire guidance through (see graph._held_choice)
            found = [s for s in model_graph.find_sites(selector) if self.applicable(s.spec)[0] and s.holder is None]
            if not found:
                raise PlanError(f"pac layers {selector.pattern!r} match no Conv2D site PAC can replace; expected "
                                f"names or a regex matching some of {paths}.")
        else:
            selector = [selector] if isinstance(selector, str) else list(selector)  # one name, not its letters
            unknown = [i for i in selector if not isinstance(i, re.Pattern) and not model_graph.find_sites([i])]
            if unknown:
                raise PlanError(f"pac layers {unknown} name no conv site; expected names from {paths}.")
            found = model_graph.find_sites(selector)
        return SitePolicy({s.path for s in found}, policy, budget, isinstance(selector, re.Pattern))

    def workspace_bytes(self, spec: ConvSpec, options=None):
        """Input and output, the padded input, the distances and adaptive kernel (3 values per kernel
        evaluation = batch x output pixels x taps), two taps of guidance, and the contraction of the
        strategy the layer will run (`options["strategy"]`, else auto's pick): the tap slices, their stack
        and its K-scaled copy for 'patch'; one tap's x, its scaled copy and two partial sums for 'shift';
        the (padded pixels x kh*kw*Cout) product and two sums for 'wide' (see `pac_contract`). Peak RSS
        over one compiled call grew 0.6-0.8x of it (CPU, TF 2.21). None where the spatial size is unknown."""
        if spec.height is None or spec.width is None:
            return None
        b, (ho, wo), (kh, kw) = spec.batch or 1, spec.output_hw(), spec.kernel
        evals, pixels = self.features(spec)["pac_kernel_evals"], b * ho * wo
        padded = b * (spec.height + kh) * (spec.width + kw) * spec.in_channels
        strategy = (options or {}).get("strategy") or "auto"
        if strategy == "auto":
            strategy = choose_strategy(kh * kw, spec.in_channels, spec.filters, strides=spec.strides)
        if strategy == "patch":
            contraction = 3.0 * evals * spec.in_channels  # the tap slices, their stack, its K-scaled copy
        elif strategy == "wide":
            # the T*O-wide product per padded pixel, counted twice: measured peak RSS grew 1.5-1.7x of it
            contraction = 2.0 * padded / spec.in_channels * kh * kw * spec.filters + 2.0 * pixels * spec.filters
        else:
            contraction = pixels * (2.0 * spec.in_channels + 2.0 * spec.filters)  # a tap, its scaled copy, 2 sums
        return io_bytes(spec) + 4.0 * (3.0 * evals + padded + 2.0 * pixels * spec.in_channels + contraction)

    def applicable(self, spec: ConvSpec):
        if spec.kind != "conv2d":
            return False, f"PAC replaces Conv2D only, not {spec.kind}"
        if spec.groups != 1:
            return False, f"groups={spec.groups}; PacConv2D implements groups=1 only"
        return True, ""

    def _pac_options(self, options):
        opts = dict(options)
        opts.pop("guidance", None)
        if opts.get("normalize_kernel"):
            raise PlanError(
                "Received normalize_kernel=True in the pac options; expected False: a normalised PacConv2D "
                "divides by the window's tap count and cannot equal the Conv2D it replaces at conversion."
            )
        opts.setdefault("kernel_blend", 0.0)
        allowed = {"kernel_type", "kernel_blend", "learn_guidance_scale", "strategy", "normalize_kernel"}
        unknown = set(opts) - allowed
        if unknown:
            raise PlanError(f"Received unknown pac options {sorted(unknown)}; expected 'layers', 'guidance' and "
                             f"a subset of {sorted(allowed)}.")
        return opts

    def make_layer(self, layer, spec, **options):
        from ...graph import keras_config

        config = keras_config(layer)
        config.pop("groups", None)
        config.update(self._pac_options(options))
        return PacConv2D.from_config(config)

    def transfer_weights(self, old_layer, new_layer, spec):
        # Conv2D's kernel and bias by value; the PAC weights keep their initial (conversion) values.
        new_layer._kernel.assign(ops.convert_to_numpy(old_layer.kernel))
        if spec.use_bias:
            new_layer.bias.assign(ops.convert_to_numpy(old_layer.bias))

    @staticmethod
    def _guidance_name(options):
        name = options.get("guidance", "self")
        if not isinstance(name, str) or not name:
            raise PlanError(f"Received guidance={name!r} in the pac options; expected 'self' or the name of a "
                             f"model input or layer.")
        return name

    def dependencies(self, spec, options):
        name = self._guidance_name(options)
        return [] if name == "self" else [name]

    def call(self, new_layer, args, kwargs, context):
        x = args[0]
        name = self._guidance_name(context.options)
        guidance = x if name == "self" else context.resolve(name)
        return new_layer([x, guidance], **kwargs)

    def probe_call(self, new_layer, x):
        # At conversion the output must not depend on the guidance, so any guidance probes it.
        shape = tuple(x.shape)
        f = getattr(new_layer, "guidance_channels", None) or (shape[1] if new_layer.data_format == "channels_first" else shape[-1])
        gshape = (shape[0], f, shape[2], shape[3]) if new_layer.data_format == "channels_first" else shape[:3] + (f,)
        guidance = np.random.default_rng(1234).standard_normal(gshape).astype("float32")
        return new_layer([x, guidance])

    def canary_specs(self):
        return [canary_spec(3, 16, 16, 32)]

    def features(self, spec):
        feats = super().features(spec)
        ho, wo = spec.output_hw()
        taps = spec.kernel[0] * spec.kernel[1]
        # The adaptive kernel: per output pixel and tap, a distance over the guidance and an exp.
        feats["pac_kernel_evals"] = float((spec.batch or 1) * (ho or 0) * (wo or 0) * taps)
        return feats


register(PacImplementation())
