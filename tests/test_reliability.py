"""No traceback and no lost work: Ctrl-C, a full disk, odd config files and numbers end with one line, and a failed
write keeps the last checkpoint."""
import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import configurator
import devices
from checkpoints import save_checkpoint
from conftest import ROOT, TINY_FLAGS, fresh_module
from runs import RunLog
from tools import curves, evaluate


def test_ctrl_c_and_a_full_disk_are_one_line():
    def interrupted(argv):
        raise KeyboardInterrupt

    def full(argv):
        raise OSError(errno.ENOSPC, 'No space left on device', 'out/bench_speed.csv')
    with pytest.raises(SystemExit, match='^interrupted$'):
        devices.run_script(interrupted, [])
    with pytest.raises(SystemExit, match=re.escape('cannot go on: No space left on device (out/bench_speed.csv)')):
        devices.run_script(full, [])


@pytest.mark.parametrize('script', ['sample.py', 'bench.py', 'tools/evaluate.py', 'tools/visualize.py',
                                    'tools/curves.py'])
def test_every_script_runs_its_main_through_run_script(script):
    text = open(os.path.join(ROOT, script)).read()
    assert text.rstrip().endswith("if __name__ == '__main__':\n    run_script(main, sys.argv[1:])")


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'bench.py', 'tools/evaluate.py', 'tools/visualize.py'])
def test_every_script_that_loads_torch_takes_ctrl_c_before_it_does(script):
    text = open(os.path.join(ROOT, script)).read()
    assert text.index('signal.signal(signal.SIGINT') < text.index('import torch')


