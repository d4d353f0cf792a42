"""The adaptive kernel: kernel types, guidance distances per tap, K, and the tap/padding helpers the
contractions share. Shapes are channels_last: gp (N, Hp, Wp, F) padded guidance, K (N, Ho, Wo, taps)."""

from __future__ import annotations

import re

import keras
from keras import ops

from .. import backend


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


# ---- shape helpers --------------------------------------------------------------------------------
def edge_pad(t, pads):
    """Edge-replicate t: (N, H, W, C) by pads ((top, bottom), (left, right)), sizes possibly dynamic.

    A gather with clipped indices, so it is one op per axis and works with unknown H/W."""
    for axis, (before, after) in zip((1, 2), pads):
        if isinstance(before, int) and isinstance(after, int) and before == 0 and after == 0:
            continue
        n = ops.shape(t)[axis]
        idx = ops.clip(ops.arange(-before, n + after), 0, n - 1)
        t = ops.take(t, idx, axis=axis)
    return t


def zero_pad(t, pads):
    if all(isinstance(p, int) and p == 0 for pair in pads for p in pair):
        return t
    return ops.pad(t, [(0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)])


def tap_offset(index, kernel, dilation):
    """(row, col) offset in the padded input of tap `index` (row-major over the kh*kw taps)."""
    return (index // kernel[1]) * dilation[0], (index % kernel[1]) * dilation[1]


def tap(t, index, kernel, dilation, strides, out_hw, after=None):
    """Tap `index` (row-major over the kh*kw taps) of every window of padded t: (N, Ho, Wo, C).

    Tap (a, b) of output pixel (i, j) is t[i*sh + a*dh, j*sw + b*dw]: one strided slice covering every
    pixel at once. after: None or a tensor; in a graph the slice is then not taken before `after` is
    computed (see `backend.after`), which is what bounds the sequential loops' live tensors to one tap."""
    (sh, sw), (ho, wo) = strides, out_hw
    r0, c0 = tap_offset(index, kernel, dilation)
    return backend.after([after], lambda: t[:, r0:r0 + (ho - 1) * sh + 1:sh, c0:c0 + (wo - 1) * sw + 1:sw, :])


def tap_slices(t, kernel, dilation, strides, out_hw):
    """All kh*kw taps of padded t at once: a list of (N, Ho, Wo, C) slices, row-major over taps.

    Every slice is a copy, and all of them are live together (kh*kw times t's size): use it only where
    they are all needed at once (the patch tensor, the small validity mask)."""
    return [tap(t, i, kernel, dilation, strides, out_hw) for i in range(kernel[0] * kernel[1])]


def accumulate_taps(t, kernel, dilation, strides, out_hw, part):
    """sum over taps i of part(i, tap_i) with tap_i = tap(t, i, ...): (N, Ho, Wo, O), taps taken one at a time.

    Tap i is sliced only after the partial sum over taps < i exists, so at any time only the running
    sum and one tap's slice and partial product are live: forward peak ~ N*Ho*Wo*(C + 2*O) values
    besides t, never the kh*kw slices. (A single n-ary add, tf.add_n, would need every partial product
    alive at once, and measured no faster.) Under autodiff each tap's slice is kept for the backward
    pass, so training memory still grows with kh*kw."""
    total = None
    for i in range(kernel[0] * kernel[1]):
        p = part(i, tap(t, i, kernel, dilation, strides, out_hw, after=total))
        total = p if total is None else ops.add(total, p)
    return total


def kernel_dtype(dtype):
    """The dtype d2 and K are computed in: float64 for float64 layers, else float32 (see Precision above)."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def resize_guidance(guidance, static_size, size):
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
        k = k * ops.concatenate(tap_slices(mask, kernel, dilation, strides, out_hw), axis=-1)
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
    ordered: slice each tap only after the previous tap's distance exists (`tap`'s `after`), so that
    about two taps' N*Ho*Wo*F values are live in a graph."""
    fc = tap(gp, center[0] * kernel[1] + center[1], kernel, dilation, strides, out_hw)
    dists = []
    for i in range(kernel[0] * kernel[1]):
        ft = tap(gp, i, kernel, dilation, strides, out_hw, after=dists[-1] if ordered and dists else None)
        dists.append(ops.sum(ops.square(ft - fc), axis=-1))
    return ops.stack(dists, axis=-1)


def _guidance_d2_body(gp, kernel, dilation, strides, center):
    """`_tap_distances` over every window inside gp (XLA-compiled, see `pac_kernel`)."""
    return _tap_distances(gp, kernel, dilation, strides, center, _out_hw_of_padded(gp, kernel, dilation, strides))


_guidance_d2 = backend.jit(_guidance_d2_body)
