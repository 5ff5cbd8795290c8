"""train.py: end to end on a tiny dataset, resume, fine-tune at a longer context, clear errors, crash-safe saves."""
import os
import pickle
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_FLAGS, fresh_module
from configurator import configure
from model import ATTENTIONS

WRITTEN = list(ATTENTIONS)


def load(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)


def error_of(train_tiny, out_dir, *flags):
    with pytest.raises(SystemExit) as e:
        train_tiny(out_dir, *flags)
    return str(e.value)


@pytest.mark.parametrize('attention', WRITTEN)
def test_trains_and_checkpoints(train_tiny, tmp_path, attention):
    train_tiny(tmp_path, f'--attention={attention}')
    ckpt = load(tmp_path)
    assert ckpt['iter_num'] == 4 and ckpt['model_args']['attention'] == attention
    assert ckpt['tokenizer'] == {'kind': 'byte'} and ckpt['config']['batch_size'] == 2
    assert np.isfinite(ckpt['best_val_loss'])


def test_command_line(tiny_data, tmp_path):
    """As a user runs it, with a config file then flags."""
    config = tmp_path / 'tiny.py'
    config.write_text('n_layer = 1\nlearning_rate = 2e-3  # a comment\n')
    flags = [f'--data_dir={tiny_data}', f'--out_dir={tmp_path}', *TINY_FLAGS]
    out = subprocess.run([sys.executable, 'train.py', str(config), *flags], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'step 4: train loss' in out.stderr + out.stdout
    assert load(tmp_path)['config']['learning_rate'] == 2e-3


def test_resume_continues_the_same_run(train_tiny, tmp_path):
    """2 iterations then a resume to 4 gives exactly the weights of 4 iterations in one go."""
    train_tiny(tmp_path / 'straight', '--lr_decay_iters=4')
    train_tiny(tmp_path / 'halves', '--lr_decay_iters=4', '--max_iters=2')
    assert load(tmp_path / 'halves')['iter_num'] == 2
    fresh_module('train').main([f'--out_dir={tmp_path / "halves"}', '--init_from=resume', '--max_iters=4',
                                '--device=cpu', '--dtype=float32', '--compile=False'])  # the machine's, never resumed
    straight, halves = load(tmp_path / 'straight'), load(tmp_path / 'halves')
    assert halves['iter_num'] == 4
    for name, tensor in straight['model'].items():
        assert torch.equal(tensor, halves['model'][name]), name


def test_eval_only_leaves_the_checkpoint(train_tiny, tmp_path, capsys):
    train_tiny(tmp_path)
    before = os.path.getmtime(tmp_path / 'ckpt.pt')
    train_tiny(tmp_path, '--init_from=resume', '--eval_only=True')
    assert 'step 4: train loss' in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / 'ckpt.pt') == before


def test_fine_tune_at_a_longer_context(train_tiny, tmp_path):
    train_tiny(tmp_path / 'short', '--positions=learned')  # the learned table is what fine-tuning tiles
    train_tiny(tmp_path / 'long', f'--init_from={tmp_path / "short" / "ckpt.pt"}', '--block_size=32',
               '--max_iters=2', '--learning_rate=3e-4')
    long = load(tmp_path / 'long')
    assert long['iter_num'] == 2 and long['model_args']['block_size'] == 32
    assert long['model']['transformer.wpe.weight'].shape == (32, 16)
    assert long['config']['learning_rate'] == 3e-4 and long['model_args']['n_layer'] == 1