@pytest.mark.parametrize('moment', ['while torch loads', 'while it trains'])
def test_ctrl_c_at_any_moment_of_a_training_run_is_one_line(tmp_path, tiny_data, moment):
    proc = subprocess.Popen([sys.executable, 'train.py', f'--data_dir={tiny_data}', f'--out_dir={tmp_path}',
                             *TINY_FLAGS, '--max_iters=100000'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if moment == 'while torch loads':
        time.sleep(0.3)  # torch takes a second or more to load
    else:
        for line in proc.stdout:  # until the second evaluation: training runs
            if line.startswith('step 2:'):
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and 'Traceback' not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith('interrupted while starting' if moment == 'while torch loads' else 'interrupted: the last')


def test_a_checkpoint_write_that_fails_keeps_the_last_one(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'iter_num': 1}, path)
    before = open(path, 'rb').read()

    def full_disk(obj, f):  # torch.save's zip writer reports a full disk as a RuntimeError, after a partial write
        f.write(b'x' * 100)
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 193216 vs 193108')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit, match=r'^cannot write .*ckpt.pt \(\[enforce fail.*\); the checkpoint there before'):
        save_checkpoint({'iter_num': 2}, path)
    assert open(path, 'rb').read() == before and not os.path.exists(path + '.tmp')


def test_a_log_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'replace', full_disk)
    with pytest.raises(SystemExit, match=r'^cannot write .*log.csv \(No space left on device\)$'):
        RunLog(str(tmp_path))
    assert not os.path.exists(tmp_path / 'log.csv.tmp')


def test_a_config_file_applies_before_the_flags_wherever_it_stands(tmp_path):
    (tmp_path / 'order.py').write_text("max_iters = 4\nout_dir = 'from-the-file'\n")
    (tmp_path / 'exit.py').write_text("import sys\nsys.exit(0)\n")
    cfg, _ = configurator.configure(['--out_dir=from-the-flag', str(tmp_path / 'order.py')],
                                    {'max_iters': 1, 'out_dir': 'out'})
    assert cfg.out_dir == 'from-the-flag' and cfg.max_iters == 4
    with pytest.raises(SystemExit, match=r'exit.py calls exit\(\); a file of flags only assigns values'):
        configurator.configure([str(tmp_path / 'exit.py')], {'max_iters': 1})


@pytest.mark.parametrize('flags, message', [
    (['--max_iters=10', '--warmup_iters=20'], '--max_iters=10 is not longer than --warmup_iters=20: the whole run'),
    (['--seed=99999999999999999999'], 'must be >= 0 and below 2**63'),
    (['--vocab_size=100000000'], 'token ids are stored as uint16, so at most 65536'),
])
def test_settings_that_would_train_wrongly_are_one_line(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        fresh_module('train').main([*TINY_FLAGS, f'--out_dir={tmp_path}', *flags])


@pytest.mark.parametrize('value', ['nan', 'inf'])
def test_bench_and_curves_refuse_numbers_that_are_not_finite(tmp_path, value):
    with pytest.raises(SystemExit, match='--case_seconds is a time limit'):
        bench.setup([f'--case_seconds={value}', f'--out_dir={tmp_path}'])
    with pytest.raises(SystemExit, match=f'--ymax={value}: the top of the y axis'):
        curves.main(['--runs=out', f'--ymax={value}'])


def test_evaluate_says_when_there_is_nothing_to_do(tmp_path):
    from test_evaluate import make_checkpoint, tiny_dataset
    data, ckpt = tiny_dataset(tmp_path / 'data', 4096), make_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'), 'causal', 64)
    common = ['--device=cpu', f'--data_dir={data}', f'--ckpt={ckpt}', '--eval_windows=1', f'--out_dir={tmp_path}']
    with pytest.raises(SystemExit, match='^nothing to evaluate'):
        evaluate.main([*common, '--loss=False'])
    with pytest.raises(SystemExit, match='^--scored=-1: the scored targets'):
        evaluate.main([*common, '--scored=-1', '--contexts=32'])


def test_a_meta_pkl_that_would_run_code_is_refused(tmp_path, capsys):
    import pickle

    from data.common import load_meta

    class Evil:
        def __reduce__(self):
            return (print, ('PICKLE CODE RAN',))
    (tmp_path / 'meta.pkl').write_bytes(pickle.dumps({'vocab_size': 257, 'tokenizer': {'kind': 'byte'}, 'x': Evil()}))
    with pytest.raises(SystemExit, match=r"meta.pkl is not plain data \(it names builtins.print\)"):
        load_meta(str(tmp_path))
    assert 'PICKLE CODE RAN' not in capsys.readouterr().out
    (tmp_path / 'meta.pkl').write_bytes(pickle.dumps({'vocab_size': 65, 'tokenizer': {'kind': 'char', 'chars': 'ab'}}))
    assert load_meta(str(tmp_path))['vocab_size'] == 65  # plain data reads as before


def test_people_from_nanogpt_are_told_the_flag(tmp_path):
    with pytest.raises(SystemExit, match=re.escape(f"sample.py reads a checkpoint file: --ckpt={tmp_path}/ckpt.pt")):
        fresh_module('sample').main([f'--out_dir={tmp_path}'])


def test_offline_gpt2_tokens_say_how_to_supply_them(monkeypatch):
    import tiktoken

    from data import tokenizers

    def offline(name):
        raise ConnectionError('no network')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(SystemExit, match='TIKTOKEN_CACHE_DIR.*use a model trained on byte or char data'):
        tokenizers.tokenizer_from_meta({'tokenizer': {'kind': 'tiktoken', 'name': 'gpt2'}})


def test_curves_refuse_what_would_draw_wrongly(train_tiny, tmp_path):
    for run in ('a/out', 'b/out'):
        train_tiny(tmp_path / run)
    with pytest.raises(SystemExit, match=r'--ymax=1 is below every val_loss of these runs'):
        curves.main([f'--runs={tmp_path / "a" / "out"}', '--ymax=1', '--out='])
    both = curves.load_curves([str(tmp_path / 'a' / 'out'), str(tmp_path / 'b' / 'out')], 'iter', 'val_loss')
    assert len(both) == 2  # two folders with the same last name stay two runs
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'log.csv').write_bytes(b'iter,val_loss\n1,2\n\xff\xfe\x00\x01\n')
    with pytest.raises(SystemExit, match='log.csv is not a train.py log'):
        curves.main([f'--runs={tmp_path / "c"}', '--out='])


def test_evaluate_does_not_put_two_tokenizers_in_one_table(tmp_path):
    from test_evaluate import make_checkpoint, tiny_dataset
    data = tiny_dataset(tmp_path / 'data', 4096)
    byte = make_checkpoint(str(tmp_path / 'byte' / 'ckpt.pt'), 'causal', 64)
    char = make_checkpoint(str(tmp_path / 'char' / 'ckpt.pt'), 'causal', 64)
    checkpoint = torch.load(char, weights_only=True)
    torch.save({**checkpoint, 'tokenizer': {'kind': 'char', 'chars': 'abc'}}, char)
    # the char checkpoint does not fit the byte data: refused before any table (N-e02 names the pairing)
    with pytest.raises(SystemExit, match='holds byte tokens; the checkpoint was trained on another vocabulary'):
        evaluate.main(['--device=cpu', f'--data_dir={data}', f'--ckpt={byte},{char}', '--eval_windows=1',
                       f'--out_dir={tmp_path}'])


@pytest.mark.parametrize('change', ['model of ints', 'unknown model field'])
def test_odd_checkpoints_are_one_line_in_every_reader(tmp_path, change):
    from test_evaluate import make_checkpoint
    path = make_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'), 'causal', 64)
    checkpoint = torch.load(path, weights_only=True)
    if change == 'model of ints':
        checkpoint['model'] = {'a': 1}
    else:
        checkpoint['model_args']['foo'] = 1
    torch.save(checkpoint, path)
    for script in ('sample', 'tools.visualize'):
        with pytest.raises(SystemExit) as e:
            fresh_module(script).main([f'--ckpt={path}', '--device=cpu', '--max_new_tokens=2'])
        assert 'ckpt.pt' in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_broken_gpt2_folders_are_one_line(tmp_path):
    import json

    from tools import gpt2
    config = {'model_type': 'gpt2', 'n_layer': 1, 'n_head': 2, 'n_embd': 8, 'n_positions': 8, 'vocab_size': 10,
              'activation_function': 'gelu_new'}
    cases = {'cut': '{"model_type": "gp', 'nolayer': json.dumps({k: v for k, v in config.items() if k != 'n_layer'}),
             'strlayer': json.dumps({**config, 'n_layer': '1'})}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / 'config.json').write_text(text)
        with pytest.raises(SystemExit, match=f'{name}/config.json (is not readable JSON|has no whole number)'):
            gpt2.gpt2_checkpoint(str(tmp_path / name))
    pytest.importorskip('safetensors')
    (tmp_path / 'emptyst').mkdir()
    (tmp_path / 'emptyst' / 'config.json').write_text(json.dumps(config))
    (tmp_path / 'emptyst' / 'model.safetensors').write_bytes(b'')
    with pytest.raises(SystemExit, match='model.safetensors is not a readable safetensors file'):
        gpt2.gpt2_checkpoint(str(tmp_path / 'emptyst'))


