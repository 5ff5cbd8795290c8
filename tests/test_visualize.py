"""visualize.py: the maps reproduce the model, selective's marks are the cache's evictions, infini's memory share,
the terminal's structure with and without colour, the pictures, one-line errors."""
import dataclasses
import importlib.util
import os
import re
import sys

import pytest
import torch

from conftest import fresh_module
from model import GPT, GPTConfig

MATPLOTLIB = importlib.util.find_spec('matplotlib') is not None
TEXT = 'def add(a, b): return a + b  # and then some more text'  # one line, one byte per token


def tiny_checkpoint(folder, attention, **options):
    """A tiny random model saved as folder/ckpt.pt, as train.py writes it (byte tokenizer)."""
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=128, vocab_size=257, attention=attention, segment_len=8,
                **options)
    model = GPT(GPTConfig(**args))
    if attention == 'infini':  # gates away from 1/2, so each head mixes differently
        for block in model.transformer.h:
            block.attn.beta.data = torch.tensor([-1.0, 2.0])
    os.makedirs(folder, exist_ok=True)
    torch.save({'model_args': dataclasses.asdict(model.config), 'model': model.state_dict(),
                'tokenizer': {'kind': 'byte'}, 'rope_layout': 'half'}, os.path.join(folder, 'ckpt.pt'))
    return model.eval()


def visualize(folder, *flags):
    fresh_module('tools.visualize').main([f'--ckpt={folder}/ckpt.pt', f'--start={TEXT}', '--png=False', *flags])


def rows(out, header):
    """The (text, digits) rows printed under the first header line containing `header`."""
    lines = out.split('\n')
    at = next(i for i, line in enumerate(lines) if header in line)
    return lines[at + 1], lines[at + 2]


@pytest.mark.parametrize('attention,budget,options', [
    ('causal', 0, {}), ('causal', 0, {'positions': 'rope'}), ('causal', 0, {'positions': 'alibi'}),
    ('in', 0, {}), ('in', 0, {'positions': 'alibi'}),
    ('infini', 0, {}), ('infini', 0, {'feature_scale': 4.0, 'memory_read': 'off'}),
    ('selective', 0, {}), ('selective', 6, {}), ('selective', 6, {'positions': 'rope'}),
    ('selective', 6, {'positions': 'alibi'})])
def test_maps_reproduce_the_model(tmp_path, attention, budget, options, capsys):
    model = tiny_checkpoint(tmp_path, attention, **options)
    viz = fresh_module('tools.visualize')
    idx = torch.tensor([list(TEXT.encode())])
    maps = viz.analyse(model, idx, **({'budget': budget} if budget else {}))
    assert 'warning' not in capsys.readouterr().out  # every layer's recomputed output is the block's
    T = idx.size(1)
    for m in maps:
        att = m['att']
        assert att.shape == (2, T, T)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, T))
        assert (att.triu(1) == 0).all()  # causal: no weight on a future token
    if attention == 'selective':  # the budget was applied: no layer attends to more than `budget` tokens
        assert all(((m['att'] > 0).sum(-1) <= (budget or T)).all() for m in maps)
    viz.analyse(model, idx, tolerance=-1.0, **({'budget': budget} if budget else {}))  # a disagreement is reported
    assert "layer 0's recomputed attention differs from the model's" in capsys.readouterr().out


