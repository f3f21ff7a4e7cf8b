"""The seed's score: recency, similarity and novelty, blended into one weight per line."""

from __future__ import annotations

import numpy as np

from memkernel.store import config as config_lib


def recency(now_ns: int, ts_ns: np.ndarray, tau_s: float) -> np.ndarray:
  """r = exp(-(t_now - t_i) / tau); a line from the future (clock skew) counts as now."""
  age_s = np.maximum(now_ns - np.asarray(ts_ns, np.int64), 0) / 1e9
  return np.exp(-age_s / tau_s)


def weights(config: config_lib.StoreConfig, rec: np.ndarray, sim: np.ndarray,
            nov: np.ndarray) -> np.ndarray:
  """w = alpha r + beta s + gamma n."""
  return config.alpha * rec + config.beta * sim + config.gamma * nov


def novelty(unit_keys: np.ndarray, best_earlier: np.ndarray, block: int = 512) -> np.ndarray:
  """n_i = 1 - max_j cos(k_i, k_j) over earlier lines, for a batch appended in order.

  Args:
    unit_keys: [B, D] the batch's unit keys, in insert order.
    best_earlier: [B] each key's largest cosine to the lines already stored (-inf if none).
  Returns:
    [B] novelty; 1.0 for the first line of an empty store.
  """
  best = np.asarray(best_earlier, np.float64).copy()
  for start in range(0, len(unit_keys), block):   # blocks of rows: memory O(block * B)
    end = min(start + block, len(unit_keys))
    sims = unit_keys[start:end] @ unit_keys[:end].T
    later = np.arange(end)[None, :] >= np.arange(start, end)[:, None]
    sims[later] = -np.inf                 # only lines before i in the batch
    best[start:end] = np.maximum(best[start:end], sims.max(axis=1))
  return np.where(np.isfinite(best), 1.0 - best, 1.0)


def bias(weight: np.ndarray, values: np.ndarray) -> np.ndarray:
  """b = sum(w v) / sum(w) over the lines with w > 0 (a negative weight, possible only with a
  negative similarity floor, counts as 0); zeros where nothing matched."""
  weight = np.maximum(weight, 0.0)
  total = weight.sum(axis=-1, keepdims=True)
  mixed = np.einsum("...k,...kd->...d", weight, values)
  return np.where(total > 0, mixed / np.where(total > 0, total, 1.0), 0.0)
