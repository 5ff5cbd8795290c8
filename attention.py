"""
Causal self-attention, the baseline, and the base class of every other attention in this repository.

    y = softmax(q k^T / sqrt(d) + causal mask) v        (Vaswani et al. 2017, eq. 1), per head

An attention is an nn.Module called as attention(x, x0, cache=None, **options) -> y:
  x    (B, T, C) this block's input after ln_1: the queries come from it
  x0   (B, T0, C) the initial token states (the input of block 0); InAttention makes its keys from them
  cache=None: a training forward over the whole input. With a cache: x holds the tokens that follow the
       cache.length tokens already cached (only the last one when cache.last_token_only); the attention appends
       them to its part of the cache (prefill and one-step decode).
  options: the settings of one call (call_options below), passed through GPT.forward(idx, targets, cache, **options)

A new attention subclasses CausalSelfAttention and states only what differs: usually forward, and the class
attributes at the bottom that are not true of it (docs/add_attention.md walks through one). Below the class: its
K/V cache, the position schemes every attention draws on (learned, rotary, ALiBi), and the loader of kernels.py.
"""

import importlib.util
import math
import os
import sys

import torch
import torch.nn as nn
from torch.nn import functional as nnf  # F is selective's mask (attention_selective.py)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.width = config.n_head * config.head_size  # n_embd unless head_size says otherwise
        self.dropout = config.dropout
        self.positions = config.positions
        self.c_attn = nn.Linear(config.n_embd, 3 * self.width, bias=config.bias)
        self.c_proj = nn.Linear(self.width, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if self.positions == 'alibi':  # a buffer, so it follows the model's device and dtype; not saved
            self.register_buffer('slopes', alibi_slopes(config.n_head), persistent=False)

    def qkv(self, x, positions, rotary=None):
        """Queries, keys and values (B, H, T, D) of x (B, T, C), the tokens at these positions (T,); rotary: their
        rope angles if the model computed them already."""
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if self.positions == 'rope':  # keys are cached rotated: a key's rotation depends on its position only
            q, k = rope(q, positions, rotary), rope(k, positions, rotary)
        return q, k, v

    def forward(self, x, x0, cache=None, rotary=None):
        B, T, _ = x.size()
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + T, device=x.device)
        q, k, v = self.qkv(x, positions, rotary)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)
        if self.positions == 'alibi':  # the distance bias, with -inf on future keys, as one float mask
            y = nnf.scaled_dot_product_attention(q, k, v, attn_mask=self.alibi_mask(positions, k.size(2)).to(q.dtype),
                                                 dropout_p=dropout_p)
        elif cache is None or T == k.size(2):  # training, or prefill of an empty cache: no T x T mask in memory
            y = nnf.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            mask = None if T == 1 else causal_mask(T, k.size(2), x.device)
            y = nnf.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, self.width)
        return self.resid_dropout(self.c_proj(y))

    def alibi_mask(self, positions, n_keys):
        """ALiBi's distance bias of these queries over keys 0..n_keys-1, with -inf on future keys: (H, T, n_keys)."""
        bias = alibi_bias(self.slopes, positions, torch.arange(n_keys, device=positions.device))
        return bias.masked_fill(~causal_mask(positions.size(0), n_keys, positions.device), float('-inf'))

    # -----------------------------------------------------------------------------------------------------
    # What the model and the tools ask an attention. These are the baseline's answers; a subclass overrides the
    # ones that are not true of it, and the model never branches on an attention's name.

    position_schemes = ('rope', 'alibi', 'learned')  # the positions it takes, its default first (below)
    refused_because = ''     # why it refuses the other position schemes
    own_head_size = True     # it takes GPTConfig.head_size apart from n_embd / n_head
    streams = False          # no context limit: it brings its own positions, the model never crops (Infini)
    cache_options = ()       # the inference options its cache takes (selective's budget and evict)
    call_options = ()        # the options one forward takes; GPT.forward refuses any other
    maps_note = ''           # what its attention weights are over, in a few words ('' for plain tokens)
    own_fields = ()          # the GPTConfig fields only it reads (train.py notes them when another attention runs)

    @staticmethod
    def new_cache(config, batch_size, max_len):
        """Its inference cache for all layers together (an attention may share one across layers). A cache has
        .length (tokens seen), .nbytes() (bytes held) and .last_token_only (earlier tokens need not run through
        the blocks)."""
        return KVCache(config, batch_size, max_len)

    @staticmethod
    def keys_per_query(config):
        """The keys one query attends to in training: PaLM's T in the 12 L H Q T flops per token (estimate_mfu)."""
        return config.block_size

    @staticmethod
    def rotary_positions(config, start, t):
        """The positions whose RoPE angles GPT.forward computes once for every layer and passes as `rotary`, when
        t tokens follow `start` cached ones; None when it takes none."""
        return range(start, start + t) if config.positions == 'rope' else None

    def init_from_causal(self, block):
        """Set the parameters a causal model's weights lack, once they are loaded into its block (gpt2.py)."""

    @staticmethod
    def training_problem(config):
        """Why training with these settings would not work, or ''."""
        return ''

    def maps(self, x, x0):
        """What visualize.py shows: 'att' the attention weights (B, H, T, T) and 'y' the output before c_proj
        (B, H, T, D), which a test checks against forward; an attention may add its own (selective's F)."""
        positions = torch.arange(x.size(1), device=x.device)
        q, k, v = self.qkv(x, positions)
        scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
        if self.positions == 'alibi':
            scores = scores + self.alibi_mask(positions, k.size(2))
        else:
            scores = scores.masked_fill(~causal_mask(q.size(2), k.size(2), x.device), float('-inf'))
        att = torch.softmax(scores, dim=-1)
        return dict(att=att, y=att @ v)