@pytest.mark.parametrize('evict', ['F', 'window'])
def test_selective_marks_are_the_caches_evictions(tmp_path, evict, capsys):
    budget = 6
    model = tiny_checkpoint(tmp_path, 'selective')
    ids = list(TEXT.encode())
    cache = model.new_cache(1, len(ids), budget=budget, evict=evict)
    with torch.no_grad():  # the cache's own rule, one decode step at a time
        for i in ids:
            model(torch.tensor([[i]]), cache=cache)
    for layer in range(2):
        held = set(cache.pos[layer][0].tolist())
        visualize(tmp_path, f'--budget={budget}', f'--layer={layer}', f'--evict={evict}')
        out = capsys.readouterr().out
        text, digits = rows(out, f'== selective, layer {layer}:')
        assert text == TEXT and len(digits) == len(TEXT)
        assert {j for j, d in enumerate(digits) if d != '-'} == held and len(held) == budget
        assert all(d.isdigit() for d in digits.replace('-', ''))
        if evict == 'window':  # the first token and the latest ones
            assert held == {0, *range(len(TEXT) - budget + 1, len(TEXT))}
        text, digits = rows(out, f'where token {len(TEXT) - 1}')  # the last token sees only what is held
        assert {j for j, d in enumerate(digits) if d != '-' and j < len(TEXT) - 1} | {len(TEXT) - 1} == held


def test_infini_memory_share(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path, 'infini')
    maps = fresh_module('tools.visualize').analyse(model, torch.tensor([list(TEXT.encode())]))
    for m in maps:
        share = m['memory_share']  # (heads, tokens)
        assert (share[:, :8] == 0).all()  # the first segment has an empty memory
        assert (share[:, 8:] > 0).all() and (share <= 1).all()
        assert (share[0, 8:] < share[1, 8:]).all()  # head 1's gate reads more from memory
        torch.testing.assert_close(m['gate'], torch.sigmoid(torch.tensor([-1.0, 2.0])))
    visualize(tmp_path, '--head=1')
    out = capsys.readouterr().out
    assert 'layer 0      0.27    0.88' in out  # the gate table: one row per layer, one column per head
    text, digits = rows(out, "share of each token's output read from memory")
    assert text.replace('|', '') == TEXT and [j for j, c in enumerate(text) if c == '|'] == [8, 17, 26, 35, 44, 53]
    assert digits.startswith('0' * 8 + '|') and set(digits[9:17]) != {'0'}
    share = maps[1]['memory_share'][1, 8:].mean()  # head 1 of layer 1, after the first segment
    assert f'layer 1: {share:.0%} of the output read from memory, mean over the tokens after the first segment' in out


@pytest.mark.parametrize('attention', ['causal', 'in', 'infini', 'selective'])
def test_terminal_output(tmp_path, attention, capsys):
    tiny_checkpoint(tmp_path, attention)
    visualize(tmp_path, '--token=3', *(['--budget=8'] if attention == 'selective' else []))
    out = capsys.readouterr().out
    assert '\033[' not in out  # not a terminal: plain marks
    assert out.startswith(f'{attention} attention, 2 layers x 2 heads; {len(TEXT)} tokens\n')
    text, digits = rows(out, "where token 3 ' ' put its attention")
    text, digits = text.replace('|', ''), digits.replace('|', '')  # infini's segment starts
    assert text == 'def[ ]' + TEXT[4:] and digits[3] == digits[5] == ' ' and digits[4].isdigit()  # the query boxed
    assert len(digits) == len(text) and set(digits[6:]) == {'0'}  # no weight on a token after it
    assert out.count('digits under each line: ') == out.count('\n== ') - (attention == 'infini')  # but the gates
    assert out.count('\nlayer 0: ') == out.count('\nlayer 1: ') == (2 if attention in ('selective', 'infini') else 1)


def test_colours_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    tiny_checkpoint(tmp_path, 'selective')
    long_text = f'--start={TEXT} {TEXT}'  # longer than a printed line
    visualize(tmp_path, '--budget=8', long_text)
    plain = capsys.readouterr().out
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    monkeypatch.delenv('NO_COLOR', raising=False)
    visualize(tmp_path, '--budget=8', long_text)
    out = capsys.readouterr().out
    assert '\033[48;5;' in out and '\033[2;9m' in out and 'shades ' in out  # shades, struck evictions
    text = re.sub('\033\\[[0-9;]*m', '', out).split('\n')
    at = next(i for i, line in enumerate(text) if 'the mask F' in line)
    assert text[at + 1:at + 3] == plain.split('\n')[at + 1:at + 4:2]  # the same lines, without the digits
    monkeypatch.setenv('NO_COLOR', '1')
    visualize(tmp_path, '--budget=8', long_text)
    assert capsys.readouterr().out == plain


