"""The core: config errors, forward/backward and cached generation for every attention."""
import dataclasses
import math

import pytest
import torch
from torch.nn import functional as nnf

import model as model_module
from checkpoints import load_checkpoint
from tools import convert_rope
from model import ATTENTIONS, GPT, GPTConfig, cross_entropy
from attention import alibi_bias, alibi_slopes, rope, rope_angles

# every (attention, positions) pair a model can be built with; infini's own RoPE is the same for both it takes
PAIRS = [(a, p) for a, cls in ATTENTIONS.items() for p in cls.position_schemes if not (a == 'infini' and p == 'rope')]


def tiny(attention, **kw):
    args = dict(block_size=32, vocab_size=23, n_layer=2, n_head=2, n_embd=16, attention=attention, segment_len=8)
    args.update(kw)
    return GPTConfig(**args)


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention 'flash'.*causal, in, infini, selective"):
        GPTConfig(attention='flash')


def test_positions_each_attention_cannot_take_are_clear_errors():
    with pytest.raises(ValueError, match="unknown positions 'sinusoidal'.*learned, rope, alibi"):
        GPTConfig(positions='sinusoidal')
    with pytest.raises(ValueError, match="attention='in' cannot take positions='rope': .*one cache.*alibi, learned"):
        GPTConfig(attention='in', positions='rope')
    with pytest.raises(ValueError, match="attention='infini' cannot take positions='alibi'"):
        GPTConfig(attention='infini', positions='alibi')


@pytest.mark.parametrize('positions', ['rope', 'alibi'])
def test_no_position_table_without_learned_positions(positions):
    model = GPT(tiny('causal', positions=positions))
    assert model.transformer.wpe is None
    assert 'transformer.wpe.weight' not in model.state_dict(), "ALiBi's slopes are a buffer, not saved either"
    model.resize_block_size(64)  # nothing to tile: the model runs at any length up to the new block_size
    model(torch.randint(0, 23, (1, 64)))


def test_rope_depends_on_the_distance_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 1, 8, generator=g, dtype=torch.float64)
    def score(i, j):
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum(-1)
    torch.testing.assert_close(score(5, 2), score(105, 102))
    assert not torch.allclose(score(5, 2), score(5, 3))
    torch.testing.assert_close(rope(q, torch.tensor([0])), q)  # position 0 is not rotated
    # per-row positions (a cache whose entries keep their own) rotate as the same positions given flat
    pos = torch.tensor([[3, 7]])
    torch.testing.assert_close(rope(k.expand(1, 3, 2, 8), pos), rope(k.expand(1, 3, 2, 8), pos[0]))
    # angles computed once (the model does, for every layer) rotate as the positions do
    angles = rope_angles(torch.tensor([5]), 8, torch.float64)
    torch.testing.assert_close(rope(q, angles=angles), rope(q, torch.tensor([5])))


def test_rope_turns_dims_half_a_head_apart():
    """The rotate-half layout: dims i and i + D/2 form a pair, turned by position * 10000^(-2i/D)."""
    x = torch.zeros(1, 1, 8, dtype=torch.float64)
    x[..., 1] = 1.0  # the first coordinate of pair 1
    y = rope(x, torch.tensor([3]))
    angle = 3 * 10000 ** (-2 / 8)
    expected = torch.zeros_like(x)
    expected[..., 1], expected[..., 5] = math.cos(angle), math.sin(angle)
    torch.testing.assert_close(y, expected)


def interleaved_rope(x, positions):
    """Rotary positions as checkpoints before the rotate-half layout had them: pairs (x[2i], x[2i+1])."""
    D = x.size(-1)
    angles = positions.to(x.dtype)[:, None] * 10000.0 ** (-torch.arange(0, D, 2, dtype=x.dtype) / D)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


