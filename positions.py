"""
How a model knows where its tokens are: the position schemes GPTConfig.positions chooses from.

  learned  GPT-2's table of one learned vector per position, added to the token embeddings (model.py holds it)
  rope     rotary positions (Su et al. 2021, RoFormer, section 3.4.2): queries and keys are rotated by an angle
           proportional to their position, so q.k depends on the content and on the distance i - j only
  alibi    a distance bias on the scores (Press et al. 2022, "Train Short, Test Long", section 3): head h adds
           -m_h * (i - j) to the logit of query i and key j; keys and values stay untouched

The functions take absolute positions as tensors, so a cache that evicts entries can pass each kept entry's
original position and stay exact. Both the model and the attention files import this file; it imports none.
"""

import math

import torch

POSITIONS = ('learned', 'rope', 'alibi')
ROPE_BASE = 10000.0  # RoFormer's theta base (section 3.2.2)


def rope(x, positions):
    """Rotate x (..., T, D) by its positions (T,) or (B, T): pairs (x[2i], x[2i+1]) turn by position * base^(-2i/D)
    (RoFormer eq. 34). D must be even. Computed in x's dtype at least fp32, returned in x's dtype."""
    D = x.size(-1)
    if D % 2:
        raise ValueError(f"rotary positions need an even head size, got {D}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    freqs = ROPE_BASE ** (-torch.arange(0, D, 2, device=x.device, dtype=dtype) / D)  # (D/2,)
    angles = positions.to(dtype)[..., None] * freqs  # (T, D/2) or (B, T, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D/2): the same angles for every head
    cos, sin = angles.cos(), angles.sin()
    pairs = x.to(dtype).unflatten(-1, (D // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def alibi_slopes(n_head, device=None, dtype=torch.float32):
    """ALiBi's head slopes m_h, a geometric sequence starting at 2^(-8/n) with that ratio (Press et al., section 3).
    For a head count that is not a power of two: the slopes of the next lower power of two, then every other slope
    of the next higher one, as the paper's code does."""
    def powers_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (h + 1) for h in range(n)]
    lower = 2 ** math.floor(math.log2(n_head))
    slopes = powers_of_two(lower)
    if lower < n_head:
        slopes += powers_of_two(2 * lower)[0::2][:n_head - lower]
    return torch.tensor(slopes, device=device, dtype=dtype)


def alibi_bias(slopes, query_positions, key_positions):
    """-m_h * (i - j) for every head, query i and key j: (H, Tq, Tk), or (B, H, Tq, Tk) when key_positions is
    (B, Tk) (a cache whose entries keep their own positions). Future keys get a positive bias: mask them apart."""
    if key_positions.dim() == 1:
        distance = query_positions[:, None] - key_positions[None, :]  # (Tq, Tk)
        return -slopes[:, None, None] * distance.to(slopes.dtype)
    distance = query_positions[None, :, None] - key_positions[:, None, :]  # (B, Tq, Tk)
    return -slopes[None, :, None, None] * distance[:, None].to(slopes.dtype)


def causal_mask(t_q, t_k, device):
    """Which keys each query sees (t_q, t_k), boolean: the last t_q of t_k positions see themselves and every
    earlier position, never a later one."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)
