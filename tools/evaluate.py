"""
How good are trained checkpoints at each context? Each evaluation is one function and one flag:

    python tools/evaluate.py --ckpt=out/ckpt.pt                            # val loss at 1/2, 1, 2, 4 x block_size
    python tools/evaluate.py --ckpt=out-in/ckpt.pt,out/ckpt.pt --contexts=256,512,1k    # a column per checkpoint
    python tools/evaluate.py --ckpt=out-passkey-infini/ckpt.pt --contexts=256,1k,4k,16k  # + passkey accuracy table
    python tools/evaluate.py --ckpt=out-selective/ckpt.pt --loss=False --search_budgets=True    # selective's KV budgets

  --loss            val loss at each context: the same target tokens read with more and more context before
                    them (the last --scored tokens of windows that end at the same place), so a falling loss is
                    what a longer context buys. Past block_size a fixed-context model is n/a (--extend=True tiles
                    its positions).
  --passkey         passkey retrieval accuracy by length and depth, greedy decoding (on by itself for
                    checkpoints trained on data/passkey).
  --search_budgets  Selective Attention: the smallest per-layer KV-cache budgets that keep val loss under --target.

Each evaluation prints a markdown table and writes it, with a CSV of its numbers, to out_dir/<name>.md and .csv.
Both grow as the cases finish, so a stopped run keeps what it measured. A case that runs out of memory is OOM, a
context a model cannot take is n/a: the other cases still run.
"""
import math
import os
import signal
import sys
from types import SimpleNamespace

if __name__ == '__main__':  # Ctrl-C while torch loads ends with one line; run_script (devices.py) takes over
    signal.signal(signal.SIGINT, lambda *_: sys.exit('interrupted while starting: nothing was written'))

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root: this script runs as python tools/evaluate.py
from checkpoints import load_model  # noqa: E402
from configurator import configure, flags_of  # noqa: E402
from devices import autocast, default_device, device_type_of, resolve_dtype, run_script  # noqa: E402
from model import cross_entropy  # noqa: E402
from tools.report import (GrowingTable, check_out_dir, context_list, fmt_bytes, fmt_context, guarded,  # noqa: E402
                          header_lines, least_seconds, markdown_table)

# -----------------------------------------------------------------------------------------------------------
ckpt = 'out/ckpt.pt'       # a train.py checkpoint, or several separated by commas (one column each)
device = ''                # '' = cuda if available, else mps, else cpu (devices.default_device)
dtype = ''                 # autocast dtype; '' = bfloat16 on CUDA (float16 where bf16 is missing), else float32
use_kernels = True         # False forces every attention's PyTorch reference
memory_read = ''           # infini's memory-read ablation: '' = as trained, 'off' (A_mem = 0) or 'local' (gate 0)
data_dir = ''              # '' = data/<the checkpoint's dataset>
out_dir = 'eval_out'       # where the markdown and the CSV go
case_seconds = 600.0       # a case whose FLOPs alone would take longer here is not started (0 = no limit)
contexts = ''              # comma-separated, k/M suffixes allowed; '' = 1/2, 1, 2, 4 x the first block_size
eval_windows = 64          # val loss: this many seeded windows (each context reads back from the same ends)
scored = 0                 # val loss by context: the last tokens of each window that are scored, the same at every
                           # context; 0 = half the shortest context