def test_fine_tune_infini_with_a_sharper_memory(train_tiny, tmp_path):
    """experiments/infini_passkey.py's two-stage runs: the paper's memory first, then fine-tuned with the sharper
    feature map and the boost, even from a checkpoint older than those fields. A resumed run may not change them."""
    train_tiny(tmp_path / 'paper', '--attention=infini')
    old = load(tmp_path / 'paper')
    for key in ('feature_scale', 'memory_boost'):  # as saved before the fields existed: trained with the defaults
        del old['model_args'][key]
    torch.save(old, tmp_path / 'paper' / 'ckpt.pt')
    train_tiny(tmp_path / 'sharp', f'--init_from={tmp_path / "paper" / "ckpt.pt"}', '--feature_scale=4',
               '--memory_boost=63', '--max_iters=2')
    args = load(tmp_path / 'sharp')['model_args']
    assert args['feature_scale'] == 4 and args['memory_boost'] == 63 and args['attention'] == 'infini'
    message = error_of(train_tiny, tmp_path / 'paper', '--init_from=resume', '--feature_scale=4', '--max_iters=5')
    assert "--feature_scale=4.0 contradicts the checkpoint's feature_scale=1.0" in message


def test_a_flag_equal_to_what_the_checkpoint_derived_is_no_contradiction(train_tiny, tmp_path):
    """--head_size equal to n_embd / n_head agrees with a checkpoint saved before the field existed."""
    train_tiny(tmp_path / 'a')
    old = load(tmp_path / 'a')
    del old['model_args']['head_size']
    torch.save(old, tmp_path / 'a' / 'ckpt.pt')
    width = old['model_args']['n_embd'] // old['model_args']['n_head']
    train_tiny(tmp_path / 'a', '--init_from=resume', '--max_iters=5', f'--head_size={width}')
    message = error_of(train_tiny, tmp_path / 'a', '--init_from=resume', '--max_iters=6', f'--head_size={2 * width}')
    assert f"--head_size={2 * width} contradicts the checkpoint's head_size={width}" in message


def test_flags_that_contradict_the_checkpoint(train_tiny, tmp_path):
    train_tiny(tmp_path / 'a')
    ckpt = str(tmp_path / 'a' / 'ckpt.pt')
    message = error_of(train_tiny, tmp_path / 'b', f'--init_from={ckpt}', '--n_embd=32')
    assert "--n_embd=32 contradicts the checkpoint's n_embd=16" in message
    message = error_of(train_tiny, tmp_path / 'a', '--init_from=resume', '--block_size=32', '--max_iters=5')
    assert "--block_size=32 contradicts the checkpoint's block_size=16" in message and '--init_from=' in message
    train_tiny(tmp_path / 'a', '--init_from=resume', '--max_iters=5', '--dropout=0.1')  # allowed to change
    message = error_of(train_tiny, tmp_path / 'a', '--init_from=resume')  # TINY_FLAGS say --max_iters=4
    assert 'is at iteration 5 of --max_iters=4: raise --max_iters' in message


@pytest.mark.parametrize('flag, message', [
    ('--n_layr=2', 'unknown flag --n_layr'),
    ('--max_iters=ten', '--max_iters=ten: expected int'),
    ('--compile=maybe', '--compile=maybe: expected bool'),
    ('--attention=flash', "unknown attention 'flash', choose one of: causal"),
    ('--n_embd=17', 'n_embd=17 must be divisible by n_head=2'),
    ('--init_from=resume', 'no checkpoint at'),
    ('--init_from=nowhere/ckpt.pt', '--init_from=nowhere/ckpt.pt: no such checkpoint file'),
    ('--init_from=resum', "--init_from is 'scratch', 'resume', gpt2[-medium|-large|-xl] or the path of a ckpt.pt"),
    ('max_iters=2', "no config file 'max_iters=2'"),
    ('--block_size=10000', 'too few for --block_size=10000'),
    ('--learning_rate=nan', '--learning_rate=nan must be a finite number >= 0'),
    ('--batch_size=0', '--batch_size=0 must be at least 1'),
])
def test_clear_errors(train_tiny, tmp_path, flag, message):
    assert message in error_of(train_tiny, tmp_path, flag)


