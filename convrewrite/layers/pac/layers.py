"""The PAC Keras layers: PacConv2D, PacConv2DTranspose and PacPool2D, on a shared mixin that handles
guidance, kernel types, layouts and precision."""

from __future__ import annotations

import keras
from keras import ops

from ...shapes import pair, same_pads
from .kernel import accumulate_taps, edge_pad, kernel_dtype, pac_kernel, parse_kernel_type, resize_guidance, zero_pad
from .strategies import STRATEGIES, choose_strategy, pac_contract


# ---- the shared layer machinery ---------------------------------------------------------------------
class _PacMixin:
    """Kernel-type weights, guidance handling and config shared by the PAC layers.

    Extra weights (created in `_build_pac`, all scalars or per-guidance-channel vectors):
      kernel_blend  (scalar, only if kernel_blend is not None): K' = 1 + blend * (K - 1). blend = 0 makes
                    the layer exactly its plain counterpart for *any* guidance, and dK'/dblend = K - 1 is
                    nonzero wherever the guidance varies, so it learns from there (the conversion's start).
      guidance_scale (F,), only if learn_guidance_scale: f is multiplied by it before distances.
      inv_alpha, inv_lambda (scalars), only for 'inv_*' kernel types (non-trainable with '_fixed').
    """

    def _init_pac(self, kernel_type, normalize_kernel, kernel_blend, learn_guidance_scale, strategy=None):
        owner = type(self).__name__
        self.kernel_type = kernel_type
        self._family, self._inv_alpha0, self._inv_lambda0, self._inv_trainable = parse_kernel_type(kernel_type, owner)
        self.normalize_kernel = bool(normalize_kernel)
        if kernel_blend is not None:
            try:
                kernel_blend = float(kernel_blend)
            except (TypeError, ValueError):
                raise ValueError(f"Received invalid kernel_blend={kernel_blend!r} for {owner}; expected None or a float.") from None
        self.kernel_blend = kernel_blend
        self.learn_guidance_scale = bool(learn_guidance_scale)
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"Received invalid strategy={strategy!r} for {owner}; expected one of {STRATEGIES}.")
        self.strategy = strategy

    def _pac_config(self):
        cfg = {
            "kernel_type": self.kernel_type,
            "normalize_kernel": self.normalize_kernel,
            "kernel_blend": self.kernel_blend,
            "learn_guidance_scale": self.learn_guidance_scale,
        }
        if self.strategy is not None:
            cfg["strategy"] = self.strategy
        return cfg

    @staticmethod
    def _split_inputs(inputs, owner):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(
                f"{owner} received {type(inputs).__name__} input; expected a list [x, guidance] of two rank-4 tensors."
            )
        return inputs[0], inputs[1]

    def _check_shapes(self, x_shape, g_shape):
        owner = f"{type(self).__name__} '{self.name}'"
        for name, shape in (("x", x_shape), ("guidance", g_shape)):
            if len(shape) != 4:
                raise ValueError(f"{owner} received {name} of shape {tuple(shape)}; expected rank 4 (batch, H, W, C).")

    def _guidance_channels(self, g_shape):
        axis = 1 if getattr(self, "data_format", "channels_last") == "channels_first" else -1
        f = g_shape[axis]
        if f is None:
            raise ValueError(f"{type(self).__name__} '{self.name}' received guidance of shape {tuple(g_shape)} with unknown "
                             f"channels; expected a known number of guidance channels.")
        return int(f)

    def _build_pac(self, g_shape):
        f = self._guidance_channels(g_shape)
        self.guidance_channels = f
        if self.kernel_blend is not None:
            self.blend = self.add_weight(name="kernel_blend", shape=(),
                                         initializer=keras.initializers.Constant(self.kernel_blend), trainable=True)
        else:
            self.blend = None
        if self.learn_guidance_scale:
            self.guidance_scale = self.add_weight(name="guidance_scale", shape=(f,), initializer="ones", trainable=True)
        else:
            self.guidance_scale = None
        if self._family == "inv":
            self.inv_alpha = self.add_weight(name="inv_alpha", shape=(), trainable=self._inv_trainable,
                                             initializer=keras.initializers.Constant(self._inv_alpha0))
            self.inv_lambda = self.add_weight(name="inv_lambda", shape=(), trainable=self._inv_trainable,
                                              initializer=keras.initializers.Constant(self._inv_lambda0))

    def _kernel_fn(self, dtype):
        def fn(d2):
            if self._family == "gaussian":
                k = ops.exp(-0.5 * d2)
            else:
                # |alpha| + eps keeps a learned alpha valid; log1p keeps K(0) = 1 exactly.
                alpha = ops.abs(ops.cast(self.inv_alpha, dtype)) + 1e-6
                lam = ops.cast(self.inv_lambda, dtype)
                k = ops.exp(-0.5 * lam * ops.log1p(d2 / alpha))
            if self.blend is not None:
                k = 1.0 + ops.cast(self.blend, dtype) * (k - 1.0)
            return k

        return fn

    # -- build / shapes of the conv layers ([x, guidance] in, the conv's output shape out); PacPool2D has its own
    def build(self, input_shape):
        x_shape, g_shape = self._split_inputs(input_shape, type(self).__name__)
        self._check_shapes(x_shape, g_shape)
        super().build(tuple(x_shape))
        self.input_spec = None  # the base's spec describes one input; these layers take [x, guidance]
        self._build_pac(g_shape)

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and len(input_shape) == 2 and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        return super().compute_output_shape(tuple(input_shape))

    def _bias_activation_layout(self, y):
        """Bias, activation, and back to the layer's data_format: y: (N, Ho, Wo, O) channels-last."""
        if self.use_bias:
            y = y + ops.cast(self.bias, y.dtype)
        if self.activation is not None:
            y = self.activation(y)
        return _from_last(y, self.data_format)

    def _windows_and_kernel(self, x, g, kernel, fused=False):
        """Channels-last x, the adaptive kernel K over each output's window, the pads and the output size.

        x, g: the layer's inputs in its data_format. Pads follow Conv2D's (TF's asymmetric SAME); K is
        computed on the edge-padded guidance, normalized over real (unpadded) taps if asked.
        d2 and K are computed in float32 (float64 for float64 x) and K is returned in x's dtype.
        Returns x: (N, H, W, C), K: (N, Ho, Wo, kh*kw), pads ((top, bottom), (left, right)), (Ho, Wo)."""
        x, g = _to_last(x, self.data_format), _to_last(g, self.data_format)
        kdtype = kernel_dtype(x.dtype)
        g = ops.cast(g, kdtype)
        h, w = ops.shape(x)[1], ops.shape(x)[2]
        g = self._prepare_guidance(g, (x.shape[1], x.shape[2]), (h, w))
        strides, dilation = self.strides, self.dilation_rate
        eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
        if self.padding == "same":
            pads = (same_pads(h, eff[0], strides[0]), same_pads(w, eff[1], strides[1]))
            out_hw = (-(-h // strides[0]), -(-w // strides[1]))
        else:
            pads = ((0, 0), (0, 0))
            out_hw = ((h - eff[0]) // strides[0] + 1, (w - eff[1]) // strides[1] + 1)
        mask = zero_pad(ops.ones((1, h, w, 1), kdtype), pads) if self.normalize_kernel else None
        center = (kernel[0] // 2, kernel[1] // 2)
        k = pac_kernel(edge_pad(g, pads), out_hw, kernel, dilation, strides, center,
                       self._kernel_fn(kdtype), mask=mask, normalize=self.normalize_kernel, fused=fused)
        return x, ops.cast(k, x.dtype), pads, out_hw

    def _prepare_guidance(self, g, static_size, size):
        """g: (N, Hg, Wg, F) in the kernel dtype -> (N, Ho, Wo, F), resized if needed and scaled."""
        g = resize_guidance(g, static_size, size)
        if self.guidance_scale is not None:
            g = g * ops.cast(self.guidance_scale, g.dtype)
        return g

    # Conv2D/Conv2DTranspose save only kernel and bias; the PAC weights must travel too.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)


def _to_last(t, data_format):
    return ops.transpose(t, (0, 2, 3, 1)) if data_format == "channels_first" else t


def _from_last(t, data_format):
    return ops.transpose(t, (0, 3, 1, 2)) if data_format == "channels_first" else t


def _hw(shape, data_format):
    return (shape[2], shape[3]) if data_format == "channels_first" else (shape[1], shape[2])


# ---- PacConv2D --------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="convrewrite")
class PacConv2D(_PacMixin, keras.layers.Conv2D):
    """Pixel-adaptive Conv2D, called as `layer([x, guidance])`.

    x: (batch, H, W, Cin); guidance: (batch, H, W, F) (channels_first: (batch, C, H, W) for both).
    Returns (batch, Ho, Wo, filters), Ho/Wo as Conv2D computes them.

    Every Conv2D argument keeps its meaning (weights `kernel` (kh, kw, Cin, filters) and `bias` are named
    and shaped as Conv2D's), except groups, which must be 1. PAC arguments:
      kernel_type: 'gaussian' (default) or 'inv_<alpha>_<lambda>[_fixed]' (see parse_kernel_type).
      normalize_kernel: divide K by its sum over the window's valid taps (pacnet's normalize_kernel).
      kernel_blend: None (K is used as is) or the initial value of a learnable blend b,
        K' = 1 + b * (K - 1); b = 0 is exactly Conv2D whatever the guidance.
      learn_guidance_scale: learn a per-channel scale of the guidance inside the distance.
      strategy: 'auto' | 'patch' | 'shift' | 'wide' (see pac_contract for each one's peak memory; auto uses
        choose_strategy). Both compute the same sum; they differ in speed and memory only.

    Peak forward memory besides x, guidance and the output (P = batch*Ho*Wo, T = kh*kw), in values:
      K: ~P*(3*T + 2*F) (per-tap distances, stacked d2, K; two guidance taps at a time; patch and wide
      compute d2 in one XLA computation, ~2*P*T);
      plus patch: 2*P*T*Cin; shift: P*(Cin + 2*filters) (one tap in flight, then the running sum);
      wide: batch*Hp*Wp*T*filters (every tap's product at every padded input pixel; Hp, Wp padded).
    Measured (benchmarks/pac.py, float32, 4x64x64, 32 -> 32, F=8, k=7; peak-RSS growth of a fresh
    process over its first call, so including the output and padded copies): forward patch ~220 MB,
    shift ~35 MB, Conv2D ~5 MB; forward+backward patch ~355 MB, shift ~225 MB, Conv2D ~19 MB: the
    backward pass keeps every tap's slice of x, so training memory grows with kh*kw for both strategies.
    wide (same measurement, which includes its XLA compilations' memory): forward ~200 MB at k=7, ~36 MB
    at k=3 (shift ~22 MB there); forward+backward ~415 MB at k=7, ~93 MB at k=3.

    Raises:
        ValueError: groups != 1, an unknown kernel_type or strategy, or an argument Conv2D refuses.

    Example:
        >>> image = keras.Input((64, 64, 3)); features = keras.Input((64, 64, 16))
        >>> y = PacConv2D(16, 5, padding="same")([features, image])   # image-guided 5x5 conv
    """

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None, dilation_rate=(1, 1),
                 activation=None, use_bias=True, kernel_type="gaussian", normalize_kernel=False, kernel_blend=None,
                 learn_guidance_scale=False, strategy="auto", **kwargs):
        groups = kwargs.get("groups", 1)
        if groups != 1:
            raise ValueError(f"Received groups={groups} for PacConv2D; expected 1 (grouped PAC is not implemented).")
        super().__init__(filters=filters, kernel_size=kernel_size, strides=strides, padding=padding,
                         data_format=data_format, dilation_rate=dilation_rate, activation=activation,
                         use_bias=use_bias, **kwargs)
        self._init_pac(kernel_type, normalize_kernel, kernel_blend, learn_guidance_scale, strategy)
        self.input_spec = None  # Conv2D's spec describes one input; this layer takes [x, guidance].

    def resolved_strategy(self, out_pixels=None):
        if self.strategy != "auto":
            return self.strategy
        cin = self.kernel.shape[2]
        return choose_strategy(self.kernel_size[0] * self.kernel_size[1], cin, self.filters, out_pixels,
                               strides=self.strides)

    def call(self, inputs):
        x, g = self._split_inputs(inputs, "PacConv2D")
        strategy = self.resolved_strategy()
        x, k, pads, out_hw = self._windows_and_kernel(x, g, self.kernel_size, fused=strategy != "shift")
        kernel, strides, dilation = self.kernel_size, self.strides, self.dilation_rate
        y = pac_contract(zero_pad(x, pads), k, ops.cast(self.kernel, x.dtype), out_hw, kernel, dilation, strides,
                         strategy)
        return self._bias_activation_layout(y)

    def get_config(self):
        config = super().get_config()
        config.pop("groups", None)
        config.update(self._pac_config())
        return config


# ---- PacConv2DTranspose -----------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="convrewrite")
class PacConv2DTranspose(_PacMixin, keras.layers.Conv2DTranspose):
    """Pixel-adaptive Conv2DTranspose (joint upsampling), called as `layer([x, guidance])`.

    x: (batch, H, W, Cin) low resolution; guidance: (batch, Ho, Wo, F) at the *output* resolution
    (resized bilinearly to it when it is not). Returns (batch, Ho, Wo, filters) with Conv2DTranspose's
    output size (padding 'same': H*s; 'valid': H*s + max(k - s, 0)). Weights as Conv2DTranspose's:
    `kernel` (kh, kw, filters, Cin), `bias` (filters,).

    Computed as a stride-1 PAC of the zero-upsampled input (x[i] placed at output pixel i*s) with the
    spatially flipped, transposed kernel; the guidance of input pixel i is the guidance at output pixel
    i*s, f_i of output pixel o is the guidance at o, and with normalize_kernel only taps that land on an
    input pixel count. Constant guidance gives exactly Conv2DTranspose. dilation_rate and output_padding
    are not supported (must be 1 / None). Memory as PacConv2D's at the output resolution.

    Raises:
        ValueError: dilation_rate or output_padding given, or an argument Conv2DTranspose refuses.

    Example:
        >>> low = keras.Input((16, 16, 8)); image = keras.Input((64, 64, 3))
        >>> up = PacConv2DTranspose(8, 8, strides=4, padding="same")([low, image])   # (64, 64, 8)
    """

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None, activation=None,
                 use_bias=True, kernel_type="gaussian", normalize_kernel=False, kernel_blend=None,
                 learn_guidance_scale=False, strategy="auto", **kwargs):
        for name, ok in (("dilation_rate", lambda v: v in (1, (1, 1), [1, 1])), ("output_padding", lambda v: v is None)):
            if name in kwargs and not ok(kwargs[name]):
                raise ValueError(f"Received {name}={kwargs[name]!r} for PacConv2DTranspose; expected the default "
                                 f"({'1' if name == 'dilation_rate' else 'None'}).")
        super().__init__(filters=filters, kernel_size=kernel_size, strides=strides, padding=padding,
                         data_format=data_format, activation=activation, use_bias=use_bias, **kwargs)
        self._init_pac(kernel_type, normalize_kernel, kernel_blend, learn_guidance_scale, strategy)
        self.input_spec = None

    def _out_size(self, n, k, s):
        if self.padding == "same":
            return n * s
        return n * s + max(k - s, 0)

    def call(self, inputs):
        x, g = self._split_inputs(inputs, "PacConv2DTranspose")
        x, g = _to_last(x, self.data_format), _to_last(g, self.data_format)
        kdtype = kernel_dtype(x.dtype)
        g = ops.cast(g, kdtype)
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        h, w = ops.shape(x)[1], ops.shape(x)[2]
        oh, ow = self._out_size(h, kh, sh), self._out_size(w, kw, sw)
        static_out = (None if x.shape[1] is None else self._out_size(x.shape[1], kh, sh),
                      None if x.shape[2] is None else self._out_size(x.shape[2], kw, sw))
        g = self._prepare_guidance(g, static_out, (oh, ow))
        # Output o receives x[i] * W[t] where o = i*s + t - pb (pb: the forward conv's SAME 'before' pad).
        pb = [(max(k - s, 0) // 2) if self.padding == "same" else 0 for k, s in ((kh, sh), (kw, sw))]
        z = _upsample_zeros(x, (sh, sw))  # (N, (H-1)*sh + 1, (W-1)*sw + 1, C)
        pads = ((kh - 1 - pb[0], oh - 1 + pb[0] - (h - 1) * sh), (kw - 1 - pb[1], ow - 1 + pb[1] - (w - 1) * sw))
        mask = None
        if self.normalize_kernel:
            mask = zero_pad(_upsample_zeros(ops.ones((1, h, w, 1), kdtype), (sh, sw)), pads)
        # g has the output size; padding it like z aligns g_pad[m] with z_pad[m] (x[i] sits at g[i*s]).
        center = (kh - 1 - pb[0], kw - 1 - pb[1])
        wk = ops.transpose(ops.flip(ops.cast(self.kernel, x.dtype), axis=(0, 1)), (0, 1, 3, 2))  # (kh, kw, Cin, O)
        strategy = self.strategy if self.strategy != "auto" else choose_strategy(kh * kw, wk.shape[2], self.filters)
        k = pac_kernel(edge_pad(g, pads), (oh, ow), (kh, kw), (1, 1), (1, 1), center, self._kernel_fn(kdtype),
                       mask=mask, normalize=self.normalize_kernel, fused=strategy != "shift")
        k = ops.cast(k, x.dtype)
        y = pac_contract(zero_pad(z, pads), k, wk, (oh, ow), (kh, kw), (1, 1), (1, 1), strategy)
        return self._bias_activation_layout(y)

    def get_config(self):
        config = super().get_config()
        config.pop("dilation_rate", None)
        config.pop("output_padding", None)
        config.update(self._pac_config())
        return config


def _upsample_zeros(x, strides):
    """x: (N, H, W, C) -> (N, (H-1)*sh + 1, (W-1)*sw + 1, C) with x[i, j] at (i*sh, j*sw), zeros between."""
    sh, sw = strides
    if (sh, sw) == (1, 1):
        return x
    n, h, w, c = ops.shape(x)
    z = ops.expand_dims(ops.expand_dims(x, 2), 4)  # (N, H, 1, W, 1, C)
    z = ops.pad(z, [(0, 0), (0, 0), (0, sh - 1), (0, 0), (0, sw - 1), (0, 0)])
    z = ops.reshape(z, (n, h * sh, w * sw, c))
    return z[:, :(h - 1) * sh + 1, :(w - 1) * sw + 1, :]


# ---- PacPool2D --------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="convrewrite")
class PacPool2D(_PacMixin, keras.layers.Layer):
    """Pixel-adaptive pooling (pacnet's PacPool2d): out_c[i] = sum_j K(f_i, f_j) x_c[j], per channel.

    Called as `layer([x, guidance])`; x: (batch, H, W, C), guidance: (batch, H, W, F) -> (batch, Ho, Wo, C).
    normalize_kernel defaults to True, making it a guidance-weighted average pool; with constant guidance
    it then equals AveragePooling2D(pool_size, strides, padding) exactly (both exclude padded taps).
    Memory: K (batch*Ho*Wo*T) plus one tap of x at a time.

    Raises:
        ValueError: a pool_size, strides or dilation_rate that is not a positive int or pair.

    Example:
        >>> pooled = PacPool2D(3, strides=1, padding="same")([features, image])   # edge-aware smoothing
    """

    def __init__(self, pool_size, strides=None, padding="valid", dilation_rate=(1, 1), data_format=None,
                 kernel_type="gaussian", normalize_kernel=True, kernel_blend=None, learn_guidance_scale=False, **kwargs):
        super().__init__(**kwargs)
        owner = "PacPool2D"
        self.pool_size = pair(pool_size, "pool_size", owner)
        self.strides = self.pool_size if strides is None else pair(strides, "strides", owner)
        self.dilation_rate = pair(dilation_rate, "dilation_rate", owner)
        if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
            raise ValueError(f"Received invalid padding={padding!r} for {owner}; expected 'same' or 'valid'.")
        self.padding = padding.lower()
        data_format = keras.config.image_data_format() if data_format is None else str(data_format).lower()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"Received invalid data_format={data_format!r} for {owner}; expected "
                             f"'channels_last' or 'channels_first'.")
        self.data_format = data_format
        self._init_pac(kernel_type, normalize_kernel, kernel_blend, learn_guidance_scale)

    def build(self, input_shape):
        x_shape, g_shape = self._split_inputs(input_shape, "PacPool2D")
        self._check_shapes(x_shape, g_shape)
        self._build_pac(g_shape)
        self.built = True

    def compute_output_shape(self, input_shape):
        x_shape, _ = self._split_inputs(input_shape, "PacPool2D")
        cf = self.data_format == "channels_first"
        h, w = _hw(x_shape, self.data_format)
        out = []
        for n, k, d, s in zip((h, w), self.pool_size, self.dilation_rate, self.strides):
            eff = (k - 1) * d + 1
            out.append(None if n is None else (-(-n // s) if self.padding == "same" else (n - eff) // s + 1))
        c = x_shape[1] if cf else x_shape[-1]
        return (x_shape[0], c, *out) if cf else (x_shape[0], *out, c)

    def call(self, inputs):
        x, g = self._split_inputs(inputs, "PacPool2D")
        x, k, pads, out_hw = self._windows_and_kernel(x, g, self.pool_size)
        kernel, strides, dilation = self.pool_size, self.strides, self.dilation_rate
        y = accumulate_taps(zero_pad(x, pads), kernel, dilation, strides, out_hw,
                             lambda t, xt: xt * k[..., t:t + 1])
        return _from_last(y, self.data_format)

    def get_config(self):
        config = super().get_config()
        config.update({"pool_size": self.pool_size, "strides": self.strides, "padding": self.padding,
                       "dilation_rate": self.dilation_rate, "data_format": self.data_format})
        config.update(self._pac_config())
        return config
