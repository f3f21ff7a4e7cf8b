"""What the brain-core costs: matmul FLOPs by part (`Family.flops_by_part`).

Counted as `memkernel.braincore.layer` computes them: the core's three projections, working
memory's projections and its attention (each chunk of P tokens against the ring's W slots and
itself), the episodic query, output and read (scores against all M items) and the span writes,
the MLP, the procedural code, delta and trace, and the LM head. Element-wise work (gates, norms,
the scan itself, top-k) is left out, as the other families' counts leave it out. The recurrent
form reads episodic and procedural memory twice per chunk (before and after a span end inside
it).
"""

from __future__ import annotations

from memkernel.braincore.config import BrainCoreConfig


def _chunks(config: BrainCoreConfig, num_tokens: int) -> list[int]:
  full, tail = divmod(num_tokens, config.span)
  return [config.span] * full + ([tail] if tail else [])


def flops_by_part(config: BrainCoreConfig, num_tokens: int, *, form: str = "parallel",
                  train: bool = False) -> dict[str, int]:
  """Matmul FLOPs (2 per multiply-add) of one pass over one sequence of `num_tokens` tokens.

  Returns:
    {"core", "working", "episodic", "mlp", "procedural", "head": FLOPs} (a memory the model is
    built without has no entry); train: 3x forward.
  """
  if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
    raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
  if form not in ("parallel", "recurrent"):
    raise ValueError(f"form must be 'parallel' or 'recurrent', got {form!r}")
  c, t = config, num_tokens
  d, k, m, r, f = c.d_model, c.em_key_dim, c.em_items, c.pm_rank, c.mlp_hidden
  chunks = _chunks(c, t) if form == "parallel" or t > 1 else [1]
  reads = 1 if form == "parallel" else 2
  spans = t // c.span
  per_layer = {"core": 3 * 2 * t * d * d, "mlp": 2 * 2 * t * d * f}
  if c.has_working:
    per_layer["working"] = (4 * 2 * t * d * d
                            + 2 * 2 * d * sum(q * (c.window + q) for q in chunks))
  if c.has_episodic:
    per_layer["episodic"] = (2 * 2 * t * d * k + reads * 2 * t * m * k
                             + spans * (2 * 2 * d * k + 2 * m * k))
  if c.has_procedural:
    per_layer["procedural"] = 2 * t * f * r + reads * 2 * t * r * d + 2 * t * d * r
  parts = {name: c.num_layers * value for name, value in per_layer.items()}
  parts["head"] = 2 * t * d * c.vocab_size
  if train:
    parts = {name: 3 * value for name, value in parts.items()}
  return parts