batch_size = 1             # windows per forward
seed = 1337
extend = False             # past block_size, tile the position table (as fine-tuning does) instead of n/a
# the evaluations
loss = True                # val loss at each context
passkey = False            # passkey accuracy even if no checkpoint was trained on data/passkey
depths = '0,0.25,0.5,0.75,1'   # passkey: where the key sits, as a fraction of the filler
passkey_trials = 4         # passkey: examples per (length, depth) cell
search_budgets = False     # selective: search the per-layer KV budgets
# budgets: the val loss the pruned model may reach: '+0.02' (an increase over its own unpruned loss), '1.95' (a
# loss), or a checkpoint whose full-cache val loss is the target (the paper's criterion: a standard model's loss)
target = '+0.02'
shrink = 0.8               # budgets: each greedy step cuts one layer's budget to this fraction of itself
evict = 'F'                # budgets: the cache evicts the most-masked entry ('F') or the oldest ('window': the first
                           # token + a sliding window, the baseline that tells F's saving from recency's)
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def load_val_data(checkpoint, data_dir=''):
    """val.bin of the checkpoint's dataset (or of data_dir) as a memmap, and the dataset's meta."""
    from data.common import check_tokens, load_meta, resolve_data_dir
    run = checkpoint.get('config', {})
    folder = data_dir or resolve_data_dir(run.get('data_dir', ''), str(run.get('dataset')))
    path = os.path.join(folder, 'val.bin')
    if not os.path.isfile(path):
        raise SystemExit(f"no {path}: prepare the dataset (python data/<name>/prepare.py) or pass --data_dir=")
    meta = load_meta(folder)
    if checkpoint.get('tokenizer') not in (None, meta['tokenizer']):  # fine data, for another model
        data_kind, model_kind = (t.get('kind') if isinstance(t, dict) else t
                                 for t in (meta['tokenizer'], checkpoint['tokenizer']))
        raise SystemExit(f"{folder} holds {data_kind} tokens; the checkpoint was trained on another vocabulary "
                         f"({model_kind} tokens): give --data_dir= a dataset prepared with the checkpoint's tokenizer")
    check_tokens(path, checkpoint['model_args']['vocab_size'])
    return np.memmap(path, dtype=np.uint16, mode='r'), meta


def load_evaluated(path, settings):
    """One checkpoint to evaluate: its model, val data, dataset meta and a label for the tables."""
    ablation = {'memory_read': settings.memory_read} if settings.memory_read else {}  # attention_infini.py
    model, checkpoint = load_model(path, settings.device, use_kernels=settings.use_kernels, **ablation)
    if ablation and 'memory_read' not in model.attention.call_options:
        raise SystemExit(f"--memory_read ablates Infini-attention's memory; {path} is '{model.config.attention}': "
                         f"drop --memory_read")
    data, meta = load_val_data(checkpoint, settings.data_dir)
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    label = f'{folder} ({model.config.attention}, block {fmt_context(model.config.block_size)})'
    label += f', memory_read={settings.memory_read}' if ablation else ''
    return SimpleNamespace(path=path, label=label, model=model, checkpoint=checkpoint, data=data, meta=meta,
                           trained=model.config.block_size, example_len=meta.get('example_len'))


def fit_context(run, T, extend):
    """Past block_size, with --extend, tile a fixed-context model's position table; True when T is past what the
    model was trained for (its number is then marked *)."""
    if not extend or run.model.streams or T <= run.trained:
        return False
    if T > run.model.config.block_size:
        run.model.resize_block_size(T)
    return True


# -----------------------------------------------------------------------------------------------------------
# val loss by context

@torch.no_grad()
def val_loss(model, data, T, settings, example_len=None, **options):
    """Mean next-token loss over eval_windows windows of T tokens, the same seeded windows for every model.
    options go to every forward (selective's budget and evict: a pruned cache simulated in parallel).

    When the dataset is made of fixed-length examples (passkey), windows start on example boundaries and, as in
    train.py, the first token of an example is no target: nothing before it predicts it."""
    stride = example_len or 1
    count = (len(data) - T - 1) // stride + 1
    if count < 1:
        raise ValueError(f'val.bin has {len(data)} tokens, fewer than a window of {T + 1}')
    check_fits(model, settings, T, with_logits=True)
    starts = np.random.default_rng([settings.seed, T]).integers(0, count, settings.eval_windows) * stride
    targets = torch.arange(1, T + 1, device=settings.device) % example_len != 0 if example_len else None
    total, n = 0.0, 0
    for i in range(0, len(starts), settings.batch_size):
        batch = np.stack([data[s:s + T + 1] for s in starts[i:i + settings.batch_size]]).astype(np.int64)
        batch = torch.from_numpy(batch).to(settings.device)
        x, y = batch[:, :-1], batch[:, 1:].contiguous()  # GPT's loss views the targets flat
        if targets is not None:
            y = y.masked_fill(~targets, -1)  # ignored by the loss (out of place: y may share x's storage)
        with autocast(settings.device_type, settings.dtype):
            logits, _ = model(x, y, **options)
        # the language-model loss alone: GPT's loss would add an attention's auxiliary training loss
        total += cross_entropy(logits.float(), y, reduction='sum').item()
        n += (y != -1).sum().item()
    return total / n


