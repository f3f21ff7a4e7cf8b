"""One brain-core layer over one chunk of at most P tokens: core, working memory, the episodic
read and the MLP with its procedural fast weights, and the span-boundary writes.

Shapes: B batch, Q chunk tokens, D d_model, F MLP width, K episodic key width, R rank.

    x + core(norm x)                         affine scan, state carried per token
    x + WM(norm x)                           the last W tokens, ring buffer
    x + out(EM.read(query(norm u)))          the items as of the span's start; u: the layer's input
    x + W_out a + A (C a),  a = gelu(W_in norm x)   A: fast weights as of the span's start

Inside a plasticity span episodic and procedural memory are read-only. Episodic memory sees the
layer's input u (`em_features`; 'mixed': x after the core and working memory): a token keeps
its identity there, so the key a fact was stored under in one document matches the query its
key token makes in another. The span pools its features norm u by a learned salience, online,
one pool per part of the span (`SpanPool`; `em_writes` equal parts, 1 by default), and
accumulates the Hebbian trace (W_out a_t)(C a_t)^T. When the span's last token has been read the
layer writes: after every strength decays by `em_decay`, the parts' episodic candidates (key and
value projected from each pooled feature) are offered at once (`episodic.write_many`), each with
a gate sigmoid(w . [max salience, novelty, weakest strength, occupancy] + b), novelty being 1 -
the largest cosine of the candidate key with a key live as the span ends (a candidate lands only
above `em_threshold`; in training the gate also learns from `write_teacher` through the trace
this layer returns); and the fast weights
consolidate with the modulator tanh(w . pooled + b), the pooled feature averaged over the parts.
Tokens after that point in the same chunk read the written memory and start the next span's pool
and trace, so a chunk may straddle one span boundary and any chunking gives the same outputs.

Sources (`drop` removes a source's addition to the residual stream, nothing else): 'working',
'episodic', 'procedural'. A memory left out by `BrainCoreConfig.without` has no parameters and no
state (the sweep's ablations); the MLP and the core are always there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from memkernel.braincore import episodic as em_lib
from memkernel.braincore import procedural as pm_lib
from memkernel.braincore.config import BrainCoreConfig
from memkernel.braincore.core import AffineCore
from memkernel.braincore.state import LayerMemory, init_pool, pool_add, pool_width
from memkernel.braincore.working import WorkingMemory

SOURCES = ("working", "episodic", "procedural")


@dataclasses.dataclass(frozen=True)
class SpanCut:
  """Where one chunk meets the plasticity spans (a chunk holds at most one span end).

  Attributes:
    before_Q: bool [Q], the tokens of the span the chunk starts in.
    part_Q: int32 [Q], the part of its span each token pools into (`em_writes` parts).
    commit: the span the chunk starts in ends inside it or at its end (a bool, or a traced
      scalar).
    start_changed_B: bool [B], the chunk starts a span that starts a new document.
    cut_changed_B: bool [B], the span that starts inside the chunk starts a new document.
    aligned: static: the chunk starts a span, so every token is before the cut (no second read).
    span_start: the stream position of the first token of the span the chunk starts in (the
      origins of the items its end writes).
  """
  before_Q: jax.Array
  part_Q: jax.Array
  commit: Any
  start_changed_B: jax.Array
  cut_changed_B: jax.Array
  aligned: bool
  span_start: Any = 0


def _select(pred, on_true, on_false):
  """`on_true` where a traced `pred` holds, else `on_false` (a Python bool picks statically)."""
  if isinstance(pred, bool):
    return on_true if pred else on_false
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _pm_boundary(config: BrainCoreConfig, pm: pm_lib.ProceduralMemory, changed_B: jax.Array):
  """Procedural memory after a document boundary's rule, in the rows where `changed_B`."""
  if config.pm_boundary == "reset":
    return pm_lib.reset_rows(pm, changed_B)
  if config.pm_boundary == "decay":
    return pm_lib.scale(pm, jnp.where(changed_B, config.boundary_decay, 1.0))
  return pm


