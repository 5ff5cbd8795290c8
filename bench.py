"""
How long a context can each attention run on my GPU, and at what speed? One command answers it:

    python bench.py                        # GPT-2 small shape, contexts 1k to 1M, every attention
    python bench.py --vram_gb=8            # the same within 8 GiB, to emulate a gaming GPU on a larger card
    python bench.py --device=cpu --n_layer=2 --n_head=2 --n_embd=64 --contexts=128,256

Modes (--mode=..., one function each, dispatched at the bottom):
  speed    inference (prefill T tokens, then decode N one at a time with the attention's cache) and training
           (one forward + backward at batch B) at each context: peak memory, tokens/s, cache bytes per token.
           Random weights and random tokens: speed and memory do not depend on what the model knows.
  kernels  each Triton kernel of kernels.py against its PyTorch reference and against SDPA (needs CUDA).
  compile  each Triton kernel compiled for several GPUs (no GPU needed): registers, spills, shared memory.
  quality  checkpoints' val loss at several contexts, and passkey retrieval accuracy by length and depth.
  budgets  selective: the per-layer KV-cache budgets that keep a checkpoint's val loss under --target.

Memory: on CUDA, torch.cuda.max_memory_allocated after a reset (weights, cache, activations: everything). A CPU
has no allocator to ask, so there inference counts weights + cache, and training weights + gradients + the
tensors autograd saves for backward (transient tensors, like an attention matrix freed at once, are missed).
Timings: warm-up runs first, then the median of `repeats` runs, synchronised on CUDA.
Every case runs guarded: out of memory is recorded as OOM and that attention's longer contexts are not run; a
context an attention cannot take is n/a; anything else is 'error' with its message; the bench always goes on.
"""
import csv
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from model import ATTENTIONS, GPT, GPTConfig, cross_entropy
from train import configure as configure_flags, load_checkpoint as read_checkpoint

# -----------------------------------------------------------------------------------------------------------
# flags: every global below is a --key=value flag (add new ones above FLAGS); '' = a default set by setup()
mode = 'speed'             # speed | kernels | compile | quality | budgets
device = ''                # cuda if available, else cpu
dtype = ''                 # bfloat16 on CUDA (float16 where bf16 is missing), float32 on CPU; compile: bfloat16
attentions = ','.join(ATTENTIONS)
contexts = ''              # comma-separated, k/M suffixes allowed (1k = 1024); '' = the mode's default list
n_layer = 12               # model shape: GPT-2 small by default
n_head = 12
n_embd = 768
vocab_size = 50304
segment_len = 64           # infini's segment
budget = ''                # selective: KV entries kept per layer, one int or one per layer ('' = no pruning)
absorb = True              # in: decode with the absorbed fast path; False: the re-projection reference
use_kernels = True         # False forces every attention's PyTorch reference
batch_size = 1
batches = ''               # kernels mode: batch sizes to time, comma-separated ('' = batch_size)
decode_tokens = 64         # N tokens decoded one at a time after the prefill
warmup = 1
repeats = 3                # a timing is the median of this many runs
case_seconds = 0.0         # > 0: a case slower than this (all its runs) skips its attention's longer contexts
vram_gb = 0.0              # > 0: cap this process's CUDA memory at that many GiB (a smaller GPU)
out_dir = 'bench_out'      # where the CSV, the markdown tables and the PNG go
seed = 1337
# compile mode: compute capabilities (80 A100, 86 RTX 30, 89 RTX 40, 90 H100, 120 RTX 50)
archs = '80,86,89,90,120'
# quality mode
ckpt = ''                  # one train.py checkpoint, or several separated by commas (one column each)
data_dir = ''              # '' = data/<the checkpoint's dataset>
eval_windows = 16          # val loss at a context = mean over this many random windows of it (seeded)
extend = False             # past block_size, tile the position table (as fine-tuning does) instead of n/a
passkey = False            # passkey accuracy even if the checkpoint was not trained on data/passkey
depths = '0,0.25,0.5,0.75,1'
passkey_trials = 4         # examples per (length, depth) cell
# budgets mode (selective): the val loss the pruned model may reach: '+0.02' (an increase over its own
# unpruned loss), '1.95' (a loss), or a checkpoint whose full-cache val loss is the target (the paper's)
target = '+0.02'
shrink = 0.8               # budgets mode: each greedy step cuts one layer's budget to this fraction of itself
FLAGS = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))]
# -----------------------------------------------------------------------------------------------------------

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
HERE = os.path.dirname(os.path.abspath(__file__))
device_type, ptdtype = 'cpu', torch.float32  # set from the flags by setup()


def configure(argv):
    """nanoGPT's --key=value flags, typed by each global's default (train.py's configurator)."""
    configure_flags(argv, globals(), FLAGS)


def parse_ints(flag, text, example='1024,4k,1M'):
    """'128,1k,1M' -> [128, 1024, 1048576]."""
    scale = {'k': 2 ** 10, 'm': 2 ** 20}
    try:
        return [int(s[:-1]) * scale[s[-1].lower()] if s[-1].lower() in scale else int(s)
                for s in text.replace(' ', '').split(',') if s]
    except ValueError:
        raise SystemExit(f"--{flag} is a comma-separated list of integers like {example}, not '{text}'") from None


def context_list(default):
    Ts = sorted(set(parse_ints('contexts', contexts or default)))
    if not Ts or Ts[0] < 2:
        raise SystemExit(f"--contexts needs lengths of at least 2 tokens, not '{contexts}'")
    return Ts


def attention_list():
    names = [s for s in attentions.replace(' ', '').split(',') if s]
    unknown = [s for s in names if s not in ATTENTIONS]
    if unknown or not names:
        raise SystemExit(f"--attentions: unknown '{','.join(unknown)}'; choose among {','.join(ATTENTIONS)}")
    return names


def cache_options(name):
    """Inference-time cache settings: selective's pruning budget, InAttention's decode path."""
    if name == 'in' and not absorb:
        return {'absorb': False}
    if not budget or name != 'selective':
        return {}
    b = parse_ints('budget', budget, '256 or 16,8,8,4')
    return {'budget': b[0] if len(b) == 1 else b}


