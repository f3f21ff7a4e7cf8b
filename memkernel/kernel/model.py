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

Document streams (`segments`, documents starting at leaf multiples) act the same in all three
forms: `trunk_boundary` restarts ('reset'), shrinks ('decay') or keeps ('carry') the roots' carried
state at a document's first token, and zeroes the lags that reach before it unless it carries;
`tree_boundary='reset'` hides every node that ends before the query's document starts (the node
straddling the start summarises the new document only, `tree.build_tree`).

Shape key in `memkernel.shapes`.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memkernel import family as family_lib
from memkernel import metrics as metrics_lib
from memkernel.kernel import read as read_lib
from memkernel.kernel import routing
from memkernel.kernel import tree as tree_lib
from memkernel.kernel.config import KernelConfig
from memkernel.kernel.fusion import source_names
from memkernel.kernel.interventions import NONE, Interventions
from memkernel.kernel.layer import Features, KernelLayer
from memkernel.kernel.state import LayerMemory, LiveLeaf, Memory, TrunkState
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
    sources = source_names(c)
    interventions.check(sources)
    keep_sources = tuple(s for s in sources if s not in interventions.drop)
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
                   beam, oracle_leaves, interventions, read_sink, first_leaf_BT=None,
                   node_reps=None, presence=None, hints_BTH=None):
    """Routes and reads for every token of `feats`; returns (tree value, read value, aux).

    `first_leaf_BT` (document streams with tree_boundary='reset'): the first leaf of each
    query's document; nothing before it is routed to or read. `node_reps`: the tree's
    representative keys (config `node_reps` > 0), which the router then scores nodes by.
    `presence`, `hints_BTH` (token, weight [B, T, H]): a routing hint (`routing.route_beam`).
    """
    c = self.config
    b, t, h, e = feats.q.shape
    if not self._uses_routing():
      zeros = jnp.zeros((b, t, h, e), jnp.float32)
      return zeros, zeros, None
    def route_and_read(rq, q, query_leaf, oracle, first_leaf, hint, remat):
      rerank = (q, cache_k) if c.leaf_rerank else None
      route_fn = functools.partial(routing.route_beam, beam_width=beam, descend=c.route_descend,
                                   search_width=c.search(beam), node_reps=node_reps,
                                   hint=None if hint is None else (presence,) + tuple(hint))
      read_fn = read_lib.exact_read
      if remat:
        route_fn, read_fn = jax.checkpoint(route_fn), jax.checkpoint(read_fn)
      route = route_fn(rq, node_keys, node_vals, query_leaf, rerank=rerank, first_leaf=first_leaf)
      leaves, weights = route.leaves, route.weights
      if interventions.next_best_span:
        leaves = route.runner_up
        weights = jnp.where(leaves >= 0, weights, 0.0)
      if oracle is not None:
        leaves, weights = _oracle_selection(oracle, query_leaf, leaves, weights, h)
      read = read_fn(q, cache_k, cache_v, leaves, weights, read_sink)
      trace = RouteTrace(leaves=leaves, weights=weights, runner_up=route.runner_up,
                         entropy=route.entropy, start_level=route.start_level,
                         read_probs=read.probs, read_active=read.active, path=route.path)
      return route.tree_value, read.value, trace

    block = c.query_block
    if not block or t <= block:
      return route_and_read(feats.rq, feats.q, query_leaf_T, oracle_leaves, first_leaf_BT,
                            hints_BTH, c.remat)
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
    first_leaf = None if first_leaf_BT is None else split(first_leaf_BT)
    hints = None if hints_BTH is None else tuple(split(x) for x in hints_BTH)
    out = jax.lax.map(jax.checkpoint(lambda xs: route_and_read(*xs, remat=False)),
                      (split(feats.rq), split(feats.q), leaf_blocks, oracle, first_leaf, hints))
    merge = lambda y: jnp.moveaxis(y, 0, 1).reshape((b, nb * block) + y.shape[3:])[:, :t]
    return jax.tree.map(merge, out)

  def _check_hints(self, route_hints, lead: tuple[int, ...], memory: Optional[Memory] = None):
    """Refuses hints of the wrong shape, and hints for a memory that keeps no presence."""
    c = self.config
    want = lead + (c.num_layers, c.num_route_heads)
    if (not isinstance(route_hints, (tuple, list)) or len(route_hints) != 2
        or any(tuple(getattr(x, "shape", ())) != want for x in route_hints)):
      got = ([tuple(getattr(x, "shape", ())) for x in route_hints]
             if isinstance(route_hints, (tuple, list)) else type(route_hints))
      raise ValueError(f"route_hints must be (token, weight), each of shape {want}, got {got}")
    if memory is not None and memory.presence is None:
      raise ValueError("route_hints in the recurrent forms read the tokens every tree node "
                       "follows; make the memory with init_memory(config, batch_size, "
                       "presence=True)")

  def _logits(self, x_BTD):
    return self.head(self.final_norm(x_BTD)).astype(jnp.float32)

  def _check_tokens(self, tokens, ndim, what):
    if not hasattr(tokens, "ndim") or tokens.ndim != ndim:
      raise ValueError(f"{what} must be an int array of rank {ndim}, got "
                       f"{getattr(tokens, 'shape', type(tokens))}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"{what} must have an integer dtype, got {tokens.dtype}")

  def _boundaries(self, reset_BT, pos_in_doc_BT, first_leaf_BT):
    """What the config's document boundaries do, per token.

    Args:
      reset_BT: bool, the token starts a document.
      pos_in_doc_BT: int32, its position in its document.
      first_leaf_BT: int32, the first leaf of its document.
    Returns:
      (lag_valid_BTW for the convolution and projection lags, carry_scale_BT for the roots'
      carried state, first_leaf_BT for routing), each None where the boundary carries.
    """
    c = self.config
    lag_valid = carry_scale = first_leaf = None
    if c.trunk_boundary != "carry":
      lag_valid = pos_in_doc_BT[..., None] >= jnp.arange(c.conv_width, dtype=jnp.int32)
      scale = 0.0 if c.trunk_boundary == "reset" else c.boundary_decay
      carry_scale = jnp.where(reset_BT, scale, 1.0).astype(jnp.float32)
    if c.tree_boundary == "reset":
      first_leaf = first_leaf_BT
    return lag_valid, carry_scale, first_leaf

  # ----------------------------------------------------------------------------------------------
  # Parallel form.

  def __call__(self, tokens, segments=None, *, oracle_leaves=None, train: bool = False,
               interventions: Optional[Interventions] = NONE, loss_mask=None,
               route_hints=None):
    """Parallel form.

    Args:
      tokens: int32 [B, T], T <= max_seq_len.
      segments: optional int32 [B, T], the document of every token (non-decreasing along a row,
        documents starting at multiples of leaf_size); its boundaries act as the config's
        `trunk_boundary` and `tree_boundary` say. None: each row is one document.
      oracle_leaves: optional int32 [B, T, A]; where a row holds a leaf >= 0, every head reads
        those leaves (the answer leaves of a probe) instead of its routed ones.
      train: use the training beam width and add the routing teacher loss.
      interventions: run-time ablations (None: none).
      loss_mask: optional [B, T] weights of the positions the task loss scores; with
        `teacher_positions='scored'` the routing teacher trains the router at those positions
        only (training only; None: `teacher_queries` positions spread over the sequence).
      route_hints: optional (token int32 [B, T, layers, H], weight [B, T, layers, H]): each
        routing head favours, by `weight`, the nodes holding a token that follows its hint
        token (-1: no hint), in the summaries' scores and the leaf re-rank. The bias a read
        trace suggests (`memkernel.paths.traces`); `scan` and `step` take them too.
    Returns:
      (logits float32 [B, T, V], aux) with aux["routing"] a per-layer tuple of dicts (leaves,
      weights, runner_up [B, T, H, K], entropy, start_level, read_probs, read_active),
      aux["roots"] the per-layer root outputs [B, T, R, D], aux["gates"] the per-layer fusion
      gates [B, T, S] (in `source_names(config)` order), aux["losses"] extra weighted losses
      for training and `metrics` scalar diagnostics.
    """
    c = self.config
    interventions = NONE if interventions is None else interventions
    self._check_tokens(tokens, 2, "tokens")
    family_lib.check_segments(segments, tokens.shape, c.leaf_size)
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
    lag_valid = carry_scale = first_leaf = leaf_doc = None
    if segments is not None:
      seg = segments.astype(jnp.int32)
      position = jnp.arange(t, dtype=jnp.int32)
      reset = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
      doc_start = jax.lax.cummax(jnp.where(reset, position, 0), axis=1)
      lag_valid, carry_scale, first_leaf = self._boundaries(reset, position - doc_start,
                                                            doc_start // l)
      if first_leaf is not None:
        leaf_doc = jnp.pad(seg[:, l - 1:n_full * l:l], ((0, 0), (0, n - n_full)),
                           constant_values=-1)
    aux_route, aux_roots, aux_gates, teacher, salience = [], [], [], [], []
    if train:
      # The teacher's query positions (all layers): the scored ones, or spread over the sequence.
      mask = loss_mask if c.teacher_positions == "scored" else None
      teacher_pos = routing.teacher_positions(c.teacher_queries, t, b, mask)
    presence = None
    if route_hints is not None:
      self._check_hints(route_hints, (b, t))
      presence = tree_lib.build_presence(tokens, n, l, c.vocab_size, leaf_doc)
    for i, layer in enumerate(self.layers):
      feats, _, _ = layer.features(x, conv0, roots0, keep_r, c.scan_impl, lag_valid, carry_scale)
      hints = None if route_hints is None else (route_hints[0][:, :, i].astype(jnp.int32),
                                                route_hints[1][:, :, i].astype(jnp.float32))

      def leaf_major(y):
        y = y[:, :n_full * l].reshape((b, n_full, l) + y.shape[2:])
        return jnp.pad(y, [(0, 0), (0, n - n_full)] + [(0, 0)] * (y.ndim - 2))

      leaf_key, leaf_val, leaf_sal = tree_lib.summarize_leaf(
          leaf_major(feats.rk), leaf_major(feats.v), leaf_major(feats.pool))
      node_keys, node_vals, node_sal, _ = tree_lib.build_tree(
          leaf_key, leaf_val, leaf_sal, n_full, pooled=c.tree_merge == "pooled",
          leaf_doc_BN=leaf_doc)
      node_reps = None
      if c.node_reps:
        node_reps = tree_lib.build_reps(
            *tree_lib.leaf_reps(leaf_major(feats.rk), leaf_major(feats.pool), c.node_reps),
            n_full, leaf_doc)
      tree_val, exact_val, route_aux = self._read_memory(
          feats, node_keys, node_vals, leaf_major(feats.k), leaf_major(feats.v), query_leaf, beam,
          oracle_leaves, interventions, layer.read_sink, first_leaf, node_reps, presence, hints)
      if self._uses_routing():
        # For `memkernel.analysis.diagnose` (apply with mutable=["intermediates"]); a no-op otherwise.
        self.sow("intermediates", "route_inputs",
                 {"rq": feats.rq, "q": feats.q, "k": feats.k, "rk": feats.rk,
                  "pool": feats.pool, "node_keys": node_keys, "node_sal": node_sal})
      if train and c.teacher_weight > 0 and c.use_exact_read:
        pos, weight = teacher_pos
        take = lambda y: jnp.take_along_axis(y, pos.reshape(pos.shape + (1,) * (y.ndim - 2)),
                                             axis=1)
        first = None if first_leaf is None else jnp.take_along_axis(first_leaf, pos, axis=1)
        if c.salience_weight > 0:
          mass, token_mass = routing.leaf_attention_mass(take(feats.q), feats.k, l, n, pos,
                                                         return_token_mass=True,
                                                         first_leaf_BS=first)
          salience.append(routing.salience_loss(feats.pool, token_mass, weight))
        else:
          mass = routing.leaf_attention_mass(take(feats.q), feats.k, l, n, pos,
                                             first_leaf_BS=first)
        teacher.append(routing.teacher_loss(take(feats.rq), node_keys, pos // l, mass, weight,
                                            cross_level=c.teacher_cross_level,
                                            first_leaf=first))
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
                  metrics=metrics_lib.diagnostics(aux_route, aux_roots, aux_gates,
                                                  source_names(c)),
                  routes=tuple(aux_route), gates=tuple(aux_gates), roots=tuple(aux_roots))
    return logits, out

  # ----------------------------------------------------------------------------------------------
  # Recurrent forms.

  def _continue_documents(self, seg_BC, position_C, memory: Memory):
    """Document boundaries of new tokens (the previous token is the memory's last one): the
    start of each token's document [B, C] and `_boundaries`' rules."""
    reset = seg_BC != jnp.concatenate([memory.segment_B[:, None], seg_BC[:, :-1]], axis=1)
    doc_start = jax.lax.cummax(jnp.where(reset, position_C, memory.doc_start_B[:, None]), axis=1)
    return doc_start, self._boundaries(reset, position_C - doc_start,
                                       doc_start // self.config.leaf_size)

  def _read_and_finish(self, layer, i, x, feats, tree, cache, query_leaf, first_leaf, presence,
                       hints_BC, interventions, keep):
    """A recurrent step's layer `i` after its memory is updated: route and read it (with the
    layer's hints over `presence`), then fusion and MLP: (x', gates, route trace)."""
    hints = None if hints_BC is None else (hints_BC[0][:, :, i].astype(jnp.int32),
                                           hints_BC[1][:, :, i].astype(jnp.float32))
    tree_val, exact_val, route_aux = self._read_memory(
        feats, tree.node_keys_BSHP, tree.node_vals_BSHE, cache.k_BNLHE, cache.v_BNLHE,
        query_leaf, self.config.beam_width, None, interventions, layer.read_sink, first_leaf,
        tree.reps, None if hints is None else presence.nodes_BSW, hints)
    x, gates = layer.finish(x, feats, tree_val, exact_val, keep)
    return x, gates, route_aux

  def _block(self, tokens_BC, segments_BC, memory: Memory, interventions: Interventions,
             hints_BC=None):
    """Advances a memory that sits at a leaf boundary by C = K * L tokens at once: the parallel
    form over the block (every query routes by index, `route_beam`), its K leaves sealed one
    after another before the reads. Logits are NaN where the memory was mid-leaf."""
    c = self.config
    l = c.leaf_size
    b, cl = tokens_BC.shape
    k = cl // l
    keep, keep_r = self._keep(interventions)
    p0 = memory.num_tokens
    first = p0 // l
    position = p0 + jnp.arange(cl, dtype=jnp.int32)
    query_leaf = position // l
    seg = segments_BC.astype(jnp.int32)
    doc_start, (lag_valid, carry_scale, first_leaf) = self._continue_documents(seg, position,
                                                                               memory)
    leaf_doc = jax.lax.dynamic_update_slice_in_dim(memory.leaf_doc_BN, seg[:, ::l], first, axis=1)
    doc_rule = leaf_doc if first_leaf is not None else None
    x = self.embed(tokens_BC)
    new_layers, aux_route, aux_gates, aux_roots = [], [], [], []
    node_span = memory.node_span_S2
    presence = memory.presence
    if presence is not None:
      presence = presence.seal_leaves(tokens_BC, l, node_span, first, doc_rule)
    leaf_major = lambda y: y.reshape((b, k, l) + y.shape[2:])
    for i, (layer, mem) in enumerate(zip(self.layers, memory.layers)):
      feats, conv, roots = layer.features(x, mem.trunk.conv_BWD, mem.trunk.roots_BRD, keep_r,
                                          c.scan_impl, lag_valid, carry_scale)
      key, val, sal = tree_lib.summarize_leaf(leaf_major(feats.rk), leaf_major(feats.v),
                                              leaf_major(feats.pool))
      reps = (tree_lib.leaf_reps(leaf_major(feats.rk), leaf_major(feats.pool), c.node_reps)
              if c.node_reps else None)
      tree, new_span = mem.tree.insert_leaves(node_span, key, val, sal, first,
                                              pooled=c.tree_merge == "pooled",
                                              leaf_doc_BN=doc_rule, leaf_reps=reps)
      cache = mem.cache.write_leaves(leaf_major(feats.k), leaf_major(feats.v), first)
      live = jax.tree.map(jnp.zeros_like, mem.live)
      new_layers.append(LayerMemory(trunk=TrunkState(roots_BRD=roots, conv_BWD=conv), live=live,
                                    tree=tree, cache=cache))
      x, gates, route_aux = self._read_and_finish(layer, i, x, feats, tree, cache, query_leaf,
                                                  first_leaf, presence, hints_BC, interventions,
                                                  keep)
      aux_route.append(route_aux)
      aux_gates.append(gates)
      aux_roots.append(feats.roots)
    memory = Memory(layers=tuple(new_layers), num_tokens=p0 + cl, node_span_S2=new_span,
                    segment_B=seg[:, -1], doc_start_B=doc_start[:, -1], leaf_doc_BN=leaf_doc,
                    leaf_size=l, presence=presence)
    out = Outputs(routes=tuple(aux_route), gates=tuple(aux_gates), roots=tuple(aux_roots))
    logits = jnp.where(p0 % l == 0, self._logits(x), jnp.nan)
    return logits, memory, out

  def _chunk(self, tokens_BC, segments_BC, memory: Memory, interventions: Interventions,
             hints_BC=None):
    """Advances the memory by C <= L tokens; at most one leaf seals inside the chunk.

    `hints_BC`: optional routing hints (token, weight [B, C, layers, H]) over the memory's
    `presence`, which every chunk keeps up to date where the memory has it."""
    c = self.config
    l = c.leaf_size
    b, cl = tokens_BC.shape
    keep, keep_r = self._keep(interventions)
    p0 = memory.num_tokens
    fill, sealed_count = p0 % l, p0 // l
    seals = fill + cl >= l
    position = p0 + jnp.arange(cl, dtype=jnp.int32)
    query_leaf = position // l
    seg = segments_BC.astype(jnp.int32)
    doc_start, (lag_valid, carry_scale, first_leaf) = self._continue_documents(seg, position,
                                                                               memory)
    # The sealing leaf's document: documents start at leaf multiples, so the chunk's first token's.
    n = c.num_leaves
    slot = jnp.minimum(sealed_count, n - 1)
    old_doc = jax.lax.dynamic_index_in_dim(memory.leaf_doc_BN, slot, axis=1, keepdims=False)
    leaf_doc = jax.lax.dynamic_update_index_in_dim(
        memory.leaf_doc_BN, jnp.where(seals & (sealed_count < n), seg[:, 0], old_doc), slot,
        axis=1)
    x = self.embed(tokens_BC)
    new_layers, aux_route, aux_gates, aux_roots = [], [], [], []
    node_span = memory.node_span_S2
    presence = memory.presence
    if presence is not None:
      presence = presence.advance(tokens_BC, l, fill, seals, node_span, sealed_count,
                                  leaf_doc if first_leaf is not None else None)
    for i, (layer, mem) in enumerate(zip(self.layers, memory.layers)):
      feats, conv, roots = layer.features(x, mem.trunk.conv_BWD, mem.trunk.roots_BRD, keep_r,
                                          c.scan_impl, lag_valid, carry_scale)
      leaf, live = mem.live.append(LiveLeaf(k_BLHE=feats.k, v_BLHE=feats.v, rk_BLHP=feats.rk,
                                            pool_BLH=feats.pool), fill, seals)
      key, val, sal = tree_lib.summarize_leaf(leaf.rk_BLHP, leaf.v_BLHE, leaf.pool_BLH)
      reps = (tree_lib.leaf_reps(leaf.rk_BLHP, leaf.pool_BLH, c.node_reps) if c.node_reps
              else None)
      tree, new_span = mem.tree.insert(
          node_span, key, val, sal, sealed_count, seals, pooled=c.tree_merge == "pooled",
          leaf_doc_BN=leaf_doc if first_leaf is not None else None, leaf_reps=reps)
      cache = mem.cache.write(leaf, sealed_count, seals)
      new_layers.append(LayerMemory(trunk=TrunkState(roots_BRD=roots, conv_BWD=conv), live=live,
                                    tree=tree, cache=cache))
      x, gates, route_aux = self._read_and_finish(layer, i, x, feats, tree, cache, query_leaf,
                                                  first_leaf, presence, hints_BC, interventions,
                                                  keep)
      aux_route.append(route_aux)
      aux_gates.append(gates)
      aux_roots.append(feats.roots)
    memory = Memory(layers=tuple(new_layers), num_tokens=p0 + cl, node_span_S2=new_span,
                    segment_B=seg[:, -1], doc_start_B=doc_start[:, -1], leaf_doc_BN=leaf_doc,
                    leaf_size=l, presence=presence)
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
    if memory.presence is not None and (memory.presence.nodes_BSW.shape[-1]
                                        != tree_lib.presence_words(c.vocab_size)):
      raise ValueError("the memory's token presence was made for another vocabulary size; "
                       "build it with init_memory(config, batch_size, presence=True)")
    if not isinstance(memory.num_tokens, jax.core.Tracer):
      total = int(memory.num_tokens) + new_tokens
      if total > c.max_seq_len:
        raise ValueError(f"memory would hold {total} tokens, more than KernelConfig.max_seq_len="
                         f"{c.max_seq_len}")

  def _stream_segments(self, segments, memory: Memory, shape, what):
    """The document of every new token: `segments` validated, or the memory's current one.

    Where everything is concrete, a document change must fall at a multiple of leaf_size (also
    between the memory's last token and the first new one) and the index must not decrease.
    """
    l = self.config.leaf_size
    if segments is None:
      return jnp.broadcast_to(jnp.maximum(memory.segment_B, 0)[:, None], shape)
    family_lib.check_segments(segments, shape, 1, what)
    concrete = [segments, memory.segment_B, memory.num_tokens]
    if not any(isinstance(y, jax.core.Tracer) for y in concrete):
      prev = np.asarray(memory.segment_B)
      seg = np.concatenate([np.where(prev >= 0, prev, np.asarray(segments)[:, 0])[:, None],
                            np.asarray(segments)], axis=1)
      if np.any(np.diff(seg, axis=1) < 0):
        raise ValueError(f"{what} must not decrease along a row (also from the memory's last "
                         "document to the first new token)")
      rows, cols = np.nonzero(np.diff(seg, axis=1) > 0)
      starts = int(memory.num_tokens) + cols
      bad = starts[starts % l != 0]
      if bad.size:
        raise ValueError(f"{what}: a document starts at position {int(bad[0])}; documents must "
                         f"start at multiples of leaf_size={l} tokens (pad the stream)")
    return jnp.asarray(segments, jnp.int32)

  def scan(self, tokens, memory: Memory, segments=None, *,
           interventions: Optional[Interventions] = NONE, return_aux: bool = False,
           route_hints=None):
    """Recurrent form: `lax.scan` over leaf-sized chunks of `tokens` [B, T], any T >= 1.

    Args:
      tokens: int32 [B, T].
      memory: from `init_memory` or an earlier call.
      segments: optional int32 [B, T], the document of every token (see `__call__`); a new
        document starts where it differs from the previous token's (the memory's last one for
        the first token). None: the memory's current document goes on.
      interventions: run-time ablations (None: none).
      return_aux: also return the per-token outputs.
      route_hints: optional (token, weight), each [B, T, layers, H], as in `__call__`; the
        memory must keep presence (`init_memory(..., presence=True)`).
    Returns:
      (logits [B, T, V], memory') or, with return_aux, (logits, memory', aux) where aux["routing"]
      matches the parallel form's.
    """
    c = self.config
    interventions = NONE if interventions is None else interventions
    self._check_tokens(tokens, 2, "tokens")
    b, t = tokens.shape
    self._check_capacity(memory, t)
    segments = self._stream_segments(segments, memory, (b, t), "segments")
    if route_hints is not None:
      self._check_hints(route_hints, (b, t), memory)
    memory, outs, done = self._scan_pieces(lambda m, *xs: m._chunk(*xs), c.leaf_size, tokens,
                                           segments, memory, interventions, route_hints)
    if done < t:
      hints = None if route_hints is None else tuple(x[:, done:] for x in route_hints)
      logits, memory, aux = self._chunk(tokens[:, done:], segments[:, done:], memory,
                                        interventions, hints)
      outs.append((logits, aux))
    return self._joined(outs, memory, return_aux)

  def _scan_pieces(self, advance, size: int, tokens, segments, memory: Memory, interventions,
                   route_hints):
    """`advance(module, tokens, segments, memory, interventions, hints)` (`_chunk` or `_block`)
    under `nn.scan` over the whole pieces of `size` tokens: (memory', [(logits, aux)] or [] when
    T < size, the tokens consumed)."""
    b, t = tokens.shape
    n = t // size
    if not n:
      return memory, [], 0
    to_pieces = lambda y: jnp.swapaxes(y[:, :n * size].reshape((b, n, size) + y.shape[2:]), 0, 1)

    def body(module, mem, xs):
      logits, mem, aux = advance(module, *xs[:2], mem, interventions, xs[2])
      return mem, (logits, aux)

    hints = None if route_hints is None else tuple(to_pieces(x) for x in route_hints)
    memory, (logits, aux) = nn.scan(body, variable_broadcast="params",
                                    split_rngs={"params": False})(
                                        self, memory, (to_pieces(tokens), to_pieces(segments),
                                                       hints))
    merge = lambda y: jnp.swapaxes(y, 0, 1).reshape((b, n * size) + y.shape[3:])
    return memory, [(merge(logits), jax.tree.map(merge, aux))], n * size

  @staticmethod
  def _joined(outs, memory: Memory, return_aux: bool):
    """The pieces' logits (and outputs) along the sequence."""
    logits = jnp.concatenate([o[0] for o in outs], axis=1)
    if not return_aux:
      return logits, memory
    aux = jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *[o[1] for o in outs])
    return logits, memory, aux

  def prefill(self, tokens, memory: Memory, segments=None, *, block: int = 1024,
              interventions: Optional[Interventions] = NONE, return_aux: bool = False,
              route_hints=None):
    """Recurrent form in blocks: what `scan` computes, `block` tokens at a time by the parallel
    form over the block (its leaves sealed before its reads), the memory carried; the last
    T mod `block` tokens by `scan`. Work per token as in the parallel form, activations of one
    block at a time: the form for long prompts and evaluations.

    Args:
      tokens, memory, segments, interventions, return_aux, route_hints: as in `scan`.
      block: tokens per step, a positive multiple of leaf_size.
    The memory must sit at a leaf boundary (`num_tokens` a multiple of leaf_size): refused where
    its position is concrete; under a transformation that traces it, the logits are NaN.
    """
    c = self.config
    l = c.leaf_size
    interventions = NONE if interventions is None else interventions
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % l:
      raise ValueError(f"block must be a positive multiple of leaf_size={l}, got {block!r}")
    self._check_tokens(tokens, 2, "tokens")
    b, t = tokens.shape
    self._check_capacity(memory, t)
    if not isinstance(memory.num_tokens, jax.core.Tracer) and int(memory.num_tokens) % l:
      raise ValueError(f"prefill starts at a leaf boundary; the memory holds "
                       f"{int(memory.num_tokens)} tokens, not a multiple of leaf_size={l} (use "
                       "scan or step up to the boundary)")
    segments = self._stream_segments(segments, memory, (b, t), "segments")
    if route_hints is not None:
      self._check_hints(route_hints, (b, t), memory)
    memory, outs, done = self._scan_pieces(lambda m, *xs: m._block(*xs), block, tokens,
                                           segments, memory, interventions, route_hints)
    if done < t:
      hints = None if route_hints is None else tuple(x[:, done:] for x in route_hints)
      logits, memory, aux = self.scan(tokens[:, done:], memory, segments[:, done:],
                                      interventions=interventions, return_aux=True,
                                      route_hints=hints)
      outs.append((logits, aux))
    return self._joined(outs, memory, return_aux)

  def step(self, token, memory: Memory, segment=None, *,
           interventions: Optional[Interventions] = NONE, return_aux: bool = False,
           route_hints=None):
    """Decoding form: one token per sequence, `token` int32 [B].

    `segment` (optional int32 [B]) is each token's document, as `segments` in `scan`;
    `route_hints` (optional (token, weight), each [B, layers, H]) as in `scan`.

    Returns:
      (logits [B, V], memory') or, with return_aux, (logits, memory', aux).
    """
    interventions = NONE if interventions is None else interventions
    self._check_tokens(token, 1, "token")
    self._check_capacity(memory, 1)
    b = token.shape[0]
    segments = self._stream_segments(None if segment is None else jnp.reshape(segment, (b, 1)),
                                     memory, (b, 1), "segment")
    hints = None
    if route_hints is not None:
      self._check_hints(route_hints, (b,), memory)
      hints = tuple(jnp.asarray(x)[:, None] for x in route_hints)
    logits, memory, aux = self._chunk(token[:, None], segments, memory, interventions, hints)
    if return_aux:
      return logits[:, 0], memory, aux
    return logits[:, 0], memory


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
