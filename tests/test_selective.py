"""Selective attention: the mechanism against the paper's definition, the cache, pruning and training; its
synthetic tasks (data/varassign, data/parity) and their scoring (experiments/selective_synthetic.py)."""
import importlib.util
import os
import pickle
import subprocess
import types

import numpy as np
import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

import attention_selective

from attention_selective import (SelectiveCache, accumulated_masks, causal_logits, eviction_schedule,
                                 selection_matrix, selective_attention)
from model import GPT, GPTConfig


def tiny(**kw):
    args = dict(block_size=32, vocab_size=23, n_layer=2, n_head=2, n_embd=16, attention='selective',
                positions='learned')  # the tests that read x0 by hand add the table; others pass their own
    args.update(kw)
    return GPTConfig(**args)


def model_with_votes(seed=0, **kw):
    """A float64 model whose selecting head casts large votes, so that F and pruning really matter."""
    torch.manual_seed(seed)
    model = GPT(tiny(**kw)).double().eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)
    return model


def qkv(B=2, H=3, T=20, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype) * 2 for _ in range(3)]


def silence_selection(model):
    """Zero the selecting head's query projection: its logits are 0, ReLU gives S = 0."""
    with torch.no_grad():
        for block in model.transformer.h:
            attn = block.attn
            d = attn.width // attn.n_head
            rows = slice(attn.selection_head * d, (attn.selection_head + 1) * d)
            attn.c_attn.weight[rows] = 0.0
            attn.c_attn.bias[rows] = 0.0


def test_zero_selection_is_causal_attention():
    q, k, v = qkv()
    q[:, 0] = 0.0  # head 0's logits are all 0, so S = ReLU(0) = 0 and F = 0
    ref = scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(selective_attention(q, k, v), ref, rtol=1e-12, atol=1e-12)


def test_zero_selection_model_equals_causal_model():
    torch.manual_seed(0)
    selective = GPT(tiny()).double().eval()
    silence_selection(selective)
    causal = GPT(tiny(attention='causal')).double().eval()
    causal.load_state_dict(selective.state_dict())
    idx = torch.randint(0, 23, (2, 32))
    torch.testing.assert_close(selective(idx, idx)[0], causal(idx, idx)[0], rtol=1e-12, atol=1e-12)


def test_F_equals_the_papers_sum():
    q, k, _ = qkv(T=12)
    L0 = causal_logits(q, k)[:, 0]
    F = accumulated_masks(selection_matrix(L0))
    B, T, _ = F.shape
    ref = torch.zeros_like(F)
    for i in range(T):
        for j in range(1, T):
            for kk in range(j + 1, i):  # F[i,j] = sum over j < k < i of ReLU(L0[k,j])
                ref[:, i, j] += torch.relu(L0[:, kk, j])
    torch.testing.assert_close(F, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('fn', ['relu', 'softplus', 'sigmoid'])
def test_F_constraints(fn):
    q, k, _ = qkv(T=24)
    L0 = causal_logits(q, k)[:, 1]
    F = accumulated_masks(selection_matrix(L0, fn))
    T = F.size(-1)
    assert (F >= 0).all()
    assert (F[:, :, 0] == 0).all(), "the first token is never masked"
    assert (F.triu() == 0).all(), "no future keys, and F[i,i] = 0"
    assert (F.diagonal(offset=-1, dim1=1, dim2=2) == 0).all(), "token i-1 is masked by nobody yet at query i"
    assert (F[:, 1:] >= F[:, :-1]).all(), "F never decreases down a column"
    # the diagonal contributes nothing: changing each token's logit with itself leaves F unchanged
    bumped = L0 + 100.0 * torch.eye(T, dtype=L0.dtype)
    assert torch.equal(accumulated_masks(selection_matrix(bumped, fn)), F)
    # a vote of token k takes effect from query k+1 on: a change in row k of S changes F from row k+1
    S = selection_matrix(L0, fn)
    S2 = S.clone()
    S2[:, 10, 3] += 1.0
    changed = (accumulated_masks(S2) != F).any(dim=-1)[0]
    assert not changed[:11].any() and changed[11:].all()


def test_no_nan_with_huge_logits():
    q, k, v = qkv(T=16)
    y = selective_attention(q * 1e3, k * 1e3, v)
    assert torch.isfinite(y).all()


def test_causality():
    torch.manual_seed(0)
    model = model_with_votes()
    idx = torch.randint(0, 23, (1, 32))
    other = idx.clone()
    other[0, 20] = (idx[0, 20] + 1) % 23
    a, b = model(idx, idx)[0], model(other, other)[0]
    assert torch.equal(a[:, :20], b[:, :20]) and not torch.equal(a[:, 20], b[:, 20])


def test_selection_changes_the_output():
    q, k, v = qkv()
    ref = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (selective_attention(q, k, v) - ref).abs().max() > 1e-2


@pytest.mark.parametrize('chunks', [[1] * 30, [7, 1, 5, 17], [30]])
def test_cache_equals_full_forward(chunks):
    """Prefill and chunked prefill, without pruning and with a budget >= the length: logits, F as the full forward."""
    model = model_with_votes()
    idx = torch.randint(0, 23, (2, 30))
    full, _ = model(idx, idx)
    for budget in (None, 30, 64):
        cache = model.new_cache(2, budget=budget)
        logits, start = [], 0
        for n in chunks:
            out, _ = model(idx[:, start:start + n], cache=cache)
            logits.append(out[:, -1])
            start += n
        ends = torch.tensor(chunks).cumsum(0) - 1
        torch.testing.assert_close(torch.stack(logits, 1), full[:, ends], rtol=1e-10, atol=1e-10)
        # the cached F of every layer is the F of a next query
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(30))
        for layer, block in enumerate(model.transformer.h):
            q, k, _ = block.attn.c_attn(block.ln_1(x)).split(16, dim=2)
            q, k = (t.view(2, 30, 2, 8).transpose(1, 2) for t in (q, k))
            S = selection_matrix(causal_logits(q, k)[:, 0])
            torch.testing.assert_close(cache.f[layer][:, :30], S.sum(1), rtol=1e-10, atol=1e-12)
            x = block(x, x)


