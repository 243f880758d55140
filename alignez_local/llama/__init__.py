"""The llama.cpp engine: the only code that talks to llama.cpp."""
