"""
How long a context can each attention run on my GPU, and at what speed? One command answers it:

    python bench.py                        # GPT-2 small shape, contexts 1k to 1M, every attention
    python bench.py --vram_gb=8            # the same within 8 GiB, to emulate a gaming GPU on a larger card
    python bench.py --device=cpu --n_layer=2 --n_head=2 --n_embd=64 --contexts=128,256
    python bench.py --mode=kernels --batches=1,8    # the Triton kernels against their references and SDPA
    python bench.py --mode=check --n_embd=256 --n_head=4    # do the kernels agree and the models train, here?

--mode=speed (the default) runs, at each context, inference (prefill T tokens, then decode --decode_tokens one at a
time with the attention's cache) and training (one forward + backward at batch B): peak memory, tokens/s, cache
bytes per token. Random weights and random tokens: speed and memory do not depend on what the model knows.
--mode=kernels times each Triton kernel of kernels.py against its PyTorch reference and against SDPA (CUDA).
--mode=check answers first whether everything works here: each kernel against its reference in bf16, fp16 and
fp32, then one compiled training step of each attention (a row each; exits non-zero when one fails).

Memory: on CUDA, torch.cuda.max_memory_allocated after a reset (weights, cache, activations: everything). A CPU
has no allocator to ask, so there inference counts weights + cache, and training weights + gradients + the
tensors autograd saves for backward (transient tensors, like an attention matrix freed at once, are missed).
Timings: warm-up runs first, then the median of `repeats` runs, synchronised on CUDA. Every case runs guarded
(report.py): after an OOM the longer contexts of that series are not run ('-'); the bench always goes on.
"""
import dataclasses
import math
import os
import signal
import statistics
import sys
import time

if __name__ == '__main__':  # Ctrl-C while torch loads ends with one line; run_script (devices.py) takes over
    signal.signal(signal.SIGINT, lambda *_: sys.exit('interrupted while starting: nothing was written'))

import torch
from torch.nn import functional as nnf  # F is selective's mask (attention_selective.py)
from tqdm import tqdm

import kernels  # imports without triton too: kernels.triton is then None
from configurator import configure, flags_of, parse_ints
from devices import autocast, default_device, device_type_of, resolve_dtype, run_script
from model import ATTENTIONS, GPT, GPTConfig
from tools.report import (FORMATS, GrowingTable, cell, check_out_dir, context_list, fmt_context, fmt_ratio,
                          free_memory, guarded, header_lines, least_seconds, markdown_table, write_report)

# -----------------------------------------------------------------------------------------------------------
mode = 'speed'             # speed | kernels | check
device = ''                # '' = cuda if available, else cpu (devices.default_device; MPS has no memory counters)
dtype = ''                 # '' = bfloat16 on CUDA (float16 where bf16 is missing), float32 on the CPU
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
decode_tokens = 64         # tokens decoded one at a time after the prefill
warmup = 1
repeats = 3                # a timing is the median of this many runs
case_seconds = 300.0       # a case (all its runs) is stopped after this long, its longer contexts skipped; 0 = never
vram_gb = 0.0              # > 0: cap this process's CUDA memory at that many GiB (a smaller GPU)
out_dir = 'bench_out'      # where the CSV, the markdown tables and the PNG go
seed = 1337
PER_CASE = ('attention', 'block_size')  # each case sets these itself
for _field in dataclasses.fields(GPTConfig):  # every other model field is a flag too, as in train.py
    if _field.name not in PER_CASE:
        globals().setdefault(_field.name, _field.default)
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------


def attention_list(settings):
    names = [name for name in settings.attentions.replace(' ', '').split(',') if name]
    unknown = [name for name in names if name not in ATTENTIONS]
    if unknown or not names:
        raise SystemExit(f"--attentions: unknown '{','.join(unknown)}'; choose among {','.join(ATTENTIONS)}")
    return names


def cache_options(name, settings):
    """The inference options this attention takes (its cache_options) of the flags: selective's pruning budget,
    InAttention's decode path."""
    takes, options = ATTENTIONS[name].cache_options, {}
    if 'absorb' in takes and not settings.absorb:
        options['absorb'] = False
    if 'budget' in takes and settings.budget:
        b = parse_ints('budget', settings.budget, '256 or 16,8,8,4')
        options['budget'] = b[0] if len(b) == 1 else b
    return options


