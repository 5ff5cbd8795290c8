"""bench.py: the README's CPU command end to end, the OOM path, flag errors, and quality mode on a tiny checkpoint."""
import csv
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import bench
from model import ATTENTIONS, GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_COMMAND = [sys.executable, 'bench.py', '--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=64',
               '--contexts=128,256']


@pytest.fixture(autouse=True)
def restore_flags(monkeypatch):
    """Tests that call bench in-process change its globals (the flags); put them back afterwards."""
    for key in bench.FLAGS + ['device_type', 'ptdtype', 'gpu_error']:
        monkeypatch.setattr(bench, key, getattr(bench, key))


def run_bench(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cpu_command_prints_tables_and_writes_csv(tmp_path):
    result = run_bench(*CPU_COMMAND, f'--out_dir={tmp_path}')
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert 'torch ' + torch.__version__ in out and 'triton' in out
    for title, *_ in bench.SPEED_SECTIONS:
        assert f'### {title}' in out
    assert '| context | ' + ' | '.join(ATTENTIONS) + ' |' in out
    assert '| 128 |' in out and '| 256 |' in out
    rows = read_csv(tmp_path / 'bench_speed.csv')
    assert [(r['attention'], int(r['context'])) for r in rows] == [(a, T) for a in ATTENTIONS for T in (128, 256)]
    for r in rows:
        assert r['inference'] == 'ok' and r['training'] == 'ok', r
        assert float(r['decode_tok_s']) > 0 and float(r['train_tok_s']) > 0 and float(r['infer_bytes']) > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert 'matplotlib is not installed: no plot' in out
    per_token = {(r['attention'], r['context']): float(r['cache_bytes_per_token']) for r in rows}
    # InAttention's one cache of initial states is 2L = 4 times smaller than causal's K and V in every layer
    assert per_token['in', '256'] * 4 == per_token['causal', '256']
    assert per_token['infini', '256'] < per_token['infini', '128']  # bounded memory: bytes per token fall


def test_oom_is_recorded_and_longer_contexts_skipped(tmp_path, monkeypatch, capsys):
    """A CPU stand-in for the GPU's out-of-memory: the case says OOM, longer ones are not run, the bench goes on."""
    flags = dict(device='cpu', attentions='causal,in', contexts='16,32,64', n_layer=1, n_head=1, n_embd=8,
                 vocab_size=11, batch_size=2, decode_tokens=2, repeats=1, warmup=0, out_dir=str(tmp_path))
    for key, value in flags.items():
        monkeypatch.setattr(bench, key, value)
    real = bench.measure_training
    calls = []

    def measure_training(model, T):
        calls.append((model.config.attention, T))
        if model.config.attention == 'in' and T >= 32:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 1 TiB')
        return real(model, T)

    monkeypatch.setattr(bench, 'measure_training', measure_training)
    bench.setup()
    bench.bench_speed()
    assert ('in', 64) not in calls and ('causal', 64) in calls
    rows = {(r['attention'], r['context']): r for r in read_csv(tmp_path / 'bench_speed.csv')}
    assert rows['in', '32']['training'] == 'OOM' and rows['in', '64']['training'] == '-'
    assert rows['in', '64']['inference'] == 'ok' and rows['causal', '64']['training'] == 'ok'
    assert "- in: 64+ / 16" in capsys.readouterr().out


def test_after_a_cuda_error_no_case_runs(monkeypatch):
    """An illegal address leaves the GPU unusable: that case is an error, every later one '-', none runs."""
    monkeypatch.setattr(bench, 'device_type', 'cuda')
    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: pytest.fail('called CUDA after a CUDA error'))

    def crash():
        raise RuntimeError('CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...')
    result, status, message = bench.guarded(crash)
    assert (result, status) == (None, 'error') and message.startswith('RuntimeError: CUDA error: an illegal memory')
    assert 'no later case runs' in message
    assert bench.guarded(lambda: pytest.fail('ran after a CUDA error')) == (None, '-', '')


