"""bench.py: the README's CPU command end to end, the OOM and slow-case paths, flag errors, and the kernels mode."""
import csv
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import bench
import kernels
from tools import report
from model import ATTENTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_COMMAND = [sys.executable, 'bench.py', '--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=64',
               '--contexts=128,256']
TINY = ['--device=cpu', '--n_layer=1', '--n_head=1', '--n_embd=8', '--vocab_size=11', '--decode_tokens=2',
        '--repeats=1', '--warmup=0']


def run_script(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cpu_command_prints_tables_and_writes_csv(tmp_path):
    result = run_script(*CPU_COMMAND, f'--out_dir={tmp_path}')
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert 'torch ' + torch.__version__ in out and 'triton' in out
    for title, *_ in bench.SPEED_SECTIONS:
        assert f'### {title}' in out
    assert '| context | ' + ' | '.join(ATTENTIONS) + ' |' in out
    assert '| 128 |' in out and '| 256 |' in out
    rows = read_csv(tmp_path / 'bench_speed.csv')  # one row per case, in the order they ran
    assert [(r['attention'], r['phase'], int(r['context'])) for r in rows] == [
        (a, phase, T) for a in ATTENTIONS for phase in ('inference', 'training') for T in (128, 256)]
    for r in rows:
        assert r['status'] == 'ok' and float(r['seconds']) > 0, r
        if r['phase'] == 'inference':
            assert float(r['decode_tok_s']) > 0 and float(r['infer_bytes']) > 0 and not r['train_tok_s']
        else:
            assert float(r['train_tok_s']) > 0 and float(r['train_bytes']) > 0 and not r['infer_bytes']
    if importlib.util.find_spec('matplotlib') is None:
        assert 'matplotlib is not installed: no plot' in out
    per_token = {(r['attention'], r['context']): float(r['cache_bytes_per_token']) for r in rows
                 if r['phase'] == 'inference'}
    # InAttention's one cache of initial states is 2L = 4 times smaller than causal's K and V in every layer
    assert per_token['in', '256'] * 4 == per_token['causal', '256']
    assert per_token['infini', '256'] < per_token['infini', '128']  # bounded memory: bytes per token fall


def test_oom_is_recorded_and_longer_contexts_skipped(tmp_path, monkeypatch, capsys):
    """A CPU stand-in for the GPU's out-of-memory: the case says OOM, longer ones are not run, the bench goes on."""
    settings = bench.setup(TINY + ['--attentions=causal,in', '--contexts=16,32,64', '--batch_size=2',
                                   f'--out_dir={tmp_path}'])
    real = bench.measure_training
    calls = []

    def measure_training(model, T, settings):
        calls.append((model.config.attention, T))
        if model.config.attention == 'in' and T >= 32:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 1 TiB')
        return real(model, T, settings)

    monkeypatch.setattr(bench, 'measure_training', measure_training)
    bench.bench_speed(settings)
    assert ('in', 64) not in calls and ('causal', 64) in calls
    rows = {(r['attention'], r['phase'], r['context']): r['status'] for r in read_csv(tmp_path / 'bench_speed.csv')}
    assert rows['in', 'training', '32'] == 'OOM' and rows['in', 'training', '64'] == '-'
    assert rows['in', 'inference', '64'] == 'ok' and rows['causal', 'training', '64'] == 'ok'
    assert "- in: 64+ / 16" in capsys.readouterr().out


def test_after_a_cuda_error_no_case_runs(monkeypatch):
    """An illegal address leaves the GPU unusable: that case is an error, every later one '-', none runs."""
    settings = bench.setup(['--device=cpu'])
    settings.device_type = 'cuda'
    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: pytest.fail('called CUDA after a CUDA error'))

    def crash():
        raise RuntimeError('CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...')
    result, status, message = bench.guarded(crash, settings)
    assert (result, status) == (None, 'error') and message.startswith('RuntimeError: CUDA error: an illegal memory')
    assert 'no later case runs' in message
    assert bench.guarded(lambda: pytest.fail('ran after a CUDA error'), settings) == (None, '-', '')


