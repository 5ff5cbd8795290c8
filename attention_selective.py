"""
Selective Attention (Leviathan, Kalman, Matias 2024, arXiv 2410.02703), with a prunable KV cache.

One head's attention logits vote on which earlier tokens later tokens no longer need; the votes add up over the
queries that follow, and the sum F is subtracted from the logits of every head before the softmax (Figure 2 of
the paper, "sketch implementation"). No new parameters. At inference F is one number per cached token that only
grows, so each layer can keep a fixed budget of entries and evict the most-masked one when it is over.

Config (GPTConfig fields used here):
  selection_head  the head whose logits make the votes (paper: head 0)
  selection_fn    'relu' (paper), 'softplus' or 'sigmoid': the nonlinearity turning logits into votes
  selection_loss  weight of the auxiliary memory loss (0 = off); it pushes the model to mask more
  use_kernels     use the fused Triton kernel of kernels.py where it applies (CUDA, relu, no budget, no alibi)
  positions       'learned' (the model's table), 'rope' (queries and keys rotated before the logits) or 'alibi'
                  (a distance bias added to every head's logits after F is subtracted). The votes always come
                  from the content logits q.k / sqrt(d), after any rotation and before any additive bias: the
                  selecting head votes on what a token says, not on how far away it is.

Inference-only options: the cache option budget=K (model.generate(..., budget=K)) prunes each layer to K entries
while decoding; the same option of a forward without a cache (model(idx, budget=K)) simulates that pruning in one
parallel forward (used to measure pruned val loss). The eviction rule is evict='F' (the most-masked entry goes,
the method's own) or evict='window' (the oldest goes: the first token plus a sliding window of the latest K-1, the
baseline that tells F's part from recency's), an option of both. Every cached entry keeps its absolute position,
so rope and alibi stay exact after evictions.
"""

import torch
from torch.nn.functional import dropout, pad, softplus

from attention import CausalSelfAttention, alibi_bias, causal_mask, repository_kernels, rope

kernels = repository_kernels()  # the fused kernel of kernels.py (CUDA)
SELECTION_FNS = {'relu': torch.relu, 'softplus': softplus, 'sigmoid': torch.sigmoid}
EVICTIONS = ('F', 'window')  # what a budgeted cache evicts: the most masked entry, or the oldest
MEMORY_TAU = 1.0  # tau of the memory loss: a token counts as gone once its F reaches tau
CHUNK = 1024  # queries a cached forward scores at a time: chunk x (held + chunk) logits, never T x T


# ---------------------------------------------------------------------------------------------------------
# The reference: the paper's equations in order (Figure 2), materialising T x T logits (fp32).

def selective_attention(q, k, v, selection_head=0, selection_fn='relu', budget=None, dropout_p=0.0, bias=None,
                        evict='F'):
    """Selective attention of q, k, v (B, H, T, D) -> (B, H, T, D). budget: simulate a pruned cache (or None)
    that evicts by `evict`. bias: added to every head's logits after selection (ALiBi's (H, T, T)), or None."""
    logits = causal_logits(q, k)
    # Figure 2: "select head 0": S comes from one head's scaled, causally masked logits; no new parameters
    F = accumulated_masks(selection_matrix(logits[:, selection_head], selection_fn))
    logits = logits - F[:, None]  # "apply selection": F is subtracted from every head, the selecting one too
    if bias is not None:
        logits = logits + bias
    if budget is not None and budget < q.size(-2):
        logits = logits.masked_fill(~eviction_schedule(F, budget, evict=evict)[:, None], float('-inf'))
    att = torch.softmax(logits, dim=-1)  # row i always keeps token 0 (F = 0 there): never all -inf
    if dropout_p > 0.0:
        att = dropout(att, dropout_p)
    return att.to(v.dtype) @ v


def causal_logits(q, k):
    """logits = q k^T / sqrt(d) with -inf on future keys: (B, H, T, T)."""
    T = q.size(-2)
    logits = scaled_logits(q, k)
    return logits.masked_fill(~causal_mask(T, T, q.device), float('-inf'))


