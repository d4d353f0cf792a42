"""Pixel-adaptive convolution (PAC, Su et al., CVPR 2019) as Keras 3 layers, and the Conv2D -> PAC rewrite.

    v'_i = sum_j K(f_i, f_j) W[p_i - p_j] v_j + b

x (the values v) is convolved as by Conv2D, but every tap of every output pixel is re-weighted by a kernel
K of the guidance features f: the feature at the output pixel (the window's centre tap) against the
feature under the tap. Everything here is `keras.ops`; there is no loop over pixels, only over the kh*kw
kernel taps, which are static.

Conventions shared by every layer in this module (and by `convrewrite.reference.pac_conv2d`):

* **Guidance padding.** Where the window leaves the image (SAME padding), x is zero-padded exactly as
  Conv2D pads it, and the *guidance* is edge-padded (the nearest real pixel is repeated). Edge padding
  means the centre feature f_i is always a real guidance value (with even kernels or strides the centre
  tap can fall in the padded zone) and constant guidance gives K = 1 on every tap, padded or not.
  (pacnet zero-pads the guidance, which makes K != 1 at the borders even for constant guidance.)
* **Padded taps are not pixels.** With `normalize_kernel=True`, K is multiplied by a 0/1 validity mask
  before it is summed, so the normaliser counts only taps that land on real pixels (as
  AveragePooling2D's SAME padding does). Without normalisation the mask is unnecessary: x is 0 there.
* **Exact reductions.** With constant guidance (any constant), K = 1 on every tap for every kernel type,
  so PacConv2D equals Conv2D with the same kernel/bias for every padding/stride/dilation, and
  PacConv2DTranspose equals Conv2DTranspose. With `normalize_kernel=True` and constant guidance the
  output is Conv2D(x) / n_i + b, n_i = the number of window taps on real pixels (kh*kw for VALID);
  PacPool2D with constant guidance equals AveragePooling2D exactly.
* **Guidance size.** guidance: (batch, Hg, Wg, F). When (Hg, Wg) differs from the size K is evaluated at
  (x's size for PacConv2D/PacPool2D, the *output* size for PacConv2DTranspose), the guidance is resized
  bilinearly (half-pixel centres, no antialiasing) to that size first. Sizes known at trace time use
  keras.ops.image.resize; when either is unknown (None H/W in a tf.function or a Keras Input) the same
  resize runs with the run-time size (`backend.resize_bilinear`), so results never depend on whether
  shapes were static; to an equal size that resize is the identity, bit for bit.
* **Precision.** The guidance distances d2 and the adaptive kernel K are computed in float32 (float64
  for float64 layers) whatever the compute dtype, and K is cast to it afterwards: under mixed_float16 an
  unnormalised guidance (e.g. 0..255 RGB) would overflow d2 to inf in float16 and turn the inv kernels'
  gradients into NaN (log1p(inf) * 0). Only the contraction with x runs in the compute dtype.
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np
from keras import ops

from ..errors import PlanError
from ..registry import Implementation, SitePolicy, canary_spec, io_bytes, register
from ..shapes import pair, same_pads
from ..spec import ConvSpec
from . import backend

__all__ = [
    "PacConv2D", "PacConv2DTranspose", "PacPool2D", "PacImplementation",
    "parse_kernel_type", "choose_strategy", "STRATEGIES",
]

STRATEGIES = ("auto", "patch", "shift", "wide")
_INV_RE = re.compile(r"^inv_([0-9.eE+-]+)_([0-9.eE+-]+)(_fixed)?$")


# ---- kernel types ---------------------------------------------------------------------------------
def parse_kernel_type(kernel_type, owner="PacConv2D"):
    """'gaussian' -> ('gaussian', None, None, False); 'inv_<alpha>_<lambda>[_fixed]' -> ('inv', a, l, trainable).

    gaussian: K = exp(-0.5 * d2).
    inv:      K = (1 + d2 / alpha) ** (-lambda / 2), alpha > 0, lambda > 0 (learnable unless `_fixed`).
    d2 = ||f_i - f_j||^2. Both give K = 1 at d2 = 0, which the exact reductions rely on. pacnet's
    `inv_alpha_lambda` is `alpha + d2 ** (lambda / 2)`, which is not 1 at d2 = 0 (nor decreasing), so
    this is the inverse-multiquadric member of that family normalised to K(0) = 1, not a copy of it.
    """
    if kernel_type == "gaussian":
        return "gaussian", None, None, False
    if isinstance(kernel_type, str):
        m = _INV_RE.match(kernel_type)
        if m:
            alpha, lam = float(m.group(1)), float(m.group(2))
            if alpha > 0 and lam > 0:
                return "inv", alpha, lam, m.group(3) is None
    raise ValueError(
        f"Received invalid kernel_type={kernel_type!r} for {owner}; expected 'gaussian' or "
        f"'inv_<alpha>_<lambda>' with positive numbers, optionally suffixed '_fixed' (e.g. 'inv_1_1')."
    )


def choose_strategy(kernel_taps: int, in_channels: int, filters: int, out_pixels=None, strides=(1, 1)) -> str:
    """The contraction strategy `strategy="auto"` picks, from static shape facts only.

    wide runs one (pixels, C) @ (C, kh*kw*O) matmul and one XLA-fused shift-and-accumulate (with a
    hand-written, also fused, gradient): the fewest ops, so on CPU, where the per-tap strategies are
    dominated by the overhead of their ~4*kh*kw small ops, it is the fastest at stride 1
    (benchmarks/pac.py, 4x64x64, 32 -> 32: forward ~1.5-1.8x and forward+backward ~2.1-2.7x faster than
    shift and patch for k = 3, 5, 7). It loses with C <= 4 (its T*O-wide product dwarfs the T*C
    patch; patch ~1.5x faster forward) and at stride s > 1 would compute s*s times the products needed.
    Its product holds kh*kw*O values per padded input pixel, so auto takes it only while
    kh*kw*O <= 4096 (16 KiB per pixel in float32; a memory bound, not a measured crossover).
    Otherwise: shift runs kh*kw (pixels x C) @ (C x O) matmuls and, in the forward pass, never holds
    more than one tap's copy of x; patch builds the (pixels, kh*kw*C) patch matrix and runs one matmul, and wins when C is so small
    (e.g. RGB input, C <= 4) that kh*kw separate matmuls are dominated by their per-op overhead.
    Memory differs (see pac_contract): pass strategy="shift" explicitly where the forward peak matters.
    """
    del out_pixels  # kept in the signature: the rule may grow to use them
    if in_channels <= 4:
        return "patch"
    if tuple(strides) == (1, 1) and kernel_taps * filters <= 4096:
        return "wide"
    return "shift"


# ---- shape helpers --------------------------------------------------------------------------------
def _edge_pad(t, pads):
    """Edge-replicate t: (N, H, W, C) by pads ((top, bottom), (left, right)), sizes possibly dynamic.

    A gather with clipped indices, so it is one op per axis and works with unknown H/W."""
    for axis, (before, after) in zip((1, 2), pads):
        if isinstance(before, int) and isinstance(after, int) and before == 0 and after == 0:
            continue
        n = ops.shape(t)[axis]
        idx = ops.clip(ops.arange(-before, n + after), 0, n - 1)
        t = ops.take(t, idx, axis=axis)
    return t


def _zero_pad(t, pads):
    if all(isinstance(p, int) and p == 0 for pair in pads for p in pair):
        return t
    return ops.pad(t, [(0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)])


def _tap_offset(index, kernel, dilation):
    """(row, col) offset in the padded input of tap `index` (row-major over the kh*kw taps)."""
    return (index // kernel[1]) * dilation[0], (index % kernel[1]) * dilation[1]


def _tap(t, index, kernel, dilation, strides, out_hw, after=None):
    """Tap `index` (row-major over the kh*kw taps) of every window of padded t: (N, Ho, Wo, C).

    Tap (a, b) of output pixel (i, j) is t[i*sh + a*dh, j*sw + b*dw]: one strided slice covering every
    pixel at once. after: None or a tensor; in a graph the slice is then not taken before `after` is
    computed (see `backend.after`), which is what bounds the sequential loops' live tensors to one tap."""
    (sh, sw), (ho, wo) = strides, out_hw
    r0, c0 = _tap_offset(index, kernel, dilation)
    return backend.after([after], lambda: t[:, r0:r0 + (ho - 1) * sh + 1:sh, c0:c0 + (wo - 1) * sw + 1:sw, :])


