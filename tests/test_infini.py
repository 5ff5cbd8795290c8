"""Infini-attention: the memory against hand computations, segments in one call against streaming, the cache."""
import dataclasses
import importlib.util
import json
import os

import pytest
import torch
from torch.nn import functional as nnf

import attention_infini
from tools import evaluate
from attention_infini import (Beyond, gate_values, infini_attention, memory_weights, read_memory, sigma,
                              write_memory)
from checkpoints import load_model, save_checkpoint
from model import GPT, GPTConfig
from attention import rope


def tiny(**kw):
    args = dict(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16, attention='infini', segment_len=4)
    args.update(kw)
    return GPTConfig(**args)


def model64(**kw):
    torch.manual_seed(0)
    model = GPT(tiny(**kw)).double().eval()
    with torch.no_grad():  # gates away from 0.5, different per head, so a swapped gate would show
        for block in model.transformer.h:
            block.attn.beta.copy_(torch.randn(block.attn.beta.shape))
    return model


def qkv(B=2, H=2, T=8, D=4):
    torch.manual_seed(1)
    return (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))


def test_one_segment_with_empty_memory_is_gated_causal_attention():
    q, k, v = qkv()
    beta = torch.tensor([0.3, -1.2], dtype=torch.float64)
    y, M, z = infini_attention(q, k, v, beta, segment_len=16)  # 8 tokens: one partial segment, nothing written
    positions = torch.arange(q.size(-2))
    causal = nnf.scaled_dot_product_attention(rope(q, positions), rope(k, positions), v, is_causal=True)
    torch.testing.assert_close(y, (1 - torch.sigmoid(beta)).view(1, 2, 1, 1) * causal, rtol=1e-12, atol=1e-12)
    assert not M.any() and not z.any()
    assert torch.equal(read_memory(q.abs(), M, z), torch.zeros_like(q))  # 0/0 reads as exactly 0


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_segments_in_one_call_equal_segments_one_at_a_time(update):
    q, k, v = qkv(T=11)  # segments of 4: 4 + 4 + a partial 3
    beta = torch.tensor([0.5, -0.5], dtype=torch.float64)
    y, M, z = infini_attention(q, k, v, beta, 4, update)
    ys, M1, z1 = [], None, None
    for s in (0, 4, 8):
        y1, M1, z1 = infini_attention(q[:, :, s:s + 4], k[:, :, s:s + 4], v[:, :, s:s + 4], beta, 4, update, M1, z1)
        ys.append(y1)
    torch.testing.assert_close(torch.cat(ys, 2), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((M1, z1), (M, z), rtol=1e-12, atol=1e-12)
    assert z.min() > 0  # two segments were written


def test_updates_and_read_match_hand_computation():
    # one head, d = 2; keys >= 0, so sigma(K) = K + 1
    sk = torch.tensor([[[[1., 2.], [2., 1.]]]])
    v = torch.tensor([[[[1., 2.], [3., 4.]]]])
    M0, z0 = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2)
    for update in ('linear', 'delta'):  # from an empty memory both rules write sigma(K)^T V
        M1, z1 = write_memory(sk, v, M0, z0, update)
        assert torch.equal(M1, torch.tensor([[[[7., 10.], [5., 8.]]]])) and torch.equal(z1, torch.tensor([[[3., 3.]]]))
    sk2, v2 = torch.tensor([[[[1., 1.]]]]), torch.tensor([[[[1., 1.]]]])
    assert torch.equal(read_memory(sk2, M1, z1), torch.tensor([[[[2., 3.]]]]))  # [12, 18] / 6
    M2, z2 = write_memory(sk2, v2, M1, z1, 'linear')  # + [1 1]^T [1 1]
    assert torch.equal(M2, torch.tensor([[[[8., 11.], [6., 9.]]]])) and torch.equal(z2, torch.tensor([[[4., 4.]]]))
    M2, z2 = write_memory(sk2, v2, M1, z1, 'delta')  # + [1 1]^T ([1 1] - [2 3])
    assert torch.equal(M2, torch.tensor([[[[6., 8.], [4., 6.]]]])) and torch.equal(z2, torch.tensor([[[4., 4.]]]))


