"""The brain-core family (seed 002): bounded working, episodic and procedural memory.

`config` (`BrainCoreConfig`, the seed's defaults, validated); `core` (the affine-scan core over
`memkernel.scan`); `working` (WM: the last W tokens' attention in a ring buffer); `episodic` (EM:
top-k read, a gated write evicting the weakest item, decay) and `procedural` (PM: low-rank fast
weights with Hebbian traces, consolidated at span boundaries under a norm budget) as pure JAX;
`state` (the one memory pytree); `layer` (one layer over a chunk, its span-boundary writes);
`model` (`BrainCoreModel`: the parallel, scan and step forms over one chunk function);
`consolidate` (a sleep: one stream's memory distilled into the slow weights); `costs`
and `family` (its registration as `braincore`).
"""
