"""Reference attention models the memory kernel is compared with: dense and sliding window."""

from memkernel.peers.attention import (apply_rope, band_mask, banded_attention,
                                       blocked_causal_attention,
                                       blockwise_sliding_window_attention, causal_attention,
                                       masked_attention, sliding_window_blocking)
from memkernel.peers.config import PeerConfig
from memkernel.peers.memory import LayerCache, PeerMemory, init_memory
from memkernel.peers.model import DenseTransformer, SlidingWindowTransformer, build_peer

__all__ = ["DenseTransformer", "LayerCache", "PeerConfig", "PeerMemory",
           "SlidingWindowTransformer", "apply_rope", "band_mask", "banded_attention",
           "blocked_causal_attention", "blockwise_sliding_window_attention", "build_peer",
           "causal_attention", "init_memory", "masked_attention",
           "sliding_window_blocking"]
