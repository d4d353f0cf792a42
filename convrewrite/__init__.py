"""convrewrite: measure, choose and prove equivalent the fastest implementation of each convolution.

    fast = convrewrite.optimize(model)      # new model, verified equivalent; `model` is untouched
    print(convrewrite.plan(model).summary())
"""

import os as _os

# TensorFlow's C++ INFO/WARNING start-up lines otherwise clutter every CLI call; set it yourself to override.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ._quiet_import import import_tensorflow_quietly as _import_tensorflow_quietly

_import_tensorflow_quietly()

# implementations first: the layer modules it imports register themselves against it.
from . import implementations  # noqa: I001
from . import layers, reference
from .api import build, optimize, plan, verify
from .cost import CostModel, fingerprint
from .errors import ConvRewriteError, PlanError, ProfileError, UnsupportedModelError, VerificationError
from .planner import Plan, PlanRow
from .profile import profile_device
from .spec import ConvSpec
from .verify import VerificationReport

__version__ = "0.1.0"

__all__ = [
    "optimize", "plan", "verify", "build", "profile_device", "CostModel", "fingerprint",
    "layers", "reference", "implementations",
    "Plan", "PlanRow", "ConvSpec", "VerificationReport",
    "ConvRewriteError", "PlanError", "ProfileError", "UnsupportedModelError", "VerificationError",
]
