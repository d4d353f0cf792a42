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

Layout: `kernel.py` (kernel types, guidance distances, the adaptive kernel K), `strategies.py` (the
patch / shift / wide contractions and `auto`'s choice), `layers.py` (PacConv2D, PacConv2DTranspose,
PacPool2D), `implementation.py` (the Conv2D -> PAC rewrite, registered on import).
"""

from .implementation import PacImplementation
from .kernel import parse_kernel_type
from .layers import PacConv2D, PacConv2DTranspose, PacPool2D
from .strategies import STRATEGIES, choose_strategy

__all__ = [
    "PacConv2D", "PacConv2DTranspose", "PacPool2D", "PacImplementation",
    "parse_kernel_type", "choose_strategy", "STRATEGIES",
]
