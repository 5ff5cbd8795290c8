"""evaluate.py on tiny checkpoints: val loss by context, the passkey table, Selective Attention's budget search."""
import csv
import dataclasses
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tools import evaluate
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def tiny_dataset(folder, n_tokens):
    """A byte-level val.bin of random tokens and its meta.pkl."""
    folder.mkdir()
    np.random.default_rng(0).integers(0, 256, n_tokens).astype(np.uint16).tofile(folder / 'val.bin')
    with open(folder / 'meta.pkl', 'wb') as f:
        pickle.dump(dict(vocab_size=257, tokenizer={'kind': 'byte'}, eot_token=256, dataset='tiny'), f)
    return folder


def make_checkpoint(path, attention, block_size, model=None):
    torch.manual_seed(0)
    args = dict(block_size=block_size, vocab_size=257, n_layer=1, n_head=2, n_embd=16, attention=attention,
                segment_len=32)
    if model is not None:
        args = {k: getattr(model.config, k) for k in args}
    model = model or GPT(GPTConfig(**args))
    state = {'_orig_mod.' + k: v for k, v in model.state_dict().items()}  # as torch.compile saves them
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model_args=dataclasses.asdict(model.config), model=state, config=dict(dataset='tiny'),
                    tokenizer={'kind': 'byte'}, rope_layout='half'), path)
    return path


def test_val_loss_and_passkey_on_tiny_checkpoints(tmp_path, capsys):
    data = tiny_dataset(tmp_path / 'tiny', 3000)
    causal = make_checkpoint(str(tmp_path / 'out-causal' / 'ckpt.pt'), 'causal', 128)
    infini = make_checkpoint(str(tmp_path / 'out-infini' / 'ckpt.pt'), 'infini', 128)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, 'tools/evaluate.py', '--device=cpu', f'--data_dir={data}',
                             f'--ckpt={causal},{infini}', '--contexts=128,256', '--eval_windows=3', '--batch_size=2',
                             '--passkey=True', '--passkey_trials=1', '--depths=0,1', f'--out_dir={tmp_path}/eval'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {(r['checkpoint'], r['context']): r for r in read_csv(tmp_path / 'eval' / 'val_loss.csv')}
    causal_label, infini_label = 'out-causal (causal, block 128)', 'out-infini (infini, block 128)'
    assert rows[causal_label, '256']['status'] == 'n/a'  # past block_size: a fixed context cannot
    assert rows[infini_label, '256']['status'] == 'ok'  # infini streams past it
    for key in [(causal_label, '128'), (infini_label, '128'), (infini_label, '256')]:
        assert 5.0 < float(rows[key]['val_loss']) < 6.0  # an untrained model: about ln(257) = 5.55
        assert rows[key]['scored'] == '64' and float(rows[key]['stderr']) > 0  # half the shortest context
    assert rows[infini_label, '128']['change'] == '' and rows[infini_label, '256']['change'] != ''
    passkey = read_csv(tmp_path / 'eval' / 'passkey.csv')
    assert len(passkey) == 2 * 2 * 2 and all(r['status'] == 'ok' for r in passkey)
    assert f'### Passkey accuracy, {infini_label}' in result.stdout
    assert (tmp_path / 'eval' / 'val_loss.md').read_text().startswith('device: CPU')

    evaluate.main(['--device=cpu', f'--data_dir={data}', f'--ckpt={causal}', '--contexts=256', '--eval_windows=1',
                   '--extend=True', f'--out_dir={tmp_path}/extended'])
    assert re.search(r'\| 256 \| \d\.\d{4}\* \|', capsys.readouterr().out)  # tiled positions, marked *


def test_val_loss_of_examples_skips_the_targets_that_start_one():
    """As train.py does: nothing in an example predicts the first token of the next one."""
    settings = evaluate.setup(['--device=cpu', '--eval_windows=1'])
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    data = np.random.default_rng(0).integers(0, 256, 17).astype(np.uint16)  # room for one window of 16: at 0
    ids = torch.from_numpy(data.astype(np.int64))
    with torch.no_grad():
        logits, _ = model(ids[None, :16], ids[None, 1:])
    losses = F.cross_entropy(logits[0], ids[1:], reduction='none')
    kept = [t for t in range(16) if (t + 1) % 8]  # targets 8 and 16 start the 2nd and 3rd examples of 8 tokens
    assert len(kept) == 14
    assert evaluate.val_loss(model, data, 16, settings, example_len=8) == pytest.approx(losses[kept].mean().item(),
                                                                                         rel=1e-5)
    assert evaluate.val_loss(model, data, 16, settings) == pytest.approx(losses.mean().item(), rel=1e-5)