# -----------------------------------------------------------------------------------------------------------
# measuring one case

def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()


gpu_error = ''  # the first CUDA error (an illegal address, a failed launch): it leaves the GPU unusable


def free_memory():
    gc.collect()
    if device_type == 'cuda' and not gpu_error:  # after a CUDA error, any call into CUDA raises it again
        torch.cuda.empty_cache()


def reset_peak():
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()


def peak_bytes():
    return torch.cuda.max_memory_allocated() if device_type == 'cuda' else None


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ('out of memory' in str(e) or "can't allocate memory" in str(e)))


def too_slow(seconds):
    """'slow' when a case took longer than --case_seconds (the next, longer one would take longer still)."""
    return 'slow' if 0 < case_seconds < seconds else None


def guarded(fn):
    """Run one case: (result, None, '') or (None, 'OOM' | 'n/a' | 'error' | '-', message). Memory is freed after."""
    global gpu_error
    if gpu_error:
        return None, '-', ''
    result, status, message = None, None, ''
    try:
        result = fn()
    except Exception as e:  # one case failing must not stop the bench: record what happened and go on
        status = 'OOM' if is_oom(e) else 'n/a' if isinstance(e, ValueError) else 'error'
        message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if status == 'error' and 'CUDA error' in str(e):
            gpu_error = message
            message += ' (the GPU is unusable after a CUDA error: no later case runs)'
    free_memory()  # outside the except block, so the traceback no longer holds the case's tensors
    return result, status, message


def autocast():
    """bf16/fp16 autocast on CUDA, as train.py computes; none in float32 or on the CPU."""
    if device_type == 'cuda' and ptdtype != torch.float32:
        return torch.autocast('cuda', dtype=ptdtype)
    return nullcontext()


def model_bytes(model):
    return sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())


def build_model(name, block_size, dtype_):
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd, attention=name, segment_len=segment_len, use_kernels=use_kernels)
    with torch.device(device):  # initialise on the device: a GPT-2 sized init on the CPU is slow
        model = GPT(config)
    return model.to(dtype_)


@torch.no_grad()
def measure_inference(model, T, options):
    """Prefill T random tokens into a fresh cache, then decode decode_tokens more one at a time."""
    B, N = batch_size, decode_tokens
    prompt = torch.randint(vocab_size, (B, T), device=device)
    following = torch.randint(vocab_size, (B, N), device=device)

    def run():
        cache = model.new_cache(B, max_len=T + N, **options)
        sync()
        t0 = time.perf_counter()
        model(prompt, cache=cache)
        sync()
        t1 = time.perf_counter()
        for i in range(N):
            model(following[:, i:i + 1], cache=cache)
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, cache.nbytes(), cache.length  # numbers only: the cache dies with the run

    for _ in range(warmup):
        run()
    reset_peak()
    runs = [run() for _ in range(repeats)]
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    cache_bytes = max(r[2] for r in runs)
    return dict(infer_bytes=float(peak_bytes() or model_bytes(model) + cache_bytes),
                prefill_tok_s=B * T / prefill_s,
                decode_tok_s=B * N / decode_s if N else None,
                cache_bytes_per_token=cache_bytes / (B * runs[0][3]))


def measure_training(model, T):
    """One forward + backward of B random sequences of T tokens (autocast on CUDA, as train.py trains)."""
    B = batch_size
    data = torch.randint(vocab_size, (B, T + 1), device=device)
    x, y = data[:, :-1], data[:, 1:].contiguous()  # GPT's loss views the targets flat
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def run():
        saved = {}  # CPU memory: storages autograd keeps for backward, by address so shared ones count once

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if device_type == 'cpu' else nullcontext()
        sync()
        t0 = time.perf_counter()
        with autocast(), hooks:
            _, loss = model(x, y)
        loss.backward()
        sync()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt, sum(saved.values())

    for _ in range(warmup):
        run()
    reset_peak()
    runs = [run() for _ in range(repeats)]
    weights_and_grads = 2 * sum(p.nbytes for p in model.parameters())
    return dict(train_bytes=float(peak_bytes() or weights_and_grads + max(r[1] for r in runs)),
                train_tok_s=B * T / statistics.median(r[0] for r in runs))


# -----------------------------------------------------------------------------------------------------------
# printing

def fmt_context(T):
    return f'{T >> 20}M' if T % 2 ** 20 == 0 else f'{T >> 10}k' if T % 2 ** 10 == 0 else str(T)


def fmt_bytes(n):
    for unit, size in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
        if n >= size:
            return f'{n / size:.3g} {unit}'
    return f'{n:.3g} B'


def fmt_rate(r):
    for unit, size in (('M', 1e6), ('k', 1e3)):
        if r >= size:
            return f'{r / size:.3g}{unit}'
    return f'{r:.3g}'


def fmt_ratio(r):
    return f'{r:.2g}x' if r < 10 else f'{r:.0f}x'


def fmt_ms(s):
    return f'{s * 1e3:.3g} ms'


def markdown_table(title, header, rows):
    lines = [f'### {title}', '', '| ' + ' | '.join(header) + ' |', '|' + '---:|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return lines + ['']


def cell(value, base, fmt):
    """A value with its ratio to the baseline's (causal, or SDPA) in the same run; statuses pass through."""
    if not isinstance(value, float):
        return value or ''
    ratio = f' ({fmt_ratio(value / base)})' if isinstance(base, float) and base > 0 else ''
    return fmt(value) + ratio


def header_lines():
    if device_type == 'cuda':
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
        name += f' ({fmt_bytes(total)})'
    else:
        name = f'CPU ({platform.machine()}, {torch.get_num_threads()} threads)'
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'not installed'
    return [f'device: {name} · torch {torch.__version__} · triton {triton_version} · python '
            f'{platform.python_version()}', f'command: python bench.py {" ".join(sys.argv[1:])}', '']


def write_csv(path, rows):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def csv_value(value, is_status):
    if is_status:
        return value or 'ok'
    if value is None or isinstance(value, str):
        return value or ''
    return str(int(value)) if float(value).is_integer() else f'{value:.6g}'


def write_report(name, lines):
    text = '\n'.join(lines)
    print(text)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), 'w') as f:
        f.write(text + '\n')