def test_a_slow_case_skips_longer_contexts(tmp_path, monkeypatch, capsys):
    flags = dict(device='cpu', attentions='causal', contexts='16,32', n_layer=1, n_head=1, n_embd=8, vocab_size=11,
                 decode_tokens=2, repeats=1, warmup=0, case_seconds=1e-9, out_dir=str(tmp_path))
    for key, value in flags.items():
        monkeypatch.setattr(bench, key, value)
    bench.setup()
    bench.bench_speed()
    rows = {r['context']: r for r in read_csv(tmp_path / 'bench_speed.csv')}
    assert rows['16']['inference'] == rows['16']['training'] == 'ok'
    assert rows['32']['inference'] == rows['32']['training'] == '-'
    assert '--case_seconds=1e-09): longer contexts not run' in capsys.readouterr().out


def test_plot_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip('matplotlib')
    results = {('causal', T): dict(infer_bytes=1e3 * T, train_bytes=3e3 * T, decode_tok_s=1e4 / T, train_tok_s=1e5 / T)
               for T in (128, 256)}
    bench.plot_speed(str(tmp_path / 'plot.png'), results, ['causal'], [128, 256])
    assert (tmp_path / 'plot.png').stat().st_size > 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason='a real out-of-memory needs CUDA')
def test_vram_cap_records_oom_on_cuda(tmp_path):
    result = run_bench(sys.executable, 'bench.py', '--n_layer=2', '--n_head=2', '--n_embd=64', '--vocab_size=257',
                       '--contexts=1k,64k', '--attentions=causal,selective', '--vram_gb=0.5', '--decode_tokens=4',
                       '--use_kernels=False', f'--out_dir={tmp_path}')  # the selective reference is T x T: OOM
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_csv(tmp_path / 'bench_speed.csv')
    assert any(r['training'] == 'OOM' for r in rows)
    assert all(r['training'] == 'ok' for r in rows if r['context'] == '1024')


@pytest.mark.parametrize('args, message', [
    (['--bogus=1'], 'unknown flag --bogus'),
    (['--n_layer=two'], '--n_layer=two: expected int'),
    (['--contexts=1x'], '--contexts is a comma-separated list'),
    (['--attentions=causal,flash'], "unknown 'flash'"),
    (['n_layer=2'], "no config file 'n_layer=2'"),
])
def test_bad_flags_are_one_line_errors(args, message):
    with pytest.raises(SystemExit, match=message):
        bench.configure(args)
        bench.attention_list()
        bench.context_list('1k')


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
        monkeypatch.setattr(bench, 'device', device)
        monkeypatch.setattr(bench, 'vram_gb', 8.0)
        bench.setup()
        assert bench.device_type == 'cuda' and bench.ptdtype == torch.bfloat16
        assert calls == ([('device', index)] if index is not None else []) + [('fraction', 0.1, index)]


def test_a_bad_budget_fails_before_the_bench_runs(monkeypatch):
    monkeypatch.setattr(bench, 'device', 'cpu')
    monkeypatch.setattr(bench, 'budget', '8,x')
    with pytest.raises(SystemExit, match="--budget is a comma-separated list of integers like 256 or 16,8,8,4"):
        bench.setup()


def test_cache_options_reach_the_right_attention(monkeypatch):
    monkeypatch.setattr(bench, 'budget', '8,16')
    monkeypatch.setattr(bench, 'absorb', False)
    assert bench.cache_options('selective') == {'budget': [8, 16]}
    assert bench.cache_options('in') == {'absorb': False}
    assert bench.cache_options('causal') == {} == bench.cache_options('infini')


def test_attention_tflops_counts_as_flash_attention_does():
    # B=1, H=12, T=16k, D=64 causal forward: 4 * 12 * 16384^2 * 64 / 2 = 412 GFLOP; in 1 ms that is 412 TFLOP/s
    assert bench.attention_tflops(1e-3, 1, 12, 16384, 64, backward=False) == pytest.approx(412.3, rel=1e-3)
    assert bench.attention_tflops(1e-3, 1, 12, 16384, 64, backward=True) == pytest.approx(3.5 * 412.3, rel=1e-3)