# -----------------------------------------------------------------------------------------------------------
# running cases

def sync(settings):
    if settings.device_type == 'cuda':
        torch.cuda.synchronize()


def peak_bytes(settings):
    return torch.cuda.max_memory_allocated() if settings.device_type == 'cuda' else None


def predicted_seconds(model, T, phase, settings):
    """Fewer seconds than the case can take (report.least_seconds): a case predicted past --case_seconds is not
    started, since a signal cannot stop one long kernel call."""
    return least_seconds(model, T, settings.batch_size, settings.device, settings.ptdtype, phase == 'training')


def run_series(label, Ts, measure, settings, messages, bar, record=None, predict=None):
    """measure(T) at each context, shortest first, guarded: {T: its result, or a status}. A case running longer
    than --case_seconds is stopped ('slow'), and so is one that predict(T) says would ('slow', not started);
    after it, or after an OOM, the longer contexts are not run ('-'): they would fail or take longer still.
    messages[label, status] keeps the first message of each failure. record(T, result or status, seconds,
    message) is called as each case finishes, to write its row at once."""
    out, stopped = {}, False
    for T in Ts:
        bar.set_postfix_str(f'{label} {fmt_context(T)}')
        t0 = time.perf_counter()
        least = predict(T) if predict and settings.case_seconds else 0.0
        if stopped:
            result, status, message = None, '-', ''
        elif least > settings.case_seconds:
            result, status, message = None, 'slow', f'not started: it would take over {least:.3g} s'
        else:
            result, status, message = guarded(lambda: measure(T), settings, settings.case_seconds)
        out[T], seconds = result if status is None else status, time.perf_counter() - t0
        if status not in (None, '-'):
            messages.setdefault((label, status), f'{fmt_context(T)}: {message}')
        if status == 'slow' and message.startswith('not started'):
            messages[label, 'slow'] = (f'{fmt_context(T)} {message}, past --case_seconds={settings.case_seconds:g}: '
                                       f'longer contexts not run')
        elif status == 'slow':
            messages[label, 'slow'] = (f'{fmt_context(T)} stopped after --case_seconds='
                                       f'{settings.case_seconds:g}: longer contexts not run')
        stopped = stopped or status in ('OOM', 'slow')
        if record:
            record(T, out[T], seconds, message)
        bar.update()
    return out


def timed_runs(run, settings):
    """run() warmup times, then `repeats` times from a fresh peak memory: the latter's results."""
    for _ in range(settings.warmup):
        run()
    if settings.device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    return [run() for _ in range(settings.repeats)]


# -----------------------------------------------------------------------------------------------------------
# --mode=speed

def random_model(name, block_size, weights_dtype, settings):
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(GPTConfig) if f.name not in PER_CASE}
    config = GPTConfig(**fields, block_size=block_size, attention=name)
    with torch.device(settings.device):  # initialise on the device: a GPT-2 sized init on the CPU is slow
        model = GPT(config)
    return model.to(weights_dtype)


@torch.no_grad()
def measure_inference(model, T, options, settings):
    """Prefill T random tokens into a fresh cache, then decode decode_tokens more one at a time."""
    B, n_new = settings.batch_size, settings.decode_tokens
    prompt = torch.randint(settings.vocab_size, (B, T), device=settings.device)
    following = torch.randint(settings.vocab_size, (B, n_new), device=settings.device)

    def run():
        cache = model.new_cache(B, max_len=T + n_new, **options)
        sync(settings)
        t0 = time.perf_counter()
        model(prompt, cache=cache)
        sync(settings)
        t1 = time.perf_counter()
        for i in range(n_new):
            model(following[:, i:i + 1], cache=cache)
        sync(settings)
        return t1 - t0, time.perf_counter() - t1, cache.nbytes(), cache.length  # numbers: the cache dies here

    runs = timed_runs(run, settings)
    cache_bytes = max(r[2] for r in runs)
    weights = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    return dict(infer_bytes=float(peak_bytes(settings) or weights + cache_bytes),
                prefill_tok_s=B * T / statistics.median(r[0] for r in runs),
                decode_tok_s=B * n_new / statistics.median(r[1] for r in runs) if n_new else None,
                cache_bytes_per_token=cache_bytes / (B * runs[0][3]))