def selection_matrix(logits, selection_fn='relu'):
    """S from one head's causal logits (B, T, T)."""
    positions = torch.arange(logits.size(-1), device=logits.device)
    return votes(logits, positions[:, None], positions[None, :], selection_fn)


def votes(logits, k, j, selection_fn='relu'):
    """S[k, j] = fn(logits[k, j]) for 0 < j < k, else 0: what query position k votes against key position j."""
    # Figure 2: "only positive selection" (ReLU); "do not mask self" and no future key (j < k);
    # "do not mask <BOS>" (j > 0: the first token stays visible, so no softmax row is ever all -inf)
    return torch.where((j < k) & (j > 0), SELECTION_FNS[selection_fn](logits), 0.0)


# Figure 2's caption warns that the sketch can "interfere with compiler optimizations": Inductor's scan codegen
# failed on this cumsum at some lengths (torch 2.11), so it stays eager
@torch.compiler.disable
def accumulated_masks(S):
    """F[i, j] = sum_{k < i} S[k, j]: Figure 2's "mask strictly in the future" (roll S down one query) + "accumulate".

    Exclusive: token k's votes take effect from query k+1 on. Shifting the inclusive cumsum (rather than
    subtracting S from it) keeps F exactly non-decreasing down each column in floating point.
    """
    return pad(S.cumsum(dim=-2)[..., :-1, :], (0, 0, 1, 0))


def scaled_logits(q, k):
    """logits = q k^T / sqrt(d) in fp32 (fp64 for fp64 inputs), every query against every key: (..., Tq, Tk)."""
    return (q @ k.transpose(-1, -2)).to(score_dtype(q)) * q.size(-1) ** -0.5


