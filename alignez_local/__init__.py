"""alignez-local: free self-alignment (AlignEZ) and activation steering for local GGUF models.

The folders follow the pipeline:
    llama/       the only code that talks to llama.cpp (generation, capture, steering hooks)
    formats/     the bounded GGUF reader, control vectors and steering profiles
    align/       preference axes, self-generated pairs, directions, fit, the edit rule, export
    evaluation/  prompt sets, refusal detection, the local judge, the eval run
    apps/        the chat session and the command line
"""

from .version import __version__  # noqa: E402

from .errors import AlignezError  # noqa: E402
from .formats.control_vector import ControlVector, read_control_vector, write_control_vector  # noqa: E402
from .formats.profile import SteeringProfile, load_profile, save_profile  # noqa: E402
from .llama.engine import Completion, Engine, Sampling  # noqa: E402
from .align.steering import ProfileSlot, Steering, VectorSlot  # noqa: E402

__all__ = [
    "AlignezError", "Completion", "ControlVector", "Engine", "ProfileSlot", "Sampling", "Steering",
    "SteeringProfile", "VectorSlot", "load_profile", "read_control_vector", "save_profile", "write_control_vector",
]
