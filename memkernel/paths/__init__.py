"""Routing paths (seed 004): the paths the kernel's router takes, counted in a trie with a
budget, what they encode, and what they are worth (`report`, `experiments/paths.py`)."""