# -----------------------------------------------------------------------------------------------------------
# --mode=speed

SPEED_SECTIONS = [  # (title, phase, key, format)
    ('Inference: peak memory', 'inference', 'infer_bytes', fmt_bytes),
    ('Inference: prefill tokens/s', 'inference', 'prefill_tok_s', fmt_rate),
    ('Inference: decode tokens/s', 'inference', 'decode_tok_s', fmt_rate),
    ('Inference: cache bytes per token', 'inference', 'cache_bytes_per_token', fmt_bytes),
    ('Training: peak memory of forward + backward', 'training', 'train_bytes', fmt_bytes),
    ('Training: tokens/s of forward + backward', 'training', 'train_tok_s', fmt_rate),
]


def run_speed(names, Ts):
    """Every (attention, phase, context) case, shortest context first; returns {(name, T): metrics and statuses}
    (a status per phase: None when it ran) and the first message of each kind of failure."""
    results = {(name, T): {} for name in names for T in Ts}
    messages = {}  # (name, phase, status) -> 'context: message'
    bar = tqdm(total=2 * len(names) * len(Ts), desc='bench', dynamic_ncols=True)
    for name in names:
        # inference in the bench dtype; training keeps fp32 weights under autocast, as train.py does
        for phase, dtype_ in (('inference', ptdtype), ('training', torch.float32)):
            model, status, message = guarded(lambda: build_model(name, Ts[0] + decode_tokens, dtype_))
            stopped = status  # a model that cannot be built, the first OOM or a slow case ends this attention's phase
            for T in Ts:
                bar.set_postfix_str(f'{name} {phase} {fmt_context(T)}')
                if stopped:
                    status = '-' if stopped in ('OOM', 'slow') else stopped
                else:
                    model.resize_block_size(T + decode_tokens)  # the position table a model for T would have
                    t0 = time.perf_counter()
                    if phase == 'inference':
                        options = cache_options(name)
                        metrics, status, message = guarded(lambda: measure_inference(model.eval(), T, options))
                    else:
                        metrics, status, message = guarded(lambda: measure_training(model.train(), T))
                    results[name, T].update(metrics or {})
                    stopped = 'OOM' if status == 'OOM' else too_slow(time.perf_counter() - t0)
                    if stopped == 'slow':
                        messages[name, phase, 'slow'] = (f'{fmt_context(T)} took {time.perf_counter() - t0:.3g} s '
                                                         f'(--case_seconds={case_seconds:g}): longer contexts not run')
                results[name, T][phase] = status
                if status not in (None, '-'):
                    messages.setdefault((name, phase, status), f'{fmt_context(T)}: {message}')
                bar.update()
            model = None  # free it before the next model is built
            free_memory()
    bar.close()
    return results, messages


def speed_report(results, messages, names, Ts):
    """The header, one markdown table per section, the longest contexts that ran, and what failed."""
    memory = ('CUDA max_memory_allocated (weights, cache, activations)' if device_type == 'cuda' else
              'no CUDA: inference = weights + cache, training = weights + grads + tensors saved for backward')
    capped = vram_gb > 0 and device_type == 'cuda'
    training = 'fp32 weights' + (' + autocast' if isinstance(autocast(), torch.autocast) else '')
    lines = header_lines() + [
        f'shape: n_layer={n_layer} n_head={n_head} n_embd={n_embd} vocab_size={vocab_size} · dtype {dtype} '
        f'(training: {training}) · batch {batch_size} · '
        f'decode {decode_tokens} tokens · median of {repeats} after {warmup} warm-up'
        + (f' · selective budget {budget}' if budget else '')
        + ('' if absorb or 'in' not in names else ' · in decodes with the re-projection reference (absorb=False)'),
        f'memory: {memory}' + (f', capped at {vram_gb:g} GiB' if capped else ''),
        'cells: value (ratio to causal at the same context) · OOM: out of memory, longer contexts not run (-) · '
        'n/a: context not possible' + (f' · -: also after a case over {case_seconds:g} s' if case_seconds else ''),
        '']
    for title, phase, key, fmt in SPEED_SECTIONS:
        rows = []
        for T in Ts:
            causal = results.get(('causal', T), {}).get(key)
            rows.append([fmt_context(T)] + [
                cell(results[name, T].get(key), causal if name != 'causal' else None, fmt)
                if results[name, T][phase] is None else results[name, T][phase] for name in names])
        lines += markdown_table(title, ['context'] + names, rows)
    lines.append(f"Longest context run {f'within {vram_gb:g} GiB' if capped else 'here'} (inference / training; "
                 f"+: the longest measured):")
    for name in names:
        longest = [max((T for T in Ts if results[name, T][phase] is None), default=None)
                   for phase in ('inference', 'training')]
        lines.append(f'- {name}: ' + ' / '.join('none' if T is None else fmt_context(T) + '+' * (T == Ts[-1])
                                                 for T in longest))
    failures = [f'{name} {phase} {status}: {text}' for (name, phase, status), text in messages.items()
                if status != 'OOM']
    return lines + ([''] + failures if failures else [])


def bench_speed():
    names = attention_list()
    Ts = context_list('1k,2k,4k,8k,16k,32k,64k,128k,256k,512k,1M' if device_type == 'cuda' else '128,256,512,1k')
    results, messages = run_speed(names, Ts)
    write_report('bench_speed.md', speed_report(results, messages, names, Ts))
    columns = ['inference', 'infer_bytes', 'prefill_tok_s', 'decode_tok_s', 'cache_bytes_per_token',
               'training', 'train_bytes', 'train_tok_s']
    write_csv(os.path.join(out_dir, 'bench_speed.csv'),
              [dict(attention=name, context=T, batch_size=batch_size, device=device, dtype=dtype,
                    budget=budget if name == 'selective' else '', absorb=absorb if name == 'in' else '',
                    **{c: csv_value(results[name, T].get(c), c in ('inference', 'training')) for c in columns})
               for name in names for T in Ts])
    plot_speed(os.path.join(out_dir, 'bench_speed.png'), results, names, Ts)
    print(f'wrote {out_dir}/bench_speed.csv and bench_speed.md')


