"""InAttention: the cache and its two decode paths against the full forward, cache size, training, extension."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, GPTConfig


def tiny(**kw):
    args = dict(block_size=32, vocab_size=23, n_layer=2, n_head=2, n_embd=16, attention='in')
    args.update(kw)
    return GPTConfig(**args)


def model64(**kw):
    torch.manual_seed(0)
    model = GPT(tiny(**kw)).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm affines, so the absorbed path's folding is really tested
        for name, p in model.named_parameters():
            if 'ln_kv' in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize('absorb,positions', [(True, 'learned'), (False, 'learned'), (True, 'alibi'),
                                             (False, 'alibi')])
def test_cached_logits_equal_full_forward(absorb, positions):
    model = model64(positions=positions)
    idx = torch.randint(0, 23, (2, 30))
    cache = model.new_cache(2, absorb=absorb)
    model(idx[:, :7], cache=cache)
    logits, _ = model(idx[:, 7:19], cache=cache)
    full, _ = model(idx[:, :19])
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)
    for t in range(19, 30):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
        full, _ = model(idx[:, :t + 1])
        torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('positions', ['learned', 'alibi'])
def test_absorbed_equals_reprojected_with_targets(positions):
    """With targets every new token runs the blocks (T > 1 queries, masked): both paths, every position."""
    model = model64(positions=positions)
    idx = torch.randint(0, 23, (1, 20))
    full, _ = model(idx, idx)
    for absorb in (True, False):
        cache = model.new_cache(1, absorb=absorb)
        first, _ = model(idx[:, :8], idx[:, :8], cache=cache)
        rest, _ = model(idx[:, 8:], idx[:, 8:], cache=cache)
        torch.testing.assert_close(torch.cat((first, rest), 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('absorb,positions', [(True, 'learned'), (False, 'learned'), (True, 'alibi')])
def test_cached_greedy_generation_equals_recomputation(absorb, positions):
    model = model64(positions=positions)
    prompt = torch.randint(0, 23, (2, 5))
    out = model.generate(prompt, 40, top_k=1, absorb=absorb)  # past block_size=32: cropped, cache rebuilt
    ref = prompt
    for _ in range(40):
        logits, _ = model(ref[:, -32:])
        ref = torch.cat((ref, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ref)


def test_one_layer_equals_causal_attention():
    """With one layer, keys/values from x0 are keys/values from the block's input: plain causal attention."""
    torch.manual_seed(0)
    causal = GPT(tiny(attention='causal', n_layer=1, positions='alibi')).double().eval()  # in's default positions
    inatt = GPT(tiny(n_layer=1)).double().eval()
    state = causal.state_dict()
    state['transformer.h.0.attn.ln_kv.weight'] = state['transformer.h.0.ln_1.weight']
    state['transformer.h.0.attn.ln_kv.bias'] = state['transformer.h.0.ln_1.bias']
    inatt.load_state_dict(state)
    idx = torch.randint(0, 23, (2, 32))
    torch.testing.assert_close(inatt(idx, idx)[0], causal(idx, idx)[0], rtol=1e-12, atol=1e-12)


def test_cache_bytes_per_token_is_one_over_2_n_layer_of_causal():
    idx = torch.randint(0, 23, (2, 20))
    nbytes = {}
    for attention in ('in', 'causal'):
        model = GPT(tiny(attention=attention, n_layer=3)).eval()
        cache = model.new_cache(2, max_len=32)
        model(idx, cache=cache)
        nbytes[attention] = cache.nbytes()
    assert nbytes['in'] == 2 * 32 * 16 * 4  # batch, slots, n_embd, fp32: one x̂0 row per token, all layers
    assert nbytes['causal'] == 2 * 3 * nbytes['in']  # a KV cache: K and V in each of the 3 layers


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_prefill_runs_one_token_through_the_blocks_and_no_T_by_T():
    T = 300
    model = GPT(tiny(block_size=T, n_embd=8)).eval()
    seen = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda m, args, out: seen.append(args[0].size(1)))
    idx = torch.randint(0, 23, (1, T))
    cache = model.new_cache(1)
    with torch.no_grad(), LargestTensor() as largest:
        model(idx, cache=cache)
    assert seen == [1, 1]
    assert largest.numel < T * T // 10  # the largest tensors are the T x n_embd embeddings and position table


def test_cache_overflow_is_a_clear_error():
    model = GPT(tiny()).eval()
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match='holds 4 tokens, 5 asked for'):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_trains():
    torch.manual_seed(0)
    model = GPT(tiny())
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    data = torch.arange(33).remainder(7).repeat(4, 1)  # a periodic sequence: learnable through positions
    losses = []
    for _ in range(60):
        _, loss = model(data[:, :-1], data[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_extend_block_size_keeps_short_inputs_and_runs_long():
    model = model64()
    short = torch.randint(0, 23, (1, 32))
    before, _ = model(short, short)
    model.resize_block_size(80)
    after, _ = model(short, short)
    assert torch.equal(before, after)
    long = torch.randint(0, 23, (1, 80))
    _, loss = model(long, long)
    loss.backward()
    cache = model.new_cache(1)
    logits, _ = model(long, cache=cache)
    torch.testing.assert_close(logits, model(long)[0], rtol=1e-10, atol=1e-10)


def test_fine_tune_at_a_longer_block_size_with_train_py(train_tiny, tmp_path):
    """train.py's context extension: an `in` checkpoint at block 16 fine-tunes at 48, then generates at 48."""
    train_tiny(tmp_path / 'short', '--attention=in')
    train_tiny(tmp_path / 'long', '--attention=in', f'--init_from={tmp_path / "short" / "ckpt.pt"}',
               '--block_size=48', '--max_iters=2')
    ckpt = torch.load(tmp_path / 'long' / 'ckpt.pt', map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    model.eval()
    assert model.config.block_size == 48
    idx = torch.randint(0, 257, (1, 48))
    torch.testing.assert_close(model(idx, cache=model.new_cache(1))[0], model(idx)[0])
