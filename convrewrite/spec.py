"""ConvSpec: the one value that describes a convolution site.

The graph walk produces it, the planner and cost model consume it, the implementations build layers
from it. It is frozen (hashable, usable as a cache key) and round-trips through plain JSON.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Tuple

from .shapes import effective_length, output_length, pair, transpose_output_length

CONV_KINDS = ("conv2d", "depthwise_conv2d", "conv2d_transpose", "separable_conv2d", "conv1d", "depthwise_conv1d",
              "conv3d")
"""Kinds the walker recognises: Keras's Conv2D, DepthwiseConv2D, Conv2DTranspose, SeparableConv2D, Conv1D,
DepthwiseConv1D and Conv3D."""

KINDS_1D = ("conv1d", "depthwise_conv1d")
"""1-D kinds (Keras Conv1D / DepthwiseConv1D). A 1-D site is described as a 2-D spec of height 1: kernel
(1, k), strides (1, s), dilation (1, d), width = the sequence length. Why not fields of their own: every
consumer of a spec (io_bytes, macs, output sizes, the cost features and the fits regressed on them, the
profiler's grids) then works on 1-D sites unchanged, and a Conv1D is computed by TensorFlow as exactly
such a height-1 Conv2D, so its costs are comparable. The kind keeps them apart where it matters (the layer
class to build, the numpy reference, 'causal' padding, which only 1-D kinds accept)."""
DEPTHWISE_KINDS = ("depthwise_conv2d", "depthwise_conv1d")

DEPTH_FIELDS = {"depth": None, "kernel_depth": 1, "stride_depth": 1, "dilation_depth": 1}
"""Conv3D's third (leading) spatial axis: input depth D (None: unknown), kernel, stride and dilation along it.
Fields of their own rather than triples: the (height, width) pairs keep their meaning for every kind (a 3-D
spec's 2-D features are those of one depth slice), and they are left out of a 2-D or 1-D spec's JSON, so the
specs existing profiles hold read and write exactly as before."""


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A 2-D convolution site, always described in channels_last terms.

    `height`/`width`/`batch` are None when unknown at build time (e.g. `Input((None, None, 3))`).
    `filters` is the number of output channels (for depthwise: in_channels * depth_multiplier).
    `groups` is 1 for ordinary Conv2D, Cin for depthwise.

    The other 2-D kinds use the same fields:
      * "conv2d_transpose" (keras.layers.Conv2DTranspose): height/width/in_channels describe the layer's
        *input*; `filters` its output channels; `kernel`, `strides`, `dilation`, `padding` as the layer's
        arguments (the forward convolution it transposes); `output_padding` the layer's output_padding (None
        when the layer leaves it None: the output is then H*s for SAME, H*s + max(k_eff - s, 0) for VALID);
        groups 1. `output_hw()` is the (larger) output size, `macs()` counts Cin*filters*kh*kw per *input*
        pixel (the scatter's work, the same as the forward convolution it transposes).
      * "separable_conv2d" (keras.layers.SeparableConv2D): a depthwise stage (kernel, strides, dilation,
        padding, `depth_multiplier` M: Cin*M channels) followed by a 1x1 pointwise stage to `filters`
        channels; groups 1. `macs()` is the sum of both stages' work.
    `output_padding` is None for every kind but conv2d_transpose (and left out of the JSON when None, so
    the specs of the other kinds serialize exactly as before it existed).
    """

    kind: str
    in_channels: int
    filters: int
    kernel: Tuple[int, int]
    height: Optional[int] = None
    width: Optional[int] = None
    batch: Optional[int] = None
    strides: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    padding: str = "valid"
    groups: int = 1
    depth_multiplier: int = 1
    use_bias: bool = True
    activation: str = "linear"
    dtype: str = "float32"
    data_format: str = "channels_last"
    output_padding: Optional[Tuple[int, int]] = None
    depth: Optional[int] = None  # conv3d only (see DEPTH_FIELDS)
    kernel_depth: int = 1
    stride_depth: int = 1
    dilation_depth: int = 1

    def __post_init__(self):
        if self.kind not in CONV_KINDS:
            raise ValueError(f"Received kind={self.kind!r}; expected one of {CONV_KINDS}.")
        for name in ("kernel", "strides", "dilation"):
            object.__setattr__(self, name, pair(getattr(self, name), name, "ConvSpec"))
        if self.output_padding is not None:
            if self.kind != "conv2d_transpose":
                raise ValueError(f"Received output_padding={self.output_padding!r} for kind {self.kind!r}; "
                                 f"expected None (only conv2d_transpose has an output padding).")
            object.__setattr__(self, "output_padding", pair(self.output_padding, "output_padding", "ConvSpec", 0))
        if self.kind in ("conv2d_transpose", "separable_conv2d") and self.groups != 1:
            raise ValueError(f"Received groups={self.groups} for kind {self.kind!r}; expected 1.")
        if self.kind != "conv3d" and any(getattr(self, k) != v for k, v in DEPTH_FIELDS.items()):
            raise ValueError(f"Received depth fields for a {self.kind} spec; expected them only for conv3d.")
        for name in ("kernel_depth", "stride_depth", "dilation_depth"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Received {name}={getattr(self, name)!r}; expected a positive int.")
        if self.kind in KINDS_1D:
            self._check_1d()
        elif self.padding not in ("same", "valid"):
            raise ValueError(f"Received padding={self.padding!r}; expected 'same' or 'valid'.")
        if self.data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"Received data_format={self.data_format!r}; expected 'channels_last' or 'channels_first'.")
        for name in ("in_channels", "filters", "groups", "depth_multiplier"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Received {name}={getattr(self, name)!r}; expected a positive int.")
        if self.kind in DEPTHWISE_KINDS and self.filters != self.in_channels * self.depth_multiplier:
            raise ValueError(
                f"Received a depthwise spec with filters={self.filters}, in_channels={self.in_channels}, "
                f"depth_multiplier={self.depth_multiplier}; expected filters = in_channels * depth_multiplier."
            )
        if self.in_channels % self.groups or self.filters % self.groups:
            raise ValueError(
                f"Received groups={self.groups} with in_channels={self.in_channels}, "
                f"filters={self.filters}; expected groups to divide both."
            )

    def _check_1d(self):
        """A 1-D kind is a height-1 2-D spec (see KINDS_1D): its first axis must be trivial."""
        if self.height not in (None, 1):
            raise ValueError(f"Received a {self.kind} spec with height={self.height}; expected 1 (a 1-D site).")
        object.__setattr__(self, "height", 1)
        for name in ("kernel", "strides", "dilation"):
            if getattr(self, name)[0] != 1:
                raise ValueError(f"Received a {self.kind} spec with {name}={getattr(self, name)}; expected (1, n).")
        if self.padding not in ("same", "valid", "causal"):
            raise ValueError(f"Received padding={self.padding!r}; expected 'same', 'valid' or 'causal'.")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def is_1d(self) -> bool:
        """True for Conv1D / DepthwiseConv1D sites (height-1 specs, see KINDS_1D)."""
        return self.kind in KINDS_1D

    @property
    def effective_kernel(self) -> Tuple[int, int]:
        """Kernel extent once dilation spreads its taps: (k - 1) * d + 1 per axis."""
        return tuple(effective_length(k, d) for k, d in zip(self.kernel, self.dilation))

    @property
    def is_depthwise_like(self) -> bool:
        """True when every group holds exactly one input channel (depthwise, possibly grouped Conv2D)."""
        return self.groups == self.in_channels and self.groups > 1 or self.kind in DEPTHWISE_KINDS

    def output_hw(self) -> Tuple[Optional[int], Optional[int]]:
        """Output spatial size under TF/Keras padding rules, None where the input size is unknown."""
        if self.kind == "conv2d_transpose":
            ops = self.output_padding or (None, None)
            return tuple(transpose_output_length(n, k, s, self.padding, p)
                         for n, k, s, p in zip((self.height, self.width), self.effective_kernel, self.strides, ops))
        # causal (1-D only) pads k_eff - 1 before and nothing after: as many outputs as SAME
        padding = "same" if self.padding == "causal" else self.padding
        return tuple(output_length(n, k, s, padding)
                     for n, k, s in zip((self.height, self.width), self.effective_kernel, self.strides))

    def output_depth(self) -> Optional[int]:
        """Output length along a conv3d's depth axis (1 for other kinds; None where the depth is unknown)."""
        if self.kind != "conv3d":
            return 1
        return output_length(self.depth, effective_length(self.kernel_depth, self.dilation_depth), self.stride_depth,
                             self.padding)

    def macs(self, batch: Optional[int] = None) -> Optional[int]:
        """Multiply-accumulates of the direct algorithm (None if the spatial size is unknown)."""
        ho, wo = self.output_hw()
        do = self.output_depth()
        if ho is None or wo is None or do is None:
            return None
        b = batch or self.batch or 1
        if self.kind == "conv2d_transpose":  # every input pixel scatters Cin x filters x taps products
            return b * self.height * self.width * self.in_channels * self.filters * self.kernel[0] * self.kernel[1]
        if self.kind == "separable_conv2d":
            mid = self.in_channels * self.depth_multiplier
            return b * ho * wo * mid * (self.kernel[0] * self.kernel[1] + self.filters)
        return (b * ho * wo * self.filters * (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
                * do * self.kernel_depth)

    def with_input(self, batch=None, height=None, width=None) -> "ConvSpec":
        """A copy with the input size filled in (the walker leaves it None when the model does)."""
        return dataclasses.replace(
            self,
            batch=self.batch if batch is None else batch,
            height=self.height if height is None else height,
            width=self.width if width is None else width,
        )

    # ---- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("kernel", "strides", "dilation"):
            d[key] = list(d[key])
        if d["output_padding"] is None:
            del d["output_padding"]  # the JSON of every spec without one stays as it was (profile keys)
        else:
            d["output_padding"] = list(d["output_padding"])
        if self.kind != "conv3d":  # 2-D and 1-D specs serialize as they always did
            for key in DEPTH_FIELDS:
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "ConvSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"Received unknown ConvSpec fields {sorted(unknown)}; expected a subset of {sorted(fields)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ConvSpec":
        return cls.from_dict(json.loads(text))

    def short(self) -> str:
        """Compact one-line description for tables: `dw 7x7 s1 96->96 @56x56`, `conv1d k251 s1 16->16 @16000`."""
        if self.is_1d:
            return self._short_1d()
        if self.kind == "conv3d":
            return self._short_3d()
        tag = {"conv2d": "conv", "depthwise_conv2d": "dw", "conv2d_transpose": "convT",
               "separable_conv2d": "sep"}[self.kind]
        if self.kind == "conv2d" and self.groups > 1:
            tag += f" g{self.groups}"
        if self.kind == "separable_conv2d" and self.depth_multiplier > 1:
            tag += f" m{self.depth_multiplier}"
        k = f"{self.kernel[0]}x{self.kernel[1]}"
        s = f"s{self.strides[0]}" if self.strides[0] == self.strides[1] else f"s{self.strides[0]}x{self.strides[1]}"
        d = "" if self.dilation == (1, 1) else f" d{self.dilation[0]}"
        hw = f"{self.height}x{self.width}" if self.height else "?x?"
        op = "" if self.output_padding is None else f" op{self.output_padding[0]}x{self.output_padding[1]}"
        return f"{tag} {k} {s}{d} {self.padding}{op} {self.in_channels}->{self.filters} @{hw}"

    def _short_3d(self) -> str:
        tag = "conv3d" + (f" g{self.groups}" if self.groups > 1 else "")
        k = f"{self.kernel_depth}x{self.kernel[0]}x{self.kernel[1]}"
        st = (self.stride_depth, *self.strides)
        s = f"s{st[0]}" if len(set(st)) == 1 else "s" + "x".join(map(str, st))
        dl = (self.dilation_depth, *self.dilation)
        d = "" if dl == (1, 1, 1) else f" d{'x'.join(map(str, dl))}"
        size = "x".join("?" if v is None else str(v) for v in (self.depth, self.height, self.width))
        return f"{tag} {k} {s}{d} {self.padding} {self.in_channels}->{self.filters} @{size}"

    def _short_1d(self) -> str:
        tag = {"conv1d": "conv1d", "depthwise_conv1d": "dw1d"}[self.kind]
        if self.kind == "conv1d" and self.groups > 1:
            tag += f" g{self.groups}"
        d = "" if self.dilation[1] == 1 else f" d{self.dilation[1]}"
        n = self.width if self.width is not None else "?"
        return f"{tag} k{self.kernel[1]} s{self.strides[1]}{d} {self.padding} {self.in_channels}->{self.filters} @{n}"


def keras_class(layer):
    """The Keras class whose computation `layer` is known to perform, or None.

    Conv2D and DepthwiseConv2D themselves (exact types only: a subclass may override call(), so it is not
    known to compute a plain conv), and convrewrite's own replacement layers, which name the Keras class they
    compute in a `convrewrite_keras_class` attribute of their own class (not inherited, for the same reason):
    so an optimized model's FFT layers are sites too, and optimizing it again can re-plan them."""
    import keras

    t = type(layer)
    if t in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Conv2DTranspose,
             keras.layers.SeparableConv2D, keras.layers.Conv1D, keras.layers.DepthwiseConv1D, keras.layers.Conv3D):
        return t
    return t.__dict__.get("convrewrite_keras_class")


def input_rank(layer) -> int:
    """Rank of the input a conv site layer takes: 3 for Conv1D / DepthwiseConv1D, 5 for Conv3D, 4 for the 2-D kinds."""
    import keras

    cls = keras_class(layer)
    return 3 if cls in (keras.layers.Conv1D, keras.layers.DepthwiseConv1D) else (5 if cls is keras.layers.Conv3D else 4)


def is_conv_site(layer) -> bool:
    """True for the layer types the walker describes as sites (see `keras_class`)."""
    return keras_class(layer) is not None


def spec_from_layer(layer, input_shape) -> ConvSpec:
    """Describe a Keras Conv2D / DepthwiseConv2D / Conv2DTranspose / SeparableConv2D / Conv1D / DepthwiseConv1D /
    Conv3D layer called on a tensor of `input_shape`.

    input_shape: the full shape including batch, in the layer's data_format.
    """
    import keras

    if not is_conv_site(layer):
        raise ValueError(f"Layer '{layer.name}' of type {type(layer).__name__} is not a conv site; expected Keras's own "
                         f"Conv2D, DepthwiseConv2D, Conv2DTranspose, SeparableConv2D, Conv1D, DepthwiseConv1D or "
                         f"Conv3D.")
    if keras_class(layer) in (keras.layers.Conv1D, keras.layers.DepthwiseConv1D):
        return _spec_from_1d_layer(layer, input_shape)
    if keras_class(layer) is keras.layers.Conv3D:
        return _spec_from_3d_layer(layer, input_shape)
    config = layer.get_config()
    data_format = config.get("data_format") or "channels_last"
    shape = tuple(input_shape)
    if len(shape) != 4:
        raise ValueError(f"Layer '{layer.name}' received input of rank {len(shape)}; expected rank 4.")
    if data_format == "channels_first":
        batch, cin, h, w = shape
    else:
        batch, h, w, cin = shape
    activation = _activation_name(layer, config)
    dtype = _layer_dtype(layer)
    common = dict(
        in_channels=int(cin),
        kernel=tuple(config["kernel_size"]),
        height=None if h is None else int(h),
        width=None if w is None else int(w),
        batch=None if batch is None else int(batch),
        strides=tuple(config["strides"]),
        dilation=tuple(config["dilation_rate"]),
        padding=config["padding"],
        use_bias=bool(config["use_bias"]),
        activation=str(activation),
        dtype=dtype,
        data_format=data_format,
    )
    if keras_class(layer) is keras.layers.DepthwiseConv2D:
        m = int(config["depth_multiplier"])
        return ConvSpec(kind="depthwise_conv2d", filters=int(cin) * m, groups=int(cin), depth_multiplier=m, **common)
    if keras_class(layer) is keras.layers.SeparableConv2D:
        return ConvSpec(kind="separable_conv2d", filters=int(config["filters"]),
                        depth_multiplier=int(config["depth_multiplier"]), **common)
    if keras_class(layer) is keras.layers.Conv2DTranspose:
        op = config.get("output_padding")
        return ConvSpec(kind="conv2d_transpose", filters=int(config["filters"]),
                        output_padding=None if op is None else tuple(op), **common)
    return ConvSpec(kind="conv2d", filters=int(config["filters"]), groups=int(config.get("groups", 1)), **common)


def separable_stages(spec: ConvSpec):
    """(depthwise spec, pointwise spec) of a separable_conv2d spec, the two convolutions SeparableConv2D runs:
    what each stage's cost is estimated from."""
    mid = spec.in_channels * spec.depth_multiplier
    dw = ConvSpec(kind="depthwise_conv2d", in_channels=spec.in_channels, filters=mid, kernel=spec.kernel,
                  height=spec.height, width=spec.width, batch=spec.batch, strides=spec.strides,
                  dilation=spec.dilation, padding=spec.padding, groups=spec.in_channels,
                  depth_multiplier=spec.depth_multiplier, use_bias=False, dtype=spec.dtype,
                  data_format=spec.data_format)
    ho, wo = dw.output_hw()
    pw = ConvSpec(kind="conv2d", in_channels=mid, filters=spec.filters, kernel=(1, 1), height=ho, width=wo,
                  batch=spec.batch, use_bias=spec.use_bias, dtype=spec.dtype, data_format=spec.data_format)
    return dw, pw


def _activation_name(layer, config) -> str:
    import keras

    activation = config.get("activation", "linear")
    if not isinstance(activation, str):
        activation = keras.activations.serialize(layer.activation)
        if isinstance(activation, dict):
            activation = activation.get("config", {}).get("name", str(activation))
    return str(activation)


def _layer_dtype(layer) -> str:
    policy = getattr(layer, "dtype_policy", None)
    return getattr(policy, "name", None) or str(layer.compute_dtype)


def _spec_from_1d_layer(layer, input_shape) -> ConvSpec:
    """A Conv1D / DepthwiseConv1D on (batch, steps, C) (or (batch, C, steps)) as a height-1 spec (see KINDS_1D)."""
    import keras

    config = layer.get_config()
    data_format = config.get("data_format") or "channels_last"
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"Layer '{layer.name}' received input of rank {len(shape)}; expected rank 3.")
    if data_format == "channels_first":
        batch, cin, n = shape
    else:
        batch, n, cin = shape
    common = dict(
        in_channels=int(cin),
        kernel=(1, int(config["kernel_size"][0])),
        height=1,
        width=None if n is None else int(n),
        batch=None if batch is None else int(batch),
        strides=(1, int(config["strides"][0])),
        dilation=(1, int(config["dilation_rate"][0])),
        padding=config["padding"],
        use_bias=bool(config["use_bias"]),
        activation=_activation_name(layer, config),
        dtype=_layer_dtype(layer),
        data_format=data_format,
    )
    if keras_class(layer) is keras.layers.DepthwiseConv1D:
        m = int(config["depth_multiplier"])
        return ConvSpec(kind="depthwise_conv1d", filters=int(cin) * m, groups=int(cin), depth_multiplier=m, **common)
    return ConvSpec(kind="conv1d", filters=int(config["filters"]), groups=int(config.get("groups", 1)), **common)


def _spec_from_3d_layer(layer, input_shape) -> ConvSpec:
    """A Conv3D on (batch, D, H, W, C) (or (batch, C, D, H, W)): (height, width) pairs plus the depth fields."""
    config = layer.get_config()
    data_format = config.get("data_format") or "channels_last"
    shape = tuple(input_shape)
    if len(shape) != 5:
        raise ValueError(f"Layer '{layer.name}' received input of rank {len(shape)}; expected rank 5.")
    if data_format == "channels_first":
        batch, cin, d, h, w = shape
    else:
        batch, d, h, w, cin = shape
    k, st, dl = (tuple(int(v) for v in config[key]) for key in ("kernel_size", "strides", "dilation_rate"))
    return ConvSpec(
        kind="conv3d", in_channels=int(cin), filters=int(config["filters"]), kernel=k[1:],
        height=None if h is None else int(h), width=None if w is None else int(w),
        batch=None if batch is None else int(batch), strides=st[1:], dilation=dl[1:], padding=config["padding"],
        groups=int(config.get("groups", 1)), use_bias=bool(config["use_bias"]),
        activation=_activation_name(layer, config), dtype=_layer_dtype(layer), data_format=data_format,
        depth=None if d is None else int(d), kernel_depth=k[0], stride_depth=st[0], dilation_depth=dl[0],
    )
