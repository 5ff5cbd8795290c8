"""
See what each attention does in a trained model, on a prompt; every global below is a flag:

  python visualize.py --out_dir=out-selective --budget=32
  python visualize.py --out_dir=out-infini --start=FILE:prompt.txt --layer=2 --head=1
  python visualize.py --out_dir=out-in --token=10 --max_new_tokens=40

The text is printed with each token shaded by what the attention did to it (docs/visualize.md reads an example):
  selective  the mask F on the token at the end of the text, in nats: e^-F multiplies its attention weight in
             every head. With --budget, the tokens a layer's pruned cache no longer holds are struck out.
  infini     the share of the token's output read from memory rather than from local attention ('|' starts a
             segment), after a table of the gates sigmoid(beta).
  all four   where the attention of one token (--token, default the last) went, layer by layer.
Colours on a terminal unless NO_COLOR is set; elsewhere (a pipe, a log) a row of digits 0-9 under each line.
With matplotlib, PNGs too: every layer's and head's attention map, selective's F, infini's gates.

The maps are recomputed from each block's inputs (caught by forward hooks) with the attention files' reference
functions, and each layer's recomputed output is checked against the model's own.
"""

import os
import sys

import torch

from attention_infini import gated_output, infini_attention, local_attention
from attention_selective import (EVICTIONS, accumulated_masks, causal_logits, eviction_schedule, selection_matrix,
                                 selective_attention)
from configurator import (check_sampling, checkpoint_tokenizer, configure, device_type_of, encode_prompt, flags_of,
                          load_model)
from positions import alibi_bias, rope

# -----------------------------------------------------------------------------------------------------------
out_dir = 'out'         # the run whose ckpt.pt to look at
start = 'import os\n\n\ndef join(a, b):\n    """Join two paths."""\n    return os.path.join(a, b)\n'  # or FILE:path
max_new_tokens = 0      # tokens to generate after the prompt, looked at with it
temperature = 0.8
top_k = 200
seed = 1337
budget = 0              # selective only: the KV entries each layer's pruned cache keeps; 0 = all
evict = 'F'             # selective with a budget: evict the most masked entry ('F') or the oldest ('window')
layer = -1              # the layer to show, 0..n_layer-1; -1 = the mean over layers
head = -1               # the head to show, 0..n_head-1; -1 = the mean over heads
token = -1              # the token whose attention is shown: its index in the text, negative from the end
png = True              # write pictures (needs matplotlib)
png_dir = ''            # where the pictures go; '' = out_dir
device = 'cpu'
FLAGS = flags_of(globals())  # every setting above, with its default
# -----------------------------------------------------------------------------------------------------------

CHECK_TOLERANCE = 1e-4  # how far a recomputed output may be from the model's, relative to its largest value
F_SCALE = 9  # selective's shades: F in nats, capped here (a weight times e^-9 = 1/8103 is as good as gone)
HEAT = (230, 229, 228, 221, 214, 208, 202, 196, 160)  # 256-colour backgrounds of the digits 1..9, pale to red
WIDTH = 100  # columns per printed line
MAX_TOKENS = 2048  # the longest text looked at by a streaming model (infini): the maps are T x T per layer and head


# -----------------------------------------------------------------------------------------------------------
# The maps: each block's inputs from one forward, then its attention recomputed by the reference functions.

def capture(model, idx):
    """The inputs (x, x0) and output of every layer's attention in one forward over idx, by forward hooks."""
    seen = []
    hooks = [block.attn.register_forward_hook(lambda module, args, out: seen.append((args[0], args[1], out)))
             for block in model.transformer.h]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def qkv(attn, x, x0, attention):
    """The queries, keys and values (B, H, T, d) that the attention's forward makes from its inputs."""
    width = attn.c_attn.out_features // 3  # n_head * head_size
    q, k, v = attn.c_attn(x).split(width, dim=2)
    if attention == 'in':  # keys and values from the initial states, through this layer's ln_kv
        _, k, v = attn.c_attn(attn.ln_kv(x0)).split(width, dim=2)
    B, T, _ = x.size()
    q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in (q, k, v))
    if getattr(attn, 'positions', 'learned') == 'rope':  # rotated before the logits, as the module does
        q, k = rope(q, torch.arange(T, device=x.device)), rope(k, torch.arange(T, device=x.device))
    return q, k, v