class ContextFree(torch.nn.Module):
    """A stand-in model that predicts the next token from the current one alone: more context cannot help it."""
    streams = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(257, 257)

    def forward(self, x, targets=None):
        return self.table(x), None


def test_val_loss_by_context_scores_the_same_targets_at_every_context():
    settings = evaluate.setup(['--device=cpu', '--eval_windows=5', '--batch_size=2'])
    data = np.random.default_rng(0).integers(0, 256, 300).astype(np.uint16)
    ends = evaluate.window_ends(data, 64, settings)
    assert len(ends) == 5 and ends.min() >= 65 and ends.max() <= 300
    model = ContextFree()
    with torch.no_grad():
        short, long = (evaluate.context_losses(model, data, T, ends, 8, settings) for T in (16, 64))
        assert np.allclose(short, long, rtol=1e-6)  # the same targets: a model blind to context gains nothing
        ids = torch.from_numpy(data.astype(np.int64))
        for end, loss in zip(ends, long):  # the slow way: the 8 tokens before the end, each from the one before it
            assert loss == pytest.approx(F.cross_entropy(model.table(ids[end - 9:end - 1]), ids[end - 8:end]).item(),
                                         rel=1e-5)
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
        end = ends[0]
        logits, _ = gpt(ids[None, end - 33:end - 1], ids[None, end - 32:end])
        expected = F.cross_entropy(logits[0, -8:], ids[end - 8:end]).item()
        assert evaluate.context_losses(gpt, data, 32, ends[:1], 8, settings)[0] == pytest.approx(expected, rel=1e-5)
        # examples of 8 tokens: windows end where an example ends, and an example's first token is no target
        ends = evaluate.window_ends(data, 32, settings, example_len=8)
        assert all(ends % 8 == 0)
        got = evaluate.context_losses(model, data, 16, ends, 8, settings, example_len=8)
        for end, loss in zip(ends, got):
            expected = F.cross_entropy(model.table(ids[end - 8:end - 1]), ids[end - 7:end]).item()
            assert loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match='fewer than a window'):
        evaluate.window_ends(data, 300, settings)


def test_loss_cell_shows_the_spread_and_the_change():
    row = dict(val_loss=1.5, mark='', stderr=0.02, change=-0.031, change_stderr=0.004, status='ok')
    assert evaluate.loss_cell(row) == '1.5000 ± 0.020 (-0.0310 ± 0.0040)'
    assert evaluate.loss_cell(dict(row, change=None, stderr=None)) == '1.5000'
    assert evaluate.loss_cell(dict(row, val_loss=None, status='n/a')) == 'n/a'


def slow_answer_scores(model, prompts, answers):
    """answer_scores the slow, obvious way: per example and answer token, one forward over the prompt and the right
    answer tokens before it (the last block_size of them for a model with a context limit, as generate crops)."""
    right, loss = [], []
    for prompt, answer in zip(prompts.tolist(), answers.tolist()):
        hits, costs = [], []
        for j, token in enumerate(answer):
            context = prompt + answer[:j]
            if not model.streams:
                context = context[-model.config.block_size:]
            logits = model(torch.tensor([context]))[0][0, -1].double()
            hits.append(int(logits.argmax()) == token)
            costs.append(-torch.log_softmax(logits, -1)[token].item())
        right.append(hits)
        loss.append(sum(costs) / len(costs))
    return torch.tensor(right), torch.tensor(loss, dtype=torch.float64)


@pytest.mark.parametrize('attention, positions', [('causal', 'rope'), ('causal', 'learned'), ('selective', 'rope'),
                                                  ('in', 'alibi'), ('infini', 'rope')])
