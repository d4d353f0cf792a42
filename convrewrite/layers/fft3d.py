"""FFT convolution over volumes: a drop-in Conv3D for large 3-D kernels (video, medical volumes).

The method of `layers/fft.py` with three axes (read its docstring first): x -> (batch, Cin, D, H, W) float32
-> rfft3d zero-padded to (P, Q, R); per frequency bin and group one (batch x Cg) @ (Cg x Og) product against
the cached conjugate kernel spectrum (a broadcast multiply when Cg == 1); irfft3d, every stride-th output,
bias, activation. SAME padding is folded into the kernel as a circular shift (`fft.full_axis_layout`, per axis).

A k^3 kernel costs k^3 multiply-adds per output and channel pair directly, so the FFT pays from much smaller
kernels than in 2-D (see the README). Full-volume mode only: one transform per volume, so the spatial size
must be known when a call is traced; a call on a volume of unknown size runs Keras's own Conv3D.

Specs: a Conv3D site's ConvSpec holds the (height, width) pairs plus the depth fields (spec.DEPTH_FIELDS).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import keras
from keras import ops

from ..spec import ConvSpec
from . import backend, real_dft
from .fft import (
    AxisLayout, _dilate, _dtype_max, float32_kernel_reader, float32_weights, full_axis_layout, guarded,
    register_fft_kind, use_cached_transform,
)

__all__ = ["FFTConv3D", "volume_layout", "fft3d_cost_features"]


def volume_layout(size, kernel_eff, strides, padding) -> Tuple[AxisLayout, AxisLayout, AxisLayout]:
    """One full-volume `AxisLayout` per axis (depth, height, width) for a (D, H, W) input (all known)."""
    if any(n is None for n in size):
        raise ValueError(f"Received an unknown spatial size {size}; expected a known (D, H, W) for a full-volume FFT.")
    return tuple(full_axis_layout(n, k, s, padding) for n, k, s in zip(size, kernel_eff, strides))


def _bins(axes) -> int:
    p, q, r = (a.fft for a in axes)
    return p * q * (r // 2 + 1)


def fft3d_cost_features(spec: ConvSpec, tile_size=None) -> dict:
    """`fft.fft_cost_features`' keys for a Conv3D spec (fft_h = P x Q: depth and height transform points
    together, so the 2-D fits' terms keep their meaning per transform point; fft_w = R)."""
    size = (spec.depth, spec.height, spec.width)
    eff = ((spec.kernel_depth - 1) * spec.dilation_depth + 1, *spec.effective_kernel)
    axes = volume_layout(size, eff, (spec.stride_depth, *spec.strides), spec.padding)
    p, q, r = (a.fft for a in axes)
    b, groups = spec.batch or 1, spec.groups
    cg, og = spec.in_channels // groups, spec.filters // groups
    bins = _bins(axes)
    fwd, inv = b * spec.in_channels, b * spec.filters
    one = 2.5 * p * q * r * math.log2(max(p * q * r, 2))
    matmul_flops = 8.0 * bins * groups * b * cg * og
    ho, wo = spec.output_hw()
    do = spec.output_depth()
    n_in = b * spec.depth * spec.height * spec.width * spec.in_channels
    n_out = b * do * ho * wo * spec.filters
    spans = 1
    for a in axes:
        spans *= a.span or 1
    waste = spans / max(do * ho * wo, 1)
    return {
        "macs": float(spec.macs() or 0), "fft_h": float(p * q), "fft_w": float(r), "tiles": 1.0, "bins": float(bins),
        "forward_transforms": float(fwd), "inverse_transforms": float(inv), "fft_flops": one * (fwd + inv),
        "matmul_m": float(b), "matmul_k": float(cg), "matmul_n": float(og), "matmul_batch": float(bins * groups),
        "matmul_flops": matmul_flops, "flops": one * (fwd + inv) + matmul_flops,
        "spectrum_bytes": (8.0 if cg == 1 else 16.0) * bins * cg * spec.filters,
        "bytes": 4.0 * (n_in + n_out) + 8.0 * bins * b * (spec.in_channels + spec.filters),
        "strided_waste": float(waste),
        "fft_flops_log": one * (fwd + inv) * math.log2(max(4.0 * (n_in + n_out), 2.0)) / 30.0,
        "strided_flops": one * (fwd + inv) * (waste - 1.0),
        "calls": 1.0,
    }