def test_bench_does_not_start_a_case_it_cannot_stop(tmp_path):
    """A signal cannot stop one long kernel call: a case whose FLOPs alone would outlast --case_seconds is not run."""
    settings = bench.setup(['--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=32', '--vocab_size=257',
                            '--decode_tokens=4', '--warmup=0', '--repeats=1', '--contexts=1M', '--attentions=causal',
                            '--case_seconds=10', f'--out_dir={tmp_path}'])
    results, messages = bench.run_speed(['causal'], [2 ** 20], settings)
    assert results['causal', 'inference', 2 ** 20] == 'slow'
    assert 'not started: it would take over' in messages['causal inference', 'slow']


def test_misleading_inputs_get_lines_that_name_the_fix(tmp_path, train_tiny):
    from data.tokenizers import ByteTokenizer, encode_prompt
    from sample import check_sampling
    with pytest.raises(SystemExit, match='too small to sample with; 0 takes the likeliest token'):
        check_sampling(1e-45, 200, 10)
    with pytest.raises(SystemExit, match='--start holds bytes that are not UTF-8 text'):
        encode_prompt('\udcff\udcfehello', ByteTokenizer())
    with pytest.raises(SystemExit, match='--data_dir=.*README.md is a file, not the folder of a prepared dataset'):
        fresh_module('train').main([*TINY_FLAGS, f'--data_dir={os.path.join(ROOT, "README.md")}',
                                    f'--out_dir={tmp_path / "run"}'])
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'log.csv').write_text('iter,val_loss\n')
    with pytest.raises(SystemExit, match='log.csv has no rows yet'):
        curves.main([f'--runs={tmp_path / "empty"}', '--out='])


def test_resuming_a_run_that_was_all_warm_up_is_one_line(train_tiny, tmp_path):
    train_tiny(tmp_path, '--max_iters=4', '--warmup_iters=2')
    checkpoint = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    checkpoint['config']['warmup_iters'] = 4  # as a run from before the rule against all-warm-up runs
    torch.save(checkpoint, tmp_path / 'ckpt.pt')
    resume = [f'--out_dir={tmp_path}', '--init_from=resume', '--max_iters=8', '--device=cpu', '--dtype=float32',
              '--compile=False']  # the run's own settings come back from its checkpoint
    with pytest.raises(SystemExit, match='inside the warm-up of 4: the learning rate would drop to --min_lr'):
        fresh_module('train').main(resume)
    fresh_module('train').main([*resume, '--lr_decay_iters=8'])  # the fix it names works


def test_a_character_vocabulary_past_uint16_is_one_line():
    from data.tokenizers import CharTokenizer
    with pytest.raises(SystemExit, match='70,000 distinct characters, more than a character-level vocabulary'):
        CharTokenizer(''.join(chr(0x4E00 + i) for i in range(70000)))


def test_a_flag_of_another_attention_is_noted(train_tiny, tmp_path, capsys):
    train_tiny(tmp_path, '--attention=causal', '--memory_read=off')
    out = capsys.readouterr().out
    assert 'note: --memory_read, --segment_len only change attention=infini; attention=causal ignores them' in out


