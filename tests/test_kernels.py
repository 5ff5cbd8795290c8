"""The Triton kernels of kernels.py against the PyTorch references of the attention files.

On a GPU the kernels run natively; without one, conftest.py sets TRITON_INTERPRET=1 before kernels.py is
imported and the same kernels run in Triton's interpreter on CPU tensors (slow: the shapes stay tiny). The block
sizes are passed small so that a few blocks, lengths that are not multiples of them, and BLOCK_M != BLOCK_N are
all exercised.
"""
import importlib.util
import os
import sys
import warnings

import numpy as np
import pytest
import torch

triton = pytest.importorskip('triton')
import kernels  # noqa: E402  (after the skip: without triton there is nothing to run)
import attention_infini  # noqa: E402
from attention_infini import fast_infini_attention, infini_attention  # noqa: E402
from attention_selective import causal_logits, selection_matrix, selective_attention  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
# Triton's interpreter computes tl.dot of bf16 blocks wrongly (triton 3.9), so bf16 runs only on a GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# relative error ||out - ref|| / ||ref|| against an fp64 reference on the same (rounded) inputs;
# fp32 on a GPU multiplies in tf32
TOLERANCE = {torch.float32: 5e-3 if CUDA else 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# selective gradients in fp32 on a GPU: TF32 products move a few votes across the ReLU's kink, and the selection
# path's gradient with them (the fp64 reference moves as much when only q, k are rounded to TF32)
SELECTIVE_GRAD_TOLERANCE = {**TOLERANCE, torch.float32: 3e-2 if CUDA else 1e-5}


# Triton 3.6's interpreter indexes with 1-element arrays, which numpy 2.4 refuses (fixed in Triton 3.7)
OLD_INTERPRETER = (not CUDA and tuple(int(n) for n in triton.__version__.split('.')[:2]) < (3, 7)
                   and tuple(int(n) for n in np.__version__.split('.')[:2]) >= (2, 4))


@pytest.fixture(autouse=True)
def working_interpreter():
    if OLD_INTERPRETER:
        pytest.fail(f"Triton {triton.__version__}'s interpreter fails with numpy {np.__version__}: "
                    "pip install 'numpy<2.4' or triton>=3.7 to run the kernel tests on a CPU", pytrace=False)


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def qkv(B, H, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, T, D, generator=g) * 1.5).to(DEVICE, dtype) for _ in range(3)]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty and torch.empty_like return NaN-filled tensors, so any output element left unwritten shows."""
    def poison(t):
        return t.fill_(float('nan')) if t.is_floating_point() else t.fill_(-(2 ** 30))

    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, 'empty', lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, 'empty_like', lambda *a, **kw: poison(empty_like(*a, **kw)))


# ---------------------------------------------------------------------------------------------------------
# Selective attention (reference: attention_selective.selective_attention)

SELECTIVE_CASES = [  # B, H, T, D, selection_head, block_m, block_n, carry_rows
    (1, 2, 16, 16, 0, 16, 16, kernels.CARRY_ROWS),  # one block
    (2, 2, 37, 16, 1, 16, 16, kernels.CARRY_ROWS),  # a ragged last block; the selecting head is not head 0
    (2, 2, 37, 16, 1, 16, 16, 16),  # the carry one query block at a time: three chunks
    (1, 3, 64, 16, 0, 32, 16, 40),  # BLOCK_M > BLOCK_N; chunks of one block (40 rows round down to 32)
    (2, 2, 37, 32, 0, 16, 32, 32),  # BLOCK_M < BLOCK_N, another head dim; chunks of two blocks, then one
] + ([(2, 3, 300, 64, 2, kernels.BLOCK_M, kernels.selective_block_n(torch.cuda.get_device_capability()[0]), 128)]
      if CUDA else [])  # the blocks the model uses on this GPU


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('B,H,T,D,h0,block_m,block_n,carry_rows', SELECTIVE_CASES)
def test_selective_matches_reference(poisoned_empty, B, H, T, D, h0, block_m, block_n, carry_rows, dtype):
    q, k, v = (t.requires_grad_() for t in qkv(B, H, T, D, dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, totals = kernels.selective_attention(q, k, v, h0, block_m=block_m, block_n=block_n, carry_rows=carry_rows,
                                              vote_totals=True)
    ref = selective_attention(q64, k64, v64, h0)
    S = selection_matrix(causal_logits(q64.detach(), k64.detach())[:, h0])
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert relative_error(out, ref) < tol
    assert totals.dtype == torch.float32 and relative_error(totals, S.sum(dim=1)) < tol  # what a cache keeps as F
    for name, a, b in (('dq', q, q64), ('dk', k, k64), ('dv', v, v64)):
        assert torch.isfinite(a.grad).all(), name
        assert relative_error(a.grad, b.grad) < SELECTIVE_GRAD_TOLERANCE[dtype], name


def test_selective_carry_is_column_sums_of_S_above_each_block(poisoned_empty):
    """Pass 1 alone, chunk by chunk: C[b, I, j] = sum of S[k, j] over the rows k before query block I (where it is
    read), and the running sums move from one chunk's first row to the next one's."""
    B, H, T, D, h0, block_m, block_n = 2, 2, 37, 16, 1, 16, 16
    q, k, _ = qkv(B, H, T, D, torch.float32)
    S = selection_matrix(causal_logits(q.double(), k.double())[:, h0])
    tol = TOLERANCE[torch.float32]  # a GPU's dot multiplies fp32 in TF32
    running = torch.zeros(B, T, device=DEVICE)
    for q_start, q_end in ((0, 1), (1, 3)):
        carry = kernels.selective_carry(q, k, running, q_start, q_end, h0, block_m, block_n)
        for I in range(q_start, q_end):
            cols = slice(0, min((I + 1) * block_m, T))  # the keys query block I reads
            expected = S[:, :I * block_m, cols].sum(dim=1)
            torch.testing.assert_close(carry[:, I - q_start, cols].double(), expected, rtol=tol, atol=tol)
        cols = slice(0, min(q_end * block_m, T))
        torch.testing.assert_close(running[:, cols].double(), S[:, :q_end * block_m, cols].sum(dim=1), rtol=tol,
                                   atol=tol)


# ---------------------------------------------------------------------------------------------------------
# Infini-attention (reference: attention_infini.infini_attention)

INFINI_CASES = [  # B, H, Tq, T, D, segment_len, block_t, given memory (streaming: M, z in, queries = the last Tq)
    (1, 2, 16, 16, 16, 8, 16, False),   # two whole segments, each smaller than a block
    (2, 2, 37, 37, 16, 8, 16, False),   # a partial last segment, not written into the memory
    (1, 2, 40, 40, 32, 32, 16, False),  # two blocks per segment
    (1, 2, 5, 21, 16, 8, 16, True),     # streaming: a cached partial segment, then new tokens, into a memory
] + ([(2, 3, 300, 300, 64, 64, kernels.BLOCK_T, False)] if CUDA else [])  # the block the model uses


@pytest.mark.parametrize('update', ['linear', 'delta'])
@pytest.mark.parametrize('B,H,Tq,T,D,segment_len,block_t,memory', INFINI_CASES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
def test_infini_matches_reference(poisoned_empty, dtype, B, H, Tq, T, D, segment_len, block_t, memory, update):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Tq, D, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    inputs = [q, k, v, torch.randn(H, generator=g).to(DEVICE)]
    if memory:  # a memory that has seen something: z > 0
        inputs += [(torch.randn(B, H, D, D, generator=g) * 0.1).to(DEVICE), torch.rand(B, H, D, generator=g).to(DEVICE)]
    ours = [t.clone().requires_grad_() for t in inputs]
    ref64 = [t.double().requires_grad_() for t in inputs]
    y, M, z = fast_infini_attention(*ours[:4], segment_len, update, *ours[4:], block_t=block_t)
    y_ref, M_ref, z_ref = infini_attention(*ref64[:4], segment_len, update, *ref64[4:])
    grads = [torch.randn_like(t) for t in (y_ref, M_ref, z_ref)]  # the outgoing memory gets gradients too
    sum((a * b.to(a.dtype)).sum() for a, b in zip((y, M, z), grads)).backward()
    sum((a * b).sum() for a, b in zip((y_ref, M_ref, z_ref), grads)).backward()
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and M.dtype == z.dtype == torch.float32  # as the reference
    for name, a, b in (('y', y, y_ref), ('M', M, M_ref), ('z', z, z_ref)):
        assert relative_error(a, b) < tol, name
    for name, a, b in zip(('dq', 'dk', 'dv', 'dbeta', 'dM', 'dz'), ours, ref64):
        assert torch.isfinite(a.grad).all(), name
        assert relative_error(a.grad, b.grad) < tol, name


@pytest.mark.parametrize('update', ['linear', 'delta'])
@pytest.mark.parametrize('B,H,Tq,T,D,segment_len,block_t,memory', INFINI_CASES[:2] + INFINI_CASES[3:4])
def test_infini_memory_kernel_matches_the_memory_alone(B, H, Tq, T, D, segment_len, block_t, memory, update):
    """kernels.infini_memory against its own plain reference, attention_infini.memory_over_segments: the reads,
    M and z, and their gradients, in float64 against the kernel in float32."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Tq, D, generator=g).to(DEVICE)
    k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE) for _ in range(2))
    inputs = [q, k, v]
    if memory:
        inputs += [(torch.randn(B, H, D, D, generator=g) * 0.1).to(DEVICE), torch.rand(B, H, D, generator=g).to(DEVICE)]
    ours = [t.clone().requires_grad_() for t in inputs]
    ref64 = [t.double().requires_grad_() for t in inputs]
    state = ours[3:] or [None, None]
    out = kernels.infini_memory(*ours[:3], *state, segment_len, update, block_t)
    expected = attention_infini.memory_over_segments(*ref64[:3], segment_len, update, *(ref64[3:] or [None, None]))
    grads = [torch.randn_like(t) for t in expected]
    sum((a * b.to(a.dtype)).sum() for a, b in zip(out, grads)).backward()
    sum((a * b).sum() for a, b in zip(expected, grads)).backward()
    for name, a, b in zip(('A_mem', 'M', 'z'), out, expected):
        assert relative_error(a, b) < TOLERANCE[torch.float32], name
    for name, a, b in zip(('dq', 'dk', 'dv', 'dM', 'dz'), ours, ref64):
        assert relative_error(a.grad, b.grad) < TOLERANCE[torch.float32], name


