"""
A GPT language model in the style of nanoGPT, with the attention chosen by name.

The attention interface (every attention file implements it):

  Attention(config, layer_idx)          an nn.Module; projections keep nanoGPT's names (c_attn, c_proj)
  attention(x, x0, cache=None) -> y     x:  (B, T, C) this block's input after ln_1: queries come from it
                                        x0: (B, T0, C) the initial token states (the input of block 0), T0 >= T.
                                            InAttention makes keys and values from x0; the others ignore it.
                                        cache=None: a full forward over positions 0..T0-1 (training).
                                        cache given: x0 holds the tokens that follow the cache.length tokens
                                            already cached, x the same tokens (only the last one when the
                                            cache's last_token_only); the attention appends them to its part
                                            of the cache and returns x's outputs (prefill and one-step decode).
  Cache(config, batch_size, max_len, **options)
                                        the attention's inference cache, for all layers together, so an
                                        attention may share it across layers (InAttention does). It has
                                        .length (tokens seen), .nbytes() (bytes held) and .last_token_only
                                        (True when earlier tokens never need to run through the blocks).
                                        options are inference-time settings (selective's budget), passed
                                        through generate(..., **cache_options).
  Attention.aux_loss                    optional: an extra training loss term set by forward (selective's
                                        memory loss); GPT adds it to the language-model loss.
  Attention.streams                     True when the attention has no context limit (Infini-attention): it
                                        then brings its own positions and the model has no position table.

Positions (GPTConfig.positions, functions in positions.py): 'learned' adds GPT-2's table (wpe) to the initial
states; 'rope' rotates queries and keys by their position; 'alibi' adds a distance bias to the scores. Without
'learned' there is no table. Each attention takes the schemes its cache allows (ATTENTION_POSITIONS, whose
first entry is its default):
InAttention keeps one cache of initial states for all layers, so a position must live in x0 or in the scores,
never in a rotated key. Infini-attention streams past block_size, so it always rotates queries and keys inside
each segment (RoPE) and keeps its memory position-free, as its paper does: the field does not change it.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from attention_in import InAttention, InCache
from attention_infini import InfiniAttention, InfiniCache
from attention_selective import SelectiveAttention, SelectiveCache
from positions import POSITIONS, alibi_bias, alibi_slopes, rope

ATTENTIONS = ('causal', 'in', 'infini', 'selective')
# the position schemes each attention takes, and why it refuses the others
# the position schemes each attention takes, its default first, and why it refuses the others. The defaults are
# what the numbers say (docs/selective.md, docs/inattention.md): at train.py's CPU defaults, rotary positions
# beat the learned table by about 0.5 nats for causal and selective, and ALiBi beats it by 0.23 for InAttention
ATTENTION_POSITIONS = {
    'causal': (('rope', 'alibi', 'learned'), ''),
    'selective': (('rope', 'alibi', 'learned'), ''),
    'in': (('alibi', 'learned'), "InAttention keeps one cache of initial states x0 for every layer and folds each "
           "layer's key projection into its query (the absorbed decode); a rotation applied after the key "
           "projection would need a key cache per layer again"),
    'infini': (('rope', 'learned'), "Infini-attention always brings its own positions, RoPE inside each segment "
               "with a position-free memory; 'rope' and 'learned' both leave it so"),
}
LOSS_PIECE = 2 ** 31 - 1  # logits per cross-entropy call: CUDA's kernel indexes them with int32


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    head_size: int = 0           # width of one head; 0 = n_embd // n_head. Wider attention: more heads of this size
    dropout: float = 0.0
    bias: bool = True
    attention: str = 'causal'    # one of ATTENTIONS
    use_kernels: bool = True     # Triton kernels on CUDA where they exist; False forces the PyTorch reference
    # infini: segment length, memory update rule ('linear' or 'delta'), learning-rate multiplier of the gates
    segment_len: int = 64
    memory_update: str = 'delta'
    gate_lr_mult: float = 10.0
    # infini, not in the paper (attention_infini.py, docs/infini.md): sigma(x) = ELU(feature_scale * x) + 1; the
    # first segment's write counts 1 + U(0, memory_boost) times in training; memory_read 'on', 'off' or 'local'
    feature_scale: float = 1.0
    memory_boost: float = 0.0
    memory_read: str = 'on'
    read_norm: str = 'z'         # 'z': eq. 3's sigma(q) z; 'rms': then unit RMS per head (attention_infini.py)
    # selective: the head whose logits select (paper: head 0), the auxiliary memory loss weight (0 = off), and
    # the nonlinearity turning logits into votes ('relu' as in the paper, 'softplus', 'sigmoid')
    selection_head: int = 0
    selection_loss: float = 0.0
    selection_fn: str = 'relu'
    # how tokens know their position: 'learned' (GPT-2's table), 'rope' (rotary) or 'alibi' (distance bias)
    positions: str = ''  # '' = the attention's default, the first of ATTENTION_POSITIONS
    # the MLP's GELU: 'none' is the exact one (nanoGPT's), 'tanh' the approximation GPT-2 was trained with
    gelu: str = 'none'

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention '{self.attention}', choose one of: {', '.join(ATTENTIONS)}")
        allowed, why = ATTENTION_POSITIONS[self.attention]
        self.positions = self.positions or allowed[0]
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions '{self.positions}', choose one of: {', '.join(POSITIONS)}")
        if self.positions not in allowed:
            raise ValueError(f"attention='{self.attention}' cannot take positions='{self.positions}': {why}; "
                             f"choose one of: {', '.join(allowed)}")
        if not self.head_size and self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}, or give --head_size")
        self.head_size = self.head_size or self.n_embd // self.n_head
        if self.gelu not in ('none', 'tanh'):
            raise ValueError(f"gelu='{self.gelu}': use 'none' (exact) or 'tanh' (GPT-2's approximation)")
        if self.head_size != self.n_embd // self.n_head and self.attention not in ('causal', 'selective'):
            raise ValueError(f"head_size={self.head_size} differs from n_embd/n_head: only causal and selective "
                             f"attention take a separate head size (in and infini tie their caches to n_embd)")


def attention_classes(name):
    """The (Attention, Cache) classes of an attention, by name."""
    return {'causal': (CausalSelfAttention, KVCache), 'in': (InAttention, InCache),
            'infini': (InfiniAttention, InfiniCache), 'selective': (SelectiveAttention, SelectiveCache)}[name]


def cross_entropy(logits, targets, reduction='mean'):
    """Cross-entropy of logits (..., V) against targets (...; -1 = no target), LOSS_PIECE logits at a time: past
    2^31 logits (43k positions at vocab 50k) CUDA's kernel reads out of bounds (pytorch/pytorch#85786)."""
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    rows = max(1, LOSS_PIECE // logits.size(-1))
    if targets.numel() <= rows:
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)
    total = sum(F.cross_entropy(logits[i:i + rows], targets[i:i + rows], ignore_index=-1, reduction='sum')
                for i in range(0, targets.numel(), rows))
    return total if reduction == 'sum' else total / (targets != -1).sum()