def test_a_slow_case_is_stopped_and_longer_contexts_skipped(tmp_path, capsys):
    """--case_seconds bounds the case that is running: it reads 'slow', the longer contexts '-'."""
    settings = bench.setup(TINY + ['--attentions=causal', '--contexts=16,32', '--case_seconds=0.2',
                                   f'--out_dir={tmp_path}'])
    measured = []

    def measure(T):
        measured.append(T)
        time.sleep(0.1 if T == 16 else 30)  # the second case would hang the test without the bound
        return dict(fwd=1.0)

    from tqdm import tqdm
    messages, recorded = {}, []
    start = time.perf_counter()
    with tqdm(disable=True) as bar:
        series = bench.run_series('causal training', [16, 32, 64], measure, settings, messages, bar,
                                  lambda T, result, seconds, message: recorded.append((T, result, message)))
    assert time.perf_counter() - start < 5
    assert series == {16: dict(fwd=1.0), 32: 'slow', 64: '-'} and measured == [16, 32]
    assert [r[:2] for r in recorded] == [(16, dict(fwd=1.0)), (32, 'slow'), (64, '-')]
    assert recorded[1][2] == 'stopped after 0.2 s'
    assert messages['causal training', 'slow'] == '32 stopped after --case_seconds=0.2: longer contexts not run'


def test_the_timeout_is_not_swallowed_by_a_fallback(tmp_path):
    """Code that falls back on any Exception (a kernel's trial run) must not catch the case's time limit."""
    settings = bench.setup(TINY + [f'--out_dir={tmp_path}'])

    def falls_back():
        try:
            time.sleep(30)
        except Exception:
            return 'fell back'
    assert bench.guarded(falls_back, settings, 0.1) == (None, 'slow', 'stopped after 0.1 s')
    assert bench.guarded(lambda: 'ok', settings, 0.1) == ('ok', None, '')  # the alarm is off again
    time.sleep(0.2)


def test_a_killed_bench_keeps_every_case_it_finished(tmp_path):
    """Rows are written as cases finish: kill the bench part-way and read its partial table."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, 'bench.py', *TINY, '--attentions=causal,in', '--contexts=16,32,64,128',
                             '--repeats=50', f'--out_dir={tmp_path}'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    csv_path, deadline = tmp_path / 'bench_speed.csv', time.time() + 120
    while time.time() < deadline and (not csv_path.exists() or len(read_csv(csv_path)) < 3):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    rows = read_csv(csv_path)
    assert len(rows) >= 3 and all(r['status'] == 'ok' and float(r['seconds']) > 0 for r in rows)
    markdown = (tmp_path / 'bench_speed.md').read_text()
    assert markdown.startswith('device: CPU') and '### Cases as they finish' in markdown
    assert markdown.count('| causal | inference |') >= 3


def test_plot_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip('matplotlib')
    settings = bench.setup(['--device=cpu'])
    results = {('causal', 'inference', T): dict(infer_bytes=1e3 * T, prefill_tok_s=1e6 / T, decode_tok_s=None,
                                                cache_bytes_per_token=1e3) for T in (128, 256)}
    results.update({('causal', 'training', 128): dict(train_bytes=3e5, train_tok_s=1e3), ('causal', 'training', 256):
                    'OOM'})
    bench.plot_speed(str(tmp_path / 'plot.png'), results, ['causal'], [128, 256], settings)
    assert (tmp_path / 'plot.png').stat().st_size > 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason='a real out-of-memory needs CUDA')
def test_vram_cap_records_oom_on_cuda(tmp_path):
    result = run_script(sys.executable, 'bench.py', '--n_layer=2', '--n_head=2', '--n_embd=64', '--vocab_size=257',
                        '--contexts=1k,64k', '--attentions=causal,selective', '--vram_gb=0.5', '--decode_tokens=4',
                        '--use_kernels=False', f'--out_dir={tmp_path}')  # the selective reference is T x T: OOM
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [r for r in read_csv(tmp_path / 'bench_speed.csv') if r['phase'] == 'training']
    assert any(r['status'] == 'OOM' for r in rows)
    assert all(r['status'] == 'ok' for r in rows if r['context'] == '1024')


@pytest.mark.parametrize('args, message', [
    (['--bogus=1'], 'unknown flag --bogus'),
    (['--n_layer=two'], '--n_layer=two: expected int'),
    (['--contexts=1x'], '--contexts is a comma-separated list'),
    (['--attentions=causal,flash'], "unknown 'flash'"),
    (['n_layer=2'], "no config file 'n_layer=2'"),
    (['--mode=quality'], "--mode is speed, kernels or check, not 'quality' (checkpoints: python tools/evaluate.py"),
    (['--device=tpu'], '--device=tpu: use cpu, cuda, cuda:N or mps'),
    (['--n_embd=10', '--n_head=3'], 'n_embd=10 must be divisible by n_head=3'),
    (['--case_seconds=-1'], '--case_seconds is a time limit in seconds (0: none), not -1'),
    (['--out_dir='], '--out_dir is empty'),
    (['--out_dir=/proc/bench'], '--out_dir=/proc/bench: cannot write there'),
])
def test_bad_flags_are_one_line_errors(args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        settings = bench.setup(args)
        bench.context_list(settings, '1k')


def test_cuda_setup_gives_the_gpu_calls_an_index(monkeypatch):
    """On a GPU, --device=cuda (the default) must reach set_device and the --vram_gb cap as an index or None:
    torch refuses the bare name 'cuda' there. Faked here with torch's own argument check."""
    from torch.cuda._utils import _get_device_index
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda d: type('props', (), {'total_memory': 80 << 30}))
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: calls.append(('device', _get_device_index(d))))
    monkeypatch.setattr(torch.cuda, 'set_per_process_memory_fraction',
                        lambda f, d=None: calls.append(('fraction', f, d if d is None else _get_device_index(d))))
    for device, index in (('', None), ('cuda', None), ('cuda:1', 1)):
        calls.clear()
        settings = bench.setup([f'--device={device}', '--vram_gb=8'])
        assert settings.device_type == 'cuda' and settings.ptdtype == torch.bfloat16
        assert calls == ([('device', index)] if index is not None else []) + [('fraction', 0.1, index)]


