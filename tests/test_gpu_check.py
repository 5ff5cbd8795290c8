"""gpu_check.sh, the one GPU command: its CPU dry run, and the per-test time limit its pytest step uses."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which('bash') is None or shutil.which('timeout') is None, reason='needs bash, timeout')
def test_tiny_dry_run_writes_every_step(tmp_path):
    """bash gpu_check.sh --tiny: every step runs on the CPU and leaves its log, its rows and a summary line."""
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS='1')
    result = subprocess.run(['bash', 'gpu_check.sh', '--tiny'], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (tmp_path / 'summary.txt').read_text()
    steps = ['check', 'kernels', 'train-causal', 'train-in', 'train-infini', 'train-selective', 'bench',
             'bench-in-long', 'bench-infini-8gb', 'pytest', 'sample', 'graph-breaks']
    for step in steps:
        assert f'\n{step}: exit 0 in ' in summary, (step, summary)
        assert (tmp_path / f'{step}.log').exists(), step
    assert 'check: exit 0' in summary and '10 of 10 cases' in summary
    assert '16 cases (8 per context)' in summary and ', 2 evaluations' in summary
    assert '4 of 4 models' in summary and ' passed in ' in summary
    for table in ('check/bench_check', 'bench/bench_speed', 'bench-in-long/bench_speed'):
        assert (tmp_path / f'{table}.csv').exists() and (tmp_path / f'{table}.md').exists(), table
    assert not list(tmp_path.rglob('ckpt.pt'))  # checkpoints stay out of the output folder


def test_test_timeout_fails_one_test_and_runs_the_next(tmp_path):
    """TEST_TIMEOUT (tests/conftest.py): a test past the limit fails with a clear line, the next test still runs."""
    shutil.copy(os.path.join(ROOT, 'tests', 'conftest.py'), tmp_path / 'conftest.py')
    (tmp_path / 'test_hang.py').write_text('import time\n\n\ndef test_hangs():\n    time.sleep(60)\n\n\n'
                                           'def test_after():\n    pass\n')
    env = dict(os.environ, TEST_TIMEOUT='1', OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'test_hang.py'],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert 'FAILED test_hang.py::test_hangs - Failed: took longer than TEST_TIMEOUT=1 s' in result.stdout
    assert '1 failed, 1 passed' in result.stdout