def test_config_file_errors(train_tiny, tmp_path):
    bad_key, bad_type = tmp_path / 'bad_key.py', tmp_path / 'bad_type.py'
    bad_key.write_text('learning_rat = 1e-3\n')
    bad_type.write_text("max_iters = '10'\n")
    assert f"{bad_key} sets unknown key 'learning_rat'" in error_of(train_tiny, tmp_path, str(bad_key))
    assert "sets max_iters='10': expected int" in error_of(train_tiny, tmp_path, str(bad_type))


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(SystemExit, match=r'no prepared dataset in .*: run: python data/shakespeare_char/prepare.py'):
        fresh_module('train').main(['--dataset=shakespeare_char', f'--data_dir={tmp_path}', '--device=cpu'])


def test_corrupt_checkpoint(train_tiny, tmp_path):
    """Text, text that pickle reads as an opcode (a KeyError inside torch), a truncated checkpoint: one clear line."""
    train_tiny(tmp_path / 'good')
    good = (tmp_path / 'good' / 'ckpt.pt').read_bytes()
    for content in (b'not a checkpoint at all', b'echo hello', good[:len(good) // 2]):
        (tmp_path / 'ckpt.pt').write_bytes(content)
        error = error_of(train_tiny, tmp_path, '--init_from=resume')
        assert 'is not a readable checkpoint (not a complete torch.save file of tensors and plain values)' in error


def test_kill_during_checkpoint_write_keeps_the_previous_one(train_tiny, tmp_path):
    """A process killed (SIGKILL) halfway through writing a checkpoint leaves the previous ckpt.pt loadable."""
    train_tiny(tmp_path)
    before = load(tmp_path)
    script = (
        "import os, signal, torch, checkpoints\n"
        "def dying_save(obj, f):\n"
        "    f.write(b'the first half of a checkpoint'); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying_save\n"
        f"checkpoints.save_checkpoint({{'model': {{}}}}, {str(tmp_path / 'ckpt.pt')!r})\n")
    out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == -9, out.stderr
    after = load(tmp_path)
    assert after['iter_num'] == before['iter_num']
    assert all(torch.equal(t, after['model'][k]) for k, t in before['model'].items())


def test_batches_of_fixed_length_examples(tmp_path):
    """With example_len (passkey), windows start at an example and targets never cross into the next one."""
    np.tile(np.arange(8, dtype=np.uint16), 10).tofile(tmp_path / 'train.bin')  # 10 examples of 8 tokens: 0..7
    train = fresh_module('train')
    for block_size, last_target in ((8, -1), (6, 6)):
        x, y = train.get_batch(str(tmp_path), 'train', 5, block_size, np.random.default_rng(0), 'cpu', example_len=8)
        assert (x == torch.arange(block_size)).all()
        assert (y[:, :-1] == torch.arange(1, block_size)).all() and (y[:, -1] == last_target).all()


def test_batches_that_score_only_the_answer(tmp_path):
    """answer_len (a task's answer at the end of each example): the other targets are -1, ignored by the loss."""
    np.tile(np.arange(8, dtype=np.uint16), 10).tofile(tmp_path / 'train.bin')
    x, y = fresh_module('train').get_batch(str(tmp_path), 'train', 3, 8, np.random.default_rng(0), 'cpu',
                                           example_len=8, answer_len=2)
    assert (y[:, :5] == -1).all() and (y[:, 5:7] == torch.tensor([6, 7])).all() and (y[:, 7] == -1).all()


def test_learning_rate_schedule():
    train = fresh_module('train')
    cfg = SimpleNamespace(**{**train.FLAGS, 'learning_rate': 1.0, 'min_lr': 0.1, 'warmup_iters': 10, 'max_iters': 110})
    assert train.get_lr(cfg, 0) < train.get_lr(cfg, 9) < 1.0
    assert train.get_lr(cfg, 10) == 1.0 and train.get_lr(cfg, 60) == pytest.approx(0.55)
    assert train.get_lr(cfg, 110) == 0.1


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(ROOT, 'config'))))
def test_config_files_are_valid(name):
    train = fresh_module('train')
    _, given = configure([os.path.join(ROOT, 'config', name)], train.FLAGS)
    assert given


