"""FFT convolution along one axis: drop-in Conv1D / DepthwiseConv1D for long kernels (audio, sequences).

The same method as `layers/fft.py` (read its docstring first), along one axis with 1-D transforms:
  1. x -> (batch, Cin, n) float32 -> rfft zero-padded to P                 X: (batch, Cin, P//2+1)
  2. per frequency bin, per group: (batch x Cg) @ (Cg x Og) against the cached conjugate kernel spectrum
     (a broadcast multiply when Cg == 1: depthwise), as in the 2-D layers
  3. irfft, keep every stride-th output, bias, activation, back to the layer's layout.
Padding is folded into the kernel: SAME by TF's before-pad, 'causal' by a before-pad of (k - 1) * d (every
output reads only inputs at or before it), as a circular shift of the kernel, so the input itself is
never padded in full mode. Tiled (overlap-save) mode cuts the padded sequence into overlapping frames of
P samples, each giving P - k_eff + 1 outputs: spectra depend on the frame, not the sequence, so memory stays
bounded and the length may be unknown until run time.

Why 1-D transforms and not the 2-D layers on a 1 x n image: TF's rfft on (..., n) runs about 2x faster than
rfft2d on (..., 1, n) (see `backend.rfft`), and the transforms are most of the work here.

Specs: a 1-D site is a height-1 ConvSpec (see `convrewrite.spec.KINDS_1D`); the cost features below are
the 2-D ones with fft_h = 1, so fits of the `fft` / `fft-tiled` implementations cover both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import keras
from keras import ops

from ..shapes import effective_length
from ..spec import ConvSpec
from . import backend, real_dft
from .fft import (
    AxisLayout, _dilate, _dtype_max, _transform_work, FFTLayout, default_tile, float32_kernel_reader, float32_weights,
    full_axis_layout, guarded, next_fast_length, register_fft_kind, size_max, tiled_axis_layout, use_cached_transform,
)

__all__ = ["FFTConv1D", "FFTDepthwiseConv1D", "axis_layout_1d", "fft1d_cost_features"]

_TRIVIAL = AxisLayout(fft=1, pad_before=0, out=1, stride=1, kernel=1)
"""The height axis of a 1-D site's layout (FFTLayout has two axes; a 1-D one keeps rows trivial)."""


