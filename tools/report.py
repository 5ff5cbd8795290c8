"""
What bench.py and evaluate.py share: each case runs guarded, and the results become markdown tables and CSV files.

A guarded case never stops the script. Out of memory reads 'OOM', a context a model cannot take (a ValueError)
reads 'n/a', a case stopped at its time limit 'slow', anything else 'error' with its message. Every table starts
with the device, the versions and the command that made it, and a value may carry its ratio to a baseline
measured in the same run.

Tables are written as they grow (GrowingTable): each finished case is on disk at once, so a run that is killed,
or hits a time limit, keeps every case it finished.
"""
import csv
import dataclasses
import gc
import os
import platform
import signal
import sys
import threading
import time

import torch

from configurator import parse_ints


def free_memory(settings):
    gc.collect()
    if settings.device_type == 'cuda' and not settings.gpu_error:  # after a CUDA error, any CUDA call raises it
        torch.cuda.empty_cache()


class CaseTimeout(BaseException):
    """Raised inside a case that runs past its time limit (guarded's seconds). A BaseException, like
    KeyboardInterrupt, so that code which falls back on any Exception (a kernel's trial run) does not swallow it."""


def can_time_out():
    """A running case can be stopped only where SIGALRM exists (not Windows), from the main thread."""
    return hasattr(signal, 'setitimer') and threading.current_thread() is threading.main_thread()


_running = [False]  # the alarm stops a case only while its fn runs, never guarded's own clean-up


def _time_out(signum, frame):
    if _running[0]:
        _running[0] = False
        raise CaseTimeout()


def guarded(fn, settings, seconds=0.0):
    """Run one case: (result, None, '') or (None, 'OOM' | 'n/a' | 'slow' | 'error' | '-', message). Memory is
    freed after. seconds > 0 stops the case after that long ('slow'). Python checks for the alarm between
    operations, so a single long GPU or CPU operation finishes first.
    The first CUDA error (an illegal address, a failed launch) leaves the GPU unusable: it is kept in
    settings.gpu_error, and no later case runs ('-')."""
    if settings.gpu_error:
        return None, '-', ''
    result, status, message = None, None, ''
    timer = seconds > 0 and can_time_out()
    if timer:
        previous = signal.signal(signal.SIGALRM, _time_out)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        _running[0] = timer
        result = fn()
        _running[0] = False
    except CaseTimeout:
        status, message = 'slow', f'stopped after {seconds:g} s'
    except Exception as e:  # one case failing must not stop the script: record what happened and go on
        _running[0] = False
        oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (isinstance(e, RuntimeError) and (
            'out of memory' in str(e) or "can't allocate memory" in str(e)))
        status = 'OOM' if oom else 'n/a' if isinstance(e, ValueError) else 'error'
        message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if status == 'error' and 'CUDA error' in str(e):
            settings.gpu_error = message
            message += ' (the GPU is unusable after a CUDA error: no later case runs)'
    finally:
        _running[0] = False
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    free_memory(settings)  # outside the except block, so the traceback no longer holds the case's tensors
    return result, status, message


def context_list(settings, default):
    """--contexts, or default, as sorted lengths in tokens."""
    Ts = sorted(set(parse_ints('contexts', settings.contexts or default)))
    if not Ts or Ts[0] < 2:
        raise SystemExit(f"--contexts needs lengths of at least 2 tokens, not '{settings.contexts}'")
    return Ts


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


FORMATS = {'bytes': fmt_bytes, 'rate': fmt_rate, 'ms': lambda seconds: f'{seconds * 1e3:.3g} ms'}


def cell(result, key, base, unit):
    """A case's value at key (result: a dict), with its ratio to the baseline case's (base: causal's, or SDPA's,
    in the same run); a status ('OOM', 'n/a', 'error', '-') as it is."""
    if not isinstance(result, dict) or result[key] is None:
        return result if isinstance(result, str) else ''
    ratio = f' ({fmt_ratio(result[key] / base[key])})' if isinstance(base, dict) and base[key] else ''
    return FORMATS[unit](result[key]) + ratio


def markdown_table(title, header, rows):
    lines = [f'### {title}', '', '| ' + ' | '.join(header) + ' |', '|' + '---:|' * len(header)]
    return lines + ['| ' + ' | '.join(row) + ' |' for row in rows] + ['']


