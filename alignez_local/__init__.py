"""alignez-local: free self-alignment (AlignEZ) and activation steering for local GGUF models."""

__version__ = "0.1.0"