def plot_speed(path, results, names, Ts):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print('matplotlib is not installed: no plot (pip install matplotlib to get bench_speed.png)')
        return
    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(names):
        for ax, key, style, what in ((ax_mem, 'infer_bytes', '-', 'inference'),
                                     (ax_mem, 'train_bytes', '--', 'training'),
                                     (ax_speed, 'prefill_tok_s', ':', 'prefill'),
                                     (ax_speed, 'decode_tok_s', '-', 'decode'),
                                     (ax_speed, 'train_tok_s', '--', 'training')):
            points = [(T, results[name, T][key]) for T in Ts if isinstance(results[name, T].get(key), float)]
            if points:
                ax.plot(*zip(*points), style, marker='o', ms=3, color=f'C{i}', label=f'{name} {what}')
    if vram_gb > 0 and device_type == 'cuda':
        ax_mem.axhline(vram_gb * 2 ** 30, color='grey', lw=0.8, ls=':', label=f'{vram_gb:g} GiB cap')
    ax_mem.set(ylabel='peak memory' if device_type == 'cuda' else 'counted memory (see the header)')
    ax_speed.set(ylabel='tokens/s')
    for ax, fmt, base, subs in ((ax_mem, fmt_bytes, 2, (1,)), (ax_speed, fmt_rate, 10, (1, 2, 5))):
        ax.set(xscale='log', yscale='log', xlabel='context (tokens)')
        ax.set_xticks(Ts, [fmt_context(T) for T in Ts])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_locator(ticker.LogLocator(base=base, subs=subs))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _, fmt=fmt: fmt(y)))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which='major', alpha=0.3)
        ax.legend(fontsize=7)
    shape = f'n_layer={n_layer} n_head={n_head} n_embd={n_embd} · {dtype} · batch {batch_size}'
    fig.suptitle(f'{header_lines()[0]}\n{shape}', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f'wrote {path}')


# -----------------------------------------------------------------------------------------------------------
# --mode=kernels

def timed(fn):
    """Median seconds of one fn() after warm-up (the first call compiles the kernels), and the peak memory of the
    runs. Each sample repeats fn() for 10 ms at least, so a short kernel is not timed as launch overhead."""
    for _ in range(max(1, warmup)):
        fn()
    reset_peak()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    calls = max(1, math.ceil(0.01 / (time.perf_counter() - t0)))
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times), peak_bytes()


def attention_tflops(seconds, B, H, T, D, backward):
    """TFLOP/s as FlashAttention counts causal attention: 2 matmuls of 2 T^2 D flops, halved by the mask, per
    head; a backward is 2.5 forwards. The same nominal count for every case, so it reads as inverse time."""
    flops = 4 * B * H * T * T * D / 2 * (3.5 if backward else 1)
    return flops / seconds / 1e12


def kernel_cases(kernels):
    """(name, fn(q, k, v), available(q)) for SDPA, each kernel and each kernel's PyTorch reference."""
    from attention_infini import fast_infini_attention, infini_attention as infini_reference
    from attention_selective import selective_attention as selective_reference
    beta = torch.zeros(n_head, device=device)  # gate logits: half memory, half local attention
    return [
        ('sdpa', lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), lambda q: True),
        ('selective kernel', lambda q, k, v: kernels.selective_attention(q, k, v, 0), kernels.selective_available),
        ('selective reference', lambda q, k, v: selective_reference(q, k, v, 0), lambda q: True),
        ('infini kernel', lambda q, k, v: fast_infini_attention(q, k, v, beta, segment_len)[0],
         kernels.infini_available),
        ('infini reference', lambda q, k, v: infini_reference(q, k, v, beta, segment_len)[0], lambda q: True),
    ]


