"""
A GPT language model in the style of nanoGPT, with the attention chosen by name (GPTConfig.attention).

The attentions live in their own files: attention.py (causal, the baseline every other one extends),
attention_in.py, attention_infini.py and attention_selective.py. What an attention declares about itself (the
class attributes at the bottom of attention.py) is all the model and the scripts ask of it.

Positions (GPTConfig.positions, at the bottom of attention.py): 'learned' adds GPT-2's table (wpe) to the initial
states; 'rope' rotates queries and keys by their position; 'alibi' adds a distance bias to the scores.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as nnf  # F is selective's mask (attention_selective.py)

from attention import CausalSelfAttention
from attention_in import InAttention
from attention_infini import InfiniAttention
from attention_selective import SelectiveAttention
from attention import POSITIONS, rope_angles

ATTENTIONS = {}  # name -> attention class, filled by register_attention below the classes
# what every attention declares (attention.py's base class says what each means and gives the baseline's answer)
DECLARATIONS = ('position_schemes', 'refused_because', 'own_head_size', 'streams', 'cache_options', 'call_options',
                'new_cache', 'keys_per_query', 'maps', 'maps_note', 'rotary_positions', 'init_from_causal',
                'training_problem')
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
    attention: str = 'causal'    # a name in ATTENTIONS
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
    positions: str = ''  # '' = the attention's default, the first of its position_schemes
    # the MLP's GELU: 'none' is the exact one (nanoGPT's), 'tanh' the approximation GPT-2 was trained with
    gelu: str = 'none'

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention '{self.attention}', choose one of: {', '.join(ATTENTIONS)}")
        attention = ATTENTIONS[self.attention]
        allowed, why = attention.position_schemes, attention.refused_because
        self.positions = self.positions or allowed[0]
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions '{self.positions}', choose one of: {', '.join(POSITIONS)}")
        if self.positions not in allowed:
            raise ValueError(f"attention='{self.attention}' cannot take positions='{self.positions}': {why}; "
                             f"choose one of: {', '.join(allowed)}")
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be at least 1")
        if self.head_size < 0:
            raise ValueError(f"head_size={self.head_size} must be >= 0 (0 = n_embd // n_head)")
        if not self.head_size and self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}, or give --head_size")
        self.head_size = self.head_size or self.n_embd // self.n_head
        if self.gelu not in ('none', 'tanh'):
            raise ValueError(f"gelu='{self.gelu}': use 'none' (exact) or 'tanh' (GPT-2's approximation)")
        if self.positions == 'rope' and self.head_size % 2:  # Infini's own RoPE checks its head size itself
            raise ValueError(f"rotary positions need an even head size, not {self.head_size}: change n_embd or "
                             f"n_head, or use positions={allowed[-1]}")
        for key in ('dropout', 'gate_lr_mult', 'feature_scale', 'memory_boost', 'selection_loss'):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be a finite number >= 0")
        if self.head_size != self.n_embd // self.n_head and not attention.own_head_size:
            takers = ', '.join(name for name, a in ATTENTIONS.items() if a.own_head_size)
            raise ValueError(f"head_size={self.head_size} differs from n_embd/n_head: attention='{self.attention}' "
                             f"ties its head size to n_embd; these take a separate one: {takers}")


def register_attention(name, attention_class):
    """Make an attention choosable by name (GPTConfig.attention, train.py --attention=name)."""
    missing = [d for d in DECLARATIONS if not hasattr(attention_class, d)]
    if missing:
        raise TypeError(f"{attention_class.__name__} does not declare {', '.join(missing)} (subclass "
                        f"attention.CausalSelfAttention, which declares each)")
    ATTENTIONS[name] = attention_class


def cross_entropy(logits, targets, reduction='mean'):
    """Cross-entropy of logits (..., V) against targets (...; -1 = no target), LOSS_PIECE logits at a time: past
    2^31 logits (43k positions at vocab 50k) CUDA's kernel reads out of bounds (pytorch/pytorch#85786)."""
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    rows = max(1, LOSS_PIECE // logits.size(-1))
    if targets.numel() <= rows:
        return nnf.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)
    total = sum(nnf.cross_entropy(logits[i:i + rows], targets[i:i + rows], ignore_index=-1, reduction='sum')
                for i in range(0, targets.numel(), rows))
    return total if reduction == 'sum' else total / (targets != -1).sum()