@pytest.mark.parametrize('budget', [2, 3, 8, [3, 11], 40])
def test_pruned_decoding_equals_parallel_simulation(budget):
    """Token-by-token decoding with the evicting cache == one forward given the budget: the eviction schedule
    replayed on the full F, layer by layer."""
    model = model_with_votes()
    idx = torch.randint(0, 23, (3, 32))
    budgets = budget if isinstance(budget, list) else [budget] * 2
    simulated, _ = model(idx, idx, budget=budget)
    for prefill in (1, 12):
        cache = model.new_cache(3, budget=budget)
        logits = [model(idx[:, :prefill], cache=cache)[0][:, -1]]
        for t in range(prefill, 32):
            logits.append(model(idx[:, t:t + 1], cache=cache)[0][:, -1])
            for layer, b in enumerate(budgets):
                pos = cache.pos[layer]
                held = (pos >= 0).sum(1)
                assert (held == min(b, t + 1)).all(), "the cache never exceeds its budget"
                assert (pos == 0).any(1).all() and (pos == t).any(1).all(), "first and current token kept"
        torch.testing.assert_close(torch.stack(logits, 1), simulated[:, prefill - 1:], rtol=1e-10, atol=1e-10)
    unpruned, _ = model(idx, idx)
    assert not torch.allclose(unpruned, simulated) or min(budgets) >= 32


@pytest.mark.parametrize('positions,evict', [('rope', 'F'), ('alibi', 'F'), ('learned', 'window'),
                                             ('rope', 'window'), ('alibi', 'window')])
def test_pruned_decoding_equals_simulation_with_each_position_scheme_and_eviction(positions, evict):
    """The same with rotary or ALiBi positions, evicting by F or the oldest: kept entries keep their original
    positions (ALiBi's distance and RoPE's rotation), so the pruned cache still equals the simulation."""
    model = model_with_votes(positions=positions)
    idx = torch.randint(0, 23, (3, 32))
    simulated, _ = model(idx, idx, budget=[3, 11], evict=evict)
    cache = model.new_cache(3, budget=[3, 11], evict=evict)
    logits = [model(idx[:, :12], cache=cache)[0][:, -1]]
    for t in range(12, 32):
        logits.append(model(idx[:, t:t + 1], cache=cache)[0][:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), simulated[:, 11:], rtol=1e-10, atol=1e-10)
    if evict == 'window':  # the first token and the latest budget-1, whatever F says
        assert sorted(cache.pos[0][0].tolist()) == [0, 30, 31]
        assert sorted(cache.pos[1][0].tolist()) == [0] + list(range(22, 32))
    assert not torch.allclose(model(idx, idx)[0], simulated)