def test_resume_needs_a_training_checkpoint(train_tiny, tmp_path):
    torch.save({'model': {}, 'model_args': {}}, tmp_path / 'ckpt.pt')  # weights alone, as a test or script saves
    message = error_of(train_tiny, tmp_path, '--init_from=resume')
    assert 'has no best_val_loss, config, iter_num, optimizer to resume a run with; fine-tune' in message


# ---------------------------------------------------------------------------------------------------------
# No run loses a good checkpoint, and bad input gets one line.

@pytest.mark.parametrize('threads', [1, 2])
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(train_tiny, tmp_path, threads):
    """With 1 thread the loss becomes NaN, with 2 it stays finite at about 1e12: both stop, and the checkpoint keeps
    the state and the settings it had before the resume."""
    train_tiny(tmp_path)
    before = load(tmp_path)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        message = error_of(train_tiny, tmp_path, '--init_from=resume', '--max_iters=40', '--lr_decay_iters=40',
                           '--learning_rate=1e4', '--min_lr=0')
    finally:
        torch.set_num_threads(torch_threads)
    assert 'the run diverged' in message and 'keeps the last good state' in message
    after = load(tmp_path)
    assert after['iter_num'] == before['iter_num'] == 4 and after['best_val_loss'] == before['best_val_loss']
    assert after['config']['learning_rate'] == before['config']['learning_rate']
    assert all(torch.equal(after['model'][k], before['model'][k]) for k in before['model'])


def test_a_finite_rise_far_above_the_start_is_a_divergence(tmp_path):
    """A val loss more than DIVERGED_BY above the reference stops the run; one within it does not."""
    train = fresh_module('train')
    train.stop_if_diverged({'train': 9.0, 'val': 3.4}, 10, str(tmp_path), reference=2.5)
    with pytest.raises(SystemExit, match=r'^step 10: val loss 3.6, more than 1 above 2.5000 where the run stood: '
                                         r'the run diverged; no checkpoint was written'):
        train.stop_if_diverged({'train': 3.0, 'val': 3.6}, 10, str(tmp_path), reference=2.5)


def test_a_new_run_does_not_replace_another_runs_checkpoint(train_tiny, tmp_path):
    train_tiny(tmp_path)
    message = error_of(train_tiny, tmp_path, '--max_iters=2')
    assert 'holds another run' in message and '--init_from=resume' in message and '--overwrite=True' in message
    assert load(tmp_path)['iter_num'] == 4
    train_tiny(tmp_path, '--max_iters=2', '--overwrite=True')
    assert load(tmp_path)['iter_num'] == 2


def test_two_runs_in_one_out_dir(train_tiny, tiny_data, tmp_path):
    """While one process trains into out_dir, a second run there stops with one line; the first goes on."""
    flags = [f'--data_dir={tiny_data}', f'--out_dir={tmp_path}', *TINY_FLAGS, '--max_iters=1000000']
    log = tmp_path / 'first.log'
    with open(log, 'w') as f:
        first = subprocess.Popen([sys.executable, 'train.py', *flags], cwd=ROOT, stdout=f, stderr=f)
    try:
        while not (tmp_path / 'ckpt.pt').exists():  # the first run holds the lock from before its first save
            assert first.poll() is None, log.read_text()
            time.sleep(0.2)
        for resume in ([], ['--init_from=resume', '--max_iters=1000000']):
            message = error_of(train_tiny, tmp_path, *resume)
            assert 'another run is training in' in message
        assert first.poll() is None  # still training
    finally:
        first.kill()
        first.wait()
    train_tiny(tmp_path, '--init_from=resume', '--max_iters=1000000', '--eval_only=True')  # its checkpoint reads


