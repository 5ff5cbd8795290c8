"""A new attention is one class that declares what it knows (attention.py's base class) and one line to register it:
then train.py, sample.py, bench.py and visualize.py run it without a change."""
import csv
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import bench
from conftest import ROOT, fresh_module
from model import ATTENTIONS, GPT, GPTConfig, register_attention
from attention import causal_mask


class MeanAttention(nn.Module):
    """Each token's output is the mean of the values of itself and every token before it: no queries, no keys."""
    position_schemes = ('learned',)
    refused_because = 'it has no scores to bias and no keys to rotate'
    own_head_size = False
    streams = False
    cache_options = ()
    call_options = ()
    maps_note = ' (uniform over the past)'

    @staticmethod
    def new_cache(config, batch_size, max_len):
        return SumCache(config.n_layer)

    @staticmethod
    def keys_per_query(config):
        return config.block_size

    @staticmethod
    def rotary_positions(config, start, t):
        return None

    def init_from_causal(self, block):
        pass

    @staticmethod
    def training_problem(config):
        return ''

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.n_head = layer_idx, config.n_head
        self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # the values
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, x0, cache=None):
        T, start = x.size(1), 0 if cache is None else cache.length
        total = self.c_attn(x).cumsum(dim=1)
        if cache is not None:
            total = total + cache.sums[self.layer_idx]
            cache.sums[self.layer_idx] = total[:, -1:]
        counts = torch.arange(start + 1, start + T + 1, device=x.device, dtype=x.dtype)
        return self.c_proj(total / counts[:, None])

    def maps(self, x, x0):
        B, T, C = x.size()
        att = causal_mask(T, T, x.device).to(x.dtype) / torch.arange(1, T + 1, device=x.device, dtype=x.dtype)[:, None]
        att = att.expand(B, self.n_head, T, T)
        v = self.c_attn(x).view(B, T, self.n_head, -1).transpose(1, 2)
        return dict(att=att, y=att @ v)


class SumCache:
    """The running sum of the values of each layer: n_embd numbers per layer, whatever the length."""
    last_token_only = False

    def __init__(self, n_layer):
        self.sums = [0.0] * n_layer
        self.length = 0

    def nbytes(self):
        return sum(s.nbytes for s in self.sums if torch.is_tensor(s))


@pytest.fixture
def mean_attention():
    register_attention('mean', MeanAttention)
    yield
    del ATTENTIONS['mean']


def test_a_new_attention_trains_samples_benches_and_shows_itself(mean_attention, train_tiny, tmp_path, capsys):
    run = tmp_path / 'run'
    train_tiny(run, '--attention=mean')
    assert torch.load(run / 'ckpt.pt', weights_only=True)['model_args']['positions'] == 'learned'  # its default

    fresh_module('sample').main([f'--ckpt={run}/ckpt.pt', '--device=cpu', '--max_new_tokens=5', '--num_samples=1'])
    fresh_module('tools.visualize').main([f'--ckpt={run}/ckpt.pt', '--start=def f(a):', '--png=False'])
    out = capsys.readouterr().out
    assert 'warning' not in out  # its maps reproduce its own forward
    assert 'mean attention, 1 layers x 2 heads' in out and 'put its attention (uniform over the past)' in out

    bench.bench_speed(bench.setup(['--device=cpu', '--attentions=mean', '--n_layer=1', '--n_head=2', '--n_embd=8',
                                   '--vocab_size=11', '--decode_tokens=2', '--repeats=1', '--warmup=0',
                                   '--contexts=16,32', f'--out_dir={tmp_path}']))
    with open(tmp_path / 'bench_speed.csv') as f:
        rows = list(csv.DictReader(f))
    assert sorted((r['phase'], r['status']) for r in rows) == [('inference', 'ok')] * 2 + [('training', 'ok')] * 2


def test_what_the_model_asks_a_new_attention(mean_attention):
    config = dict(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=8, attention='mean')
    with pytest.raises(ValueError, match="attention='mean' cannot take positions='rope': it has no scores"):
        GPTConfig(**config, positions='rope')
    with pytest.raises(ValueError, match="attention='mean' ties its head size to n_embd"):
        GPTConfig(**config, head_size=8)
    model = GPT(GPTConfig(**config))
    with pytest.raises(ValueError, match="attention='mean' takes no option budget"):
        model.new_cache(1, budget=4)
    with pytest.raises(ValueError, match=r"attention='mean' takes no option memory_read \(it takes: none\)"):
        model(torch.zeros(1, 2, dtype=torch.long), memory_read='off')
    assert model.estimate_mfu(1, 1.0) > 0
    # greedy decoding with its cache gives the tokens of the full forward
    idx = torch.randint(0, 11, (2, 3))
    out = model.generate(idx, 6, temperature=0)
    for t in range(3, 9):
        logits, _ = model(out[:, :t])
        assert torch.equal(logits[:, -1].argmax(-1), out[:, t])


def test_an_attention_that_does_not_declare_is_refused():
    class Bare(nn.Module):
        streams = False
    with pytest.raises(TypeError, match='Bare does not declare position_schemes, refused_because'):
        register_attention('bare', Bare)


def test_another_package_named_kernels_does_not_hide_ours():
    """transformers installs a package named `kernels`: in a process that imported it first, selective and infini
    still find this repository's kernels.py."""
    script = ("import sys, types, torch\n"
              "sys.modules['kernels'] = types.ModuleType('kernels')  # what transformers' import leaves behind\n"
              "from model import GPT, GPTConfig\n"
              "for a in ('selective', 'infini'):\n"
              "    m = GPT(GPTConfig(attention=a, n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=10))\n"
              "    m(torch.zeros(1, 8, dtype=torch.long))\n"
              "print('ok', sys.modules['kernels'].__dict__.get('selective_available'))\n")
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == 'ok None'  # the other package stays what it was