def test_window_eviction_differs_from_F_eviction():
    """With real votes, evicting the most masked keeps other tokens than a sliding window of the same size."""
    model = model_with_votes()
    idx = torch.randint(0, 23, (2, 32))
    held = {}
    for evict in ('F', 'window'):
        cache = model.new_cache(2, budget=6, evict=evict)
        model(idx, cache=cache)
        held[evict] = [sorted(p.tolist()) for p in cache.pos[1]]
    assert held['window'] == [[0, 27, 28, 29, 30, 31]] * 2
    assert held['F'] != held['window']


@pytest.mark.parametrize('budget', [3, 8, [3, 11], None])
def test_chunked_cached_forward_equals_decoding(budget, monkeypatch):
    """Many tokens through the cache at once, CHUNK at a time (linear memory), give the logits and the cache of
    decoding them one at a time: the chunk replays the eviction rule on its own accumulating votes."""
    monkeypatch.setattr(attention_selective, 'CHUNK', 5)
    model = model_with_votes()
    idx = torch.randint(0, 23, (3, 32))
    stepped = model.new_cache(3, budget=budget)
    one_by_one = torch.cat([model(idx[:, [t]], idx[:, [t]], cache=stepped)[0] for t in range(32)], dim=1)
    for chunks in ([32], [12, 1, 19], [7, 7, 7, 11]):
        cache, logits, start = model.new_cache(3, budget=budget), [], 0
        for n in chunks:
            logits.append(model(idx[:, start:start + n], idx[:, start:start + n], cache=cache)[0])
            start += n
        torch.testing.assert_close(torch.cat(logits, dim=1), one_by_one, rtol=1e-10, atol=1e-10)
        for layer in range(2):
            a, b = (c.held(layer, idx) for c in (cache, stepped))
            assert torch.equal(a[3], b[3]), 'the same tokens held'
            for x, y in zip(a[:3], b[:3]):
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_cache_memory_is_bounded_by_budget():
    model = model_with_votes()
    idx = torch.randint(0, 23, (1, 32))
    cache = model.new_cache(1, budget=[4, 6])
    model(idx[:, :10], cache=cache)
    size = cache.nbytes()
    for t in range(10, 32):
        model(idx[:, t:t + 1], cache=cache)
        assert cache.nbytes() == size
    per_entry = 2 * 16 * 8 + 8 + 8  # k and v, F (fp64 here, as the model; fp32 for half models), position
    assert size == (4 + 6) * per_entry


def test_without_votes_pruning_is_sink_plus_window():
    """All F = 0: ties go to the oldest, so the cache keeps the first token and the latest budget-1."""
    torch.manual_seed(0)
    model = GPT(tiny()).double().eval()
    silence_selection(model)
    idx = torch.randint(0, 23, (2, 20))
    cache = model.new_cache(2, budget=5)
    model(idx[:, :9], cache=cache)
    for t in range(9, 20):
        model(idx[:, t:t + 1], cache=cache)
        for pos in cache.pos:
            assert sorted(pos[0].tolist()) == [0] + list(range(t - 3, t + 1))
    F = torch.zeros(1, 12, 12)
    assert eviction_schedule(F, 4)[0, -1].nonzero().flatten().tolist() == [0, 9, 10, 11]


def test_eviction_takes_the_most_masked():
    F = torch.zeros(1, 6, 6)
    F[0, 4:, 2] = 5.0  # token 2 is the most masked from query 4 on
    F[0, 5:, 1] = 1.0
    keep = eviction_schedule(F, 4)[0]
    assert keep[3].tolist() == [True, True, True, True, False, False]
    assert keep[4].tolist() == [True, True, False, True, True, False]
    assert keep[5].tolist() == [True, False, False, True, True, True]