@pytest.mark.parametrize('prompt_len', [9, 30])  # 30: past block_size (cropped) or several cache chunks (infini)
def test_answer_scores_equal_a_slow_loop_and_greedy_decoding(attention, positions, prompt_len):
    """answer_scores (one teacher-forced forward, or one window per answer token past block_size, or the streaming
    cache) gives each answer token's right and the answer's loss as a per-example, per-token loop does; an answer is
    all right exactly when greedy decoding produces it. Half the answers are greedy's own, half have a token changed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16, attention=attention,
                          positions=positions, segment_len=4)).double().eval()
    prompts = torch.randint(0, 23, (6, prompt_len))
    greedy = model.generate(prompts, 4, temperature=0)[:, prompt_len:]
    answers = greedy.clone()
    answers[3:, 2] = (answers[3:, 2] + 1) % 23
    right, loss = evaluate.answer_scores(model, prompts, answers)
    slow_right, slow_loss = slow_answer_scores(model, prompts, answers)
    assert right.tolist() == slow_right.tolist()
    torch.testing.assert_close(loss.double(), slow_loss, rtol=1e-6, atol=1e-6)
    assert right.all(-1).tolist() == [True] * 3 + [False] * 3


def test_passkey_accuracy_scores_exact_answers(monkeypatch):
    """passkey_accuracy counts the examples whose every answer token answer_scores finds right."""
    from data.tokenizers import tokenizer_from_meta
    settings = evaluate.setup(['--device=cpu', '--passkey_trials=3'])
    tok = tokenizer_from_meta({'kind': 'byte'})
    for knows in (True, False):
        def fake_scores(model, prompts, answers):  # right where the answer is the key in the prompt (or not at all)
            key = re.search(r'pass key is (\d+)\. Remember', bytes(prompts[0].tolist()).decode()).group(1)
            right = answers == torch.tensor([list(key.encode())])
            return right if knows else ~right, torch.zeros(len(answers))
        monkeypatch.setattr(evaluate, 'answer_scores', fake_scores)
        assert evaluate.passkey_accuracy(None, tok, 300, 0.5, settings) == (1.0 if knows else 0.0)


def test_choose_budgets_is_greedy_and_stops_at_the_target():
    """Each round cuts the layer whose cut costs least, and the search stops before passing the target."""
    weights = [1.0, 0.1]  # a made-up val loss: layer 0's budget matters ten times more than layer 1's

    def loss_of(budgets):
        return sum(w / b for w, b in zip(weights, budgets))

    steps = evaluate.choose_budgets([32, 32], loss_of, target=0.2)
    (first, _), (last, loss) = steps[0], steps[-1]
    assert first == [32, 32] and loss <= 0.2
    assert last[1] < last[0], "the cheap layer is cut further"
    assert all(sum(b) < sum(a) for (a, _), (b, _) in zip(steps, steps[1:]))
    cuts = [[max(2, min(b - 1, round(0.8 * b))) if l == i else b for l, b in enumerate(last)]
            for i in range(2) if last[i] > 2]
    assert all(loss_of(cut) > 0.2 for cut in cuts), "stopped only when every cut fails"


def test_budgets_end_to_end(tmp_path, capsys):
    """--search_budgets on a tiny selective checkpoint whose selecting head votes hard: budgets, loss within target, KV
    memory."""
    data = tiny_dataset(tmp_path / 'tiny', 2000)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=16, attention='selective'))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)  # large votes, so that F and pruning really matter
    path = make_checkpoint(str(tmp_path / 'ckpt.pt'), 'selective', 32, model)
    evaluate.main(['--device=cpu', f'--data_dir={data}', f'--ckpt={path}', '--loss=False', '--search_budgets=True',
                   '--target=+0.05', '--shrink=0.5', '--eval_windows=2', '--batch_size=2', f'--out_dir={tmp_path}/ev'])
    out = capsys.readouterr().out
    assert 'reached' in out and 'fewer KV entries' in out
    steps = read_csv(tmp_path / 'ev' / 'budgets.csv')
    assert steps[0]['budgets'] == '32 32' and float(steps[-1]['val_loss']) <= float(steps[0]['val_loss']) + 0.05
    assert int(steps[-1]['entries']) < 64
    assert not (tmp_path / 'ev' / 'val_loss.csv').exists()


@pytest.mark.parametrize('args, message', [
    (['--ckpt='], '--ckpt is a train.py checkpoint'),
    (['--ckpt=nowhere/ckpt.pt'], 'no checkpoint at nowhere/ckpt.pt'),
    (['--depths=0,2'], "--depths is a comma-separated list of fractions between 0 and 1, not '0,2'"),
    (['--shrink=1.5'], '--shrink is a fraction between 0 and 1, not 1.5'),
    (['--ckpt=a.pt,b.pt', '--search_budgets=True'], "--search_budgets searches one checkpoint's budgets: give one"),
])
def test_bad_flags_are_one_line_errors(args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        evaluate.main(['--device=cpu'] + args)


def test_budgets_refuse_a_checkpoint_that_is_not_selective(tmp_path):
    data = tiny_dataset(tmp_path / 'tiny', 500)
    path = make_checkpoint(str(tmp_path / 'ckpt.pt'), 'causal', 32)
    with pytest.raises(SystemExit, match="--search_budgets prunes a cache to a budget; .* 'causal' takes none"):
        evaluate.main(['--device=cpu', f'--data_dir={data}', f'--ckpt={path}', '--loss=False', '--search_budgets=True'])


@pytest.mark.parametrize('args, message', [
    (['--memory_read=off'], "--memory_read ablates Infini-attention's memory; .* is 'causal'"),
    (['--evict=window'], '--evict chooses the cache eviction of --search_budgets=True'),
    (['--seed=-1'], '--seed=-1 must be >= 0'),
    (['--device=foo'], '--device=foo: use cpu'),
])
def test_flags_that_do_not_apply_are_refused(tmp_path, args, message):
    data = tiny_dataset(tmp_path / 'tiny', 500)
    path = make_checkpoint(str(tmp_path / 'ckpt.pt'), 'causal', 32)
    with pytest.raises(SystemExit, match=message):
        evaluate.main(['--device=cpu', f'--data_dir={data}', f'--ckpt={path}', f'--out_dir={tmp_path}/ev', *args])


def test_a_case_that_cannot_run_says_why(tmp_path, capsys):
    """val.bin shorter than the window: n/a with the reason under the table. A context too big for free memory is
    refused before it allocates: OOM with the estimate."""
    data = tiny_dataset(tmp_path / 'tiny', 30)
    path = make_checkpoint(str(tmp_path / 'ckpt.pt'), 'causal', 32)
    evaluate.main(['--device=cpu', f'--data_dir={data}', f'--ckpt={path}', f'--out_dir={tmp_path}/ev',
                   '--contexts=16,32'])
    out = capsys.readouterr().out
    assert 'at 32: n/a, ValueError: val.bin has 30 tokens, fewer than a window of 33' in out
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16))
    settings = evaluate.setup(['--device=cpu'])
    with pytest.raises(MemoryError, match='context 1024M needs at least'):
        evaluate.check_fits(model, settings, 2 ** 40 // 1024, with_logits=True)


def test_a_stopped_evaluation_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    """Each case is written as it finishes: a run stopped at its second context keeps the first one's row."""
    data = tiny_dataset(tmp_path / 'tiny', 2000)
    path = make_checkpoint(str(tmp_path / 'out-causal' / 'ckpt.pt'), 'causal', 64)
    real = evaluate.context_losses

    def context_losses(model, data, T, *args, **kwargs):
        if T > 32:
            raise KeyboardInterrupt  # what a kill at this moment leaves behind
        return real(model, data, T, *args, **kwargs)

    monkeypatch.setattr(evaluate, 'context_losses', context_losses)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(['--device=cpu', f'--data_dir={data}', f'--ckpt={path}', '--contexts=32,64', '--eval_windows=1',
                       f'--out_dir={tmp_path}/ev'])
    rows = read_csv(tmp_path / 'ev' / 'val_loss.csv')
    assert [(r['context'], r['status']) for r in rows] == [('32', 'ok')] and float(rows[0]['val_loss']) > 0
    assert '| out-causal (causal, block 64) | 32 |' in (tmp_path / 'ev' / 'val_loss.md').read_text()


@pytest.mark.parametrize('out_dir, message', [('', '--out_dir is empty'),
                                              ('/proc/eval', '--out_dir=/proc/eval: cannot write there')])
def test_a_bad_out_dir_fails_before_any_model_loads(out_dir, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        evaluate.main(['--device=cpu', '--ckpt=nowhere/ckpt.pt', f'--out_dir={out_dir}'])