def _tap_slices(t, kernel, dilation, strides, out_hw):
    """All kh*kw taps of padded t at once: a list of (N, Ho, Wo, C) slices, row-major over taps.

    Every slice is a copy, and all of them are live together (kh*kw times t's size): use it only where
    they are all needed at once (the patch tensor, the small validity mask)."""
    return [_tap(t, i, kernel, dilation, strides, out_hw) for i in range(kernel[0] * kernel[1])]


def _accumulate_taps(t, kernel, dilation, strides, out_hw, part):
    """sum over taps i of part(i, tap_i) with tap_i = _tap(t, i, ...): (N, Ho, Wo, O), taps taken one at a time.

    Tap i is sliced only after the partial sum over taps < i exists, so at any time only the running
    sum and one tap's slice and partial product are live: forward peak ~ N*Ho*Wo*(C + 2*O) values
    besides t, never the kh*kw slices. (A single n-ary add, tf.add_n, would need every partial product
    alive at once, and measured no faster.) Under autodiff each tap's slice is kept for the backward
    pass, so training memory still grows with kh*kw."""
    total = None
    for i in range(kernel[0] * kernel[1]):
        p = part(i, _tap(t, i, kernel, dilation, strides, out_hw, after=total))
        total = p if total is None else ops.add(total, p)
    return total