def test_generate_with_budget_equals_pruned_recomputation():
    model = model_with_votes()
    prompt = torch.randint(0, 23, (2, 5))
    new = 40  # past block_size: the window is cropped and the cache rebuilt, as nanoGPT does
    out = model.generate(prompt, new, top_k=1, budget=6)
    ref = prompt
    for _ in range(new):
        logits, _ = model(ref[:, -32:], budget=6)
        ref = torch.cat((ref, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ref)


def test_gradients_reach_the_selecting_head():
    q, k, v = (t[:1, :2, :6, :4].clone().requires_grad_() for t in qkv())
    assert torch.autograd.gradcheck(selective_attention, (q, k, v))
    # through S alone: the outputs of head 1 depend on head 0's query only via F
    q.grad = None
    selective_attention(q, k, v)[:, 1].sum().backward()
    assert q.grad[:, 0].abs().sum() > 0


def test_training_loss_falls():
    torch.manual_seed(0)
    model = GPT(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randint(0, 23, (2, 4, 32))
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_memory_loss():
    torch.manual_seed(0)
    model = GPT(tiny(selection_loss=0.1))
    idx = torch.randint(0, 23, (2, 32))
    _, loss = model(idx, idx)
    aux = [block.attn.aux_loss for block in model.transformer.h]
    assert all(0 < a.item() <= 0.1 / 2 for a in aux)  # at most epsilon / n_layer each: nothing masked yet
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    model.eval()
    _, eval_loss = model(idx, idx)
    assert all(block.attn.aux_loss == 0.0 for block in model.transformer.h), "validation loss is the LM loss only"


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match='selection_head=2 must be a head index'):
        GPT(tiny(selection_head=2))
    with pytest.raises(ValueError, match="unknown selection_fn 'tanh'"):
        GPT(tiny(selection_fn='tanh'))
    with pytest.raises(ValueError, match='3 values for 2 layers'):
        SelectiveCache(tiny(), 1, 32, budget=[4, 4, 4])
    with pytest.raises(ValueError, match='int >= 2'):
        SelectiveCache(tiny(), 1, 32, budget=1)
    with pytest.raises(ValueError, match="unknown evict 'lru', choose one of: F, window"):
        SelectiveCache(tiny(), 1, 32, budget=4, evict='lru')


def test_window_eviction_through_evaluate(tmp_path, capsys):
    """evaluate.py --search_budgets --evict=window: the search runs with the sliding-window cache and says so."""
    from tools import evaluate
    data = tmp_path / 'tiny'
    data.mkdir()
    np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint16).tofile(data / 'val.bin')
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump(dict(vocab_size=257, tokenizer={'kind': 'byte'}, eot_token=256, dataset='tiny'), f)
    model = model_with_votes(vocab_size=257, positions='rope').float()
    torch.save(dict(model_args=vars(model.config), model=model.state_dict(), config=dict(dataset='tiny'),
                    tokenizer={'kind': 'byte'}, rope_layout='half'), tmp_path / 'ckpt.pt')
    flags = ['--device=cpu', f'--data_dir={data}', f'--ckpt={tmp_path / "ckpt.pt"}', '--loss=False',
             '--search_budgets=True', '--target=+0.05', '--shrink=0.5', '--eval_windows=2', '--batch_size=2']
    evaluate.main(flags + ['--evict=window', f'--out_dir={tmp_path}/window'])
    assert 'eviction: window' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--evict is 'F'.* or 'window'"):
        evaluate.main(flags + ['--evict=lru'])


# ---------------------------------------------------------------------------------------------------------
# The synthetic tasks: Variable Assignment, Parity, and the scoring of the experiment.