def measure_training(model, T, settings):
    """One forward + backward of B random sequences of T tokens (autocast on CUDA, as train.py trains)."""
    B = settings.batch_size
    data = torch.randint(settings.vocab_size, (B, T + 1), device=settings.device)
    x, y = data[:, :-1], data[:, 1:].contiguous()  # GPT's loss views the targets flat
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def run():
        saved = {}  # CPU memory: storages autograd keeps for backward, by address so shared ones count once

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        sync(settings)
        t0 = time.perf_counter()
        with (autocast('cuda', settings.dtype) if settings.device_type == 'cuda' else
              torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)):
            _, loss = model(x, y)
        loss.backward()
        sync(settings)
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt, sum(saved.values())

    runs = timed_runs(run, settings)
    weights_and_grads = 2 * sum(p.nbytes for p in model.parameters())
    return dict(train_bytes=float(peak_bytes(settings) or weights_and_grads + max(r[1] for r in runs)),
                train_tok_s=B * T / statistics.median(r[0] for r in runs))


SPEED_COLUMNS = ['attention', 'phase', 'context', 'status', 'seconds', 'infer_bytes', 'prefill_tok_s', 'decode_tok_s',
                 'cache_bytes_per_token', 'train_bytes', 'train_tok_s', 'batch_size', 'device', 'dtype', 'budget',
                 'absorb', 'message']


def run_speed(names, Ts, settings, table=None):
    """Every (attention, phase) series over the contexts: {(name, phase, T): metrics or a status}, and messages.
    Each finished case is a row of table (a GrowingTable with SPEED_COLUMNS) at once."""
    results, messages = {}, {}
    n_new = settings.decode_tokens
    bar = tqdm(total=2 * len(names) * len(Ts), desc='bench', dynamic_ncols=True)
    for name in names:
        # inference in the bench dtype; training keeps fp32 weights under autocast, as train.py does
        for phase, weights_dtype in (('inference', settings.ptdtype), ('training', torch.float32)):
            model, status, message = guarded(lambda: random_model(name, Ts[0] + n_new, weights_dtype, settings),
                                             settings)
            if status:
                messages.setdefault((f'{name} {phase}', status), message)

            def measure(T):
                model.resize_block_size(T + n_new)  # the position table a model for T would have
                if phase == 'inference':
                    return measure_inference(model.eval(), T, cache_options(name, settings), settings)
                return measure_training(model.train(), T, settings)

            def record(T, result, seconds, message):
                if table is not None:
                    table.add(dict(speed_row(name, phase, T, result, settings), seconds=seconds, message=message))

            if model is None:  # the model did not build: no context runs
                series = {T: status if T == Ts[0] else '-' for T in Ts}
                for T in Ts:
                    record(T, series[T], 0.0, message if T == Ts[0] else '')
                bar.update(len(Ts))
            else:
                series = run_series(f'{name} {phase}', Ts, measure, settings, messages, bar, record,
                                    predict=lambda T: predicted_seconds(model, T, phase, settings))
            results.update({(name, phase, T): result for T, result in series.items()})
            model = None  # free it before the next model is built
            free_memory(settings)
    bar.close()
    return results, messages


SPEED_SECTIONS = [  # (title, phase, key, unit: a key of FORMATS)
    ('Inference: peak memory', 'inference', 'infer_bytes', 'bytes'),
    ('Inference: prefill tokens/s', 'inference', 'prefill_tok_s', 'rate'),
    ('Inference: decode tokens/s', 'inference', 'decode_tok_s', 'rate'),
    ('Inference: cache bytes per token', 'inference', 'cache_bytes_per_token', 'bytes'),
    ('Training: peak memory of forward + backward', 'training', 'train_bytes', 'bytes'),
    ('Training: tokens/s of forward + backward', 'training', 'train_tok_s', 'rate'),
]