def distance_bias(attn, T, device):
    """ALiBi's bias on the logits (H, T, T) where the model has it, else None."""
    if getattr(attn, 'positions', 'learned') != 'alibi':
        return None
    positions = torch.arange(T, device=device)
    return alibi_bias(attn.slopes, positions, positions)


def identity(v, n):
    """Values that make an attention return its weights: softmax(...) @ I is the softmax itself."""
    return torch.eye(n, dtype=v.dtype, device=v.device).expand(*v.shape[:2], n, n)


def selective_maps(attn, q, k, v, budget, evict):
    """The maps from the reference itself, and its steps (Figure 2) kept to be shown: F and the cache."""
    T = q.size(-2)
    S = selection_matrix(causal_logits(q, k)[:, attn.selection_head], attn.selection_fn)  # the votes
    F = accumulated_masks(S)  # F[i, j]: the mask on token j when query i runs
    keep = (eviction_schedule(F, budget, evict=evict) if budget and budget < T else
            torch.ones_like(F, dtype=torch.bool))  # keep[i, j]: token j is in the pruned cache when query i runs
    att = selective_attention(q, k, identity(v, T), attn.selection_head, attn.selection_fn, budget or None,
                              bias=distance_bias(attn, T, q.device), evict=evict)
    # after the text, the cache holds F plus the last query's votes (F_end), and the tokens of keep's last row
    return dict(att=att, y=att @ v, F=F, keep=keep, F_end=F[:, -1] + S[:, -1])


def infini_maps(attn, q, k, v):
    """Infini-attention's two parts, from its reference: at gate 1 (beta = +inf) it returns A_mem alone (eq. 3),
    at gate 0 A_dot alone (eq. 2). The output mixes them (eq. 6), so the share of each in it can be measured."""
    def part(logit):
        return infini_attention(q, k, v, torch.full_like(attn.beta, logit), attn.segment_len, attn.update,
                                feature_scale=attn.feature_scale)[0]
    a_mem, a_dot = part(float('inf')), part(float('-inf'))
    mem = gated_output(a_mem, torch.zeros_like(a_dot), attn.beta, attn.memory_read)  # eq. 6 is linear in both
    loc = gated_output(torch.zeros_like(a_mem), a_dot, attn.beta, attn.memory_read)
    share = mem.norm(dim=-1) / (mem.norm(dim=-1) + loc.norm(dim=-1)).clamp_min(1e-12)
    T, N = q.size(-2), attn.segment_len
    att = torch.zeros(*q.shape[:2], T, T, dtype=v.dtype, device=v.device)
    for s in range(0, T, N):  # the weights of each segment's local softmax (eq. 2)
        e = min(s + N, T)
        att[..., s:e, s:e] = local_attention(q[..., s:e, :], k[..., s:e, :], identity(v, e - s), 0, 0.0)
    return dict(att=att, y=mem + loc, gate=torch.sigmoid(attn.beta.float())[None], memory_share=share)


def layer_maps(attn, x, x0, attention, budget, evict):
    q, k, v = qkv(attn, x, x0, attention)
    if attention == 'selective':
        return selective_maps(attn, q, k, v, budget, evict)
    if attention == 'infini':
        return infini_maps(attn, q, k, v)
    logits = causal_logits(q, k)  # causal and in: softmax(q k^T / sqrt(d) + causal mask (+ ALiBi's bias))
    bias = distance_bias(attn, q.size(-2), q.device)
    att = torch.softmax(logits if bias is None else logits + bias, dim=-1)
    return dict(att=att, y=att.to(v.dtype) @ v)