def load_script(relpath, name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


varassign = load_script('data/varassign/prepare.py', 'varassign_prepare')
parity = load_script('data/parity/prepare.py', 'parity_prepare')
synthetic = load_script('experiments/selective_synthetic.py', 'selective_synthetic')


def test_varassign_answers_the_latest_assignment():
    rng = np.random.default_rng(0)
    for n_assign in (1, 5, 15):
        prompt, answer = varassign.make_varassign(64, n_assign, 3, rng)
        text = bytes(prompt).decode()
        assert len(prompt) + len(answer) == 64 and len(answer) == 1
        assert text.endswith('?') and text.count('=') == n_assign
        latest = dict(a.split('=') for a in text[:-2].split())  # later assignments overwrite earlier ones
        assert bytes(answer).decode() == latest[text[-2]]
    with pytest.raises(ValueError, match='do not fit in 32 tokens'):
        varassign.make_varassign(32, 8, 3, rng)


def test_varassign_and_parity_sets_on_disk(tmp_path):
    varassign.main(['--length=32', '--min_assign=2', '--max_assign=4', '--n_train=10', '--n_val=3',
                    f'--out_dir={tmp_path / "va"}'])
    parity.main(['--length=16', '--n_train=10', '--n_val=3', f'--out_dir={tmp_path / "pa"}'])
    for name, length in (('va', 32), ('pa', 16)):
        with open(tmp_path / name / 'meta.pkl', 'rb') as f:
            meta = pickle.load(f)
        assert meta['example_len'] == length and meta['answer_len'] == 1
        val = np.fromfile(tmp_path / name / 'val.bin', dtype=np.uint16).reshape(3, length)
        assert set(bytes(val[:, -1].astype(np.uint8)).decode()) <= set('0123456789')
    examples = np.fromfile(tmp_path / 'pa' / 'train.bin', dtype=np.uint16).reshape(10, 16).astype(np.uint8)
    for row in examples:
        bits, answer = bytes(row).decode().strip().split('=')
        assert int(answer) == bits.count('1') % 2
    with pytest.raises(SystemExit, match='--min_assign=9 must be between 1 and --max_assign=7'):
        varassign.main(['--length=32', '--min_assign=9', f'--out_dir={tmp_path / "bad"}'])


def test_answer_accuracy_is_greedy_decoding():
    """answer_accuracy's one forward scores an answer right exactly when greedy generation reproduces it."""
    torch.manual_seed(0)
    model = GPT(tiny()).double().eval()
    examples = torch.randint(0, 23, (12, 20))
    greedy = model.generate(examples[:, :-2], 2, top_k=1)
    examples[:, -2:] = greedy[:, -2:]
    examples[6:, -1] = (greedy[6:, -1] + 1) % 23  # half the answers are not what greedy decoding says
    assert synthetic.answer_accuracy(model, examples, answer_len=2, batch_size=5) == 0.5


def test_copy_accuracy_counts_the_repeats():
    class Oracle(torch.nn.Module):
        """Predicts every next token right, except the targets of positions 0..2."""
        def forward(self, idx, targets):
            logits = torch.nn.functional.one_hot(targets, 23).double()
            logits[:, :3] = torch.roll(logits[:, :3], 1, dims=-1)
            return logits, None
    x = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2]])  # period 4: the repeats are tokens 4..9, all right
    assert synthetic.copy_accuracy(Oracle(), x) == 1.0
    x = torch.tensor([[1, 2, 1, 2, 1, 2, 1, 2, 1, 2]])  # period 2: tokens 2..9, token 2 and 3 predicted wrong
    assert synthetic.copy_accuracy(Oracle(), x) == 6 / 8


def test_unmasked_tokens_counts_F_below_one():
    model = model_with_votes()
    prompts = torch.randint(0, 23, (3, 24))
    counts = synthetic.unmasked_tokens(model, prompts)
    with torch.no_grad():
        x = model.transformer.wte(prompts) + model.transformer.wpe(torch.arange(24))
        for layer, block in enumerate(model.transformer.h):
            q, k, _ = block.attn.c_attn(block.ln_1(x)).split(16, dim=2)
            q, k = (t.view(3, 24, 2, 8).transpose(1, 2) for t in (q, k))
            F = accumulated_masks(selection_matrix(causal_logits(q, k)[:, 0]))
            assert counts[layer] == pytest.approx((F[:, -1] < 1).sum(-1).double().mean().item())
            x = block(x, x)
    assert min(counts) < 24, 'large votes mask something'
    silence_selection(model)
    assert synthetic.unmasked_tokens(model, prompts) == [24.0, 24.0]
    assert synthetic.unmasked_tokens(GPT(tiny(attention='causal')), prompts) == [24.0, 24.0]


def test_last_value_baseline():
    examples = torch.tensor([list(b'  a=1 b=2 a?1'), list(b'  a=1 b=2 b?2'), list(b'  b=2 a=1 b?2')])
    assert synthetic.last_value_accuracy(examples) == pytest.approx(1 / 3)


def fake_checkpoint(cmd):
    """What a train.py command would leave in its --out_dir, as far as the experiments read it: a checkpoint at its
    last iteration, and log.csv's two columns."""
    folder = next(c[len('--out_dir='):] for c in cmd if c.startswith('--out_dir='))
    iters = int(next((c[len('--max_iters='):] for c in cmd if c.startswith('--max_iters=')), 1000))
    torch.save({'model': {}, 'model_args': {}, 'iter_num': iters, 'config': {'max_iters': iters}},
               os.path.join(folder, 'ckpt.pt'))
    with open(os.path.join(folder, 'log.csv'), 'w') as f:
        f.write(f'iter,loss,val_loss\n{iters},1.3,\n{iters},,1.5\n')