def speed_report(results, messages, names, Ts, settings):
    """The header, one markdown table per section, the longest contexts that ran, and what failed."""
    cuda = settings.device_type == 'cuda'
    capped = f'capped at {settings.vram_gb:g} GiB' if settings.vram_gb > 0 and cuda else ''
    notes = {'budget': f'budget {settings.budget}', 'absorb': 'decodes with the re-projection reference'}
    lines = header_lines(settings) + [
        f'shape: n_layer={settings.n_layer} n_head={settings.n_head} n_embd={settings.n_embd} vocab_size='
        f'{settings.vocab_size} · dtype {settings.dtype} (training: fp32 weights'
        f'{" + autocast" if cuda and settings.dtype != "float32" else ""}) · batch {settings.batch_size} · decode '
        f'{settings.decode_tokens} tokens · median of {settings.repeats} after {settings.warmup} warm-up'
        + ''.join(f' · {name} {notes[option]}' for name in names for option in cache_options(name, settings)),
        'memory: ' + ('CUDA max_memory_allocated (weights, cache, activations)' if cuda else
                      'no CUDA: inference = weights + cache, training = weights + grads + tensors saved for backward')
        + (f', {capped}' if capped else ''),
        'cells: value (ratio to causal at the same context) · OOM: out of memory, longer contexts not run (-) · n/a: '
        'context not possible' + (f' · slow: stopped after {settings.case_seconds:g} s, longer contexts not run (-)'
                                  if settings.case_seconds else ''), '']
    for title, phase, key, unit in SPEED_SECTIONS:
        rows = [[fmt_context(T)] + [cell(results[name, phase, T], key, results.get(('causal', phase, T))
                                         if name != 'causal' else None, unit) for name in names] for T in Ts]
        lines += markdown_table(title, ['context'] + names, rows)
    lines.append(f"Longest context run {capped.replace('capped at', 'within') or 'here'} (inference / training; "
                 f"+: the longest measured):")
    for name in names:
        longest = [max((T for T in Ts if isinstance(results[name, phase, T], dict)), default=None)
                   for phase in ('inference', 'training')]
        lines.append(f'- {name}: ' + ' / '.join('none' if T is None else fmt_context(T) + '+' * (T == Ts[-1])
                                                 for T in longest))
    failures = [f'{label} {status}: {text}' for (label, status), text in messages.items() if status != 'OOM']
    return lines + ([''] + failures if failures else [])


def speed_row(name, phase, T, result, settings):
    """One case as a row of bench_speed.csv: its status ('ok' or why not) and its phase's metrics."""
    row = dict(attention=name, phase=phase, context=T, status='ok' if isinstance(result, dict) else result,
               batch_size=settings.batch_size, device=settings.device, dtype=settings.dtype,
               **{key: getattr(settings, key) if key in ATTENTIONS[name].cache_options else ''
                  for key in ('budget', 'absorb')})
    if isinstance(result, dict):
        row.update(result)
    return row


def bench_speed(settings):
    names = attention_list(settings)
    Ts = context_list(settings, '1k,2k,4k,8k,16k,32k,64k,128k,256k,512k,1M' if settings.device_type == 'cuda'
                      else '128,256,512,1k')
    table = GrowingTable(settings, 'bench_speed', SPEED_COLUMNS)
    results, messages = run_speed(names, Ts, settings, table)
    table.finish(speed_report(results, messages, names, Ts, settings))
    plot_speed(os.path.join(settings.out_dir, 'bench_speed.png'), results, names, Ts, settings)
    print(f'wrote {settings.out_dir}/bench_speed.csv and bench_speed.md')