@torch.no_grad()
def analyse(model, idx, budget=0, evict='F'):
    """Per layer a dict of maps, batch dimension dropped. A budget prunes selective's layers as the cache would."""
    attention = model.config.attention
    selective = [block.attn for block in model.transformer.h if attention == 'selective']
    for attn in selective:  # the module's own simulation of a pruned cache, in one parallel forward
        attn.budget, attn.evict = budget or None, evict
    try:
        seen = capture(model, idx)
    finally:
        for attn in selective:
            attn.budget, attn.evict = None, 'F'
    maps = []
    for i, (block, (x, x0, out)) in enumerate(zip(model.transformer.h, seen)):
        m = layer_maps(block.attn, x, x0, attention, budget, evict)
        mine = block.attn.c_proj(m.pop('y').transpose(1, 2).reshape(out.shape).to(out.dtype))
        error = float((mine - out).abs().max() / out.abs().max().clamp_min(1e-12))
        if error > CHECK_TOLERANCE:
            print(f"warning: layer {i}'s recomputed attention differs from the model's by {error:.1e} (relative): "
                  f"its maps may not show what the model computes")
        maps.append({key: t[0] for key, t in m.items()})
    return maps


# -----------------------------------------------------------------------------------------------------------
# The terminal: a token at a time, shaded on a terminal, with a row of digits under each line elsewhere.

def shown(piece):
    """A token's text on one line: a newline shows as an arrow (the line then breaks), tabs and controls as marks."""
    signs = {'\n': '↵', '\t': '→', ' ': ' '}
    return ''.join(signs.get(c, '·' if c.isspace() or not c.isprintable() else c) for c in piece)


def paint(text, digit, struck=False, boxed=False):
    codes = ([f'48;5;{HEAT[digit - 1]};30'] if digit else []) + (['2;9'] if struck else []) + (['7'] if boxed else [])
    return f"\033[{';'.join(codes)}m{text}\033[0m" if codes else text


def render(pieces, levels, color, struck=(), before=None, boxed=None):
    """The text with token i shaded by levels[i] (0..1) or struck out ('-'); before: {i: a mark printed before
    token i} (a segment start, the first generated token); boxed: one token (the query)."""
    lines, text, digits = [], [], ''
    for i, piece in enumerate(pieces):
        s, mark, digit = shown(piece), (before or {}).get(i, ''), round(9 * float(levels[i]))
        d = '-' if i in struck else str(digit)
        if i == boxed and not color:
            s, d = f'[{s}]', ' ' + d
        if digits and len(digits) + len(mark) + len(s) > WIDTH:
            lines.append((''.join(text), digits))
            text, digits = [], ''
        digits += (mark + d).ljust(len(mark) + len(s))  # also counts the columns in colour
        if color:  # the marks in cyan
            mark, s = mark and f'\033[36m{mark}\033[0m', paint(s, digit, i in struck, i == boxed)
        text.append(mark + s)
        if piece.endswith('\n'):
            lines.append((''.join(text), digits))
            text, digits = [], ''
    if text:
        lines.append((''.join(text), digits))
    return '\n'.join(t if color else f'{t}\n{d.rstrip()}' for t, d in lines)


def legend(color, scale, extra=''):
    """The line saying what the shades (on a terminal) or the digits (elsewhere) mean."""
    if color:
        return f"shades {''.join(paint(' ', d) for d in range(1, 10))} (none = 0): {scale}{extra}"
    return f'digits under each line: {scale}{extra}'


def pick(t, index):
    """The mean over the first dimension (layers or heads), or one of them (index >= 0)."""
    return t.mean(0) if index < 0 else t[index]


def where(layer, head=None):
    words = 'the mean over layers' if layer < 0 else f'layer {layer}'
    return words if head is None else words + (', the mean over heads' if head < 0 else f', head {head}')


def evicted(maps, layer, query):
    """The tokens up to `query` that selective's pruned cache of a layer (-1: of every layer) no longer holds when
    that query runs; none for the other attentions."""
    if 'keep' not in maps[0]:
        return set()
    gone = torch.stack([~m['keep'][query, :query + 1] for m in maps])
    return set(torch.nonzero(gone.all(0) if layer < 0 else gone[layer]).flatten().tolist())


