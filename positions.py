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


def rope_angles(positions, head_size, dtype=torch.float32):
    """cos and sin of the rotation of each position (T,) or (B, T): (T, D) or (B, 1, T, D), in dtype. Frequency i
    is base^(-2i/D) (RoFormer eq. 15), written twice: dims i and i + D/2 turn together (rope's layout)."""
    if head_size % 2:
        raise ValueError(f"rotary positions need an even head size, got {head_size}")
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_size, 2, device=positions.device, dtype=dtype) / head_size)
    angles = positions.to(dtype)[..., None] * inv_freq  # (T, D/2) or (B, T, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D/2): the same angles for every head
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rope(x, positions=None, angles=None):
    """Rotate x (..., T, D) by the positions (T,) or (B, T) of its rows, or by their rope_angles given once for
    every layer. The pairs (x[i], x[i + D/2]) turn by position * base^(-2i/D) (RoFormer eq. 34, in the
    rotate-half layout of GPT-NeoX: the same rotation with the dims of each pair half a head apart). Computed in
    x's dtype, the angles in fp32 at least."""
    if angles is None:
        angles = rope_angles(positions, x.size(-1), torch.promote_types(x.dtype, torch.float32))
    cos, sin = (t.to(x.dtype) for t in angles)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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
