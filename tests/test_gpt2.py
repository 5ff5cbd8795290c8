"""GPT-2's weights (gpt2.py), offline: a tiny random GPT2LMHeadModel saved by transformers into a local folder is
loaded through the same code as the hub's files. Its logits must be Hugging Face's for the causal attention, and
every attention must load it, train a step and sample. transformers runs in a subprocess outside the repo: it
imports a package named `kernels`, which the repo's kernels.py would hide. Skipped without transformers."""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import tiktoken
import torch

import attention_infini
from tools import gpt2
from conftest import fresh_module
from model import ATTENTIONS, GPT, GPTConfig

HAVE_TRANSFORMERS = importlib.util.find_spec('transformers') is not None
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason='transformers is not installed (optional)')

# builds the tiny GPT-2, saves it with save_pretrained, and saves Hugging Face's fp32 logits for a fixed input
MAKE_TINY_GPT2 = """
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=300, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config).eval()
with torch.no_grad():  # larger random weights than GPT-2's init, so the logits differ in more than the 5th digit
    for p in model.parameters():
        p.add_(0.3 * torch.randn_like(p))
model.save_pretrained(sys.argv[1])
idx = torch.randint(0, 300, (2, 32))
with torch.no_grad():
    torch.save({'idx': idx, 'logits': model(idx).logits}, sys.argv[1] + '/reference.pt')
"""


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    """A folder holding a tiny GPT-2 as transformers saves it, and reference.pt: an input and HF's logits."""
    if not HAVE_TRANSFORMERS:
        pytest.skip('transformers is not installed (optional)')
    folder = tmp_path_factory.mktemp('tiny_gpt2')
    result = subprocess.run([sys.executable, '-c', MAKE_TINY_GPT2, str(folder)], cwd=folder, capture_output=True,
                            text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ''})
    assert result.returncode == 0, result.stderr[-2000:]
    return str(folder)


def byte_encoding_named_gpt2():
    """A tiktoken Encoding built offline that calls itself 'gpt2': one token per byte, end-of-text 256. GPT-2's
    real BPE file is downloaded on first use, and the tests have no internet."""
    split = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name='gpt2', pat_str=split, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={'<|endoftext|>': 256})


@pytest.fixture
def gpt2_data(tiny_data, tmp_path, monkeypatch):
    """tiny_data's tokens, labelled as GPT-2 BPE (the stand-in encoding above decodes them)."""
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: byte_encoding_named_gpt2())
    folder = tmp_path / 'data'
    shutil.copytree(tiny_data, folder)
    with open(folder / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 257, 'tokenizer': dict(gpt2.TOKENIZER), 'eot_token': 256, 'dataset': 'tiny'}, f)
    return str(folder)


def all_logits(model, idx):
    return model(idx, torch.zeros_like(idx))[0]  # with targets, forward returns every position's logits


@needs_transformers
def test_causal_logits_are_hugging_faces(tiny_gpt2):
    model, checkpoint = gpt2.load_model(tiny_gpt2)
    reference = torch.load(os.path.join(tiny_gpt2, 'reference.pt'))
    assert checkpoint['tokenizer'] == {'kind': 'tiktoken', 'name': 'gpt2'}
    assert model.config.positions == 'learned' and model.config.gelu == 'tanh' and model.config.block_size == 32
    torch.testing.assert_close(all_logits(model, reference['idx']), reference['logits'], atol=1e-5, rtol=1e-5)


@needs_transformers
def test_hub_names_take_the_same_path(tiny_gpt2, monkeypatch):
    hub = pytest.importorskip('huggingface_hub')
    asked = []
    monkeypatch.setattr(hub, 'snapshot_download', lambda repo_id, **kwargs: asked.append(repo_id) or tiny_gpt2)
    model, _ = gpt2.load_model('gpt2-medium')
    reference = torch.load(os.path.join(tiny_gpt2, 'reference.pt'))
    assert asked == ['openai-community/gpt2-medium']
    torch.testing.assert_close(all_logits(model, reference['idx']), reference['logits'], atol=1e-5, rtol=1e-5)


