"""The brain-core family's one typed config: `BrainCoreConfig`, frozen and validated when built.

Defaults from seed 002 (sections 2-8): working memory over the last 256 tokens, an episodic
store of 256 items read 4 at a time, rank-8 procedural fast weights, plasticity spans of 64
tokens; at a document boundary working memory resets while episodic and procedural memory decay.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from memkernel import fields

BOUNDARIES = ("reset", "carry", "decay")
SCAN_IMPLS = ("linear", "associative")
EM_FEATURES = ("input", "mixed")
EM_TARGETS = ("first", "near")  # memkernel.braincore.write_teacher.TARGETS
EM_WRITE_GATES = ("learned", "open", "shut")
MEMORIES = ("working", "episodic", "procedural")  # What `without` may leave out.


@dataclasses.dataclass(frozen=True)
class BrainCoreConfig:
  """Hyper-parameters of the brain-core model.

  Attributes:
    vocab_size: token ids (V).
    d_model: residual width (D).
    num_layers: blocks, each an affine-scan core, working memory, episodic read and an MLP.
    num_heads: working-memory attention heads; d_model // num_heads must be even (RoPE).
    mlp_ratio: MLP hidden width relative to d_model.
    mlp_dim: hidden width of each MLP; 0 means mlp_ratio * d_model (the sweep's ablations use it
      to give a model without a memory the parameters that memory had).
    max_seq_len: longest accepted input; no parameter depends on it.
    scan_impl: the core's recurrence, 'linear' (lax.scan) or 'associative'.
    window: working memory: the sliding-window attention's span (W), itself included.
    em_items: episodic items per example and layer (M).
    em_k: items an episodic read retrieves (k <= M).
    em_key_dim: width of episodic keys and values.
    em_decay: strengths times this at every span boundary.
    em_writes: episodic candidates a span offers at its end: its tokens in `em_writes` equal
      consecutive parts, each pooled by salience to one candidate (1: the seed's one per span;
      `span`: every token a candidate, the gate choosing what stays). Written in one scatter.
    em_features: what episodic keys, values and queries are projected from: 'input', the layer's
      input (the token as the layers below left it), or 'mixed', the residual after the layer's
      core and working memory. 'mixed' was the first design: its features take on the context's
      common direction, so a token's key in one document and its query in the next stop matching
      (measured in docs/results/braincore/: cross-document recall at chance).
    em_threshold: a candidate is written only where its gate is above this (and above the
      weakest item's strength); 0 writes every candidate with a positive gate while slots are
      empty. In [0, 1).
    em_write_gate: 'learned' (the gate decides), or an intervention on a trained run (no
      parameter depends on it): 'open' offers every candidate with gate 1 (the memory keeps
      the newest, as strengths decay), 'shut' writes nothing. What the learned gate is worth.
    em_teacher: weight of the write gate's hindsight loss (training only, the parallel form;
      0: off): binary cross entropy of each candidate's gate against whether it is the first
      choice of a later scored position's dense read over every candidate the sequence offered
      before that position's span (`memkernel.braincore.write_teacher`). It is the gate's only
      signal about candidates it did not store.
    em_target: the teacher's target: 'first' (above) or 'near' (exp(score - best score) at the
      scored read that wants the candidate most).
    em_novelty_init: the write gate's initial weight on novelty (its bias then starts at minus
      half of it; 0: the LeCun initialisation of every weight, bias 0). A prior that a key
      already stored is not worth a second item: the gate's few weights move slowly under
      Adam, and without it the gate learned too slowly to tell a fact from the same key met
      again later (docs/results/braincore/).
    pm_rank: rank of the procedural fast weights (R).
    pm_lr: the fast weights' learning rate at a consolidation.
    pm_decay: fast weights times this at every span boundary.
    pm_budget: the fast weights' Frobenius-norm bound per example.
    span: plasticity span (P): episodic and procedural memory are read-only inside a span and
      written at its end; the sequence is processed span by span.
    wm_rope: rotary positions in working memory's attention. Off by default: it matches content
      alone and the core carries order (as in hybrid recurrent-attention models); rotations of
      random projections would blur the token shift's prior over distance.
    token_shift: the keys of working memory and of episodic candidates also read the previous
      token (not across a document boundary), initialised as an associative-recall prior: a
      key is the previous token projected as a query projects the current one, so a query
      starts out finding the token after its match (the kernel's `shift_init`); the core's
      output then starts at a tenth of its scale, so a token's own embedding dominates.
    plasticity: False keeps episodic and procedural memory empty: the base model exactly.
    without: memories the model is built without, a comma-separated subset of 'working',
      'episodic', 'procedural' ('' : none): their parameters, state and sources do not exist
      (the ablation sweep's `braincore/no_*` models). Without episodic and procedural memory it
      is `plasticity=False`; without episodic memory `em_teacher` has nothing to teach and is
      ignored.
    core_boundary, wm_boundary, em_boundary, pm_boundary: what a document boundary does to the
      core's state and to each memory: 'reset', 'carry' or 'decay' (by `boundary_decay`;
      working memory cannot decay). Episodic and procedural memory change at span starts
      only, so their rule applies at the first span start of a new document.
    boundary_decay: the factor of a 'decay' boundary.
  """

  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  mlp_dim: int = 0
  max_seq_len: int = 512
  scan_impl: str = "linear"
  window: int = 256
  em_items: int = 256
  em_k: int = 4
  em_key_dim: int = 64
  em_decay: float = 0.999
  em_writes: int = 1
  em_features: str = "input"
  em_threshold: float = 0.0
  em_write_gate: str = "learned"
  em_teacher: float = 0.0
  em_target: str = "first"
  em_novelty_init: float = 0.0
  pm_rank: int = 8
  pm_lr: float = 0.1
  pm_decay: float = 0.99
  pm_budget: float = 1.0
  span: int = 64
  wm_rope: bool = False
  token_shift: bool = True
  plasticity: bool = True
  without: str = ""
  core_boundary: str = "reset"
  wm_boundary: str = "reset"
  em_boundary: str = "decay"
  pm_boundary: str = "decay"
  boundary_decay: float = 0.5

  def __post_init__(self):
    s = "BrainCoreConfig"
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_ratio", "max_seq_len",
                 "window", "em_items", "em_k", "em_key_dim", "em_writes", "pm_rank", "span"):
      fields.check_int(s, name, getattr(self, name), 1)
    fields.check_int(s, "mlp_dim", self.mlp_dim, 0)
    if not isinstance(self.without, str):
      raise ValueError(f"{s}.without must be a comma-separated string, got {self.without!r}")
    names = self.left_out
    if any(n not in MEMORIES for n in names) or len(set(names)) != len(names):
      raise ValueError(f"{s}.without must be a comma-separated subset of {MEMORIES} (each at "
                       f"most once), got {self.without!r}")
    if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
      raise ValueError(f"{s}: d_model // num_heads must be an even integer (RoPE rotates "
                       f"pairs), got d_model={self.d_model}, num_heads={self.num_heads}")
    if self.em_k > self.em_items:
      raise ValueError(f"{s}.em_k must be <= em_items ({self.em_items}), got {self.em_k}")
    if self.span % self.em_writes:
      raise ValueError(f"{s}.em_writes must divide span ({self.span}), got {self.em_writes}")
    if self.em_features not in EM_FEATURES:
      raise ValueError(f"{s}.em_features must be one of {EM_FEATURES}, got {self.em_features!r}")
    if self.em_write_gate not in EM_WRITE_GATES:
      raise ValueError(f"{s}.em_write_gate must be one of {EM_WRITE_GATES}, got "
                       f"{self.em_write_gate!r}")
    if self.em_target not in EM_TARGETS:
      raise ValueError(f"{s}.em_target must be one of {EM_TARGETS}, got {self.em_target!r}")
    if self.scan_impl not in SCAN_IMPLS:
      raise ValueError(f"{s}.scan_impl must be one of {SCAN_IMPLS}, got {self.scan_impl!r}")
    for name in ("em_decay", "pm_decay", "boundary_decay"):
      value = getattr(self, name)
      fields.check_number(s, name, value, 0.0, strict=False)
      if value > 1:
        raise ValueError(f"{s}.{name} must be <= 1, got {value!r}")
    fields.check_number(s, "em_threshold", self.em_threshold, 0.0, strict=False)
    if self.em_threshold >= 1:
      raise ValueError(f"{s}.em_threshold must be < 1 (a gate never exceeds 1), got "
                       f"{self.em_threshold!r}")
    fields.check_number(s, "em_teacher", self.em_teacher, 0.0, strict=False)
    fields.check_number(s, "em_novelty_init", self.em_novelty_init, 0.0, strict=False)
    fields.check_number(s, "pm_lr", self.pm_lr, 0.0, strict=False)
    fields.check_number(s, "pm_budget", self.pm_budget, 0.0, strict=True)
    for name in ("plasticity", "token_shift", "wm_rope"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{s}.{name} must be a bool, got {getattr(self, name)!r}")
    for name in ("core_boundary", "wm_boundary", "em_boundary", "pm_boundary"):
      if getattr(self, name) not in BOUNDARIES:
        raise ValueError(f"{s}.{name} must be one of {BOUNDARIES}, got {getattr(self, name)!r}")
    if self.wm_boundary == "decay":
      raise ValueError(f"{s}.wm_boundary must be 'reset' or 'carry': a window of tokens cannot "
                       "decay")

  @property
  def family(self) -> str:
    return "braincore"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return self.mlp_dim or self.mlp_ratio * self.d_model

  @property
  def left_out(self) -> tuple[str, ...]:
    """The memories named in `without`."""
    return tuple(n.strip() for n in self.without.split(",") if n.strip())

  def _has(self, memory: str) -> bool:
    return memory not in self.left_out

  @property
  def has_working(self) -> bool:
    return self._has("working")

  @property
  def has_episodic(self) -> bool:
    return self.plasticity and self._has("episodic")

  @property
  def has_procedural(self) -> bool:
    return self.plasticity and self._has("procedural")

  @property
  def has_pool(self) -> bool:
    """Whether the span's features are pooled (episodic candidates; the procedural modulator)."""
    return self.has_episodic or self.has_procedural

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], what: str = "model") -> "BrainCoreConfig":
    """From a mapping or `ConfigDict`; unknown fields are named."""
    return fields.from_mapping(cls, values, what)
