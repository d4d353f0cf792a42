"""Keras layers convrewrite substitutes for convolutions. Each is registered serializable."""
from .fft import FFTConv2D, FFTDepthwiseConv2D
from .fft1d import FFTConv1D, FFTDepthwiseConv1D
from .fft3d import FFTConv3D
from .pac import PacConv2D, PacConv2DTranspose, PacPool2D
from .wide import WideDepthwiseConv2D
from .separable import FFTSeparableConv2D, WideSeparableConv2D
from .transpose import SubpixelConv2DTranspose

from .. import keras_internals as _keras_internals
from . import backend as _backend

# An exported artifact takes kernel transforms as constants computed at export (backend.exporting).
_keras_internals.hook_exports(_backend.exporting)