def test_generated_tokens_are_marked(tmp_path, capsys):
    tiny_checkpoint(tmp_path, 'causal')
    visualize(tmp_path, '--max_new_tokens=4', '--start=abc')
    out = capsys.readouterr().out
    assert '7 tokens; 4 generated after »' in out and '»' in rows(out, 'where token 6')[1]


@pytest.mark.skipif(not MATPLOTLIB, reason='matplotlib is an optional extra')
@pytest.mark.parametrize('attention,names', [('causal', ['causal_maps.png']),
                                             ('selective', ['selective_maps.png', 'selective_masks.png']),
                                             ('infini', ['infini_maps.png', 'infini_gates.png'])])
def test_pictures(tmp_path, attention, names, capsys):
    import matplotlib.image
    tiny_checkpoint(tmp_path, attention)
    visualize(tmp_path, '--png=True', f'--png_dir={tmp_path / "png"}',
              *(['--budget=8'] if attention == 'selective' else []))
    out = capsys.readouterr().out
    for name in names:
        path = tmp_path / 'png' / name
        assert f'wrote {path}' in out
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100


@pytest.mark.parametrize('flag,message', [
    ('--layer=2', '--layer=2: this model has 2 layers; give 0..1, or -1 for the mean over them'),
    ('--head=-2', '--head=-2: this model has 2 heads; give 0..1, or -1 for the mean over them'),
    ('--token=99', f'--token=99: the text has {len(TEXT)} tokens; give 0..{len(TEXT) - 1}, or a negative index'),
    ('--token=-99', f'--token=-99: the text has {len(TEXT)} tokens'),
    ('--budget=1', "--budget=1: budget=1: each layer's budget must be an int >= 2 (it counts the first token"),
    ('--evict=LRU', '--evict=LRU chooses what a pruned cache drops; it needs --budget=N'),
    ('--budget=8 --evict=LRU', "--budget=8 --evict=LRU: unknown evict 'LRU', choose one of: F, window"),
    ('--evict=window', '--evict=window chooses what a pruned cache drops; it needs --budget=N'),
    ('--png=True --png_dir=/dev/null/pictures', 'cannot write pictures to /dev/null/pictures'),
])
def test_one_line_errors(tmp_path, flag, message):
    tiny_checkpoint(tmp_path, 'selective')
    with pytest.raises(SystemExit) as e:
        visualize(tmp_path, *flag.split())
    assert str(e.value).startswith(message) and '\n' not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a machine with a GPU runs --device=cuda')
def test_a_missing_gpu_is_one_line(tmp_path):
    tiny_checkpoint(tmp_path, 'causal')
    with pytest.raises(SystemExit, match='--device=cuda but torch sees no CUDA GPU; use --device=cpu'):
        visualize(tmp_path, '--device=cuda')


def test_budget_is_for_selective_only(tmp_path):
    tiny_checkpoint(tmp_path, 'infini')
    with pytest.raises(SystemExit, match="--budget=.*: attention='infini' takes no option budget"):
        visualize(tmp_path, '--budget=8')


def test_a_long_text_is_cropped_with_a_note(tmp_path, capsys):
    tiny_checkpoint(tmp_path, 'causal')
    visualize(tmp_path, '--start=' + 'x' * 150)
    assert 'the text has 150 tokens, more than block_size=128: looking at its last 128' in capsys.readouterr().out


def test_only_the_settings_are_flags(tmp_path):
    assert 'CHECK_TOLERANCE' not in fresh_module('tools.visualize').FLAGS
    with pytest.raises(SystemExit, match='unknown flag --CHECK_TOLERANCE'):
        visualize(tmp_path, '--CHECK_TOLERANCE=1')