def bench_kernels():
    lines = header_lines()
    kernels = None
    if device_type == 'cuda':
        try:
            import triton  # noqa: F401  kernels.py imports without triton, and then has no kernel to time
            import kernels
        except ImportError:
            pass
    if kernels is None:
        write_report('bench_kernels.md', lines + ['--mode=kernels times the Triton kernels of kernels.py, which need '
                                                  'CUDA and triton: skipped here.'])
        return
    H, D = n_head, n_embd // n_head
    Ts = context_list('1k,4k,16k,64k')
    shapes = [(B, T) for B in sorted(set(parse_ints('batches', batches or str(batch_size), '1,8'))) for T in Ts]
    cases = kernel_cases(kernels)
    results = {}  # (case, B, T) -> dict(fwd=, fwdbwd=, bytes=) or a status
    bar = tqdm(total=len(cases) * len(shapes), desc='kernels', dynamic_ncols=True)
    for name, fn, available in cases:
        stopped = None
        for B, T in shapes:
            bar.set_postfix_str(f'{name} {B} x {fmt_context(T)}')

            def measure():
                q, k, v, grad = (torch.randn(B, H, T, D, device=device, dtype=ptdtype) for _ in range(4))
                if not available(q):
                    return 'n/a'

                def forward_backward():
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                    fn(qg, kg, vg).backward(grad)

                with torch.no_grad():
                    fwd, _ = timed(lambda: fn(q, k, v))
                fwdbwd, peak = timed(forward_backward)
                return dict(fwd=fwd, fwdbwd=fwdbwd, bytes=float(peak))

            stopped = None if T == Ts[0] else stopped  # each batch size starts again from the shortest context
            if stopped:
                results[name, B, T] = '-'
            else:
                t0 = time.perf_counter()
                out, status, message = guarded(measure)
                results[name, B, T] = out or status
                stopped = 'OOM' if status == 'OOM' else too_slow(time.perf_counter() - t0)
                if status not in (None, 'OOM', '-'):
                    lines.append(f'{name} at {B} x {fmt_context(T)}: {message}')
                if stopped == 'slow':
                    lines.append(f'{name} at {B} x {fmt_context(T)} took {time.perf_counter() - t0:.3g} s '
                                 f'(--case_seconds={case_seconds:g}): longer contexts not run')
            bar.update()
    bar.close()

    names = [c[0] for c in cases]
    lines += [f'H={H} D={D} {dtype}, causal; median of {repeats} after {warmup} warm-up; rows: batch x context; '
              f'cells: value (ratio to SDPA); OOM: out of memory, longer contexts not run (-)', '']
    label = ['batch x context']
    for title, key, fmt in (('Forward time', 'fwd', fmt_ms), ('Forward + backward time', 'fwdbwd', fmt_ms),
                            ('Forward + backward peak memory', 'bytes', fmt_bytes)):
        rows = []
        for B, T in shapes:
            base = results['sdpa', B, T][key] if isinstance(results['sdpa', B, T], dict) else None
            rows.append([f'{B} x {fmt_context(T)}'] + [cell(r[key], base if name != 'sdpa' else None, fmt)
                                                       if isinstance(r := results[name, B, T], dict) else r
                                                       for name in names])
        lines += markdown_table(title, label + names, rows)
    rows = [[f'{B} x {fmt_context(T)}'] + [' / '.join(f"{attention_tflops(r[key], B, H, T, D, key == 'fwdbwd'):.3g}"
                                                      for key in ('fwd', 'fwdbwd'))
                                            if isinstance(r := results[name, B, T], dict) else r for name in names]
            for B, T in shapes]
    lines += markdown_table('Forward / forward + backward TFLOP/s, counted as causal attention (4 B H T^2 D / 2 '
                            'per forward, 2.5x that per backward)', label + names, rows)
    pairs = [(n, n.replace(' kernel', ' reference')) for n in names if n.endswith(' kernel')]
    rows = []
    for B, T in shapes:
        row = [f'{B} x {fmt_context(T)}']
        for kernel, reference in pairs:
            a, b = results[kernel, B, T], results[reference, B, T]
            both = isinstance(a, dict) and isinstance(b, dict)
            row += [fmt_ratio(b[key] / a[key]) if both else '' for key in ('fwd', 'fwdbwd')]
        rows.append(row)
    lines += markdown_table('Kernel speed-up over its PyTorch reference', label + [
        f'{kernel.split()[0]} {what}' for kernel, _ in pairs for what in ('fwd', 'fwd+bwd')], rows)
    write_report('bench_kernels.md', lines)
    write_csv(os.path.join(out_dir, 'bench_kernels.csv'),
              [dict(case=name, context=T, batch_size=B, heads=H, head_dim=D, dtype=dtype,
                    status='ok' if isinstance(r, dict) else r,
                    **{key: csv_value(r.get(key) if isinstance(r, dict) else None, False)
                       for key in ('fwd', 'fwdbwd', 'bytes')})
               for name in names for B, T in shapes for r in [results[name, B, T]]])


# -----------------------------------------------------------------------------------------------------------
# --mode=compile: what each kernel costs a GPU, read from the compiler, without one. Triton ships ptxas and
# cuobjdump: a kernel that needs more shared memory than a GPU has fails to launch there ("out of resources"),
# and registers spilled to local memory ("spill", bytes per thread) make it slow.

SHARED_MEMORY = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}  # KiB a block may use, per arch
INTEGERS = {'H', 'T', 'N', 'Tq', 'h0', 'q_start', 'q_end', 'n_segments'}  # the kernels' integer arguments


