"""The brain-core family (seed 002), being built: bounded working, episodic and procedural memory.

So far: `config` (`BrainCoreConfig`, the seed's defaults, validated) and, pure JAX, `episodic` (EM: the episodic store's top-k read, gated write that evicts the
weakest item, decay) and `procedural` (PM: plastic low-rank fast weights with Hebbian eligibility
traces, consolidated at span boundaries under a norm budget). The family's model, config and
registration come with the rest of its issue.
"""