def plot_speed(path, results, names, Ts, settings):
    """Memory and tokens/s against context, log axes, a colour per attention (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print('matplotlib is not installed: no plot (pip install matplotlib to get bench_speed.png)')
        return
    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    # each phase has its own line style and marker, so the legend tells inference from training at any size
    curves = [(ax_mem, 'inference', 'infer_bytes', '-o', 'inference'),
              (ax_mem, 'training', 'train_bytes', '--s', 'training'),
              (ax_speed, 'inference', 'prefill_tok_s', ':^', 'prefill'),
              (ax_speed, 'inference', 'decode_tok_s', '-o', 'decode'),
              (ax_speed, 'training', 'train_tok_s', '--s', 'training')]
    for i, name in enumerate(names):
        for ax, phase, key, style, what in curves:
            points = [(T, r[key]) for T in Ts if isinstance(r := results[name, phase, T], dict) and r[key]]
            if points:
                ax.plot(*zip(*points), style, ms=4, color=f'C{i}', label=f'{name} {what}')
    cuda = settings.device_type == 'cuda'
    if settings.vram_gb > 0 and cuda:
        ax_mem.axhline(settings.vram_gb * 2 ** 30, color='grey', lw=0.8, ls=':', label=f'{settings.vram_gb:g} GiB')
    ax_mem.set(ylabel='peak memory' if cuda else 'counted memory (see the header)')
    ax_speed.set(ylabel='tokens/s')
    for ax, unit, base, subs in ((ax_mem, 'bytes', 2, (1,)), (ax_speed, 'rate', 10, (1, 2, 5))):
        ax.set(xscale='log', yscale='log', xlabel='context (tokens)')
        ax.set_xticks(Ts, [fmt_context(T) for T in Ts])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_locator(ticker.LogLocator(base=base, subs=subs))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _, unit=unit: FORMATS[unit](y)))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which='major', alpha=0.3)
        ax.legend(fontsize=7, handlelength=4)
    shape = (f'n_layer={settings.n_layer} n_head={settings.n_head} n_embd={settings.n_embd} · {settings.dtype} · '
             f'batch {settings.batch_size}')
    fig.suptitle(f'{header_lines(settings)[0]}\n{shape}', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f'wrote {path}')


# -----------------------------------------------------------------------------------------------------------
# --mode=kernels

def timed(fn, settings):
    """Median seconds of one fn() after warm-up (the first call compiles the kernels), and the peak memory of the
    runs. Each sample repeats fn() for 10 ms at least, so a short kernel is not timed as launch overhead."""
    def seconds_per_call(calls=1):
        sync(settings)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(settings)
        return (time.perf_counter() - t0) / calls

    fn()
    calls = max(1, math.ceil(0.01 / seconds_per_call()))
    return statistics.median(timed_runs(lambda: seconds_per_call(calls), settings)), peak_bytes(settings)


def attention_tflops(seconds, B, H, T, D, backward):
    """TFLOP/s as FlashAttention counts causal attention: 2 matmuls of 2 T^2 D flops, halved by the mask, per
    head; a backward is 2.5 forwards. The same nominal count for every case, so it reads as inverse time."""
    return 4 * B * H * T * T * D / 2 * (3.5 if backward else 1) / seconds / 1e12


def kernel_cases(kernels, settings):
    """(name, fn(q, k, v), available(q)) for SDPA, each kernel and each kernel's PyTorch reference."""
    from attention_infini import fast_infini_attention, infini_attention as infini_reference
    from attention_selective import selective_attention as selective_reference
    beta = torch.zeros(settings.n_head, device=settings.device)  # gate logits: half memory, half local attention
    N = settings.segment_len
    return [
        ('sdpa', lambda q, k, v: nnf.scaled_dot_product_attention(q, k, v, is_causal=True), lambda q: True),
        ('selective kernel', lambda q, k, v: kernels.selective_attention(q, k, v, 0), kernels.selective_available),
        ('selective reference', lambda q, k, v: selective_reference(q, k, v, 0), lambda q: True),
        ('infini kernel', lambda q, k, v: fast_infini_attention(q, k, v, beta, N)[0], kernels.infini_available),
        ('infini reference', lambda q, k, v: infini_reference(q, k, v, beta, N)[0], lambda q: True),
    ]


def measure_kernel(fn, available, shape, settings):
    """Forward and forward + backward seconds, and the latter's peak memory, on random q, k, v of shape."""
    q, k, v, grad = (torch.randn(shape, device=settings.device, dtype=settings.ptdtype) for _ in range(4))
    if not available(q):
        raise ValueError('the kernel does not take this shape or dtype')  # n/a

    def forward_backward():
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        fn(qg, kg, vg).backward(grad)

    with torch.no_grad():
        fwd, _ = timed(lambda: fn(q, k, v), settings)
    fwdbwd, peak = timed(forward_backward, settings)
    return dict(fwd=fwd, fwdbwd=fwdbwd, bytes=float(peak))