def header_lines(settings):
    """The device, the versions and the command, so that a table says where it comes from."""
    if settings.device_type == 'cuda':
        total = torch.cuda.get_device_properties(settings.device).total_memory
        name = f'{torch.cuda.get_device_name(settings.device)} ({fmt_bytes(total)})'
    else:
        name = f'{settings.device_type.upper()} ({platform.machine()}, {torch.get_num_threads()} threads)'
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'not installed'
    return [f'device: {name} · torch {torch.__version__} · triton {triton_version} · python '
            f'{platform.python_version()}',
            f'command: python {os.path.basename(sys.argv[0])} {" ".join(sys.argv[1:])}', '']


def write_report(settings, name, lines):
    """Print the lines and write them to out_dir/name."""
    print('\n'.join(lines))
    os.makedirs(settings.out_dir, exist_ok=True)
    with open(os.path.join(settings.out_dir, name), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def csv_value(v):
    """Whole numbers as integers, other floats to 6 significant digits, None empty."""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f'{v:.6g}'
    return '' if v is None else v


MATMUL_RATES = {}  # (device, dtype): FLOP/s of one large matmul there, measured once


def matmul_rate(device, dtype, n=2048):
    """FLOP/s of one n x n matmul on device in dtype: the most it does, timed once (the second of two calls)."""
    def sync():
        if torch.device(device).type == 'cuda':
            torch.cuda.synchronize()
    if (device, dtype) not in MATMUL_RATES:
        a = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            a @ a
            sync()
        MATMUL_RATES[device, dtype] = 2 * n ** 3 / max(time.perf_counter() - t0, 1e-9)
    return MATMUL_RATES[device, dtype]


def least_seconds(model, T, sequences, device, dtype, training=False):
    """Fewer seconds than `sequences` forwards of T tokens take (three forwards a training step): their FLOPs at
    the matmul rate. A forward costs 2 N per token plus 2 L H Q per key a query sees (half of what the attention
    declares: a causal query sees half on average). A signal cannot stop one long kernel call, so bench.py and
    evaluate.py do not start a case predicted past their time limit."""
    c = model.config
    keys = model.attention.keys_per_query(dataclasses.replace(c, block_size=T)) / 2
    forward = T * sequences * (2 * model.get_num_params() + 2 * c.n_layer * c.n_head * c.head_size * keys)
    return (3 if training else 1) * forward / matmul_rate(device, dtype)


def check_out_dir(out_dir):
    """Try a write in out_dir, so a bad --out_dir fails before any measuring, in one line. A folder that does not
    exist yet is made for the try and removed again: the tables make it when they have something to write."""
    if not out_dir:
        raise SystemExit('--out_dir is empty: give the folder the tables go to, like --out_dir=bench_out')
    made = not os.path.isdir(out_dir)
    probe = os.path.join(out_dir, f'.write_test_{os.getpid()}')
    try:
        os.makedirs(out_dir, exist_ok=True)
        open(probe, 'w').close()
        os.remove(probe)
        if made:
            os.removedirs(out_dir)  # and its parents that the try made, while they are empty
    except OSError as e:
        raise SystemExit(f'--out_dir={out_dir}: cannot write there ({e.strerror or e})') from None


class GrowingTable:
    """A table written as it grows: each add(row) appends the row to out_dir/name.csv and to a markdown table in
    out_dir/name.md at once, so a run killed at any moment keeps every case it finished. finish(lines) replaces
    the markdown file with the full report; the CSV is complete by then."""

    def __init__(self, settings, name, columns, title='Cases as they finish'):
        self.columns = list(columns)
        self.csv_path = os.path.join(settings.out_dir, f'{name}.csv')
        self.md_path = os.path.join(settings.out_dir, f'{name}.md')
        self.settings = settings
        os.makedirs(settings.out_dir, exist_ok=True)
        with open(self.csv_path, 'w', newline='') as f:
            csv.writer(f).writerow(self.columns)
        with open(self.md_path, 'w') as f:
            f.write('\n'.join(header_lines(settings) + markdown_table(title, self.columns, [])[:-1]) + '\n')
        self.count = 0

    def add(self, row):
        """Append one finished case; keys missing from row are left empty."""
        values = [csv_value(row.get(key)) for key in self.columns]
        with open(self.csv_path, 'a', newline='') as f:
            csv.writer(f).writerow(values)
        with open(self.md_path, 'a') as f:
            f.write('| ' + ' | '.join(str(v).replace('|', '/') for v in values) + ' |\n')
        self.count += 1

    def finish(self, lines):
        """Print the full report and write it over the running markdown table."""
        write_report(self.settings, os.path.basename(self.md_path), lines)
