"""Reference attention models the memory kernel is compared with: dense and sliding window."""

from memkernel.peers.model import (DenseTransformer, PeerConfig, SlidingWindowTransformer,
                                   build_peer, peer_flops)

__all__ = ["DenseTransformer", "PeerConfig", "SlidingWindowTransformer", "build_peer",
           "peer_flops"]
