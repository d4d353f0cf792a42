"""Keras layers convrewrite substitutes for convolutions. Each is registered serializable."""
from .pac import PacConv2D, PacConv2DTranspose, PacPool2D
