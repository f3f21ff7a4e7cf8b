"""Synthetic probe tasks: deterministic, jittable batch generators in pure JAX.

    batch = generate(task, jax.random.fold_in(key, step), batch_size)

works inside or outside `jax.jit` (with `task` and `batch_size` static, e.g.
`jax.jit(generate, static_argnums=(0, 2))`); the batch is a function of the key alone, so nothing random
is threaded through the training loop and any step can be regenerated.

Batch layout (B batch, T = `seq_len` tokens):
  tokens        int32[B, T]    model inputs.
  targets       int32[B, T]    what the model should output *at* position t (next-token style: at a
                               query key's position the target is its value); 0 where unscored.
  mask          float32[B, T]  1.0 at scored positions, 0.0 elsewhere. Every sequence of a task has the
                               same number of scored positions (`TaskConfig.num_queries`).
  segments      int32[B, T]    (cross_doc only) the document index of each token.
  answer_leaves int32[B, T, 2] at a scored position t: the index of the leaf
                               (`position // leaf_size`) holding the token the answer must be read from;
                               slot 1 is the second leaf for tasks that need two (far_compare), else -1.
                               -1 everywhere unscored. This is what an oracle-route mode feeds to the
                               exact read and what routing recall is measured against.

Answer leaves always lie strictly before the query's own leaf (answer_leaf < t // leaf_size): every
task places its queries in a region that starts on a leaf boundary after all the information it asks
about. The one exception is `copy` with `copy_len < leaf_size`, where a copied token can sit in the
same leaf as its source.

Token layout. Tokens [0, NUM_SPECIAL) are reserved and never used as content or filler by `induction`,
`noisy_retrieval` and `far_compare`:
  0 PAD, 1 SEP (copy separator), 2 MARKER (noisy_retrieval, far_compare), 3 LESS and 4 GREATER
  (far_compare's 'order' answers); the rest of the block is unused.
`mqar` follows Zoology exactly and ignores the block; `passkey` uses MARKER; `copy` uses only PAD and SEP.

Tasks (V = vocab_size, n = num_pairs):
  mqar             (Zoology multi-query associative recall) k1 v1 ... kn vn with keys drawn without
                   replacement from [1, V/2) and values without replacement from [V/2, V); the rest is
                   filler from [0, V), except that each key appears once more as a query. Queries sit at
                   every other position (Zoology's stride 2) from q0, the first leaf boundary after the
                   kv block: position q0 + 2g for gap index g in [0, (T - q0) // 2), drawn without
                   replacement with p(g) ∝ a (g + 1)^(a - 1) ('power_law', a = power_a) or uniformly
                   ('uniform'); as in Zoology, the j-th draw queries key j. Target at a query: the key's
                   value. Answer leaf: the leaf of the value token, (2i + 1) // leaf_size. Filler re-uses
                   keys and values (distractors grow with T, on purpose). With layout 'scattered'
                   the answer moves: the n pairs "k v" sit at random non-overlapping places of the
                   leaf-aligned first half (keys from [1, V/2), values from [V/2, V), as in
                   Zoology), filler comes from [V/2, V) only (a key appears in its pair and at its
                   query alone), and n queries sit at random places of the second half, in an
                   order independent of the pairs'. Answer leaf: the leaf of the value token.
  copy             a segment of c = copy_len tokens from [2, V), SEP, the segment again, PAD to T.
                   Position c + j (SEP for j = 0, else the (j-1)-th copied token) must output segment
                   token j; all c copied positions are scored. Answer leaf: j // leaf_size.
  induction        filler from [NUM_SPECIAL + n, V); n' = min(n, what fits) bigrams "A B" at random
                   non-overlapping positions in the first (leaf-aligned) half, with distinct triggers A
                   from the reserved range [NUM_SPECIAL, NUM_SPECIAL + n) (so A never occurs as filler)
                   and B from the filler range; each A occurs once more at a random position in the second
                   half, whose target is B. Answer leaf: the leaf of B's first occurrence.
  noisy_retrieval  noise from the content range [NUM_SPECIAL, V) everywhere; n triples MARKER k v (keys
                   unique, keys and values from the same content range as the noise) at random
                   non-overlapping positions in the first (leaf-aligned) 3/4; in the last quarter, n
                   queries MARKER k in random order at random non-overlapping positions. Target at the
                   query's key position: v. Answer leaf: the leaf of the triple's value token.
  far_compare      two far tokens read and compared: n = num_compares triples MARKER k a_k in the
                   first quarter and MARKER k b_k in the second (keys unique, random positions, in a
                   different order in each quarter), filler and numbers from the content range
                   [NUM_SPECIAL, V) as in noisy_retrieval; in the last quarter, n queries MARKER k in
                   random order (quarters leaf-aligned). Target at the query's key position:
                   max(a_k, b_k) by token id (compare_target 'max'), or GREATER if a_k > b_k else
                   LESS ('order', one bit per query). a_k != b_k. Answer leaves: (leaf of a_k, leaf
                   of b_k).
  cross_doc        scattered mqar across a document boundary: the pairs in document 0 (the first
                   half), the queries in document 1 (the rest); the batch carries `segments`
                   (0 then 1). A model whose memory resets at a document boundary sees no pair
                   and is at chance (1 / (V / 2) among the values); one that carries its memory
                   across documents can answer.
  passkey          one fact in long filler: filler from [NUM_SPECIAL, V); "MARKER v" (v from the
                   same range) at a uniformly random place before the last leaf; the last token is
                   MARKER, whose target is v. One scored position per sequence. Answer leaf: the
                   leaf of v.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from memkernel import fields

TASKS = ("copy", "mqar", "induction", "noisy_retrieval", "far_compare", "passkey", "cross_doc")
# Tasks whose batches hold two documents (`segments`).
DOCUMENT_TASKS = ("cross_doc",)
DISTANCES = ("power_law", "uniform")
LAYOUTS = ("zoology", "scattered")
COMPARE_TARGETS = ("max", "order")

PAD = 0
SEP = 1
MARKER = 2
LESS = 3
GREATER = 4
NUM_SPECIAL = 32


def _leaf_floor(position: int, leaf_size: int) -> int:
  return (position // leaf_size) * leaf_size


def _leaf_ceil(position: int, leaf_size: int) -> int:
  return -(-position // leaf_size) * leaf_size


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """One synthetic probe task. Frozen and hashable, so it can be a static `jax.jit` argument.

  Attributes:
    name: one of `TASKS`.
    vocab_size: number of token ids (V).
    seq_len: tokens per sequence (T).
    num_pairs: key-value pairs (mqar, noisy_retrieval) or trigger bigrams (induction, capped by what
      fits in the first half).
    distance: how mqar query gaps are drawn: 'power_law' (Zoology) or 'uniform' (the Zoology
      layout only).
    layout: mqar's layout: 'zoology' (the pairs first, queries after them) or 'scattered' (the
      pairs at random places in the first half, the queries at random places in the second, so
      the answer leaf moves; keys appear only in their pair and at their query).
    power_a: Zoology's power-law exponent a, p(gap index g) ∝ a (g + 1)^(a - 1); must be > 0.
    leaf_size: tokens per memory leaf; answer leaves are position // leaf_size, and query regions start
      on leaf boundaries.
    copy_len: copy segment length; 0 means seq_len // 2 - 1.
    num_compares: keys compared per far_compare sequence.
    compare_target: what far_compare asks at a query `MARKER k`: 'max' (the larger of a_k and b_k,
      a content token) or 'order' (GREATER if a_k > b_k else LESS, one bit).
  """

  name: str
  vocab_size: int = 256
  seq_len: int = 512
  num_pairs: int = 32
  distance: str = "power_law"
  layout: str = "zoology"
  power_a: float = 0.01
  leaf_size: int = 16
  copy_len: int = 0
  num_compares: int = 16
  compare_target: str = "max"

  def __post_init__(self):
    if self.name not in TASKS:
      raise ValueError(f"TaskConfig.name must be one of {TASKS}, got {self.name!r}")
    for field in ("vocab_size", "seq_len", "num_pairs", "leaf_size", "num_compares"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"TaskConfig.{field} must be a positive integer, got {value!r}")
    if not isinstance(self.copy_len, int) or isinstance(self.copy_len, bool) or self.copy_len < 0:
      raise ValueError(f"TaskConfig.copy_len must be a non-negative integer, got {self.copy_len!r}")
    if self.distance not in DISTANCES:
      raise ValueError(f"TaskConfig.distance must be one of {DISTANCES}, got {self.distance!r}")
    if self.layout not in LAYOUTS:
      raise ValueError(f"TaskConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.layout != "zoology" and self.name != "mqar":
      raise ValueError(f"TaskConfig.layout={self.layout!r} applies to mqar only, not "
                       f"{self.name!r}")
    if (not isinstance(self.power_a, (int, float)) or isinstance(self.power_a, bool)
        or not self.power_a > 0):
      raise ValueError(f"TaskConfig.power_a must be a number > 0, got {self.power_a!r}")
    if self.compare_target not in COMPARE_TARGETS:
      raise ValueError(f"TaskConfig.compare_target must be one of {COMPARE_TARGETS}, got "
                       f"{self.compare_target!r}")
    getattr(self, f"_validate_{self.name}")()

  def _too_small(self, field: str, need: str) -> ValueError:
    return ValueError(f"TaskConfig.{field}={getattr(self, field)!r} is too small for task "
                      f"{self.name!r}: {need}")

  def _validate_mqar(self):
    n, V = self.num_pairs, self.vocab_size
    if V // 2 - 1 < n:
      raise self._too_small("vocab_size", f"{n} distinct keys need V // 2 - 1 >= num_pairs")
    if self.layout == "scattered":
      self._validate_mqar_scattered()
      return
    if self.mqar_gap_slots < n:
      raise self._too_small(
          "seq_len", f"the kv block ends at {2 * n}, queries start at leaf boundary "
          f"{self.mqar_query_start} and {n} queries at stride 2 need seq_len >= "
          f"{self.mqar_query_start + 2 * n}")

  def _validate_mqar_scattered(self):
    n, V = self.num_pairs, self.vocab_size
    if V // 2 - 1 < n:
      raise self._too_small("vocab_size", f"{n} distinct keys need V // 2 - 1 >= num_pairs")
    split = self.scattered_split
    if split < 2 * n or self.seq_len - split < n:
      raise self._too_small(
          "seq_len", f"{n} pairs need {2 * n} tokens in the leaf-aligned first half ({split}) "
          f"and {n} queries {n} tokens in the rest ({self.seq_len - split})")

  def _validate_cross_doc(self):
    self._validate_mqar_scattered()

  def _validate_copy(self):
    if self.vocab_size < 3:
      raise self._too_small("vocab_size", "segment tokens come from [2, V), so V >= 3")
    c = self.effective_copy_len
    if c < 1:
      raise self._too_small("seq_len", "the default copy_len seq_len // 2 - 1 must be >= 1")
    if 2 * c + 1 > self.seq_len:
      raise ValueError(f"TaskConfig.copy_len={c!r} does not fit: 2 * copy_len + 1 must be <= "
                       f"seq_len={self.seq_len}")

  def _validate_induction(self):
    if self.vocab_size < NUM_SPECIAL + self.num_pairs + 2:
      raise self._too_small("vocab_size", f"{NUM_SPECIAL} reserved tokens, num_pairs="
                            f"{self.num_pairs} trigger tokens and >= 2 content tokens")
    if self.induction_pairs < 1:
      raise self._too_small("seq_len", f"the leaf-aligned first half (leaf_size={self.leaf_size}) "
                            "must hold a bigram and the second half a query")

  def _validate_noisy_retrieval(self):
    n = self.num_pairs
    if self.vocab_size < NUM_SPECIAL + max(n, 2):
      raise self._too_small("vocab_size", f"{n} unique keys from [{NUM_SPECIAL}, V)")
    context = self.noisy_context_len
    if 3 * n > context or 2 * n > self.seq_len - context:
      raise self._too_small(
          "seq_len", f"{n} triples need {3 * n} tokens in the leaf-aligned first 3/4 "
          f"({context}) and {n} queries {2 * n} tokens in the rest ({self.seq_len - context})")

  def _validate_passkey(self):
    if self.vocab_size < NUM_SPECIAL + 2:
      raise self._too_small("vocab_size", f"the filler and the key come from [{NUM_SPECIAL}, V)")
    if self.passkey_query_start < 2:
      raise self._too_small("seq_len", f"the fact (2 tokens) must fit before the query's leaf "
                            f"(leaf_size={self.leaf_size})")

  def _validate_far_compare(self):
    n = self.num_compares
    if self.vocab_size - NUM_SPECIAL < max(n, 2):
      raise self._too_small("vocab_size", f"{n} distinct keys and two distinct numbers come from "
                            f"[{NUM_SPECIAL}, V)")
    q1, q2, q3 = self.far_quarters
    if q1 < 3 * n or q2 - q1 < 3 * n or self.seq_len - q3 < 2 * n:
      raise self._too_small(
          "seq_len", f"the first two leaf-aligned quarters must hold {n} triples ({3 * n} tokens) "
          f"each and the last {n} queries ({2 * n} tokens); quarter boundaries {q1}, {q2}, {q3} "
          f"with leaf_size={self.leaf_size}")

  # Derived sizes (static Python ints).
  @property
  def mqar_query_start(self) -> int:
    """First position queries may occupy: the leaf boundary at or after the kv block's end."""
    return _leaf_ceil(2 * self.num_pairs, self.leaf_size)

  @property
  def mqar_gap_slots(self) -> int:
    """Number of stride-2 query slots after `mqar_query_start`."""
    return (self.seq_len - self.mqar_query_start) // 2

  @property
  def scattered_split(self) -> int:
    """Scattered mqar: where the query half starts, the leaf boundary at or before seq_len / 2."""
    return _leaf_floor(self.seq_len // 2, self.leaf_size)

  @property
  def passkey_query_start(self) -> int:
    """Passkey: the start of the last leaf, which holds the query; the fact lies before it."""
    return _leaf_floor(self.seq_len - 1, self.leaf_size)

  @property
  def effective_copy_len(self) -> int:
    return self.copy_len or self.seq_len // 2 - 1

  @property
  def induction_split(self) -> int:
    """Start of the query half: the leaf boundary at or before seq_len / 2."""
    return _leaf_floor(self.seq_len // 2, self.leaf_size)

  @property
  def induction_pairs(self) -> int:
    """Bigrams actually placed: num_pairs capped by what fits in each half."""
    split = self.induction_split
    return min(self.num_pairs, split // 2, self.seq_len - split)

  @property
  def noisy_context_len(self) -> int:
    """End of the triple region: the leaf boundary at or before 3/4 of seq_len."""
    return _leaf_floor(3 * self.seq_len // 4, self.leaf_size)

  @property
  def far_quarters(self) -> tuple[int, int, int]:
    """Leaf-aligned quarter boundaries of far_compare."""
    return tuple(_leaf_floor(k * self.seq_len // 4, self.leaf_size) for k in (1, 2, 3))

  @property
  def num_queries(self) -> int:
    """Scored positions per sequence (the mask's row sum)."""
    return {
        "mqar": self.num_pairs,
        "copy": self.effective_copy_len,
        "induction": self.induction_pairs,
        "noisy_retrieval": self.num_pairs,
        "far_compare": self.num_compares,
        "passkey": 1,
        "cross_doc": self.num_pairs,
    }[self.name]

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TaskConfig":
    """Builds a config from a mapping (e.g. a `ConfigDict`), rejecting unknown fields."""
    return fields.from_mapping(cls, values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Per-sequence generators: (task, key) -> (tokens[T], targets[T], mask[T], answer_leaves[T, 2]).


def _non_overlapping_starts(key: jax.Array, region_len: int, count: int, width: int) -> jax.Array:
  """Sorted starts of `count` disjoint blocks of `width` tokens inside [0, region_len).

  Uniform over all such layouts: a sorted `count`-subset of [0, region_len - count * (width - 1))
  shifted by i * (width - 1) is a bijection onto them.
  """
  free = region_len - count * (width - 1)
  picks = jnp.sort(jax.random.choice(key, free, (count,), replace=False))
  return picks + jnp.arange(count) * (width - 1)


def _scored(task: TaskConfig, positions: jax.Array, answers: jax.Array, source_a: jax.Array,
            source_b: Optional[jax.Array] = None):
  """Targets, mask, answer leaves and answer sources with `answers` at `positions`, recalled
  from the tokens at `source_a` (and `source_b`) (int32[Q] each); a leaf is its source // L."""
  T = task.seq_len
  targets = jnp.zeros((T,), jnp.int32).at[positions].set(answers.astype(jnp.int32))
  mask = jnp.zeros((T,), jnp.float32).at[positions].set(1.0)
  sources = jnp.full((T, 2), -1, jnp.int32).at[positions, 0].set(source_a.astype(jnp.int32))
  if source_b is not None:
    sources = sources.at[positions, 1].set(source_b.astype(jnp.int32))
  leaves = jnp.where(sources >= 0, sources // task.leaf_size, -1)
  return targets, mask, leaves, sources


def _mqar(task: TaskConfig, key: jax.Array):
  if task.layout == "scattered":
    return _mqar_scattered(task, key)
  n, V, T = task.num_pairs, task.vocab_size, task.seq_len
  k_keys, k_values, k_gaps, k_fill = jax.random.split(key, 4)
  keys = jax.random.choice(k_keys, jnp.arange(1, V // 2), (n,), replace=False)
  values = jax.random.choice(k_values, jnp.arange(V // 2, V), (n,), replace=False)
  kv = jnp.stack([keys, values], axis=-1).reshape(-1)

  slots = task.mqar_gap_slots
  if task.distance == "power_law":
    log_p = (task.power_a - 1.0) * jnp.log(jnp.arange(1, slots + 1, dtype=jnp.float32))
  else:
    log_p = jnp.zeros((slots,), jnp.float32)
  # Gumbel top-k: sampling without replacement, in draw order (the j-th draw queries key j).
  _, gaps = jax.lax.top_k(log_p + jax.random.gumbel(k_gaps, (slots,)), n)
  query_pos = task.mqar_query_start + 2 * gaps

  tokens = jax.random.randint(k_fill, (T,), 0, V, jnp.int32)
  tokens = tokens.at[:2 * n].set(kv).at[query_pos].set(keys)
  return (tokens, *_scored(task, query_pos, values, 2 * jnp.arange(n) + 1))


def _mqar_scattered(task: TaskConfig, key: jax.Array):
  n, V, T = task.num_pairs, task.vocab_size, task.seq_len
  split = task.scattered_split
  k_keys, k_values, k_pairs, k_order, k_queries, k_fill = jax.random.split(key, 6)
  keys = jax.random.choice(k_keys, jnp.arange(1, V // 2), (n,), replace=False)
  values = jax.random.choice(k_values, jnp.arange(V // 2, V), (n,), replace=False)
  # Pair i at a random place of the first half; query j (a random place of the second half, in
  # draw order) asks for pair j, so query order and pair order are independent.
  starts = jax.random.permutation(k_order, _non_overlapping_starts(k_pairs, split, n, 2))
  query_pos = split + jax.random.choice(k_queries, T - split, (n,), replace=False)
  # Filler from the value range only: a key token appears in its pair and at its query alone.
  tokens = jax.random.randint(k_fill, (T,), V // 2, V, jnp.int32)
  tokens = tokens.at[starts].set(keys).at[starts + 1].set(values).at[query_pos].set(keys)
  return (tokens, *_scored(task, query_pos, values, starts + 1))


def _passkey(task: TaskConfig, key: jax.Array):
  V, T = task.vocab_size, task.seq_len
  k_pos, k_value, k_fill = jax.random.split(key, 3)
  # The fact `MARKER v` anywhere before the query's leaf (uniform), the query `MARKER` last.
  start = jax.random.randint(k_pos, (), 0, task.passkey_query_start - 1)
  value = jax.random.randint(k_value, (), NUM_SPECIAL, V, jnp.int32)
  tokens = jax.random.randint(k_fill, (T,), NUM_SPECIAL, V, jnp.int32)
  tokens = tokens.at[start].set(MARKER).at[start + 1].set(value).at[T - 1].set(MARKER)
  query = jnp.full((1,), T - 1)
  return (tokens, *_scored(task, query, value[None], (start + 1)[None]))


def _copy(task: TaskConfig, key: jax.Array):
  c, V, T = task.effective_copy_len, task.vocab_size, task.seq_len
  segment = jax.random.randint(key, (c,), 2, V, jnp.int32)
  tokens = jnp.full((T,), PAD, jnp.int32)
  tokens = tokens.at[:c].set(segment).at[c].set(SEP).at[c + 1:2 * c + 1].set(segment)
  source = jnp.arange(c)
  return (tokens, *_scored(task, c + source, segment, source))


def _induction(task: TaskConfig, key: jax.Array):
  n, V, T = task.induction_pairs, task.vocab_size, task.seq_len
  split = task.induction_split
  content_lo = NUM_SPECIAL + task.num_pairs
  k_trig, k_b, k_pairs, k_queries, k_fill = jax.random.split(key, 5)
  triggers = NUM_SPECIAL + jax.random.permutation(k_trig, task.num_pairs)[:n]
  follows = jax.random.randint(k_b, (n,), content_lo, V, jnp.int32)
  starts = _non_overlapping_starts(k_pairs, split, n, 2)
  # Unsorted draws: query order is independent of bigram order.
  query_pos = split + jax.random.choice(k_queries, T - split, (n,), replace=False)

  tokens = jax.random.randint(k_fill, (T,), content_lo, V, jnp.int32)
  tokens = tokens.at[starts].set(triggers).at[starts + 1].set(follows).at[query_pos].set(triggers)
  return (tokens, *_scored(task, query_pos, follows, starts + 1))


def _noisy_retrieval(task: TaskConfig, key: jax.Array):
  n, V, T = task.num_pairs, task.vocab_size, task.seq_len
  context = task.noisy_context_len
  k_keys, k_values, k_triples, k_queries, k_order, k_fill = jax.random.split(key, 6)
  keys = NUM_SPECIAL + jax.random.choice(k_keys, V - NUM_SPECIAL, (n,), replace=False)
  values = jax.random.randint(k_values, (n,), NUM_SPECIAL, V, jnp.int32)
  starts = _non_overlapping_starts(k_triples, context, n, 3)
  query_starts = context + _non_overlapping_starts(k_queries, T - context, n, 2)
  order = jax.random.permutation(k_order, n)  # query j asks for triple order[j]

  tokens = jax.random.randint(k_fill, (T,), NUM_SPECIAL, V, jnp.int32)
  tokens = tokens.at[starts].set(MARKER).at[starts + 1].set(keys).at[starts + 2].set(values)
  tokens = tokens.at[query_starts].set(MARKER).at[query_starts + 1].set(keys[order])
  return (tokens, *_scored(task, query_starts + 1, values[order], starts[order] + 2))


def _far_compare(task: TaskConfig, key: jax.Array):
  n, V, T = task.num_compares, task.vocab_size, task.seq_len
  q1, q2, q3 = task.far_quarters
  k_keys, k_a, k_b, k_pos_a, k_pos_b, k_perm_a, k_perm_b, k_queries, k_order, k_fill = (
      jax.random.split(key, 10))
  keys = NUM_SPECIAL + jax.random.choice(k_keys, V - NUM_SPECIAL, (n,), replace=False)
  span = V - NUM_SPECIAL
  a = jax.random.randint(k_a, (n,), NUM_SPECIAL, V, jnp.int32)
  b = NUM_SPECIAL + (a - NUM_SPECIAL + jax.random.randint(k_b, (n,), 1, span)) % span  # b != a
  # Shuffled so the order of the keys differs between the two quarters.
  a_starts = jax.random.permutation(k_perm_a, _non_overlapping_starts(k_pos_a, q1, n, 3))
  b_starts = q1 + jax.random.permutation(k_perm_b, _non_overlapping_starts(k_pos_b, q2 - q1, n, 3))
  query_starts = q3 + _non_overlapping_starts(k_queries, T - q3, n, 2)
  order = jax.random.permutation(k_order, n)  # query j asks about key order[j]

  tokens = jax.random.randint(k_fill, (T,), NUM_SPECIAL, V, jnp.int32)
  for starts, numbers in ((a_starts, a), (b_starts, b)):
    tokens = tokens.at[starts].set(MARKER).at[starts + 1].set(keys).at[starts + 2].set(numbers)
  tokens = tokens.at[query_starts].set(MARKER).at[query_starts + 1].set(keys[order])
  if task.compare_target == "max":
    answers = jnp.maximum(a, b)
  else:
    answers = jnp.where(a > b, GREATER, LESS)
  return (tokens, *_scored(task, query_starts + 1, answers[order], a_starts[order] + 2,
                           b_starts[order] + 2))


_GENERATORS: dict[str, Callable[[TaskConfig, jax.Array], tuple[jax.Array, ...]]] = {
    "mqar": _mqar,
    "copy": _copy,
    "induction": _induction,
    "noisy_retrieval": _noisy_retrieval,
    "far_compare": _far_compare,
    "passkey": _passkey,
    "cross_doc": _mqar_scattered,
}


def generate(task: TaskConfig, key: jax.Array, batch_size: int,
             seq_len: Optional[int] = None) -> dict[str, jax.Array]:
  """Generates one batch of `task`, a deterministic function of `key`.

  Args:
    task: the task (static under jit).
    key: a PRNG key, e.g. `jax.random.fold_in(key, step)`.
    batch_size: B (static under jit).
    seq_len: optional override of `task.seq_len` (static under jit), for evaluating at other lengths.

  Returns:
    A dict with `tokens` int32[B, T], `targets` int32[B, T], `mask` float32[B, T],
    `answer_leaves` int32[B, T, 2] and `answer_sources` int32[B, T, 2] (the positions of the
    tokens a scored answer recalls, -1 elsewhere; its leaves are `answer_leaves`), and for
    `DOCUMENT_TASKS` `segments` int32[B, T]; see the module docstring. Row i depends only on `key` and i, so
    the first rows of a batch do not change with `batch_size`.
  """
  if seq_len is not None and seq_len != task.seq_len:
    task = dataclasses.replace(task, seq_len=seq_len)
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
    raise ValueError(f"generate: batch_size must be a positive integer, got {batch_size!r}")
  per_sequence = functools.partial(_GENERATORS[task.name], task)
  # Row i depends on (key, i) only, so a smaller batch is a prefix of a larger one.
  row_keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(batch_size))
  tokens, targets, mask, answer_leaves, answer_sources = jax.vmap(per_sequence)(row_keys)
  batch = {"tokens": tokens, "targets": targets, "mask": mask, "answer_leaves": answer_leaves,
           "answer_sources": answer_sources}
  if task.name in DOCUMENT_TASKS:  # Document 0 holds the pairs, document 1 the queries.
    documents = (jnp.arange(task.seq_len) >= task.scattered_split).astype(jnp.int32)
    batch["segments"] = jnp.broadcast_to(documents, tokens.shape)
  return batch