def _dense(t, w):
    """t: (N, H, W, C) @ w: (C, O) -> (N, H, W, O) as one 2-D matmul (a rank-4 matmul would batch)."""
    shape = ops.shape(t)
    y = ops.matmul(ops.reshape(t, (-1, shape[-1])), w)
    return ops.reshape(y, (shape[0], shape[1], shape[2], ops.shape(w)[-1]))


def _kernel_dtype(dtype):
    """The dtype d2 and K are computed in: float64 for float64 layers, else float32 (see Precision above)."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def _resize_guidance(guidance, static_size, size):
    """Bilinearly resize guidance: (N, Hg, Wg, F) to (N, Ho, Wo, F) when its size differs from (Ho, Wo).

    static_size: (Ho, Wo) as Python ints or None where unknown at trace time; size: (Ho, Wo) as ints or
    scalar tensors (the run-time values). All four sizes static: resized only if they differ (Keras op).
    Any of them unknown: always resized to the run-time size (`backend.resize_bilinear`, the same
    arithmetic), which is exactly the identity when the sizes turn out equal, so a shape-polymorphic
    trace computes what a static one does instead of reading the guidance's top-left corner."""
    gh, gw = guidance.shape[1], guidance.shape[2]
    g32 = ops.cast(guidance, "float32")
    if None in (gh, gw) or None in tuple(static_size):
        return ops.cast(backend.resize_bilinear(g32, size), guidance.dtype)
    if (gh, gw) == tuple(static_size):
        return guidance
    resized = ops.image.resize(g32, tuple(static_size), interpolation="bilinear", antialias=False,
                               data_format="channels_last")
    return ops.cast(resized, guidance.dtype)


