"""The brain-core model (seed 002): embedding -> layers (`BrainCoreLayer`) -> RMSNorm -> LM head.

The recurrent forms of the family protocol (`memkernel.family`) share one chunk function; the
parallel form computes the same layer by layer:

    logits, out = model.apply(variables, tokens, segments)                     # parallel
    logits, memory = model.apply(variables, tokens, memory, method=model.scan)   # recurrent
    logits, memory = model.apply(variables, token, memory, method=model.step)    # one token

The parallel form starts from an empty memory and runs each layer over the whole spans at once
(`BrainCoreLayer.sequence`: the core's scan, working memory's blockwise attention, the
projections and the MLP over the sequence; only the episodic read-then-write and the procedural
consolidation scanned span by span), then any last partial span as one chunk. A `lax.scan` over
spans with every layer inside (the first design) ran working memory as 128 small attentions per
layer at 8k and spent ~46% of the forward there (docs/bench/braincore/). `scan` runs chunks
of P tokens from wherever the memory stands, a chunk straddling at most one span end; `step`
is a chunk of one token. Tokens, not spans, are what a caller feeds: the memory remembers where
its span stands (`BrainCoreMemory.position`).

Documents (`segments`): the core and working memory apply their boundary rule at the token that
starts a document; episodic and procedural memory at the first span start of a new document
(a document starts on a span boundary: `Family.segment_align` is P).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from memkernel import family as family_lib
from memkernel.braincore import episodic as em_lib
from memkernel.braincore import write_teacher
from memkernel.braincore.config import BrainCoreConfig
from memkernel.braincore.layer import SOURCES, BrainCoreLayer, SpanCut
from memkernel.braincore.state import BrainCoreMemory, init_memory
from memkernel.outputs import Outputs

_CARRY = {"reset": 0.0, "carry": 1.0}
# The write trace's entries with one row per position (the rest have one per span).
_PER_POSITION = ("queries", "read_origins")


def sources(config: BrainCoreConfig) -> tuple[str, ...]:
  """The sources an intervention may drop: the memories the model has (working memory, and
  with plasticity episodic and procedural memory, less those it is built `without`)."""
  has = {"working": config.has_working, "episodic": config.has_episodic,
         "procedural": config.has_procedural}
  return tuple(name for name in SOURCES if has[name])


def _check_tokens(tokens: Any, ndim: int, what: str):
  if not hasattr(tokens, "ndim") or tokens.ndim != ndim:
    raise ValueError(f"{what} must be an int array of rank {ndim}, got "
                     f"{getattr(tokens, 'shape', type(tokens))}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{what} must have an integer dtype, got {tokens.dtype}")


class BrainCoreModel(nn.Module):
  """The brain-core language model; see the module docstring."""

  config: BrainCoreConfig

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.d_model)
    self.layers = [BrainCoreLayer(c, name=f"layer_{i}") for i in range(c.num_layers)]
    self.final_norm = nn.RMSNorm()
    self.lm_head = nn.Dense(c.vocab_size, use_bias=False)

  # ----------------------------------------------------------------------------------------------
  # Checks.

  def _drop(self, interventions: Any) -> frozenset:
    """The sources `interventions` drops; a clear error for anything else it asks."""
    if interventions is None:
      return frozenset()
    if getattr(interventions, "next_best_span", False) or getattr(interventions, "root_drop", ()):
      raise ValueError("the brain-core family has no routes and no roots: only `drop` "
                       "interventions apply to it")
    drop = tuple(getattr(interventions, "drop", ()))
    known = sources(self.config)
    for name in drop:
      if name not in known:
        raise ValueError(f"Interventions.drop names source {name!r}, but the model's sources "
                         f"are {known}")
    return frozenset(drop)

  def _check_memory(self, memory: Any, batch_size: int):
    c = self.config
    if not isinstance(memory, BrainCoreMemory):
      raise ValueError(f"memory must be a BrainCoreMemory (from init_memory), got {type(memory)}")
    layer = memory.layers[0] if memory.layers else None
    if (len(memory.layers) != c.num_layers or memory.segment_B.shape != (batch_size,)
        or (layer.episodic is None) == c.has_episodic
        or (layer.procedural is None) == c.has_procedural
        or (layer.window is None) == c.has_working
        or (c.has_working and layer.window.k_BSNH.shape[1] != c.window)
        or (c.has_episodic and layer.episodic.strength_BM.shape[1] != c.em_items)):
      raise ValueError("memory does not match the model config or the batch (layers, window, "
                       "plasticity, memories left out, episodic items or batch size differ); "
                       "build it with init_memory(config, batch_size)")

  # ----------------------------------------------------------------------------------------------
  # The one chunk function.

  def _cut(self, q: int, memory: BrainCoreMemory, segments_BQ: jax.Array,
           aligned: bool) -> SpanCut:
    span = self.config.span
    b = segments_BQ.shape[0]
    offset = memory.position % span
    span_start = (memory.position - offset).astype(jnp.int32)
    start_changed_B = (offset == 0) & (segments_BQ[:, 0] != memory.segment_B)
    part_Q = ((offset + jnp.arange(q)) % span) // (span // self.config.em_writes)
    if aligned:
      return SpanCut(jnp.ones((q,), bool), part_Q, q == span, start_changed_B,
                     jnp.zeros((b,), bool), aligned=True, span_start=span_start)
    cut = span - offset
    cut_changed_B = jnp.zeros((b,), bool)
    if q > 1:
      i = jnp.clip(cut, 1, q - 1)
      cut_changed_B = (cut < q) & (jnp.take(segments_BQ, i, axis=1)
                                   != jnp.take(segments_BQ, i - 1, axis=1))
    return SpanCut(jnp.arange(q) < cut, part_Q, cut <= q, start_changed_B, cut_changed_B,
                   aligned=False, span_start=span_start)

  def _new_documents(self, segments_BQ: jax.Array, memory: BrainCoreMemory) -> jax.Array:
    """bool [B, Q]: the tokens that start a document (the first token of a stream does not)."""
    previous_BQ = jnp.concatenate([memory.segment_B[:, None], segments_BQ[:, :-1]], axis=1)
    return segments_BQ != previous_BQ

  def _chunk(self, tokens_BQ: jax.Array, segments_BQ: jax.Array, memory: BrainCoreMemory, *,
             aligned: bool, drop: frozenset, trace: str = ""):
    """(logits [B, Q, V], the memory after the chunk, {diagnostic: value}, each layer's write
    trace (empty without `trace`)); Q <= P."""
    q = tokens_BQ.shape[1]
    cut = self._cut(q, memory, segments_BQ, aligned)
    new_BQ = self._new_documents(segments_BQ, memory)
    factor = _CARRY.get(self.config.core_boundary, self.config.boundary_decay)
    carry_BQ = jnp.where(new_BQ, factor, 1.0).astype(jnp.float32)
    return self._stack(tokens_BQ, segments_BQ, memory, lambda layer, x, layer_memory: layer(
        x, layer_memory, segments_BQ, new_BQ, carry_BQ, cut, drop, trace))

  def _stack(self, tokens_BQ, segments_BQ, memory: BrainCoreMemory, apply_layer):
    """Embedding, each layer by `apply_layer(layer, x, its memory)` (-> x, memory, diagnostics,
    trace), the LM head: (logits, memory, diagnostics, traces)."""
    x_BQD = self.embed(tokens_BQ)
    layers, diagnostics, traces = [], {}, []
    for i, (layer, layer_memory) in enumerate(zip(self.layers, memory.layers)):
      x_BQD, layer_memory, d, write_trace = apply_layer(layer, x_BQD, layer_memory)
      layers.append(layer_memory)
      traces.append(write_trace)
      diagnostics.update({f"layer_{i}/{k}": v for k, v in d.items()})
    logits = self.lm_head(self.final_norm(x_BQD)).astype(jnp.float32)
    return logits, BrainCoreMemory(tuple(layers), segments_BQ[:, -1],
                                   memory.position + tokens_BQ.shape[1]), \
        diagnostics, tuple(traces)

  def _layers(self, tokens: jax.Array, segments: jax.Array, memory: BrainCoreMemory, *,
              drop: frozenset, trace: str = ""):
    """The parallel form over whole spans from an empty memory, layer by layer
    (`BrainCoreLayer.sequence`): the outputs, memory, diagnostics and traces `_chunk` gives
    span by span, with the sequence-wide work done at once."""
    c = self.config
    new_BT = self._new_documents(segments, memory)
    factor = _CARRY.get(c.core_boundary, c.boundary_decay)
    carry_BT = jnp.where(new_BT, factor, 1.0).astype(jnp.float32)
    # Span n starts a new document where its first token's differs from the token's before it.
    before_BN = jnp.concatenate([memory.segment_B[:, None],
                                 segments[:, c.span - 1:-1:c.span]], axis=1)
    start_changed_NB = jnp.swapaxes(segments[:, ::c.span] != before_BN, 0, 1)
    return self._stack(tokens, segments, memory, lambda layer, x, layer_memory: layer.sequence(
        x, layer_memory, segments, new_BT, carry_BT, start_changed_NB, drop, trace))

  def _run(self, tokens: jax.Array, segments: jax.Array, memory: BrainCoreMemory, *,
           aligned: bool, drop: frozenset, trace: str = ""):
    """The whole spans (`aligned`, from an empty memory: layer by layer, `_layers`; otherwise
    chunks of P tokens under `nn.scan`), then the rest as one chunk: (logits, memory,
    diagnostics summed over chunks, each layer's write trace over the sequence: the whole
    spans' gate logits [B, N, C] and keys [B, N, C, K] and every position's queries [B, T, K];
    with trace='reads' also the origins of the items each position read [B, T, K], each whole
    span's query-blind items' origins [B, N, K] and live items' origins [B, N, M]; empty
    without `trace`)."""
    b, t = tokens.shape
    chunk = self.config.span
    n, tail = divmod(t, chunk)
    logits, totals, traces = [], {}, [{} for _ in self.layers]
    if n and aligned:  # The parallel form: layer by layer over the whole spans.
      out, memory, totals, traces = self._layers(tokens[:, :n * chunk], segments[:, :n * chunk],
                                                 memory, drop=drop, trace=trace)
      logits.append(out)
      traces = list(traces)
    elif n:
      to_chunks = lambda y: jnp.swapaxes(y[:, :n * chunk].reshape(b, n, chunk), 0, 1)

      def body(module, mem, xs):
        out, mem, diag, write_traces = module._chunk(xs[0], xs[1], mem, aligned=aligned,  # pylint: disable=protected-access
                                                     drop=drop, trace=trace)
        return mem, (out, diag, write_traces)

      memory, (logits_CBQV, diag, stacked) = nn.scan(
          body, variable_broadcast="params", split_rngs={"params": False})(
              self, memory, (to_chunks(tokens), to_chunks(segments)))
      logits.append(jnp.swapaxes(logits_CBQV, 0, 1).reshape(b, n * chunk, -1))
      totals = {k: jnp.sum(v) for k, v in diag.items()}
      traces = [{k: jnp.swapaxes(v, 0, 1) for k, v in layer.items()} for layer in stacked]
      for layer in traces:
        for name in [k for k in _PER_POSITION if k in layer]:
          layer[name] = layer[name].reshape(b, n * chunk, -1)
    if tail:
      out, memory, diag, tail_traces = self._chunk(tokens[:, n * chunk:], segments[:, n * chunk:],
                                                   memory, aligned=aligned, drop=drop,
                                                   trace=trace)
      logits.append(out)
      totals = {k: totals.get(k, 0.0) + v for k, v in diag.items()}
      for layer, tail_trace in zip(traces, tail_traces):
        for name in [k for k in _PER_POSITION if k in layer and k in tail_trace]:
          # The tail's candidates are never written: only its per-position entries.
          layer[name] = jnp.concatenate([layer[name], tail_trace[name]], axis=1)
    return ((jnp.concatenate(logits, axis=1) if len(logits) > 1 else logits[0]), memory, totals,
            traces)

  def _outputs(self, memory: BrainCoreMemory, totals: dict) -> Outputs:
    metrics = {}
    for i, layer in enumerate(memory.layers):
      if layer.episodic is not None:
        commits = totals[f"layer_{i}/em_commits"]
        metrics[f"layer_{i}/em_gate"] = totals[f"layer_{i}/em_gate"] / jnp.maximum(commits, 1.0)
        metrics[f"layer_{i}/em_density"] = (totals[f"layer_{i}/em_density"]
                                            / jnp.maximum(commits, 1.0))
        metrics[f"layer_{i}/em_occupancy"] = jnp.mean(em_lib.occupancy(layer.episodic))
      if layer.procedural is not None:
        metrics[f"layer_{i}/pm_norm"] = jnp.mean(jnp.sqrt(jnp.sum(
            jnp.square(layer.procedural.fast_BOR), axis=(1, 2))))
    return Outputs(metrics=metrics, memory=memory)

  # ----------------------------------------------------------------------------------------------
  # The three forms.

  def __call__(self, tokens: jax.Array, segments: Any = None, *, oracle_leaves: Any = None,
               train: bool = False, loss_mask: Any = None,
               interventions: Any = None) -> tuple[jax.Array, Outputs]:
    """Parallel form, from an empty memory: layer by layer over the whole spans
    (`BrainCoreLayer.sequence`: the core, working memory and the MLP over the sequence at once,
    episodic and procedural memory scanned span by span), then the last partial span as a chunk.

    Args:
      tokens: int32 [B, T], T <= max_seq_len.
      segments: optional int32 [B, T] document index per token (non-decreasing; documents start
        at multiples of `span`). None: one document.
      oracle_leaves: the harness interface (the family has no routes).
      train, loss_mask: with `em_teacher` > 0, training adds the write gate's hindsight loss
        (`Outputs.losses['em_write']`) on the positions `loss_mask` [B, T] scores (every
        position without one).
      interventions: sources to drop (`Interventions(drop=...)`, names from `sources`).

    Returns:
      logits float32 [B, T, V] and `Outputs` (diagnostics; the memory after the sequence).
    """
    del oracle_leaves
    c = self.config
    _check_tokens(tokens, 2, "tokens")
    family_lib.check_segments(segments, tokens.shape, align=c.span)
    if tokens.shape[1] > c.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds BrainCoreConfig.max_seq_len="
                       f"{c.max_seq_len}")
    drop = self._drop(interventions)
    segments = (jnp.zeros(tokens.shape, jnp.int32) if segments is None
                else jnp.asarray(segments, jnp.int32))
    memory = init_memory(c, tokens.shape[0])
    teach = train and c.has_episodic and c.em_teacher > 0
    logits, memory, totals, traces = self._run(tokens, segments, memory, aligned=True, drop=drop,
                                               trace="teach" if teach else "")
    out = self._outputs(memory, totals)
    if teach and traces[0]:
      mask = jnp.ones(tokens.shape, jnp.float32) if loss_mask is None else loss_mask
      loss, mean_targets = write_teacher.teach(
          traces, mask, c.span, segments if c.em_boundary == "reset" else None, c.em_target)
      metrics = dict(out.metrics)
      metrics.update({f"layer_{i}/em_target": v for i, v in enumerate(mean_targets)})
      out = out.replace(metrics=metrics, losses={"em_write": c.em_teacher * loss})
    return logits, out

  def _traced(self, tokens: jax.Array, segments: Any, what: str,
              trace: str) -> tuple[dict, ...]:
    """Each layer's write trace ('teach' or 'reads') of the parallel form over `tokens`
    (checked for `what`)."""
    c = self.config
    if not c.has_episodic:
      raise ValueError(f"{what}: the model has no episodic memory (plasticity off or built "
                       f"without it)")
    _check_tokens(tokens, 2, "tokens")
    family_lib.check_segments(segments, tokens.shape, align=c.span)
    segments = (jnp.zeros(tokens.shape, jnp.int32) if segments is None
                else jnp.asarray(segments, jnp.int32))
    return self._run(tokens, segments, init_memory(c, tokens.shape[0]), aligned=True,
                     drop=frozenset(), trace=trace)[3]

  def write_gates(self, tokens: jax.Array, segments: Any = None) -> tuple[jax.Array, ...]:
    """Per layer, the write gate of every candidate the parallel form offers, [B, N, C] for
    the N whole spans of `tokens` (candidate c of span n is token n * span + c when `em_writes`
    is `span`): what `memkernel.analysis.write_audit` reads."""
    if getattr(tokens, "ndim", 0) == 2 and tokens.shape[1] < self.config.span:
      raise ValueError(f"write_gates: tokens must hold at least one span ({self.config.span}), "
                       f"got {tokens.shape[1]}")
    traces = self._traced(tokens, segments, "write_gates", "teach")
    return tuple(jax.nn.sigmoid(layer["logits"]) for layer in traces)

  def episodic_reads(self, tokens: jax.Array, segments: Any = None) -> tuple[dict, ...]:
    """Per layer, what the parallel form's episodic reads saw, as stream positions of the tokens
    that wrote the items (-1: none): {'read' [B, T, K]: the items each position's query read,
    'blind' [B, N, K]: the k strongest items as each span starts (a query-blind read),
    'live' [B, N, M]: every live item then}, for the N spans of `tokens` (T a multiple of the
    span). What `memkernel.analysis.read_audit` reads."""
    if getattr(tokens, "ndim", 0) == 2 and tokens.shape[1] % self.config.span:
      raise ValueError(f"episodic_reads: the length must be a multiple of the span "
                       f"({self.config.span}), got {tokens.shape[1]}")
    traces = self._traced(tokens, segments, "episodic_reads", "reads")
    return tuple({"read": layer["read_origins"], "blind": layer["blind_origins"],
                  "live": layer["live_origins"]} for layer in traces)

  def scan(self, tokens: jax.Array, memory: BrainCoreMemory, segments: Any = None, *,
           interventions: Any = None, return_aux: bool = False):
    """Recurrent form: consumes `tokens` [B, T] (any T >= 1) after `memory`, in chunks of
    `span` tokens from wherever the memory stands.

    Args:
      tokens: int32 [B, T].
      memory: the `BrainCoreMemory` before them.
      segments: optional int32 [B, T] document index; None continues the memory's document.
      interventions: as in the parallel form.
      return_aux: also return `Outputs`.

    Returns:
      (logits float32 [B, T, V], memory') or, with return_aux, (logits, memory', Outputs).
    """
    _check_tokens(tokens, 2, "tokens")
    b, t = tokens.shape
    self._check_memory(memory, b)
    family_lib.check_segments(segments, tokens.shape, align=1)
    drop = self._drop(interventions)
    if segments is None:
      segments = jnp.broadcast_to(memory.segment_B[:, None], (b, t))
    segments = jnp.asarray(segments, jnp.int32)
    logits, memory, totals, _ = self._run(tokens, segments, memory, aligned=False, drop=drop)
    if return_aux:
      return logits, memory, self._outputs(memory, totals)
    return logits, memory

  def step(self, token: jax.Array, memory: BrainCoreMemory, segment: Any = None, *,
           interventions: Any = None, return_aux: bool = False):
    """Decoding form: one token per stream (int32 [B]); as `scan` otherwise."""
    _check_tokens(token, 1, "token")
    self._check_memory(memory, token.shape[0])
    family_lib.check_segments(segment, token.shape, align=1, what="segment")
    drop = self._drop(interventions)
    segment = memory.segment_B if segment is None else jnp.asarray(segment, jnp.int32)
    logits, memory, totals, _ = self._chunk(token[:, None], segment[:, None], memory,
                                         aligned=False, drop=drop)
    if return_aux:
      return logits[:, 0], memory, self._outputs(memory, totals)
    return logits[:, 0], memory


def build(config: BrainCoreConfig) -> BrainCoreModel:
  if not isinstance(config, BrainCoreConfig):
    raise ValueError(f"build needs a BrainCoreConfig, got {type(config).__name__}")
  return BrainCoreModel(config)