def _gate_kernel_init(novelty: float):
  """The write gate's kernel over [max salience, novelty, weakest strength, occupancy]: LeCun
  normal, with the novelty weight set to `novelty` where it is not 0 (with the bias at -novelty
  / 2 a candidate whose key is already stored starts near sigmoid(-novelty / 2), a new one near
  sigmoid(novelty / 2))."""
  lecun = nn.initializers.lecun_normal()

  def init(key, shape, dtype=jnp.float32):
    kernel = lecun(key, shape, dtype)
    return kernel.at[1].set(novelty) if novelty else kernel
  return init


class BrainCoreLayer(nn.Module):
  """One layer; `__call__` advances it over one chunk."""

  config: BrainCoreConfig

  def setup(self):
    c = self.config
    self.core_norm = nn.RMSNorm()
    self.core = AffineCore(c.d_model, c.scan_impl, output_scale=0.1 if c.token_shift else 1.0)
    if c.has_working:
      self.wm_norm = nn.RMSNorm()
      self.wm = WorkingMemory(c.d_model, c.num_heads, c.window, carry=c.wm_boundary == "carry",
                              shift=c.token_shift, rope=c.wm_rope)
    self.mlp_norm = nn.RMSNorm()
    self.mlp_in = nn.Dense(c.mlp_hidden, use_bias=False)
    self.mlp_out = nn.Dense(c.d_model, use_bias=False)
    if c.has_pool:  # The span's pooled features: episodic candidates, the procedural modulator.
      self.em_norm = nn.RMSNorm()
      self.salience = nn.Dense(1, use_bias=False)
    if c.has_episodic:
      d, k, lecun = c.d_model, c.em_key_dim, nn.initializers.lecun_normal()
      query = self.param("em_query", lecun, (d, k))
      self.em_query_kernel = query
      if c.token_shift:  # The prior: a candidate's key is its predecessor projected as a query.
        key_init = lambda *_: jnp.concatenate([jnp.zeros((d, k)), jnp.asarray(query)], axis=0)
      else:
        key_init = lecun
      self.em_key_kernel = self.param("em_key", key_init, (pool_width(c), k))
      self.em_value = nn.Dense(c.em_key_dim, use_bias=False)
      self.em_out = nn.Dense(c.d_model, use_bias=False)
      self.em_gate = nn.Dense(1, kernel_init=_gate_kernel_init(c.em_novelty_init),
                              bias_init=nn.initializers.constant(-c.em_novelty_init / 2))
    if c.has_procedural:
      self.pm_code = nn.Dense(c.pm_rank, use_bias=False)
      self.pm_modulator = nn.Dense(1)

  # ----------------------------------------------------------------------------------------------
  # Document boundaries.

  def _em_boundary(self, em: em_lib.EpisodicMemory, changed_B: jax.Array):
    rule = self.config.em_boundary
    if rule == "reset":
      return em_lib.reset_rows(em, changed_B)
    if rule == "decay":
      return em_lib.decay(em, jnp.where(changed_B, self.config.boundary_decay, 1.0))
    return em

  def _pm_boundary(self, pm: pm_lib.ProceduralMemory, changed_B: jax.Array):
    return _pm_boundary(self.config, pm, changed_B)

  # ----------------------------------------------------------------------------------------------
  # The span-boundary writes.

  def _em_write(self, em: em_lib.EpisodicMemory, pool,
                span_start) -> tuple[em_lib.EpisodicMemory, dict]:
    """The memory after the span's candidates are offered, and what the write did: the gates'
    logits [B, C] ('logits'), the candidates' keys [B, C, K] ('keys') and the fraction of them
    stored [B] ('density')."""
    em = em_lib.decay(em, self.config.em_decay)
    pooled_BCF = pool.pooled()  # F: the token's features, then its predecessor's (shift).
    d = self.config.d_model
    keys_BCK = pooled_BCF @ self.em_key_kernel
    values_BCK = self.em_value(pooled_BCF[..., :d])
    # A zero key (a document's first token has no predecessor) has a zero unit and a finite
    # gradient: the norm's own gradient at 0 is 0 / 0.
    unit = lambda v: v * jax.lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-12)
    # Every candidate's novelty against the items as the span ends, then one write of them all.
    live_BM = em.strength_BM > 0
    cos_BCM = jnp.einsum("bck,bmk->bcm", unit(keys_BCK), unit(em.keys_BMD))
    novelty_BC = 1.0 - jnp.max(jnp.where(live_BM[:, None], cos_BCM, -1.0), axis=-1).clip(-1, 1)
    novelty_BC = jnp.where(jnp.any(live_BM, axis=-1, keepdims=True), novelty_BC, 1.0)
    shape = novelty_BC.shape
    features_BC4 = jnp.stack([pool.max_BC, novelty_BC,
                              jnp.broadcast_to(jnp.min(em.strength_BM, axis=-1)[:, None], shape),
                              jnp.broadcast_to(em_lib.occupancy(em)[:, None], shape)], axis=-1)
    logits_BC = self.em_gate(features_BC4)[..., 0]
    # A part's origin is its first token (the token itself when every token is a candidate).
    part = self.config.span // self.config.em_writes
    origins_BC = jnp.broadcast_to(span_start + part * jnp.arange(shape[-1], dtype=jnp.int32),
                                  shape)
    gates_BC = jax.nn.sigmoid(logits_BC)
    if self.config.em_write_gate != "learned":  # The intervention: every gate 1, or 0.
      gates_BC = jnp.full_like(gates_BC, 1.0 if self.config.em_write_gate == "open" else 0.0)
    em, stored_B = em_lib.offer(em, keys_BCK, values_BCK, gates_BC, self.config.em_threshold,
                                origins_BC)
    return em, {"logits": logits_BC, "keys": keys_BCK, "density": stored_B / shape[-1]}

  def _pm_modulator(self, pool) -> jax.Array:
    """The span's procedural modulator tanh(w . pooled + b) [...]: the pooled feature averaged
    over the span's parts (any leading shape, e.g. [B] or [N, B])."""
    pooled = jnp.mean(pool.pooled(), axis=-2)[..., :self.config.d_model]
    return jnp.tanh(self.pm_modulator(pooled)[..., 0])

  def _pm_consolidate(self, pm: pm_lib.ProceduralMemory, modulator_B) -> pm_lib.ProceduralMemory:
    c = self.config
    return pm_lib.consolidate(pm, modulator_B, lr=c.pm_lr, decay=c.pm_decay, budget=c.pm_budget)

  # ----------------------------------------------------------------------------------------------
  # The parallel form, layer by layer.

  def _em_span(self, em: em_lib.EpisodicMemory, xs, reads: bool):
    """One span of `sequence`'s episodic scan: the boundary rule at its start, its tokens' read
    of the memory as of the start, then its end's write. Returns (memory, per-span outputs)."""
    pool, query_BPK, start_changed_B, span_start = xs
    em0 = self._em_boundary(em, start_changed_B)
    read_BPK, weights_BPK, slots_BPK = em_lib.read(em0, query_BPK, self.config.em_k)
    em1, written = self._em_write(em0, pool, span_start)
    out = dict(read=read_BPK, logits=written["logits"], density=written["density"],
               keys=jax.lax.stop_gradient(written["keys"]))
    if reads:
      out.update(read_origins=em_lib.origins(em0, jnp.where(weights_BPK > 0, slots_BPK, -1)),
                 blind_origins=em_lib.origins(em0, em_lib.strongest(em0, self.config.em_k)),
                 live_origins=jnp.where(em0.strength_BM > 0, em0.origin_BM, -1))
    return em1, out

  def sequence(self, x_BTD: jax.Array, memory: LayerMemory, segments_BT: jax.Array,
               new_document_BT: jax.Array, core_carry_BT: jax.Array,
               start_changed_NB: jax.Array, drop: frozenset = frozenset(),
               trace: str = "") -> tuple[jax.Array, LayerMemory, dict, dict]:
    """The layer over N whole spans (T = N P tokens) from an empty memory at once: what
    `__call__` computes chunk by chunk, in the parallel form's order. The core, working memory
    (blockwise over the sequence), the projections and the MLP run over all T tokens; only the
    episodic read-then-write and the procedural consolidation step span by span.

    `start_changed_NB` [N, B]: span n starts a new document. Returns (x, the layer's memory
    after the sequence, {diagnostic: sum over spans}, the write trace as `__call__`'s stacked
    over spans: [B, N, ...] per span, [B, T, ...] per position).
    """
    c = self.config
    b, t, _ = x_BTD.shape
    n, p = t // c.span, c.span
    x_input_BTD = x_BTD
    x_BTD, core_BD, window, wm_previous_BD = self._core_and_working(
        x_BTD, memory, segments_BT, new_document_BT, core_carry_BT, drop, blockwise=True)
    if not c.has_pool:
      h_BTF = nn.gelu(self.mlp_in(self.mlp_norm(x_BTD)))
      return (x_BTD + self.mlp_out(h_BTF),
              LayerMemory(core_BD, window, wm_previous_BD=wm_previous_BD), {}, {})

    # Each span's pooled features, all spans at once.
    u_BTD, features_BTF, salience_BT, em_previous_BD = self._span_features(
        x_input_BTD, x_BTD, memory, new_document_BT)
    f = features_BTF.shape[-1]
    in_part_PC = (jnp.arange(p) // (p // c.em_writes))[:, None] == jnp.arange(c.em_writes)[None]
    pools = pool_add(init_pool(b * n, c.em_writes, f), salience_BT.reshape(b * n, p),
                     features_BTF.reshape(b * n, p, f), in_part_PC)
    to_spans = lambda v: v.reshape((b, n) + v.shape[1:])
    pools_NB = jax.tree.map(lambda v: jnp.swapaxes(to_spans(v), 0, 1), pools)

    diagnostics, write_trace = {}, {}
    em = None
    if c.has_episodic:
      query_BTK = u_BTD @ self.em_query_kernel
      query_NBPK = jnp.swapaxes(query_BTK.reshape(b, n, p, -1), 0, 1)
      span_start_N = (p * jnp.arange(n)).astype(jnp.int32)  # The memory starts empty, at 0.
      scan = nn.scan(lambda module, carry, xs: module._em_span(carry, xs, trace == "reads"),  # pylint: disable=protected-access
                     variable_broadcast="params", split_rngs={"params": False})
      em, spans = scan(self, memory.episodic, (pools_NB, query_NBPK, start_changed_NB,
                                               span_start_N))
      read_BTK = jnp.swapaxes(spans["read"], 0, 1).reshape(b, t, -1)
      if "episodic" not in drop:
        x_BTD = x_BTD + self.em_out(read_BTK)
      diagnostics = {"em_gate": jnp.sum(jnp.mean(jax.nn.sigmoid(spans["logits"]), axis=(1, 2))),
                     "em_density": jnp.sum(jnp.mean(spans["density"], axis=1)),
                     "em_commits": jnp.asarray(n, jnp.float32)}
      if trace:
        write_trace = {"logits": jnp.swapaxes(spans["logits"], 0, 1),
                       "keys": jnp.swapaxes(spans["keys"], 0, 1),
                       "queries": jax.lax.stop_gradient(query_BTK)}
        if trace == "reads":
          write_trace.update(
              read_origins=jnp.swapaxes(spans["read_origins"], 0, 1).reshape(b, t, -1),
              blind_origins=jnp.swapaxes(spans["blind_origins"], 0, 1),
              live_origins=jnp.swapaxes(spans["live_origins"], 0, 1))

    a_BTF = nn.gelu(self.mlp_in(self.mlp_norm(x_BTD)))
    slow_BTD = self.mlp_out(a_BTF)
    x_BTD = x_BTD + slow_BTD
    pm = None
    if c.has_procedural:
      code_BTR = self.pm_code(a_BTF)
      modulator_NB = self._pm_modulator(pools_NB)
      ones_1P = jnp.ones((1, p), jnp.float32)

      def pm_span(pm, xs):  # No module is called inside the scan.
        slow_BPD, code_BPR, modulator_B, changed_B = xs
        pm0 = _pm_boundary(c, pm, changed_B)
        delta_BPD = pm_lib.apply(pm0, code_BPR)
        pm1 = pm_lib.consolidate(pm_lib.accumulate(pm0, slow_BPD, code_BPR, ones_1P),
                                 modulator_B, lr=c.pm_lr, decay=c.pm_decay, budget=c.pm_budget)
        return pm1, delta_BPD

      spans_of = lambda v: jnp.swapaxes(v.reshape((b, n, p) + v.shape[2:]), 0, 1)
      pm, delta_NBPD = jax.lax.scan(pm_span, memory.procedural,
                                    (spans_of(slow_BTD), spans_of(code_BTR), modulator_NB,
                                     start_changed_NB))
      if "procedural" not in drop:
        x_BTD = x_BTD + jnp.swapaxes(delta_NBPD, 0, 1).reshape(b, t, -1)
    pool = init_pool(b, c.em_writes, f)  # The next span starts empty.
    return x_BTD, LayerMemory(core_BD, window, em, pm, pool, wm_previous_BD,
                              em_previous_BD), diagnostics, write_trace

  # ----------------------------------------------------------------------------------------------
  # Steps shared by the sequence and the chunk; one chunk.

  def _core_and_working(self, x_BQD, memory: LayerMemory, segments_BQ, new_document_BQ,
                        core_carry_BQ, drop: frozenset, blockwise: bool = False):
    """x after the core and working memory, the core's state, the window and the last token's
    working-memory input (None without working memory or the shift)."""
    y_BQD, core_BD = self.core(self.core_norm(x_BQD), memory.core_BD, core_carry_BQ)
    x_BQD = x_BQD + y_BQD
    window, wm_previous_BD = None, None
    if self.config.has_working:
      h_BQD = self.wm_norm(x_BQD)
      h_previous_BQD = None
      if self.config.token_shift:
        h_previous_BQD = self._previous(h_BQD, memory.wm_previous_BD, new_document_BQ)
        wm_previous_BD = h_BQD[:, -1]
      y_BQD, window = self.wm(h_BQD, memory.window, segments_BQ, h_previous_BQD,
                              blockwise=blockwise)
      if "working" not in drop:
        x_BQD = x_BQD + y_BQD
    return x_BQD, core_BD, window, wm_previous_BD

  def _span_features(self, x_input_BQD, x_BQD, memory: LayerMemory, new_document_BQ):
    """(u: the normed episodic input [B, Q, D], the pooled features [B, Q, F] (u, and its
    predecessor's with the shift), their salience [B, Q], the last token's u for the shift)."""
    c = self.config
    u_BQD = self.em_norm(x_input_BQD if c.em_features == "input" else x_BQD)
    features_BQF, em_previous_BD = u_BQD, None
    if c.token_shift:
      features_BQF = jnp.concatenate(
          [u_BQD, self._previous(u_BQD, memory.em_previous_BD, new_document_BQ)], axis=-1)
      em_previous_BD = u_BQD[:, -1]
    return u_BQD, features_BQF, self.salience(features_BQF)[..., 0], em_previous_BD

  @staticmethod
  def _previous(h_BQD: jax.Array, last_BD: jax.Array, new_document_BQ: jax.Array) -> jax.Array:
    """Each token's predecessor's features [B, Q, D] (0 where a document starts)."""
    previous_BQD = jnp.concatenate([last_BD[:, None], h_BQD[:, :-1]], axis=1)
    return jnp.where(new_document_BQ[..., None], 0.0, previous_BQD)

  def __call__(self, x_BQD: jax.Array, memory: LayerMemory, segments_BQ: jax.Array,
               new_document_BQ: jax.Array, core_carry_BQ: jax.Array, cut: SpanCut,
               drop: frozenset = frozenset(),
               trace: str = "") -> tuple[jax.Array, LayerMemory, dict, dict]:
    """(x after the layer [B, Q, D], the layer's memory after the chunk, {diagnostic: value},
    the write's trace).

    `new_document_BQ` marks the tokens that start a document (the token shift does not cross
    it); `core_carry_BQ` multiplies the core's state at each token (its boundary rule). With
    `trace` (an aligned chunk) the trace holds what the write gate's hindsight teacher needs
    ('teach'): the gates' logits [B, C], and outside the gradient the candidates' keys
    [B, C, K] and the chunk's episodic queries [B, Q, K]; 'reads' adds the read audit's
    provenance (the origins of the items each query read [B, Q, K], of the k strongest items
    [B, K] and of every live item [B, M]); '' (the default) leaves it empty.
    """
    c = self.config
    x_input_BQD = x_BQD
    x_BQD, core_BD, window, wm_previous_BD = self._core_and_working(
        x_BQD, memory, segments_BQ, new_document_BQ, core_carry_BQ, drop)
    if not c.has_pool:
      h_BQF = nn.gelu(self.mlp_in(self.mlp_norm(x_BQD)))
      return (x_BQD + self.mlp_out(h_BQF),
              LayerMemory(core_BD, window, wm_previous_BD=wm_previous_BD), {}, {})

    before_Q, after_Q = cut.before_Q, ~cut.before_Q
    # The span's features, pooled for its end's writes.
    u_BQD, features_BQF, salience_BQ, em_previous_BD = self._span_features(
        x_input_BQD, x_BQD, memory, new_document_BQ)
    in_part_QC = cut.part_Q[:, None] == jnp.arange(c.em_writes)[None, :]
    pool_before = pool_add(memory.pool, salience_BQ, features_BQF,
                           before_Q[:, None] & in_part_QC)

    # Episodic: write the span's candidates at its end, read.
    em0 = em1 = None
    if c.has_episodic:
      em0 = self._em_boundary(memory.episodic, cut.start_changed_B)
      em1, written = self._em_write(em0, pool_before, cut.span_start)
      em1 = self._em_boundary(em1, cut.cut_changed_B)
      query_BQK = u_BQD @ self.em_query_kernel
      read_BQK, weights_BQK, slots_BQK = em_lib.read(em0, query_BQK, c.em_k)
      if not cut.aligned:
        read_BQK = jnp.where(before_Q[None, :, None], read_BQK,
                             em_lib.read(em1, query_BQK, c.em_k)[0])
      if "episodic" not in drop:
        x_BQD = x_BQD + self.em_out(read_BQK)

    # Procedural: the MLP's output projection plus the fast weights' low-rank delta.
    a_BQF = nn.gelu(self.mlp_in(self.mlp_norm(x_BQD)))
    slow_BQD = self.mlp_out(a_BQF)
    x_BQD = x_BQD + slow_BQD
    pm_before = pm1 = None
    if c.has_procedural:
      pm0 = self._pm_boundary(memory.procedural, cut.start_changed_B)
      code_BQR = self.pm_code(a_BQF)
      pm_before = pm_lib.accumulate(pm0, slow_BQD, code_BQR,
                                    before_Q[None, :].astype(jnp.float32))
      pm1 = self._pm_boundary(self._pm_consolidate(pm_before, self._pm_modulator(pool_before)),
                              cut.cut_changed_B)
      delta_BQD = pm_lib.apply(pm0, code_BQR)
      if not cut.aligned:
        delta_BQD = jnp.where(before_Q[None, :, None], delta_BQD, pm_lib.apply(pm1, code_BQR))
      if "procedural" not in drop:
        x_BQD = x_BQD + delta_BQD

    # The memory after the chunk: the written one with the next span begun, or this span's.
    b, f = features_BQF.shape[0], features_BQF.shape[2]
    if cut.aligned:  # No token after the cut: the next span starts empty.
      pool_after, pm_after = init_pool(b, c.em_writes, f), pm1
    else:
      pool_after = pool_add(init_pool(b, c.em_writes, f), salience_BQ, features_BQF,
                            after_Q[:, None] & in_part_QC)
      pm_after = pm1 if pm1 is None else pm_lib.accumulate(
          pm1, slow_BQD, code_BQR, after_Q[None, :].astype(jnp.float32))
    em, pm, pool = _select(cut.commit, (em1, pm_after, pool_after), (em0, pm_before, pool_before))
    committed = jnp.asarray(cut.commit, jnp.float32)
    diagnostics, write_trace = {}, {}
    if c.has_episodic:
      diagnostics = {"em_gate": jnp.mean(jax.nn.sigmoid(written["logits"])) * committed,
                     "em_density": jnp.mean(written["density"]) * committed,
                     "em_commits": committed}
    if trace and c.has_episodic:
      if not cut.aligned:
        raise ValueError("the write trace needs chunks aligned to the spans (the parallel form)")
      write_trace = {"logits": written["logits"],
                     "keys": jax.lax.stop_gradient(written["keys"]),
                     "queries": jax.lax.stop_gradient(query_BQK)}
      if trace == "reads":  # Provenance for the read audit only: not on the training path.
        write_trace.update(
            read_origins=em_lib.origins(em0, jnp.where(weights_BQK > 0, slots_BQK, -1)),
            blind_origins=em_lib.origins(em0, em_lib.strongest(em0, c.em_k)),
            live_origins=jnp.where(em0.strength_BM > 0, em0.origin_BM, -1))
    return x_BQD, LayerMemory(core_BD, window, em, pm, pool, wm_previous_BD,
                              em_previous_BD), diagnostics, write_trace