# ---- the adaptive kernel and the two contractions ---------------------------------------------------
def pac_kernel(gp, out_hw, kernel, dilation, strides, center, kernel_fn, mask=None, normalize=False,
               fused=True):
    """K for every output pixel and tap: (N, Ho, Wo, kh*kw).

    gp: padded guidance (N, Hp, Wp, F) in the kernel dtype (float32 or float64, see Precision above);
    center: the tap (a, b) whose guidance is f_i; kernel_fn: d2 -> K (already including any blend);
    mask: padded 0/1 validity (1, Hp, Wp, 1) or None. K comes back in gp's dtype. d2 is computed for
    every window inside gp ((Hp - eff) // s + 1 rows) and cropped to out_hw where that is fewer.
    fused=True: d2 = sum_F (f_tap - f_centre)^2 for all taps is one XLA computation (`backend.jit`;
    ~4*T small TF ops otherwise): XLA fuses the taps' slices and differences into the reduction, so
    only d2 is materialised; the first call per input shape compiles it (its compiler memory shows in
    a fresh process's peak RSS). fused=False (the memory-lean shift strategy and PacPool2D): the taps
    are sliced and reduced one at a time as TF ops (each after the previous tap's distance exists), so
    ~2 taps' N*Ho*Wo*F are live. Memory either way: d2 and K, a few N*Ho*Wo*kh*kw values.
    """
    if fused:
        d2 = _guidance_d2(gp, tuple(kernel), tuple(dilation), tuple(strides), tuple(center))
        if tuple(d2.shape[1:3]) != tuple(out_hw) or None in tuple(d2.shape[1:3]):
            d2 = d2[:, :out_hw[0], :out_hw[1]]  # PacConv2DTranspose pads its guidance past the last window
    else:
        d2 = _tap_distances(gp, kernel, dilation, strides, center, out_hw, ordered=True)
    k = kernel_fn(d2)
    if mask is not None:
        k = k * ops.concatenate(_tap_slices(mask, kernel, dilation, strides, out_hw), axis=-1)
    if normalize:
        norm = ops.sum(k, axis=-1, keepdims=True)
        # A window with no valid tap (possible only for pathological paddings) gives 0, not NaN.
        k = k / (norm + ops.cast(ops.equal(norm, 0), k.dtype))
    return k


