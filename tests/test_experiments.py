"""experiments/common.py: what the experiment scripts share (preparing data, running train.py, finished runs)."""
import os
import subprocess
import types

import pytest
import torch

from experiments import common


def test_a_failed_training_is_one_line_naming_its_log(tmp_path):
    run_dir = str(tmp_path / 'run')
    with pytest.raises(SystemExit, match=f'^training {run_dir} failed, see {run_dir}/train.log$'):
        common.run_train(run_dir, ['--n_layr=2'])
    with open(os.path.join(run_dir, 'train.log')) as f:
        assert 'unknown flag --n_layr' in f.read()


def test_a_run_resumes_from_its_checkpoint_and_else_starts_from_init_from(tmp_path, monkeypatch):
    """A new run starts from init_from; once its folder holds a checkpoint it resumes instead. The printout of both
    is appended to one train.log; finished reads the checkpoint's iteration against its max_iters."""
    commands = []

    def fake_run(cmd, stdout, **kw):
        commands.append(cmd)
        stdout.write(f'run {len(commands)}\n')
        iters = 5 * len(commands)
        torch.save({'model': {}, 'model_args': {}, 'iter_num': iters, 'config': {'max_iters': 10}},
                   os.path.join(run_dir, 'ckpt.pt'))
        return types.SimpleNamespace(returncode=0)
    monkeypatch.setattr(subprocess, 'run', fake_run)
    run_dir = str(tmp_path / 'run')
    assert not common.finished(run_dir)
    common.run_train(run_dir, ['--max_iters=10'], init_from='base/ckpt.pt')
    assert commands[0][1:] == ['train.py', '--max_iters=10', f'--out_dir={run_dir}', '--init_from=base/ckpt.pt']
    assert not common.finished(run_dir) and common.finished(run_dir, iters=5)
    common.run_train(run_dir, ['--max_iters=10'], init_from='base/ckpt.pt')
    assert commands[1][-1] == '--init_from=resume' and common.finished(run_dir)
    with open(os.path.join(run_dir, 'train.log')) as f:
        assert f.read() == 'run 1\nrun 2\n'


def test_prepare_runs_once_and_fails_in_one_line(tmp_path):
    folder = common.prepare('copy', str(tmp_path / 'copy'), ['--length=16', '--n_train=2', '--n_val=1'])
    assert os.path.isfile(os.path.join(folder, 'meta.pkl'))
    common.prepare('copy', folder, ['--length=8'])  # prepared already: not run again (--length=8 would fail)
    with pytest.raises(SystemExit, match='^preparing .*bad failed'):
        common.prepare('copy', str(tmp_path / 'bad'), ['--length=8'])


# -----------------------------------------------------------------------------------------------------------
# Every experiment script runs end to end at a tiny size (the real runs take minutes to hours). selective_lm.py
# and selective_synthetic.py have theirs in test_selective.py, infini_recipe.py in test_infini_recipe.py.

def test_infini_passkey_trains_a_fine_tune_after_its_base_and_tests_it(tmp_path):
    from experiments import infini_passkey
    infini_passkey.main([f'--out_dir={tmp_path}', '--runs=paper_then_more', '--max_iters=2', '--n_train=8',
                         '--lengths=256,512', '--depths=0', '--trials=1', '--batch_size=1', '--all_reads_up_to=256'])
    assert common.finished(str(tmp_path / 'paper-2-s1'), 2)  # the base trained first
    text = (tmp_path / 'results.md').read_text()
    assert text.startswith('paper_then_more: two stages') and '512' in text


def test_position_cost_times_each_scheme(capsys):
    from experiments import position_cost
    position_cost.main(['--rounds=1', '--iters=1', '--schemes=learned,rope', '--block_size=16', '--batch_size=1'])
    out = capsys.readouterr().out
    assert 'learned' in out and 'rope' in out


def test_gpt2_tiny_fine_tunes_each_attention_from_a_tiny_gpt2(tmp_path):
    pytest.importorskip('safetensors')  # the Hugging Face layout (installed with transformers)
    from experiments import gpt2_tiny
    text = tmp_path / 'text.txt'
    text.write_text(''.join(f'def f{i}(x):\n    return x * {i}\n\n' for i in range(400)))
    data = tmp_path / 'data'
    common.prepare('text', str(data), [f'--input={text}', '--tokenizer=byte', '--name=tiny'])
    gpt2_tiny.main([f'--out_dir={tmp_path}', f'--data_dir={data}', '--pretrain_iters=2', '--finetune_iters=1',
                    '--eval_iters=1', '--attentions=causal,infini'])
    rows = (tmp_path / 'results.md').read_text().splitlines()
    assert [r.split(' | ')[0] for r in rows[2:]] == ['| causal', '| infini']
