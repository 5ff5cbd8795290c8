"""Infini-attention: the memory against hand computations, segments in one call against streaming, the cache."""
import pytest
import torch
from torch.nn import functional as F

from attention_infini import gate_values, infini_attention, memory_read, memory_update, rope
from model import GPT, GPTConfig


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
    causal = F.scaled_dot_product_attention(rope(q, 0), rope(k, 0), v, is_causal=True)
    torch.testing.assert_close(y, (1 - torch.sigmoid(beta)).view(1, 2, 1, 1) * causal, rtol=1e-12, atol=1e-12)
    assert not M.any() and not z.any()
    assert torch.equal(memory_read(q.abs(), M, z), torch.zeros_like(q))  # 0/0 reads as exactly 0


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
        M1, z1 = memory_update(sk, v, M0, z0, update)
        assert torch.equal(M1, torch.tensor([[[[7., 10.], [5., 8.]]]])) and torch.equal(z1, torch.tensor([[[3., 3.]]]))
    sk2, v2 = torch.tensor([[[[1., 1.]]]]), torch.tensor([[[[1., 1.]]]])
    assert torch.equal(memory_read(sk2, M1, z1), torch.tensor([[[[2., 3.]]]]))  # [12, 18] / 6
    M2, z2 = memory_update(sk2, v2, M1, z1, 'linear')  # + [1 1]^T [1 1]
    assert torch.equal(M2, torch.tensor([[[[8., 11.], [6., 9.]]]])) and torch.equal(z2, torch.tensor([[[4., 4.]]]))
    M2, z2 = memory_update(sk2, v2, M1, z1, 'delta')  # + [1 1]^T ([1 1] - [2 3])
    assert torch.equal(M2, torch.tensor([[[[6., 8.], [4., 6.]]]])) and torch.equal(z2, torch.tensor([[[4., 4.]]]))


def test_infini_attention_hand_case():
    """segment_len 2, 3 tokens: token 2 starts segment 1, reads M_1 and attends only to itself."""
    k = torch.tensor([[[[0., 1.], [1., 0.], [5., 5.]]]])
    v = torch.tensor([[[[1., 2.], [3., 4.], [-1., 7.]]]])
    q = torch.tensor([[[[0.3, -2.], [1., 1.], [0., 0.]]]])  # sigma(q_2) = [1, 1]
    y, M, z = infini_attention(q, k, v, torch.zeros(1), 2, 'delta')
    torch.testing.assert_close(y[0, 0, 2], 0.5 * torch.tensor([2., 3.]) + 0.5 * v[0, 0, 2])
    assert torch.equal(M, torch.tensor([[[[7., 10.], [5., 8.]]]]))  # the partial segment 1 is not written


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_cache_in_any_chunks_equals_full_forward(update):
    model = model64(memory_update=update)
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
