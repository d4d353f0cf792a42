"""Shape arithmetic shared by ConvSpec and the layers: argument pairs, TF/Keras padding, output sizes.

Pure functions of ints (padding also of scalar tensors, for sizes known only at run time), so they are
tested once and used the same way everywhere. `convrewrite.reference` keeps its own copies on purpose:
it is the independent oracle the rest is checked against.
"""

from __future__ import annotations

from typing import Optional, Tuple


def pair(value, name: str, owner: str = "", minimum: int = 1) -> Tuple[int, int]:
    """(a, b) from an int or a pair of ints, each >= minimum.

    Raises ValueError naming the argument, its owner and what was expected:
    "Received invalid strides=(0, 1) for FFTConv2D 'conv3'; expected an int or a pair of ints >= 1."
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        value = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        value = ()
    if len(value) != 2 or any(v < minimum for v in value):
        where = f" for {owner}" if owner else ""
        raise ValueError(f"Received invalid {name}={value!r}{where}; expected an int or a pair of ints >= {minimum}.")
    return value


def effective_length(kernel: int, dilation: int = 1) -> int:
    """Extent of a kernel once dilation spreads its taps: (k - 1) * d + 1."""
    return (kernel - 1) * dilation + 1


def output_length(size: Optional[int], effective_kernel: int, stride: int, padding: str) -> Optional[int]:
    """Output length along one axis under TF/Keras rules (None where the input length is unknown):
    SAME gives ceil(size / stride), VALID ceil((size - k_eff + 1) / stride), never below 0."""
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    return max(-(-(size - effective_kernel + 1) // stride), 0)


def same_pads(size, effective_kernel: int, stride: int):
    """TF's (before, after) SAME padding along one axis; `size` may be an int or a scalar tensor.

    TF pads the total needed for ceil(size / stride) outputs and puts the odd element *after*
    (bottom/right): SAME is asymmetric, so a symmetric pad of k // 2 is wrong for even kernels and strides."""
    out = -(-size // stride)
    total = (out - 1) * stride + effective_kernel - size
    if isinstance(total, int):
        total = max(total, 0)
    else:  # a tensor: the size is known only at run time
        import keras

        total = keras.ops.maximum(total, 0)
    return total // 2, total - total // 2


def transpose_output_length(size: Optional[int], effective_kernel: int, stride: int, padding: str,
                            output_padding: Optional[int] = None) -> Optional[int]:
    """Output length of a transposed convolution (Keras's Conv2DTranspose) along one axis, None where the input
    length is unknown. Without output_padding: size * stride (SAME), size * stride + max(k_eff - stride, 0)
    (VALID); with it: (size - 1) * stride + k_eff - 2 * pad + output_padding, pad = k_eff // 2 (SAME) or 0."""
    if size is None:
        return None
    if output_padding is None:
        return size * stride + (0 if padding == "same" else max(effective_kernel - stride, 0))
    pad = effective_kernel // 2 if padding == "same" else 0
    return (size - 1) * stride + effective_kernel - 2 * pad + output_padding
