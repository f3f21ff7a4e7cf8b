"""The brain-core family (seed 002), being built: bounded working, episodic and procedural memory.

So far: `episodic` (the episodic store's read, gated write and decay, pure JAX). The family's
model, config and registration come with the rest of its issue.
"""