def test_infini_attention_hand_case():
    """segment_len 2, 3 tokens: token 2 starts segment 1, reads M_1 and attends only to itself."""
    k = torch.tensor([[[[0., 1.], [1., 0.], [5., 5.]]]])
    v = torch.tensor([[[[1., 2.], [3., 4.], [-1., 7.]]]])
    q = torch.tensor([[[[0.3, -2.], [1., 1.], [0., 0.]]]])  # sigma(q_2) = [1, 1]
    y, M, z = infini_attention(q, k, v, torch.zeros(1), 2, 'delta')
    torch.testing.assert_close(y[0, 0, 2], 0.5 * torch.tensor([2., 3.]) + 0.5 * v[0, 0, 2])
    assert torch.equal(M, torch.tensor([[[[7., 10.], [5., 8.]]]]))  # the partial segment 1 is not written


@pytest.mark.parametrize('options', [dict(memory_update='linear'), dict(memory_update='delta'),
                                     dict(feature_scale=4.0, memory_boost=15.0), dict(memory_read='off'),
                                     dict(memory_read='local')], ids=str)
def test_cache_in_any_chunks_equals_full_forward(options):
    model = model64(**options)
    idx = torch.randint(0, 23, (2, 37))  # past block_size=16, segments of 4, ends on a partial segment
    full, _ = model(idx, idx)
    for chunks in ((4,) * 9 + (1,), (7, 12, 1, 1, 16), (37,)):
        cache = model.new_cache(2)
        logits, s = [], 0
        for n in chunks:
            chunk = idx[:, s:s + n].contiguous()
            logits.append(model(chunk, chunk, cache=cache)[0])  # with targets: logits at every position
            s += n
        torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-10, atol=1e-10)


def test_the_angles_computed_once_per_forward_are_each_layers_own():
    """GPT.forward computes RoPE's angles of the positions inside a segment once and passes them to every layer;
    the numbers are those each layer computes for itself, in a training forward and in the cache's steps."""
    model = model64()
    idx = torch.randint(0, 23, (2, 11), generator=torch.Generator().manual_seed(0))
    passed = []
    hooks = [block.attn.register_forward_pre_hook(lambda m, args, kwargs: passed.append(kwargs.get('rotary')),
                                                  with_kwargs=True) for block in model.transformer.h]

    def each_layer_its_own(idx, cache=None):  # GPT.forward's steps, without the shared angles
        x = x0 = model.transformer.wte(idx)
        for block in model.transformer.h:
            x = block(x, x0, cache)
        if cache is not None:
            cache.length += idx.size(1)
        return model.lm_head(model.transformer.ln_f(x))

    with torch.no_grad():
        assert torch.equal(model(idx, idx)[0], each_layer_its_own(idx))
        shared, own = model.new_cache(2), model.new_cache(2)
        for chunk in (idx[:, :6], idx[:, 6:7], idx[:, 7:]):  # a partial segment held, one token, the rest
            assert torch.equal(model(chunk, chunk, cache=shared)[0], each_layer_its_own(chunk, own))
    for hook in hooks:
        hook.remove()
    assert [a is not None for a in passed] == [True, True, False, False] * 4  # the model's forwards, then ours
    cos, sin = attention_infini.segment_angles(4, 8, idx.double())  # positions 0..segment_len-1
    assert all(torch.equal(a[0], cos) and torch.equal(a[1], sin) for a in passed if a is not None)