def bench_kernels(settings):
    if kernels.triton is None or settings.device_type != 'cuda':
        return write_report(settings, 'bench_kernels.md', header_lines(settings) + [
            '--mode=kernels times the Triton kernels of kernels.py, which need CUDA and triton: skipped here.'])
    H, D = settings.n_head, settings.n_embd // settings.n_head
    Ts = context_list(settings, '1k,4k,16k,64k')
    Bs = sorted(set(parse_ints('batches', settings.batches or str(settings.batch_size), '1,8')))
    cases = kernel_cases(kernels, settings)
    table = GrowingTable(settings, 'bench_kernels', ['case', 'context', 'batch_size', 'heads', 'head_dim', 'dtype',
                                                     'status', 'seconds', 'fwd', 'fwdbwd', 'bytes', 'message'])
    results, messages = {}, {}  # (case, B, T) -> dict(fwd=, fwdbwd=, bytes=) or a status
    bar = tqdm(total=len(cases) * len(Bs) * len(Ts), desc='kernels', dynamic_ncols=True)
    for name, fn, available in cases:
        for B in Bs:  # each batch size starts again from the shortest context
            def measure(T):
                return measure_kernel(fn, available, (B, H, T, D), settings)

            def record(T, result, seconds, message):
                table.add(dict(case=name, context=T, batch_size=B, heads=H, head_dim=D, dtype=settings.dtype,
                               status='ok' if isinstance(result, dict) else result, seconds=seconds,
                               message=message, **(result if isinstance(result, dict) else {})))

            series = run_series(f'{name} at batch {B}', Ts, measure, settings, messages, bar, record)
            results.update({(name, B, T): result for T, result in series.items()})
    bar.close()
    names, shapes = [case[0] for case in cases], [(B, T) for B in Bs for T in Ts]
    lines = header_lines(settings) + [
        f'H={H} D={D} {settings.dtype}, causal; median of {settings.repeats} after {settings.warmup} warm-up; rows: '
        f'batch x context; cells: value (ratio to SDPA); OOM: out of memory, longer contexts not run (-)'
        + (f'; slow: stopped after {settings.case_seconds:g} s' if settings.case_seconds else ''), '']
    lines += kernel_tables(results, names, shapes, H, D)
    failures = [f'{label} {status}: {text}' for (label, status), text in messages.items() if status != 'OOM']
    table.finish(lines + failures)


def kernel_tables(results, names, shapes, H, D):
    """Time and memory against SDPA, TFLOP/s, and each kernel's speed-up over its reference: markdown lines."""
    lines, first = [], ['batch x context']
    for title, key, unit in (('Forward time', 'fwd', 'ms'), ('Forward + backward time', 'fwdbwd', 'ms'),
                             ('Forward + backward peak memory', 'bytes', 'bytes')):
        rows = [[f'{B} x {fmt_context(T)}'] + [cell(results[name, B, T], key, results['sdpa', B, T]
                                                    if name != 'sdpa' else None, unit) for name in names]
                for B, T in shapes]
        lines += markdown_table(title, first + names, rows)

    def tflops(r, B, T):
        if not isinstance(r, dict):
            return r
        return ' / '.join(f"{attention_tflops(r[key], B, H, T, D, key == 'fwdbwd'):.3g}" for key in ('fwd', 'fwdbwd'))

    rows = [[f'{B} x {fmt_context(T)}'] + [tflops(results[name, B, T], B, T) for name in names] for B, T in shapes]
    lines += markdown_table('Forward / forward + backward TFLOP/s, counted as causal attention (4 B H T^2 D / 2 '
                            'per forward, 2.5x that per backward)', first + names, rows)
    pairs = [(name, name.replace(' kernel', ' reference')) for name in names if name.endswith(' kernel')]
    rows = []
    for B, T in shapes:
        row = [f'{B} x {fmt_context(T)}']
        for kernel, reference in pairs:
            a, b = results[kernel, B, T], results[reference, B, T]
            both = isinstance(a, dict) and isinstance(b, dict)
            row += [fmt_ratio(b[key] / a[key]) if both else '' for key in ('fwd', 'fwdbwd')]
        rows.append(row)
    return lines + markdown_table('Kernel speed-up over its PyTorch reference', first + [
        f'{kernel.split()[0]} {what}' for kernel, _ in pairs for what in ('fwd', 'fwd+bwd')], rows)


# -----------------------------------------------------------------------------------------------------------
# --mode=check: the first question on a new GPU, answered in seconds. Does each kernel compile here and agree with
# its PyTorch reference in every dtype, and does one compiled mixed-precision training step of each attention run?