def test_local_attention_splits_heads_past_the_cuda_grid_limit(monkeypatch):
    """The segments folded into the heads outgrow a CUDA grid axis at long contexts (196k heads at 1M tokens,
    H=12, N=64): SDPA is then called on slices of at most SDPA_MAX_HEADS heads, with the same result."""
    q, k, v = qkv(1, 7, 16, 16, torch.float32)
    whole = attention_infini.causal_sdpa(q, k, v)
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda q, *a, **kw: calls.append(q.size(1)) or sdpa(q, *a, **kw))
    torch.testing.assert_close(attention_infini.causal_sdpa(q, k, v, max_heads=3), whole)
    assert calls == [3, 3, 1]


# ---------------------------------------------------------------------------------------------------------
# Both

@pytest.mark.parametrize('attention', ['selective', 'infini'])
def test_models_dispatch_to_the_kernels(monkeypatch, attention):
    """The attention files call the kernels with their references' arguments: a tiny GPT's loss, gradients and
    cached decoding (prefill, then one token at a time) agree with use_kernels on and off. On CPU the kernels are
    forced on."""
    monkeypatch.setattr(kernels, f'{attention}_available', lambda q: True)
    calls = []
    name = {'selective': 'selective_attention', 'infini': 'infini_memory'}[attention]  # infini: the memory kernel
    kernel = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    config = dict(block_size=24, vocab_size=31, n_layer=2, n_head=2, n_embd=32, attention=attention, segment_len=8)
    idx = torch.randint(0, 31, (2, 20), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for use_kernels in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**config, use_kernels=use_kernels)).to(DEVICE)
        _, loss = model(idx, idx)
        loss.backward()
        with torch.no_grad():
            cache = model.new_cache(2)
            logits = [model(idx[:, :11], cache=cache)[0]] + [model(idx[:, [t]], cache=cache)[0] for t in range(11, 15)]
        results.append([loss, model.lm_head.weight.grad, model.transformer.h[0].attn.c_attn.weight.grad,
                         torch.cat(logits, 1)])
    assert calls  # the kernels really ran
    tol = 1e-2 if CUDA else 1e-5  # fp32 on a GPU: the kernels multiply in tf32
    for ours, ref in zip(*results):
        assert relative_error(ours, ref.double()) < tol