def test_a_bad_budget_fails_before_the_bench_runs():
    with pytest.raises(SystemExit, match="--budget is a comma-separated list of integers like 256 or 16,8,8,4"):
        bench.setup(['--device=cpu', '--budget=8,x'])


def test_cache_options_reach_the_right_attention():
    settings = bench.setup(['--device=cpu', '--budget=8,16', '--absorb=False'])
    assert bench.cache_options('selective', settings) == {'budget': [8, 16]}
    assert bench.cache_options('in', settings) == {'absorb': False}
    assert bench.cache_options('causal', settings) == {} == bench.cache_options('infini', settings)


def test_attention_tflops_counts_as_flash_attention_does():
    # B=1, H=12, T=16k, D=64 causal forward: 4 * 12 * 16384^2 * 64 / 2 = 412 GFLOP; in 1 ms that is 412 TFLOP/s
    assert bench.attention_tflops(1e-3, 1, 12, 16384, 64, backward=False) == pytest.approx(412.3, rel=1e-3)
    assert bench.attention_tflops(1e-3, 1, 12, 16384, 64, backward=True) == pytest.approx(3.5 * 412.3, rel=1e-3)


def test_kernels_mode_skips_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip('on CUDA the kernels run for real')
    bench.bench_kernels(bench.setup(['--device=cpu', '--mode=kernels', f'--out_dir={tmp_path}']))
    assert 'need CUDA and triton: skipped' in capsys.readouterr().out


@pytest.mark.skipif(kernels.triton is None, reason='needs triton')
def test_kernels_mode_tables(tmp_path, monkeypatch, capsys):
    """The kernels mode at tiny sizes, every table and the CSV: natively on a GPU; without one, on CPU tensors with
    the kernels in Triton's interpreter."""
    cuda = torch.cuda.is_available()
    settings = bench.setup([f'--device={"cuda" if cuda else "cpu"}', '--mode=kernels', f'--out_dir={tmp_path}',
                            '--n_head=2', '--n_embd=32', '--contexts=64,100', '--warmup=0', '--repeats=1',
                            '--segment_len=32', '--batches=1,2'])
    if not cuda:
        settings.device_type = 'cuda'  # past the CUDA gate, with CPU tensors and no CUDA calls
        monkeypatch.setattr(bench, 'header_lines', lambda settings: [])
        monkeypatch.setattr(report, 'header_lines', lambda settings: [])  # the running table's header
        for name in ('synchronize', 'reset_peak_memory_stats'):
            monkeypatch.setattr(torch.cuda, name, lambda: None)
        monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda: 0)
        for name in ('selective_available', 'infini_available'):
            monkeypatch.setattr(kernels, name, lambda q: True)
    bench.bench_kernels(settings)
    out = capsys.readouterr().out
    for title in ('Forward time', 'Forward + backward time', 'TFLOP/s', 'speed-up over its PyTorch reference'):
        assert title in out
    assert '| 2 x 100 |' in out
    rows = read_csv(tmp_path / 'bench_kernels.csv')
    assert len(rows) == 5 * 2 * 2 and all(r['status'] == 'ok' for r in rows), rows