CHECK_SHAPE = (2, 4, 300, 64)  # B, H, T, D: several blocks, a ragged last one, the model's head size
# relative error ||out - ref|| / ||ref|| against fp64 on the same inputs, as tests/test_kernels.py allows on a GPU
# (fp32 multiplies in TF32 there; selective's fp32 gradients move a few votes across the ReLU's kink)
CHECK_TOLERANCE = {'float32': (5e-3, 3e-2), 'float16': (1e-2, 1e-2), 'bfloat16': (5e-2, 5e-2)}  # (output, grads)


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check_kernel(name, dtype, settings, shape=CHECK_SHAPE):
    """One kernel in one dtype against its reference in fp64: the worst relative error of the output and of the
    gradients. Raises ValueError (n/a) where the kernel does not run."""
    from attention_infini import fast_infini_attention, infini_attention
    from attention_selective import selective_attention
    g = torch.Generator().manual_seed(settings.seed)
    q, k, v, beta = (torch.randn(*size, generator=g) for size in [shape] * 3 + [shape[1:2]])
    q, k, v = (t.to(settings.device, getattr(torch, dtype)) for t in (q, k, v))
    available = kernels.selective_available if name == 'selective' else kernels.infini_available
    if kernels.triton is None or not available(q):
        raise ValueError(f'the {name} kernel does not run here (it needs CUDA and triton)')
    ours = [t.clone().requires_grad_() for t in (q, k, v, beta.to(settings.device))]
    ref = [t.detach().double().requires_grad_() for t in ours]
    if name == 'selective':
        out, expected = kernels.selective_attention(*ours[:3], 1), selective_attention(*ref[:3], 1)
    else:
        out = fast_infini_attention(*ours, settings.segment_len)[0]
        expected = infini_attention(*ref, settings.segment_len)[0]
    grad = torch.randn(expected.shape, generator=g).to(settings.device, torch.float64)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    grads = [relative_error(a.grad, b.grad) for a, b in zip(ours, ref) if b.grad is not None]
    return dict(out_error=relative_error(out, expected), grad_error=max(grads))


def check_training_step(name, settings):
    """Two training steps of a small model of this attention, compiled on CUDA, in the bench dtype under autocast
    as train.py trains: the first step's seconds (compiling) and the second's, and the loss."""
    config = GPTConfig(block_size=512, vocab_size=settings.vocab_size, n_layer=2, n_head=settings.n_head,
                       n_embd=settings.n_embd, attention=name, segment_len=settings.segment_len,
                       use_kernels=settings.use_kernels)
    with torch.device(settings.device):
        model = GPT(config)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), settings.device_type)
    step_fn = torch.compile(model) if settings.device_type == 'cuda' else model
    data = torch.randint(settings.vocab_size, (4, config.block_size + 1), device=settings.device)
    seconds = []
    for _ in range(2):
        sync(settings)
        t0 = time.perf_counter()
        with autocast(settings.device_type, settings.dtype):
            _, loss = step_fn(data[:, :-1], data[:, 1:].contiguous())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(settings)
        seconds.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f'the loss is {loss.item()}')
    return dict(first_step_s=seconds[0], step_s=seconds[1], loss=loss.item(),
                compiled=settings.device_type == 'cuda')


def bench_check(settings):
    """Every kernel in every dtype, then a training step of every attention: a row each, written as it finishes.
    A kernel whose error passes its tolerance reads 'MISMATCH'."""
    columns = ['case', 'dtype', 'status', 'seconds', 'out_error', 'grad_error', 'tolerance', 'first_step_s', 'step_s',
               'loss', 'compiled', 'message']
    table = GrowingTable(settings, 'bench_check', columns,
                         title='Kernels against their references, then a training step of each attention')
    names = attention_list(settings)
    cases = [(f'{kernel} kernel', dtype) for kernel in ('selective', 'infini') for dtype in CHECK_TOLERANCE]
    cases += [(f'{name} training step', settings.dtype) for name in names]
    rows = []
    for case, dtype in tqdm(cases, desc='check', dynamic_ncols=True):
        kind = case.split()[0]
        t0 = time.perf_counter()
        if case.endswith('kernel'):
            result, status, message = guarded(lambda: check_kernel(kind, dtype, settings), settings,
                                              settings.case_seconds)
        else:
            result, status, message = guarded(lambda: check_training_step(kind, settings), settings,
                                              settings.case_seconds)
        row = dict(case=case, dtype=dtype, status=status or 'ok', seconds=time.perf_counter() - t0, message=message,
                   **(result or {}))
        if result and 'out_error' in result:
            out_tol, grad_tol = CHECK_TOLERANCE[dtype]
            row['tolerance'] = f'{out_tol:g} / {grad_tol:g}'
            if result['out_error'] > out_tol or result['grad_error'] > grad_tol:
                row['status'] = 'MISMATCH'
        table.add(row)
        rows.append(row)
    failed = sum(row['status'] not in ('ok', 'n/a') for row in rows)

    def number(row, key, fmt):
        return format(row[key], fmt) if isinstance(row.get(key), float) else ''
    grid = [[row['case'], row['dtype'], row['status'], number(row, 'out_error', '.2g'),
             number(row, 'grad_error', '.2g'), row.get('tolerance', ''), number(row, 'first_step_s', '.3g'),
             number(row, 'step_s', '.3g'), number(row, 'loss', '.4g'), row['message']] for row in rows]
    table.finish(header_lines(settings) + [
        f'kernels: B, H, T, D = {CHECK_SHAPE}, relative error to fp64 (output / worst gradient); training: 2 layers, '
        f'n_head={settings.n_head}, n_embd={settings.n_embd}, 4 x 512 tokens, {settings.dtype} autocast, '
        f'{"compiled" if settings.device_type == "cuda" else "not compiled (CPU)"}', ''] + markdown_table(
        'Does it work here?', ['case', 'dtype', 'status', 'output error', 'gradient error', 'tolerance',
                               'first step s', 'step s', 'loss', 'message'], grid) + [
        f'{len(rows) - failed} of {len(rows)} cases ok or n/a'])
    if failed:
        raise SystemExit(f'{failed} of {len(cases)} checks failed: see {table.md_path}')