def test_selective_bad_input_is_a_clear_error():
    q, k, v = qkv(1, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match='selection_head'):
        kernels.selective_attention(q, k, v, 2)
    with pytest.raises(ValueError, match='head dims'):
        kernels.selective_attention(q[..., :12], k[..., :12], v[..., :12])


def test_available_only_on_cuda():
    q = torch.zeros(1, 2, 16, 16, device=DEVICE)
    for available in (kernels.selective_available, kernels.infini_available):
        assert available(q) == CUDA
        assert not available(q[..., :12])
        assert not available(q.double())


def test_fp32_selective_kernel_only_where_its_shared_memory_fits(monkeypatch):
    """The fp32 selective backward needs 113 KiB of shared memory per block: an H100 or A100 has it, an RTX 4090
    (99 KiB) does not, and a torch too old to say takes the reference."""
    monkeypatch.setattr(kernels, 'kernel_ready', lambda q: True)
    monkeypatch.setattr(kernels, 'works_here', lambda name, q, trial: True)
    q = torch.zeros(1, 2, 16, 16)
    for props, fp32 in (({'shared_memory_per_block_optin': 227 * 1024}, True),
                        ({'shared_memory_per_block_optin': 99 * 1024}, False), ({}, False)):
        monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device: type('props', (), props))
        assert kernels.selective_available(q) == fp32
        assert kernels.selective_available(q.half()) and kernels.selective_available(q.bfloat16())