class KVCache:
    """Keys and values of every layer for every token seen: 2 * n_layer * n_head * head_size numbers per token."""
    last_token_only = False

    def __init__(self, config, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        self.k = self.v = None  # allocated on first use, in the dtype the model computes in
        self.length = 0

    def append(self, layer, k, v):
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
        end = self.length + k.size(2)
        if end > self.shape[3]:
            raise ValueError(f"KV cache holds {self.shape[3]} tokens, {end} asked for")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def nbytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


# -----------------------------------------------------------------------------------------------------------
# Positions: how a model knows where its tokens are, the schemes GPTConfig.positions chooses from.
#
#   learned  GPT-2's table of one learned vector per position, added to the token embeddings (model.py holds it)
#   rope     rotary positions (Su et al. 2021, RoFormer, section 3.4.2): queries and keys are rotated by an angle
#            proportional to their position, so q.k depends on the content and on the distance i - j only
#   alibi    a distance bias on the scores (Press et al. 2022, "Train Short, Test Long", section 3): head h adds
#            -m_h * (i - j) to the logit of query i and key j; keys and values stay untouched
#
# The functions take absolute positions as tensors, so a cache that evicts entries can pass each kept entry's
# original position and stay exact.

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


# -----------------------------------------------------------------------------------------------------------
# The Triton kernels, for the attention files that have a fast path

def repository_kernels():
    """This repository's kernels.py. transformers installs a package also named `kernels`; in a process that
    imported it first, `import kernels` returns that one. So where the module named `kernels` is not ours, ours is
    loaded from its file under a name of its own."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels.py')
    module = sys.modules.get('kernels')
    if module is None:
        try:
            import kernels as module
        except Exception:  # another `kernels` that does not import here: ours is loaded below
            module = None
    if module is not None and os.path.abspath(getattr(module, '__file__', None) or '') == path:
        return module
    name = 'long_attention_gpt_kernels'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(sys.modules[name])
        except Exception as e:
            del sys.modules[name]
            raise SystemExit(f"cannot load {path} ({type(e).__name__}: {e})") from None
    return sys.modules[name]

