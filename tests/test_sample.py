"""sample.py: end to end from a tiny checkpoint, prompts from files, long prompts, the selective budget flag."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, fresh_module


def sample(out_dir, *flags):
    fresh_module('sample').main([f'--ckpt={out_dir}/ckpt.pt', '--device=cpu', '--max_new_tokens=5', '--num_samples=2',
                                 *flags])


def test_command_line_with_a_file_prompt(train_tiny, tmp_path):
    train_tiny(tmp_path)
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('def f(a, b):\n')
    out = subprocess.run([sys.executable, 'sample.py', f'--ckpt={tmp_path}/ckpt.pt', f'--start=FILE:{prompt}',
                          '--max_new_tokens=5', '--num_samples=2', '--device=cpu'],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('def f(a, b):\n') == 2 and out.stdout.count('---------------') == 2


def test_long_prompt_is_cropped_with_a_note(train_tiny, tmp_path, capsys):
    train_tiny(tmp_path)
    sample(tmp_path, '--start=' + 'x' * 40)
    assert 'the prompt has 40 tokens, more than block_size=16: the model sees its last 16' in capsys.readouterr().out


def test_infini_reads_a_long_prompt_whole(train_tiny, tmp_path, capsys):
    train_tiny(tmp_path, '--attention=infini')
    sample(tmp_path, '--start=' + 'x' * 40)
    out = capsys.readouterr().out
    assert 'more than block_size' not in out and out.count('x' * 40) == 2


def test_budget_is_for_selective_only(train_tiny, tmp_path):
    train_tiny(tmp_path)
    with pytest.raises(SystemExit, match="--budget=.*: attention='causal' takes no option budget"):
        sample(tmp_path, '--budget=4')


def test_selective_budget(train_tiny, tmp_path, capsys):
    train_tiny(tmp_path, '--attention=selective')
    sample(tmp_path, '--budget=4', '--max_new_tokens=20')
    assert capsys.readouterr().out.count('---------------') == 2
    with pytest.raises(SystemExit, match='--budget is a comma-separated list of integers like 32 or .*, not .4,x.'):
        sample(tmp_path, '--budget=4,x')
    with pytest.raises(SystemExit, match='budget lists 2 values for 1 layers'):
        sample(tmp_path, '--budget=4,4')


def test_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match='no checkpoint at .*ckpt.pt'):
        sample(tmp_path)


def test_cuda_without_a_gpu_is_a_clear_error(train_tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip('a GPU is here')
    train_tiny(tmp_path)
    with pytest.raises(SystemExit, match='--device=cuda but torch sees no CUDA GPU; use --device=cpu'):
        sample(tmp_path, '--device=cuda')


def test_temperature_zero_is_greedy(train_tiny, tmp_path, capsys):
    """Greedy decoding draws nothing at random: every sample is the same text."""
    train_tiny(tmp_path)
    capsys.readouterr()  # the training run's output
    sample(tmp_path, '--temperature=0', '--start=def ', '--num_samples=3')
    samples = [s.strip() for s in capsys.readouterr().out.split('---------------')[:3]]
    assert samples[0] == samples[1] == samples[2]


@pytest.mark.parametrize('flag', ['--top_k=-3', '--temperature=-1', '--temperature=nan', '--seed=-1',
                                  '--device=mps', '--device=foo'])
def test_bad_sampling_settings_are_one_line(train_tiny, tmp_path, flag):
    train_tiny(tmp_path)
    with pytest.raises(SystemExit, match=r'must be .*>= 0|--device=(mps|foo)'):
        sample(tmp_path, flag)


def test_checkpoint_without_a_tokenizer(train_tiny, tmp_path):
    train_tiny(tmp_path)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    del ckpt['tokenizer']
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match='records no tokenizer'):
        sample(tmp_path)


def test_a_checkpoint_with_nan_weights_is_one_line(train_tiny, tmp_path):
    """A checkpoint written by a diverged run (before train.py stopped such runs) cannot sample: one line."""
    train_tiny(tmp_path)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ckpt['model']['lm_head.weight'][0, 0] = float('nan')
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match='holds NaN or infinite weights'):
        sample(tmp_path)