def kernel_launches(kernels, D, arch):
    """(what, kernel, its pointers in the data dtype (the others are fp32), constexprs, launch settings), as
    kernels.py launches them on a GPU of compute capability arch (86 = 8.6)."""
    selective = dict(BLOCK_M=kernels.BLOCK_M, BLOCK_N=kernels.selective_block_n(arch // 10), BLOCK_D=D)
    infini = dict(BLOCK_T=kernels.BLOCK_T, BLOCK_D=D)
    data = 'Q K V O DO DQ'.split()
    launches = [('selective carry', kernels._selective_carry_kernel, data, selective, kernels.NARROW),
                ('selective forward', kernels._selective_fwd_kernel, data, selective, kernels.NARROW),
                ('selective backward dK dV', kernels._selective_bwd_dkdv_kernel, data, selective, kernels.WIDE),
                ('selective backward dQ', kernels._selective_bwd_dq_kernel, data, selective, kernels.NARROW),
                ('selective backward selection', kernels._selective_bwd_selection_kernel, data, selective,
                 kernels.WIDE)]
    for update in ('linear', 'delta'):
        delta = update == 'delta'
        launches += [(f'infini memory forward, {update}{", saving for backward" * save}',
                      kernels._infini_memory_fwd_kernel, ['Q', 'K', 'V'], dict(infini, DELTA=delta, SAVE=save),
                      kernels.WIDE) for save in (False, True)]
        launches.append((f'infini memory backward, {update}', kernels._infini_memory_bwd_kernel, ['Q', 'K', 'V'],
                         dict(infini, DELTA=delta), kernels.WIDE))
    return launches


def compile_kernel(triton, fn, data, constexprs, launch, arch, tool):
    """Compile one kernel for one compute capability: (registers, spill bytes per thread, shared memory bytes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    pointer = {torch.bfloat16: '*bf16', torch.float16: '*fp16', torch.float32: '*fp32'}[ptdtype]
    signature = {a: 'constexpr' if a in constexprs else 'fp32' if a == 'scale' else 'i32' if a in INTEGERS else
                 pointer if a in data else '*fp32' for a in fn.arg_names}
    values = {(i,): constexprs[a] for i, a in enumerate(fn.arg_names) if a in constexprs}
    aligned = {(i,): [['tt.divisibility', 16]] for i, a in enumerate(fn.arg_names) if signature[a][0] == '*'}
    compiled = triton.compile(ASTSource(fn, signature, values, aligned), target=GPUTarget('cuda', arch, 32),
                              options=dict(launch))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'kernel.cubin')
        with open(path, 'wb') as f:
            f.write(compiled.asm['cubin'])
        usage = subprocess.run([tool, '-res-usage', path], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(':') for line in usage.splitlines() if 'REG:' in line for item in line.split())
    return int(fields['REG']), int(fields['STACK']), compiled.metadata.shared


def bench_compile():
    try:
        import triton
        import triton.backends.nvidia
        import kernels
    except ImportError:
        raise SystemExit('--mode=compile needs triton with its CUDA backend (pip install triton, Linux x86_64)')
    if os.environ.get('TRITON_INTERPRET') == '1':
        raise SystemExit('--mode=compile needs the compiler: unset TRITON_INTERPRET')
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), 'bin', 'cuobjdump')
    capabilities = parse_ints('archs', archs, '86,90')
    D = n_embd // n_head
    if D not in kernels.HEAD_DIMS:
        raise SystemExit(f'head dim n_embd / n_head = {D}: the kernels take {kernels.HEAD_DIMS}')
    launches = [(arch, *launch) for arch in capabilities for launch in kernel_launches(kernels, D, arch)]
    names = [what for what, *_ in kernel_launches(kernels, D, capabilities[0])]
    results = {}
    bar = tqdm(total=len(launches), desc='compile', dynamic_ncols=True)
    for arch, what, fn, data, constexprs, launch in launches:
        bar.set_postfix_str(f'{what} sm_{arch}')
        try:
            results[what, arch] = compile_kernel(triton, fn, data, constexprs, launch, arch, tool)
        except Exception as e:  # a compiler failure is a result: report it and go on
            results[what, arch] = f"fails: {(str(e).strip().splitlines() or [''])[-1][:80]}"
        bar.update()
    bar.close()

    def status(what, arch):
        r = results[what, arch]
        return r if isinstance(r, str) else 'ok' if r[2] <= SHARED_MEMORY.get(arch, 99) * 1024 else 'TOO MUCH'

    def cell_text(what, arch):
        r = results[what, arch]
        fits = '' if status(what, arch) == 'ok' else ' TOO MUCH'
        return f'{r[0]} reg, {r[1]} B spill, {fmt_bytes(r[2])}{fits}' if isinstance(r, tuple) else r

    rows = [[what] + [cell_text(what, arch) for arch in capabilities] for what in names]
    limits = ', '.join(f'sm_{a} {SHARED_MEMORY.get(a, 99)} KiB' for a in capabilities)
    lines = header_lines() + [
        f'head dim {D}, {dtype}; cells: registers per thread, bytes per thread spilled to local memory, shared '
        f'memory per block (TOO MUCH: more than the GPU has, {limits})', '']
    lines += markdown_table('Kernels compiled per GPU', ['kernel'] + [f'sm_{a}' for a in capabilities], rows)
    write_report('bench_compile.md', lines)
    write_csv(os.path.join(out_dir, 'bench_compile.csv'),
              [dict(kernel=what, arch=arch, head_dim=D, dtype=dtype, status=status(what, arch),
                    **dict(zip(('registers', 'spill_bytes', 'shared_bytes'),
                               r if isinstance(r := results[what, arch], tuple) else ('', '', ''))))
               for what in names for arch in capabilities])


# -----------------------------------------------------------------------------------------------------------
# --mode=quality

def load_model(path):
    """A train.py checkpoint as an eval-mode GPT on the device, and the checkpoint dict itself."""
    checkpoint = read_checkpoint(path)
    try:
        model = GPT(GPTConfig(**{**checkpoint['model_args'], 'use_kernels': use_kernels}))
        model.load_state_dict(checkpoint['model'])
    except (TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"cannot build the model of {path} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    return model.to(device).eval(), checkpoint


def load_val_data(checkpoint):
    """val.bin of the checkpoint's dataset (or --data_dir) as a memmap, and the dataset's meta."""
    from data.common import load_meta
    run = checkpoint.get('config', {})
    folder = data_dir or run.get('data_dir') or os.path.join(HERE, 'data', str(run.get('dataset')))
    path = os.path.join(folder, 'val.bin')
    if not os.path.isfile(path):
        raise SystemExit(f"no {path}: prepare the dataset (python data/<name>/prepare.py) or pass --data_dir=")
    return np.memmap(path, dtype=np.uint16, mode='r'), load_meta(folder)


@torch.no_grad()
def val_loss(model, data, T, example_len=None):
    """Mean next-token loss over eval_windows windows of T tokens, the same seeded windows for every model.

    When the dataset is made of fixed-length examples (passkey), windows start on example boundaries and, as in
    train.py, the first token of an example is no target: nothing before it predicts it."""
    stride = example_len or 1
    count = (len(data) - T - 1) // stride + 1
    if count < 1:
        raise ValueError(f'val.bin has {len(data)} tokens, fewer than a window of {T + 1}')
    starts = np.random.default_rng([seed, T]).integers(0, count, eval_windows) * stride
    targets = torch.arange(1, T + 1, device=device) % example_len != 0 if example_len else None
    total, n = 0.0, 0
    for i in range(0, len(starts), batch_size):
        batch = np.stack([data[s:s + T + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
        batch = torch.from_numpy(batch).to(device)
        x, y = batch[:, :-1], batch[:, 1:].contiguous()  # GPT's loss views the targets flat
        if targets is not None:
            y = y.masked_fill(~targets, -1)  # ignored by the loss (out of place: y may share x's storage)
        with autocast():
            logits, _ = model(x, y)
        # the language-model loss alone: GPT's loss would add an attention's auxiliary training loss
        loss = cross_entropy(logits.float(), y, reduction='sum')
        total += loss.item()
        n += (y != -1).sum().item()
    return total / n


@torch.no_grad()
def passkey_accuracy(model, tok, length, depth):
    """Fraction of passkey_trials examples of `length` tokens whose answer greedy decoding gets exactly right."""
    from data.passkey.prepare import make_passkey
    rng = np.random.default_rng([seed, length, int(depth * 1000)])
    examples = [make_passkey(length, depth, rng, tok) for _ in range(passkey_trials)]
    correct = 0
    for prompt, answer in examples:
        idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        with autocast():
            out = model.generate(idx, len(answer), top_k=1)
        correct += out[0, len(prompt):].tolist() == list(answer)
    return correct / len(examples)


def heat(accuracy):
    """A shade per accuracy, so a table of them reads as a heatmap."""
    return ' ░▒▓█'[round(accuracy * 4)] + f' {accuracy:.0%}'


def bench_quality():
    paths = [p for p in ckpt.split(',') if p]
    if not paths:
        raise SystemExit('--mode=quality needs --ckpt=PATH/ckpt.pt (several: comma-separated)')
    runs = []
    for path in paths:
        model, checkpoint = load_model(path)
        data, meta = load_val_data(checkpoint)
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        label = f'{folder} ({model.config.attention}, block {fmt_context(model.config.block_size)})'
        runs.append(dict(label=label, model=model, checkpoint=checkpoint, data=data, meta=meta,
                         trained=model.config.block_size))
    block = runs[0]['trained']
    Ts = context_list(','.join(str(block * m // 2) for m in (1, 2, 4, 8)))
    try:
        fractions = [float(d) for d in depths.split(',') if d]
    except ValueError:
        fractions = []
    if not fractions or not all(0 <= d <= 1 for d in fractions):
        raise SystemExit(f"--depths is a comma-separated list of fractions between 0 and 1, not '{depths}'")
    do_passkey = passkey or any(str(run['meta'].get('dataset', '')).startswith('passkey') for run in runs)
    lines = header_lines() + [
        f'val loss: mean over {eval_windows} windows per context, the same seeded windows for every checkpoint',
        'n/a past block_size: a fixed-context model cannot take it' if not extend else
        'past block_size, fixed-context models tile their position table (no training): marked *', '']
    loss_rows, key_rows = [], []
    bar = tqdm(total=len(runs) * len(Ts) * (1 + do_passkey * len(fractions)), desc='quality', dynamic_ncols=True)
    for run in runs:
        label, model, data, meta, trained = (run[k] for k in ('label', 'model', 'data', 'meta', 'trained'))
        for T in Ts:
            bar.set_postfix_str(f'{label} val {fmt_context(T)}')
            if extend and not model.streams and T > model.config.block_size:
                model.resize_block_size(T)
            loss, status, message = guarded(lambda: val_loss(model, data, T, meta.get('example_len')))
            mark = '*' if extend and not model.streams and T > trained else ''
            loss_rows.append(dict(checkpoint=label, context=T, val_loss=loss, status=status or 'ok', mark=mark,
                                  message=message))
            bar.update()
        if not do_passkey:
            continue
        from data.common import tokenizer_from_meta
        tok = tokenizer_from_meta(run['checkpoint'].get('tokenizer') or meta)
        for depth in fractions:
            for T in Ts:
                bar.set_postfix_str(f'{label} passkey {fmt_context(T)} depth {depth:g}')
                accuracy, status, message = guarded(lambda: passkey_accuracy(model, tok, T, depth))
                key_rows.append(dict(checkpoint=label, length=T, depth=depth, accuracy=accuracy,
                                     status=status or 'ok', message=message))
                bar.update()
    bar.close()

    labels = [run['label'] for run in runs]
    by_key = {(r['checkpoint'], r['context']): r for r in loss_rows}
    table = [[fmt_context(T)] + [f"{r['val_loss']:.4f}{r['mark']}" if r['val_loss'] is not None else r['status']
                                 for r in (by_key[label, T] for label in labels)] for T in Ts]
    lines += markdown_table('Val loss by context', ['context'] + labels, table)
    if do_passkey:
        past = ('read the whole prompt with tiled positions' if extend else
                'see only the last block_size tokens (nanoGPT cropping; --extend=True tiles positions instead)')
        lines.append(f'Passkey retrieval: {passkey_trials} examples per cell, greedy decoding; past their block_size '
                     f'fixed-context models {past}')
        lines.append('')
        cells = {(r['checkpoint'], r['length'], r['depth']): r for r in key_rows}
        for label in labels:
            table = [[f'{depth:g}'] + [heat(c['accuracy']) if c['accuracy'] is not None else c['status']
                                       for c in (cells[label, T, depth] for T in Ts)] for depth in fractions]
            lines += markdown_table(f'Passkey accuracy, {label}: depth (rows) by length (columns)',
                                    ['depth'] + [fmt_context(T) for T in Ts], table)
    lines += list(dict.fromkeys(f"{r['checkpoint']} at {fmt_context(r.get('context') or r['length'])}: {r['message']}"
                                for r in loss_rows + key_rows if r['status'] not in ('ok', 'OOM', 'n/a')))  # n/a: above
    write_report('bench_quality.md', lines)
    write_csv(os.path.join(out_dir, 'bench_quality.csv'), loss_rows)
    if key_rows:
        write_csv(os.path.join(out_dir, 'bench_passkey.csv'), key_rows)
    print(f'wrote {out_dir}/bench_quality.csv' + (' and bench_passkey.csv' if key_rows else ''))


# -----------------------------------------------------------------------------------------------------------
# --mode=budgets (Selective Attention): the smallest per-layer KV budgets that keep val loss under a target,
# chosen greedily on validation data as the paper does (digest 2.4). Pruning is simulated in one parallel forward
# (attn.budget, digest 2.3), which equals token-by-token decoding with the evicting cache (tests/test_selective.py).

def pruned_val_loss(model, data, budgets, example_len=None):
    """val_loss at block_size with layer l's cache pruned to budgets[l] entries."""
    for block, b in zip(model.transformer.h, budgets):
        block.attn.budget = b
    try:
        return val_loss(model, data, model.config.block_size, example_len)
    finally:
        for block in model.transformer.h:
            block.attn.budget = None


def choose_budgets(model, data, target, example_len=None, shrink=0.8, progress=None):
    """Greedy search: start from full caches (block_size entries per layer); each round, try cutting each layer's
    budget to `shrink` of itself and keep the one cut that raises val loss least; stop when even that cut would
    pass target. Returns the steps taken, [(budgets, loss)], the first being the unpruned model."""
    full = [model.config.block_size] * model.config.n_layer
    steps = [(full, pruned_val_loss(model, data, full, example_len))]
    while steps[-1][1] <= target:
        budgets = steps[-1][0]
        trials = [budgets[:l] + [max(2, min(b - 1, round(shrink * b)))] + budgets[l + 1:]
                  for l, b in enumerate(budgets) if b > 2]
        if not trials:
            break
        loss, best = min((pruned_val_loss(model, data, t, example_len), t) for t in trials)
        if loss > target:
            break
        steps.append((best, loss))
        if progress:
            progress(best, loss)
    return steps


def bench_budgets():
    if not ckpt:
        raise SystemExit('--mode=budgets needs --ckpt=PATH/ckpt.pt, a checkpoint trained with --attention=selective')
    if not 0 < shrink < 1:
        raise SystemExit(f'--shrink is a fraction between 0 and 1, not {shrink}')
    try:
        given = float(target) if not os.path.isfile(target) else None
    except ValueError:
        raise SystemExit(f"--target is '+0.02' (an increase), a loss like '1.95', or a checkpoint path, "
                         f"not '{target}'") from None
    model, checkpoint = load_model(ckpt)
    if model.config.attention != 'selective':
        raise SystemExit(f"--mode=budgets prunes Selective Attention's cache; {ckpt} is "
                         f"'{model.config.attention}': give a checkpoint trained with --attention=selective")
    data, meta = load_val_data(checkpoint)
    N, L, example_len = model.config.block_size, model.config.n_layer, meta.get('example_len')
    full = pruned_val_loss(model, data, [N] * L, example_len)
    if given is None:  # the paper's criterion: the val loss of another model (a standard one) with a full cache
        reference, _ = load_model(target)
        goal = val_loss(reference, data, N, example_len)
        reference = f'{target} ({reference.config.attention}, n_head={reference.config.n_head}), full cache'
        source = f'val loss of {reference}'
    elif target.startswith('+'):
        goal, source, reference = full + given, f'unpruned loss {full:.4f} {target}', None
    else:
        goal, source, reference = given, 'given', None
    print(f'target val loss {goal:.4f} ({source}); unpruned selective {full:.4f}; greedy search over {L} layers')
    steps = choose_budgets(model, data, goal, example_len, shrink,
                           progress=lambda b, loss: print(f'  budgets {b}: {sum(b)} entries, val loss {loss:.4f}'))
    budgets, loss = steps[-1]

    # memory of a real cache with these budgets after a full window, against a standard KV cache of N tokens
    cache = model.new_cache(1, N, budget=budgets)
    with torch.no_grad():
        model(torch.from_numpy(data[:N].astype(np.int64))[None].to(device), cache=cache)
    per_entry = 2 * model.config.n_embd * next(model.parameters()).element_size()
    reached = 'reached' if loss <= goal else 'NOT reached: the unpruned selective model is already above it'
    lines = header_lines() + [
        f'checkpoint: {ckpt} (block_size {N}, {L} layers) · val loss: {eval_windows} windows of {N} tokens',
        f'target val loss {goal:.4f} ({source}): {reached}', '']
    lines += markdown_table('Budgets per layer (KV entries kept, first token and current one included)',
                            ['layer', 'budget', 'of block_size'],
                            [[str(l), str(b), f'{b / N:.1%}'] for l, b in enumerate(budgets)])
    rows = [['selective, full cache', str(L * N), fmt_bytes(L * N * per_entry), f'{full:.4f}'],
            ['selective, pruned to the budgets', str(sum(budgets)), fmt_bytes(sum(budgets) * per_entry), f'{loss:.4f}'],
            ['the pruned cache.nbytes() (+ F and positions)', str(sum(budgets)), fmt_bytes(cache.nbytes()), '']]
    if reference:
        rows.append([reference, str(L * N), fmt_bytes(L * N * per_entry), f'{goal:.4f}'])
    lines += markdown_table('KV memory (keys and values of all layers, batch 1)', ['model', 'entries', 'bytes',
                                                                                   'val loss'], rows)
    lines.append(f'memory reduction: {L * N / sum(budgets):.1f}x fewer KV entries (the paper counts these: '
                 f'16x, 25x, 47x at contexts 512, 1k, 2k)')
    os.makedirs(out_dir, exist_ok=True)
    write_report('bench_budgets.md', lines)
    write_csv(os.path.join(out_dir, 'bench_budgets.csv'),
              [dict(step=i, entries=sum(b), val_loss=l, budgets=' '.join(map(str, b)))
               for i, (b, l) in enumerate(steps)])
    print(f'wrote {out_dir}/bench_budgets.csv')


# -----------------------------------------------------------------------------------------------------------
# main

def setup():
    """Resolve the device-dependent defaults and check the flags that do not depend on the mode."""
    global device, device_type, dtype, ptdtype
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'--device={device} but CUDA is not available here; use --device=cpu')
    if device_type == 'cpu' and device != 'cpu':
        raise SystemExit(f"--device is cuda, cuda:N or cpu, not '{device}'")
    dtype = dtype or ('bfloat16' if mode == 'compile' else 'float32' if device_type == 'cpu' else
                      'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16')
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype is one of {', '.join(DTYPES)}, not '{dtype}'")
    ptdtype = DTYPES[dtype]
    if min(n_layer, n_head, n_embd, vocab_size, batch_size, repeats) < 1 or decode_tokens < 0 or warmup < 0:
        raise SystemExit('n_layer, n_head, n_embd, vocab_size, batch_size, repeats must be >= 1, decode_tokens '
                         'and warmup >= 0')
    if n_embd % n_head:
        raise SystemExit(f'n_embd={n_embd} must be divisible by n_head={n_head}')
    cache_options('selective')  # a bad --budget fails now, not when the first selective case runs
    torch.manual_seed(seed)
    if vram_gb > 0 and device_type == 'cpu':
        print('--vram_gb caps CUDA memory: ignored on the CPU')
    if device_type == 'cuda':
        gpu = torch.device(device).index  # None for plain 'cuda': the current GPU (these calls refuse the name)
        if gpu is not None:
            torch.cuda.set_device(gpu)  # Triton launches on the current GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if vram_gb > 0:  # the caching allocator raises OutOfMemoryError past this fraction of the card
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, vram_gb * 2 ** 30 / total), gpu)


if __name__ == '__main__':
    configure(sys.argv[1:])
    setup()
    if mode == 'speed':
        bench_speed()
    elif mode == 'kernels':
        bench_kernels()
    elif mode == 'compile':
        bench_compile()
    elif mode == 'quality':
        bench_quality()
    elif mode == 'budgets':
        bench_budgets()
    else:
        raise SystemExit(f"unknown --mode={mode}; the modes are speed, kernels, compile, quality, budgets")
