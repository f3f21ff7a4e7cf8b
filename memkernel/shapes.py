"""The shape-letter key, used in names (`x_BTD`) and annotations throughout the library.

  B batch            T tokens (or chunk)      D d_model            R roots
  W conv taps        L leaf size (16)         N leaf capacity      S tree nodes (2N - 1)
  H route heads      E read head dim          P route key dim      K beam width
  C candidates       V vocabulary             F Fenwick candidates (num_levels)
  A answer leaves    Q sampled queries

The attention peers use N for heads and H for the head width within their own module
(`memkernel.peers.attention`).
"""