# -----------------------------------------------------------------------------------------------------------

def setup(argv):
    """The flags as a settings object, checked, with the device-dependent defaults resolved and the GPU set up."""
    settings, _ = configure(argv, FLAGS, __doc__)
    if settings.mode not in ('speed', 'kernels', 'check'):
        raise SystemExit(f"--mode is speed, kernels or check, not '{settings.mode}' (checkpoints: python "
                         f"tools/evaluate.py; the compiler's report: python tools/kernel_report.py)")
    settings.device = settings.device or default_device().replace('mps', 'cpu')  # it measures CUDA or the CPU
    settings.device_type = device_type_of(settings.device)
    if settings.device_type != 'cuda' and settings.device != 'cpu':
        raise SystemExit(f"--device is cuda, cuda:N or cpu, not '{settings.device}'")
    settings.dtype = resolve_dtype(settings.dtype, settings.device_type)
    settings.ptdtype = getattr(torch, settings.dtype)
    settings.gpu_error = ''  # the first CUDA error, kept by guarded
    shape = (settings.n_layer, settings.n_head, settings.n_embd, settings.vocab_size, settings.batch_size)
    if min(shape + (settings.repeats,)) < 1 or min(settings.decode_tokens, settings.warmup) < 0:
        raise SystemExit('n_layer, n_head, n_embd, vocab_size, batch_size, repeats must be >= 1, decode_tokens '
                         'and warmup >= 0')
    if not math.isfinite(settings.vram_gb) or settings.vram_gb < 0:
        raise SystemExit(f'--vram_gb={settings.vram_gb} must be 0 (no cap) or a number of GiB')
    if settings.n_embd % settings.n_head:
        raise SystemExit(f'n_embd={settings.n_embd} must be divisible by n_head={settings.n_head}')
    attention_list(settings)
    parse_ints('budget', settings.budget, '256 or 16,8,8,4')  # a bad --budget fails now, not at its first case
    if not math.isfinite(settings.case_seconds) or settings.case_seconds < 0:
        raise SystemExit(f'--case_seconds is a time limit in seconds (0: none), not {settings.case_seconds:g}')
    check_out_dir(settings.out_dir)  # a bad --out_dir fails now, not after the measuring
    torch.manual_seed(settings.seed)
    if settings.vram_gb > 0 and settings.device_type != 'cuda':
        print('--vram_gb caps CUDA memory: ignored on the CPU')
    if settings.device_type == 'cuda':
        gpu = torch.device(settings.device).index  # None for plain 'cuda': the current GPU (these calls refuse it)
        if gpu is not None:
            torch.cuda.set_device(gpu)  # Triton launches on the current GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if settings.vram_gb > 0:  # the caching allocator raises OutOfMemoryError past this fraction of the card
            total = torch.cuda.get_device_properties(settings.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, settings.vram_gb * 2 ** 30 / total), gpu)
    return settings


def main(argv):
    settings = setup(argv)
    {'speed': bench_speed, 'kernels': bench_kernels, 'check': bench_check}[settings.mode](settings)


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
