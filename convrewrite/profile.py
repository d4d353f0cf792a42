"""Measure this device: time every applicable implementation on a grid of ConvSpecs, fit a CostModel.

Each timing builds the implementation's layer from a Keras layer with random weights, compiles the call
(tf.function), excludes the first calls (tracing, compilation, spectra caches), and takes the median of
interleaved repetitions; when repetitions disagree by more than 2x it takes more (outlier guard).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, List

import numpy as np

from . import implementations
from .calibration import canary_pairs
from .cost import CostModel
from . import device
from .planner import constraint_violation
from .spec import ConvSpec
from .timing import compiled, progress as progress_bar, time_interleaved

KERNELS = (1, 3, 5, 7, 9, 11, 13, 15, 17, 21, 25, 31, 41, 51)
MAX_DIRECT_MACS = {"quick": 1.5e9, "full": 4e9}
"""Specs whose direct convolution would take longer than ~1 s here are shrunk (batch, then size)."""


PROFILE_MEMORY_CAP = 2 * 2**30
"""Bytes of estimated working memory above which an implementation is not timed on a spec: FFT of a
1x1 512->2048 conv would hold 9 GB of kernel spectra (and run out of memory here) to be slower anyway."""


def _within_memory_cap(name: str, spec: ConvSpec) -> bool:
    return not constraint_violation(name, spec, memory_limit=PROFILE_MEMORY_CAP)




def layer_from_spec(spec: ConvSpec, seed: int = 0):
    """A built Keras Conv2D / DepthwiseConv2D / Conv2DTranspose / SeparableConv2D computing `spec`, with random
    (non-zero) weights."""
    import keras

    common = dict(kernel_size=spec.kernel, strides=spec.strides, padding=spec.padding, data_format=spec.data_format,
                  dilation_rate=spec.dilation, use_bias=spec.use_bias, activation=spec.activation, dtype=spec.dtype)
    if spec.is_1d:
        return _layer_from_1d_spec(spec, common, seed)
    if spec.kind == "conv3d":
        return _layer_from_3d_spec(spec, common, seed)
    if spec.kind == "depthwise_conv2d":
        layer = keras.layers.DepthwiseConv2D(depth_multiplier=spec.depth_multiplier, **common)
    elif spec.kind == "separable_conv2d":
        layer = keras.layers.SeparableConv2D(spec.filters, depth_multiplier=spec.depth_multiplier, **common)
    elif spec.kind == "conv2d_transpose":
        layer = keras.layers.Conv2DTranspose(spec.filters, output_padding=spec.output_padding, **common)
    else:
        layer = keras.layers.Conv2D(spec.filters, groups=spec.groups, **common)
    h, w = spec.height or 32, spec.width or 32
    shape = (spec.batch or 1, spec.in_channels, h, w) if spec.data_format == "channels_first" else (spec.batch or 1, h, w, spec.in_channels)
    layer.build(shape)
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(v.shape).astype("float32") * 0.1 for v in layer.get_weights()])
    return layer, shape


def _layer_from_1d_spec(spec: ConvSpec, common: dict, seed: int):
    """`layer_from_spec` for a 1-D (height-1) spec: a built Conv1D / DepthwiseConv1D and its 3-D input shape."""
    import keras

    common = dict(common, kernel_size=spec.kernel[1], strides=spec.strides[1], dilation_rate=spec.dilation[1])
    if spec.kind == "depthwise_conv1d":
        layer = keras.layers.DepthwiseConv1D(depth_multiplier=spec.depth_multiplier, **common)
    else:
        layer = keras.layers.Conv1D(spec.filters, groups=spec.groups, **common)
    n = spec.width or max(256, spec.effective_kernel[1])
    b = spec.batch or 1
    shape = (b, spec.in_channels, n) if spec.data_format == "channels_first" else (b, n, spec.in_channels)
    layer.build(shape)
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(v.shape).astype("float32") * 0.1 for v in layer.get_weights()])
    return layer, shape


def _layer_from_3d_spec(spec: ConvSpec, common: dict, seed: int):
    """`layer_from_spec` for a Conv3D spec: a built Conv3D and its 5-D input shape."""
    import keras

    common = dict(common, kernel_size=(spec.kernel_depth, *spec.kernel), strides=(spec.stride_depth, *spec.strides),
                  dilation_rate=(spec.dilation_depth, *spec.dilation))
    layer = keras.layers.Conv3D(spec.filters, groups=spec.groups, **common)
    size = (spec.depth or 16, spec.height or 16, spec.width or 16)
    b = spec.batch or 1
    shape = (b, spec.in_channels, *size) if spec.data_format == "channels_first" else (b, *size, spec.in_channels)
    layer.build(shape)
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(v.shape).astype("float32") * 0.1 for v in layer.get_weights()])
    return layer, shape


def timed_calls(spec: ConvSpec, allow=None, training: bool = False) -> Dict[str, object]:
    """{implementation name: zero-argument callable} running each applicable implementation's layer on
    `spec` (compiled, warmed up: traced and run once), forward or, with `training`, forward + backward.

    An implementation that runs out of memory while being built or on its first (warm-up) call is left out
    of the result (it is then never predicted from this spec's timing), as are those over PROFILE_MEMORY_CAP."""
    import keras

    layer, shape = layer_from_spec(spec)
    # A tensor passed as the compiled call's argument, never captured: a numpy array would be embedded as a
    # constant in every graph it builds (memory that grew by ~60 MB per spec on TensorFlow).
    x = keras.ops.convert_to_tensor(np.random.default_rng(1).standard_normal(shape).astype("float32"))
    fns = {}
    for name, (ok, _) in implementations.candidates(spec, allowed=allow).items():
        impl = implementations.get(name)
        if not ok or not impl.profile_applicable(spec) or not _within_memory_cap(name, spec):
            continue
        try:
            new = impl.make_layer(layer, spec)
            impl.probe_call(new, x)  # builds it
            impl.transfer_weights(layer, new, spec)
            run = compiled(_timed_call(impl, new, training), [new])
            fn = functools.partial(run, x)
            fn()  # the warm-up call (tracing, compiling) here, so that running out of memory skips this one only
        except Exception as exc:  # noqa: BLE001 - only running out of memory is expected here
            if not _out_of_memory(exc):
                raise
            continue
        fns[name] = fn
    return fns


def time_spec(spec: ConvSpec, allow=None, repeats: int = 3, max_time: float = 4.0,
              training: bool = False) -> Dict[str, float]:
    """Median seconds per call of every applicable implementation on `spec`, timed interleaved; with
    `training`, per forward + backward (gradients for the input and the layer's weights, as in a training
    step: layers.backend.forward_backward). See `timed_calls` for what is left out, `spec_samples` for the
    samples and the outlier guard."""
    samples = time_spec_samples(spec, allow=allow, repeats=repeats, max_time=max_time, training=training)
    return {k: float(np.median(v)) for k, v in samples.items()}


def time_spec_samples(spec: ConvSpec, allow=None, repeats: int = 3, max_time: float = 4.0,
                      training: bool = False) -> Dict[str, List[float]]:
    """`time_spec`'s samples: {implementation: [seconds per call]}, for decisions on an interval
    (calibration)."""
    return spec_samples(timed_calls(spec, allow, training), repeats, max_time)


OUTLIER_SPREAD = 2.0
"""When one variant's slowest sample is more than this many times its fastest, the round met a busy machine:
as many samples again are taken, and the median is of all of them (the outlier guard)."""


def spec_samples(fns, repeats: int = 3, max_time: float = 4.0) -> Dict[str, List[float]]:
    """{name: [seconds per call]} of `timed_calls`' callables, interleaved, `repeats` rounds (twice as many
    where a round disagrees by more than OUTLIER_SPREAD)."""
    res = time_interleaved(fns, repeats=repeats, warmup=0, max_time=max_time)
    samples = {k: list(v["samples"]) for k, v in res.items()}
    if any(max(v) / max(min(v), 1e-9) > OUTLIER_SPREAD for v in samples.values()):  # noisy round: more samples
        more = time_interleaved(fns, repeats=repeats, warmup=0, max_time=max_time)
        samples = {k: samples[k] + list(more[k]["samples"]) for k in fns}
    return samples


def _out_of_memory(exc) -> bool:
    """Whether `exc` is the backend running out of memory (TensorFlow's ResourceExhaustedError: e.g. a
    backward pass needing 17 GiB, which the forward-only workspace estimates do not foresee)."""
    return "ResourceExhausted" in type(exc).__name__ or "OOM" in str(exc) or "Out of memory" in str(exc)


def _timed_call(impl, new, training: bool):
    """The call time_spec times, of the input: the layer forward, or forward + backward."""
    if not training:
        return lambda x: impl.probe_call(new, x)
    from .layers import backend

    return lambda x: backend.forward_backward(lambda t: impl.probe_call(new, t), x, new.trainable_variables)


def time_canaries(allow=None, repeats: int = 5, pairs=None, with_samples: bool = False) -> List[dict]:
    """Time `calibration.canary_pairs()` (or `pairs`) here: [{"spec", "impl", "seconds"}], one per pair, timed
    interleaved per spec like the grid (so a profile's canaries and a calibration's compare like with like);
    "seconds" is the median of the samples, which `with_samples` adds as "samples" (for calibration's
    intervals). allow: implementation names to time (default all that declare canaries). Takes 1-2 s on 2 cores."""
    by_spec: Dict[ConvSpec, List[str]] = {}
    for spec, impl in (canary_pairs() if pairs is None else pairs):
        if allow is None or impl in allow:
            by_spec.setdefault(spec, []).append(impl)
    rows = []
    for spec, impls in by_spec.items():
        for impl, samples in time_spec_samples(spec, allow=impls, repeats=repeats, max_time=1.0).items():
            rows.append({"spec": spec.to_json(), "impl": impl, "seconds": float(np.median(samples)),
                         **({"samples": samples} if with_samples else {})})
    return rows


def _log_uniform_int(rng, lo, hi):
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def random_spec(rng, max_macs: float) -> ConvSpec:
    """One spec drawn to cover what the cost model must predict: dense, grouped-depthwise and depthwise
    convs, kernels 1..51, channels 1..1024, spatial 7..256, strides 1-2, batch 1-8."""
    kind = rng.choice(["dense", "dense", "dw", "grouped"])  # spec families, not implementations
    k = int(rng.choice(KERNELS))
    stride = int(rng.choice([1, 1, 1, 2]))
    padding = str(rng.choice(["same", "same", "valid"]))
    hw = _log_uniform_int(rng, max(7, k if padding == "valid" else 7), 256)
    batch = int(rng.choice([1, 2, 4, 8]))
    if kind == "dense":
        cin = _log_uniform_int(rng, 1, 512 if k <= 3 else 128)
        cout = _log_uniform_int(rng, 1, 512 if k <= 3 else 128)
        groups = 1
    else:
        cin = _log_uniform_int(rng, 8, 1024)
        cout, groups = cin, cin
    spec = ConvSpec(kind="depthwise_conv2d" if kind == "dw" else "conv2d", in_channels=cin, filters=cout,
                    kernel=(k, k), height=hw, width=hw, batch=batch, strides=(stride, stride), padding=padding,
                    groups=groups if kind != "dw" else cin)
    return shrink(spec, max_macs)


def shrink(spec: ConvSpec, max_macs: float) -> ConvSpec:
    """`spec` with batch, then spatial size, then channels reduced until its direct convolution does at
    most `max_macs` (a grouped Conv2D counts 30x: TF runs it ~30x slower per MAC than a dense one)."""
    budget = max_macs / (30 if spec.kind == "conv2d" and spec.groups > 1 else 1)
    min_hw = spec.kernel[0] if spec.padding == "valid" else 7
    while (spec.macs() or 0) > budget:  # shrink to keep one direct call near a second
        if spec.batch > 1:
            spec = spec.with_input(batch=spec.batch // 2)
        elif spec.is_1d and spec.width > max(spec.kernel[1], 256):  # a 1-D spec shrinks its length
            spec = spec.with_input(width=max(spec.width * 3 // 4, spec.kernel[1], 256))
        elif not spec.is_1d and spec.height > min_hw:
            h = max(spec.height * 3 // 4, min_hw)
            spec = spec.with_input(height=h, width=h)
        elif spec.in_channels > 1 or spec.filters > 1:
            cin = max(spec.in_channels // 2, 1)
            cout = cin if spec.groups > 1 else max(spec.filters // 2, 1)
            spec = dataclasses.replace(spec, in_channels=cin, filters=cout, groups=cin if spec.groups > 1 else 1)
        else:
            break
    return spec


def random_other_kind_spec(rng, max_macs: float) -> ConvSpec:
    """A Conv2DTranspose (decoder-like: kernel 2..5, stride 1-2, SAME) or SeparableConv2D (kernel 3..31)
    spec, shrunk (batch, then size) to the direct-MAC budget."""
    batch = int(rng.choice([1, 2, 4, 8]))
    hw = _log_uniform_int(rng, 7, 128)
    cin, cout = _log_uniform_int(rng, 4, 256), _log_uniform_int(rng, 4, 256)
    if rng.random() < 0.5:
        k, s = int(rng.choice([2, 3, 4, 5])), int(rng.choice([1, 2, 2]))
        spec = ConvSpec(kind="conv2d_transpose", in_channels=cin, filters=cout, kernel=(k, k), height=hw, width=hw,
                        batch=batch, strides=(s, s), padding="same")
    else:
        k = int(rng.choice([3, 5, 7, 13, 21, 31]))
        spec = ConvSpec(kind="separable_conv2d", in_channels=cin, filters=cout, kernel=(k, k), height=hw,
                        width=hw, batch=batch, padding="same")
    while (spec.macs() or 0) > max_macs and (spec.batch > 1 or spec.height > 7):
        spec = (spec.with_input(batch=spec.batch // 2) if spec.batch > 1
                else spec.with_input(height=max(spec.height * 3 // 4, 7), width=max(spec.height * 3 // 4, 7)))
    return spec


def other_kind_specs(batch: int = 8) -> List[ConvSpec]:
    """Conv2DTranspose and SeparableConv2D shapes of decoders (U-Net, DCGAN: 4x4 / 3x3 / 2x2 stride 2) and of
    separable large-kernel nets (Xception-style 3x3, 13x13 and 31x31 separable at 56x56; three 12-13 wide
    kernels, so that sep-wide, which applies to those widths only, gets the 3 timings a fit needs)."""
    def convt(k, cin, cout, hw, s=2):
        return ConvSpec(kind="conv2d_transpose", in_channels=cin, filters=cout, kernel=(k, k), height=hw, width=hw,
                        batch=batch, strides=(s, s), padding="same")

    def sep(k, cin, cout, hw):
        return ConvSpec(kind="separable_conv2d", in_channels=cin, filters=cout, kernel=(k, k), height=hw, width=hw,
                        batch=batch, padding="same")

    return [convt(4, 64, 32, 56), convt(3, 128, 64, 28), convt(2, 256, 128, 14), convt(4, 512, 256, 7),
            convt(3, 64, 64, 56, s=1), sep(3, 128, 128, 56), sep(13, 128, 128, 56), sep(31, 128, 128, 56),
            sep(3, 728, 728, 14), sep(13, 256, 256, 28), sep(12, 64, 64, 56), sep(13, 512, 512, 14)]


def canonical_specs(batch: int = 8) -> List[ConvSpec]:
    """Shapes common architectures are made of (ResNet, MobileNet/EfficientNet, ConvNeXt, large-kernel
    nets), so the fit is dense where most convolutions are; random specs cover the rest of the space."""
    def conv(k, cin, cout, hw, s=1, groups=1, kind="conv2d"):
        return ConvSpec(kind=kind, in_channels=cin, filters=cout, kernel=(k, k), height=hw, width=hw, batch=batch,
                        strides=(s, s), padding="same", groups=groups)

    return [
        conv(7, 3, 64, 224, s=2), conv(3, 64, 64, 56), conv(1, 256, 64, 56), conv(3, 256, 256, 14),
        conv(3, 128, 128, 28, s=2), conv(1, 512, 2048, 7),
        conv(3, 32, 32, 112, groups=32, kind="depthwise_conv2d"), conv(3, 144, 144, 56, s=2, groups=144, kind="depthwise_conv2d"),
        conv(5, 240, 240, 28, groups=240, kind="depthwise_conv2d"), conv(3, 576, 576, 14, groups=576, kind="depthwise_conv2d"),
        conv(7, 96, 96, 56, groups=96), conv(7, 192, 192, 28, groups=192), conv(7, 384, 384, 14, groups=384),
        conv(7, 768, 768, 7, groups=768), conv(7, 128, 128, 56, groups=128, kind="depthwise_conv2d"),
        conv(13, 128, 128, 56, groups=128, kind="depthwise_conv2d"), conv(31, 128, 128, 56, groups=128, kind="depthwise_conv2d"),
        # later stages of large-kernel nets (RepLKNet 31-27-13, SLaK, UniRepLKNet 13x13), ordered so that the
        # quick grid (every third) holds three 13x13 depthwise specs: an implementation that applies to that
        # kernel width only is then fitted (a fit needs 3 timings) by a quick profile too
        conv(29, 256, 256, 28, groups=256, kind="depthwise_conv2d"), conv(13, 256, 256, 28, groups=256, kind="depthwise_conv2d"),
        conv(27, 512, 512, 14, groups=512, kind="depthwise_conv2d"), conv(13, 1024, 1024, 7, groups=1024, kind="depthwise_conv2d"),
        conv(13, 512, 512, 14, groups=512, kind="depthwise_conv2d"),
    ] + other_kind_specs(batch) + canonical_1d_specs(batch)


def canonical_1d_specs(batch: int = 8) -> List[ConvSpec]:
    """Conv1D / DepthwiseConv1D shapes of audio and sequence models (height-1 specs, see spec.KINDS_1D):
    short kernels over long sequences (wav2vec-style front ends, TCNs), long filters (learned filterbanks,
    SincNet-like 251 taps) and long depthwise kernels (long-convolution sequence models, 1024 taps)."""
    def conv1d(k, cin, cout, n, s=1, groups=1, kind="conv1d", padding="same", b=batch):
        return ConvSpec(kind=kind, in_channels=cin, filters=cout, kernel=(1, k), height=1, width=n, batch=b,
                        strides=(1, s), padding=padding, groups=groups, depth_multiplier=cout // cin if groups > 1 else 1)

    return [
        conv1d(3, 64, 64, 4096), conv1d(251, 16, 16, 16000, b=2), conv1d(31, 64, 64, 4096, padding="causal", b=2),
        conv1d(1024, 64, 64, 4096, groups=64, kind="depthwise_conv1d"), conv1d(10, 1, 64, 16000, s=5, padding="valid"),
        conv1d(127, 128, 128, 2048, groups=128, kind="depthwise_conv1d"),
    ] + canonical_3d_specs()


def canonical_3d_specs(batch: int = 2) -> List[ConvSpec]:
    """Conv3D shapes (video and volume models): the 3x3x3 most are made of, and larger kernels where the FFT
    may pay (a k^3 kernel costs k^3 MACs per output and channel pair directly)."""
    def conv3d(k, cin, cout, d, hw, s=1):
        return ConvSpec(kind="conv3d", in_channels=cin, filters=cout, kernel=(k, k), height=hw, width=hw, batch=batch,
                        strides=(s, s), padding="same", depth=d, kernel_depth=k, stride_depth=s)

    return [conv3d(3, 32, 32, 16, 28), conv3d(5, 16, 16, 16, 32), conv3d(7, 16, 16, 16, 32), conv3d(9, 8, 8, 24, 24)]


def grid(mode: str = "quick", seed: int = 0) -> List[ConvSpec]:
    """The specs a profile measures: `quick` (about a minute on a 2-core CPU) or `full` (<= 10 minutes):
    common architectures' shapes (all in full, every third in quick) plus random specs."""
    if mode not in ("quick", "full"):
        raise ValueError(f"Received mode={mode!r}; expected 'quick' or 'full'.")
    n = 30 if mode == "quick" else 130
    rng = np.random.default_rng(seed)
    canonical = canonical_specs()
    canonical = canonical if mode == "full" else canonical[::3]
    specs = canonical + [random_spec(rng, MAX_DIRECT_MACS[mode]) for _ in range(n)]
    # transposed and separable convs from a generator of their own, so the specs above stay as they were
    other = np.random.default_rng(seed + 1)
    specs += [random_other_kind_spec(other, MAX_DIRECT_MACS[mode]) for _ in range(4 if mode == "quick" else 16)]
    # 1-D sites from a stream of their own, so the 2-D grid stays the one earlier profiles measured
    rng_1d = np.random.default_rng([seed, 1])
    specs += [random_1d_spec(rng_1d, MAX_DIRECT_MACS[mode]) for _ in range(4 if mode == "quick" else 16)]
    return list(dict.fromkeys(specs))


TRAINING_COST = 3.0
"""Forward + backward costs about this many forwards (the input's and the kernel's gradient are each a
convolution as large as the forward): the training grid's specs are shrunk by it to keep a timing near a
second."""


def training_grid(mode: str = "quick", seed: int = 0) -> List[ConvSpec]:
    """The specs a training profile times forward + backward: `grid(mode, seed)`'s, each shrunk
    (`shrink`) to MAX_DIRECT_MACS / TRAINING_COST."""
    budget = MAX_DIRECT_MACS[mode if mode in MAX_DIRECT_MACS else "quick"] / TRAINING_COST
    return list(dict.fromkeys(shrink(spec, budget) for spec in grid(mode, seed)))




KERNELS_1D = (3, 5, 9, 15, 31, 63, 127, 251, 511, 1023)


def random_1d_spec(rng, max_macs: float) -> ConvSpec:
    """One Conv1D / DepthwiseConv1D spec (height 1): kernels 3..1023, lengths 256..32768, channels 1..256,
    same / valid / causal padding, strides 1-2, batch 1-8; shrunk to about `max_macs` like `random_spec`."""
    depthwise = bool(rng.random() < 0.4)
    k = int(rng.choice(KERNELS_1D))
    padding = str(rng.choice(["same", "valid", "causal"] if not depthwise else ["same", "valid"]))
    n = _log_uniform_int(rng, max(256, k), 32768)
    cin = _log_uniform_int(rng, 1 if not depthwise else 8, 256)
    cout = cin if depthwise else _log_uniform_int(rng, 1, 256)
    spec = ConvSpec(kind="depthwise_conv1d" if depthwise else "conv1d", in_channels=cin, filters=cout,
                    kernel=(1, k), height=1, width=n, batch=int(rng.choice([1, 2, 4, 8])),
                    strides=(1, int(rng.choice([1, 1, 1, 2]))), padding=padding, groups=cin if depthwise else 1)
    while (spec.macs() or 0) > max_macs:
        if spec.batch > 1:
            spec = spec.with_input(batch=spec.batch // 2)
        elif spec.width > max(256, k):
            spec = spec.with_input(width=max(spec.width * 3 // 4, 256, k))
        elif spec.in_channels > 1 or spec.filters > 1:
            cin = max(spec.in_channels // 2, 1)
            cout = cin if depthwise else max(spec.filters // 2, 1)
            spec = dataclasses.replace(spec, in_channels=cin, filters=cout, groups=cin if depthwise else 1)
        else:
            break
    return spec


def profile_device(mode: str = "quick", progress: bool = True, allow=None, seed: int = 0, specs=None,
                   training: bool = False) -> CostModel:
    """Measure this device and return a fitted CostModel.

    Args:
        mode: "quick" (about a minute on 2 cores) or "full" (a few minutes): which `grid(mode)` is timed.
        progress: draw a progress bar on stderr.
        allow: implementation names to time (default: every registered one that applies).
        seed: the random grid's seed.
        specs: time these ConvSpecs instead of the grid.
        training: also time every implementation forward + backward (a training step's share) on
            `training_grid(mode)` (or `specs`), fitted like the inference times: `plan(mode="training")`
            predicts from them. About three times the inference grid's time.

    Returns:
        A fitted CostModel of this device (`device.fingerprint()`) with its canaries timed, so that
        another device can calibrate it (`calibration.calibrate`).

    Example:
        >>> cm = convrewrite.profile_device(mode="quick")
        >>> cm.save("my-device.json")
    """
    given = list(specs) if specs is not None else None
    measurements = time_grid(given or grid(mode, seed), allow, f"profiling ({mode})", progress, False)
    trained = None
    if training:
        rows = time_grid(given or training_grid(mode, seed), allow, f"profiling ({mode}, forward+backward)",
                          progress, True)
        trained = {"measurements": rows}
    return CostModel(device.fingerprint(), measurements, mode=mode, canaries=time_canaries(allow=allow),
                     training=trained).fit()


def time_grid(specs, allow, label: str, progress: bool = True, training: bool = False) -> List[dict]:
    """[{"spec", "impl", "seconds"}] of every applicable implementation on every spec (forward, or forward +
    backward with `training`)."""
    rows = []
    for spec in progress_bar(specs, label, progress):
        for impl, seconds in time_spec(spec, allow=allow, repeats=3, training=training).items():
            rows.append({"spec": spec.to_json(), "impl": impl, "seconds": seconds})
    return rows
