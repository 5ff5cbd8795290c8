import faulthandler
import importlib.util
import os
import pickle
import signal
import sys
import threading

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. Triton reads this when a kernel is
# decorated, i.e. when kernels.py is first imported, so it must be set before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# A time limit per test, for runs where one hang must not eat the rest (gpu_check.sh sets TEST_TIMEOUT=30).
# pytest's --timeout needs a plugin; a timer thread that signals the main thread does the same: the test fails
# and the next one runs. A hang inside one C call never returns to Python to see the signal: at twice the limit
# faulthandler prints every thread's stack and ends the process, so the run at least says where it hung.
TEST_TIMEOUT = float(os.environ.get('TEST_TIMEOUT') or 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if TEST_TIMEOUT <= 0 or not hasattr(signal, 'pthread_kill'):
        return (yield)
    running = [True]

    def fail(signum, frame):
        if running[0]:
            running[0] = False
            pytest.fail(f'took longer than TEST_TIMEOUT={TEST_TIMEOUT:g} s', pytrace=False)

    previous = signal.signal(signal.SIGUSR1, fail)
    timer = threading.Timer(TEST_TIMEOUT, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(2 * TEST_TIMEOUT, exit=True)
    try:
        return (yield)
    finally:
        running[0] = False
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGUSR1, previous)


@pytest.fixture(autouse=True)
def restore_tf32():
    """train.py and bench.py turn TF32 on for the whole process: on a GPU that would change later tests' numbers.
    Restored by hand: torch 2.11's backend modules refuse monkeypatch."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ---------------------------------------------------------------------------------------------------------
# Shared by test_train.py and test_sample.py: a tiny dataset and tiny in-process training runs.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--segment_len=8', '--batch_size=2',
              '--max_iters=4', '--eval_interval=2', '--eval_iters=1', '--log_interval=1', '--warmup_iters=1',
              '--device=cpu', '--dtype=float32', '--compile=False']


def fresh_module(name):
    """A new instance of one of the repo's scripts (train, sample, tools.visualize), its flag globals at their
    defaults."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, *name.split('.')) + '.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A byte-level dataset folder (train.bin, val.bin, meta.pkl) of a few thousand tokens of repetitive code."""
    folder = tmp_path_factory.mktemp('tiny_data')
    text = ''.join(f'def f{i}(a, b):\n    return a + {i} * b\n\n' for i in range(150)).encode()
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    split = int(0.9 * len(ids))
    ids[:split].tofile(folder / 'train.bin')
    ids[split:].tofile(folder / 'val.bin')
    with open(folder / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 257, 'tokenizer': {'kind': 'byte'}, 'eot_token': 256, 'dataset': 'tiny'}, f)
    return str(folder)


@pytest.fixture
def train_tiny(tiny_data):
    """train_tiny(out_dir, *flags): train.py's main in this process on tiny_data with a tiny model."""
    def run(out_dir, *flags):
        fresh_module('train').main([f'--data_dir={tiny_data}', f'--out_dir={out_dir}', *TINY_FLAGS, *flags])
    return run
