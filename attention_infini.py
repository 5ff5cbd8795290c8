"""
Infini-attention (Munkhdalai, Faruqui, Gopal 2024, "Leave No Context Behind", arXiv 2404.07143).

The input is cut into segments of N = segment_len tokens. In every layer and head, each segment s does
ordinary causal softmax attention inside itself, and also reads a compressive memory, one d x d matrix M and
one d-vector z per head, that sums up all earlier segments; then the segment is written into the memory.
Per layer, per head, for segment s with queries, keys, values Q, K, V (N x d), sigma(x) = ELU(x) + 1:

    A_dot = softmax(rope(Q) rope(K)^T / sqrt(d) + causal mask) V      local attention     (paper eq. 1-2)
    A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})                      memory read         (eq. 3)
    linear: M_s = M_{s-1} + sigma(K)^T V                               memory update       (eq. 4)
    delta:  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))         (eq. 5)
            z_s = z_{s-1} + sum_t sigma(K_t)                           normaliser (both rules, eq. 4)
    A     = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot            gate, beta per head (eq. 6)

then the heads are concatenated and go through c_proj (eq. 7); all of it is the paper's section 2.1. M_0 = 0
and z_0 = 0: the first segment's read is 0/0, which we define as 0 (the denominator is clamped, so the gradient
stays finite too). Positions: RoPE by the position inside the segment, for the local attention only; the memory
sees un-rotated sigma(Q), sigma(K) (the paper's memory is position-free), so nothing depends on absolute
positions and the model streams forever. Gradients flow through M and z across the segments of a training
sequence. M, z and their products are fp32 (fp64 for fp64 inputs), autocast or not: they sum many segments.

Options beyond the paper (feature_scale, memory_boost, read_norm, memory_read) are GPTConfig fields whose
defaults are the paper; they are explained under their own heading below, and docs/infini.md measures them.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as nnf  # F is selective's mask (attention_selective.py)

from attention import CausalSelfAttention, causal_mask, repository_kernels, rope, rope_angles

kernels = repository_kernels()  # the memory kernel of kernels.py (CUDA)
UPDATES = ('linear', 'delta')
READ_NORMS = ('z', 'rms')  # the paper's sigma(q) z (eq. 3); that, then unit RMS per head (beyond the paper)
MEMORY_READS = ('on', 'off', 'local')  # the paper's gate (eq. 6), A_mem = 0, the gate forced to 0 (beyond the paper)


# ---------------------------------------------------------------------------------------------------------
# The reference: a loop over segments, the paper's equations in order.

def infini_attention(q, k, v, beta, segment_len, update='delta', M=None, z=None, dropout_p=0.0, angles=None,
                     beyond=None):
    """Infini-attention over a sequence starting at a segment boundary, the paper's eq. 1-6 segment by segment.

        q     (B, H, Tq, d)  queries (un-rotated) of the LAST Tq of the T positions of k and v
        k, v  (B, H, T, d)   keys (un-rotated) and values; position 0 of k is the first token of a segment
        beta  (H,)           gate logits
        M, z  (B, H, d, d), (B, H, d)   memory after the segments before k (None: empty)
        angles                          segment_angles(segment_len, d, q): RoPE's cos and sin of the positions
                                        inside a segment, which the model computes once per forward (None: here)
        beyond                          Beyond(...): the options beyond the paper (their heading below); None is
                                        the paper
        returns y (B, H, Tq, d), and M, z after writing every COMPLETE segment of k, v (a trailing partial
        segment is not written: the cache keeps its keys and values until it is full).
    A training forward is Tq = T, M = None.
    The streaming cache calls the same function with k, v = [this layer's cached partial segment, new tokens].
    `fast_infini_attention` below has the same signature and results (without dropout and memory_boost); it runs
    the memory as one Triton kernel (kernels.infini_memory) and is used on CUDA when `kernels.infini_available(q)`
    says so and config.use_kernels is set.
    """
    B, H, T, D = k.shape
    offset = T - q.size(-2)  # position (in k) of the first query
    beyond = beyond or PAPER
    if M is None:
        M = k.new_zeros(B, H, D, D, dtype=memory_dtype(k))
        z = k.new_zeros(B, H, D, dtype=memory_dtype(k))
    ys = []
    for s in range(0, T, segment_len):
        e = min(s + segment_len, T)
        ks, vs = k[:, :, s:e], v[:, :, s:e]
        if e > offset:  # this segment has queries
            first = max(s, offset)
            qs = q[:, :, first - offset:e - offset]
            a_dot = local_attention(qs, ks, vs, dropout_p, angles)  # eq. 2
            with no_autocast(q):
                sq = sigma(qs.to(M.dtype), beyond.feature_scale)
                a_mem = normalize_read(read_memory(sq, M, z), beyond.read_norm).to(a_dot.dtype)  # eq. 3, M_{s-1}
            ys.append(gated_output(a_mem, a_dot, beta, beyond.memory_read).to(q.dtype))  # eq. 6 (fp32 gate: q's dtype)
        if e - s == segment_len:  # a complete segment goes into the memory; a partial one waits in the cache
            repeats = beyond.first_segment_repeats if s == 0 else None  # memory_boost (training only)
            with no_autocast(q):
                sk = sigma(ks.to(M.dtype), beyond.feature_scale)
                M, z = write_memory(sk, vs.to(M.dtype), M, z, update, repeats)  # eq. 4 or 5
    return torch.cat(ys, dim=2), M, z


def local_attention(q, k, v, dropout_p, angles=None):
    """A_dot of one segment: k, v are its first tk positions, q the last tq of them; RoPE by the position inside
    the segment. angles: segment_angles of at least tk positions (None: computed here)."""
    tq, tk = q.size(-2), k.size(-2)
    cos, sin = segment_angles(tk, k.size(-1), k) if angles is None else angles
    q, k = rope(q, angles=(cos[tk - tq:tk], sin[tk - tq:tk])), rope(k, angles=(cos[:tk], sin[:tk]))
    if tq == tk:
        return nnf.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = None if tq == 1 else causal_mask(tq, tk, q.device)
    return nnf.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def sigma(x, feature_scale=1.0):
    """ELU + 1, a positive feature map, so sigma(Q) z > 0 once anything is stored (the paper's choice, scale 1).
    feature_scale > 1 sharpens it (beyond the paper, below)."""
    return nnf.elu(x * feature_scale if feature_scale != 1.0 else x) + 1


def read_memory(sq, M, z):
    """A_mem = sigma(Q) M / (sigma(Q) z), row-wise (eq. 3). An empty memory (z = 0) reads 0, not 0/0."""
    return (sq @ M) / (sq @ z.unsqueeze(-1)).clamp_min(1e-6)


def write_memory(sk, v, M, z, update, repeats=None):
    """Write one segment: sk = sigma(K), v = V (B, H, N, d) into M (B, H, d, d) and z (B, H, d) (eq. 4, 5).
    repeats (B,) or None: memory_boost's draw, the write counts that many times per sequence (not in the paper)."""
    if update == 'delta':
        v = v - read_memory(sk, M, z)  # store only what the memory does not already return for these keys
    if repeats is not None:
        sk = sk * repeats.view(-1, 1, 1, 1)  # scales both sigma(K)^T V and sum_t sigma(K_t)
    return M + sk.transpose(-1, -2) @ v, z + sk.sum(dim=-2)


def gated_output(a_mem, a_dot, beta, memory_read='on'):
    """A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot per head (eq. 6), or an ablation (MEMORY_READS)."""
    if memory_read == 'local':
        return a_dot
    gate = torch.sigmoid(beta).view(1, -1, 1, 1)
    if memory_read == 'off':
        return (1 - gate) * a_dot
    return gate * a_mem + (1 - gate) * a_dot


def segment_angles(n, head_size, like):
    """cos and sin of RoPE at the positions 0..n-1 inside a segment (attention.rope_angles), at least fp32: every
    segment turns its queries and keys by the same ones, so the model computes them once per forward."""
    return rope_angles(torch.arange(n, device=like.device), head_size, memory_dtype(like))


def memory_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def no_autocast(x):
    """The memory's products stay in fp32 under autocast too (bf16 training): M sums every segment."""
    return torch.autocast(x.device.type, enabled=False)


def memory_over_segments(q, k, v, segment_len, update='delta', M=None, z=None):
    """The memory alone, the plain reference of kernels.infini_memory: every query's read A_mem (eq. 3) before its
    segment is written, and M, z after every complete segment of k, v is (eq. 4, 5). q are the last Tq of the T
    positions of k and v, as in infini_attention (which runs the same reads and writes, with the local attention
    between them); sigma here is the paper's (feature_scale 1: the kernel's callers scale q and k first)."""
    B, H, T, D = k.shape
    offset = T - q.size(-2)
    if M is None:
        M = k.new_zeros(B, H, D, D, dtype=memory_dtype(k))
        z = k.new_zeros(B, H, D, dtype=memory_dtype(k))
    reads = []
    for s in range(0, T, segment_len):
        e = min(s + segment_len, T)
        if e > offset:  # this segment's queries read the memory of the segments before it
            reads.append(read_memory(sigma(q[:, :, max(s, offset) - offset:e - offset].to(M.dtype)), M, z))
        if e - s == segment_len:  # a complete segment is written; a partial one waits
            M, z = write_memory(sigma(k[:, :, s:e].to(M.dtype)), v[:, :, s:e].to(M.dtype), M, z, update)
    return torch.cat(reads, dim=2), M, z


def memory_weights(sq, sk):
    """How much each stored token weighs in a read: w_j = sigma(q).sigma(k_j) / sum_i sigma(q).sigma(k_i).

    sq (..., Tq, d) are sigma(queries), sk (..., Tk, d) sigma of every key written so far; returns (..., Tq, Tk),
    rows summing to 1. The denominator is eq. 3's sigma(q) z exactly. Under the linear rule the read is
    A_mem = sum_j w_j v_j, an average of the stored values (tested); under the delta rule the same weights fall
    on what each token wrote, its value minus what the memory already returned for its key. docs/infini.md
    measures the share of these weights that falls on a passkey's tokens, by input length."""
    scores = sq @ sk.transpose(-1, -2)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-6)


# ---------------------------------------------------------------------------------------------------------
# Beyond the paper: four options (GPTConfig fields; each default is the paper). docs/infini.md measures what they
# do on passkey retrieval.
#
# feature_scale   sigma(x) = ELU(feature_scale * x) + 1. A read is an average of everything stored, weighted
#                 by sigma(q).sigma(k_j) (memory_weights below). With the paper's sigma those weights are
#                 flat, so on inputs longer than training the filler's share grows and drowns the needle.
#                 A larger scale makes the weights sharper (4 is what docs/infini.md uses).
# memory_boost    training only: the first segment's write into M and z counts 1 + U(0, memory_boost) times,
#                 drawn per sequence (and layer), as if that text had been repeated. Training inputs are
#                 short, so the memory only ever holds a few segments; the boost shows the model memories as
#                 crowded as a long input's, and the model must learn keys that still stand out.
# read_norm       'z' divides the read by sigma(q) z (eq. 3). 'rms' then scales each head's read to unit RMS over
#                 its d features. Why: the read is share * (what the needle wrote) + (what the filler wrote), and
#                 filler writes nearly cancel under the delta rule, so the read shrinks with the needle's share
#                 as the input grows, while its direction holds (docs/infini.md measures both). With 'rms' the
#                 read keeps its training-time size. The delta rule's own read (eq. 5) stays eq. 3.
# memory_read     'on' (eq. 6), or an ablation: 'off' sets A_mem = 0 and keeps the gate, so a head outputs
#                 (1 - sigmoid(beta)) A_dot; 'local' forces the gate to 0, so a head outputs A_dot alone.
#                 'off' removes exactly what the memory adds; 'local' keeps each head's output at full
#                 scale. Neither is what the model was trained with; a model trained with 'local' is the
#                 fair control (it has learned to do without memory).

@dataclass(frozen=True)
class Beyond:
    """The options beyond the paper that the reference and the fast path take, each at the paper's value by default.
    first_segment_repeats (B,) is memory_boost's draw for one training batch."""
    feature_scale: float = 1.0
    memory_read: str = 'on'
    read_norm: str = 'z'
    first_segment_repeats: torch.Tensor = None


PAPER = Beyond()


def normalize_read(a_mem, read_norm='z'):
    """The read as eq. 3 gives it ('z'), or scaled to unit RMS over its features ('rms', not in the paper). An empty
    memory still reads 0."""
    if read_norm == 'z':
        return a_mem
    return a_mem * torch.rsqrt(a_mem.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------------
# The fast path (CUDA): the same numbers without the Python loop over segments. The memory (eq. 3-5) is one
# Triton kernel (kernels.infini_memory); the local attention (eq. 1-2) of every segment is one SDPA call.

SDPA_MAX_HEADS = 65535  # CUDA caps a grid's y and z axes there, where SDPA's kernels put batch and heads


def causal_sdpa(q, k, v, max_heads=SDPA_MAX_HEADS):
    """Causal SDPA of (B, H, N, D) tensors, any number of heads H: SDPA's CUDA kernels put the heads on a grid axis
    of at most SDPA_MAX_HEADS blocks and fail past it, which folded segments reach (T > 349k at H=12, N=64). So
    past max_heads heads, SDPA runs on slices of max_heads heads."""
    if q.size(1) <= max_heads:
        return nnf.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch.cat([nnf.scaled_dot_product_attention(q[:, h:h + max_heads], k[:, h:h + max_heads],
                                                       v[:, h:h + max_heads], is_causal=True)
                      for h in range(0, q.size(1), max_heads)], dim=1)


def segment_attention(q, k, v, segment_len, angles=None):
    """A_dot (eq. 1-2) of every segment in one SDPA call: pad to whole segments and fold them into the heads.

    q are the last Tq of k's T positions (padded at the front to T: those rows are dropped); the zero keys padded
    at the end are in every real query's future, so the causal mask hides them. RoPE by position in the segment:
    angles are segment_angles(segment_len, ...) (None: computed here).
    """
    B, H, T, D = k.shape
    n_segments = -(-T // segment_len)
    offset, tail = T - q.size(2), n_segments * segment_len - T
    fold = lambda x: x.reshape(B, H * n_segments, segment_len, D)  # noqa: E731
    angles = segment_angles(segment_len, D, k) if angles is None else angles  # the same for every segment
    q = rope(fold(nnf.pad(q, (0, 0, offset, tail))), angles=angles)
    k = rope(fold(nnf.pad(k, (0, 0, 0, tail))), angles=angles)
    y = causal_sdpa(q, k, fold(nnf.pad(v, (0, 0, 0, tail))))
    return y.reshape(B, H, n_segments * segment_len, D)[:, :, offset:T]  # fp32 SDPA gives a (B, N, H, D) layout


def fast_infini_attention(q, k, v, beta, segment_len, update='delta', M=None, z=None, angles=None, beyond=None,
                          block_t=None):
    """infini_attention without dropout or memory_boost, through the Triton memory kernel: same results.
    block_t: rows of a segment per step of the kernel (default kernels.BLOCK_T; the tests make it small)."""
    # the kernel applies the paper's sigma to what it is given: sigma(scale * x) is the kernel's sigma of
    # scale * x, so the memory gets scaled queries and keys, the local attention the model's own
    beyond = beyond or PAPER
    scale = beyond.feature_scale
    qm, km = (q, k) if scale == 1.0 else (q * scale, k * scale)
    a_mem, M, z = kernels.infini_memory(qm, km, v, M, z, segment_len, update, block_t or kernels.BLOCK_T)  # eq. 3-5
    a_mem = normalize_read(a_mem, beyond.read_norm)
    a_dot = segment_attention(q, k, v, segment_len, angles)  # eq. 1-2
    return gated_output(a_mem.to(a_dot.dtype), a_dot, beta, beyond.memory_read).to(q.dtype), M, z  # eq. 6


# ---------------------------------------------------------------------------------------------------------
# The module.

# The gate logit per head at the start from a causal model's weights (init_from_causal: GPT-2's, gpt2.py).
# sigmoid(-3) = 0.05: each head starts as GPT-2's attention inside its segment, with 5% of the memory read mixed
# in. We start near segment-local GPT-2, not at the even mix (beta = 0) a model from scratch starts at, because at
# 0.5 every head's output is halved on the first segment (the memory is empty there) and half noise after it: that
# undoes GPT-2 before the memory has learned anything. The paper's continual pre-training does not say how it
# starts the gates. Adam moves beta by about the learning rate times gate_lr_mult per step whatever the sigmoid's
# slope, so the gates still open where the memory helps.
CAUSAL_GATE_LOGIT = -3.0


class InfiniAttention(CausalSelfAttention):

    def __init__(self, config, layer_idx):
        if config.memory_update not in UPDATES:
            raise ValueError(f"unknown memory_update '{config.memory_update}', choose one of: {', '.join(UPDATES)}")
        if config.segment_len < 1:
            raise ValueError(f"segment_len={config.segment_len} must be a positive number of tokens")
        if (config.n_embd // config.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size; n_embd/n_head = {config.n_embd // config.n_head}")
        if config.memory_read not in MEMORY_READS:
            raise ValueError(f"unknown memory_read '{config.memory_read}', choose one of: {', '.join(MEMORY_READS)}")
        if not config.feature_scale > 0:
            raise ValueError(f"feature_scale={config.feature_scale} must be positive (1 is the paper's sigma)")
        if config.read_norm not in READ_NORMS:
            raise ValueError(f"unknown read_norm '{config.read_norm}', choose one of: {', '.join(READ_NORMS)}")
        if not config.memory_boost >= 0:
            raise ValueError(f"memory_boost={config.memory_boost} must be 0 (off) or positive")
        super().__init__(config, layer_idx)  # c_attn and c_proj as in the causal attention
        self.n_embd = config.n_embd
        self.segment_len = config.segment_len
        self.update = config.memory_update
        self.feature_scale = config.feature_scale
        self.memory_boost = config.memory_boost
        self.memory_read = config.memory_read
        self.read_norm = config.read_norm
        self.use_kernels = config.use_kernels
        # the gate, one logit per head, starts at an even mix; a vector, so it is never weight-decayed, and it
        # learns faster than the rest (the Hugging Face reproduction found the gates did not move otherwise)
        self.beta = nn.Parameter(torch.zeros(config.n_head))
        self.beta.lr_mult = config.gate_lr_mult

    def qkv(self, x):
        """Queries, keys and values (B, H, T, d), un-rotated: RoPE is applied inside each segment."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        return (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def forward(self, x, x0, cache=None, memory_read=None, rotary=None):
        """memory_read: this call's read ('on', 'off', 'local', or one per layer) instead of the config's.
        rotary: segment_angles(segment_len, ...), computed once by the model for every layer (None: here)."""
        B, T, C = x.size()
        q, k, v = self.qkv(x)
        read = self.read_of(memory_read)
        if cache is None:
            y, _, _ = self.attend(q, k, v, read=read, angles=rotary)
        else:
            k, v, M, z = cache.read(self.layer_idx, k, v)  # the cached partial segment, then the new tokens
            y, M, z = self.attend(q, k, v, M, z, read, rotary)
            cache.write(self.layer_idx, k, v, M, z)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, M=None, z=None, read='on', angles=None):
        dropout_p = self.dropout if self.training else 0.0
        repeats = None
        if self.training and self.memory_boost > 0 and M is None:  # a training sequence: boost its first write
            repeats = 1 + self.memory_boost * torch.rand(q.size(0), device=q.device, dtype=memory_dtype(q))
        beyond = Beyond(self.feature_scale, read, self.read_norm, repeats)
        if (self.use_kernels and dropout_p == 0.0 and repeats is None
                and kernels.infini_available(q)):
            return fast_infini_attention(q, k, v, self.beta, self.segment_len, self.update, M, z, angles, beyond)
        return infini_attention(q, k, v, self.beta, self.segment_len, self.update, M, z, dropout_p, angles, beyond)

    def read_of(self, memory_read):
        """This layer's memory read: the config's, or a call's (one for every layer, or a list of one per layer)."""
        if memory_read is None:
            return self.memory_read
        read = memory_read if isinstance(memory_read, str) else memory_read[self.layer_idx]
        if read not in MEMORY_READS:
            raise ValueError(f"unknown memory_read '{read}', choose one of: {', '.join(MEMORY_READS)}")
        return read

    def log_stats(self, x):
        """The gates sigmoid(beta), one per head, for train.py's log: how much each head reads from memory.
        x (this layer's input) is not needed: the gates are weights."""
        return {f'gate{h}': g for h, g in enumerate(torch.sigmoid(self.beta.detach().float()).tolist())}

    # -----------------------------------------------------------------------------------------------------
    # What the model and the tools ask (attention.py), where Infini-attention differs from the causal one

    position_schemes = ('rope', 'learned')
    refused_because = ("Infini-attention always brings its own positions, RoPE inside each segment with a "
                       "position-free memory; 'rope' and 'learned' both leave it so")
    own_head_size = False  # the memory is d x d per head of n_embd / n_head
    streams = True  # no context limit: the GPT has no position table and never crops
    own_fields = ('segment_len', 'memory_update', 'gate_lr_mult', 'feature_scale', 'memory_boost', 'memory_read',
                  'read_norm')
    call_options = ('memory_read',)  # an ablation of the read for one forward (forward below)
    maps_note = ' (local, in segments)'

    @staticmethod
    def new_cache(config, batch_size, max_len=None):
        return InfiniCache(config, batch_size, max_len)

    @staticmethod
    def keys_per_query(config):
        """A query's softmax sees its segment; the memory's d x d products are left out of the count."""
        return min(config.block_size, config.segment_len)

    @staticmethod
    def rotary_positions(config, start, t):
        """RoPE by the position inside a segment: every segment turns by the angles of 0..segment_len-1."""
        return range(config.segment_len)

    def init_from_causal(self, block, gate_logit=CAUSAL_GATE_LOGIT):
        """The gates start near the causal model's attention inside each segment (CAUSAL_GATE_LOGIT)."""
        nn.init.constant_(self.beta, gate_logit)

    @staticmethod
    def training_problem(config):
        if config.segment_len > config.block_size:
            return (f"segment_len={config.segment_len} is longer than block_size={config.block_size}: every "
                    f"training window would fit in one segment and the memory would never train")
        return ''

    def maps(self, x, x0):
        """The local softmax weights of each segment (eq. 2), the gates, and the share of each token's output read
        from memory. The reference at gate 1 (beta = +inf) returns A_mem alone (eq. 3), at gate 0 A_dot alone
        (eq. 2); the output mixes them linearly (eq. 6), so the share of each in it can be measured."""
        q, k, v = self.qkv(x)

        def part(logit):
            return infini_attention(q, k, v, torch.full_like(self.beta, logit), self.segment_len, self.update,
                                    beyond=Beyond(self.feature_scale, read_norm=self.read_norm))[0]
        a_mem, a_dot = part(float('inf')), part(float('-inf'))
        mem = gated_output(a_mem, torch.zeros_like(a_dot), self.beta, self.memory_read)
        loc = gated_output(torch.zeros_like(a_mem), a_dot, self.beta, self.memory_read)
        share = mem.norm(dim=-1) / (mem.norm(dim=-1) + loc.norm(dim=-1)).clamp_min(1e-12)
        T, N = q.size(-2), self.segment_len
        att = torch.zeros(*q.shape[:2], T, T, dtype=v.dtype, device=v.device)
        for s in range(0, T, N):  # softmax(...) @ I is the softmax itself: the weights of each segment
            e = min(s + N, T)
            eye = torch.eye(e - s, dtype=v.dtype, device=v.device).expand(*v.shape[:2], e - s, e - s)
            att[..., s:e, s:e] = local_attention(q[..., s:e, :], k[..., s:e, :], eye, 0.0)
        return dict(att=att, y=mem + loc, gate=torch.sigmoid(self.beta.float())[None], memory_share=share)


def gate_values(model):
    """sigmoid(beta) of every layer and head, (n_layer, n_head): the share of each head's output read from memory."""
    return torch.stack([torch.sigmoid(block.attn.beta.detach().float()) for block in model.transformer.h])


# ---------------------------------------------------------------------------------------------------------
# The streaming cache: per layer the memory (M, z) and the keys and values of the current, unfinished segment.

class InfiniCache:
    """Bounded inference state: n_layer * H * (d*d + d) memory numbers plus at most segment_len keys and values
    per layer, whatever the number of tokens read. max_len is accepted for the interface and ignored."""
    last_token_only = False

    def __init__(self, config, batch_size, max_len=None):
        H, D = config.n_head, config.n_embd // config.n_head
        self.segment_len = config.segment_len
        self.kv_shape = (config.n_layer, batch_size, H, config.segment_len, D)
        self.M_shape = (config.n_layer, batch_size, H, D, D)
        self.k = self.v = self.M = self.z = None  # allocated on first use, in the dtype the model computes in
        self.length = 0  # tokens seen; GPT.forward advances it after all layers ran

    def read(self, layer, k, v):
        """This layer's held keys/values with the new k, v appended (B, H, held + T, d), and its M, z."""
        if self.k is None:
            self.k = torch.zeros(self.kv_shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.kv_shape, dtype=v.dtype, device=v.device)
            self.M = torch.zeros(self.M_shape, dtype=memory_dtype(k), device=k.device)
            self.z = torch.zeros(self.M_shape[:-1], dtype=memory_dtype(k), device=k.device)
        held = self.length % self.segment_len  # complete segments were written into M as soon as they filled
        k = torch.cat((self.k[layer, :, :, :held], k), dim=2)
        v = torch.cat((self.v[layer, :, :, :held], v), dim=2)
        return k, v, self.M[layer], self.z[layer]

    def write(self, layer, k, v, M, z):
        """Keep M, z and the keys/values of the unfinished segment at the end of k, v."""
        rest = k.size(2) % self.segment_len
        self.k[layer, :, :, :rest] = k[:, :, k.size(2) - rest:]
        self.v[layer, :, :, :rest] = v[:, :, v.size(2) - rest:]
        self.M[layer] = M
        self.z[layer] = z

    def nbytes(self):
        return 0 if self.k is None else sum(t.nbytes for t in (self.k, self.v, self.M, self.z))
