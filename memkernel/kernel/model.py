"""KernelModel: the Recursive Memory Kernel language model, in three execution forms.

    x = embed(tokens)
    per layer:  trunk (causal conv + R gated diagonal recurrences)   -> root outputs
                tokens' K/V, routing keys and pooling logits         -> live leaf; sealed leaves
                                                                        -> token cache + summary tree
                beam routing over sealed nodes -> exact read of the routed leaves' tokens
                x += ReadFusion(roots, routed tree value, exact read);  x += MLP(x)
    logits = head(norm(x))

Forms, all producing the same logits:
  * `__call__(tokens)`: parallel, the whole sequence at once (training).
  * `scan(tokens, memory)`: `lax.scan` over leaf-sized chunks carrying the memory (prefill, long
    inputs); any length, a trailing partial leaf stays live.
  * `step(token, memory)`: one token (decoding).
The recurrent forms share one chunk function (`_chunk`, C <= L tokens, at most one leaf seals per
chunk); the parallel form builds the same tree and cache in one batched pass. Causality: a token in
leaf c reads its own trunk state and sealed leaves < c, nothing else.

Shape key in `memkernel.shapes`.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from memkernel import metrics as metrics_lib
from memkernel.kernel import read as read_lib
from memkernel.kernel import routing
from memkernel.kernel import tree as tree_lib
from memkernel.kernel.config import KernelConfig
from memkernel.kernel.interventions import NONE, SOURCES, Interventions
from memkernel.kernel.layer import Features, KernelLayer
from memkernel.kernel.state import LayerMemory, Memory
from memkernel.outputs import Outputs, RouteTrace


class KernelModel(nn.Module):
  """The Recursive Memory Kernel LM. See the module docstring for the three forms."""

  config: KernelConfig

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(1.0))
    self.layers = [KernelLayer(c, name=f"layer_{i}") for i in range(c.num_layers)]
    self.final_norm = nn.RMSNorm()
    self.head = nn.Dense(c.vocab_size, use_bias=False)

  # ----------------------------------------------------------------------------------------------
  # Shared pieces.

  def _keep(self, interventions: Interventions):
    c = self.config
    keep_sources = (True, c.use_tree_read and not interventions.no_tree_read,
                    c.use_exact_read and not interventions.no_exact_read)
    for r in interventions.root_drop:
      if not 0 <= r < c.num_roots:
        raise ValueError(f"Interventions.root_drop names root {r}, but the model has "
                         f"{c.num_roots} root(s)")
    keep_r = jnp.asarray([0.0 if r in interventions.root_drop else 1.0
                          for r in range(c.num_roots)], jnp.float32)
    return keep_sources, keep_r

  def _uses_routing(self) -> bool:
    return self.config.use_tree_read or self.config.use_exact_read

  def _read_memory(self, feats: Features, node_keys, node_vals, cache_k, cache_v, query_leaf_T,
                   beam, oracle_leaves, interventions, read_sink):
    """Routes and reads for every token of `feats`; returns (tree value, read value, aux)."""
    c = self.config
    b, t, h, e = feats.q.shape
    if not self._uses_routing():
      zeros = jnp.zeros((b, t, h, e), jnp.float32)
      return zeros, zeros, None
    def route_and_read(rq, q, query_leaf, oracle, remat):
      rerank = (q, cache_k) if c.leaf_rerank else None
      route_fn = functools.partial(routing.route_beam, beam_width=beam, descend=c.route_descend)
      read_fn = read_lib.exact_read
      if remat:
        route_fn, read_fn = jax.checkpoint(route_fn), jax.checkpoint(read_fn)
      route = route_fn(rq, node_keys, node_vals, query_leaf, rerank=rerank)
      leaves, weights = route.leaves, route.weights
      if interventions.next_best_span:
        leaves = route.runner_up
        weights = jnp.where(leaves >= 0, weights, 0.0)
      if oracle is not None:
        leaves, weights = _oracle_selection(oracle, query_leaf, leaves, weights, h)
      read = read_fn(q, cache_k, cache_v, leaves, weights, read_sink)
      trace = RouteTrace(leaves=leaves, weights=weights, runner_up=route.runner_up,
                         entropy=route.entropy, start_level=route.start_level,
                         read_probs=read.probs, read_active=read.active)
      return route.tree_value, read.value, trace

    block = c.query_block
    if not block or t <= block:
      return route_and_read(feats.rq, feats.q, query_leaf_T, oracle_leaves, c.remat)
    # Blocks of queries, each recomputed in the backward pass: the per-query gathered tokens of
    # routing, the re-rank and the read exist for one block at a time (BUILD_NOTES, issue 7).
    nb = -(-t // block)
    pad = nb * block - t

    def split(y):
      y = jnp.pad(y, [(0, 0), (0, pad)] + [(0, 0)] * (y.ndim - 2))
      return jnp.moveaxis(y.reshape((b, nb, block) + y.shape[2:]), 1, 0)

    # Padded queries sit in leaf 0: they see nothing and are cut off below.
    leaf_blocks = jnp.pad(query_leaf_T, (0, pad)).reshape(nb, block)
    oracle = None if oracle_leaves is None else split(oracle_leaves)
    out = jax.lax.map(jax.checkpoint(lambda xs: route_and_read(*xs, remat=False)),
                      (split(feats.rq), split(feats.q), leaf_blocks, oracle))
    merge = lambda y: jnp.moveaxis(y, 0, 1).reshape((b, nb * block) + y.shape[3:])[:, :t]
    return jax.tree.map(merge, out)

  def _logits(self, x_BTD):
    return self.head(self.final_norm(x_BTD)).astype(jnp.float32)

  def _check_tokens(self, tokens, ndim, what):
    if not hasattr(tokens, "ndim") or tokens.ndim != ndim:
      raise ValueError(f"{what} must be an int array of rank {ndim}, got "
                       f"{getattr(tokens, 'shape', type(tokens))}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"{what} must have an integer dtype, got {tokens.dtype}")

  # ----------------------------------------------------------------------------------------------
  # Parallel form.

  def __call__(self, tokens, segments=None, *, oracle_leaves=None, train: bool = False,
               interventions: Interventions = NONE, loss_mask=None):
    """Parallel form.

    Args:
      tokens: int32 [B, T], T <= max_seq_len.
      oracle_leaves: optional int32 [B, T, A]; where a row holds a leaf >= 0, every head reads
        those leaves (the answer leaves of a probe) instead of its routed ones.
      train: use the training beam width and add the routing teacher loss.
      interventions: run-time ablations.
      loss_mask: optional [B, T] weights of the positions the task loss scores; with
        `teacher_positions='scored'` the routing teacher trains the router at those positions
        only (training only; None: `teacher_queries` positions spread over the sequence).
    Returns:
      (logits float32 [B, T, V], aux) with aux["routing"] a per-layer tuple of dicts (leaves,
      weights, runner_up [B, T, H, K], entropy, start_level, read_probs, read_active),
      aux["roots"] the per-layer root outputs [B, T, R, D], aux["gates"] the per-layer fusion
      gates [B, T, 3], aux["losses"] extra weighted losses for training and aux["metrics"]
      scalar diagnostics.
    """
    c = self.config
    self._check_tokens(tokens, 2, "tokens")
    if segments is not None:
      raise ValueError("document streams (segments) are not supported by the kernel yet")
    b, t = tokens.shape
    if t > c.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds KernelConfig.max_seq_len={c.max_seq_len}; "
                       "build the model with dataclasses.replace(config, max_seq_len=...)")
    keep, keep_r = self._keep(interventions)
    beam = c.effective_train_beam if train else c.beam_width
    l, n = c.leaf_size, c.num_leaves
    n_full = t // l
    query_leaf = jnp.arange(t, dtype=jnp.int32) // l
    x = self.embed(tokens)
    conv0 = jnp.zeros((b, c.conv_width - 1, c.d_model), jnp.float32)
    roots0 = jnp.zeros((b, c.num_roots, c.d_model), jnp.float32)
    aux_route, aux_roots, aux_gates, teacher, salience = [], [], [], [], []
    if train:
      # The teacher's query positions (all layers): the scored ones, or spread over the sequence.
      mask = loss_mask if c.teacher_positions == "scored" else None
      teacher_pos = routing.teacher_positions(c.teacher_queries, t, b, mask)
    for layer in self.layers:
      feats, _, _ = layer.features(x, conv0, roots0, keep_r, c.scan_impl)

      def leaf_major(y):
        y = y[:, :n_full * l].reshape((b, n_full, l) + y.shape[2:])
        return jnp.pad(y, [(0, 0), (0, n - n_full)] + [(0, 0)] * (y.ndim - 2))

      leaf_key, leaf_val, leaf_sal = tree_lib.summarize_leaf(
          leaf_major(feats.rk), leaf_major(feats.v), leaf_major(feats.pool))
      node_keys, node_vals, node_sal, _ = tree_lib.build_tree(
          leaf_key, leaf_val, leaf_sal, n_full, pooled=c.tree_merge == "pooled")
      tree_val, exact_val, route_aux = self._read_memory(
          feats, node_keys, node_vals, leaf_major(feats.k), leaf_major(feats.v), query_leaf, beam,
          oracle_leaves, interventions, layer.read_sink)
      if self._uses_routing():
        # For `memkernel.analysis.diagnose` (apply with mutable=["intermediates"]); a no-op otherwise.
        self.sow("intermediates", "route_inputs",
                 {"rq": feats.rq, "q": feats.q, "k": feats.k, "node_keys": node_keys,
                  "node_sal": node_sal})
      if train and c.teacher_weight > 0 and c.use_exact_read:
        pos, weight = teacher_pos
        take = lambda y: jnp.take_along_axis(y, pos.reshape(pos.shape + (1,) * (y.ndim - 2)),
                                             axis=1)
        if c.salience_weight > 0:
          mass, token_mass = routing.leaf_attention_mass(take(feats.q), feats.k, l, n, pos,
                                                         return_token_mass=True)
          salience.append(routing.salience_loss(feats.pool, token_mass, weight))
        else:
          mass = routing.leaf_attention_mass(take(feats.q), feats.k, l, n, pos)
        teacher.append(routing.teacher_loss(take(feats.rq), node_keys, pos // l, mass, weight,
                                            cross_level=c.teacher_cross_level))
      x, gates = layer.finish(x, feats, tree_val, exact_val, keep)
      aux_route.append(route_aux)
      aux_roots.append(feats.roots)
      aux_gates.append(gates)
    logits = self._logits(x)
    losses = {}
    if teacher:
      losses["teacher"] = c.teacher_weight * sum(teacher) / len(teacher)
    if salience:
      losses["salience"] = c.salience_weight * sum(salience) / len(salience)
    out = Outputs(losses=losses,
                  metrics=metrics_lib.diagnostics(aux_route, aux_roots, aux_gates, SOURCES),
                  routes=tuple(aux_route), gates=tuple(aux_gates), roots=tuple(aux_roots))
    return logits, out

  # ----------------------------------------------------------------------------------------------
  # Recurrent forms.

  def _chunk(self, tokens_BC, memory: Memory, interventions: Interventions):
    """Advances the memory by C <= L tokens; at most one leaf seals inside the chunk."""
    c = self.config
    l = c.leaf_size
    b, cl = tokens_BC.shape
    keep, keep_r = self._keep(interventions)
    p0 = memory.num_tokens
    fill, sealed_count = p0 % l, p0 // l
    seals = fill + cl >= l
    query_leaf = (p0 + jnp.arange(cl, dtype=jnp.int32)) // l
    x = self.embed(tokens_BC)
    new_layers, aux_route, aux_gates, aux_roots = [], [], [], []
    node_span = memory.node_span_S2
    for layer, mem in zip(self.layers, memory.layers):
      feats, conv, roots = layer.features(x, mem.conv_BWD, mem.roots_BRD, keep_r, c.scan_impl)

      def buffer(live, new):
        pad = jnp.zeros((b, l + (l - cl)) + live.shape[2:], live.dtype)
        buf = jnp.concatenate([live, pad], axis=1)       # [B, 2L, ...]
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(live.dtype), fill, axis=1)

      bufs = [buffer(mem.live_k_BLHE, feats.k), buffer(mem.live_v_BLHE, feats.v),
              buffer(mem.live_rk_BLHP, feats.rk), buffer(mem.live_pool_BLH, feats.pool)]
      leaf_k, leaf_v, leaf_rk, leaf_pool = (y[:, :l] for y in bufs)
      key, val, sal = tree_lib.summarize_leaf(leaf_rk, leaf_v, leaf_pool)
      node_keys, node_vals, node_sal, new_span = tree_lib.insert_leaf(
          mem.node_keys_BSHP, mem.node_vals_BSHE, mem.node_sal_BSH, node_span, key, val, sal,
          sealed_count, seals, pooled=c.tree_merge == "pooled")
      cache_k = _write_leaf(mem.cache_k_BNLHE, leaf_k, sealed_count, seals)
      cache_v = _write_leaf(mem.cache_v_BNLHE, leaf_v, sealed_count, seals)
      live = [jax.lax.dynamic_slice_in_dim(y, seals.astype(jnp.int32) * l, l, axis=1)
              for y in bufs]
      new_layers.append(LayerMemory(
          roots_BRD=roots, conv_BWD=conv, live_k_BLHE=live[0], live_v_BLHE=live[1],
          live_rk_BLHP=live[2], live_pool_BLH=live[3], node_keys_BSHP=node_keys,
          node_vals_BSHE=node_vals, node_sal_BSH=node_sal, cache_k_BNLHE=cache_k,
          cache_v_BNLHE=cache_v))
      tree_val, exact_val, route_aux = self._read_memory(
          feats, node_keys, node_vals, cache_k, cache_v, query_leaf, c.beam_width, None,
          interventions, layer.read_sink)
      x, gates = layer.finish(x, feats, tree_val, exact_val, keep)
      aux_route.append(route_aux)
      aux_gates.append(gates)
      aux_roots.append(feats.roots)
    node_span = new_span
    memory = Memory(layers=tuple(new_layers), num_tokens=p0 + cl, node_span_S2=node_span,
                    leaf_size=l)
    out = Outputs(routes=tuple(aux_route), gates=tuple(aux_gates), roots=tuple(aux_roots))
    return self._logits(x), memory, out

  def _check_capacity(self, memory: Memory, new_tokens: int):
    c = self.config
    if not isinstance(memory, Memory):
      raise ValueError(f"memory must be a memkernel.Memory (from init_memory), got {type(memory)}")
    if len(memory.layers) != c.num_layers or memory.leaf_size != c.leaf_size or (
        memory.node_span_S2.shape[0] != c.num_nodes):
      raise ValueError("memory does not match the model config (layers, leaf_size or "
                       "max_seq_len differ); build it with init_memory(config, batch_size)")
    if not isinstance(memory.num_tokens, jax.core.Tracer):
      total = int(memory.num_tokens) + new_tokens
      if total > c.max_seq_len:
        raise ValueError(f"memory would hold {total} tokens, more than KernelConfig.max_seq_len="
                         f"{c.max_seq_len}")

  def scan(self, tokens, memory: Memory, interventions: Interventions = NONE,
           return_aux: bool = False):
    """Recurrent form: `lax.scan` over leaf-sized chunks of `tokens` [B, T], any T >= 1.

    Returns:
      (logits [B, T, V], memory') or, with return_aux, (logits, memory', aux) where aux["routing"]
      matches the parallel form's.
    """
    c = self.config
    self._check_tokens(tokens, 2, "tokens")
    b, t = tokens.shape
    self._check_capacity(memory, t)
    l = c.leaf_size
    n_chunks, tail = divmod(t, l)
    outs = []
    if n_chunks:
      chunks = jnp.swapaxes(tokens[:, :n_chunks * l].reshape(b, n_chunks, l), 0, 1)

      def body(module, mem, chunk):
        logits, mem, aux = module._chunk(chunk, mem, interventions)
        return mem, (logits, aux)

      memory, (logits, aux) = nn.scan(body, variable_broadcast="params",
                                      split_rngs={"params": False})(self, memory, chunks)
      merge = lambda y: jnp.swapaxes(y, 0, 1).reshape((b, n_chunks * l) + y.shape[3:])
      outs.append((merge(logits), jax.tree.map(merge, aux)))
    if tail:
      logits, memory, aux = self._chunk(tokens[:, n_chunks * l:], memory, interventions)
      outs.append((logits, aux))
    logits = jnp.concatenate([o[0] for o in outs], axis=1)
    if not return_aux:
      return logits, memory
    aux = jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *[o[1] for o in outs])
    return logits, memory, aux

  def step(self, token, memory: Memory, interventions: Interventions = NONE,
           return_aux: bool = False):
    """Decoding form: one token per sequence, `token` int32 [B].

    Returns:
      (logits [B, V], memory') or, with return_aux, (logits, memory', aux).
    """
    self._check_tokens(token, 1, "token")
    self._check_capacity(memory, 1)
    logits, memory, aux = self._chunk(token[:, None], memory, interventions)
    if return_aux:
      return logits[:, 0], memory, aux
    return logits[:, 0], memory


def _write_leaf(cache_BNLHE, leaf_BLHE, index, cond):
  n = cache_BNLHE.shape[1]
  safe = jnp.minimum(index, n - 1)
  old = jax.lax.dynamic_index_in_dim(cache_BNLHE, safe, axis=1, keepdims=False)
  new = jnp.where(cond & (index < n), leaf_BLHE, old)
  return jax.lax.dynamic_update_index_in_dim(cache_BNLHE, new, safe, axis=1)


def _oracle_selection(oracle_BTA, query_leaf_T, leaves_BTHK, weights_BTHK, num_heads):
  """Replaces the routed leaves by the supplied ones where a row names any (visible) leaf."""
  k = leaves_BTHK.shape[-1]
  oracle = oracle_BTA[..., :k].astype(jnp.int32)
  oracle = jnp.where((oracle >= 0) & (oracle < query_leaf_T[None, :, None]), oracle, -1)
  if oracle.shape[-1] < k:
    oracle = jnp.pad(oracle, ((0, 0), (0, 0), (0, k - oracle.shape[-1])), constant_values=-1)
  valid = oracle >= 0
  w = valid / jnp.maximum(valid.sum(-1, keepdims=True), 1)
  use = jnp.any(valid, axis=-1)[:, :, None, None]
  oracle_h = jnp.broadcast_to(oracle[:, :, None], leaves_BTHK.shape)
  w_h = jnp.broadcast_to(w[:, :, None], weights_BTHK.shape).astype(weights_BTHK.dtype)
  return jnp.where(use, oracle_h, leaves_BTHK), jnp.where(use, w_h, weights_BTHK)