def check_fits(model, settings, T, with_logits):
    """Refuse a case that cannot fit in free memory before allocating it (a MemoryError reads OOM). The estimate:
    the float32 logits twice (the model's and the loss's log-softmax) and a few activations of width n_embd. It is
    an estimate, not a bound: a case it lets through may still run out of memory, and then reads OOM."""
    c = model.config
    need = settings.batch_size * T * 4 * (2 * c.vocab_size * with_logits + 8 * c.n_embd)
    free = free_memory_bytes(settings)
    if free is not None and need > free:
        raise MemoryError(f'context {fmt_context(T)} needs at least {fmt_bytes(need)}, {fmt_bytes(free)} is free')


def free_memory_bytes(settings):
    """Free memory on the device: the GPU's, or the machine's (Linux); None where it is not known."""
    if settings.device_type == 'cuda':
        return torch.cuda.mem_get_info(settings.device)[0]
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return None


def window_ends(data, longest, settings, example_len=None):
    """Where the windows of every context end (one past the last target), eval_windows of them, seeded. Each has
    room for the longest context before it, so every context reads back from the same ends. With fixed-length
    examples (passkey) a window ends where an example ends."""
    stride = example_len or 1
    first, last = -(-(longest + 1) // stride), len(data) // stride  # room for longest + 1 tokens before an end
    if last < first:
        raise ValueError(f'val.bin has {len(data)} tokens, fewer than a window of {longest + 1}')
    return np.random.default_rng([settings.seed]).integers(first, last + 1, settings.eval_windows) * stride


@torch.no_grad()
def context_losses(model, data, T, ends, scored, settings, example_len=None):
    """Per window: the mean loss of the last `scored` targets before each of ends, read with T tokens of context.

    The targets are the same at every T; only what comes before them changes. So the difference between two
    contexts is what the longer one adds. As in val_loss, the first token of an example is no target."""
    if T + 1 > len(data):
        raise ValueError(f'val.bin has {len(data)} tokens, fewer than a window of {T + 1}')
    if T + 1 > ends.min():
        raise ValueError(f'val.bin has too few tokens before its windows\' ends for a context of {T}')
    losses = []
    for i in range(0, len(ends), settings.batch_size):
        part = ends[i:i + settings.batch_size]
        batch = torch.from_numpy(np.stack([data[e - T - 1:e] for e in part]).astype(np.int64)).to(settings.device)
        x, y = batch[:, :-1], batch[:, 1:].clone()
        y[:, :T - scored] = -1  # only the last `scored` targets count
        if example_len:
            positions = torch.from_numpy(part[:, None] - T + np.arange(T)).to(settings.device)  # of y in val.bin
            y = y.masked_fill(positions % example_len == 0, -1)
        with autocast(settings.device_type, settings.dtype):
            logits, _ = model(x, y)
        for row in range(len(part)):  # the language-model loss alone (GPT's would add an auxiliary loss)
            losses.append(cross_entropy(logits[row].float(), y[row], reduction='sum').item()
                          / (y[row] != -1).sum().item())
    return np.array(losses)


def mean_and_error(values):
    """The mean of per-window values and its standard error (None from one window)."""
    error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else None
    return float(values.mean()), error


def too_slow(model, T, sequences, settings):
    """Why a case of `sequences` forwards of T tokens is not started: its FLOPs alone would take longer than
    --case_seconds here (report.least_seconds; a signal cannot stop one long kernel call). '' when it may run."""
    if not settings.case_seconds:
        return ''
    least = least_seconds(model, T, sequences, settings.device, getattr(torch, settings.dtype))
    return f'not started: it would take over {least:.3g} s, past --case_seconds' if least > settings.case_seconds \
        else ''


def loss_by_context(runs, Ts, settings):
    """Val loss of every checkpoint at every context, on the same targets: out_dir/val_loss.md and .csv, a row as
    each case finishes."""
    if settings.scored < 0:
        raise SystemExit(f'--scored={settings.scored}: the scored targets of each window, >= 1 (0 = half the shortest '
                         f'context)')
    scored = settings.scored or max(1, Ts[0] // 2)
    if scored > Ts[0]:
        raise SystemExit(f'--scored={scored} is more targets than the shortest context, {Ts[0]}, has')
    table = GrowingTable(settings, 'val_loss', ['checkpoint', 'context', 'val_loss', 'stderr', 'change',
                                                'change_stderr', 'windows', 'scored', 'status', 'mark', 'message'])
    rows = []
    for run in tqdm(runs, desc='val loss', dynamic_ncols=True):
        longest = max([T for T in Ts if T < len(run.data)], default=Ts[0])
        first = None  # the per-window losses at this checkpoint's shortest context that ran
        for T in Ts:
            mark = '*' if fit_context(run, T, settings.extend) else ''
            slow = too_slow(run.model, T, settings.eval_windows, settings)
            if not run.model.streams and T > run.model.config.block_size:  # the header says why: no message
                losses, status, message = None, 'n/a', ''
            elif slow:
                losses, status, message = None, 'slow', slow
            else:
                def case():
                    check_fits(run.model, settings, T, with_logits=True)
                    ends = window_ends(run.data, longest, settings, run.example_len)
                    return context_losses(run.model, run.data, T, ends, scored, settings, run.example_len)
                losses, status, message = guarded(case, settings)
            row = dict(checkpoint=run.label, context=T, val_loss=None, stderr=None, change=None, change_stderr=None,
                       windows=settings.eval_windows, scored=scored, status=status or 'ok', mark=mark, message=message)
            if losses is not None:
                row['val_loss'], row['stderr'] = mean_and_error(losses)
                if first is None:
                    first = losses
                else:  # paired by window: the spread of the change, not of the windows
                    row['change'], row['change_stderr'] = mean_and_error(losses - first)
            rows.append(row)
            table.add(row)
    cells = {(r['checkpoint'], r['context']): r for r in rows}
    grid = [[fmt_context(T)] + [loss_cell(c) for c in (cells[run.label, T] for run in runs)] for T in Ts]
    lines = [f'val loss: the same {settings.eval_windows} x {scored} target tokens at every context (the last {scored} '
             f'of seeded windows that end at the same place), ± the standard error over windows; in brackets the '
             f'change from the shortest context, ± its standard error (paired by window): below 0, the longer '
             f'context helps',
             'past block_size, fixed-context models tile their position table (no training): marked *'
             if settings.extend else 'n/a past block_size: a fixed-context model cannot take it', '']
    lines += markdown_table('Val loss by context', ['context'] + [run.label for run in runs], grid)
    finish(table, settings, lines + failures(rows, 'context'))


def loss_cell(row):
    """'1.4523 ± 0.021 (-0.0312 ± 0.0040)', the status when it did not run."""
    if row['val_loss'] is None:
        return row['status']
    text = f"{row['val_loss']:.4f}{row['mark']}" + (f" ± {row['stderr']:.3f}" if row['stderr'] is not None else '')
    if row['change'] is not None:
        error = f" ± {row['change_stderr']:.4f}" if row['change_stderr'] is not None else ''
        text += f" ({row['change']:+.4f}{error})"
    return text


def failures(rows, key):
    """One line per case that did not run and says why (n/a past block_size needs no line: the header says it)."""
    return list(dict.fromkeys(f"{r['checkpoint']} at {fmt_context(r[key])}: {r['status']}, {r['message']}"
                              for r in rows if r['status'] != 'ok' and r['message']))


# -----------------------------------------------------------------------------------------------------------
# answer accuracy: does greedy decoding give the answer after the prompt, and what do the answer tokens cost

def answer_token_scores(logits, answers):
    """(right, loss) of the logits (B, A, vocab) that predict answers (B, A): right (B, A) is True where the answer
    token is the likeliest one, loss (B,) the mean cross-entropy of each example's answer tokens."""
    logits = logits.float()
    right = logits.argmax(-1) == answers
    loss = cross_entropy(logits, answers, reduction='none').view(answers.shape).mean(-1)
    return right, loss


@torch.no_grad()
def answer_scores(model, prompts, answers, **options):
    """Score a batch of prompts (B, P) and their answers (B, A), token ids on the model's device: (right, loss) as
    answer_token_scores gives them. options go to every forward.

    Greedy decoding gets an answer exactly right (right.all(-1)) when each answer token is the likeliest one given
    the prompt and the right answer tokens before it (by induction over the answer's tokens). So teacher forcing
    decides it, and gives the answer's loss too. Each answer token is read with the context GPT.generate gives it:
    a streaming model reads the prompt through its cache, block_size tokens at a time (its memory stays bounded);
    a model with a context limit sees at most the last block_size tokens (nanoGPT's cropping)."""
    B, P = prompts.shape
    A = answers.size(1)
    block_size = model.config.block_size
    if model.streams:  # the prompt through the cache, as GPT.prefill reads it, then the answer in one forward
        cache = model.new_cache(B, P + A)
        for start in range(0, P, block_size):
            logits, _ = model(prompts[:, start:start + block_size], cache=cache, **options)
        if A > 1:
            rest, _ = model(answers[:, :-1], answers[:, 1:], cache=cache, **options)
            logits = torch.cat((logits[:, -1:], rest), dim=1)
    elif P + A - 1 <= block_size:  # one forward over prompt + answer
        ids = torch.cat((prompts, answers), dim=1)
        targets = ids[:, 1:].clone()
        targets[:, :-A] = -1  # only the answer's tokens are targets
        logits, _ = model(ids[:, :-1], targets, **options)
        logits = logits[:, -A:]
    else:  # past block_size each answer token sees its own window, the last block_size tokens before it
        ids = torch.cat((prompts, answers), dim=1)
        logits = torch.cat([model(ids[:, max(0, P + j - block_size):P + j], **options)[0] for j in range(A)], dim=1)
    return answer_token_scores(logits, answers)


# -----------------------------------------------------------------------------------------------------------
# passkey accuracy by length and depth

def passkey_accuracy(model, tok, length, depth, settings):
    """Fraction of passkey_trials examples of `length` tokens whose answer greedy decoding gets exactly right."""
    from data.passkey.task import make_passkey
    rng = np.random.default_rng([settings.seed, length, int(depth * 1000)])
    examples = [make_passkey(length, depth, rng, tok) for _ in range(settings.passkey_trials)]
    correct = 0
    for prompt, answer in examples:  # one at a time: with a BPE tokenizer answers differ in length
        prompts = torch.tensor([prompt], dtype=torch.long, device=settings.device)
        answers = torch.tensor([answer], dtype=torch.long, device=settings.device)
        with autocast(settings.device_type, settings.dtype):
            right, _ = answer_scores(model, prompts, answers)
        correct += bool(right.all())
    return correct / len(examples)


def heat(accuracy):
    """A shade per accuracy, so a table of them reads as a heatmap."""
    return ' ░▒▓█'[round(accuracy * 4)] + f' {accuracy:.0%}'


def passkey_by_length_and_depth(runs, Ts, settings):
    """A depth x length table of passkey accuracy per checkpoint: out_dir/passkey.md and .csv, a row as each case
    finishes."""
    from data.tokenizers import tokenizer_from_meta
    fractions = depth_list(settings.depths)
    table = GrowingTable(settings, 'passkey', ['checkpoint', 'length', 'depth', 'accuracy', 'status', 'message'])
    rows = []
    bar = tqdm(total=len(runs) * len(Ts) * len(fractions), desc='passkey', dynamic_ncols=True)
    for run in runs:
        tok = tokenizer_from_meta(run.checkpoint.get('tokenizer') or run.meta)
        for depth in fractions:
            for T in Ts:
                fit_context(run, T, settings.extend)

                def case():
                    seen = T if run.model.streams else min(T, run.model.config.block_size)  # generate crops
                    check_fits(run.model, settings, seen, with_logits=False)
                    return passkey_accuracy(run.model, tok, T, depth, settings)
                slow = too_slow(run.model, T, settings.passkey_trials, settings)
                value, status, message = (None, 'slow', slow) if slow else guarded(case, settings)
                rows.append(dict(checkpoint=run.label, length=T, depth=depth, accuracy=value,
                                 status=status or 'ok', message=message))
                table.add(rows[-1])
                bar.update()
    bar.close()
    past = ('read the whole prompt with tiled positions' if settings.extend else
            'see only the last block_size tokens (nanoGPT cropping; --extend=True tiles positions instead)')
    lines = [f'Passkey retrieval: {settings.passkey_trials} examples per cell, greedy decoding; past their '
             f'block_size fixed-context models {past}', '']
    cells = {(r['checkpoint'], r['length'], r['depth']): r for r in rows}
    for run in runs:
        grid = [[f'{depth:g}'] + [heat(c['accuracy']) if c['accuracy'] is not None else c['status']
                                  for c in (cells[run.label, T, depth] for T in Ts)] for depth in fractions]
        lines += markdown_table(f'Passkey accuracy, {run.label}: depth (rows) by length (columns)',
                                ['depth'] + [fmt_context(T) for T in Ts], grid)
    finish(table, settings, lines + failures(rows, 'length'))


def depth_list(text):
    try:
        fractions = [float(d) for d in text.split(',') if d]
    except ValueError:
        fractions = []
    if not fractions or not all(0 <= d <= 1 for d in fractions):
        raise SystemExit(f"--depths is a comma-separated list of fractions between 0 and 1, not '{text}'")
    return fractions


# -----------------------------------------------------------------------------------------------------------
# Selective Attention's KV budgets: the smallest per-layer budgets that keep val loss under a target, chosen
# greedily on validation data. The pruning is simulated in one parallel forward (the forward's budget option):
# within a layer, F depends only on that layer's queries and keys, so which tokens the evicting cache holds at
# each step can be replayed from the full F. tests/test_selective.py checks that it equals token-by-token decoding.

def pruned_val_loss(model, data, budgets, settings, example_len=None):
    """val_loss at block_size with layer l's cache pruned to budgets[l] entries."""
    return val_loss(model, data, model.config.block_size, settings, example_len, budget=budgets, evict=settings.evict)


def choose_budgets(full, loss_of, target, shrink=0.8, progress=None, first_loss=None):
    """Greedy search from the full budgets (one per layer): each round, try cutting each layer's budget to
    `shrink` of itself and keep the one cut whose loss_of(budgets) is least; stop when even that cut would pass
    target. Returns the steps taken, [(budgets, loss)], the first being the unpruned model (first_loss: its loss,
    when already known). progress(budgets, loss) is called at each step taken."""
    steps = [(full, loss_of(full) if first_loss is None else first_loss)]
    while steps[-1][1] <= target:
        current = steps[-1][0]
        trials = [current[:l] + [max(2, min(b - 1, round(shrink * b)))] + current[l + 1:]
                  for l, b in enumerate(current) if b > 2]
        if not trials:
            break
        loss, best = min((loss_of(t), t) for t in trials)
        if loss > target:
            break
        steps.append((best, loss))
        if progress:
            progress(best, loss)
    return steps


def selective_budgets(run, settings):
    """The budget search on one selective checkpoint, and its KV memory: out_dir/budgets.md and .csv (a row per
    greedy step, as it is taken)."""
    model, data, example_len = run.model, run.data, run.example_len
    block_size, n_layer = model.config.block_size, model.config.n_layer
    full_entries = n_layer * block_size  # a standard KV cache's, every layer holding a full window
    table = GrowingTable(settings, 'budgets', ['step', 'entries', 'val_loss', 'budgets'])

    def progress(b, loss):
        table.add(dict(step=table.count, entries=sum(b), val_loss=loss, budgets=' '.join(map(str, b))))
        if table.count > 1:
            print(f'  budgets {b}: {sum(b)} entries, val loss {loss:.4f}')

    full = pruned_val_loss(model, data, [block_size] * n_layer, settings, example_len)
    progress([block_size] * n_layer, full)
    goal, source, reference = budget_target(settings, full, data, block_size, example_len)
    print(f'target val loss {goal:.4f} ({source}); unpruned selective {full:.4f}; greedy search over {n_layer} '
          f'layers')
    steps = choose_budgets([block_size] * n_layer, lambda b: pruned_val_loss(model, data, b, settings, example_len),
                           goal, settings.shrink, progress, first_loss=full)
    chosen, loss = steps[-1]

    # memory of a real cache with these budgets after a full window, against a standard KV cache of block_size tokens
    cache = model.new_cache(1, block_size, budget=chosen, evict=settings.evict)
    with torch.no_grad():
        model(torch.from_numpy(data[:block_size].astype(np.int64))[None].to(settings.device), cache=cache)
    per_entry = 2 * model.config.n_head * model.config.head_size * next(model.parameters()).element_size()
    reached = 'reached' if loss <= goal else 'NOT reached: the unpruned selective model is already above it'
    lines = [f'checkpoint: {run.path} (block_size {block_size}, {n_layer} layers) · val loss: '
             f'{settings.eval_windows} windows of {block_size} tokens · eviction: {settings.evict}',
             f'target val loss {goal:.4f} ({source}): {reached}', '']
    lines += markdown_table('Budgets per layer (KV entries kept, first token and current one included)',
                            ['layer', 'budget', 'of block_size'],
                            [[str(l), str(b), f'{b / block_size:.1%}'] for l, b in enumerate(chosen)])
    rows = [['selective, full cache', str(full_entries), fmt_bytes(full_entries * per_entry), f'{full:.4f}'],
            ['selective, pruned to the budgets', str(sum(chosen)), fmt_bytes(sum(chosen) * per_entry), f'{loss:.4f}'],
            ['the pruned cache.nbytes() (+ F and positions)', str(sum(chosen)), fmt_bytes(cache.nbytes()), '']]
    if reference:
        rows.append([reference, str(full_entries), fmt_bytes(full_entries * per_entry), f'{goal:.4f}'])
    lines += markdown_table('KV memory (keys and values of all layers, batch 1)',
                            ['model', 'entries', 'bytes', 'val loss'], rows)
    lines.append(f'memory reduction: {full_entries / sum(chosen):.1f}x fewer KV entries (the paper counts these: '
                 f'16x, 25x, 47x at contexts 512, 1k, 2k)')
    finish(table, settings, lines)


def budget_target(settings, full, data, block_size, example_len):
    """--target as (the val loss to stay under, where it comes from, the reference model's row label or None)."""
    target = settings.target
    if os.path.isfile(target):  # the paper's criterion: the val loss of another model (a standard one), full cache
        reference, _ = load_model(target, settings.device, use_kernels=settings.use_kernels)
        goal = val_loss(reference, data, block_size, settings, example_len)
        label = f'{target} ({reference.config.attention}, n_head={reference.config.n_head}), full cache'
        return goal, f'val loss of {label}', label
    try:
        given = float(target)
    except ValueError:
        raise SystemExit(f"--target is '+0.02' (an increase), a loss like '1.95', or a checkpoint path, "
                         f"not '{target}'") from None
    if target.startswith('+'):
        return full + given, f'unpruned loss {full:.4f} {target}', None
    return given, 'given', None


# -----------------------------------------------------------------------------------------------------------

def setup(argv):
    """The flags as a settings object, checked, with the device and dtype resolved."""
    settings, given = configure(argv, FLAGS, __doc__)
    if 'evict' in given and not settings.search_budgets:
        raise SystemExit("--evict chooses the cache eviction of --search_budgets=True (Selective Attention); drop it")
    settings.device = settings.device or default_device()
    settings.device_type = device_type_of(settings.device)
    settings.dtype = resolve_dtype(settings.dtype, settings.device_type)
    settings.gpu_error = ''  # the first CUDA error, kept by report.guarded
    check_out_dir(settings.out_dir)  # a bad --out_dir fails now, not after the measuring
    if min(settings.eval_windows, settings.batch_size, settings.passkey_trials) < 1:
        raise SystemExit('eval_windows, batch_size and passkey_trials must be >= 1')
    if settings.seed < 0:
        raise SystemExit(f'--seed={settings.seed} must be >= 0')
    if not 0 < settings.shrink < 1:
        raise SystemExit(f'--shrink is a fraction between 0 and 1, not {settings.shrink}')
    if not math.isfinite(settings.case_seconds) or settings.case_seconds < 0:
        raise SystemExit(f'--case_seconds is a time limit in seconds (0: none), not {settings.case_seconds:g}')
    if settings.evict not in ('F', 'window'):
        raise SystemExit(f"--evict is 'F' (the most-masked entry leaves) or 'window' (the oldest), not "
                         f"'{settings.evict}'")
    depth_list(settings.depths)  # bad depths fail now, not after the val loss
    if settings.device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py evaluates
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(settings.seed)
    return settings


def finish(table, settings, lines):
    """An evaluation's full tables: printed, and written over its running markdown table."""
    table.finish(header_lines(settings) + lines)
    print(f'wrote {table.md_path} and {table.csv_path}')


def main(argv):
    settings = setup(argv)
    paths = [p for p in settings.ckpt.split(',') if p]
    if not paths:
        raise SystemExit('--ckpt is a train.py checkpoint (several: comma-separated), like out/ckpt.pt')
    if settings.search_budgets and len(paths) > 1:
        raise SystemExit("--search_budgets searches one checkpoint's budgets: give one --ckpt")
    runs = [load_evaluated(path, settings) for path in paths]
    tokenizers = {str(run.checkpoint.get('tokenizer')) for run in runs}
    if len(tokenizers) > 1:  # their losses are per token: tokens of different tokenizers do not compare
        raise SystemExit(f"the checkpoints use different tokenizers ({', '.join(sorted(tokenizers))}): evaluate "
                         f"each on its own, their losses are not per the same tokens")
    model = runs[0].model
    if settings.search_budgets and 'budget' not in model.attention.cache_options:  # before the other evaluations
        raise SystemExit(f"--search_budgets prunes a cache to a budget; {runs[0].path}'s attention "
                         f"'{model.config.attention}' takes none: give a checkpoint trained with --attention=selective")
    Ts = context_list(settings, ','.join(str(runs[0].trained * m // 2) for m in (1, 2, 4, 8)))
    trained_on_passkey = any(str(run.meta.get('dataset', '')).startswith('passkey') for run in runs)
    if not (settings.loss or settings.passkey or trained_on_passkey or settings.search_budgets):
        raise SystemExit("nothing to evaluate: --loss=False turns off the only evaluation asked for; add "
                         "--passkey=True or --search_budgets=True")
    if settings.loss:
        loss_by_context(runs, Ts, settings)
    if settings.passkey or trained_on_passkey:
        passkey_by_length_and_depth(runs, Ts, settings)
    if settings.search_budgets:
        selective_budgets(runs[0], settings)


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
