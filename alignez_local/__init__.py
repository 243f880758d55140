"""alignez-local: free self-alignment (AlignEZ) and activation steering for local GGUF models.

The Python API (``api.py``), also what the ``alignez`` commands call:

    import alignez_local as az
    engine = az.load("qwen2.5-coder-0.5b-instruct")
    result = az.steer(engine, axis="french")          # pairs, fit, vector, strength chosen by the behaviour
    with result.vector.apply(engine):
        print(az.generate(engine, "Name three rivers."))

The folders follow the pipeline (docs/architecture.md): ``measures/`` (does an answer show the
behaviour, and at what cost), ``formats/`` (GGUF files) and ``llama/`` (the only code that talks to
llama.cpp) at the bottom; ``align/`` (AlignEZ: pairs, directions, vectors, strengths) on them;
``evaluation/`` (did steering help?); ``pipeline.py`` (the runs); ``apps/`` (chat, CLI, server).
"""

from .version import __version__
from .errors import AlignezError
from .formats.control_vector import ControlVector, read_control_vector, write_control_vector
from .formats.profile import SteeringProfile, load_profile, save_profile
from .llama.engine import Completion, Engine, Sampling
from .align.preferences import GenerationSettings, PreferencePair
from .align.steering import ProfileSlot, Steering, VectorSlot
from .align.vectors import FitSettings
from .pipeline import SteerResult
from .api import evaluate, generate, load, queries, resolve_axis, steer, steer_refusals, train

__all__ = [
    "AlignezError", "Completion", "ControlVector", "Engine", "FitSettings", "GenerationSettings", "PreferencePair",
    "ProfileSlot", "Sampling", "Steering", "SteerResult", "SteeringProfile", "VectorSlot", "__version__", "evaluate",
    "generate", "load", "load_profile", "queries", "read_control_vector", "resolve_axis", "save_profile", "steer", "steer_refusals",
    "train", "write_control_vector",
]