def test_a_kernel_that_does_not_take_the_input_is_na(tmp_path, monkeypatch):
    """A kernel unavailable for the shape or dtype reads n/a; its longer contexts still run."""
    settings = bench.setup(TINY + ['--mode=kernels', '--contexts=16,32'])
    calls = []

    def measure(T):
        calls.append(T)
        return bench.measure_kernel(lambda q, k, v: q, lambda q: False, (1, 1, T, 8), settings)

    from tqdm import tqdm
    messages = {}
    with tqdm(disable=True) as bar:
        series = bench.run_series('selective kernel', [16, 32], measure, settings, messages, bar)
    assert series == {16: 'n/a', 32: 'n/a'} and calls == [16, 32]
    assert 'does not take this shape' in messages['selective kernel', 'n/a']


def test_check_mode_on_the_cpu(tmp_path):
    """--mode=check: the kernels are n/a without CUDA, a training step of every attention runs, a row each."""
    result = run_script(sys.executable, 'bench.py', '--mode=check', '--device=cpu', '--n_head=2', '--n_embd=32',
                        '--vocab_size=257', f'--out_dir={tmp_path}')
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {(r['case'], r['dtype']): r for r in read_csv(tmp_path / 'bench_check.csv')}
    assert len(rows) == 2 * 3 + len(ATTENTIONS)
    kernel_rows = [rows[f'{k} kernel', d] for k in ('selective', 'infini') for d in bench.CHECK_TOLERANCE]
    assert all(r['status'] == 'n/a' for r in kernel_rows)
    for name in ATTENTIONS:
        row = rows[f'{name} training step', 'float32']
        assert row['status'] == 'ok' and 5.0 < float(row['loss']) < 6.0 and row['compiled'] == 'False', row
    assert '### Does it work here?' in (tmp_path / 'bench_check.md').read_text()


@pytest.mark.skipif(kernels.triton is None, reason='needs triton')
@pytest.mark.parametrize('name', ['selective', 'infini'])
@pytest.mark.parametrize('dtype', ['float32', 'float16'])  # the interpreter's bf16 dot is wrong: a GPU checks bf16
def test_check_kernel_agrees_with_its_reference(monkeypatch, name, dtype):
    """check_kernel's errors on a small shape: natively on a GPU, in Triton's interpreter without one."""
    settings = bench.setup([f'--device={"cuda" if torch.cuda.is_available() else "cpu"}', '--segment_len=16'])
    monkeypatch.setattr(kernels, f'{name}_available', lambda q: True)
    errors = bench.check_kernel(name, dtype, settings, shape=(1, 2, 37, 16))
    assert errors['out_error'] < bench.CHECK_TOLERANCE[dtype][0]
    assert errors['grad_error'] < bench.CHECK_TOLERANCE[dtype][1]


def test_check_mode_fails_on_a_mismatch(tmp_path, monkeypatch):
    settings = bench.setup(TINY + ['--mode=check', '--attentions=causal', f'--out_dir={tmp_path}'])
    monkeypatch.setattr(bench, 'check_kernel', lambda name, dtype, settings: dict(out_error=0.5, grad_error=0.0))
    with pytest.raises(SystemExit, match='6 of 7 checks failed'):
        bench.bench_check(settings)
    assert [r['status'] for r in read_csv(tmp_path / 'bench_check.csv')] == ['MISMATCH'] * 6 + ['ok']


def test_every_model_field_is_a_bench_flag(tmp_path):
    """An attention's options reach the bench as they reach train.py: every GPTConfig field is a flag."""
    settings = bench.setup(['--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=16', '--vocab_size=11',
                            '--feature_scale=4', '--read_norm=rms', '--selection_head=1', f'--out_dir={tmp_path}'])
    assert bench.random_model('infini', 32, torch.float32, settings).config.feature_scale == 4.0
    assert bench.random_model('selective', 32, torch.float32, settings).config.selection_head == 1
