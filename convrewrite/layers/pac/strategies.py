"""Contracting x with the adaptive kernel and the weights: the three strategies (patch, shift, wide) and
the rule `auto` uses to choose among them."""

from __future__ import annotations

from keras import ops

from .. import backend

from .kernel import accumulate_taps, tap, tap_offset, tap_slices


STRATEGIES = ("auto", "patch", "shift", "wide")


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


def _dense(t, w):
    """t: (N, H, W, C) @ w: (C, O) -> (N, H, W, O) as one 2-D matmul (a rank-4 matmul would batch)."""
    shape = ops.shape(t)
    y = ops.matmul(ops.reshape(t, (-1, shape[-1])), w)
    return ops.reshape(y, (shape[0], shape[1], shape[2], ops.shape(w)[-1]))


def _wide_accumulate_body(y, k, kernel, dilation, strides):
    """sum over taps t of K_t * (tap t of y's t-th O-channel block): (N, Ho, Wo, O) (XLA-compiled).

    y: (N, Hp, Wp, T*O) = padded x @ [W_0 | ... | W_{T-1}]; k: (N, Ho, Wo, T)."""
    t = kernel[0] * kernel[1]
    o = y.shape[-1] // t
    out_hw = (ops.shape(k)[1], ops.shape(k)[2])
    total = None
    for i in range(t):
        p = tap(y, i, kernel, dilation, strides, out_hw)[..., i * o:(i + 1) * o] * k[..., i:i + 1]
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
        r0, c0 = tap_offset(i, kernel, dilation)
        dy.append(ops.pad(upstream * k[..., i:i + 1], [(0, 0), (r0, hp - r0 - ho), (c0, wp - c0 - wo), (0, 0)]))
        dk.append(ops.sum(y[:, r0:r0 + ho, c0:c0 + wo, i * o:(i + 1) * o] * upstream, axis=-1))
    return ops.concatenate(dy, axis=-1), ops.stack(dk, axis=-1)


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
           when C < O, after it otherwise), and add it to a running sum (`accumulate_taps`): each tap
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
        p = ops.stack(tap_slices(xp, kernel, dilation, strides, out_hw), axis=3) * ops.expand_dims(k, -1)
        shape = ops.shape(p)  # p: (N, Ho, Wo, T, C)
        p = ops.reshape(p, (shape[0], shape[1], shape[2], kh * kw * c))
        return _dense(p, ops.reshape(w, (kh * kw * c, o)))
    wt = ops.reshape(w, (kh * kw, c, o))

    def part(t, xt):
        kt = k[..., t:t + 1]
        return _dense(xt * kt, wt[t]) if c < o else _dense(xt, wt[t]) * kt

    return accumulate_taps(xp, kernel, dilation, strides, out_hw, part)