@pytest.mark.parametrize('attention', ['causal', 'selective'])
def test_checkpoints_of_the_interleaved_rope_convert_to_the_same_model(attention, tmp_path):
    """An old checkpoint (interleaved pairs) converts (tools/convert_rope.py) by moving its query and key rows to
    the rotate-half layout: every score is the same, so the model is the same."""
    model = GPT(tiny(attention, positions='rope', n_head=2, n_embd=16)).double()
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    old = w.clone()
    for h in range(4):  # q and k rows of each head: today's dims (i, i + D/2) were the old (2i, 2i+1)
        old[h * 8:(h + 1) * 8][0::2], old[h * 8:(h + 1) * 8][1::2] = w[h * 8:h * 8 + 4], w[h * 8 + 4:(h + 1) * 8]
    x, pos = torch.randn(5, 16, dtype=torch.float64), torch.arange(5)
    q_old, k_old = (x @ old[i * 16:(i + 1) * 16].T for i in (0, 1))
    q_new, k_new = (x @ w[i * 16:(i + 1) * 16].T for i in (0, 1))
    for h in range(2):  # the old layout's scores are today's
        head = slice(h * 8, (h + 1) * 8)
        s_old = interleaved_rope(q_old[:, head], pos) @ interleaved_rope(k_old[:, head], pos).T
        s_new = rope(q_new[:, head], pos) @ rope(k_new[:, head], pos).T
        torch.testing.assert_close(s_old, s_new)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state['transformer.h.0.attn.c_attn.weight'] = old
    torch.save({'model_args': dataclasses.asdict(model.config), 'model': state, 'optimizer': {}}, tmp_path / 'old.pt')
    with pytest.raises(SystemExit, match='tools/convert_rope.py'):  # refused as it is, with the command that converts
        load_checkpoint(str(tmp_path / 'old.pt'))
    convert_rope.main([f'--ckpt={tmp_path / "old.pt"}', f'--out={tmp_path / "new.pt"}'])
    loaded = load_checkpoint(str(tmp_path / 'new.pt'))
    assert torch.equal(loaded['model']['transformer.h.0.attn.c_attn.weight'], w) and loaded['rope_layout'] == 'half'
    assert 'optimizer' not in loaded  # not converted: train.py refuses to resume it and fine-tunes from it
    with pytest.raises(SystemExit, match='needs no conversion'):
        convert_rope.main([f'--ckpt={tmp_path / "new.pt"}', f'--out={tmp_path / "again.pt"}'])


