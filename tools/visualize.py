"""
See what each attention does in a trained model, on a prompt; every global below is a flag:

  python tools/visualize.py --ckpt=out-selective/ckpt.pt --budget=32
  python tools/visualize.py --ckpt=out-infini/ckpt.pt --start=FILE:prompt.txt --layer=2 --head=1
  python tools/visualize.py --ckpt=out-in/ckpt.pt --token=10 --max_new_tokens=40

The text is printed with each token shaded by what the attention did to it (docs/visualize.md reads an example):
  selective  the mask F on the token at the end of the text, in nats: e^-F multiplies its attention weight in
             every head. With --budget, the tokens a layer's pruned cache no longer holds are struck out.
  infini     the share of the token's output read from memory rather than from local attention ('|' starts a
             segment), after a table of the gates sigmoid(beta).
  all four   where the attention of one token (--token, default the last) went, layer by layer.
Colours on a terminal unless NO_COLOR is set; elsewhere (a pipe, a log) a row of digits 0-9 under each line.
With matplotlib, PNGs too: every layer's and head's attention map, selective's F, infini's gates.

Each attention shows what it can (its maps method, model.py): the maps are recomputed from each block's inputs
(caught by forward hooks) with the attention file's own reference, and each layer's recomputed output is checked
against the model's own.
"""

import os
import signal
import sys

if __name__ == '__main__':  # Ctrl-C while torch loads ends with one line; run_script (devices.py) takes over
    signal.signal(signal.SIGINT, lambda *_: sys.exit('interrupted while starting: nothing was written'))

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root: this script runs as python tools/visualize.py
from checkpoints import load_model  # noqa: E402
from configurator import configure, flags_of  # noqa: E402
from data.tokenizers import checkpoint_tokenizer, encode_prompt  # noqa: E402
from devices import default_device, device_type_of, run_script  # noqa: E402
from sample import check_sampling, inference_options  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
ckpt = 'out/ckpt.pt'    # the checkpoint to look at (train.py writes out_dir/ckpt.pt)
start = 'import os\n\n\ndef join(a, b):\n    """Join two paths."""\n    return os.path.join(a, b)\n'  # or FILE:path
max_new_tokens = 0      # tokens to generate after the prompt, looked at with it
temperature = 0.8
top_k = 200
seed = 1337
budget = ''             # selective only: KV entries each layer keeps, an int or one per layer ('8,16'); '' = all
evict = 'F'             # selective with a budget: evict the most masked entry ('F') or the oldest ('window')
layer = -1              # the layer to show, 0..n_layer-1; -1 = the mean over layers
head = -1               # the head to show, 0..n_head-1; -1 = the mean over heads
token = -1              # the token whose attention is shown: its index in the text, negative from the end
png = True              # write pictures (needs matplotlib)
png_dir = ''            # where the pictures go; '' = the checkpoint's folder
device = ''             # '' = cuda if available, else mps, else cpu (devices.default_device)
FLAGS = flags_of(globals())  # every setting above, with its default
# -----------------------------------------------------------------------------------------------------------

CHECK_TOLERANCE = 1e-4  # how far a recomputed output may be from the model's, relative to its largest value
F_SCALE = 9  # selective's shades: F in nats, capped here (a weight times e^-9 = 1/8103 is as good as gone)
HEAT = (230, 229, 228, 221, 214, 208, 202, 196, 160)  # 256-colour backgrounds of the digits 1..9, pale to red
WIDTH = 100  # columns per printed line
MAX_TOKENS = 2048  # the longest text looked at by a streaming model (infini): the maps are T x T per layer and head


# -----------------------------------------------------------------------------------------------------------
# The maps: each block's inputs from one forward, then what its attention shows of itself.

def capture(model, idx, options):
    """The inputs (x, x0) and output of every layer's attention in one forward over idx, by forward hooks."""
    seen = []
    hooks = [block.attn.register_forward_hook(lambda module, args, out: seen.append((args[0], args[1], out)))
             for block in model.transformer.h]
    try:
        model(idx, **options)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def analyse(model, idx, tolerance=CHECK_TOLERANCE, **options):
    """Per layer a dict of maps, batch dimension dropped. options are the attention's (selective's budget and
    evict: its layers are pruned as the cache would be, in one parallel forward). A layer whose recomputed output
    is further than tolerance from the model's (relative to its largest value) gets a warning."""
    seen = capture(model, idx, options)
    maps = []
    for i, (block, (x, x0, out)) in enumerate(zip(model.transformer.h, seen)):
        m = block.attn.maps(x, x0, **options)
        mine = block.attn.c_proj(m.pop('y').transpose(1, 2).reshape(out.shape).to(out.dtype))
        error = float((mine - out).abs().max() / out.abs().max().clamp_min(1e-12))
        if error > tolerance:
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


