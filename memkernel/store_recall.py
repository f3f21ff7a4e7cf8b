"""The cross-process recall probe: facts read in one process, answered in another from the store.

Facts are key -> value token pairs in the scattered MQAR vocabulary (keys in [1, V/2), values in
[V/2, V)). Process 1 reads fact documents, the scattered MQAR layout its model was trained on
(pairs at random places of the first half, value-range filler), and writes one line per pair:
the model's final hidden state at the key token, and the token that follows it, the value
(`store_bias.write_next_token_lines`). Process 2 starts with an empty model memory and reads
question documents: value-range filler with the facts' keys at random places of the second half
and no pairs. Its model cannot know a value (chance is 1 / (V/2)); with the store, the bias
`alpha * bias_vector(hidden)` is added to its logits at every position.

Reported: accuracy at the questions with and without the store; where the store should change
nothing, MQAR documents whose own pairs (on keys no fact uses) answer their queries: accuracy and
loss at their queries and the loss at every other position; and where store and context disagree,
documents that pair the facts' keys with other values.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from memkernel import hidden as hidden_lib
from memkernel import probes
from memkernel import store_bias
from memkernel.store import store as store_lib
from memkernel.store import verification

VALIDATION, TEST = 1, 2   # question streams: tune alpha on one, report on the other


@dataclasses.dataclass(frozen=True)
class Facts:
  keys: np.ndarray     # int [F], distinct, in [1, V/2)
  values: np.ndarray   # int [F], in [V/2, V)


def make_facts(vocab_size: int, count: int, seed: int) -> Facts:
  """`count` facts with distinct keys; ValueError when the key range is too small."""
  if not 1 <= count <= vocab_size // 2 - 1:
    raise ValueError(f"facts must number 1..{vocab_size // 2 - 1} (distinct keys in "
                     f"[1, {vocab_size // 2})), got {count}")
  rng = np.random.default_rng(seed)
  keys = rng.choice(np.arange(1, vocab_size // 2), size=count, replace=False)
  values = rng.integers(vocab_size // 2, vocab_size, size=count)
  return Facts(keys, values)


def pair_documents(task: probes.TaskConfig, keys: np.ndarray, values: np.ndarray,
                   rng: np.random.Generator):
  """Scattered-MQAR documents holding each (key, value) pair once, `task.num_pairs` a document,
  at random places of the first half, with each key queried at a random place of the second half
  (value-range filler elsewhere). Returns (tokens int32 [B, T], pair key positions [(b, t)],
  query mask bool [B, T], answers int32 [B, T])."""
  per_doc, T, V, split = task.num_pairs, task.seq_len, task.vocab_size, task.scattered_split
  order = rng.permutation(len(keys))
  docs, positions, masks, answers = [], [], [], []
  for b, start in enumerate(range(0, len(order), per_doc)):
    chosen = order[start:start + per_doc]
    tokens = rng.integers(V // 2, V, size=T)
    slots = rng.choice(split // 2, size=len(chosen), replace=False) * 2
    tokens[slots], tokens[slots + 1] = keys[chosen], values[chosen]
    queries = split + rng.choice(T - split, len(chosen), replace=False)
    tokens[queries] = keys[chosen]
    mask, answer = np.zeros(T, bool), np.zeros(T, np.int64)
    mask[queries], answer[queries] = True, values[chosen]
    docs.append(tokens)
    masks.append(mask)
    answers.append(answer)
    positions += [(b, int(t)) for t in slots]
  return (np.stack(docs).astype(np.int32), positions, np.stack(masks),
          np.stack(answers).astype(np.int32))


def fact_documents(task: probes.TaskConfig, facts: Facts, seed: int):
  """Documents holding every fact once as a pair: (tokens int32 [B, T], key positions [(b, t)])."""
  tokens, positions, _, _ = pair_documents(task, facts.keys, facts.values,
                                           np.random.default_rng(seed))
  return tokens, positions


def question_documents(task: probes.TaskConfig, facts: Facts, docs: int, stream: int):
  """Filler with facts' keys at random places of the second half and no pairs:
  (tokens int32 [B, T], question mask bool [B, T], answers int32 [B, T])."""
  rng = np.random.default_rng([stream, 7919])
  T, V, n = task.seq_len, task.vocab_size, task.num_pairs
  tokens = rng.integers(V // 2, V, size=(docs, T))
  mask = np.zeros((docs, T), bool)
  answers = np.zeros((docs, T), np.int64)
  for b in range(docs):
    which = rng.choice(len(facts.keys), size=min(n, len(facts.keys)), replace=False)
    where = task.scattered_split + rng.choice(T - task.scattered_split, len(which), False)
    tokens[b, where] = facts.keys[which]
    mask[b, where] = True
    answers[b, where] = facts.values[which]
  return tokens.astype(np.int32), mask, answers.astype(np.int32)


def write_facts(store, model, params, task: probes.TaskConfig, facts: Facts, *, site: str,
                seed: int = 0) -> int:
  """Process 1: reads the fact documents and writes a line per pair, keyed by the output of
  submodule `site` at the pair's key token; returns how many."""
  tokens, positions = fact_documents(task, facts, seed)
  _, hidden = hidden_lib.parallel(model, params, jnp.asarray(tokens), site=site)
  key_of = {int(k): int(v) for k, v in zip(facts.keys, facts.values)}
  anchors = store_bias.write_next_token_lines(
      store, np.asarray(hidden), tokens, positions, task.vocab_size,
      ctx=lambda b, t: {"doc": int(b), "position": int(t), "key_token": int(tokens[b, t]),
                        "value_token": key_of[int(tokens[b, t])]})
  return len(anchors)