def test_a_clone_moved_to_another_path_resumes_on_its_own_data(tiny_data, tmp_path):
    """The checkpoint stores data_dir '' for data/<dataset>: a moved clone finds its own copy of the data."""
    clone = tmp_path / 'clone'
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns('.git', 'out*', 'docs', 'tests', '*.bin', 'eval_out'))
    shutil.copytree(tiny_data, clone / 'data' / 'tiny')
    flags = ['--dataset=tiny', '--out_dir=out-tiny', *TINY_FLAGS]
    out = subprocess.run([sys.executable, 'train.py', *flags, '--max_iters=2'], cwd=clone, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert load(clone / 'out-tiny')['config']['data_dir'] == ''
    moved = tmp_path / 'moved'
    clone.rename(moved)
    out = subprocess.run([sys.executable, 'train.py', '--init_from=resume', '--out_dir=out-tiny', '--max_iters=4',
                          '--device=cpu', '--compile=False'], cwd=moved, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"data: {moved / 'data' / 'tiny'}" in out.stdout
    assert load(moved / 'out-tiny')['iter_num'] == 4


def test_resume_keeps_the_learning_rate_schedule(train_tiny, tmp_path):
    """Raising --max_iters on resume trains on at the end of the run's schedule, with no jump in the LR."""
    train_tiny(tmp_path)  # lr_decay_iters 0 = max_iters = 4
    message = error_of(train_tiny, tmp_path, '--init_from=resume')
    assert 'ends at min_lr after iteration 4' in message
    train_tiny(tmp_path, '--init_from=resume', '--max_iters=6')
    assert load(tmp_path)['config']['lr_decay_iters'] == 4


def corrupt(folder, name, content):
    (folder / name).write_bytes(content)


@pytest.mark.parametrize('name, content, message', [
    ('meta.pkl', b'', 'meta.pkl cannot be read (EOFError)'),
    ('meta.pkl', pickle.dumps({'vocab_size': 257, 'tokenizer': {'kind': 'byte'}})[:20], 'meta.pkl cannot be read'),
    ('meta.pkl', pickle.dumps({'tokenizer': {'kind': 'byte'}}), 'meta.pkl has no vocab_size'),
    ('meta.pkl', pickle.dumps([1, 2]), 'meta.pkl has no vocab_size'),
    ('train.bin', b'\x01\x00' * 500 + b'\x01', 'not a whole number of uint16 token ids'),
    ('val.bin', np.full(500, 300, dtype=np.uint16).tobytes(), 'holds token id 300, past the vocabulary of 257'),
])
def test_corrupt_data_files(train_tiny, tiny_data, tmp_path, name, content, message):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    corrupt(data, name, content)
    assert message in error_of(train_tiny, tmp_path / 'out', f'--data_dir={data}')


@pytest.mark.parametrize('flags, message', [
    (['--device=foo'], '--device=foo: use cpu, cuda, cuda:N or mps'),
    (['--device=mps'], '--device=mps but this machine has no Apple GPU'),
    (['--seed=-1'], '--seed=-1 must be >= 0'),
    (['--min_lr=0.1'], 'is above --learning_rate'),
    (['--n_embd=18', '--n_head=6'], 'rotary positions need an even head size, not 3'),
    (['--attention=infini', '--segment_len=32'], 'the memory would never train'),
    (['--attention=infini', '--memory_boost=inf'], 'memory_boost=inf must be a finite number >= 0'),
    (['--attention=infini', '--gate_lr_mult=-1'], 'gate_lr_mult=-1.0 must be a finite number >= 0'),
    (['--attention=selective', '--selection_loss=nan'], 'selection_loss=nan must be a finite number >= 0'),
    (['--init_from=resum'], "--init_from is 'scratch', 'resume', gpt2[-medium|-large|-xl] or the path of a ckpt.pt"),
])
def test_bad_settings_are_one_line(train_tiny, tmp_path, flags, message):
    if 'mps' in flags[0] and torch.backends.mps.is_available():
        pytest.skip('this machine has MPS')
    assert message in error_of(train_tiny, tmp_path, *flags)


def test_out_dir_errors(train_tiny, tmp_path):
    assert '--out_dir is empty' in error_of(train_tiny, '')
    (tmp_path / 'a_file').write_text('not a folder')
    assert 'cannot write there' in error_of(train_tiny, tmp_path / 'a_file')
    assert 'cannot write there' in error_of(train_tiny, tmp_path / 'a_file' / 'below')
