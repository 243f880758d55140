"""alignez-local: free self-alignment (AlignEZ) and activation steering for local GGUF models.

The pipeline, one module per stage:
    preferences  the model writes its own preference pairs
    fit          hidden states on those pairs -> per-layer preference subspaces (directions, edit)
    steering     the exact input-dependent AlignEZ edit, and control vectors, applied in llama.cpp
    export       a profile -> a portable llama.cpp control vector
    chat / evaluate
engine.py is the only module that talks to llama.cpp.
"""

__version__ = "0.1.0"

from .control_vector import ControlVector, read_control_vector, write_control_vector  # noqa: E402
from .engine import Completion, Engine, Sampling  # noqa: E402
from .errors import AlignezError  # noqa: E402
from .profile import SteeringProfile, load_profile, save_profile  # noqa: E402
from .steering import ProfileSlot, Steering, VectorSlot  # noqa: E402

__all__ = [
    "AlignezError", "Completion", "ControlVector", "Engine", "ProfileSlot", "Sampling", "Steering",
    "SteeringProfile", "VectorSlot", "load_profile", "read_control_vector", "save_profile", "write_control_vector",
]