def report_focus(maps, pieces, color, layer, head, query, marks, attention, what):
    att = torch.stack([pick(m['att'][:, query], head) for m in maps])  # (L, T): row `query` of each map
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

def pictures(maps, pieces, config, what, folder, budget):
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
            selects = ' (selects)' if 'F' in maps[i] and h == config.selection_head else ''
            label(axs[i][h], f'layer {i} head {h}{selects}')
    axs[-1][0].set(xlabel='token', ylabel='query')
    fig.suptitle(f'{attention} attention{what}: query (row) to token (column)', fontsize=10)
    save(fig, f'{attention}_maps.png')

    if 'F' in maps[0]:  # selective's F as each query sees it; under a budget, grey where the cache has evicted
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

    if 'gate' in maps[0]:  # infini's gates, and per layer the memory share of every token (mean over heads)
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
    cfg, _ = configure(argv, FLAGS, __doc__)
    device = cfg.device or default_device()
    device_type_of(device)  # a one-line error for a device torch does not know or cannot see
    check_sampling(cfg.temperature, cfg.top_k, cfg.max_new_tokens)
    if cfg.seed < 0:
        raise SystemExit(f"--seed={cfg.seed} must be >= 0")
    torch.manual_seed(cfg.seed)
    path = cfg.ckpt
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}: train one first (python train.py --out_dir=DIR writes "
                         f"DIR/ckpt.pt), or set --ckpt to a run's ckpt.pt")
    model, checkpoint = load_model(path, device, use_kernels=False)  # the references, as the maps recompute them
    config, tok = model.config, checkpoint_tokenizer(checkpoint, path)
    check_index('layer', cfg.layer, config.n_layer, 'this model has {} layers')
    check_index('head', cfg.head, config.n_head, 'this model has {} heads')
    options = inference_options(model, cfg.budget, cfg.evict)

    if cfg.png:  # an unwritable folder fails now, not after the maps are computed
        folder = cfg.png_dir or os.path.dirname(path) or '.'
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f'.write_test_{os.getpid()}')
            open(probe, 'w').close()
            os.remove(probe)
        except OSError as e:
            raise SystemExit(f"cannot write pictures to {folder} ({e.strerror}); give --png_dir or --png=False") \
                from None

    ids = encode_prompt(cfg.start, tok)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    if cfg.max_new_tokens > 0:
        idx = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, **options)
    first_new, limit = len(ids), MAX_TOKENS if model.streams else config.block_size
    if idx.size(1) > limit:
        why = f'the {MAX_TOKENS} that T x T maps are drawn for' if model.streams else f'block_size={limit}'
        print(f"the text has {idx.size(1)} tokens, more than {why}: looking at its last {limit}")
        first_new -= idx.size(1) - limit
        idx = idx[:, -limit:]
    T = idx.size(1)
    check_index('token', cfg.token, T, 'the text has {} tokens', low=-T)

    maps = analyse(model, idx, **options)
    pieces = [tok.decode([i]) for i in idx[0].tolist()]
    color = sys.stdout.isatty() and not os.environ.get('NO_COLOR')
    marks = {first_new: '»'} if 0 < first_new < T else {}
    generated = f'; {T - first_new} generated after »' if marks else ''
    print(f"{config.attention} attention, {config.n_layer} layers x {config.n_head} heads; {T} tokens{generated}")
    # what an attention shows beyond its weights: selective's F, infini's gates and memory share
    if 'F_end' in maps[0]:
        report_selective(maps, pieces, color, cfg.budget, cfg.evict, cfg.layer, marks)
    if 'memory_share' in maps[0]:
        marks = {**{s: '|' for s in range(config.segment_len, T, config.segment_len)}, **marks}
        report_infini(maps, pieces, color, cfg.layer, cfg.head, marks, config.memory_read, config.segment_len)
    report_focus(maps, pieces, color, cfg.layer, cfg.head, cfg.token % T, marks, config.attention,
                 model.attention.maps_note)
    if cfg.png:
        for path in pictures(maps, pieces, config, model.attention.maps_note, cfg.png_dir or os.path.dirname(path),
                             cfg.budget):
            print(f'wrote {path}')


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