def _causal_layout(axis: AxisLayout, n: Optional[int], k_eff: int, stride: int, tiled: bool) -> AxisLayout:
    """`axis` (computed as SAME, which has the same output count) with causal's before-pad of k_eff - 1."""
    if n is None:
        return axis
    if tiled:
        return dataclasses.replace(axis, pad_before=k_eff - 1)
    out = -(-n // stride)
    span = (out - 1) * stride + 1
    # input at [0, n); output i reads i - (k_eff - 1) .. i: wrapped negatives must land at >= n
    need = max(n + k_eff - 1, span, k_eff, 1)
    return AxisLayout(fft=next_fast_length(need), pad_before=k_eff - 1, out=out, stride=stride, kernel=k_eff)


def axis_layout_1d(n: Optional[int], k_eff: int, stride: int = 1, padding: str = "valid", tile_size=None) -> AxisLayout:
    """The transform layout of a 1-D FFT correlation of an n-long input (None: unknown) with a k_eff-long kernel.

    tile_size: "full" (one transform per sequence; needs n), a positive int (overlap-save frames giving that
    many stride-1 outputs, grown to fill a fast transform), or None: tiled when n is unknown or tiling is
    estimated clearly cheaper (sequences much longer than the kernel), else full.
    padding: 'valid', 'same' or 'causal'."""
    base = "same" if padding == "causal" else padding
    if tile_size == "full":
        if n is None:
            raise ValueError("Received tile_size='full' with an unknown sequence length; expected a known length, "
                             "or tile_size=None / an int for overlap-save tiling.")
        if padding == "causal":
            return _causal_layout(None, n, k_eff, stride, tiled=False)
        return full_axis_layout(n, k_eff, stride, padding)
    if tile_size is not None:
        axis = tiled_axis_layout(k_eff, int(tile_size), stride, base, n)
        return _causal_layout(axis, n, k_eff, stride, tiled=True) if padding == "causal" else axis
    tiled = axis_layout_1d(n, k_eff, stride, padding, default_tile(k_eff))
    if n is None:
        return tiled
    full = axis_layout_1d(n, k_eff, stride, padding, "full")
    if _transform_work(FFTLayout(_TRIVIAL, tiled)) < 0.75 * _transform_work(FFTLayout(_TRIVIAL, full)):
        return tiled
    return full


def _tile_of(tile_size):
    """A 1-D tile from what the `fft` / `fft-tiled` implementations hand over: an int, "full", None, or a
    (rows, cols) pair of which the cols entry counts (a height-1 spec's rows are trivial)."""
    if isinstance(tile_size, (list, tuple)):
        return tile_size[-1]
    return tile_size


# ---- cost features --------------------------------------------------------------------------------
def fft1d_cost_features(spec: ConvSpec, tile_size=None) -> dict:
    """`fft.fft_cost_features` for a 1-D site (same keys, so one fit covers 1-D and 2-D sites): fft_h = 1,
    fft_w = P, bins = P // 2 + 1, a transform costs ~2.5 P log2 P."""
    k_eff = spec.effective_kernel[1]
    n = spec.width
    axis = axis_layout_1d(n, k_eff, spec.strides[1], spec.padding, _tile_of(tile_size))
    b = spec.batch or 1
    tiles = max(-(-(axis.span or 1) // axis.tile), 1) if (axis.tile is not None and n is not None) else 1
    p = axis.fft
    bins = p // 2 + 1
    groups = spec.groups
    cg, og = spec.in_channels // groups, spec.filters // groups
    fwd, inv = b * tiles * spec.in_channels, b * tiles * spec.filters
    one = 2.5 * p * math.log2(max(p, 2))
    matmul_flops = 8.0 * bins * groups * (b * tiles) * cg * og
    _, lo = spec.output_hw()
    n_in, n_out = b * (n or 0) * spec.in_channels, b * (lo or 0) * spec.filters
    waste = (axis.span or 1) / max(lo or 1, 1)
    return {
        "macs": float(spec.macs() or 0), "fft_h": 1.0, "fft_w": float(p), "tiles": float(tiles), "bins": float(bins),
        "forward_transforms": float(fwd), "inverse_transforms": float(inv), "fft_flops": one * (fwd + inv),
        "matmul_m": float(b * tiles), "matmul_k": float(cg), "matmul_n": float(og),
        "matmul_batch": float(bins * groups), "matmul_flops": matmul_flops, "flops": one * (fwd + inv) + matmul_flops,
        "spectrum_bytes": (8.0 if cg == 1 else 16.0) * bins * cg * spec.filters,
        "bytes": 4.0 * (n_in + n_out) + 8.0 * bins * b * tiles * (spec.in_channels + spec.filters),
        "strided_waste": float(waste),
        "fft_flops_log": one * (fwd + inv) * math.log2(max(4.0 * (n_in + n_out), 2.0)) / 30.0,
        "strided_flops": one * (fwd + inv) * (waste - 1.0),
        "calls": 1.0,
    }


# ---- the computation ------------------------------------------------------------------------------
def kernel_spectrum_1d(kernel, axis: AxisLayout, groups: int, dilation: int = 1):
    """Conjugate spectrum of a grouped 1-D kernel, laid out for the per-bin products.

    kernel: (k, Cg, Cout) float32 (a depthwise (k, C, M) kernel is passed as (k, 1, C*M) with groups=C).
    Returns the real block form (bins, G, 2 Cg, 2 Og) float32 when Cg > 1, else (G, Og, bins) complex64."""
    kernel = _dilate(kernel, (dilation,))
    k, cg, cout = kernel.shape
    p, bins = axis.fft, axis.fft // 2 + 1
    kk = ops.pad(ops.transpose(kernel, (1, 2, 0)), [(0, 0), (0, 0), (0, p - k)])  # (Cg, Cout, P)
    if axis.tile is None and axis.pad_before:
        kk = ops.roll(kk, shift=-axis.pad_before, axis=2)  # output i reads input i - pad_before + u
    spec = backend.conj(backend.rfft(kk, p))  # (Cg, Cout, bins)
    og = cout // groups
    if cg == 1:
        return ops.reshape(spec, (groups, og, bins))
    spec = ops.reshape(spec, (cg, groups, og, bins))
    return backend.real_block(ops.transpose(spec, (3, 1, 0, 2)))


def spectral_correlate_1d(x, spectrum, p: int, groups: int, cg: int):
    """Stride-1 correlation of a batch of sequences with a cached kernel spectrum.

    x: (B, Cin, n) float32 with n <= P -> (B, Cout, P) float32; outputs at [0, span). (For a format without
    complex tensors: real matrix products, as the 2-D `spectral_correlate`.)"""
    if backend.real_arithmetic():
        return real_dft.correlate(x, spectrum, (p,), groups, cg)
    bins = p // 2 + 1
    xf = backend.rfft(x, p)  # (B, Cin, bins)
    if cg == 1:
        yf = backend.complex_multiply(ops.reshape(xf, (-1, groups, 1, bins)), spectrum)  # (B, G, Og, bins)
        og = spectrum.shape[1]
    else:
        xf = ops.transpose(ops.reshape(xf, (-1, groups, cg, bins)), (3, 1, 0, 2))  # (bins, G, B, Cg)
        yf = ops.transpose(backend.real_block_matmul(xf, spectrum), (2, 1, 3, 0))  # (B, G, Og, bins)
        og = spectrum.shape[-1] // 2
    return backend.irfft(ops.reshape(yf, (-1, groups * og, bins)), p)


def _dynamic_axis_1d(n, axis: AxisLayout, padding: str):
    """(out, pad_before, span, tiles) along an axis whose length n may be a scalar tensor."""
    k, s = axis.kernel, axis.stride
    if padding in ("same", "causal"):
        out = (n + s - 1) // s
        if padding == "causal":
            pb = k - 1
        else:
            pb = size_max((out - 1) * s + k - n, 0) // 2
    else:
        out = (n - k + s) // s
        out = size_max(out, 0)
        pb = 0
    span = (out - 1) * s + 1
    tiles = (span + axis.tile - 1) // axis.tile
    return out, pb, span, tiles


class _FFTConv1DMixin:
    """The 1-D FFT machinery shared by FFTConv1D and FFTDepthwiseConv1D (the Keras base gives the rest)."""

    def _init_fft(self, tile_size):
        if isinstance(tile_size, (list, tuple)) and len(tile_size) == 1:  # Keras-style 1-tuples
            tile_size = tile_size[0]
        if tile_size is not None and tile_size != "full" and not (
                isinstance(tile_size, int) and not isinstance(tile_size, bool) and tile_size > 0):
            raise ValueError(f"Received invalid tile_size={tile_size!r} for {type(self).__name__} '{self.name}'; "
                             f"expected None (automatic), 'full' or a positive int.")
        self.tile_size = tile_size
        self._fft_axis = None
        self._built_n = None
        self._spectrum_cache = None

    def _length(self, shape):
        return shape[2] if self.data_format == "channels_first" else shape[1]

    @property
    def _k_eff(self):
        return effective_length(self.kernel_size[0], self.dilation_rate[0])

    def _make_axis(self, n):
        return axis_layout_1d(n, self._k_eff, self.strides[0], self.padding, self.tile_size)

    def _grouping(self):
        """(groups, Cg, Cout) of the kernel as `kernel_spectrum_1d` takes it."""
        raise NotImplementedError

    def build(self, input_shape):
        super().build(input_shape)
        n = self._length(input_shape)
        self._built_n = n
        try:
            self._fft_axis = self._make_axis(n)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__} '{self.name}': {exc}") from None
        groups, cg, cout = self._grouping()
        self._spectrum_cache = backend.SpectrumCache(
            (self.kernel_size[0], cg, cout), self._spectrum_shape(self._fft_axis),
            "complex64" if cg == 1 else "float32", name=f"{self.name}_spectrum_cache")

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """TF's object graph minus the spectrum cache in checkpoints (derived state, see layers/fft.py)."""
        children = super()._trackable_children(save_type, **kwargs)
        if save_type != "savedmodel":
            children.pop("_spectrum_cache", None)
        return children

    def _spectrum_shape(self, axis):
        groups, cg, cout = self._grouping()
        bins = axis.fft // 2 + 1
        return (groups, cout // groups, bins) if cg == 1 else (bins, groups, 2 * cg, 2 * (cout // groups))

    @property
    def fft_layout(self) -> Optional[AxisLayout]:
        """The transform layout chosen at build (None before build)."""
        return self._fft_axis

    def _float32_weights(self):
        return float32_weights(self)

    def _spectrum(self, kernel, axis, training):
        groups, cg, cout = self._grouping()
        kernel = ops.reshape(kernel, (self.kernel_size[0], cg, cout))

        def compute(k):
            return kernel_spectrum_1d(k, axis, groups, self.dilation_rate[0])

        def bound(k):
            return ops.max(ops.sum(ops.abs(k), axis=(0, 1)))

        key = (axis.fft, None if axis.tile is not None else axis.pad_before)
        built = (self._fft_axis.fft, None if self._fft_axis.tile is not None else self._fft_axis.pad_before)
        if not use_cached_transform(training, self._spectrum_cache is not None and key == built):
            return compute(kernel), bound(kernel)
        read = float32_kernel_reader(self._float32_weights, ops.shape(kernel))
        return backend.cached_transform(read, self._spectrum_cache, compute, aux=bound)

    def _axis_for(self, n):
        axis = self._fft_axis
        if axis is None or (axis.tile is None and n != self._built_n):
            axis = self._make_axis(n)  # another length than built for: correct, uncached
        return axis

    def call(self, inputs, training=None):
        """The FFT result where it provably equals Keras's, else Keras's own computation for this call (NaN/Inf
        or overflowing inputs, tiny ones; see `layers/fft.py`'s `_fft_is_exact`)."""
        n = self._length(inputs.shape)
        if self.padding == "valid" and n is not None and n < self._k_eff:
            return super().call(inputs)  # Keras's own handling (an error), not an empty FFT result
        x = ops.cast(inputs, "float32")
        kernel, bias = self._float32_weights()
        axis = self._axis_for(n)
        spectrum, lip = self._spectrum(kernel, axis, training)
        return guarded(self, inputs, self._fft_is_exact(x, lip, bias, axis),
                       lambda: self._fft_call(x, spectrum, bias, axis),
                       lambda t: ops.cast(super(_FFTConv1DMixin, self).call(t), self.compute_dtype))

    def _fft_is_exact(self, x, lip, bias, axis):
        """Scalar bool, the 2-D layers' guard with one axis: ||x||_2 L finite, P^2 ||x||_2 L below float32's
        max / 4, above 2^-40; under float16, max|x| L + max|b| below 65504 / 4; VALID with a length known only
        now: at least the kernel."""
        scale = backend.l2_norm(x) * lip
        p = float(axis.fft)
        ok = ops.logical_and(scale < 3.4028234663852886e38 / 4 / p ** 2, scale > 2.0 ** -40)
        compute_max = _dtype_max(self.compute_dtype)
        if compute_max < 1e30:
            m = ops.maximum(ops.max(x), -ops.min(x))
            out_bound = m * lip if bias is None else m * lip + ops.max(ops.abs(bias))
            ok = ops.logical_and(ok, out_bound < compute_max / 4)
        if self.padding == "valid" and self._length(x.shape) is None:
            ok = ops.logical_and(ok, self._length(ops.shape(x)) >= self._k_eff)
        return ok

    def _fft_call(self, x, spectrum, bias, axis):
        groups, cg, _ = self._grouping()
        run = self._tiled if axis.tile is not None else self._full
        y = run(x, spectrum, axis, groups, cg)
        if bias is not None:
            y = y + ops.reshape(bias, (1, -1, 1) if self.data_format == "channels_first" else (1, 1, -1))
        y = ops.cast(y, self.compute_dtype)
        return self.activation(y) if self.activation is not None else y

    def _full(self, x, spectrum, axis, groups, cg):
        last = self.data_format == "channels_last"
        if last:
            x = ops.transpose(x, (0, 2, 1))
        y = spectral_correlate_1d(x, spectrum, axis.fft, groups, cg)[:, :, : axis.span : axis.stride]
        return ops.transpose(y, (0, 2, 1)) if last else y

    def _tiled(self, x, spectrum, axis, groups, cg):
        """Overlap-save: the padded sequence cut into frames of P samples, each giving `tile` outputs."""
        last = self.data_format == "channels_last"
        lax = 1 if last else 2
        shape = ops.shape(x)
        n = shape[lax]
        out, pb, span, tiles = _dynamic_axis_1d(n, axis, self.padding)
        need = tiles * axis.tile + axis.kernel - 1  # padded inputs the frames read
        pads = [(0, 0)] * 3
        pads[lax] = (pb, size_max(need - pb - n, 0))
        x = ops.pad(x, pads)
        x = x[:, :need, :] if last else x[:, :, :need]  # no extra frames from a VALID + stride tail
        x = backend.frame(x, axis.fft, axis.tile, axis=lax)  # (N, T, P, C) or (N, C, T, P)
        x = ops.transpose(x, (0, 1, 3, 2) if last else (0, 2, 1, 3))  # (N, T, C, P)
        cin = x.shape[2]
        y = spectral_correlate_1d(ops.reshape(x, (-1, cin, axis.fft)), spectrum, axis.fft, groups, cg)
        y = y[:, :, : axis.tile]
        cout = y.shape[1]
        y = ops.reshape(y, (shape[0], tiles, cout, axis.tile))
        if last:
            y = ops.reshape(ops.transpose(y, (0, 1, 3, 2)), (shape[0], tiles * axis.tile, cout))
            return y[:, :span: axis.stride, :]
        y = ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (shape[0], cout, tiles * axis.tile))
        return y[:, :, :span: axis.stride]

    def get_config(self):
        config = super().get_config()
        config["tile_size"] = self.tile_size
        return config


@keras.saving.register_keras_serializable(package="convrewrite")
class FFTConv1D(_FFTConv1DMixin, keras.layers.Conv1D):
    """keras.layers.Conv1D computed through 1-D FFTs, with cached kernel spectra.

    Takes every Conv1D argument (padding 'valid', 'same' or 'causal'; strides, dilation, groups, both data
    formats) and holds the same weights (kernel (k, Cin // groups, filters), bias (filters,)), plus:
      tile_size: None (automatic), "full" (one transform per sequence) or an int: overlap-save frames of that
        many outputs (spectra then depend on the frame, not the sequence length).
    x: (batch, steps, Cin) (or channels_first) -> same as Conv1D. Computes in float32 under any policy; calls
    whose input holds NaN/Inf or values that could overflow the transforms run Keras's own Conv1D instead.

    Raises:
        ValueError: an argument Conv1D refuses, or a tile_size that is not None, "full" or a positive int.

    Example:
        >>> layer = FFTConv1D(16, 251, padding="causal")      # a 251-tap causal conv through FFTs
    """

    convrewrite_keras_class = keras.layers.Conv1D
    convrewrite_extra_config = ("tile_size",)

    def __init__(self, *args, tile_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fft(tile_size)

    def _grouping(self):
        return self.groups, self._kernel.shape[1], self.filters


@keras.saving.register_keras_serializable(package="convrewrite")
class FFTDepthwiseConv1D(_FFTConv1DMixin, keras.layers.DepthwiseConv1D):
    """keras.layers.DepthwiseConv1D computed through 1-D FFTs, with cached kernel spectra.

    Same arguments and weights as DepthwiseConv1D (kernel (k, C, depth_multiplier), bias (C * M,); padding
    'causal' too), plus `tile_size` as in FFTConv1D. Output channel c * M + m, as Keras.

    Example:
        >>> layer = FFTDepthwiseConv1D(1024, padding="same")  # a 1024-tap depthwise conv through FFTs
    """

    convrewrite_keras_class = keras.layers.DepthwiseConv1D
    convrewrite_extra_config = ("tile_size",)

    def __init__(self, *args, tile_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fft(tile_size)

    def _grouping(self):
        c, m = self.kernel.shape[1], self.kernel.shape[2]
        return c, 1, c * m


def _make_layer(layer, spec, tile_size):
    cls = FFTDepthwiseConv1D if spec.kind == "depthwise_conv1d" else FFTConv1D
    return cls.from_config({**layer.get_config(), "tile_size": _tile_of(tile_size)})


register_fft_kind(("conv1d", "depthwise_conv1d"), (FFTConv1D, FFTDepthwiseConv1D), _make_layer, fft1d_cost_features)
