"""
InAttention (Eisner 2024, "InAttention: Linear Context Scaling for Transformers", arXiv 2410.07063).

"Tokens attend only to initial states": in every layer l the queries come from that layer's hidden state h_l,
while the keys and values are made from the initial states x0 (token + position embedding, the input of block 0),
with the usual causal mask. Per layer, per head (our equations for the abstract's words, GPT-2 notation):

    q = ln_1(h_l) Wq + bq                  queries: this layer's residual stream (Block applies ln_1)
    k = ln_kv(x0) Wk + bk                  keys:    the initial states, same for every layer but per-layer Wk
    v = ln_kv(x0) Wv + bv                  values:  the initial states
    y = softmax(q k^T / sqrt(d_head) + causal mask) v

Where the paper is silent, the code chooses (docs/inattention.md says why): x0 = drop(wte[token] + wpe[pos]), the
exact input of block 0; per-layer Wk, Wv (c_attn keeps the causal shape); each layer normalises x0 with its own
LayerNorm ln_kv; positions come from the learned table in x0 or from ALiBi's bias on the scores, never from a
rotation after the key projection (that would need a key cache per layer again).

Inference. The keys and values of token j never depend on context, and no earlier token's hidden state above
block 0 is ever read. So the cache is x̂0 = LayerNorm-without-affine(x0): n_embd numbers per token for the whole
model (a KV cache holds 2 * n_layer * n_embd), written once and read by every layer, and a prompt is "prefilled"
by embedding it: only its last token runs through the blocks (InCache.last_token_only). Two decode paths:
  - absorbed (the fast path, default): the per-layer affine and projections are folded into the query and the
    output (as in DeepSeek-V2's MLA), so each layer attends directly over the shared x̂0 rows and no K or V is
    ever built. Scores:  q.(Wk(g*x̂ + b) + bk) = (g * Wk^T q).x̂ + a constant per query, which softmax ignores.
    Values:  sum_j w_j (Wv(g*x̂_j + b) + bv) = Wv(g * sum_j w_j x̂_j + b) + bv, since the weights sum to 1.
  - re-projection (the slow reference, InCache(absorb=False)): rebuild this layer's K and V from the cache every
    step, then attend as usual. Tests check both equal the full forward in float64.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as nnf  # F is selective's mask (attention_selective.py)

from attention import CausalSelfAttention, alibi_bias, causal_mask


class InAttention(CausalSelfAttention):

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)  # c_attn's rows are Wq, Wk, Wv as in the causal attention
        self.n_embd = config.n_embd
        self.ln_kv = nn.LayerNorm(config.n_embd, bias=config.bias)  # normalises x0 for this layer's keys/values

    def projections(self):
        """(Wq, bq), (Wk, bk), (Wv, bv): c_attn split into the query, key and value projections."""
        w = self.c_attn.weight.split(self.n_embd)
        b = (None,) * 3 if self.c_attn.bias is None else self.c_attn.bias.split(self.n_embd)
        return tuple(zip(w, b))

    def heads(self, t):
        B, T, C = t.size()
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d_head)

    def forward(self, x, x0, cache=None):
        B, T, C = x.size()
        (wq, bq), (wk, bk), (wv, bv) = self.projections()
        q = self.heads(nnf.linear(x, wq, bq))  # queries from this layer's hidden state
        if cache is None:
            # training / evaluation: keys and values from the initial states, SDPA keeps memory linear in T
            s = self.ln_kv(x0)
            k, v = self.heads(nnf.linear(s, wk, bk)), self.heads(nnf.linear(s, wv, bv))
            dropout_p = self.dropout if self.training else 0.0
            if self.positions == 'alibi':
                y = nnf.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(T, T, q), dropout_p=dropout_p)
            else:
                y = nnf.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            xhat = cache.update(x0, q.dtype)  # (B, Tk, C): all tokens so far, the new ones included
            Tk = xhat.size(1)  # x is the last T of these Tk tokens: each sees itself and what came before
            y = (self.absorbed if cache.absorb else self.reprojected)(q, xhat, self.mask(T, Tk, q))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def mask(self, T, Tk, q):
        """What the last T of Tk tokens may see: None (all of it, one query), a boolean causal mask, or with ALiBi the
        float mask -m_h * (i - j) with -inf on future keys (H, T, Tk). Cached rows sit at positions 0..Tk-1."""
        if T == 1 and self.positions != 'alibi':
            return None
        causal = causal_mask(T, Tk, q.device)
        if self.positions != 'alibi':
            return causal
        keys = torch.arange(Tk, device=q.device)
        bias = alibi_bias(self.slopes, keys[Tk - T:], keys)
        return bias.masked_fill(~causal, float('-inf')).to(q.dtype)

    # -----------------------------------------------------------------------------------------------------
    # Inference: two decode paths over the one shared cache (InCache, below)

    def reprojected(self, q, xhat, mask):
        """Reference decode: rebuild this layer's K and V from the cached x̂0, then attend as in training."""
        s = xhat * self.ln_kv.weight.to(xhat.dtype)  # in the cache's dtype: an fp32 copy of it is GBs at 1M tokens
        if self.ln_kv.bias is not None:
            s = s + self.ln_kv.bias.to(xhat.dtype)
        _, (wk, bk), (wv, bv) = self.projections()
        k, v = self.heads(nnf.linear(s, wk, bk)), self.heads(nnf.linear(s, wv, bv))
        return nnf.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def absorbed(self, q, xhat, mask):
        """Fast decode: attend over the shared x̂0 rows directly; the per-layer LN affine and Wk, Wv are folded
        into the query and the output (module docstring). Never builds a K or V, nor copies the cache per head."""
        B, H, T, D = q.size()
        Tk, C = xhat.size(1), self.n_embd
        _, (wk, _), (wv, bv) = self.projections()
        qt = torch.einsum('bhtd,hdc->bhtc', q, wk.view(H, D, C)) * self.ln_kv.weight  # g * Wk^T q per head
        att = (qt.reshape(B, H * T, C) @ xhat.transpose(1, 2)).view(B, H, T, Tk) / math.sqrt(D)
        if mask is not None and mask.dtype == torch.bool:
            att = att.masked_fill(~mask, float('-inf'))
        elif mask is not None:  # ALiBi: the distance bias is added to the scores, as in training
            att = att + mask
        att = att.to(torch.promote_types(att.dtype, torch.float32))  # softmax in fp32 at least (bf16 on GPU)
        att = nnf.softmax(att, dim=-1).to(xhat.dtype)
        ctx = (att.view(B, H * T, Tk) @ xhat).view(B, H, T, C) * self.ln_kv.weight  # g * sum_j w_j x̂_j
        if self.ln_kv.bias is not None:
            ctx = ctx + self.ln_kv.bias
        y = torch.einsum('bhtc,hdc->bhtd', ctx, wv.view(H, D, C))
        return y if bv is None else y + bv.view(H, 1, D)

    # -----------------------------------------------------------------------------------------------------
    # What the model and the tools ask (attention.py), where InAttention differs from the causal baseline

    position_schemes = ('alibi', 'learned')  # ALiBi first, as docs/inattention.md measures best
    refused_because = ("InAttention keeps one cache of initial states x0 for every layer and folds each layer's key "
                       "projection into its query (the absorbed decode); a rotation applied after the key "
                       "projection would need a key cache per layer again")
    own_head_size = False  # the cache is x0's n_embd numbers: heads split n_embd
    cache_options = ('absorb',)
    maps_note = ' over the initial states'

    @staticmethod
    def new_cache(config, batch_size, max_len, absorb=True):
        return InCache(config, batch_size, max_len, absorb)

    @staticmethod
    def rotary_positions(config, start, t):
        return None  # no rotation: positions are in x0, or in ALiBi's bias

    def init_from_causal(self, block):
        """ln_kv starts as a copy of the block's ln_1: layer 0, whose input is x0, is then the causal layer 0."""
        self.ln_kv.load_state_dict(block.ln_1.state_dict())

    def maps(self, x, x0):
        """The attention weights over the initial states, and the output, as the training forward computes them."""
        T = x.size(1)
        (wq, bq), (wk, bk), (wv, bv) = self.projections()
        s = self.ln_kv(x0)
        q = self.heads(nnf.linear(x, wq, bq))
        k, v = self.heads(nnf.linear(s, wk, bk)), self.heads(nnf.linear(s, wv, bv))
        scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
        mask = self.mask(T, T, q)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float('-inf'))
        elif mask is not None:
            scores = scores + mask
        att = torch.softmax(scores, dim=-1)
        return dict(att=att, y=att @ v)