@needs_transformers
@pytest.mark.parametrize('attention', [a for a in ATTENTIONS if a != 'causal'])
def test_what_each_attention_keeps(tiny_gpt2, attention):
    causal, _ = gpt2.load_model(tiny_gpt2)
    model, _ = gpt2.load_model(tiny_gpt2, attention=attention, segment_len=8)
    kept = causal.state_dict()
    state = model.state_dict()
    new = sorted(set(state) - set(kept))
    for name in set(state) & set(kept):
        assert torch.equal(state[name], kept[name]), name
    if attention == 'selective':  # no parameters of its own: GPT-2 with selection on
        assert new == [] and set(state) == set(kept)
    if attention == 'in':  # ln_kv starts as ln_1, so layer 0 (whose input is x0) is GPT-2's layer 0
        assert new == [f'transformer.h.{i}.attn.ln_kv.{p}' for i in range(2) for p in ('bias', 'weight')]
        x0 = causal.transformer.wte(torch.arange(10)[None]) + causal.transformer.wpe(torch.arange(10))
        torch.testing.assert_close(model.transformer.h[0](x0, x0), causal.transformer.h[0](x0, x0))
    if attention == 'infini':  # a gate per head, near segment-local attention; no position table
        assert new == [f'transformer.h.{i}.attn.beta' for i in range(2)]
        assert torch.all(state['transformer.h.0.attn.beta'] == attention_infini.CAUSAL_GATE_LOGIT)
        assert set(kept) - set(state) == {'transformer.wpe.weight'}


@needs_transformers
@pytest.mark.parametrize('attention', ATTENTIONS)
def test_every_attention_fine_tunes_and_samples(tiny_gpt2, gpt2_data, tmp_path, attention, capsys):
    out_dir = tmp_path / 'out'
    fresh_module('train').main([f'--init_from={tiny_gpt2}', f'--attention={attention}', f'--data_dir={gpt2_data}',
                                f'--out_dir={out_dir}', '--block_size=16', '--segment_len=8', '--batch_size=2',
                                '--max_iters=1', '--eval_interval=1', '--eval_iters=1', '--warmup_iters=0',
                                '--device=cpu', '--dtype=float32', '--compile=False'])
    out = capsys.readouterr().out
    assert f'GPT-2 weights from {tiny_gpt2} into attention={attention}' in out and 'step 1: train loss' in out
    checkpoint = torch.load(out_dir / 'ckpt.pt', weights_only=True)
    assert checkpoint['tokenizer'] == gpt2.TOKENIZER and checkpoint['model_args']['n_embd'] == 16
    assert checkpoint['model_args']['block_size'] == 16  # the table cropped from GPT-2's 32 positions
    fresh_module('sample').main([f'--ckpt={out_dir}/ckpt.pt', '--device=cpu', '--max_new_tokens=5', '--num_samples=1',
                                 '--start=def '])
    assert capsys.readouterr().out.count('---------------') == 1


@needs_transformers
def test_sample_from_gpt2_itself(tiny_gpt2, monkeypatch, capsys):
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: byte_encoding_named_gpt2())
    fresh_module('sample').main([f'--init_from={tiny_gpt2}', '--device=cpu', '--max_new_tokens=5',
                                 '--num_samples=2', '--start=Once'])
    out = capsys.readouterr().out
    assert out.count('Once') == 2 and out.count('---------------') == 2


@needs_transformers
def test_shape_flags_contradicting_gpt2_are_refused(tiny_gpt2, gpt2_data, tmp_path):
    with pytest.raises(SystemExit, match="--n_layer=4 contradicts the checkpoint's n_layer=2"):
        fresh_module('train').main([f'--init_from={tiny_gpt2}', f'--data_dir={gpt2_data}', '--n_layer=4',
                                    f'--out_dir={tmp_path}', '--device=cpu', '--compile=False'])