@pytest.mark.parametrize('attention', ['selective', 'infini'])
def test_a_kernel_that_fails_on_this_gpu_falls_back_to_the_reference(monkeypatch, attention):
    """A kernel that does not compile on a user's card (here: too little shared memory) warns once, naming the
    card and the reason, and training goes on with the PyTorch reference, with the same loss and gradients."""
    name = {'selective': 'selective_attention', 'infini': 'infini_memory'}[attention]
    monkeypatch.setattr(kernels, 'kernel_ready', lambda q: True)
    monkeypatch.setattr(kernels, 'works_here', kernels.works_here)  # the real one, with its own record:
    monkeypatch.setattr(kernels, 'TRIED', {})
    monkeypatch.setattr(torch.cuda, 'get_device_properties',  # an H100's, so fp32 selective passes its own test
                        lambda device: type('props', (), {'shared_memory_per_block_optin': 227 * 1024}))

    def out_of_resources(*args, **kwargs):
        raise RuntimeError('out of resource: shared memory, Required: 116736, Hardware limit: 101376')
    monkeypatch.setattr(kernels, name, out_of_resources)
    config = dict(block_size=24, vocab_size=31, n_layer=2, n_head=2, n_embd=32, attention=attention, segment_len=8)
    idx = torch.randint(0, 31, (2, 20), generator=torch.Generator().manual_seed(0))
    results = []
    for use_kernels in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**config, use_kernels=use_kernels))
        if use_kernels:
            with pytest.warns(UserWarning, match=r'Triton kernel does not run on cpu in torch.float32 at head dim '
                                                 r'16 \(RuntimeError: out of resource: shared memory'):
                _, loss = model(idx, idx)
            with warnings.catch_warnings():
                warnings.simplefilter('error')  # once: the second layer and later steps say nothing
                model(idx, idx)
        else:
            _, loss = model(idx, idx)
        loss.backward()
        results.append((loss, model.transformer.h[0].attn.c_attn.weight.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref)


def test_the_trial_runs_pass_where_the_kernels_work(monkeypatch):
    """The trial run before a kernel's first use must itself be right, or every GPU would fall back silently."""
    monkeypatch.setattr(kernels, 'kernel_ready', lambda q: True)
    monkeypatch.setattr(kernels, 'TRIED', {})
    q = torch.zeros(1, 2, 16, 16, device=DEVICE, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert kernels.selective_available(q) and kernels.infini_available(q)
    assert set(kernels.TRIED.values()) == {True}


def test_local_attention_takes_sdpa_output_of_any_layout(monkeypatch):
    """On a GPU, SDPA's fp32 (memory-efficient) kernel returns its output as a transposed (B, N, H, D) tensor, not
    a contiguous (B, H, N, D) one: the segments must still unfold."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    q, k, v = qkv(2, 2, 21, 16, torch.float32)
    out = attention_infini.segment_attention(q[:, :, 5:], k, v, 8)
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', sdpa)
    torch.testing.assert_close(out, attention_infini.segment_attention(q[:, :, 5:], k, v, 8))


def test_imports_without_triton(monkeypatch):
    """macOS, Windows and CPU-only installs have no triton: kernels.py imports and offers no kernel."""
    monkeypatch.setitem(sys.modules, 'triton', None)
    monkeypatch.setitem(sys.modules, 'triton.language', None)
    spec = importlib.util.spec_from_file_location('kernels_without_triton', kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.selective_available(torch.zeros(1, 2, 16, 16))
    assert not module.infini_available(torch.zeros(1, 2, 16, 16))


def test_interpreter_is_on_without_cuda():
    assert CUDA or os.environ.get('TRITON_INTERPRET') == '1'