class InCache:
    """The normalised initial states x̂0 of every token seen, shared by all layers: n_embd numbers per token.

    absorb=True decodes with the absorbed fast path, absorb=False with the re-projection reference
    (model.generate(..., absorb=False)); both read the same cache.
    """
    last_token_only = True  # keys/values come from x0 alone: earlier tokens never run through the blocks

    def __init__(self, config, batch_size, max_len, absorb=True):
        self.shape = (batch_size, max_len, config.n_embd)
        self.eps = 1e-5  # nn.LayerNorm's default, as ln_kv uses
        self.absorb = absorb
        self.xhat = None  # allocated on first use, in the dtype the model computes in
        self.length = 0   # tokens seen; GPT.forward advances it after all layers ran
        self.filled = 0   # rows written: the first layer of a forward writes the new rows, the others read them

    def update(self, x0, dtype):
        """Store LayerNorm-without-affine of the new rows x0 (once per forward), return all rows so far."""
        end = self.length + x0.size(1)
        if end > self.shape[1]:
            raise ValueError(f"InAttention cache holds {self.shape[1]} tokens, {end} asked for; "
                             f"make the cache with a larger max_len")
        if self.filled < end:
            if self.xhat is None:
                self.xhat = torch.empty(self.shape, dtype=dtype, device=x0.device)
            self.xhat[:, self.length:end] = nnf.layer_norm(x0, (x0.size(-1),), eps=self.eps)
            self.filled = end
        return self.xhat[:, :end]

    def nbytes(self):
        return 0 if self.xhat is None else self.xhat.nbytes
