"""What implementations exist: the registry's interface, with every built-in implementation registered.

    from convrewrite import implementations
    implementations.names()            # ['direct', 'direct-bf16', 'depthwise', 'subpixel', ..., 'pac']
    implementations.get("fft").applicable(spec)

Each built-in lives beside its layers and registers itself when imported (`convrewrite/kernels.py`:
direct and depthwise; `precision.py`: direct-bf16 and depthwise-bf16; `layers/wide.py`: depthwise-wide;
`layers/fft.py`: fft and fft-tiled, which `layers/fft1d.py` and `layers/fft3d.py` extend to Conv1D /
DepthwiseConv1D and Conv3D, and fft-matmul (Conv2D / DepthwiseConv2D); `layers/transpose.py`: subpixel and subpixel-fft (Conv2DTranspose);
`layers/separable.py`: sep-fft, sep-fft-tiled and sep-wide (SeparableConv2D); `layers/pac/`: pac). Adding an
implementation means one module with an `Implementation` subclass (see `convrewrite.registry`) that calls
`register`, and one import line here (or, outside the package, just `register(...)`).
"""

from . import kernels  # noqa: F401  registers direct, depthwise
from . import precision  # noqa: F401  registers direct-bf16, depthwise-bf16
from .layers import fft, pac, wide  # noqa: F401  register fft, fft-tiled, fft-matmul, pac, depthwise-wide
from .layers import separable, transpose  # noqa: F401  register sep-fft, sep-fft-tiled, sep-wide, subpixel, subpixel-fft
from .layers import fft1d, fft3d  # noqa: F401  Conv1D / DepthwiseConv1D (fft, fft-tiled) and Conv3D (fft) sites
from .registry import (  # noqa: F401  the registry's interface, re-exported
    Implementation, SitePolicy, canary_spec, candidates, for_layer, get, names, policy_implementations, register,
    speed_names, unregister,
)
