"""runs.py and curves.py: train.py's log.csv (rows, resume, fine-tune, kills), Weights & Biases offline, curves."""
import importlib.util
import os
import socket
import subprocess
import sys
import threading

import pytest

from tools import curves
import runs
from conftest import ROOT, TINY_FLAGS, fresh_module

MACHINE = ['--device=cpu', '--dtype=float32', '--compile=False']


def rows_of(out_dir):
    return runs.read_log(str(out_dir))


def evals(rows):
    return [r for r in rows if r['val_loss'] is not None]


def test_train_writes_a_row_per_log_interval_and_per_eval(train_tiny, tmp_path):
    train_tiny(tmp_path, '--attention=causal')  # 4 iterations, log every 1, eval every 2
    with open(tmp_path / 'log.csv') as f:
        header = f.readline().strip().split(',')
    assert header == list(runs.COLUMNS)  # causal reports nothing of its own
    rows = rows_of(tmp_path)
    assert [r['iter'] for r in rows if r['loss'] is not None] == [1, 2, 3, 4]
    assert [r['iter'] for r in evals(rows)] == [0, 2, 4]
    tokens_per_iter = 2 * 16  # batch_size x block_size of TINY_FLAGS
    assert all(r['tokens'] == r['iter'] * tokens_per_iter for r in rows)
    assert all(r['tokens_per_s'] > 0 and r['lr'] > 0 and r['mfu'] is None for r in rows if r['loss'] is not None)
    assert all(r['train_loss'] > 0 for r in evals(rows))
    times = [r['time_s'] for r in rows]
    assert times == sorted(times)


@pytest.mark.parametrize('attention, names', [('infini', ['L0.gate0', 'L0.gate1']),
                                              ('selective', ['L0.masked', 'L0.visible'])])
def test_each_attention_logs_what_it_reports(train_tiny, tmp_path, attention, names):
    train_tiny(tmp_path, f'--attention={attention}')
    rows = rows_of(tmp_path)
    assert list(rows[0])[len(runs.COLUMNS):] == names  # one layer of two heads
    for row in evals(rows):
        assert all(row[name] is not None for name in names)
    if attention == 'infini':
        assert all(0 < rows[-1][name] < 1 for name in names)  # gates are sigmoids
    else:
        assert 0 <= rows[-1]['L0.masked'] <= 1 and 1 <= rows[-1]['L0.visible'] <= 16


def test_resume_continues_the_file_without_repeating_rows(train_tiny, tmp_path):
    """A run stopped after its checkpoint at 2 (and killed at 3, mid-line) and resumed to 4 logs what one run of 4
    iterations logs: the same rows, the same numbers."""
    train_tiny(tmp_path / 'straight', '--lr_decay_iters=4')
    train_tiny(tmp_path / 'halves', '--lr_decay_iters=4', '--max_iters=2')
    with open(tmp_path / 'halves' / 'log.csv', 'a') as f:
        f.write('3,96,9.9,0.001,5.0,100,,,\n3,96')  # a row past the checkpoint, and a line cut off by a kill
    fresh_module('train').main([f'--out_dir={tmp_path / "halves"}', '--init_from=resume', '--max_iters=4', *MACHINE])
    drop = ('time_s', 'tokens_per_s')  # the clock differs
    straight, halves = ([{k: v for k, v in r.items() if k not in drop} for r in rows_of(tmp_path / run)]
                        for run in ('straight', 'halves'))
    assert halves == straight
    assert rows_of(tmp_path / 'halves')[-1]['time_s'] >= rows_of(tmp_path / 'halves')[2]['time_s']


def test_fine_tune_and_a_new_run_start_their_own_file(train_tiny, tmp_path):
    train_tiny(tmp_path / 'base')
    train_tiny(tmp_path / 'tuned', f'--init_from={tmp_path / "base" / "ckpt.pt"}', '--max_iters=2')
    assert [r['iter'] for r in evals(rows_of(tmp_path / 'tuned'))] == [0, 2]
    train_tiny(tmp_path / 'base', '--max_iters=2', '--overwrite=True')  # from scratch again in the same out_dir
    assert [r['iter'] for r in evals(rows_of(tmp_path / 'base'))] == [0, 2]


def test_eval_only_leaves_the_log(train_tiny, tmp_path):
    train_tiny(tmp_path)
    before = (tmp_path / 'log.csv').read_text()
    train_tiny(tmp_path, '--init_from=resume', '--eval_only=True')
    assert (tmp_path / 'log.csv').read_text() == before


