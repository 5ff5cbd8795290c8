"""Selective attention: the mechanism against the paper's definition, the cache, pruning and training."""
import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

import attention_selective

from attention_selective import (SelectiveCache, accumulated_masks, causal_logits, eviction_schedule,
                                 selection_matrix, selective_attention)
from model import GPT, GPTConfig


def tiny(**kw):
    args = dict(block_size=32, vocab_size=23, n_layer=2, n_head=2, n_embd=16, attention='selective')
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
            d = attn.n_embd // attn.n_head
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
    """Token-by-token decoding with the evicting cache == one forward with attn.budget set (digest 2.3)."""
    model = model_with_votes()
    idx = torch.randint(0, 23, (3, 32))
    budgets = budget if isinstance(budget, list) else [budget] * 2
    for block, b in zip(model.transformer.h, budgets):
        block.attn.budget = b
    simulated, _ = model(idx, idx)
    for block in model.transformer.h:
        block.attn.budget = None
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
    for block in model.transformer.h:
        block.attn.budget = 6
    ref = prompt
    for _ in range(new):
        logits, _ = model(ref[:, -32:])
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


def test_choose_budgets_is_greedy_and_stops_at_the_target(monkeypatch):
    """bench.py's search: each round cuts the layer whose cut costs least, and stops before passing the target."""
    import bench
    weights = [1.0, 0.1]  # a made-up val loss: layer 0's budget matters ten times more than layer 1's
    monkeypatch.setattr(bench, 'pruned_val_loss',
                        lambda model, data, budgets, example_len=None: sum(w / b for w, b in zip(weights, budgets)))
    model = GPT(tiny())
    steps = bench.choose_budgets(model, None, target=0.2)
    (first, _), (last, loss) = steps[0], steps[-1]
    assert first == [32, 32] and loss <= 0.2
    assert last[1] < last[0], "the cheap layer is cut further"
    assert all(sum(b) < sum(a) for (a, _), (b, _) in zip(steps, steps[1:]))
    cuts = [[max(2, min(b - 1, round(0.8 * b))) if l == i else b for l, b in enumerate(last)]
            for i in range(2) if last[i] > 2]
    assert all(sum(w / b for w, b in zip(weights, cut)) > 0.2 for cut in cuts), "stopped only when every cut fails"


def test_budgets_mode_end_to_end(tmp_path, monkeypatch, capsys):
    """python bench.py --mode=budgets on a tiny selective checkpoint: budgets, loss within target, KV memory."""
    import csv
    import pickle

    import numpy as np

    import bench
    data = tmp_path / 'tiny'
    data.mkdir()
    np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint16).tofile(data / 'val.bin')
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump(dict(vocab_size=257, tokenizer={'kind': 'byte'}, eot_token=256, dataset='tiny'), f)
    model = model_with_votes(vocab_size=257).float()
    args = {k: getattr(model.config, k) for k in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd',
                                                  'attention')}
    torch.save(dict(model_args=args, model=model.state_dict(), config=dict(dataset='tiny')), tmp_path / 'ckpt.pt')
    flags = dict(mode='budgets', device='cpu', data_dir=str(data), ckpt=str(tmp_path / 'ckpt.pt'), target='+0.05',
                 shrink=0.5, eval_windows=2, batch_size=2, out_dir=str(tmp_path / 'bench'))
    for key in bench.FLAGS + ['device_type', 'ptdtype']:
        monkeypatch.setattr(bench, key, flags.get(key, getattr(bench, key)))
    bench.setup()
    bench.bench_budgets()
    out = capsys.readouterr().out
    assert 'reached' in out and 'fewer KV entries' in out
    with open(tmp_path / 'bench' / 'bench_budgets.csv') as f:
        steps = list(csv.DictReader(f))
    assert steps[0]['budgets'] == '32 32' and float(steps[-1]['val_loss']) <= float(steps[0]['val_loss']) + 0.05
    assert int(steps[-1]['entries']) < 64
