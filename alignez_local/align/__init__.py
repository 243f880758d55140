"""AlignEZ: axes, self-generated preferences, directions, fit, the edit rule, export."""
