"""The brain-core family (seed 002), being built: bounded working, episodic and procedural memory.

So far: `config` (`BrainCoreConfig`, the seed's defaults, validated), `core` (the affine-scan
core, over `memkernel.scan`, with a per-token carry for document boundaries), `working` (WM: the
last W tokens' attention in a ring buffer, the sliding-window peer's arithmetic) and two memories
as pure JAX: `episodic` (EM: top-k read, a gated write that evicts the weakest item, decay) and
`procedural` (PM: plastic low-rank fast weights with Hebbian eligibility traces, consolidated at
span boundaries under a norm budget). The model, its forms and its registration as a family
come with the rest of its issue.
"""