def report_selective(maps, pieces, color, budget, evict, layer, marks):
    F_end, T = torch.stack([m['F_end'] for m in maps]), len(pieces)  # (L, T)
    print(f'\n== selective, {where(layer)}: the mask F on each token at the end of the text, in nats ==')
    print(render(pieces, pick(F_end.clamp(max=F_SCALE), layer) / F_SCALE, color, evicted(maps, layer, T - 1), marks))
    note = f"; {'struck' if color else '-'} = evicted under --budget={budget}" if budget else ''
    note += ' (the oldest first)' if budget and evict == 'window' else ''
    note += ' (by every layer)' if budget and layer < 0 else ''
    print(legend(color, f'F rounded, 0 (kept whole) .. {F_SCALE} (or more: gone); e^-F multiplies the weight', note))
    for i, m in enumerate(maps):
        held = f"; its cache holds {int(m['keep'][-1].sum())} of {T} (budget {budget})" if budget else ''
        print(f'layer {i}: median F {float(F_end[i].median()):.1f}; {int((F_end[i] >= 1).sum())} of {T} tokens '
              f'have F >= 1{held}')


def report_infini(maps, pieces, color, layer, head, marks, memory_read, segment_len):
    gates = torch.stack([m['gate'] for m in maps])
    print("\n== infini: the gates sigmoid(beta), the weight of the memory's read in each head (eq. 6) ==")
    if memory_read != 'on':
        print(f"(memory_read='{memory_read}', an ablation: the memory's part of each output is set to 0)")
    print(' ' * 9 + ''.join(f'{"head " + str(h):>8}' for h in range(gates.size(1))))
    for i, row in enumerate(gates.tolist()):
        print(f'layer {i:<3d}' + ''.join(f'{g:8.2f}' for g in row))
    share = torch.stack([pick(m['memory_share'], head) for m in maps])  # (L, T)
    print(f"\n== infini, {where(layer, head)}: the share of each token's output read from memory ==")
    print(render(pieces, pick(share, layer), color, before=marks))
    print(legend(color, '0 = all from local attention .. 9 = all from memory', "; '|' = segment start"))
    if len(pieces) > segment_len:  # the first segment reads an empty memory: left out of the mean
        for i, row in enumerate(share[:, segment_len:].mean(1).tolist()):
            print(f'layer {i}: {row:.0%} of the output read from memory, mean over the tokens after the first segment')


def report_focus(maps, pieces, color, layer, head, query, marks, attention):
    att = torch.stack([pick(m['att'][:, query], head) for m in maps])  # (L, T): row `query` of each map
    what = ' (local attention only)' if attention == 'infini' else ' in the initial states' if attention == 'in' else ''
    print(f'\n== {attention}, {where(layer, head)}: where token {query} {shown(pieces[query])!r} put its '
          f'attention{what} ==')
    focus, struck = pick(att, layer), evicted(maps, layer, query)
    print(render(pieces, focus / focus.max(), color, struck, marks, boxed=query))
    note = ('; boxed' if color else '; [ ]') + ' = the token looking'
    note += f"; {'struck' if color else '-'} = evicted" if struck else ''
    print(legend(color, '0 = none .. 9 = the most', note))
    for i, (m, row) in enumerate(zip(maps, att)):  # each layer's largest weights
        weight, index = row.topk(min(4, query + 1))
        memory = (f"; {float(pick(m['memory_share'][:, query], head)):.0%} of the output read from memory"
                  if 'memory_share' in m else '')
        print(f'layer {i}: ' + '  '.join(f'{shown(pieces[j])!r}@{j} {w:.2f}'
                                         for w, j in zip(weight.tolist(), index.tolist())) + memory)


# -----------------------------------------------------------------------------------------------------------
# Pictures (matplotlib, an optional extra)