def test_synthetic_experiment_runs_a_curriculum_of_lengths(tmp_path, monkeypatch):
    """experiments/selective_synthetic.py: one stage per example length, each fine-tuning the previous one's
    checkpoint with the same tokens per batch; every stage is scored on its own val set; copy gets one stage at
    the last length, as many iterations as the whole curriculum; causal2x is causal with twice the heads."""
    real_run, commands = subprocess.run, []

    def fake_run(cmd, stdout=None, **kw):
        if cmd[1].endswith('prepare.py'):  # prepare the data for real, small
            return real_run(cmd + ['--n_train=20', '--n_val=4'], stdout=subprocess.DEVNULL, **kw)
        commands.append(cmd)
        fake_checkpoint(cmd)
        return types.SimpleNamespace(returncode=0)
    monkeypatch.setattr(subprocess, 'run', fake_run)
    monkeypatch.setattr(synthetic, 'score_run', lambda settings, ckpt, data: (0.5, [3.0], 15))
    synthetic.main([f'--out_dir={tmp_path}', '--stages=16,32', '--models=selective', '--iters=10'])
    first, second = commands
    assert {'--block_size=16', '--batch_size=128', '--max_iters=10', '--n_layer=3'} <= set(first)
    assert {'--block_size=32', '--batch_size=64',
            f'--init_from={tmp_path}/varassign/selective-s1337-stages16_32-iters10/stage0/ckpt.pt'} <= set(second)
    results = (tmp_path / 'varassign' / 'results-stages16_32-iters10.md').read_text()
    assert '| selective | 1 | 50.0% (50%..50%) | 50.0% (50%..50%) | 3.0 (of 15) |' in results
    assert '| copy the last digit assigned (no lookup) | |' in results
    commands.clear()
    synthetic.main([f'--out_dir={tmp_path}', '--task=copy', '--stages=16,32', '--models=causal', '--iters=10'])
    assert len(commands) == 1 and {'--block_size=32', '--max_iters=20'} <= set(commands[0])
    commands.clear()  # causal2x: twice the heads, each as wide as causal's (64 / 4 = 16)
    synthetic.main([f'--out_dir={tmp_path}', '--stages=16,32', '--models=causal2x', '--iters=10'])
    assert {'--attention=causal', '--n_head=8', '--head_size=16', '--n_embd=64'} <= set(commands[0])
    assert not any(c.startswith(('--n_head', '--attention')) for c in commands[1])  # the checkpoint's shape
    assert '| causal2x | 1 |' in (tmp_path / 'varassign' / 'results-stages16_32-iters10.md').read_text()
    commands.clear()  # other settings train other runs, in folders named by the flags that differ
    synthetic.main([f'--out_dir={tmp_path}', '--stages=16', '--models=selective', '--iters=20', '--extra=--dropout=0.1'])
    assert f'--out_dir={tmp_path}/varassign/selective-s1337-stages16-iters20-dropout0.1/stage0' in commands[0]


def test_lm_experiment_runs_the_wide_baseline_and_keeps_longer_runs_apart(tmp_path, monkeypatch):
    """experiments/selective_lm.py: causal2x is causal with 8 heads of 32, causal4x with 16, causal6l has 6 layers;
    extra train.py flags name the folder, so a longer run never reuses a shorter one's checkpoint."""
    lm = load_script('experiments/selective_lm.py', 'selective_lm')
    commands = []

    def fake_run(cmd, stdout, **kw):
        commands.append(cmd)
        fake_checkpoint(cmd)
        return types.SimpleNamespace(returncode=0)
    monkeypatch.setattr(subprocess, 'run', fake_run)
    lm.main([f'--out_dir={tmp_path}', '--runs=causal2x-rope,causal4x-rope,causal6l-rope', '--seeds=3',
             '--extra=--max_iters=3000'])
    cmd = commands[0]
    assert {'--attention=causal', '--n_head=8', '--head_size=32', '--positions=rope', '--max_iters=3000'} <= set(cmd)
    assert {'--attention=causal', '--n_head=16', '--head_size=32'} <= set(commands[1])
    assert {'--attention=causal', '--n_layer=6'} <= set(commands[2])
    assert f'--out_dir={tmp_path}/causal2x-rope-s3-max_iters3000' in cmd
    assert '| causal2x-rope | default | 1 | 1.500 |' in (tmp_path / 'results.md').read_text()
