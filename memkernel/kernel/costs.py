"""What the kernel costs: matmul FLOPs by part, and the memory state a configuration reads.

Analytic counts, used by the benchmark (achieved GFLOP/s, per-token costs) and the ablation sweep
(state bytes per token); `memkernel.costs` reaches them through the family registry.
"""

from __future__ import annotations

from typing import Any, Sequence


from memkernel.kernel import routing
from memkernel.kernel.config import KernelConfig
from memkernel.kernel.state import Memory


def flops_by_part(config: KernelConfig, num_tokens: int, *, form: str = "parallel",
                         train: bool = False) -> dict[str, int]:
  """Matmul FLOPs (2 per multiply-add) of one pass of `KernelModel(config)` over one sequence.

  Counted as the model computes them: trunk (R roots' gate, input and output projections), the
  memory projections, leaf summaries (attention pooling), routing scores of every candidate the
  beam scores (log2(N) + 1 Fenwick nodes, then 2S children per expansion, N = capacity in leaves;
  with `route_descend=False` the Fenwick nodes only; M keys per candidate with `node_reps` M)
  with the routed tree value, the exact read
  (logits and values over K * L tokens), the fusion projections, the MLP and the LM head.
  Element-wise work (norms, gates, tree merges, the recurrence) is left out, as
  the peers' count leaves it out. Per token this is a + b * log2(N): O(T log T) for a sequence,
  O(log n) per decoded token.

  Args:
    config: the model config (its `max_seq_len` sets the tree the router descends).
    num_tokens: T.
    form: 'parallel' (leaf summaries over all N leaf slots, as the parallel form pads them) or
      'recurrent' (`scan` / `step`: one live-leaf summary per chunk of <= L tokens, 1-token chunks
      for T = 1).
    train: the forward + backward of a training step (3x the forward), with the training beam and,
      if `teacher_weight > 0`, the dense routing teacher (O(T^2): a full attention over all tokens).
  Returns:
    {part: FLOPs}; `flops` is their sum.
  """
  if not isinstance(num_tokens, int) or num_tokens <= 0:
    raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
  if form not in ("parallel", "recurrent"):
    raise ValueError(f"form must be 'parallel' or 'recurrent', got {form!r}")
  c, t = config, num_tokens
  d, r, v = c.d_model, c.num_roots, c.vocab_size
  h, e, p, l, n = c.num_route_heads, c.read_dim, c.key_dim, c.leaf_size, c.num_leaves
  k = c.effective_train_beam if train else c.beam_width
  routed = c.use_tree_read or c.use_exact_read
  parts = {"trunk": 3 * 2 * t * r * d * d, "mlp": 2 * 2 * t * d * c.mlp_hidden,
           "fusion": 2 * t * d * 3 + 2 * t * h * e * d * (c.use_tree_read + c.use_exact_read)}
  if routed:
    parts["memory_proj"] = 2 * t * (c.proj_lags + 1) * d * h * (3 * e + 2 * p + 1)
    summaries = n if form == "parallel" else -(-t // l)
    parts["summarize"] = 2 * summaries * l * h * (p + e)
    candidates = n.bit_length()
    if c.route_descend:
      steps = routing.num_expansions(n)
      s = c.search(k)
      keys = max(c.node_reps, 1)   # keys scored per candidate
      route = (2 * h * p * keys * (candidates + steps * 2 * s)
               + (steps + 1) * 2 * h * s * e)
      if c.leaf_rerank:
        route += 2 * h * 2 * s * l * e
    else:  # Summaries only: one softmax-weighted read of every Fenwick node.
      route = 2 * h * candidates * (p + e)
    parts["route"] = t * route
    if c.use_exact_read:
      parts["exact_read"] = t * 2 * 2 * h * k * l * e
  parts = {name: c.num_layers * f for name, f in parts.items()}
  parts["head"] = 2 * t * d * v
  if train:
    parts = {name: 3 * f for name, f in parts.items()}
    if c.teacher_weight > 0 and c.use_exact_read:
      sealed = (t // l) * l
      levels = sum(n >> lv for lv in range(n.bit_length()) if (n >> lv) >= 2)
      parts["teacher"] = c.num_layers * (2 * t * sealed * h * e + 3 * 2 * t * h * p * levels)
  return parts


def flops(config: KernelConfig, num_tokens: int, *, form: str = "parallel",
                 train: bool = False) -> int:
  """Total of `flops_by_part` (one sequence; multiply by the batch size)."""
  return sum(flops_by_part(config, num_tokens, form=form, train=train).values())


# Parts of a `LayerMemory` (part.field) each configuration reads.
_ALWAYS_READ = ("trunk.roots_BRD", "trunk.conv_BWD")
_TREE_FIELDS = ("live.rk_BLHP", "live.pool_BLH", "tree.node_keys_BSHP", "tree.node_vals_BSHE",
                "tree.node_sal_BSH", "tree.rep_keys_BSHMP", "tree.rep_sal_BSHM")
_EXACT_FIELDS = ("live.k_BLHE", "live.v_BLHE", "cache.k_BNLHE", "cache.v_BNLHE")


def _nbytes(x: Any) -> int:
  return x.size * x.dtype.itemsize


def state_bytes_read(config: KernelConfig, memory: Memory, kept: Sequence[str]) -> int:
  """Bytes of `memory` (shapes suffice) that a model reading the sources `kept` reads.

  Roots and the convolution window always; the tree store (live leaf summaries, nodes, and the
  nodes' representatives where the config keeps them) when the tree or the exact read is kept (the exact read is routed through the tree); the token cache
  with the exact read.
  """
  del config
  read = sum(_nbytes(x) for x in (memory.num_tokens, memory.segment_B, memory.doc_start_B))
  fields = list(_ALWAYS_READ)
  if "tree" in kept or "exact" in kept:
    fields += _TREE_FIELDS
    read += _nbytes(memory.node_span_S2) + _nbytes(memory.leaf_doc_BN)
  if "exact" in kept:
    fields += _EXACT_FIELDS
  for layer in memory.layers:
    for path in fields:
      part, field = path.split(".")
      value = getattr(getattr(layer, part), field)
      read += 0 if value is None else _nbytes(value)
  return read
