"""File formats: the bounded GGUF reader, control vectors and steering profiles."""