def test_byte_dataset_is_refused(tiny_data, tmp_path, tiny_gpt2):
    with pytest.raises(SystemExit, match="tokenizer .*gpt2.* is not the one of"):
        fresh_module('train').main([f'--init_from={tiny_gpt2}', f'--data_dir={tiny_data}', f'--out_dir={tmp_path}',
                                    '--device=cpu', '--compile=False'])


# errors: each one line, no traceback

def test_offline_hub_says_what_is_missing(monkeypatch):
    hub = pytest.importorskip('huggingface_hub')

    def offline(*args, **kwargs):
        raise ConnectionError('a long urllib3 message')
    monkeypatch.setattr(hub, 'snapshot_download', offline)
    with pytest.raises(SystemExit, match=r'^cannot fetch gpt2 from the Hugging Face hub \(ConnectionError\); '
                                         r'it needs the internet once') as e:
        gpt2.gpt2_checkpoint('gpt2', attention='causal')
    assert '\n' not in str(e.value)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)  # import fails as if it were not installed
    with pytest.raises(SystemExit, match='^--init_from=gpt2-xl needs huggingface_hub and safetensors.*'
                                         'pip install transformers$'):
        gpt2.gpt2_checkpoint('gpt2-xl', attention='causal')


def test_folders_that_are_not_gpt2(tmp_path):
    with pytest.raises(SystemExit, match='is a folder without config.json'):
        gpt2.gpt2_checkpoint(str(tmp_path))
    config = {'model_type': 'gpt2', 'n_layer': 1, 'n_head': 2, 'n_embd': 8, 'n_positions': 8, 'vocab_size': 10,
              'activation_function': 'relu'}
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="activation_function 'relu'; this code mirrors GPT-2 exactly"):
        gpt2.gpt2_checkpoint(str(tmp_path))
    (tmp_path / 'config.json').write_text(json.dumps({**config, 'activation_function': 'gelu_new'}))
    with pytest.raises(SystemExit, match='no model.safetensors in'):
        gpt2.gpt2_checkpoint(str(tmp_path))
    with pytest.raises(SystemExit, match='--init_from=nowhere: give gpt2'):
        fresh_module('sample').main(['--init_from=nowhere'])


def test_save_pretrained_round_trip(tmp_path):
    pytest.importorskip('safetensors')
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=12, positions='learned',
                          gelu='tanh')).eval()
    gpt2.save_pretrained(model, str(tmp_path))
    again, _ = gpt2.load_model(str(tmp_path))
    idx = torch.randint(0, 50, (2, 12))
    assert torch.equal(all_logits(again, idx), all_logits(model, idx))
    with pytest.raises(ValueError, match="GPT-2's layout"):
        gpt2.save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=10, block_size=8)), str(tmp_path))


@needs_transformers
def test_save_pretrained_is_what_transformers_reads(tiny_gpt2, tmp_path):
    model, _ = gpt2.load_model(tiny_gpt2)
    gpt2.save_pretrained(model, str(tmp_path))
    reference = torch.load(os.path.join(tiny_gpt2, 'reference.pt'))
    script = ("import sys, torch\nfrom transformers import GPT2LMHeadModel\n"
              "m = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()\n"
              "r = torch.load(sys.argv[2])\nwith torch.no_grad():\n"
              "    assert torch.allclose(m(r['idx']).logits, r['logits'], atol=1e-5, rtol=1e-5)\n")
    result = subprocess.run([sys.executable, '-c', script, str(tmp_path), os.path.join(tiny_gpt2, 'reference.pt')],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'PYTHONPATH': ''})
    assert result.returncode == 0, result.stderr[-2000:]
    assert reference['logits'].shape == (2, 32, 300)


def test_gelu_field():
    assert GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=10, block_size=8, gelu='tanh')).transformer.h[0] \
        .mlp.gelu.approximate == 'tanh'
    with pytest.raises(ValueError, match="gelu='erf'"):
        GPTConfig(gelu='erf')
