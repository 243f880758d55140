"""File formats: the bounded GGUF reader (gguf_file), writer (gguf_write), file kinds (kinds), and the
two steering files, control vectors and profiles, with what they share (steering_file)."""