def test_read_log_skips_a_cut_off_line_and_names_what_is_missing(tmp_path):
    (tmp_path / 'log.csv').write_text('iter,val_loss\n0,5.5\n10,4.')
    assert runs.read_log(str(tmp_path)) == [{'iter': 0.0, 'val_loss': 5.5}]
    with pytest.raises(SystemExit, match='train.py writes it'):
        runs.read_log(str(tmp_path / 'nothing'))
    (tmp_path / 'bad.csv').write_text('iter,val_loss\n0,abc\n')
    with pytest.raises(SystemExit, match='not a train.py log'):
        runs.read_log(str(tmp_path / 'bad.csv'))


# ---------------------------------------------------------------------------------------------------------
# Weights & Biases

def test_wandb_missing_is_a_one_line_error(train_tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb fails, as when it is not installed
    with pytest.raises(SystemExit, match='needs wandb: pip install wandb'):
        train_tiny(tmp_path, '--wandb_log=True')


class Listener:
    """A local TCP port that counts the connections made to it: wandb's server and proxy point here."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.url = f'http://127.0.0.1:{self.sock.getsockname()[1]}'
        self.connections, self.running = 0, True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.mark.skipif(importlib.util.find_spec('wandb') is None, reason='wandb is not installed (it is optional)')
def test_wandb_offline_logs_the_same_numbers_without_the_network(tiny_data, tmp_path):
    listener = Listener()
    env = dict(os.environ, WANDB_MODE='offline', WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / 'config'),
               WANDB_CACHE_DIR=str(tmp_path / 'cache'), WANDB_DATA_DIR=str(tmp_path / 'data'), WANDB_SILENT='true',
               WANDB_BASE_URL=listener.url, HTTP_PROXY=listener.url, HTTPS_PROXY=listener.url, OMP_NUM_THREADS='1')
    env.pop('WANDB_API_KEY', None)
    try:
        out = subprocess.run([sys.executable, 'train.py', f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "out"}',
                              *TINY_FLAGS, '--wandb_log=True', '--wandb_project=test', '--wandb_run_name=tiny'],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        listener.close()
    assert out.returncode == 0, out.stderr[-2000:]
    assert listener.connections == 0, 'wandb tried the network in offline mode'
    runs = [d for d in os.listdir(tmp_path / 'wandb') if d.startswith('offline-run-')]
    assert len(runs) == 1
    folder = tmp_path / 'wandb' / runs[0]
    record = b''.join(p.read_bytes() for p in folder.iterdir() if p.suffix == '.wandb')
    assert b'val_loss' in record and b'tokens_per_s' in record  # the log's columns
    assert os.path.isfile(tmp_path / 'out' / 'log.csv')  # and the log is written as always


# ---------------------------------------------------------------------------------------------------------
# curves.py

def test_curves_draw_several_runs(train_tiny, tmp_path, capsys):
    train_tiny(tmp_path / 'out-a')
    train_tiny(tmp_path / 'out-b', '--attention=infini')
    png = tmp_path / 'curves.png'
    curves.main([f'--runs={tmp_path / "out-a"},{tmp_path / "out-b"}', f'--out={png}', '--ymax=6'])
    text = capsys.readouterr().out
    assert '| iter | out-a | out-b |' in text and '| 4 |' in text
    if importlib.util.find_spec('matplotlib') is not None:
        assert png.read_bytes()[:4] == b'\x89PNG'
    curves.main([f'--runs={tmp_path / "out-b"}', '--y=L0.gate1', '--x=tokens', '--out='])
    assert '| tokens | out-b |' in capsys.readouterr().out


def test_curves_without_matplotlib_print_the_table(train_tiny, tmp_path, capsys, monkeypatch):
    train_tiny(tmp_path / 'out-a')
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    curves.main([f'--runs={tmp_path / "out-a"}', f'--out={tmp_path / "c.png"}'])
    assert 'matplotlib is not installed' in capsys.readouterr().out
    assert not (tmp_path / 'c.png').exists()


def test_curves_errors(train_tiny, tmp_path):
    train_tiny(tmp_path / 'out-a')
    with pytest.raises(SystemExit, match="no column 'L0.gate0'"):
        curves.main([f'--runs={tmp_path / "out-a"}', '--y=L0.gate0'])
    with pytest.raises(SystemExit, match='no .*log.csv'):
        curves.main([f'--runs={tmp_path / "missing"}'])
    with pytest.raises(SystemExit, match='comma-separated list'):
        curves.main(['--runs='])