def _out_hw_of_padded(t, kernel, dilation, strides):
    """(Ho, Wo) of a VALID window pass over padded t (the padding was chosen to give the layer's size)."""
    return tuple((ops.shape(t)[a] - ((k - 1) * d + 1)) // s + 1 for a, k, d, s in zip((1, 2), kernel, dilation, strides))


def _tap_distances(gp, kernel, dilation, strides, center, out_hw, ordered=False):
    """d2: (N, Ho, Wo, T), the squared guidance distance of every tap to the centre tap.

    One reduction per tap, then a stack: fewer live values than stacking (N, Ho, Wo, T, F) first.
    ordered: slice each tap only after the previous tap's distance exists (`_tap`'s `after`), so that
    about two taps' N*Ho*Wo*F values are live in a graph."""
    fc = _tap(gp, center[0] * kernel[1] + center[1], kernel, dilation, strides, out_hw)
    dists = []
    for i in range(kernel[0] * kernel[1]):
        ft = _tap(gp, i, kernel, dilation, strides, out_hw, after=dists[-1] if ordered and dists else None)
        dists.append(ops.sum(ops.square(ft - fc), axis=-1))
    return ops.stack(dists, axis=-1)


def _guidance_d2_body(gp, kernel, dilation, strides, center):
    """`_tap_distances` over every window inside gp (XLA-compiled, see `pac_kernel`)."""
    return _tap_distances(gp, kernel, dilation, strides, center, _out_hw_of_padded(gp, kernel, dilation, strides))


def _wide_accumulate_body(y, k, kernel, dilation, strides):
    """sum over taps t of K_t * (tap t of y's t-th O-channel block): (N, Ho, Wo, O) (XLA-compiled).

    y: (N, Hp, Wp, T*O) = padded x @ [W_0 | ... | W_{T-1}]; k: (N, Ho, Wo, T)."""
    t = kernel[0] * kernel[1]
    o = y.shape[-1] // t
    out_hw = (ops.shape(k)[1], ops.shape(k)[2])
    total = None
    for i in range(t):
        p = _tap(y, i, kernel, dilation, strides, out_hw)[..., i * o:(i + 1) * o] * k[..., i:i + 1]
        total = p if total is None else total + p
    return total


def _wide_accumulate_grad_body(y, k, upstream, kernel, dilation):
    """Gradient of `_wide_accumulate_body` at stride 1 (XLA-compiled): (dy, dk).

    dy is one concatenation of the taps' zero-padded upstream * K_t blocks, dk one stack of per-tap
    channel sums; autodiff of the slices instead pads a whole T*O-channel tensor per tap (measured 6x
    slower for 7x7)."""
    t, o = kernel[0] * kernel[1], y.shape[-1] // (kernel[0] * kernel[1])
    hp, wp, ho, wo = ops.shape(y)[1], ops.shape(y)[2], ops.shape(k)[1], ops.shape(k)[2]
    dy, dk = [], []
    for i in range(t):
        r0, c0 = _tap_offset(i, kernel, dilation)
        dy.append(ops.pad(upstream * k[..., i:i + 1], [(0, 0), (r0, hp - r0 - ho), (c0, wp - c0 - wo), (0, 0)]))
        dk.append(ops.sum(y[:, r0:r0 + ho, c0:c0 + wo, i * o:(i + 1) * o] * upstream, axis=-1))
    return ops.concatenate(dy, axis=-1), ops.stack(dk, axis=-1)


_guidance_d2 = backend.jit(_guidance_d2_body)
_wide_accumulate_fwd = backend.jit(_wide_accumulate_body)
_wide_accumulate_grad = backend.jit(_wide_accumulate_grad_body)


def _wide_accumulate(y, k, kernel, dilation, strides):
    """`_wide_accumulate_body`, XLA-compiled, with the hand-written gradient at stride 1."""
    if tuple(strides) != (1, 1):
        return _wide_accumulate_fwd(y, k, kernel, dilation, strides)
    return backend.custom_gradient(lambda yy, kk: _wide_accumulate_fwd(yy, kk, kernel, dilation, strides),
                                   lambda yy, kk, g: _wide_accumulate_grad(yy, kk, g, kernel, dilation))(y, k)


def pac_contract(xp, k, w, out_hw, kernel, dilation, strides, strategy):
    """sum over taps t of K_t * (x_t @ W_t): (N, Ho, Wo, O).

    xp: zero-padded x (N, Hp, Wp, C); k: (N, Ho, Wo, T); w: (kh, kw, C, O); strategy 'patch' | 'shift' | 'wide'.

    patch: stack the taps of x into (N, Ho, Wo, T, C), scale by K, one (pixels, T*C) @ (T*C, O) matmul.
           Peak forward memory ~ 2 * N*Ho*Wo*T*C values (the taps or the patch tensor, and its K-scaled copy).
    shift: for each tap, slice x, one (pixels, C) @ (C, O) matmul, scale by K's tap (before the matmul
           when C < O, after it otherwise), and add it to a running sum (`_accumulate_taps`): each tap
           is sliced only once the previous partial sum exists, so the k*k*C patch tensor never exists
           and forward peak is ~ N*Ho*Wo*(C + 2*O) values besides xp and K.
           (Under autodiff every tap's slice of x, and with C >= O its unscaled product, is kept for the
           backward pass, N*Ho*Wo*T*C (+ T*O) values: training memory is patch-like for both strategies.)
    wide:  one (padded pixels, C) @ (C, T*O) matmul gives every tap's product x @ W_t at every padded
           input pixel, Y: (N, Hp, Wp, T*O); then one XLA computation (`backend.jit`) slices tap t's
           O-block of Y, scales it by K's tap and accumulates, fused into a single loop. Fewest ops:
           2 large ones instead of ~4*T small ones. Peak forward memory ~ N*Hp*Wp*T*O values (Y) besides
           xp and K (with stride s, Y covers all s*s input pixels per output pixel: use it at stride 1).
           Backward (hand-written at stride 1, also one XLA computation) keeps Y and K, and its
           gradient dY is N*Hp*Wp*T*O values again.
    """
    kh, kw, c, o = w.shape
    if strategy == "wide":
        wt = ops.reshape(ops.transpose(ops.reshape(w, (kh * kw, c, o)), (1, 0, 2)), (c, kh * kw * o))
        return _wide_accumulate(_dense(xp, wt), k, tuple(kernel), tuple(dilation), tuple(strides))
    if strategy == "patch":
        p = ops.stack(_tap_slices(xp, kernel, dilation, strides, out_hw), axis=3) * ops.expand_dims(k, -1)
        shape = ops.shape(p)  # p: (N, Ho, Wo, T, C)
        p = ops.reshape(p, (shape[0], shape[1], shape[2], kh * kw * c))
        return _dense(p, ops.reshape(w, (kh * kw * c, o)))
    wt = ops.reshape(w, (kh * kw, c, o))

    def part(t, xt):
        kt = k[..., t:t + 1]
        return _dense(xt * kt, wt[t]) if c < o else _dense(xt, wt[t]) * kt

    return _accumulate_taps(xp, kernel, dilation, strides, out_hw, part)


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
        kdtype = _kernel_dtype(x.dtype)
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
        mask = _zero_pad(ops.ones((1, h, w, 1), kdtype), pads) if self.normalize_kernel else None
        center = (kernel[0] // 2, kernel[1] // 2)
        k = pac_kernel(_edge_pad(g, pads), out_hw, kernel, dilation, strides, center,
                       self._kernel_fn(kdtype), mask=mask, normalize=self.normalize_kernel, fused=fused)
        return x, ops.cast(k, x.dtype), pads, out_hw

    def _prepare_guidance(self, g, static_size, size):
        """g: (N, Hg, Wg, F) in the kernel dtype -> (N, Ho, Wo, F), resized if needed and scaled."""
        g = _resize_guidance(g, static_size, size)
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
        y = pac_contract(_zero_pad(x, pads), k, ops.cast(self.kernel, x.dtype), out_hw, kernel, dilation, strides,
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
        kdtype = _kernel_dtype(x.dtype)
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
            mask = _zero_pad(_upsample_zeros(ops.ones((1, h, w, 1), kdtype), (sh, sw)), pads)
        # g has the output size; padding it like z aligns g_pad[m] with z_pad[m] (x[i] sits at g[i*s]).
        center = (kh - 1 - pb[0], kw - 1 - pb[1])
        wk = ops.transpose(ops.flip(ops.cast(self.kernel, x.dtype), axis=(0, 1)), (0, 1, 3, 2))  # (kh, kw, Cin, O)
        strategy = self.strategy if self.strategy != "auto" else choose_strategy(kh * kw, wk.shape[2], self.filters)
        k = pac_kernel(_edge_pad(g, pads), (oh, ow), (kh, kw), (1, 1), (1, 1), center, self._kernel_fn(kdtype),
                       mask=mask, normalize=self.normalize_kernel, fused=strategy != "shift")
        k = ops.cast(k, x.dtype)
        y = pac_contract(_zero_pad(z, pads), k, wk, (oh, ow), (kh, kw), (1, 1), (1, 1), strategy)
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
        y = _accumulate_taps(_zero_pad(x, pads), kernel, dilation, strides, out_hw,
                             lambda t, xt: xt * k[..., t:t + 1])
        return _from_last(y, self.data_format)

    def get_config(self):
        config = super().get_config()
        config.update({"pool_size": self.pool_size, "strides": self.strides, "padding": self.padding,
                       "dilation_rate": self.dilation_rate, "data_format": self.data_format})
        config.update(self._pac_config())
        return config


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
            found = [s for s in model_graph.find_sites(selector) if self.applicable(s.spec)[0]]
            if not found:
                raise PlanError(f"pac layers {selector.pattern!r} match no Conv2D site PAC can replace; expected "
                                f"names or a regex matching some of {paths}.")
        else:
            selector = list(selector)
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
        config = layer.get_config()
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
