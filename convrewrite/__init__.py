"""convrewrite: measure, choose and prove equivalent the fastest implementation of each convolution."""

from . import reference
from .errors import ConvRewriteError, PlanError, ProfileError, UnsupportedModelError, VerificationError
from .spec import ConvSpec

__version__ = "0.1.0"