def causal_mask(t_q, t_k, device):
    """Boolean mask letting the last t_q of t_k positions see themselves and everything before them."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


# ---------------------------------------------------------------------------------------------------------
# The baseline: plain causal self-attention with a standard KV cache.

class CausalSelfAttention(nn.Module):
    streams = False

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

    def forward(self, x, x0, cache=None):
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + T, device=x.device)
        if self.positions == 'rope':  # keys are cached rotated: a key's rotation depends on its position only
            q, k = rope(q, positions), rope(k, positions)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)
        if self.positions == 'alibi':  # the distance bias, with -inf on future keys, as one float mask
            keys = torch.arange(k.size(2), device=x.device)
            bias = alibi_bias(self.slopes, positions, keys).masked_fill(~causal_mask(T, k.size(2), x.device),
                                                                        float('-inf'))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)
        elif cache is None or T == k.size(2):  # training, or prefill of an empty cache: no T x T mask in memory
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            mask = None if T == 1 else causal_mask(T, k.size(2), x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, self.width)
        return self.resid_dropout(self.c_proj(y))


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


# ---------------------------------------------------------------------------------------------------------
# The shared parts: nanoGPT's MLP, Block and GPT.

class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        attention_class, _ = attention_classes(config.attention)
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention_class(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, x0, cache=None):
        x = x + self.attn(self.ln_1(x), x0, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        attention_class, self.cache_class = attention_classes(config.attention)
        self.streams = attention_class.streams
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=(nn.Embedding(config.block_size, config.n_embd)
                 if config.positions == 'learned' and not self.streams else None),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def check_length(self, t):
        if not self.streams and t > self.config.block_size:
            raise ValueError(f"{t} tokens is more than block_size={self.config.block_size}, the context this "
                             f"'{self.config.attention}' model was trained for; crop the input or fine-tune "
                             f"with a larger --block_size")

    def new_cache(self, batch_size, max_len=None, **options):
        """An empty inference cache for up to max_len tokens (default block_size)."""
        return self.cache_class(self.config, batch_size, max_len or self.config.block_size, **options)

    def forward(self, idx, targets=None, cache=None):
        b, t = idx.size()
        start = 0 if cache is None else cache.length
        self.check_length(start + t)
        x0 = self.transformer.wte(idx)
        if self.transformer.wpe is not None:
            pos = torch.arange(start, start + t, dtype=torch.long, device=idx.device)
            x0 = x0 + self.transformer.wpe(pos)
        x0 = self.transformer.drop(x0)
        x = x0
        if cache is not None and targets is None and cache.last_token_only:
            x = x[:, -1:]  # InAttention: keys and values come from x0 alone, so only the last token runs
        for block in self.transformer.h:
            x = block(x, x0, cache)
        if cache is not None:
            cache.length += t
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = cross_entropy(logits, targets)
            loss = loss + sum(getattr(block.attn, 'aux_loss', 0.0) for block in self.transformer.h)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position is needed
            loss = None
        return logits, loss

    def resize_block_size(self, block_size):
        """Crop, or extend by tiling the learned position table (keeps logits of short inputs unchanged)."""
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        if wpe is None or wpe.weight.size(0) == block_size:
            return
        reps = -(-block_size // wpe.weight.size(0))
        wpe.weight = nn.Parameter(wpe.weight.detach().repeat(reps, 1)[:block_size].clone())
        wpe.num_embeddings = block_size

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # matrices are decayed, vectors (biases, norms, gates) are not; a parameter may carry an lr_mult
        groups = {}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            decay = weight_decay if p.dim() >= 2 else 0.0
            lr_mult = getattr(p, 'lr_mult', 1.0)
            groups.setdefault((decay, lr_mult), []).append(p)
        optim_groups = [{'params': ps, 'weight_decay': wd, 'lr_mult': m, 'lr': learning_rate * m}
                        for (wd, m), ps in groups.items()]
        fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type == 'cuda'
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=989e12):
        """Model flops utilization against peak_flops (default: H100 bf16 dense), PaLM appendix B."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.block_size
        # the attention term 12 L H Q T counts the context each query sees (PaLM's T); infini's softmax sees one
        # segment, and its memory's d x d products are left out
        seen = min(T, cfg.segment_len) if cfg.attention == 'infini' else T
        flops_per_token = 6 * N + 12 * L * H * Q * seen
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, **cache_options):
        """Sample max_new_tokens after idx (b, t), with the attention's cache: the prefix is never recomputed.
        temperature=0 takes the most likely token each step (greedy decoding).

        Attentions with a context limit keep nanoGPT's semantics past block_size: the context is the last
        block_size tokens, so the cache is rebuilt from that window each step. Streaming ones never crop, and
        read the prompt in chunks.
        """
        limit = None if self.streams else self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if cache is None or (limit is not None and cache.length >= limit):
                context = idx if limit is None else idx[:, -limit:]
                max_len = context.size(1) + max_new_tokens
                if limit is not None:
                    max_len = min(max_len, limit)
                cache = self.new_cache(idx.size(0), max_len, **cache_options)
                # a streaming model reads a long prompt block_size tokens at a time, so memory stays bounded
                step = context.size(1) if limit is not None else self.config.block_size
                for start in range(0, context.size(1), step):
                    logits, _ = self(context[:, start:start + step], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :].float()  # fp32: bf16 would tie close logits, even for top_k=1
            if temperature == 0:  # greedy decoding: the most likely token
                idx = torch.cat((idx, logits.argmax(dim=-1, keepdim=True)), dim=1)
                continue
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