register_attention('causal', CausalSelfAttention)
register_attention('in', InAttention)
register_attention('infini', InfiniAttention)
register_attention('selective', SelectiveAttention)


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
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = ATTENTIONS[config.attention](config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, x0, cache=None, **options):
        x = x + self.attn(self.ln_1(x), x0, cache, **options)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.attention = ATTENTIONS[config.attention]  # the attention's class: what it declares about itself
        self.streams = self.attention.streams
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
        """An empty inference cache for up to max_len tokens (default block_size); options are the attention's
        cache_options (selective's budget), a ValueError for any other."""
        self.check_options(options)
        return self.attention.new_cache(self.config, batch_size, max_len or self.config.block_size, **options)

    def check_options(self, options, per_call=False):
        """A ValueError naming any option the attention does not take: of its cache (its cache_options), or with
        per_call, of one forward (its call_options)."""
        takes = self.attention.call_options if per_call else self.attention.cache_options
        unknown = [key for key in options if key not in takes]
        if unknown:
            raise ValueError(f"attention='{self.config.attention}' takes no option {', '.join(unknown)} "
                             f"(it takes: {', '.join(takes) or 'none'})")

    def forward(self, idx, targets=None, cache=None, **options):
        """Logits and loss of idx (b, t); options go to every layer's attention (its call_options: selective's
        budget and evict, Infini's memory_read)."""
        b, t = idx.size()
        start = 0 if cache is None else cache.length
        self.check_length(start + t)
        self.check_options(options, per_call=True)
        x0 = self.transformer.wte(idx)
        if self.transformer.wpe is not None:
            pos = torch.arange(start, start + t, dtype=torch.long, device=idx.device)
            x0 = x0 + self.transformer.wpe(pos)
        x0 = self.transformer.drop(x0)
        x = x0
        rotary = self.attention.rotary_positions(self.config, start, t)
        if rotary is not None:  # the rotation of each position the attention turns by, once for every layer
            pos = torch.arange(rotary.start, rotary.stop, device=idx.device)
            options = {**options, 'rotary': rope_angles(pos, self.config.head_size,
                                                        torch.promote_types(x0.dtype, torch.float32))}
        if cache is not None and targets is None and cache.last_token_only:
            x = x[:, -1:]  # InAttention: keys and values come from x0 alone, so only the last token runs
        for block in self.transformer.h:
            x = block(x, x0, cache, **options)
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
        n_params = self.get_num_params()  # PaLM's N
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.block_size
        # the attention term 12 L H Q T counts the keys each query sees (PaLM's T): the attention says how many
        seen = self.attention.keys_per_query(cfg)
        flops_per_token = 6 * n_params + 12 * L * H * Q * seen
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, **cache_options):
        """Sample max_new_tokens after idx (b, t), with the attention's cache: the prefix is never recomputed.
        temperature=0 takes the most likely token each step (greedy decoding); cache_options go to new_cache.

        Attentions with a context limit keep nanoGPT's semantics past block_size: the context is the last
        block_size tokens, so the cache is rebuilt from that window each step. Streaming ones never crop, and
        read the prompt in chunks.
        """
        if max_new_tokens == 0:
            return idx
        cache, logits = self.prefill(idx, max_new_tokens, **cache_options)
        return self.decode_n_tokens(idx, logits, cache, max_new_tokens, temperature, top_k, cache_options)

    def prefill(self, idx, max_new_tokens, **cache_options):
        """A new cache holding the context of idx, and the logits (b, vocab) after it. The context is idx, or its
        last block_size tokens for a model with a context limit; a streaming model reads it block_size tokens at a
        time, so its memory stays bounded."""
        limit = None if self.streams else self.config.block_size
        context = idx if limit is None else idx[:, -limit:]
        max_len = context.size(1) + max_new_tokens
        cache = self.new_cache(idx.size(0), max_len if limit is None else min(max_len, limit), **cache_options)
        step = self.config.block_size if limit is None else context.size(1)
        for start in range(0, context.size(1), step):
            logits, _ = self(context[:, start:start + step], cache=cache)
        return cache, logits[:, -1, :].float()  # fp32: bf16 would tie close logits, even for top_k=1

    def decode_one_token(self, token, cache):
        """The logits (b, vocab) after one more token (b, 1), which the cache takes in."""
        logits, _ = self(token, cache=cache)
        return logits[:, -1, :].float()

    def decode_n_tokens(self, idx, logits, cache, n, temperature, top_k, cache_options):
        """Sample n tokens one at a time from the logits after idx and its cache; returns idx with them."""
        for i in range(n):
            idx = torch.cat((idx, sample_next(logits, temperature, top_k)), dim=1)
            if i == n - 1:
                break
            if not self.streams and cache.length >= self.config.block_size:  # the window moves: rebuild it
                cache, logits = self.prefill(idx, n, **cache_options)
            else:
                logits = self.decode_one_token(idx[:, -1:], cache)
        return idx


def sample_next(logits, temperature=1.0, top_k=None):
    """The next token (b, 1) from the logits (b, vocab): the likeliest at temperature 0, else a draw from the
    softmax at that temperature over the top_k likeliest (all of them when top_k is None)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    return torch.multinomial(nnf.softmax(logits, dim=-1), num_samples=1)