def kernel_spectrum_3d(kernel, axes, groups: int, dilation=(1, 1, 1)):
    """Conjugate spectrum of a grouped kernel (kd, kh, kw, Cg, Cout) float32 for the per-bin products:
    real block form (bins, G, 2 Cg, 2 Og) when Cg > 1, else (G, Og, bins) complex64."""
    kernel = _dilate(kernel, dilation)
    kd, kh, kw, cg, cout = kernel.shape
    p, q, r = (a.fft for a in axes)
    k = ops.transpose(kernel, (3, 4, 0, 1, 2))  # (Cg, Cout, kd, kh, kw)
    k = ops.pad(k, [(0, 0), (0, 0), (0, p - kd), (0, q - kh), (0, r - kw)])
    shifts = tuple(-a.pad_before for a in axes)
    if any(shifts):
        k = ops.roll(k, shift=shifts, axis=(2, 3, 4))  # SAME: output i reads input i - pad_before + u
    spec = backend.conj(backend.rfft3d(k, (p, q, r)))
    og, bins = cout // groups, _bins(axes)
    if cg == 1:
        return ops.reshape(spec, (groups, og, bins))
    spec = ops.reshape(spec, (cg, groups, og, bins))
    return backend.real_block(ops.transpose(spec, (3, 1, 0, 2)))


