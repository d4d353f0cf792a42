"""FFT convolution layers: drop-in Conv2D / DepthwiseConv2D that convolve in the frequency domain.

A k x k convolution costs k*k multiply-adds per output and channel pair directly; through the FFT it costs
two transforms (O(log P) per pixel and channel) plus one complex multiply-add per frequency bin and channel
pair, independent of k. So FFT wins for large kernels and loses for small ones.

How a call runs (x: (batch, H, W, Cin), one transform size (P, Q) per layer):
  1. x -> (batch, Cin, H, W) float32 -> rfft2d zero-padded to (P, Q)      X: (batch, Cin, P, Q//2+1)
  2. per frequency bin, per group: (batch x Cg) @ (Cg x Og), one batched matmul (a broadcast multiply
     when Cg == 1, i.e. depthwise), against the *cached* kernel spectrum; the complex product runs as a
     real one on interleaved (re, im) views against the spectrum's real block form (see
     `backend.real_block_matmul`)
  3. irfft2d, keep every stride-th output, bias, activation, back to the layer's layout.
Cross-correlation (what TF calls convolution) is multiplication by the conjugate kernel spectrum, and TF's
SAME padding is not materialized: the kernel is circularly shifted by the top/left pad instead, which
leaves every output in place and lets the transform be smaller (see `full_axis_layout`).

Two transforms (`transform=`): "fft", the backend's FFTs as above, and "matmul", the same correlation with
the DFTs applied as matrix products over the spatial axes of channels-last activations (no layout
transposes, strides never computed; full image only; see `dft_matmul`). The cost model times both
(implementations `fft` and `fft-matmul`) and picks per spec.

Two modes:
  * full image: one transform covers the whole (padded) image; spectra are (P, Q) with P >= H.
  * tiled (overlap-save): the padded image is cut into overlapping tiles of T + k - 1 pixels, each giving
    T outputs; spectra depend on the tile size only, so memory stays bounded and the spatial size may be
    unknown until run time (`Input((None, None, C))`).

The kernel spectrum is cached (see `backend.cached_transform`): recomputed only when the kernel's bits
change, never stale, and differentiable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import keras
from keras import ops

from .. import keras_internals
from ..registry import Implementation, canary_spec, io_bytes, reduction_terms, register
from ..shapes import output_length, same_pads
from ..spec import ConvSpec
from . import backend, real_dft
from .dft_matmul import dft_matrices, matmul_correlate, matmul_spectrum, matmul_spectrum_shape

__all__ = [
    "FFTConv2D", "FFTDepthwiseConv2D", "FFTImplementation", "FFTTiledImplementation",
    "is_fast_length", "next_fast_length", "full_axis_layout", "tiled_axis_layout", "default_tile", "FFTLayout",
    "choose_fft_layout", "fft_cost_features", "register_fft_kind", "FFTMatmulImplementation",
    "matmul_cost_features", "TRANSFORMS",
]

TRANSFORMS = ("fft", "matmul")
"""How FFT layers transform: "fft" (the backend's FFTs over NCHW blocks, full or tiled) or "matmul" (dense
DFT matrices applied by matrix products, channels last, full image only: see `dft_matmul`)."""

FAST_PRIMES = (2, 3, 5, 7)


# ---- transform sizes (pure helpers) --------------------------------------------------------------
def is_fast_length(n: int, primes=FAST_PRIMES) -> bool:
    """True when n > 0 factors into `primes` only (7-smooth by default): the lengths FFTs are fast at."""
    if n < 1:
        return False
    for p in primes:
        while n % p == 0:
            n //= p
    return n == 1


def next_fast_length(n: int, primes=FAST_PRIMES, even: bool = False) -> int:
    """Smallest fast length >= n (>= 1); even=True also requires it to be even (tiled layouts' columns).

    Why not n itself: a 74-point transform (2 * 37) costs more than an 80-point one; 7-smooth lengths are
    dense enough (at most a few percent above n for n > 50) that rounding up is always cheaper."""
    m = max(int(n), 2 if even else 1)
    while not (is_fast_length(m, primes) and (not even or m % 2 == 0)):
        m += 1
    return m


@dataclasses.dataclass(frozen=True)
class AxisLayout:
    """One spatial axis of an FFT convolution.

    fft: transform length. pad_before: TF's top/left padding (SAME) or 0. out: output length (strided).
    stride: keep every stride-th stride-1 output. tile: outputs per tile (tiled mode) or None (full).
    """

    fft: int
    pad_before: int
    out: Optional[int]
    stride: int
    kernel: int
    tile: Optional[int] = None

    @property
    def span(self) -> Optional[int]:
        """Stride-1 outputs needed so that every stride-th one is there: (out - 1) * stride + 1."""
        return None if self.out is None else max((self.out - 1) * self.stride + 1, 0)


def _out_and_pad(n: int, k_eff: int, stride: int, padding: str):
    """(output length, pad before) along one axis under TF/Keras rules (see shapes.same_pads)."""
    before = same_pads(n, k_eff, stride)[0] if padding == "same" else 0
    return output_length(n, k_eff, stride, padding), before


def full_axis_layout(n: int, k_eff: int, stride: int = 1, padding: str = "valid", even: bool = False,
                   fast: bool = True) -> AxisLayout:
    """Transform size for one axis of a full-image FFT correlation of an n-long input with a k_eff-long kernel.

    The input is not padded: it sits at [0, n) of the length-P transform, and the kernel is circularly
    shifted left by the SAME pad `pb`, so output i reads input indices i - pb .. i - pb + k_eff - 1. No
    circular wrap may alias onto the image: negative indices wrap to P - pb.., which must be >= n, and the
    largest index read, span - 1 - pb + k_eff - 1, must stay below P. Hence P >= max(n + pb,
    span + k_eff - 1 - pb, k_eff, n), rounded up to a fast length: for SAME this is n + k // 2, not the
    n + k - 1 of a full linear convolution, and for VALID it is just n.
    fast=False keeps P at that minimum (the matmul transform's work grows with P itself, not with its factors).
    """
    out, pb = _out_and_pad(n, k_eff, stride, padding)
    span = max((out - 1) * stride + 1, 0)
    need = max(n + pb, span + k_eff - 1 - pb, k_eff, n, 1)
    length = next_fast_length(need, even=even) if fast else need
    return AxisLayout(fft=length, pad_before=pb, out=out, stride=stride, kernel=k_eff)


SPECTRUM_PEAK_FACTOR = 6.5
"""Peak memory of computing and caching a kernel spectrum, in units of the cached spectrum's bytes: the
padded and rolled kernel, its transform, the real block form and the cache variable are alive together
on the first call (and on every call after the kernel changes). Measured as the process's peak RSS over
building and calling one layer: 5.3-6.5x on spectrum-dominated specs of the profiling grid (e.g. a 5x5
105->89 conv at 130x130: 1.28 GB of spectra, 7.6 GB peak), CPU, TF 2.21, Xeon 6/167/1. An estimate
without it (1x) let the profiler and `memory_limit` admit layers needing ~6x their stated memory."""


def default_tile(k_eff: int) -> int:
    """Output tile edge used when none is given: the transform is about 3 kernels (>= 32) long, a
    balance between wasted overlap ((k - 1) / T of every tile) and spectrum size (grows with T^2)."""
    return next_fast_length(max(32, 3 * k_eff), even=True) - k_eff + 1


def tiled_axis_layout(k_eff: int, tile: int, stride: int = 1, padding: str = "valid", n: Optional[int] = None,
                    even: bool = False) -> AxisLayout:
    """Overlap-save along one axis: tiles of `tile` stride-1 outputs, read from tile + k_eff - 1 inputs.

    The transform is the next fast length >= tile + k_eff - 1 and the tile grows to fill it (the extra
    outputs are free). n may be None (decided at run time); out and pad_before are then None too.
    """
    if tile < 1:
        raise ValueError(f"Received tile_size={tile}; expected a positive int.")
    out, pb = (None, None) if n is None else _out_and_pad(n, k_eff, stride, padding)
    if out is not None:
        # a tile larger than the stride-1 outputs needed only adds transform size (and spectrum memory)
        tile = min(tile, max((out - 1) * stride + 1, 1))
    fft = next_fast_length(tile + k_eff - 1, even=even)
    return AxisLayout(fft=fft, pad_before=pb, out=out, stride=stride, kernel=k_eff, tile=fft - k_eff + 1)


@dataclasses.dataclass(frozen=True)
class FFTLayout:
    """Both axes of an FFT convolution, plus the mode. Equal layouts share kernel spectra."""

    rows: AxisLayout
    cols: AxisLayout

    @property
    def tiled(self) -> bool:
        return self.rows.tile is not None

    @property
    def fft_shape(self) -> Tuple[int, int]:
        return self.rows.fft, self.cols.fft

    @property
    def bins(self) -> int:
        """Frequency bins of one real 2-D transform: P * (Q // 2 + 1)."""
        return self.rows.fft * (self.cols.fft // 2 + 1)

    def spectrum_key(self):
        """What the kernel spectrum depends on: transform size and, in full mode, the SAME shift."""
        return (self.fft_shape, None if self.tiled else (self.rows.pad_before, self.cols.pad_before))


def _tile_pair(tile_size):
    if isinstance(tile_size, int):
        return (tile_size, tile_size)
    return tuple(tile_size)


def choose_fft_layout(height, width, kernel_eff, strides=(1, 1), padding="valid", tile_size=None) -> FFTLayout:
    """Choose the FFT layout for an input of height x width (None: unknown until run time).

    tile_size: "full" (one transform per image; needs a known size), an int or (th, tw) (overlap-save
    tiles of that many outputs, rounded up to fill a fast transform), or None: tiled when the size is
    unknown or when tiling is estimated cheaper (images much larger than the kernel), else full.
    """
    kh, kw = kernel_eff
    sh, sw = strides
    if tile_size == "full":
        if height is None or width is None:
            raise ValueError(
                f"Received tile_size='full' with unknown spatial size {height}x{width}; expected a known "
                f"input size, or tile_size=None / an int for overlap-save tiling."
            )
        # Any fast length, odd ones included, on both axes: the per-bin products and the transposes scale
        # with the bins P * (Q // 2 + 1), and TF's real FFTs measured as fast at 75 as at 80 (74 needed for
        # a 21x21 SAME kernel on 64x64: 2850 bins instead of 3075).
        return FFTLayout(full_axis_layout(height, kh, sh, padding), full_axis_layout(width, kw, sw, padding))
    if tile_size is not None:
        th, tw = _tile_pair(tile_size)
        return FFTLayout(tiled_axis_layout(kh, th, sh, padding, height),
                       tiled_axis_layout(kw, tw, sw, padding, width, even=True))
    tiled = FFTLayout(tiled_axis_layout(kh, default_tile(kh), sh, padding, height),
                    tiled_axis_layout(kw, default_tile(kw), sw, padding, width, even=True))
    if height is None or width is None:
        return tiled
    full = choose_fft_layout(height, width, kernel_eff, strides, padding, "full")
    # Tiling pays (k - 1) overlap per tile and more transforms; it is only chosen when the estimated work
    # is clearly lower (large images), since full-image spectra are computed once and cached anyway.
    if _transform_work(tiled) < 0.75 * _transform_work(full):
        return tiled
    return full


def matmul_layout(height, width, kernel_eff, strides=(1, 1), padding="valid") -> FFTLayout:
    """Layout of the matmul transform: full image, each axis at its minimum length (see `full_axis_layout`)."""
    if height is None or width is None:
        raise ValueError(f"Received unknown spatial size {height}x{width}; the matmul transform needs a known "
                         f"input size (the FFT transform with tile_size=None tiles unknown sizes).")
    (kh, kw), (sh, sw) = kernel_eff, strides
    return FFTLayout(full_axis_layout(height, kh, sh, padding, fast=False),
                     full_axis_layout(width, kw, sw, padding, fast=False))


def _tiles(axis: AxisLayout) -> int:
    if axis.tile is None:
        return 1
    return max(-(-(axis.span or 1) // axis.tile), 1)


def _transform_work(layout: FFTLayout) -> float:
    """Relative cost per (channel) image: transforms of all tiles plus the per-bin products."""
    p, q = layout.fft_shape
    n = _tiles(layout.rows) * _tiles(layout.cols)
    return n * (p * q * math.log2(max(p * q, 2)) + 4.0 * layout.bins)


# ---- cost features --------------------------------------------------------------------------------
def fft_cost_features(spec: ConvSpec, tile_size=None) -> dict:
    """Numbers a cost model regresses FFT time on, from the spec alone.

    fft_h/fft_w: transform size; tiles: tiles per image; forward/inverse_transforms: 2-D real FFTs per
    call (batch * tiles * Cin / Cout); bins: frequency bins per transform; matmul_m/k/n and matmul_batch:
    the per-bin complex product (batch*tiles x Cg) @ (Cg x Og), batched over bins * groups;
    fft_flops: ~2.5 P Q log2(P Q) per real transform; matmul_flops: 8 per complex multiply-add;
    spectrum_bytes: cached kernel spectra (complex64 for depthwise-like groups, real block form of twice
    that for the matmul path); bytes: activations moved (input, spectra of activations, output);
    strided_waste: stride-1 outputs computed per output kept (strides are applied after the inverse).
    """
    h, w = spec.height, spec.width
    layout = choose_fft_layout(h, w, spec.effective_kernel, spec.strides, spec.padding, tile_size)
    b = spec.batch or 1
    tiles = _tiles(layout.rows) * _tiles(layout.cols) if (h is not None and w is not None) else 1
    p, q = layout.fft_shape
    groups = spec.groups
    cg = spec.in_channels // groups
    og = spec.filters // groups
    bins = layout.bins
    fwd = b * tiles * spec.in_channels
    inv = b * tiles * spec.filters
    one = 2.5 * p * q * math.log2(max(p * q, 2))
    matmul_flops = 8.0 * bins * groups * (b * tiles) * cg * og
    ho, wo = spec.output_hw()
    n_in = b * (h or 0) * (w or 0) * spec.in_channels
    n_out = b * (ho or 0) * (wo or 0) * spec.filters
    spans = (layout.rows.span or 1) * (layout.cols.span or 1)
    return {
        "macs": float(spec.macs() or 0),
        "fft_h": float(p),
        "fft_w": float(q),
        "tiles": float(tiles),
        "bins": float(bins),
        "forward_transforms": float(fwd),
        "inverse_transforms": float(inv),
        "fft_flops": one * (fwd + inv),
        "matmul_m": float(b * tiles),
        "matmul_k": float(cg),
        "matmul_n": float(og),
        "matmul_batch": float(bins * groups),
        "matmul_flops": matmul_flops,
        "flops": one * (fwd + inv) + matmul_flops,
        "spectrum_bytes": (8.0 if cg == 1 else 16.0) * bins * cg * spec.filters,
        "bytes": 4.0 * (n_in + n_out) + 8.0 * bins * b * tiles * (spec.in_channels + spec.filters),
        "strided_waste": float(spans / max((ho or 1) * (wo or 1), 1)),
        # additive cost terms: transforms whose working set outgrows the caches cost more per flop, and
        # strided outputs that are computed then dropped cost transform work for nothing
        "fft_flops_log": one * (fwd + inv) * math.log2(max(4.0 * (n_in + n_out), 2.0)) / 30.0,
        "strided_flops": one * (fwd + inv) * (spans / max((ho or 1) * (wo or 1), 1) - 1.0),
        "calls": 1.0,
    }


def matmul_cost_features(spec: ConvSpec) -> dict:
    """Numbers a cost model regresses the matmul transform's time on (see `dft_matmul`), from the spec alone.

    transform_flops: the four DFT matrix products (forward W and H over the input, inverse H and W for the
    kept outputs only); product_flops: the per-bin real block products (dense and grouped);
    elementwise_bytes: the broadcast complex multiply's traffic (depthwise-like: one input channel per
    group); transpose_bytes: the two bins-major transposes around the products (dense and grouped);
    spectrum_bytes: the cached kernel spectrum; bytes: input and output.
    """
    layout = matmul_layout(spec.height, spec.width, spec.effective_kernel, spec.strides, spec.padding)
    b = spec.batch or 1
    h, w = spec.height, spec.width
    p, q = layout.fft_shape
    f = q // 2 + 1
    ho, wo = layout.rows.out, layout.cols.out
    cin, cout, groups = spec.in_channels, spec.filters, spec.groups
    cg, og = cin // groups, cout // groups
    transform = 2.0 * b * (h * 2 * f * w * cin + 2 * p * 2 * h * f * cin + 2 * ho * 2 * p * f * cout
                           + ho * wo * 2 * f * cout)
    spectrum_values = p * f * groups * (4 * og if cg == 1 else 4 * cg * og)
    dense = cg > 1
    product = 8.0 * p * f * groups * b * cg * og if dense else 0.0
    spectra = 4.0 * b * 2 * p * f  # bytes per channel of one activation spectrum
    return {
        "macs": float(spec.macs() or 0),
        "fft_h": float(p),
        "fft_w": float(q),
        "transform_flops": transform,
        "product_flops": product,
        "elementwise_bytes": 0.0 if dense else spectra * (cin + 3 * cout),
        "transpose_bytes": 2.0 * spectra * (cin + cout) if dense else 0.0,
        "spectrum_bytes": 4.0 * spectrum_values,
        "bytes": 4.0 * b * (h * w * cin + ho * wo * cout),
        "flops": transform + product,
        "calls": 1.0,
    }


# ---- the computation ------------------------------------------------------------------------------
def _dilate(kernel, dilation):
    """kernel: (kh, kw, ...) -> ((kh-1)*dh+1, (kw-1)*dw+1, ...) with zeros between the taps."""
    for axis, d in enumerate(dilation):
        if d == 1:
            continue
        shape = list(kernel.shape)
        k = shape[axis]
        zeros = ops.zeros(shape[:axis + 1] + [d - 1] + shape[axis + 1:], kernel.dtype)
        spread = ops.concatenate([ops.expand_dims(kernel, axis + 1), zeros], axis=axis + 1)
        spread = ops.reshape(spread, shape[:axis] + [k * d] + shape[axis + 1:])
        kernel = ops.take(spread, ops.arange((k - 1) * d + 1), axis=axis)
    return kernel


def conjugate_kernel_spectrum(kernel, layout: FFTLayout, dilation=(1, 1)):
    """(Cg, Cout, P, Q//2+1) complex64: the conjugate spectrum of a (kh, kw, Cg, Cout) float32 kernel, dilated,
    zero-padded to the transform size and, in full mode, circularly shifted by the SAME pad. Conjugate because
    TF convolutions are cross-correlations. Both transforms lay it out for their per-bin products
    (`kernel_spectrum`, `dft_matmul.matmul_spectrum`)."""
    kernel = _dilate(kernel, dilation)
    kh, kw = kernel.shape[0], kernel.shape[1]
    p, q = layout.fft_shape
    k = ops.transpose(kernel, (2, 3, 0, 1))  # (Cg, Cout, kh, kw)
    k = ops.pad(k, [(0, 0), (0, 0), (0, p - kh), (0, q - kw)])
    if not layout.tiled and (layout.rows.pad_before or layout.cols.pad_before):
        # SAME padding folded into the kernel: output i must read input i - pad_before + u.
        k = ops.roll(k, shift=(-layout.rows.pad_before, -layout.cols.pad_before), axis=(2, 3))
    return backend.conj(backend.rfft2d(k, (p, q)))


def kernel_spectrum(kernel, layout: FFTLayout, groups: int, dilation=(1, 1)):
    """Conjugate spectrum of a grouped kernel, laid out for the per-bin products.

    kernel: (kh, kw, Cg, Cout) float32 (a depthwise (kh, kw, C, M) kernel is passed as (kh, kw, 1, C*M)
    with groups=C). Returns, for the matmul path (Cg > 1), the real block form (`backend.real_block`) of
    the (bins, G, Cg, Og) complex spectrum: (bins, G, 2 Cg, 2 Og) float32; for the broadcast path
    (Cg == 1), (G, Og, bins) complex64 (see `conjugate_kernel_spectrum`).
    """
    spec = conjugate_kernel_spectrum(kernel, layout, dilation)  # (Cg, Cout, P, Q//2+1)
    cg, cout = kernel.shape[2], kernel.shape[3]
    og = cout // groups
    if cg == 1:
        return ops.reshape(spec, (groups, og, layout.bins))
    spec = ops.reshape(spec, (cg, groups, og, layout.bins))
    return backend.real_block(ops.transpose(spec, (3, 1, 0, 2)))  # (bins, G, 2 Cg, 2 Og)


def spectral_correlate(x, spectrum, layout: FFTLayout, groups: int, cg: int):
    """Stride-1 correlation of a batch of single-image blocks with a cached kernel spectrum.

    x: (B, Cin, h, w) float32 with h <= P, w <= Q. spectrum: from `kernel_spectrum` (real block form
    (bins, G, 2 Cg, 2 Og) when cg > 1, complex (G, Og, bins) when cg == 1).
    Returns (B, Cout, P, Q) float32; outputs are at [0, span) on each axis. Traced for a format without complex
    tensors (`backend.real_arithmetic`): the same with real matrix products (`real_dft`; a Cg == 1 spectrum
    then comes as (re, im) pairs (2, G, Og, bins)).
    """
    if backend.real_arithmetic():
        return real_dft.correlate(x, spectrum, layout.fft_shape, groups, cg)
    p, q = layout.fft_shape
    xf = backend.rfft2d(x, (p, q))  # (B, Cin, P, Q//2+1)
    if cg == 1:
        # Depthwise-like: each output channel sees one input channel, so the per-bin "matmul" is an
        # outer product; a broadcast multiply produces exactly the output, nothing larger.
        xf = ops.reshape(xf, (-1, groups, 1, layout.bins))
        yf = backend.complex_multiply(xf, spectrum)  # (B, G, Og, bins)
    else:
        # One batched matmul over (bins, groups): (B x Cg) @ (Cg x Og) per bin.
        xf = ops.reshape(xf, (-1, groups, cg, layout.bins))
        xf = ops.transpose(xf, (3, 1, 0, 2))  # (bins, G, B, Cg)
        yf = backend.real_block_matmul(xf, spectrum)  # (bins, G, B, Og)
        yf = ops.transpose(yf, (2, 1, 3, 0))  # (B, G, Og, bins)
    og = spectrum.shape[-1] // 2 if cg > 1 else spectrum.shape[1]
    yf = ops.reshape(yf, (-1, groups * og, p, q // 2 + 1))
    return backend.irfft2d(yf, (p, q))


def _ceil_div(a, b):
    return (a + b - 1) // b


def size_max(a, b):
    """max(a, b) of sizes that are Python ints (static shapes; always on JAX) or scalar tensors (sizes known
    only at run time in a TensorFlow graph): an int stays an int, so that it can size a pad or a slice."""
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return ops.maximum(a, b)


def _dynamic_axis(n, axis: AxisLayout, padding: str):
    """(out, pad_before, span, tiles) along an axis whose length n may be a scalar tensor."""
    k, s = axis.kernel, axis.stride
    if isinstance(n, int):
        out, pb = _out_and_pad(n, k, s, padding)
    elif padding == "same":
        out = _ceil_div(n, s)
        pb = ops.maximum((out - 1) * s + k - n, 0) // 2
    else:
        out = ops.maximum(_ceil_div(n - k + 1, s), 0)
        pb = 0
    span = (out - 1) * s + 1
    tiles = _ceil_div(span, axis.tile)
    return out, pb, span, tiles


# ---- the layers -----------------------------------------------------------------------------------
class _FFTConvMixin:
    """The FFT machinery shared by FFTConv2D and FFTDepthwiseConv2D (the Keras base gives the rest)."""

    def _init_fft(self, tile_size, transform="fft"):
        if transform not in TRANSFORMS:
            raise ValueError(f"Received transform={transform!r} for {type(self).__name__} '{self.name}'; expected "
                             f"one of {', '.join(map(repr, TRANSFORMS))}.")
        if transform == "matmul" and tile_size not in (None, "full"):
            raise ValueError(f"Received tile_size={tile_size!r} with transform='matmul' for {type(self).__name__} "
                             f"'{self.name}'; the matmul transform covers the whole image: expected None or 'full'.")
        self.transform = transform
        self._dft_matrices = None
        if tile_size is not None and tile_size != "full":
            pair = _tile_pair(tile_size) if isinstance(tile_size, (int, list, tuple)) else None
            if pair is None or len(pair) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in pair):
                raise ValueError(
                    f"Received invalid tile_size={tile_size!r} for {type(self).__name__} '{self.name}'; "
                    f"expected None (automatic), 'full', a positive int or a pair of positive ints."
                )
            tile_size = pair
        self.tile_size = tile_size
        self._fft_layout = None
        self._built_hw = None
        self._spectrum_cache = None

    # -- shapes --
    def _spatial(self, shape):
        if self.data_format == "channels_first":
            return shape[2], shape[3]
        return shape[1], shape[2]

    def _grouping(self):
        """(groups, Cg, Cout) of the kernel as `kernel_spectrum` takes it."""
        raise NotImplementedError

    def _grouped_kernel(self, kernel):
        return kernel

    def _make_layout(self, height, width):
        if self.transform == "matmul":
            return matmul_layout(height, width, _effective(self.kernel_size, self.dilation_rate), self.strides,
                                 self.padding)
        return choose_fft_layout(height, width, _effective(self.kernel_size, self.dilation_rate), self.strides,
                        self.padding, self.tile_size)

    def build(self, input_shape):
        super().build(input_shape)
        h, w = self._spatial(input_shape)
        self._built_hw = (h, w)
        try:
            self._fft_layout = self._make_layout(h, w)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__} '{self.name}': {exc}") from None
        groups, cg, cout = self._grouping()
        kh, kw = self.kernel_size
        complex_spectrum = cg == 1 and self.transform == "fft"
        self._spectrum_cache = backend.SpectrumCache(
            (kh, kw, cg, cout), self.fft_bins_shape(self._fft_layout), "complex64" if complex_spectrum else "float32",
            name=f"{self.name}_spectrum_cache",
        )
        if self.transform == "matmul":
            self._dft_matrices = dft_matrices(self._fft_layout, h, w)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """TF's object graph, minus the spectrum cache in checkpoints.

        The cache is derived state whose shape depends on the input size (full mode): a `tf.train.Checkpoint`
        holding it could not be restored into the same architecture built for another size, and restoring
        it would only be overwritten on the next call. SavedModel export (`model.export`) keeps it, since the
        exported functions read its variables."""
        children = super()._trackable_children(save_type, **kwargs)
        if save_type != "savedmodel":
            children.pop("_spectrum_cache", None)
        return children

    def fft_bins_shape(self, layout):
        """Shape of the cached kernel spectrum (see `kernel_spectrum`, `dft_matmul.matmul_spectrum`)."""
        groups, cg, cout = self._grouping()
        if self.transform == "matmul":
            return matmul_spectrum_shape(layout, groups, cg, cout)
        if cg == 1:
            return (groups, cout // groups, layout.bins)
        return (layout.bins, groups, 2 * cg, 2 * (cout // groups))

    @property
    def fft_layout(self) -> Optional[FFTLayout]:
        """The layout chosen at build (None before build)."""
        return self._fft_layout

    def _float32_weights(self):
        return float32_weights(self)

    def _spectrum(self, kernel, layout, training):
        """(kernel spectrum for `layout`, L) where L is the largest L1 norm of one output channel's kernel taps
        (see `_fft_is_exact`); both cached per kernel value outside training."""
        groups, cg, cout = self._grouping()
        kernel = ops.reshape(kernel, tuple(self.kernel_size) + (cg, cout))

        def compute(k):
            if self.transform == "matmul":
                return matmul_spectrum(conjugate_kernel_spectrum(k, layout, self.dilation_rate), layout, groups)
            return kernel_spectrum(k, layout, groups, self.dilation_rate)

        def bound(k):
            return ops.max(ops.sum(ops.abs(k), axis=(0, 1, 2)))

        cacheable = self._spectrum_cache is not None and layout.spectrum_key() == self._fft_layout.spectrum_key()
        if not use_cached_transform(training, cacheable):
            # Training: the kernel changes every step, so caching would only add writes.
            return compute(kernel), bound(kernel)
        read = float32_kernel_reader(self._float32_weights, ops.shape(kernel))
        return backend.cached_transform(read, self._spectrum_cache, compute, aux=bound)

    def call(self, inputs, training=None):
        """The FFT result where it provably equals Keras's, else Keras's own computation for this call.

        The transform mixes every input value into every frequency, so one NaN or Inf in the input would
        fill the whole output with NaN (Keras: only the outputs whose window sees it), and values near the
        dtype's range overflow inside the transform where the direct sum does not. One reduction,
        ||x||_2, decides per call (see `_fft_is_exact`): finite and in range -> FFT; otherwise the
        direct convolution of the Keras base class, which gives Keras's result bit for bit (NaN and Inf
        where Keras puts them, Keras's error for an input smaller than the kernel)."""
        h, w = self._spatial(inputs.shape)
        if self._smaller_than_kernel(h, w):
            return super().call(inputs)  # Keras's own handling (an error), not an empty FFT result
        x = ops.cast(inputs, "float32")
        kernel, bias = self._float32_weights()
        layout = self._layout_for(h, w)
        spectrum, lip = self._spectrum(kernel, layout, training)
        # The FFT runs inside its branch, not beside the cond: a call routed to Keras's branch does not compute
        # it at all, and nothing computed from a NaN/Inf/overflowing input is left in the graph for gradients.
        return guarded(self, inputs, self._fft_is_exact(x, lip, bias, layout),
                       lambda: self._fft_call(x, spectrum, bias, layout),
                       lambda t: ops.cast(super(_FFTConvMixin, self).call(t), self.compute_dtype))

    def _smaller_than_kernel(self, h, w):
        """True when a VALID input is known (statically) to be smaller than the (dilated) kernel."""
        if self.padding != "valid":
            return False
        eh, ew = _effective(self.kernel_size, self.dilation_rate)
        return (h is not None and h < eh) or (w is not None and w < ew)

    def _fft_is_exact(self, x, lip, bias, layout):
        """Scalar bool: this call's FFT result equals the direct one to float rounding.

        Let n = ||x||_2 (one pass over x; n >= max |x|) and L = `lip`, the largest L1 norm of one output
        channel's kernel taps (the most any output or partial sum grows per unit of input; cached with the
        kernel spectrum). Every value inside the transforms is bounded by (P Q)^2 n L (forward: P Q max|x| per
        bin; per-bin products: times L; unnormalized inverse: times P Q). The FFT path is taken only when
          * n and L are finite: a NaN or Inf anywhere in x or the kernel makes them NaN or Inf (and comparisons
            with NaN are False); so does |x| above ~1.8e19, whose square overflows (such calls go direct too),
          * (P Q)^2 n L stays below float32's max / 4 (no overflow inside the transforms),
          * n L is above 2^-40: nothing the transforms compute comes near float32's subnormal range (an
            all-zero or tiny input or kernel takes the direct path, exact and as fast as Keras),
          * under a float16 compute dtype, max |x| L + max |b| stays below 65504 / 4, so Keras's own float16
            sums cannot overflow where the float32 transforms would not (this costs a second pass, max/min),
          * under VALID padding with a spatial size unknown until now, the input is at least the kernel.
        Otherwise the call runs Keras's direct convolution."""
        # (A NaN/Inf bias needs no check: added after the convolution, it makes its whole channel NaN/Inf in
        # both computations alike.)
        scale = backend.l2_norm(x) * lip
        p, q = layout.fft_shape
        f32_max = 3.4028234663852886e38
        ok = ops.logical_and(scale < f32_max / 4 / float(p * q) ** 2, scale > 2.0 ** -40)
        compute_max = _dtype_max(self.compute_dtype)
        if compute_max < 1e30:  # float16: Keras's sums saturate at 65504 (bfloat16's range is float32's)
            m = ops.maximum(ops.max(x), -ops.min(x))
            out_bound = m * lip if bias is None else m * lip + ops.max(ops.abs(bias))
            ok = ops.logical_and(ok, out_bound < compute_max / 4)
        h, w = self._spatial(x.shape)
        if self.padding == "valid" and (h is None or w is None):
            eh, ew = _effective(self.kernel_size, self.dilation_rate)
            hh, ww = self._spatial(ops.shape(x))
            ok = ops.logical_and(ok, ops.logical_and(hh >= eh, ww >= ew))
        return ok

    def _layout_for(self, h, w):
        layout = self._fft_layout
        if layout is None or (not layout.tiled and (h, w) != self._built_hw):
            layout = self._make_layout(h, w)  # called on another size than built for: correct, uncached
        return layout

    def _fft_call(self, x, spectrum, bias, layout):
        """The FFT computation alone: x float32 in the layer's layout -> output (bias, activation applied)."""
        groups, cg, _ = self._grouping()
        if self.transform == "matmul":
            y = self._matmul(x, spectrum, layout, groups, cg)
        elif layout.tiled:
            y = self._tiled(x, spectrum, layout, groups, cg)
        else:
            y = self._full(x, spectrum, layout, groups, cg)
        if bias is not None:
            shape = (1, -1, 1, 1) if self.data_format == "channels_first" else (1, 1, 1, -1)
            y = y + ops.reshape(bias, shape)
        y = ops.cast(y, self.compute_dtype)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def _full(self, x, spectrum, layout, groups, cg):
        """x: (N, H, W, Cin) or (N, Cin, H, W) float32, one transform per image."""
        last = self.data_format == "channels_last"
        if last:
            x = ops.transpose(x, (0, 3, 1, 2))
        y = spectral_correlate(x, spectrum, layout, groups, cg)
        r, c = layout.rows, layout.cols
        y = y[:, :, : r.span : r.stride, : c.span : c.stride]
        return ops.transpose(y, (0, 2, 3, 1)) if last else y

    def _matmul(self, x, spectrum, layout, groups, cg):
        """x: (N, H, W, Cin) or (N, Cin, H, W) float32, DFTs as matrix products (channels last)."""
        first = self.data_format == "channels_first"
        if first:
            x = ops.transpose(x, (0, 2, 3, 1))
        h, w = x.shape[1], x.shape[2]
        matrices = self._dft_matrices
        if layout is not self._fft_layout or matrices is None:  # another size than built for
            matrices = dft_matrices(layout, h, w)
        y = matmul_correlate(x, spectrum, matrices, layout, groups, cg)
        return ops.transpose(y, (0, 3, 1, 2)) if first else y

    def _tiled(self, x, spectrum, layout, groups, cg):
        """Overlap-save: x is cut into overlapping (P, Q) blocks, each giving a (Th, Tw) block of outputs."""
        last = self.data_format == "channels_last"
        hax, wax = (1, 2) if last else (2, 3)
        shape = ops.shape(x)
        geo = [_dynamic_axis(shape[ax], a, self.padding) for ax, a in ((hax, layout.rows), (wax, layout.cols))]
        pads = [(0, 0)] * 4
        needs = []
        for ax, n, (out, pb, span, tiles), a in zip((hax, wax), (shape[hax], shape[wax]), geo, (layout.rows, layout.cols)):
            need = tiles * a.tile + a.kernel - 1  # padded inputs the `tiles` frames read
            needs.append(need)
            pads[ax] = (pb, size_max(need - pb - n, 0))
        x = ops.pad(x, pads)
        # Under VALID with strides the padded input may run up to stride - 1 rows/cols past `need` (inputs
        # no kept output reads), which would give frame() extra windows: cut them off first, so that
        # frame() returns exactly `tiles` windows per axis.
        x = x[:, : needs[0], : needs[1], :] if last else x[:, :, : needs[0], : needs[1]]
        x = backend.frame(x, layout.rows.fft, layout.rows.tile, axis=hax)  # rows axis -> (tiles_h, P)
        x = backend.frame(x, layout.cols.fft, layout.cols.tile, axis=wax + 1)  # cols axis -> (tiles_w, Q)
        if last:  # (N, th, P, tw, Q, C) -> (N, th, tw, C, P, Q)
            x = ops.transpose(x, (0, 1, 3, 5, 2, 4))
        else:  # (N, C, th, P, tw, Q) -> (N, th, tw, C, P, Q)
            x = ops.transpose(x, (0, 2, 4, 1, 3, 5))
        n_batch = shape[0]
        th, tw = geo[0][3], geo[1][3]
        cin = x.shape[3]
        x = ops.reshape(x, (-1, cin, layout.rows.fft, layout.cols.fft))
        y = spectral_correlate(x, spectrum, layout, groups, cg)
        ti, tj = layout.rows.tile, layout.cols.tile
        y = y[:, :, :ti, :tj]
        cout = y.shape[1]
        y = ops.reshape(y, (n_batch, th, tw, cout, ti, tj))
        if last:
            y = ops.reshape(ops.transpose(y, (0, 1, 4, 2, 5, 3)), (n_batch, th * ti, tw * tj, cout))
            return y[:, : geo[0][2] : layout.rows.stride, : geo[1][2] : layout.cols.stride, :]
        y = ops.reshape(ops.transpose(y, (0, 3, 1, 4, 2, 5)), (n_batch, cout, th * ti, tw * tj))
        return y[:, :, : geo[0][2] : layout.rows.stride, : geo[1][2] : layout.cols.stride]

    def get_config(self):
        config = super().get_config()
        config["tile_size"] = list(self.tile_size) if isinstance(self.tile_size, tuple) else self.tile_size
        if "transform" in getattr(self, "convrewrite_extra_config", ()):  # FFTSeparableConv2D has one transform
            config["transform"] = self.transform
        return config


def use_cached_transform(training, cacheable) -> bool:
    """Whether a layer takes its kernel's transform through `backend.cached_transform`: from the cache (an
    inference call at the layout built for), or as a constant of an exported artifact (any layout: nothing
    in an artifact computes a spectrum per call)."""
    return backend.export_format() is not None or (cacheable and not training)


def guarded(layer, inputs, ok, fast, direct):
    """fast() where the scalar bool `ok` holds, else direct(inputs) (Keras's own computation): `ops.cond(ok,
    fast, lambda: direct(inputs))`, in the form each runtime evaluates as written.

    Traced for ONNX, OpenVINO or LiteRT (`backend.real_arithmetic`) the fast result is computed before the
    conditional. For OpenVINO and LiteRT the conditional runs the direct computation or fills zeros, and a
    select picks: with the fast path inside the conditional, or passed through it, OpenVINO 2026.4 returned
    uninitialized values (~1e35) for a dense FFT conv on finite inputs. For ONNX the conditional passes the
    fast result through (tf2onnx turned the select into arithmetic that spread the NaN of the unused FFT
    result over the whole image), and its direct branch is written as `_shapes_known_inside` says."""
    if not backend.real_arithmetic():
        return ops.cond(ok, fast, lambda: direct(inputs))
    y = fast()
    if backend.export_format() == "onnx":
        return ops.cond(ok, lambda: y, _shapes_known_inside(layer, inputs, direct))
    return ops.where(ok, y, ops.cond(ok, lambda: ops.zeros(ops.shape(y), y.dtype), lambda: direct(inputs)))


def _shapes_known_inside(layer, inputs, direct):
    """direct(inputs) as a branch tf2onnx converts: it converts a conv inside a conditional only where the
    shapes of its input and kernel are known there ("Conv attribute dilations has incorrect size" otherwise).
    So the layer's weights are read before the conditional (a copy; keras.StatelessScope hands them to
    Keras's call) and both they and the input are given their static shapes inside the branch. (For LiteRT
    the weights stay read inside: read before, an Inf input gave wrong values there.)"""
    values = [(v, ops.copy(v)) for v in layer.weights]  # (a copy: a conversion would defer the read)
    static = None not in tuple(inputs.shape[1:])

    def run():
        known = [(v, ops.reshape(t, tuple(v.shape))) for v, t in values]
        x = ops.reshape(inputs, (-1, *inputs.shape[1:])) if static else inputs
        with keras.StatelessScope(state_mapping=known):
            return direct(x)

    return run


def float32_weights(layer):
    """(kernel, bias or None) of a conv layer as float32: the variables themselves, not the float16 copies a
    mixed-precision policy's autocast would hand out (the transforms run in float32 whatever the compute dtype)."""
    with keras_internals.autocast_disabled():
        kernel = ops.cast(layer.kernel, "float32")
        bias = ops.cast(layer.bias, "float32") if layer.use_bias else None
    return kernel, bias


def float32_kernel_reader(read_weights, shape):
    """A function giving the kernel of `read_weights()` (a layer's (kernel, bias) as float32, e.g.
    `float32_weights`) as `shape`: what `backend.cached_transform` takes, so that the kernel is read where the
    transform is needed (once, at trace time, in an export)."""
    return lambda: ops.reshape(read_weights()[0], shape)


def _dtype_max(dtype) -> float:
    """Largest finite value of a float dtype name (float32's for anything unknown)."""
    return {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float64": 1.7976931348623157e308}.get(
        str(dtype), 3.4028234663852886e38)


def _effective(kernel, dilation):
    return tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))


@keras.saving.register_keras_serializable(package="convrewrite")
class FFTConv2D(_FFTConvMixin, keras.layers.Conv2D):
    """keras.layers.Conv2D computed through FFTs, with cached kernel spectra.

    Takes every Conv2D argument (so `FFTConv2D(**conv.get_config())` works) and holds the same weights
    (kernel (kh, kw, Cin // groups, filters), bias (filters,)), plus:
      tile_size: None (automatic), "full" (one transform per image), or an int / (th, tw) output tile for
        overlap-save tiling (spectra then depend on the tile, not on the image).
      transform: "fft" (default) or "matmul": the DFTs as matrix products, channels last (`dft_matmul`;
        full image only, so tile_size must be None or "full" and the spatial size known at build).
    x: (batch, H, W, Cin) (or channels_first) -> same as Conv2D. Computes in float32 under any policy.
    Calls whose input holds NaN/Inf or values large enough to overflow the transforms run through Keras's
    own Conv2D computation instead, so they give exactly Keras's result (see the README's guarantees).

    Raises:
        ValueError: an argument Conv2D refuses, a tile_size that is not None, "full" or positive ints, or a
            transform that is not "fft" / "matmul" (or "matmul" with tiles).

    Example:
        >>> layer = FFTConv2D(32, 21, padding="same")        # a 21x21 conv through FFTs
        >>> fast = FFTConv2D.from_config({**keras.layers.Conv2D(32, 21).get_config(), "tile_size": 32})
    """

    convrewrite_keras_class = keras.layers.Conv2D  # a conv site: an optimized model can be re-planned
    convrewrite_extra_config = ("tile_size", "transform")  # config keys the Keras class does not take

    def __init__(self, *args, tile_size=None, transform="fft", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fft(tile_size, transform)

    def _grouping(self):
        cin_g = self._kernel.shape[2]
        return self.groups, cin_g, self.filters


@keras.saving.register_keras_serializable(package="convrewrite")
class FFTDepthwiseConv2D(_FFTConvMixin, keras.layers.DepthwiseConv2D):
    """keras.layers.DepthwiseConv2D computed through FFTs, with cached kernel spectra.

    Same arguments and weights as DepthwiseConv2D (kernel (kh, kw, C, depth_multiplier), bias
    (C * depth_multiplier,)), plus `tile_size` and `transform` as in FFTConv2D. Output channel c * M + m, as
    Keras.

    Raises:
        ValueError: an argument DepthwiseConv2D refuses, or a bad tile_size or transform.

    Example:
        >>> layer = FFTDepthwiseConv2D(31, padding="same")    # a 31x31 depthwise conv through FFTs
    """

    convrewrite_keras_class = keras.layers.DepthwiseConv2D
    convrewrite_extra_config = ("tile_size", "transform")

    def __init__(self, *args, tile_size=None, transform="fft", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fft(tile_size, transform)

    def _grouping(self):
        c, m = self.kernel.shape[2], self.kernel.shape[3]
        return c, 1, c * m


# ---- registry entries -----------------------------------------------------------------------------
FFT_ERROR_SCALE = 5e-8
FFT_ERROR_TERMS_CAP = 13.0
"""Normwise relative error of FFT convolution vs Keras's float32 kernel <= FFT_ERROR_SCALE x log2(transform
points) x min(log2(terms per output), FFT_ERROR_TERMS_CAP): rounding grows with the transform's depth and
with the reduction length (taps x channels per group), which stops adding error beyond ~8k terms (32->32
convs at k=31 and 51 measured 5e-7..9e-7). Calibrated on 30 specs x (fft, fft-tiled) (dense, grouped and
depthwise, k 3..51, 14..224 px, 1..1024 channels per group, strides 1-2, random normal data, batch 1): the
largest measured error was 0.65x this estimate, the median 0.16x; the README's fft_vs_direct errors (4e-7
at k=3 .. 2.7e-6 at k=51 depthwise) are 0.1-0.4x it, and it stays below the float32 default tolerance 1e-5
for those specs (8.4e-6 at k=51 dense, 7.2e-6 depthwise). The matmul transform (`fft-matmul`) uses the same
estimate: its errors measured 1.4-1.9x the FFT's on the same specs (dense 21x21 at 64x64: 3.7e-7 vs 2.4e-7;
depthwise 31x31 at 96x96: 4.5e-7 vs 2.4e-7, against an estimate of 6.7e-6)."""


_OTHER_KINDS = {}
"""{kind: (make_layer(layer, spec, tile_size), features(spec, tile_size))} for site kinds whose FFT layers
live in other modules (`layers/fft1d.py`), so that `fft` and `fft-tiled` cover them too."""


def register_fft_kind(kinds, layer_classes, make_layer, features, applicable=None):
    """Let the `fft` / `fft-tiled` implementations build `layer_classes` for spec kinds `kinds`.

    applicable(spec, tile_size) -> (bool, why), optional: further conditions (e.g. no tiled mode)."""
    for kind in kinds:
        _OTHER_KINDS[kind] = (make_layer, features, applicable)
    FFTImplementation.layer_classes = tuple(dict.fromkeys(FFTImplementation.layer_classes + tuple(layer_classes)))


class FFTImplementation(Implementation):
    """Full-image FFT convolution: one transform per image, kernel spectra cached per weight state.

    Applies to Conv2D / DepthwiseConv2D of known spatial size in float32 or lower (it computes in
    float32, so a float64 layer would lose precision). Strides > 1 apply but are costly: every stride-1
    output is computed and all but one in stride^2 discarded (see the `strided_waste` feature).
    """

    name = "fft"
    description = "FFT convolution over the whole image (cached kernel spectra, per-bin complex matmul)"
    layer_classes = (FFTConv2D, FFTDepthwiseConv2D)
    tile_size = "full"
    simplicity = 20
    descriptive_features = frozenset({"fft_h", "fft_w", "matmul_m", "matmul_k", "matmul_n", "matmul_batch",
                                      "strided_waste", "flops", "macs"})

    def applicable(self, spec: ConvSpec):
        if spec.kind not in ("conv2d", "depthwise_conv2d") and spec.kind not in _OTHER_KINDS:
            return False, f"kind {spec.kind} has no FFT layer"
        if "float64" in spec.dtype:
            return False, f"dtype {spec.dtype}: FFT layers compute in float32"
        if self.tile_size == "full" and (spec.height is None or spec.width is None):
            return False, "spatial size unknown at build; full-image FFT needs it (fft-tiled does not)"
        if spec.kind in _OTHER_KINDS and _OTHER_KINDS[spec.kind][2] is not None:
            return _OTHER_KINDS[spec.kind][2](spec, self.tile_size)
        return True, ""

    def canary_specs(self):
        # both regimes: dense (per-bin matmul) and one channel per group (broadcast multiply)
        if self.tile_size == "full":
            return [canary_spec(15, 16, 16, 48), canary_spec(13, 64, 64, 56, depthwise=True)]
        return [canary_spec(15, 16, 16, 64)]

    def cost_regime(self, spec: ConvSpec):
        # one channel per group: a broadcast multiply per bin; otherwise a batched complex matmul
        return "dw" if spec.in_channels // spec.groups == 1 else "dense"

    def makes(self, layer):
        return super().makes(layer) and getattr(layer, "transform", "fft") == "fft"

    def options_of(self, layer):
        return {"tile_size": layer.tile_size}

    def _tile(self, options):
        return options.get("tile_size", self.tile_size)

    def make_layer(self, layer, spec: ConvSpec, **options):
        self.check_options(options, {"tile_size"})
        if spec.kind in _OTHER_KINDS:
            return _OTHER_KINDS[spec.kind][0](layer, spec, self._tile(options))
        from ..graph import keras_config

        cls = FFTDepthwiseConv2D if spec.kind == "depthwise_conv2d" else FFTConv2D
        return cls.from_config({**keras_config(layer), "tile_size": self._tile(options)})

    def features(self, spec: ConvSpec, **options):
        if spec.kind in _OTHER_KINDS:
            return _OTHER_KINDS[spec.kind][1](spec, self._tile(options))
        return fft_cost_features(spec, self._tile(options))

    def workspace_bytes(self, spec: ConvSpec, options=None):
        """Input and output, the zero-padded real blocks that are transformed (4 bytes x fft_h x fft_w per
        forward and inverse transform), the activation spectra twice (8 bytes per bin and transform: the
        spectra and their transposed copy for the per-bin matmul), and SPECTRUM_PEAK_FACTOR x the cached
        kernel spectra (computing them), as if all were alive at once. None where the spatial size is
        unknown."""
        try:
            f = self.features(spec, **(options or {}))
        except ValueError:  # the transform layout needs the spatial size the spec leaves unknown
            return None
        if (spec.height is None or spec.width is None) and f.get("tiles", 1) <= 1:
            return None
        transforms = f["forward_transforms"] + f["inverse_transforms"]
        return (io_bytes(spec) + 4.0 * f["fft_h"] * f["fft_w"] * transforms + 16.0 * f["bins"] * transforms
                + SPECTRUM_PEAK_FACTOR * f.get("spectrum_bytes", 0.0))

    def expected_error(self, spec: ConvSpec):
        """FFT_ERROR_SCALE x log2(fft_h x fft_w) x min(log2(taps x Cin/groups), FFT_ERROR_TERMS_CAP)."""
        f = self.features(spec)
        terms = math.log2(max(reduction_terms(spec), 2))
        return FFT_ERROR_SCALE * math.log2(max(f["fft_h"] * f["fft_w"], 2.0)) * min(terms, FFT_ERROR_TERMS_CAP)


class FFTTiledImplementation(FFTImplementation):
    """Overlap-save FFT convolution: spectra sized by the tile, not the image; any input size.

    Option tile_size: output tile edge (int or (th, tw)); default `default_tile(kernel)`, ~3 kernels."""

    name = "fft-tiled"
    description = "overlap-save tiled FFT convolution (spectra depend on the tile size, not the image)"
    layer_classes = ()
    tile_size = None
    simplicity = 30

    def make_layer(self, layer, spec, **options):
        self.check_options(options, {"tile_size"})
        if spec.kind in _OTHER_KINDS:
            return _OTHER_KINDS[spec.kind][0](layer, spec, self._resolve(spec, options))
        from ..graph import keras_config

        cls = FFTDepthwiseConv2D if spec.kind == "depthwise_conv2d" else FFTConv2D
        return cls.from_config({**keras_config(layer), "tile_size": self._resolve(spec, options)})

    def _resolve(self, spec, options):
        tile = options.get("tile_size")
        if tile is None:
            tile = tuple(default_tile(k) for k in spec.effective_kernel)
        return tile

    def features(self, spec, **options):
        if spec.kind in _OTHER_KINDS:
            return _OTHER_KINDS[spec.kind][1](spec, self._resolve(spec, options))
        return fft_cost_features(spec, self._resolve(spec, options))


class FFTMatmulImplementation(FFTImplementation):
    """Full-image FFT-layout convolution with the transforms as dense DFT matrix products, channels last
    (`transform="matmul"`, see `dft_matmul`): no layout transposes for depthwise kernels, strided outputs
    never computed, every step a GEMM. Its work grows with the transform length itself (O(P + Q) per pixel),
    so it pays for short transforms on devices whose GEMMs run near peak; Conv2D and DepthwiseConv2D of
    known spatial size."""

    name = "fft-matmul"
    description = "FFT-layout convolution with DFTs as matrix products, channels last (cached kernel spectra)"
    layer_classes = ()
    simplicity = 25
    descriptive_features = frozenset({"fft_h", "fft_w", "flops", "macs"})

    def applicable(self, spec: ConvSpec):
        if spec.kind not in ("conv2d", "depthwise_conv2d"):
            return False, f"kind {spec.kind} has no matmul-transform layer"
        if spec.height is None or spec.width is None:
            return False, "spatial size unknown at build; the matmul transform needs it (fft-tiled does not)"
        return super().applicable(spec)

    def profile_applicable(self, spec: ConvSpec) -> bool:
        # Where the DFT products do over 4x the direct convolution's arithmetic the profile would spend its
        # time on timings that can only say "slower than direct" (large images, small kernels).
        f = self.features(spec)
        return f["flops"] <= 8.0 * max(f["macs"], 1.0)

    def canary_specs(self):
        return [canary_spec(15, 16, 16, 48), canary_spec(13, 64, 64, 56, depthwise=True)]

    def makes(self, layer):
        return isinstance(layer, (FFTConv2D, FFTDepthwiseConv2D)) and layer.transform == "matmul"

    def options_of(self, layer):
        return {}

    def make_layer(self, layer, spec: ConvSpec, **options):
        self.check_options(options, set())
        from ..graph import keras_config

        cls = FFTDepthwiseConv2D if spec.kind == "depthwise_conv2d" else FFTConv2D
        return cls.from_config({**keras_config(layer), "tile_size": "full", "transform": "matmul"})

    def features(self, spec: ConvSpec, **options):
        return matmul_cost_features(spec)

    def workspace_bytes(self, spec: ConvSpec, options=None):
        """Input and output; the forward-W result; the activation spectra, twice on the input side (the
        forward-H result and its bins-major copy, or its flipped copy for depthwise-like kernels) and three
        times on the output side (the two partial products and their sum, or the per-bin product and its
        transposed copy); the inverse-H result; and SPECTRUM_PEAK_FACTOR x the cached kernel spectrum, as if
        all were alive at once."""
        if spec.height is None or spec.width is None:
            return None
        f = self.features(spec)
        b = spec.batch or 1
        bins = f["fft_w"] // 2 + 1
        per_channel = 4.0 * b * 2 * f["fft_h"] * bins  # one channel of an activation spectrum
        forward_w = 4.0 * b * spec.height * 2 * bins * spec.in_channels
        layout = matmul_layout(spec.height, spec.width, spec.effective_kernel, spec.strides, spec.padding)
        inverse_h = 4.0 * b * 2 * layout.rows.out * bins * spec.filters
        return (io_bytes(spec) + forward_w + per_channel * (2.0 * spec.in_channels + 3.0 * spec.filters)
                + inverse_h + SPECTRUM_PEAK_FACTOR * f["spectrum_bytes"])


register(FFTImplementation())
register(FFTTiledImplementation())
register(FFTMatmulImplementation())
