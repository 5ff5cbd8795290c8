"""docs/add_attention.md: its code block, as a reader would copy it, trains, samples, benches and shows itself."""
import csv
import os
import re
import sys

import pytest
import torch

import bench
from conftest import ROOT, fresh_module
from model import ATTENTIONS, GPT, GPTConfig, register_attention


@pytest.fixture
def window_attention(tmp_path, monkeypatch):
    doc = open(os.path.join(ROOT, 'docs', 'add_attention.md')).read()
    code = re.search(r'## The file: `attention_window.py`\n\n```python\n(.*?)```', doc, re.S).group(1)
    (tmp_path / 'attention_window.py').write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop('attention_window', None)
    from attention_window import WINDOW, WindowAttention
    register_attention('window', WindowAttention)
    yield WINDOW
    del ATTENTIONS['window']
    sys.modules.pop('attention_window', None)


def test_the_docs_window_attention_sees_only_its_window(window_attention):
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention='window', block_size=32, vocab_size=11, n_layer=1, n_head=2, n_embd=8)).eval()
    idx = torch.randint(0, 11, (1, 32))
    logits, _ = model(idx, idx)
    changed = idx.clone()
    changed[0, :32 - window_attention] = (changed[0, :32 - window_attention] + 1) % 11  # outside the last window
    again, _ = model(changed, changed)
    assert torch.allclose(logits[0, -1], again[0, -1], atol=1e-6)  # the last token never saw them
    out = model.generate(idx[:, :5], 10, temperature=0)  # the cached decode gives the full forward's tokens
    for t in range(5, 15):
        full, _ = model(out[:, :t])
        assert torch.equal(full[:, -1].argmax(-1), out[:, t])


def test_the_docs_window_attention_trains_samples_benches_and_shows_itself(window_attention, train_tiny, tmp_path,
                                                                           capsys):
    run = tmp_path / 'run'
    train_tiny(run, '--attention=window')
    fresh_module('sample').main([f'--ckpt={run}/ckpt.pt', '--device=cpu', '--max_new_tokens=5', '--num_samples=1'])
    fresh_module('tools.visualize').main([f'--ckpt={run}/ckpt.pt', '--start=def f(a):', '--png=False'])
    assert 'warning' not in capsys.readouterr().out  # its maps reproduce its own forward
    bench.bench_speed(bench.setup(['--device=cpu', '--attentions=window', '--n_layer=1', '--n_head=2', '--n_embd=8',
                                   '--vocab_size=11', '--decode_tokens=2', '--repeats=1', '--warmup=0',
                                   '--contexts=16,32', f'--out_dir={tmp_path}']))
    with open(tmp_path / 'bench_speed.csv') as f:
        rows = list(csv.DictReader(f))
    assert sorted((r['phase'], r['status']) for r in rows) == [('inference', 'ok')] * 2 + [('training', 'ok')] * 2