def test_cached_greedy_generation_equals_full_forward():
    model = model64()
    prompt = torch.randint(0, 23, (2, 21))  # longer than block_size=16: read whole, never cropped
    out = model.generate(prompt, 30, top_k=1)
    ref = prompt
    for _ in range(30):
        logits, _ = model(ref)
        ref = torch.cat((ref, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ref)


def test_cache_size_does_not_grow():
    model = model64()
    sizes = []
    for n in (16, 160):  # block_size and 10x block_size tokens
        cache = model.new_cache(1)
        for s in range(0, n, 5):
            model(torch.randint(0, 23, (1, min(5, n - s))), cache=cache)
        sizes.append([tuple(t.shape) for t in (cache.k, cache.v, cache.M, cache.z)] + [cache.nbytes()])
    assert sizes[0] == sizes[1]


def test_gradients_flow_through_memory_across_segments():
    q, k, v = (t.requires_grad_() for t in qkv(T=12))
    y, _, _ = infini_attention(q, k, v, torch.zeros(2, dtype=torch.float64), 4, 'delta')
    y[:, :, 8:].sum().backward()  # the last segment sees the first two only through the memory
    assert k.grad[:, :, :8].abs().sum() > 0 and v.grad[:, :, :4].abs().sum() > 0


def test_gates_are_undecayed_with_their_lr_mult():
    model = GPT(tiny(gate_lr_mult=7.0))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    group = next(g for g in opt.param_groups if any(p is model.transformer.h[0].attn.beta for p in g['params']))
    assert group['weight_decay'] == 0.0 and group['lr'] == pytest.approx(7e-3)
    assert gate_values(model).shape == (2, 2) and torch.allclose(gate_values(model), torch.tensor(0.5))


def test_bad_config_is_a_one_line_error():
    with pytest.raises(ValueError, match='memory_update'):
        GPT(tiny(memory_update='lin'))
    with pytest.raises(ValueError, match='segment_len'):
        GPT(tiny(segment_len=0))
    with pytest.raises(ValueError, match='memory_read'):
        GPT(tiny(memory_read='none'))
    with pytest.raises(ValueError, match='feature_scale'):
        GPT(tiny(feature_scale=0.0))
    with pytest.raises(ValueError, match='memory_boost'):
        GPT(tiny(memory_boost=-1.0))


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_the_memory_alone_is_the_full_loops_memory(update):
    """memory_over_segments (the memory kernel's plain reference) reads and writes what infini_attention does:
    at gate 1 the full loop's output is A_mem alone, and its M, z are the same."""
    q, k, v = qkv(T=11)  # segments of 4, the last one partial
    a_mem, M, z = attention_infini.memory_over_segments(q, k, v, 4, update)
    y, M_full, z_full = infini_attention(q, k, v, torch.full((2,), float('inf'), dtype=q.dtype), 4, update)
    torch.testing.assert_close(a_mem.to(y.dtype), y)
    torch.testing.assert_close(M, M_full)
    torch.testing.assert_close(z, z_full)
    q2 = q[:, :, -3:]  # streaming: only the last queries, into a memory that has seen something
    M0, z0 = M.clone(), z.clone()
    a2, _, _ = attention_infini.memory_over_segments(q2, k, v, 4, update, M0, z0)
    y2, _, _ = infini_attention(q2, k, v, torch.full((2,), float('inf'), dtype=q.dtype), 4, update, M0, z0)
    torch.testing.assert_close(a2.to(y2.dtype), y2)


# ---------------------------------------------------------------------------------------------------------
# The options that are not in the paper: memory_read (the ablation), feature_scale, memory_boost.

def per_segment_causal(q, k, v, segment_len):
    """A_dot of every segment, by hand: causal attention inside each segment, RoPE from each segment's start."""
    def at(x, s, n):  # the positions inside the segment starting at s
        return torch.arange(min(n, x.size(2) - s))
    return torch.cat([nnf.scaled_dot_product_attention(rope(q[:, :, s:s + segment_len], at(q, s, segment_len)),
                                                       rope(k[:, :, s:s + segment_len], at(k, s, segment_len)),
                                                       v[:, :, s:s + segment_len], is_causal=True)
                      for s in range(0, q.size(2), segment_len)], dim=2)


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_memory_read_off_and_local_leave_only_the_local_attention(update):
    q, k, v = qkv(T=11)  # segments of 4: the last two read a memory that is not empty
    beta = torch.tensor([0.7, -0.4], dtype=torch.float64)
    a_dot = per_segment_causal(q, k, v, 4)
    _, M_on, z_on = infini_attention(q, k, v, beta, 4, update)
    y_off, M, z = infini_attention(q, k, v, beta, 4, update, beyond=Beyond(memory_read='off'))
    torch.testing.assert_close(y_off, (1 - torch.sigmoid(beta)).view(1, 2, 1, 1) * a_dot, rtol=1e-12, atol=1e-12)
    y_local, _, _ = infini_attention(q, k, v, beta, 4, update, beyond=Beyond(memory_read='local'))
    torch.testing.assert_close(y_local, a_dot, rtol=1e-12, atol=1e-12)
    assert torch.equal(M, M_on) and torch.equal(z, z_on)  # the memory is still written: only its read is cut


def test_memory_read_off_makes_the_model_blind_to_earlier_segments():
    """With the read off, a token's logits depend on its own segment only: change the first segment, and the
    second segment's logits do not move (they do with the read on)."""
    idx = torch.randint(0, 23, (1, 8))
    other = idx.clone()
    other[0, :4] = (other[0, :4] + 1) % 23
    for memory_read, same in (('on', False), ('off', True), ('local', True)):
        model = model64(memory_read=memory_read)
        (a, _), (b, _) = model(idx, idx), model(other, other)
        assert torch.allclose(a[:, 4:], b[:, 4:], rtol=0, atol=1e-12) == same, memory_read


def test_feature_scale_sharpens_sigma():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    assert torch.equal(sigma(x), nnf.elu(x) + 1) and torch.equal(sigma(x, 4.0), nnf.elu(4 * x) + 1)
    q, k, v = qkv(T=8)
    beta = torch.zeros(2, dtype=torch.float64)
    y, M, z = infini_attention(q, k, v, beta, 4, 'linear', beyond=Beyond(feature_scale=4.0))
    sq, sk = sigma(q[:, :, 4:], 4.0), sigma(k[:, :, :4], 4.0)  # segment 1 reads what segment 0 wrote
    a_mem = (sq @ sk.transpose(-1, -2) @ v[:, :, :4]) / (sq @ sk.sum(-2).unsqueeze(-1))
    torch.testing.assert_close(y[:, :, 4:], 0.5 * a_mem + 0.5 * per_segment_causal(q, k, v, 4)[:, :, 4:],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, sigma(k, 4.0).sum(-2), rtol=1e-12, atol=1e-12)


def test_linear_read_is_the_memory_weights_average_of_stored_values():
    q, k, v = qkv(T=12)
    sk = sigma(k)
    empty = torch.zeros(2, 2, 4, 4, dtype=torch.float64), torch.zeros(2, 2, 4, dtype=torch.float64)
    M, z = write_memory(sk, v, *empty, 'linear')
    w = memory_weights(sigma(q), sk)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 12, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(read_memory(sigma(q), M, z), w @ v, rtol=1e-12, atol=1e-12)


def test_repeats_count_a_write_that_many_times():
    """memory_boost's write: under the linear rule, a segment written with repeats r is that segment written r
    times (r = 3 here; one sequence of the batch gets 1, i.e. a plain write)."""
    _, k, v = qkv(T=4)
    sk = sigma(k)
    M0, z0 = torch.zeros(2, 2, 4, 4, dtype=torch.float64), torch.zeros(2, 2, 4, dtype=torch.float64)
    M, z = write_memory(sk, v, M0, z0, 'linear', torch.tensor([3.0, 1.0], dtype=torch.float64))
    M3, z3 = M0, z0
    for _ in range(3):
        M3, z3 = write_memory(sk, v, M3, z3, 'linear')
    M1, z1 = write_memory(sk, v, M0, z0, 'linear')
    torch.testing.assert_close((M[0], z[0]), (M3[0], z3[0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((M[1], z[1]), (M1[1], z1[1]), rtol=1e-12, atol=1e-12)


def test_memory_boost_is_training_only_and_boosts_the_first_write():
    idx = torch.randint(0, 23, (2, 12))
    plain, boosted = model64(), model64(memory_boost=15.0)  # the same weights (model64 seeds them)
    torch.testing.assert_close(boosted(idx, idx)[0], plain(idx, idx)[0], rtol=0, atol=0)  # eval: no boost
    attn = boosted.transformer.h[0].attn
    q, k, v = qkv(T=12)
    attn.train()
    torch.manual_seed(3)
    y, M, z = attn.attend(q, k, v)
    torch.manual_seed(3)  # the same draw, by hand: 1 + U(0, 15) per sequence, on the first segment's write
    repeats = 1 + 15.0 * torch.rand(2, dtype=torch.float64)
    y_ref, M_ref, z_ref = infini_attention(q, k, v, attn.beta, 4, 'delta', beyond=Beyond(first_segment_repeats=repeats))
    torch.testing.assert_close((y, M, z), (y_ref, M_ref, z_ref), rtol=1e-12, atol=1e-12)
    assert (repeats > 1).all() and not torch.allclose(z, infini_attention(q, k, v, attn.beta, 4, 'delta')[2])


@pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='the fast path needs triton')
@pytest.mark.parametrize('memory_read,read_norm', [('on', 'z'), ('off', 'z'), ('local', 'z'), ('on', 'rms')])
def test_fast_path_takes_feature_scale_and_memory_read(memory_read, read_norm):
    """The Triton path (its interpreter on a CPU) against the reference, with the options it supports."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(3))
    beta = torch.randn(2, generator=g)
    beyond = Beyond(feature_scale=4.0, memory_read=memory_read, read_norm=read_norm)
    y, M, z = attention_infini.fast_infini_attention(q, k, v, beta, 8, 'delta', beyond=beyond, block_t=8)
    y_ref, M_ref, z_ref = infini_attention(*(t.double() for t in (q, k, v, beta)), 8, 'delta', beyond=beyond)
    for a, b in ((y, y_ref), (M, M_ref), (z, z_ref)):
        assert (a.double() - b).norm() / b.norm() < 1e-5


@pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='the fast path needs triton')
def test_module_takes_the_fast_path_with_its_options_and_the_reference_for_the_boost(monkeypatch):
    """The module passes feature_scale to the fast path (same loss and cached logits as the
    reference); training with memory_boost, which the kernel lacks, falls back to the reference."""
    kernels = attention_infini.kernels
    monkeypatch.setattr(kernels, 'infini_available', lambda q: True)  # the kernel in Triton's interpreter on a CPU
    calls = []
    memory = kernels.infini_memory
    monkeypatch.setattr(kernels, 'infini_memory', lambda *a, **kw: calls.append(1) or memory(*a, **kw))
    idx = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for use_kernels in (True, False):
        torch.manual_seed(0)
        model = GPT(tiny(feature_scale=4.0, use_kernels=use_kernels, n_embd=32))
        _, loss = model(idx, idx)
        with torch.no_grad():
            cache = model.new_cache(2)
            logits = [model(idx[:, :6], cache=cache)[0]] + [model(idx[:, [t]], cache=cache)[0] for t in range(6, 9)]
        results.append((loss, torch.cat(logits, 1)))
    assert calls
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    calls.clear()
    model = GPT(tiny(memory_boost=15.0, n_embd=32)).train()
    model(idx, idx)
    assert not calls


def passkey_experiment():
    """experiments/infini_passkey.py as a module."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'infini_passkey.py')
    spec = importlib.util.spec_from_file_location('infini_passkey', path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    return experiment


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_streamed_passkey_score_equals_answer_scores_and_shares_one_forward(update):
    """The passkey evaluation streams long prompts through the cache a few tokens at a time (stream_score). It scores
    as evaluate.answer_scores does, and its needle shares equal those from every key at once (needle_shares);
    needles at different places in one batch, some not in the memory yet (nan in both)."""
    experiment = passkey_experiment()
    model = model64(vocab_size=257, memory_update=update, feature_scale=2.0)
    torch.manual_seed(3)
    prompts, answers = torch.randint(0, 257, (3, 30)), torch.randint(0, 257, (3, 5))
    batch = [(p, a, start, 5) for p, a, start in zip(prompts.tolist(), answers.tolist(), (1, 9, 25))]  # 25 + 5 > 28
    right, losses = evaluate.answer_scores(model, prompts, answers)
    for chunk in (4, 8, 64):
        correct, chunk_losses, digits, probed = experiment.stream_score(model, batch, chunk=chunk, probe=True)
        assert correct == right.all(-1).tolist() and digits.tolist() == right.tolist()
        torch.testing.assert_close(torch.tensor(chunk_losses), losses, rtol=1e-5, atol=1e-5)
        shares, _ = experiment.needle_shares(model, batch)
        torch.testing.assert_close(probed['share'], shares.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
        assert probed['share'][2].isnan().all() and not probed['share'][:2].isnan().any()


@pytest.mark.parametrize('length', [30, 28])
def test_probe_at_each_digit_equals_shares_of_the_prompt_with_the_digits_before(length):
    """The probe at digit d's query is the needle share of the prompt followed by the first d digits, read in one
    forward. With a prompt of 28 tokens and segments of 4, the answer's forward fills two segments: the queries
    between them read a memory the stream does not keep (nan)."""
    experiment = passkey_experiment()
    model = model64(vocab_size=257, memory_update='delta', feature_scale=2.0)
    torch.manual_seed(4)
    prompts, answers = torch.randint(0, 257, (3, length)), torch.randint(0, 257, (3, 5))
    batch = [(p, a, start, 5) for p, a, start in zip(prompts.tolist(), answers.tolist(), (1, 9, length - 6))]
    _, _, _, probed = experiment.stream_score(model, batch, chunk=8, probe=True)
    assert probed['digit_share'].shape == (3, 5, 2, 2) and probed['digit_read_share'].shape == (3, 5, 2, 2)
    for d in range(5):
        if length == 28 and d > 0:
            assert probed['digit_share'][:, d].isnan().all()
            continue
        longer = [(p + a[:d], a, start, n) for p, a, start, n in batch]
        shares, _ = experiment.needle_shares(model, longer)
        torch.testing.assert_close(probed['digit_share'][:, d], shares.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(probed['digit_share'][:, 0], probed['share'], equal_nan=True)
    if length == 30:  # the last needle is tokens 24-28: in the memory from the 4th digit's query on (32 stored)
        assert probed['digit_share'][2, :3].isnan().all() and not probed['digit_share'][2, 3:].isnan().any()


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_read_probe_splits_the_read_exactly(update):
    """read_probe splits a memory read into what the needle wrote and what the rest wrote. A 'needle' that is every
    stored token carries the whole read (share 1, read_share 1, cos 1); one that is no token carries none."""
    experiment = passkey_experiment()
    model = model64(vocab_size=257, memory_update=update)
    prompt, answer = torch.randint(0, 257, (1, 21)).tolist(), [[1, 2, 3, 4, 5]]
    _, _, _, everything = experiment.stream_score(model, [(prompt[0], answer[0], 0, 20)], chunk=8, probe=True)
    for key in ('share', 'read_share', 'cos'):
        torch.testing.assert_close(everything[key], torch.ones_like(everything[key]), rtol=1e-4, atol=1e-4)
    assert (everything['norm'] > 0).all()
    _, _, _, nothing = experiment.stream_score(model, [(prompt[0], answer[0], 20, 0)], chunk=8, probe=True)
    assert nothing['share'].abs().max() == 0 and nothing['read_share'].abs().max() == 0
    torch.testing.assert_close(nothing['norm'], everything['norm'])


def test_passkey_trials_per_length():
    experiment = passkey_experiment()
    assert experiment.trials_by_length('20', [256, 1024]) == {256: 20, 1024: 20}
    assert experiment.trials_by_length('20,1', [256, 1024]) == {256: 20, 1024: 1}
    with pytest.raises(SystemExit, match='one per length'):
        experiment.trials_by_length('20,1', [256, 1024, 4096])


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_read_norm_rms_scales_each_read_to_unit_rms(update):
    """read_norm='rms' (not in the paper): the read of eq. 3 divided by its RMS over the head's features, so its
    direction is eq. 3's and its size is 1; an empty memory still reads 0; the memory itself is unchanged."""
    q, k, v = qkv(T=12)
    beta = torch.tensor([0.5, -0.5], dtype=torch.float64)
    y_z, M_z, z_z = infini_attention(q, k, v, beta, 4, update)
    y_rms, M_rms, z_rms = infini_attention(q, k, v, beta, 4, update, beyond=Beyond(read_norm='rms'))
    torch.testing.assert_close((M_rms, z_rms), (M_z, z_z))
    gate = torch.sigmoid(beta).view(1, -1, 1, 1)
    torch.testing.assert_close(y_rms[:, :, :4], y_z[:, :, :4])  # the first segment reads an empty memory: 0
    sq = sigma(q[:, :, 4:8])
    M1, z1 = write_memory(sigma(k[:, :, :4]), v[:, :, :4], torch.zeros_like(M_z), torch.zeros_like(z_z), update)
    read = read_memory(sq, M1, z1)
    unit = read / read.pow(2).mean(-1, keepdim=True).sqrt()
    assert (y_rms[:, :, 4:8] - (y_z[:, :, 4:8] - gate * read + gate * unit)).abs().max() < 1e-10


def test_old_checkpoints_load_with_the_paper_read():
    """A checkpoint saved before read_norm existed builds the paper's read (eq. 3) and gives the same numbers."""
    config = tiny()
    assert config.read_norm == 'z'
    model = GPT(config).eval()
    args = {k: getattr(config, k) for k in config.__dataclass_fields__ if k != 'read_norm'}
    old = GPT(GPTConfig(**args)).eval()
    old.load_state_dict(model.state_dict())
    idx = torch.randint(0, 23, (2, 12))
    torch.testing.assert_close(old(idx, idx)[1], model(idx, idx)[1], rtol=0, atol=0)


def test_scale_memory_read_scales_one_heads_read_only():
    """The passkey experiment's read gain edits weights so that head h outputs gain g A_mem + (1 - g) A_dot and
    every other head is unchanged (the memory is linear in the values)."""
    experiment = passkey_experiment()
    model = model64(vocab_size=257)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 13, 16, dtype=torch.float64)

    def heads(read):
        q, k, v = attn.c_attn(x).split(16, dim=2)
        q, k, v = (t.view(2, 13, 2, 8).transpose(1, 2) for t in (q, k, v))
        return infini_attention(q, k, v, attn.beta, 4, 'delta', beyond=Beyond(memory_read=read))[0]
    on, off = heads('on'), heads('off')
    experiment.scale_memory_read(model, 1, 0, 3.0)
    edited = heads('on')
    torch.testing.assert_close(edited[:, 0], 3 * (on[:, 0] - off[:, 0]) + off[:, 0])
    torch.testing.assert_close(edited[:, 1], on[:, 1])


def test_passkey_evaluation_of_a_checkpoint_end_to_end(tmp_path):
    """evaluate_checkpoint on a tiny infini checkpoint: every read at each length, its time and memory, and
    eval.json written after each length."""
    experiment = passkey_experiment()
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=257, segment_len=32, block_size=128))
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model_args': dataclasses.asdict(model.config), 'model': model.state_dict(), 'iter_num': 1,
                     'tokenizer': {'kind': 'byte'}}, path)
    settings, _ = experiment.configure(['--lengths=128,192', '--depths=0,1', '--trials=1', '--batch_size=2'],
                                       experiment.FLAGS)
    result = experiment.evaluate_checkpoint(path, settings)
    entry = result['lengths']['192']
    assert entry['prompts'] == 2 and {'on', 'off', 'local', 'off L0', 'off L1'} <= set(entry['scores'])
    assert entry['seconds']['on'] > 0 and entry['peak_rss_mb'] > 0
    assert json.load(open(tmp_path / 'eval.json'))['lengths'].keys() == {'128', '192'}


def test_a_soup_is_the_mean_of_its_parts_and_refuses_another_model(tmp_path):
    """make_soup averages the weights of checkpoints that build the same model (they may differ in settings that
    only shape training), keeps the first one's settings, drops the optimizer, and refuses a different model."""
    experiment = passkey_experiment()
    paths, models = [], []
    for i, kw in enumerate([{}, {'memory_boost': 15.0, 'block_size': 32}, {'feature_scale': 4.0}]):
        torch.manual_seed(i)
        model = GPT(tiny(**kw))
        models.append(model)
        paths.append(str(tmp_path / f'part{i}.pt'))
        save_checkpoint({'model_args': dataclasses.asdict(model.config), 'model': model.state_dict(), 'iter_num': 7,
                         'optimizer': {}, 'tokenizer': {'kind': 'byte'}}, paths[-1])
    experiment.make_soup(paths[:2], str(tmp_path / 'soup'))
    soup, checkpoint = load_model(str(tmp_path / 'soup' / 'ckpt.pt'))
    assert 'optimizer' not in checkpoint and checkpoint['iter_num'] == 7 and soup.config.block_size == 16
    for name, weight in soup.state_dict().items():
        torch.testing.assert_close(weight, (models[0].state_dict()[name] + models[1].state_dict()[name]) / 2)
    with pytest.raises(SystemExit, match='their models differ in feature_scale$'):
        experiment.make_soup([paths[0], paths[2]], str(tmp_path / 'bad'))
    # a part trained again after the soup was made: the soup is made again from it
    save_checkpoint({'model_args': dataclasses.asdict(models[0].config), 'model': models[0].state_dict(),
                     'iter_num': 7}, paths[1])
    soup_mtime = os.path.getmtime(tmp_path / 'soup' / 'ckpt.pt')
    os.utime(paths[1], (soup_mtime + 10, soup_mtime + 10))
    experiment.make_soup(paths[:2], str(tmp_path / 'soup'))
    soup, _ = load_model(str(tmp_path / 'soup' / 'ckpt.pt'))
    for name, weight in soup.state_dict().items():
        torch.testing.assert_close(weight, models[0].state_dict()[name])
