"""
What the experiment scripts share: they prepare their data and train their runs with the repository's own scripts,
in a subprocess, one at a time, and know a finished run by its checkpoint.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoints import load_checkpoint  # noqa: E402


def prepare(dataset, folder, flags):
    """python data/<dataset>/prepare.py FLAGS --out_dir=folder, unless folder holds a prepared dataset (a meta.pkl:
    prepare.py writes it last). Returns folder."""
    if not os.path.isfile(os.path.join(folder, 'meta.pkl')):
        cmd = [sys.executable, os.path.join(ROOT, 'data', dataset, 'prepare.py'), *flags, f'--out_dir={folder}']
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f'preparing {folder} failed (see above)')
    return folder


def finished(run_dir, iters=None):
    """True when run_dir/ckpt.pt has trained iters iterations (default: the --max_iters it was trained with)."""
    path = os.path.join(run_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        return False
    checkpoint = load_checkpoint(path)
    goal = iters if iters is not None else checkpoint.get('config', {}).get('max_iters', 0)
    return checkpoint.get('iter_num', 0) >= goal


def run_train(run_dir, flags, init_from=None):
    """Train one run: python train.py FLAGS --out_dir=run_dir, from the repository root. A run_dir that holds a
    checkpoint resumes (a run stopped before its end continues); a new run starts from init_from when given (a
    checkpoint to fine-tune). The printout is appended to run_dir/train.log (log.csv has the numbers and times); a
    failure stops the experiment with one line naming the log."""
    os.makedirs(run_dir, exist_ok=True)
    resume = os.path.isfile(os.path.join(run_dir, 'ckpt.pt'))
    start = ['--init_from=resume'] if resume else [f'--init_from={init_from}'] if init_from else []
    cmd = [sys.executable, 'train.py', *flags, f'--out_dir={run_dir}', *start]
    print(' '.join(cmd[1:]), flush=True)
    log = os.path.join(run_dir, 'train.log')
    with open(log, 'a') as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f'training {run_dir} failed, see {log}')