def test_kernels_mode_skips_without_cuda(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip('on CUDA the kernels run for real')
    monkeypatch.setattr(bench, 'device', 'cpu')
    monkeypatch.setattr(bench, 'out_dir', str(tmp_path))
    bench.setup()
    bench.bench_kernels()
    assert 'need CUDA and triton: skipped' in capsys.readouterr().out


def test_compile_mode_builds_every_kernel_for_gaming_and_datacenter_gpus(tmp_path):
    """No GPU needed: each kernel compiles for an RTX 30 (sm_86) and an H100 (sm_90), fitting their shared memory."""
    pytest.importorskip('triton.backends.nvidia')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}  # conftest sets it without a GPU
    result = subprocess.run([sys.executable, 'bench.py', '--mode=compile', '--archs=86,90', f'--out_dir={tmp_path}'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_csv(tmp_path / 'bench_compile.csv')
    assert {r['arch'] for r in rows} == {'86', '90'} and len(rows) == 2 * 11
    assert [(r['kernel'], r['arch'], r['status']) for r in rows if r['status'] != 'ok'] == []
    assert all(int(r['registers']) <= 255 for r in rows)
    assert '| selective forward |' in result.stdout


def test_val_loss_of_examples_skips_the_targets_that_start_one(monkeypatch):
    """As train.py does: nothing in an example predicts the first token of the next one."""
    monkeypatch.setattr(bench, 'device', 'cpu')
    monkeypatch.setattr(bench, 'eval_windows', 1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    data = np.random.default_rng(0).integers(0, 256, 17).astype(np.uint16)  # room for one window of 16: at 0
    ids = torch.from_numpy(data.astype(np.int64))
    with torch.no_grad():
        logits, _ = model(ids[None, :16], ids[None, 1:])
    losses = F.cross_entropy(logits[0], ids[1:], reduction='none')
    kept = [t for t in range(16) if (t + 1) % 8]  # targets 8 and 16 start the 2nd and 3rd examples of 8 tokens
    assert len(kept) == 14
    assert bench.val_loss(model, data, 16, example_len=8) == pytest.approx(losses[kept].mean().item(), rel=1e-5)
    assert bench.val_loss(model, data, 16) == pytest.approx(losses.mean().item(), rel=1e-5)


def test_kernels_mode_tables(tmp_path, monkeypatch, capsys):
    """The kernels mode at tiny sizes, every table and the CSV: natively on a GPU; without one, on CPU tensors with
    the kernels in Triton's interpreter."""
    kernels = pytest.importorskip('kernels')
    if not kernels.triton:
        pytest.skip('needs triton')
    cuda = torch.cuda.is_available()
    for key, value in dict(device='cuda' if cuda else 'cpu', out_dir=str(tmp_path), n_head=2, n_embd=32,
                           contexts='64,100', warmup=0, repeats=1, segment_len=32, batches='1,2').items():
        monkeypatch.setattr(bench, key, value)
    bench.setup()
    if not cuda:
        monkeypatch.setattr(bench, 'device_type', 'cuda')  # past the CUDA gate, with CPU tensors and no CUDA calls
        monkeypatch.setattr(bench, 'header_lines', lambda: [])
        monkeypatch.setattr(bench, 'peak_bytes', lambda: 0)
        for name in ('sync', 'reset_peak'):
            monkeypatch.setattr(bench, name, lambda: None)
        for name in ('selective_available', 'infini_available'):
            monkeypatch.setattr(kernels, name, lambda q: True)
    bench.bench_kernels()
    out = capsys.readouterr().out
    for title in ('Forward time', 'Forward + backward time', 'TFLOP/s', 'speed-up over its PyTorch reference'):
        assert title in out
    assert '| 2 x 100 |' in out
    rows = read_csv(tmp_path / 'bench_kernels.csv')
    assert len(rows) == 5 * 2 * 2 and all(r['status'] == 'ok' for r in rows), rows


def test_compile_report_marks_what_does_not_fit_or_fails(tmp_path, monkeypatch):
    kernels = pytest.importorskip('kernels')
    pytest.importorskip('triton.backends.nvidia')
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # the compiler is faked below
    for key, value in dict(mode='compile', out_dir=str(tmp_path), archs='86,90').items():
        monkeypatch.setattr(bench, key, value)
    bench.setup()

    def fake_compile(triton, fn, data, constexprs, launch, arch, tool):
        if fn is kernels._infini_memory_bwd_kernel:
            raise RuntimeError('PassManager::run failed')
        return 100, 0, (120 if fn is kernels._selective_fwd_kernel else 10) * 1024  # 120 KiB: not on sm_86

    monkeypatch.setattr(bench, 'compile_kernel', fake_compile)
    bench.bench_compile()
    status = {(r['kernel'], r['arch']): r['status'] for r in read_csv(tmp_path / 'bench_compile.csv')}
    assert status['selective forward', '86'] == 'TOO MUCH' and status['selective forward', '90'] == 'ok'
    assert status['infini memory backward, delta', '90'] == 'fails: PassManager::run failed'
    assert status['selective carry', '86'] == status['infini memory forward, linear', '90'] == 'ok'


def make_checkpoint(path, attention, block_size):
    torch.manual_seed(0)
    args = dict(block_size=block_size, vocab_size=257, n_layer=1, n_head=2, n_embd=16, attention=attention,
                segment_len=32)
    model = GPT(GPTConfig(**args))
    state = {'_orig_mod.' + k: v for k, v in model.state_dict().items()}  # as torch.compile saves them
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model_args=args, model=state, config=dict(dataset='tiny'), tokenizer={'kind': 'byte'}), path)


def test_quality_mode_on_tiny_checkpoints(tmp_path, capsys):
    data = tmp_path / 'tiny'
    data.mkdir()
    np.random.default_rng(0).integers(0, 256, 3000).astype(np.uint16).tofile(data / 'val.bin')
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump(dict(vocab_size=257, tokenizer={'kind': 'byte'}, eot_token=256, dataset='tiny'), f)
    make_checkpoint(str(tmp_path / 'out-causal' / 'ckpt.pt'), 'causal', 128)
    make_checkpoint(str(tmp_path / 'out-infini' / 'ckpt.pt'), 'infini', 128)
    result = run_bench(sys.executable, 'bench.py', '--mode=quality', '--device=cpu', f'--data_dir={data}',
                       f'--ckpt={tmp_path}/out-causal/ckpt.pt,{tmp_path}/out-infini/ckpt.pt', '--contexts=128,256',
                       '--eval_windows=3', '--batch_size=2', '--passkey=True', '--passkey_trials=1', '--depths=0,1',
                       f'--out_dir={tmp_path}/bench')
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {(r['checkpoint'], r['context']): r for r in read_csv(tmp_path / 'bench' / 'bench_quality.csv')}
    causal, infini = 'out-causal (causal, block 128)', 'out-infini (infini, block 128)'
    assert rows[causal, '256']['status'] == 'n/a'  # past block_size: a fixed context cannot
    assert rows[infini, '256']['status'] == 'ok'  # infini streams past it
    for key in [(causal, '128'), (infini, '128'), (infini, '256')]:
        assert 5.0 < float(rows[key]['val_loss']) < 6.0  # an untrained model: about ln(257) = 5.55
    passkey = read_csv(tmp_path / 'bench' / 'bench_passkey.csv')
    assert len(passkey) == 2 * 2 * 2 and all(r['status'] == 'ok' for r in passkey)
    assert f'### Passkey accuracy, {infini}' in result.stdout

    flags = dict(mode='quality', device='cpu', data_dir=str(data), ckpt=f'{tmp_path}/out-causal/ckpt.pt',
                 contexts='256', eval_windows=1, extend=True, out_dir=str(tmp_path / 'extended'))
    for key, value in flags.items():
        setattr(bench, key, value)  # restored by the restore_flags fixture
    bench.setup()
    bench.bench_quality()
    assert re.search(r'\| 256 \| \d\.\d{4}\* \|', capsys.readouterr().out)  # tiled positions, marked *


class Oracle:
    """A stand-in model whose greedy answer is the key it reads in the prompt (or a wrong one)."""
    streams = True

    def __init__(self, right):
        self.right = right

    def generate(self, idx, max_new_tokens, top_k=None):
        key = re.search(r'pass key is (\d+)\. Remember', bytes(idx[0].tolist()).decode()).group(1)
        key = key if self.right else key[::-1] + '0'
        return torch.cat((idx, torch.tensor([list(key.encode())[:max_new_tokens]])), dim=1)


def test_passkey_accuracy_scores_exact_answers(monkeypatch):
    from data.common import tokenizer_from_meta
    monkeypatch.setattr(bench, 'passkey_trials', 3)
    monkeypatch.setattr(bench, 'device', 'cpu')
    bench.setup()
    tok = tokenizer_from_meta({'kind': 'byte'})
    assert bench.passkey_accuracy(Oracle(right=True), tok, 300, 0.5) == 1.0
    assert bench.passkey_accuracy(Oracle(right=False), tok, 300, 0.5) == 0.0