def test_a_resumed_runs_first_log_row_has_the_rate_its_step_used(train_tiny, tmp_path):
    from runs import read_log
    train_tiny(tmp_path / 'run', '--lr_decay_iters=4', '--max_iters=2')
    before = [r for r in read_log(tmp_path / 'run') if r['iter'] == 2 and r.get('val_loss') is not None][0]['lr']
    train_tiny(tmp_path / 'run', '--init_from=resume', '--max_iters=4', '--learning_rate=0.01')
    rows = [r for r in read_log(tmp_path / 'run') if r['iter'] == 2 and r.get('val_loss') is not None]
    assert len(rows) == 1 and rows[0]['lr'] == before  # not 0.01's schedule: step 1 ran on the old one


def test_evaluate_does_not_start_a_case_it_cannot_stop(tmp_path):
    import csv
    from test_evaluate import make_checkpoint, tiny_dataset
    data, ckpt = tiny_dataset(tmp_path / 'data', 4096), make_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'), 'causal', 64)
    evaluate.main(['--device=cpu', f'--data_dir={data}', f'--ckpt={ckpt}', '--eval_windows=1', '--extend=True',
                   '--contexts=64,4M', '--case_seconds=10', f'--out_dir={tmp_path}'])
    rows = list(csv.DictReader(open(tmp_path / 'val_loss.csv')))
    assert [r['status'] for r in rows] == ['ok', 'slow'] and 'not started' in rows[1]['message']
    with pytest.raises(SystemExit, match='--case_seconds is a time limit'):
        evaluate.main(['--device=cpu', f'--ckpt={ckpt}', '--case_seconds=nan', f'--out_dir={tmp_path}'])


def test_help_into_a_pipe_that_closes_is_quiet():
    import shutil
    import subprocess
    import sys
    if shutil.which('bash') is None or shutil.which('head') is None:
        pytest.skip('needs bash and head')
    for _ in range(3):  # the pipe closes at a moment that varies: try a few
        result = subprocess.run(['bash', '-c', f'{sys.executable} train.py --help | head -1'], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.stdout.startswith('Train a GPT') and 'Error' not in result.stderr, result.stderr


def test_preparing_over_another_dataset_says_so(tmp_path, capsys):
    import numpy as np

    from data.tokenizers import ByteTokenizer
    from data.writing import write_dataset
    ids = np.arange(100) % 256
    write_dataset(str(tmp_path), ids, ids, ByteTokenizer(), 'first')
    write_dataset(str(tmp_path), ids, ids, ByteTokenizer(), 'first')  # the same again: nothing to tell
    assert 'note:' not in capsys.readouterr().out
    write_dataset(str(tmp_path), ids[:50], ids, ByteTokenizer(), 'second')
    assert 'note: this replaced another dataset' in capsys.readouterr().out


def test_a_nanogpt_meta_pkl_is_named(tmp_path):
    import pickle

    from data.common import load_meta
    (tmp_path / 'meta.pkl').write_bytes(pickle.dumps({'vocab_size': 65, 'itos': {0: 'a'}, 'stoi': {'a': 0}}))
    with pytest.raises(SystemExit, match="is nanoGPT's .*data/text/prepare.py --tokenizer=char"):
        load_meta(str(tmp_path))


def test_tokenizer_mismatches_name_what_differs(tmp_path, train_tiny, tiny_data):
    """N-v14: a prompt a character vocabulary cannot encode names --start, given or default. N-d08s: a checkpoint
    of a tokenizer this repository cannot rebuild says so, not "was it written by train.py?". N-e02: evaluating a
    checkpoint on data of another tokenizer blames the pairing, not the data."""
    from data.tokenizers import CharTokenizer, checkpoint_tokenizer, encode_prompt
    from tools.evaluate import load_val_data
    with pytest.raises(SystemExit, match='--start: character \'"\' is not in .* give a --start made of'):
        encode_prompt('a"', CharTokenizer('ab'))
    with pytest.raises(SystemExit, match="trained on tokens of {'kind': 'sentencepiece'}, a tokenizer this repo"):
        checkpoint_tokenizer({'tokenizer': {'kind': 'sentencepiece'}}, 'ckpt.pt')
    with pytest.raises(SystemExit, match='records no tokenizer'):
        checkpoint_tokenizer({}, 'ckpt.pt')
    train_tiny(tmp_path)  # on byte-level data
    checkpoint = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    checkpoint['tokenizer'] = {'kind': 'char', 'chars': 'abc'}
    with pytest.raises(SystemExit, match='holds byte tokens; the checkpoint was trained on another vocabulary'):
        load_val_data(checkpoint, str(tiny_data))