def _scores(logits_BTV: np.ndarray, answers_BT: np.ndarray, mask_BT: np.ndarray) -> dict:
  picked = logits_BTV[mask_BT]
  target = answers_BT[mask_BT]
  logp = picked - np.logaddexp.reduce(picked, axis=-1, keepdims=True)
  correct = picked.argmax(-1) == target
  nll = -logp[np.arange(len(target)), target]
  n = len(target)
  return {"queries": int(n), "accuracy": float(correct.mean()),
          "accuracy_se": float(correct.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
          "loss": float(nll.mean()), "loss_se": float(nll.std(ddof=1) / np.sqrt(n)) if n > 1
          else 0.0}


def _forward(model, params, tokens, bias: Optional[Callable[[np.ndarray], np.ndarray]],
             site: str, batch: int = 8):
  out = []
  for start in range(0, len(tokens), batch):
    logits, hidden = hidden_lib.parallel(model, params, jnp.asarray(tokens[start:start + batch]),
                                         site=site)
    logits = np.asarray(jax.device_get(logits))
    if bias is not None:
      logits = logits + bias(np.asarray(jax.device_get(hidden)))
    out.append(logits)
  return np.concatenate(out)


def ask(model, params, task: probes.TaskConfig, facts: Facts, *, docs: int, stream: int,
        bias: Optional[Callable[[np.ndarray], np.ndarray]], site: str) -> dict:
  """Process 2: accuracy and loss at the questions, with `bias` (a `StoreBias` fed the output
  of `site`) or without."""
  tokens, mask, answers = question_documents(task, facts, docs, stream)
  return _scores(_forward(model, params, tokens, bias, site), answers, mask)


def in_context(model, params, task: probes.TaskConfig, facts: Facts, *, docs: int, stream: int,
               bias: Optional[Callable[[np.ndarray], np.ndarray]], site: str,
               conflicting: bool = False) -> dict:
  """MQAR documents that answer their own queries: accuracy and loss at the queries, and the
  loss at every other position (filler and pairs). Their keys are ones no fact uses (where the
  store should change nothing), or, `conflicting`, the facts' keys with other values (where the
  store and the context disagree)."""
  rng = np.random.default_rng([stream, 104729, int(conflicting)])
  V, n = task.vocab_size, task.num_pairs
  pool = (facts.keys if conflicting
          else np.setdiff1d(np.arange(1, V // 2), facts.keys))
  if len(pool) < n:
    raise ValueError(f"{len(pool)} keys are free of facts; in-context documents need "
                     f"{n} (use fewer facts)")
  stored = dict(zip(facts.keys.tolist(), facts.values.tolist()))
  all_tokens, all_mask, all_answers = [], [], []
  for _ in range(docs):
    keys = rng.choice(pool, size=n, replace=False)
    values = rng.integers(V // 2, V, size=n)
    if conflicting:   # never the stored value
      values = np.array([v if v != stored[int(k)] else V // 2 + (v + 1 - V // 2) % (V // 2)
                         for k, v in zip(keys, values)])
    tokens, _, mask, answers = pair_documents(task, keys, values, rng)
    all_tokens.append(tokens)
    all_mask.append(mask)
    all_answers.append(answers)
  tokens = np.concatenate(all_tokens)
  queries, answers = np.concatenate(all_mask), np.concatenate(all_answers)
  logits = _forward(model, params, tokens, bias, site)
  scored = _scores(logits, answers, queries)
  rest = ~queries
  rest[:, -1] = False
  next_tokens = np.zeros_like(tokens)
  next_tokens[:, :-1] = tokens[:, 1:]
  other = _scores(logits, next_tokens, rest)
  return {"queries": scored, "other_positions": {"positions": other["queries"],
                                                 "loss": other["loss"],
                                                 "loss_se": other["loss_se"]}}


def site_match(store, model, params, task: probes.TaskConfig, facts: Facts, *, site: str,
               docs: int, stream: int) -> float:
  """How often a question's nearest line (by cosine) is a line of the key it asks about: whether
  the site's vectors find facts by what is asked."""
  tokens, mask, _ = question_documents(task, facts, docs, stream)
  _, hidden = hidden_lib.parallel(model, params, jnp.asarray(tokens), site=site)
  questions = np.asarray(hidden)[mask]
  asked = tokens[mask]
  hits = [bool(found) and found[0].ctx.get("key_token") == int(k)
          for found, k in ((store.query(q, 1), k) for q, k in zip(questions, asked))]
  return float(np.mean(hits))


def choose(validation: list[dict], baseline: dict, *, max_accuracy_drop: float = 0.01,
           max_loss_rise: float = 0.01) -> Optional[dict]:
  """The setting with the best validation question accuracy among those that keep the in-context
  query accuracy within `max_accuracy_drop` of no store and the loss at other positions within
  `max_loss_rise` (relative); None if none does."""
  ok = [v for v in validation
        if v["in_context"]["queries"]["accuracy"]
        >= baseline["in_context"]["queries"]["accuracy"] - max_accuracy_drop
        and v["in_context"]["other_positions"]["loss"]
        <= baseline["in_context"]["other_positions"]["loss"] * (1 + max_loss_rise)]
  return max(ok, key=lambda v: v["questions"]["accuracy"], default=None)


def write_store(directory: str, key: bytes, model, params, task: probes.TaskConfig, *,
                site: str, facts: int, facts_seed: int) -> store_lib.Seal:
  """Process 1: a new store at `directory` holding a line per fact, sealed.

  Raises:
    ValueError: the store already holds lines.
  """
  chosen = make_facts(task.vocab_size, facts, facts_seed)
  with store_lib.MemoryLineStore.open(directory, key, key_dim=model.config.d_model,
                                      value_dim=task.vocab_size) as store:
    if len(store):
      raise ValueError(f"{directory} already holds {len(store)} lines; write to a new store")
    write_facts(store, model, params, task, chosen, site=site, seed=facts_seed)
    return store.seal()


def ask_store(directory: str, key: bytes, model, params, task: probes.TaskConfig, *, site: str,
              facts: int, facts_seed: int, docs: int, alphas, floors, k: int,
              progress: Callable[[str], None] = print) -> dict:
  """Process 2: verifies the store, chooses alpha and the floor on the validation stream
  (`choose`), and evaluates the test stream with that setting and without the store.

  Returns the JSON-ready result: every validation setting, the no-store baselines, how often the
  nearest line asks the same key (`site_match`), and the chosen setting's test scores (None if
  no setting kept the in-context documents).
  """
  verification.require_ok(directory, key)
  chosen_facts = make_facts(task.vocab_size, facts, facts_seed)

  def evaluate(bias, stream):
    common = dict(docs=docs, stream=stream, bias=bias, site=site)
    return {"questions": ask(model, params, task, chosen_facts, **common),
            "in_context": in_context(model, params, task, chosen_facts, **common),
            "conflicting": in_context(model, params, task, chosen_facts, conflicting=True,
                                      **common)}

  def with_store(floor, alpha, stream):
    with store_lib.MemoryLineStore.open(directory, key,
                                        config={"similarity_floor": floor}) as store:
      bias = store_bias.StoreBias(store, alpha=alpha, k=k, vocab_size=task.vocab_size)
      return evaluate(bias, stream)

  baseline = evaluate(None, VALIDATION)
  tried = []
  for floor, alpha in itertools.product(floors, alphas):
    tried.append({"alpha": alpha, "similarity_floor": floor,
                  **with_store(floor, alpha, VALIDATION)})
    v = tried[-1]
    progress(f"validation alpha {alpha:g} floor {floor:g}: questions "
             f"{v['questions']['accuracy']:.4f}, in-context "
             f"{v['in_context']['queries']['accuracy']:.4f}, other loss "
             f"{v['in_context']['other_positions']['loss']:.4f}")
  best = choose(tried, baseline)
  result = {"site": site, "facts": facts, "k": k, "validation": tried,
            "no_store": {"validation": baseline, "test": evaluate(None, TEST)}}
  with store_lib.MemoryLineStore.open(directory, key) as store:
    result["site_match"] = site_match(store, model, params, task, chosen_facts, site=site,
                                      docs=docs, stream=TEST)
    result["lines"] = len(store)
  result["chosen"] = None if best is None else {
      "alpha": best["alpha"], "similarity_floor": best["similarity_floor"],
      "test": with_store(best["similarity_floor"], best["alpha"], TEST)}
  return result