def pictures(maps, pieces, config, folder, budget):
    """PNGs of the maps, written into folder; returns their paths (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import PowerNorm
    except ImportError:
        print('matplotlib is not installed: no pictures (pip install matplotlib to get them)')
        return []
    os.makedirs(folder, exist_ok=True)
    maps = [{key: t.cpu().numpy() for key, t in m.items()} for m in maps]
    attention, L, H, T = config.attention, config.n_layer, config.n_head, len(pieces)
    labels = [shown(p) for p in pieces] if T <= 48 else None  # token labels on the axes while they fit
    written = []

    def label(ax, title):
        ax.set_title(title, fontsize=8)
        if labels:
            ax.set_xticks(range(T), labels, fontsize=5, family='monospace')
            ax.set_yticks(range(T), labels, fontsize=5, family='monospace')
        ax.tick_params(labelsize=6 if not labels else 5)

    def save(fig, name):
        written.append(os.path.join(folder, name))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)

    # every map: rows are queries, columns the tokens they attend to; a square root brings out small weights
    fig, axs = plt.subplots(L, H, figsize=(2.2 * H + 0.5, 2.2 * L + 0.6), squeeze=False, layout='constrained')
    for i in range(L):
        for h in range(H):
            axs[i][h].imshow(maps[i]['att'][h], cmap='viridis', norm=PowerNorm(0.5, 0, 1))
            selects = ' (selects)' if attention == 'selective' and h == config.selection_head else ''
            label(axs[i][h], f'layer {i} head {h}{selects}')
    what = ' (local, in segments)' if attention == 'infini' else ' over the initial states' if attention == 'in' else ''
    axs[-1][0].set(xlabel='token', ylabel='query')
    fig.suptitle(f'{attention} attention{what}: query (row) to token (column)', fontsize=10)
    save(fig, f'{attention}_maps.png')

    if attention == 'selective':  # F as each query sees it; under a budget, grey where the cache has evicted
        fig, axs = plt.subplots(1, L, figsize=(3.2 * L + 0.5, 3.8), squeeze=False, layout='constrained')
        causal = np.tril(np.ones((T, T), dtype=bool))
        for i in range(L):
            shade = axs[0][i].imshow(np.where(causal, maps[i]['F'], np.nan), cmap='magma_r', vmin=0, vmax=F_SCALE)
            if budget:
                axs[0][i].imshow(np.where(causal & ~maps[i]['keep'], 1.0, np.nan), cmap='Greys', vmin=0, vmax=2)
            label(axs[0][i], f'layer {i}')
        axs[0][0].set(xlabel='token', ylabel='query')
        fig.colorbar(shade, ax=axs[0].tolist(), shrink=0.8, label=f'F (nats, capped at {F_SCALE})')
        fig.suptitle('selective: F, the mask on each token (column) when each query (row) runs'
                     + (f'; grey: evicted, budget {budget}' if budget else ''), fontsize=9)
        save(fig, 'selective_masks.png')

    if attention == 'infini':  # the gates, and per layer the memory share of every token (mean over heads)
        gates, share = np.stack([m['gate'] for m in maps]), np.stack([m['memory_share'].mean(0) for m in maps])
        fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(3 + 0.5 * H + min(12, T / 16), 0.5 * L + 2),
                                         gridspec_kw={'width_ratios': [H, max(H, min(24, T // 8))]},
                                         layout='constrained')
        ax_g.imshow(gates, cmap='coolwarm', vmin=0, vmax=1)
        for (i, h), g in np.ndenumerate(gates):
            ax_g.text(h, i, f'{g:.2f}', ha='center', va='center', fontsize=7)
        ax_g.set(xlabel='head', ylabel='layer', title='gate sigmoid(beta)', xticks=range(H), yticks=range(L))
        shade = ax_s.imshow(share, cmap='viridis', vmin=0, aspect='auto', interpolation='nearest')
        for s in range(config.segment_len, T, config.segment_len):
            ax_s.axvline(s - 0.5, color='white', lw=0.6)
        ax_s.set(xlabel='token', ylabel='layer', yticks=range(L),
                 title='share of the output read from memory (mean over heads); lines: segment starts')
        fig.colorbar(shade, ax=ax_s, shrink=0.9)
        save(fig, 'infini_gates.png')
    return written


# -----------------------------------------------------------------------------------------------------------

def check_index(flag, value, count, what, low=-1):
    """A one-line error unless value indexes one of count things (from low: -1 = their mean, or from the end)."""
    if not low <= value < count:
        other = 'or -1 for the mean over them' if low == -1 else 'or a negative index from the end'
        raise SystemExit(f"--{flag}={value}: {what.format(count)}; give 0..{count - 1}, {other}")


def main(argv):
    cfg, given = configure(argv, FLAGS, __doc__)
    device_type_of(cfg.device)  # a one-line error for a device torch does not know or cannot see
    check_sampling(cfg.temperature, cfg.top_k, cfg.max_new_tokens)
    if cfg.seed < 0:
        raise SystemExit(f"--seed={cfg.seed} must be >= 0")
    torch.manual_seed(cfg.seed)
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}: train one first (python train.py --out_dir={cfg.out_dir}), or "
                         f"set --out_dir to a run's folder")
    model, checkpoint = load_model(path, cfg.device, use_kernels=False)  # the references, as recomputed
    config, tok = model.config, checkpoint_tokenizer(checkpoint, path)
    check_index('layer', cfg.layer, config.n_layer, 'this model has {} layers')
    check_index('head', cfg.head, config.n_head, 'this model has {} heads')
    if cfg.budget and config.attention != 'selective':
        raise SystemExit(f"--budget prunes Selective Attention's cache; this checkpoint's attention is "
                         f"'{config.attention}': drop --budget")
    if cfg.evict not in EVICTIONS:
        raise SystemExit(f"--evict={cfg.evict}: choose one of {', '.join(EVICTIONS)}")
    if 'evict' in given and not cfg.budget:
        raise SystemExit("--evict chooses what a pruned cache drops; it needs --budget=N (selective only)")
    if cfg.budget and cfg.budget < 2:
        raise SystemExit(f"--budget={cfg.budget}: a budget counts the first token and the current one, give >= 2")

    if cfg.png:  # an unwritable folder fails now, not after the maps are computed
        try:
            os.makedirs(cfg.png_dir or cfg.out_dir, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"cannot write pictures to {cfg.png_dir or cfg.out_dir} ({e.strerror}); give --png_dir "
                             f"or --png=False") from None

    ids = encode_prompt(cfg.start, tok)
    idx = torch.tensor([ids], dtype=torch.long, device=cfg.device)
    if cfg.max_new_tokens > 0:
        idx = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                             **({'budget': cfg.budget, 'evict': cfg.evict} if cfg.budget else {}))
    first_new, limit = len(ids), MAX_TOKENS if model.streams else config.block_size
    if idx.size(1) > limit:
        why = f'the {MAX_TOKENS} that T x T maps are drawn for' if model.streams else f'block_size={limit}'
        print(f"the text has {idx.size(1)} tokens, more than {why}: looking at its last {limit}")
        first_new -= idx.size(1) - limit
        idx = idx[:, -limit:]
    T = idx.size(1)
    check_index('token', cfg.token, T, 'the text has {} tokens', low=-T)

    maps = analyse(model, idx, cfg.budget, cfg.evict)
    pieces = [tok.decode([i]) for i in idx[0].tolist()]
    color = sys.stdout.isatty() and not os.environ.get('NO_COLOR')
    marks = {first_new: '»'} if 0 < first_new < T else {}
    generated = f'; {T - first_new} generated after »' if marks else ''
    print(f"{config.attention} attention, {config.n_layer} layers x {config.n_head} heads; {T} tokens{generated}")
    if config.attention == 'selective':
        report_selective(maps, pieces, color, cfg.budget, cfg.evict, cfg.layer, marks)
    if config.attention == 'infini':
        marks = {**{s: '|' for s in range(config.segment_len, T, config.segment_len)}, **marks}
        report_infini(maps, pieces, color, cfg.layer, cfg.head, marks, config.memory_read, config.segment_len)
    report_focus(maps, pieces, color, cfg.layer, cfg.head, cfg.token % T, marks, config.attention)
    if cfg.png:
        for path in pictures(maps, pieces, config, cfg.png_dir or cfg.out_dir, cfg.budget):
            print(f'wrote {path}')


if __name__ == '__main__':
    main(sys.argv[1:])