def score_dtype(x):
    """Logits, S and F are fp32 even for bf16/fp16 inputs: F sums many votes and is subtracted from logits."""
    return torch.promote_types(x.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Inference: pruning the cache under a budget (the paper's context pruning), replayed on F.

def eviction_schedule(F, budget, n_held=0, evict='F'):
    """keep[b, i, j]: whether token j is still in a `budget`-entry cache when query i runs.

    The cache's rule, replayed on F (B, queries, tokens): query i's token enters; if the cache is then over budget,
    the entry with the largest F[i] (the most masked) leaves, never token 0 or the new one, ties to the oldest
    (tokens are in position order and argmax returns the first maximum). F only grows, so an evicted token would
    never have come back. From an empty cache F is T x T; a cache already holding n_held tokens (the first n_held
    columns) gets query i's token as column n_held + i. evict='window' scores every entry 0: the oldest leaves.
    """
    F = eviction_scores(F, evict)
    B, T, n_tokens = F.shape
    held = torch.zeros(B, n_tokens, dtype=torch.bool, device=F.device)
    held[:, :n_held] = True
    keep = torch.zeros(B, T, n_tokens, dtype=torch.bool, device=F.device)
    rows = torch.arange(B, device=F.device)
    for i in range(T):
        new = n_held + i
        held[:, new] = True
        if new + 1 > budget:
            candidates = F[:, i].masked_fill(~held, float('-inf'))
            candidates[:, 0] = candidates[:, new] = float('-inf')
            held[rows, candidates.argmax(dim=1)] = False
        keep[:, i] = held
    return keep


def eviction_scores(F, evict):
    """What a budgeted cache evicts by: F itself, or all zeros for the sliding window (ties go to the oldest)."""
    return F if evict == 'F' else torch.zeros_like(F)


def check_evict(evict):
    if evict not in EVICTIONS:
        raise ValueError(f"unknown evict '{evict}', choose one of: {', '.join(EVICTIONS)}")
    return evict


# ---------------------------------------------------------------------------------------------------------
# The module.

class SelectiveAttention(CausalSelfAttention):

    def __init__(self, config, layer_idx):
        if not 0 <= config.selection_head < config.n_head:
            raise ValueError(f"selection_head={config.selection_head} must be a head index, 0..{config.n_head - 1}")
        if config.selection_fn not in SELECTION_FNS:
            raise ValueError(f"unknown selection_fn '{config.selection_fn}', choose one of: "
                             f"{', '.join(SELECTION_FNS)}")
        super().__init__(config, layer_idx)  # the causal attention's projections: no new parameters
        self.n_layer = config.n_layer
        self.selection_head = config.selection_head
        self.selection_fn = config.selection_fn
        self.selection_loss = config.selection_loss
        self.use_kernels = config.use_kernels
        self.aux_loss = 0.0

    def qkv(self, x, start, rotary=None):
        """Queries, keys and values (B, H, T, D) of x (B, T, C), the tokens at positions start.., rotated with rope
        (by rotary, their angles, when the model computed them already)."""
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if self.positions == 'rope':  # keys are cached rotated: a key's rotation depends on its position only
            positions = torch.arange(start, start + T, device=x.device)
            q, k = rope(q, positions, rotary), rope(k, positions, rotary)
        return q, k, v

    def forward(self, x, x0, cache=None, budget=None, evict='F', rotary=None):
        """budget, evict: without a cache, simulate a cache pruned to budget entries (an int, or one per layer) that
        evicts by evict, in one parallel forward (eviction_schedule). A cache has its own (SelectiveCache)."""
        B, T, C = x.size()
        q, k, v = self.qkv(x, 0 if cache is None else cache.length, rotary)
        self.aux_loss = 0.0
        if cache is None:
            y = self.attend(q, k, v, self.layer_budget(budget), evict=check_evict(evict))
            if self.training and self.selection_loss > 0:
                self.aux_loss = self.memory_loss(q, k)
        elif cache.length == 0 and cache.budget[self.layer_idx] is None:  # a prefill with nothing to evict
            y, f = self.attend(q, k, v, None, vote_totals=True)  # the fused kernel on a GPU
            cache.store(self.layer_idx, k, v, f)
        elif T == 1 and cache.length > 0:  # a decode step
            y = self.decode(cache, q, k, v, cache.length)
        else:  # a prefill under a budget, or several tokens after the cached ones: CHUNK at a time
            y = torch.cat([self.extend(cache, q[:, :, i:i + CHUNK], k[:, :, i:i + CHUNK], v[:, :, i:i + CHUNK],
                                       cache.length + i) for i in range(0, T, CHUNK)], dim=2)
        y = y.transpose(1, 2).contiguous().view(B, T, self.width)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, budget, vote_totals=False, evict='F'):
        """Selective attention of q, k, v; with vote_totals also S's column sums (B, T), the F a cache keeps."""
        dropout_p = self.dropout if self.training else 0.0
        if (self.use_kernels and budget is None and dropout_p == 0.0
                and self.selection_fn == 'relu' and self.positions != 'alibi' and kernels.selective_available(q)):
            return kernels.selective_attention(q, k, v, self.selection_head, vote_totals=vote_totals)
        positions = torch.arange(q.size(-2), device=q.device)
        y = selective_attention(q, k, v, self.selection_head, self.selection_fn, budget, dropout_p,
                                self.distance_bias(positions, positions), evict)
        return (y, self.vote_totals(q, k)) if vote_totals else y

    def layer_budget(self, budget):
        """This layer's entry of a budget given for one call: an int for every layer, or a list of one per layer."""
        return budget if budget is None or isinstance(budget, int) else budget[self.layer_idx]

    def distance_bias(self, query_positions, key_positions):
        """ALiBi's bias for these queries and keys (attention.alibi_bias), or None without alibi."""
        if self.positions != 'alibi':
            return None
        return alibi_bias(self.slopes, query_positions, key_positions)

    def head_masks(self, q, k):
        """S and F of the selecting head: (B, T, T) each."""
        h = self.selection_head
        S = selection_matrix(causal_logits(q[:, h], k[:, h]), self.selection_fn)
        return S, accumulated_masks(S)

    def memory_loss(self, q, k):
        """Auxiliary memory loss: epsilon * (max over queries of the soft count of unmasked tokens) / (L * T).

        Query i sees i+1 tokens, a token with F >= tau counts as gone: M_i = (i+1) - sum_j min(F[i,j], tau) / tau.
        Summed over layers by GPT, this is the paper's auxiliary memory loss L_mem (its context-pruning section),
        with tau = 1 as public reimplementations set it.
        """
        T = q.size(-2)
        _, F = self.head_masks(q, k)
        visible = torch.arange(1, T + 1, device=q.device) - F.clamp(max=MEMORY_TAU).sum(-1) / MEMORY_TAU
        return self.selection_loss * visible.max(dim=-1).values.mean() / (self.n_layer * T)

    # -----------------------------------------------------------------------------------------------------
    # Inference: the cache keeps F per entry; a decode step adds the new token's votes, then may evict

    def vote_totals(self, q, k):
        """Column sums of S, the F of the query after the prompt, summed CHUNK queries at a time: (B, T)."""
        h, T = self.selection_head, q.size(-2)
        positions = torch.arange(T, device=q.device)
        total = torch.zeros(q.size(0), T, dtype=score_dtype(q), device=q.device)
        for i in range(0, T, CHUNK):
            logits = scaled_logits(q[:, h, i:i + CHUNK], k[:, h])
            total += votes(logits, positions[i:i + CHUNK, None], positions, self.selection_fn).sum(dim=1)
        return total

    def extend(self, cache, q, k, v, start):
        """Tokens at positions start.. (q, k, v: (B, H, n_new, D)) against the cache, with exactly the results of
        n_new decode steps: their votes accumulate down the chunk and the cache's eviction rule is replayed on them."""
        layer, n_new = self.layer_idx, q.size(-2)
        K, V, f, pos = cache.held(layer, k)
        n = pos.size(1)
        positions = torch.arange(start, start + n_new, device=q.device)
        K, V = torch.cat([K, k], dim=2), torch.cat([V, v], dim=2)
        pos = torch.cat([pos, positions.expand(q.size(0), n_new)], dim=1)
        logits = scaled_logits(q, K)  # (B, H, n_new, n + n_new)
        S = votes(logits[:, self.selection_head], positions[:, None], pos[:, None, :], self.selection_fn)
        F = pad(f, (0, n_new))[:, None] + accumulated_masks(S)  # the cached F, then the chunk's own votes
        visible = pos[:, None, :] <= positions[:, None]
        if cache.budget[layer] is not None and n + n_new > cache.budget[layer]:
            visible &= eviction_schedule(F, cache.budget[layer], n, cache.evict)
        scores = logits - F[:, None]
        bias = self.distance_bias(positions, pos)  # by each held entry's own position, evictions or not
        if bias is not None:
            scores = scores + bias
        att = torch.softmax(scores.masked_fill(~visible[:, None], float('-inf')), dim=-1)
        cache.store(layer, K, V, F[:, -1] + S[:, -1], visible[:, -1], pos)  # what the next query sees
        return att.to(v.dtype) @ V

    def decode(self, cache, q, k, v, position):
        """One token (q, k, v: (B, H, 1, D)) at an absolute position, against the cached tokens."""
        K, V, f, pos = cache.insert(self.layer_idx, k, v, position)  # evicts first if over budget
        logits = scaled_logits(q, K)
        logits = logits.masked_fill((pos < 0)[:, None, None], float('-inf'))  # empty slots
        scores = logits - f[:, None, None]
        bias = self.distance_bias(torch.tensor([position], device=q.device), pos)  # (B, H, 1, slots)
        if bias is not None:
            scores = scores + bias
        att = torch.softmax(scores, dim=-1)
        # this token's votes (row i of S): never for the first token nor itself, counted from the next query on
        S = SELECTION_FNS[self.selection_fn](logits[:, self.selection_head, 0])
        f += S.masked_fill((pos <= 0) | (pos == position), 0.0)
        return att.to(v.dtype) @ V

    # -----------------------------------------------------------------------------------------------------
    # What the model and the tools ask (attention.py), where Selective Attention differs from the causal one

    cache_options = ('budget', 'evict')
    call_options = ('budget', 'evict')  # without a cache: the simulated pruning (forward)
    own_fields = ('selection_head', 'selection_loss', 'selection_fn')

    @staticmethod
    def new_cache(config, batch_size, max_len, budget=None, evict='F'):
        return SelectiveCache(config, batch_size, max_len, budget, evict)

    def maps(self, x, x0, budget=None, evict='F'):
        """The attention weights, from the reference itself, and its steps (Figure 2) kept to be shown: 'F' the
        mask on each token (column) when each query (row) runs, 'keep' whether the budgeted cache still holds it
        then, 'F_end' the mask the cache holds after the text (F plus the last query's votes)."""
        q, k, v = self.qkv(x, 0)
        T, budget = q.size(-2), self.layer_budget(budget)
        S, F = self.head_masks(q, k)
        keep = (eviction_schedule(F, budget, evict=check_evict(evict)) if budget and budget < T else
                torch.ones_like(F, dtype=torch.bool))
        eye = torch.eye(T, dtype=v.dtype, device=v.device).expand(*v.shape[:2], T, T)  # softmax(...) @ I: weights
        positions = torch.arange(T, device=q.device)
        att = selective_attention(q, k, eye, self.selection_head, self.selection_fn, budget or None,
                                  bias=self.distance_bias(positions, positions), evict=evict)
        return dict(att=att, y=att.to(v.dtype) @ v, F=F, keep=keep, F_end=F[:, -1] + S[:, -1])

    def selection_masks(self, x):
        """F (B, T, T) of this layer for its input x (B, T, C, after ln_1): how masked each token is at each query.
        For inspection (experiments/selective_synthetic.py counts the tokens left unmasked)."""
        q, k, _ = self.qkv(x, 0)
        return self.head_masks(q, k)[1]

    def log_stats(self, x):
        """What train.py's log records of this layer, for its input x (B, T, C, after ln_1): `masked`, the share of
        (query, earlier token) pairs with F >= MEMORY_TAU (the token counts as gone, as in the memory loss), and
        `visible`, how many tokens the last query still sees (F < MEMORY_TAU, itself included)."""
        F = self.selection_masks(x).float()
        T = F.size(-1)
        earlier = torch.ones(T, T, dtype=torch.bool, device=F.device).tril(-1)  # j < i
        masked = (F >= MEMORY_TAU) & earlier
        return {'masked': masked.sum().item() / (earlier.sum().item() * F.size(0) or 1),
                'visible': (F[:, -1] < MEMORY_TAU).sum(-1).float().mean().item()}


# ---------------------------------------------------------------------------------------------------------
# The inference cache: per layer a fixed number of slots holding keys, values, F (fp32) and absolute positions.

class SelectiveCache:
    """KV cache of every layer with the accumulated masks F; with a budget, each layer holds at most that many.

    budget: None (keep everything, up to max_len), an int for every layer, or a list of one int per layer.
    A budget counts the first token and the current one, so it is at least 2.
    evict: 'F' (the most-masked entry leaves) or 'window' (the oldest leaves: first token + sliding window).
    """
    last_token_only = False

    def __init__(self, config, batch_size, max_len, budget=None, evict='F'):
        self.evict = check_evict(evict)
        budgets = budget if isinstance(budget, (list, tuple)) else [budget] * config.n_layer
        if len(budgets) != config.n_layer:
            raise ValueError(f"budget lists {len(budgets)} values for {config.n_layer} layers; give one per layer "
                             f"or a single int")
        if any(b is not None and (not isinstance(b, int) or b < 2) for b in budgets):
            raise ValueError(f"budget={budget}: each layer's budget must be an int >= 2 (it counts the first token "
                             f"and the current one)")
        self.budget = list(budgets)
        self.slots = [max_len if b is None else min(b, max_len) for b in budgets]
        self.batch_size = batch_size
        self.head_shape = (config.n_head, config.head_size)
        self.k, self.v, self.f, self.pos = ([None] * config.n_layer for _ in range(4))
        self.length = 0

    def allocate(self, layer, like):
        B, (H, D), slots = self.batch_size, self.head_shape, self.slots[layer]
        self.k[layer] = like.new_zeros(B, H, slots, D)
        self.v[layer] = like.new_zeros(B, H, slots, D)
        self.f[layer] = torch.zeros(B, slots, dtype=score_dtype(like), device=like.device)
        self.pos[layer] = torch.full((B, slots), -1, dtype=torch.long, device=like.device)  # -1: empty slot

    def store(self, layer, k, v, f, held=None, positions=None):
        """Replace the layer by the tokens of k, v (B, H, T, D) marked in held (B, T) (default: all), the same
        number in every row, with their F and positions (default: 0..T-1), in position order."""
        self.allocate(layer, k)
        B, H, T, D = k.shape
        n = T if held is None else int(held[0].sum())
        if n > self.slots[layer]:
            raise ValueError(f"selective cache holds {self.slots[layer]} tokens, {n} asked for")
        idx = (torch.arange(T, device=k.device).expand(B, T) if held is None else held.nonzero()[:, 1].view(B, n))
        self.k[layer][:, :, :n] = k.gather(2, idx[:, None, :, None].expand(B, H, n, D))
        self.v[layer][:, :, :n] = v.gather(2, idx[:, None, :, None].expand(B, H, n, D))
        self.f[layer][:, :n] = f.gather(1, idx)
        self.pos[layer][:, :n] = idx if positions is None else positions.gather(1, idx)

    def held(self, layer, like):
        """The layer's tokens in position order: k, v (B, H, n, D), f and positions (B, n)."""
        if self.pos[layer] is None:
            self.allocate(layer, like)
        pos = self.pos[layer]
        n = int((pos[0] >= 0).sum())
        order = pos.masked_fill(pos < 0, torch.iinfo(pos.dtype).max).argsort(dim=1)[:, :n]
        gather = order[:, None, :, None].expand(-1, self.k[layer].size(1), n, self.k[layer].size(3))
        return (self.k[layer].gather(2, gather), self.v[layer].gather(2, gather), self.f[layer].gather(1, order),
                pos.gather(1, order))

    def insert(self, layer, k, v, position):
        """Put one token (k, v: (B, H, 1, D)) into a free slot, or in place of the evicted one; return the layer."""
        f, pos = self.f[layer], self.pos[layer]
        if position < self.slots[layer]:  # every row holds its first min(position, slots) slots: no GPU sync to ask
            slot = position
        elif self.budget[layer] is None:
            raise ValueError(f"selective cache holds {self.slots[layer]} tokens, {position + 1} asked for")
        else:
            # context pruning: evict the most-masked token (largest F), never the first; ties to the oldest
            candidates = eviction_scores(f, self.evict).masked_fill(pos == 0, float('-inf'))
            most = candidates == candidates.max(dim=1, keepdim=True).values
            slot = pos.masked_fill(~most, position).argmin(dim=1)
        rows = torch.arange(k.size(0), device=k.device)
        self.k[layer][rows, :, slot] = k[:, :, 0]
        self.v[layer][rows, :, slot] = v[:, :, 0]
        f[rows, slot] = 0.0
        pos[rows, slot] = position
        return self.k[layer], self.v[layer], f, pos

    def nbytes(self):
        return sum(t.nbytes for ts in (self.k, self.v, self.f, self.pos) for t in ts if t is not None)