def spectral_correlate_3d(x, spectrum, axes, groups: int, cg: int):
    """x: (B, Cin, d, h, w) float32 -> (B, Cout, P, Q, R) float32, stride-1 outputs at [0, span) per axis. (For a
    format without complex tensors: real matrix products, as the 2-D `spectral_correlate`.)"""
    p, q, r = (a.fft for a in axes)
    if backend.real_arithmetic():
        return real_dft.correlate(x, spectrum, (p, q, r), groups, cg)
    bins = _bins(axes)
    xf = backend.rfft3d(x, (p, q, r))
    if cg == 1:
        yf = backend.complex_multiply(ops.reshape(xf, (-1, groups, 1, bins)), spectrum)
        og = spectrum.shape[1]
    else:
        xf = ops.transpose(ops.reshape(xf, (-1, groups, cg, bins)), (3, 1, 0, 2))
        yf = ops.transpose(backend.real_block_matmul(xf, spectrum), (2, 1, 3, 0))
        og = spectrum.shape[-1] // 2
    return backend.irfft3d(ops.reshape(yf, (-1, groups * og, p, q, r // 2 + 1)), (p, q, r))


@keras.saving.register_keras_serializable(package="convrewrite")
class FFTConv3D(keras.layers.Conv3D):
    """keras.layers.Conv3D computed through 3-D FFTs over the whole volume, with cached kernel spectra.

    Takes every Conv3D argument (groups, strides, dilation, same / valid, both data formats) and holds the same
    weights (kernel (kd, kh, kw, Cin // groups, filters), bias (filters,)), plus `tile_size`: None or "full"
    (both: one transform per volume; kept for the `fft` implementation's uniform options).
    x: (batch, D, H, W, Cin) (or channels_first) -> same as Conv3D. Computes in float32 under any policy; calls
    whose input holds NaN/Inf or values that could overflow the transforms, or whose volume size is unknown
    when traced, run Keras's own Conv3D instead.

    Example:
        >>> layer = FFTConv3D(16, 7, padding="same")          # a 7x7x7 conv through FFTs
    """

    convrewrite_keras_class = keras.layers.Conv3D
    convrewrite_extra_config = ("tile_size",)

    def __init__(self, *args, tile_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        if tile_size not in (None, "full"):
            raise ValueError(f"Received invalid tile_size={tile_size!r} for FFTConv3D '{self.name}'; expected None or "
                             f"'full' (FFTConv3D transforms the whole volume).")
        self.tile_size = tile_size
        self._axes = None
        self._built_size = None
        self._spectrum_cache = None

    def _size(self, shape):
        return tuple(shape[2:5]) if self.data_format == "channels_first" else tuple(shape[1:4])

    @property
    def _kernel_eff(self):
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation_rate))

    def _grouping(self):
        return self.groups, self._kernel.shape[3], self.filters

    def build(self, input_shape):
        super().build(input_shape)
        size = self._size(input_shape)
        self._built_size = size
        if any(n is None for n in size):
            return  # computed per call where the traced size is known (uncached)
        self._axes = volume_layout(size, self._kernel_eff, self.strides, self.padding)
        groups, cg, cout = self._grouping()
        bins = _bins(self._axes)
        shape = (groups, cout // groups, bins) if cg == 1 else (bins, groups, 2 * cg, 2 * (cout // groups))
        self._spectrum_cache = backend.SpectrumCache(tuple(self.kernel_size) + (cg, cout), shape,
                                                     "complex64" if cg == 1 else "float32",
                                                     name=f"{self.name}_spectrum_cache")

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """TF's object graph minus the spectrum cache in checkpoints (derived state, see layers/fft.py)."""
        children = super()._trackable_children(save_type, **kwargs)
        if save_type != "savedmodel":
            children.pop("_spectrum_cache", None)
        return children

    @property
    def fft_layout(self) -> Optional[tuple]:
        """(depth, height, width) AxisLayouts chosen at build (None before build or for an unknown size)."""
        return self._axes

    def _float32_weights(self):
        return float32_weights(self)

    def _spectrum(self, kernel, axes, training):
        groups, cg, cout = self._grouping()
        kernel = ops.reshape(kernel, tuple(self.kernel_size) + (cg, cout))

        def compute(k):
            return kernel_spectrum_3d(k, axes, groups, self.dilation_rate)

        def bound(k):
            return ops.max(ops.sum(ops.abs(k), axis=(0, 1, 2, 3)))

        if not use_cached_transform(training, self._spectrum_cache is not None and axes == self._axes):
            return compute(kernel), bound(kernel)
        read = float32_kernel_reader(self._float32_weights, ops.shape(kernel))
        return backend.cached_transform(read, self._spectrum_cache, compute, aux=bound)

    def call(self, inputs, training=None):
        """The FFT result where it provably equals Keras's (the 2-D layers' guard, see `layers/fft.py`'s
        `_fft_is_exact`), else Keras's own Conv3D for this call."""
        size = self._size(inputs.shape)
        small = self.padding == "valid" and any(n is not None and n < k for n, k in zip(size, self._kernel_eff))
        if small or any(n is None for n in size):
            return super().call(inputs)
        axes = self._axes if size == self._built_size and self._axes is not None else \
            volume_layout(size, self._kernel_eff, self.strides, self.padding)
        x = ops.cast(inputs, "float32")
        kernel, bias = self._float32_weights()
        spectrum, lip = self._spectrum(kernel, axes, training)
        return guarded(self, inputs, self._fft_is_exact(x, lip, bias, axes),
                       lambda: self._fft_call(x, spectrum, bias, axes),
                       lambda t: ops.cast(super(FFTConv3D, self).call(t), self.compute_dtype))

    def _fft_is_exact(self, x, lip, bias, axes):
        scale = backend.l2_norm(x) * lip
        points = float(axes[0].fft * axes[1].fft * axes[2].fft)
        ok = ops.logical_and(scale < 3.4028234663852886e38 / 4 / points ** 2, scale > 2.0 ** -40)
        compute_max = _dtype_max(self.compute_dtype)
        if compute_max < 1e30:
            m = ops.maximum(ops.max(x), -ops.min(x))
            out_bound = m * lip if bias is None else m * lip + ops.max(ops.abs(bias))
            ok = ops.logical_and(ok, out_bound < compute_max / 4)
        return ok

    def _fft_call(self, x, spectrum, bias, axes):
        groups, cg, _ = self._grouping()
        last = self.data_format == "channels_last"
        if last:
            x = ops.transpose(x, (0, 4, 1, 2, 3))
        y = spectral_correlate_3d(x, spectrum, axes, groups, cg)
        a, b, c = axes
        y = y[:, :, : a.span : a.stride, : b.span : b.stride, : c.span : c.stride]
        if bias is not None:
            y = y + ops.reshape(bias, (1, -1, 1, 1, 1))
        if last:
            y = ops.transpose(y, (0, 2, 3, 4, 1))
        y = ops.cast(y, self.compute_dtype)
        return self.activation(y) if self.activation is not None else y

    def get_config(self):
        return {**super().get_config(), "tile_size": self.tile_size}


def _make_layer(layer, spec, tile_size):
    return FFTConv3D.from_config({**layer.get_config(), "tile_size": "full"})


def _applicable(spec: ConvSpec, tile_size):
    if tile_size != "full":
        return False, "FFTConv3D has no tiled mode (fft applies, with a known volume size)"
    if spec.depth is None:
        return False, "volume depth unknown at build; full-volume FFT needs it"
    return True, ""


register_fft_kind(("conv3d",), (FFTConv3D,), _make_layer, fft3d_cost_features, _applicable)