def test_alibi_slopes_and_bias():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(2), torch.tensor([2.0 ** -4, 2.0 ** -8]))
    assert len(alibi_slopes(6)) == 6 and (alibi_slopes(6).diff() != 0).all()
    bias = alibi_bias(torch.tensor([0.5]), torch.tensor([2, 3]), torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(bias[0], torch.tensor([[-1.0, -0.5, 0.0, 0.5], [-1.5, -1.0, -0.5, 0.0]]))
    per_row = alibi_bias(torch.tensor([0.5]), torch.tensor([3]), torch.tensor([[0, 3], [2, 1]]))
    torch.testing.assert_close(per_row[:, 0, 0], torch.tensor([[-1.5, 0.0], [-0.5, -1.0]]))


@pytest.mark.parametrize('attention,positions', PAIRS)
def test_forward_backward(attention, positions):
    torch.manual_seed(0)
    model = GPT(tiny(attention, positions=positions))
    idx = torch.randint(0, 23, (2, 32))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 32, 23) and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_loss_in_pieces_equals_one_call(monkeypatch):
    """Past 2^31 logits the loss is taken in pieces (CUDA's kernel overflows); here pieces of 2-3 rows, with
    ignored targets, give the same loss and gradient as one call."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 7), generator=g)
    targets[0, 3] = targets[1, :4] = -1
    whole = nnf.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    expected = torch.autograd.grad(whole, logits)[0]
    for piece in (10, 15, 1):  # 2 and 3 rows of 5 logits, and the floor of one row
        monkeypatch.setattr(model_module, 'LOSS_PIECE', piece)
        loss = cross_entropy(logits, targets)
        torch.testing.assert_close(loss, whole)
        torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], expected)
        torch.testing.assert_close(cross_entropy(logits, targets, reduction='sum'), whole * (targets != -1).sum())


@pytest.mark.parametrize('attention,positions', PAIRS)
def test_cached_greedy_generation_equals_recomputation(attention, positions):
    """generate() with the cache must pick exactly the tokens that re-running the full forward picks."""
    torch.manual_seed(0)
    model = GPT(tiny(attention, positions=positions)).double().eval()
    prompt = torch.randint(0, 23, (2, 5))
    new = 45  # past block_size: cropped for fixed-context attentions, streamed for infini
    out = model.generate(prompt, new, top_k=1)
    ref = prompt
    for _ in range(new):
        context = ref if model.streams else ref[:, -model.config.block_size:]
        logits, _ = model(context)
        ref = torch.cat((ref, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize('attention,positions', PAIRS)
def test_cached_logits_equal_full_forward(attention, positions):
    """Prefill in two chunks, then decode token by token: every step's logits equal the full forward's."""
    torch.manual_seed(0)
    model = GPT(tiny(attention, positions=positions)).double().eval()
    idx = torch.randint(0, 23, (2, 30))
    cache = model.new_cache(2)
    model(idx[:, :7], cache=cache)
    model(idx[:, 7:19], cache=cache)
    for t in range(19, 30):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
        full, _ = model(idx[:, :t + 1])
        torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)
    assert cache.length == 30


@pytest.mark.parametrize('attention', ['causal', 'selective'])
def test_head_size_widens_the_attention_and_its_cache(attention):
    """--head_size with more heads is the 'more heads and attention parameters' baseline: 4 heads of 8 in a
    16-wide model double the attention's weights, the cache follows, and cached decoding stays exact."""
    torch.manual_seed(0)
    wide = GPT(tiny(attention, n_head=4, head_size=8)).double().eval()
    narrow = GPT(tiny(attention))
    attn_params = lambda m: sum(p.numel() for n, p in m.named_parameters() if '.attn.' in n and p.dim() == 2)
    assert attn_params(wide) == 2 * attn_params(narrow)
    idx = torch.randint(0, 23, (2, 20))
    cache = wide.new_cache(2)
    wide(idx[:, :12], cache=cache)
    for t in range(12, 20):
        logits, _ = wide(idx[:, t:t + 1], cache=cache)
        torch.testing.assert_close(logits, wide(idx[:, :t + 1])[0], rtol=1e-9, atol=1e-9)
    if attention == 'causal':
        assert cache.nbytes() == 2 * 2 * 2 * (4 * 8) * 32 * 8  # k, v x 2 layers x batch 2 x 4 heads of 8 x 32 x fp64
    for other in ('in', 'infini'):
        with pytest.raises(ValueError, match="ties its head size to n_embd; these take a separate one: causal, sel"):
            tiny(other, head_size=4)


def test_kv_cache_bytes():
    model = GPT(tiny('causal')).eval()
    cache = model.new_cache(1, max_len=32)
    model(torch.randint(0, 23, (1, 10)), cache=cache)
    assert cache.nbytes() == 2 * 2 * 16 * 32 * 4  # k and v, 2 layers, n_embd 16, 32 slots, fp32


def test_longer_than_block_size_is_a_clear_error():
    model = GPT(tiny('causal'))
    with pytest.raises(ValueError, match='more than block_size=32'):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_resize_block_size_keeps_short_inputs():
    torch.manual_seed(0)
    model = GPT(tiny('causal')).eval()
    idx = torch.randint(0, 23, (1, 32))
    before, _ = model(idx, idx)
    model.resize_block_size(80)
    after, _ = model(idx, idx)
    assert torch.equal(before, after)
    model(torch.randint(0, 23, (1, 80)))


def test_optimizer_groups_honour_lr_mult():
    model = GPT(tiny('causal'))
    model.transformer.ln_f.weight.lr_mult = 10.0
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    by_mult = {g['lr_mult']: g for g in opt.param_groups}
    assert by_mult[10.0]['lr'] == pytest.approx(1e-2) and by_mult[10.0]['weight_decay'] == 0.0
    decayed = [g for g in opt.param_groups if g['weight_decay'] > 0]
    assert all(p.dim() >= 2 for g in decayed for p in g['params'])


def test_mfu_counts_infini_attention_within_a_segment():
    """Infini-attention's softmax sees one segment, so its flops per token do not grow with the context."""
    per_token = [GPT(tiny('infini', block_size=T)).estimate_mfu(1, 1.0) / T for T in (64, 256)]
    assert per_token[0] == pytest.approx(per_token[1])
    causal = [GPT(tiny('causal', block_size=T)).estimate_mfu(1, 1.0) / T for T in (64, 256)]
    assert causal[1] > causal[0]
