"""gpu_check.sh, the one GPU command: its CPU dry run, and the per-test time limit its pytest step uses."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STEPS = ['check', 'kernels', 'train-causal', 'train-in', 'train-infini', 'train-selective', 'bench',
         'bench-in-long', 'bench-infini-8gb', 'pytest', 'sample', 'graph-breaks']
needs_bash = pytest.mark.skipif(shutil.which('bash') is None or shutil.which('timeout') is None
                                or shutil.which('tar') is None, reason='needs bash, timeout, tar')


def unpack(out, into):
    """The archive gpu_check.sh leaves in $OUT, unpacked into the folder `into`."""
    with tarfile.open(out / 'results.tar.gz') as archive:
        archive.extractall(into, filter='data')
    return into


def test_the_step_limits_fit_in_8_minutes():
    """The GPU machine's 15 minutes include its start and the transfers: the steps' limits (plus 2 s of grace each)
    stay under 8 minutes."""
    text = open(os.path.join(ROOT, 'gpu_check.sh')).read()
    limits = [int(n) for n in re.findall(r'^\s*step "?[\w$-]+"? (\d+) ', text, re.M)]
    train_steps = 4  # the train step stands once in a loop over the four attentions
    total = sum(limits) + (train_steps - 1) * limits[2] + 2 * len(STEPS)
    assert len(limits) == len(STEPS) - train_steps + 1 and total < 8 * 60, (limits, total)


@needs_bash
def test_tiny_dry_run_returns_every_step_in_two_files(tmp_path):
    """bash gpu_check.sh --tiny: every step runs on the CPU; $OUT holds summary.txt and results.tar.gz only (the GPU
    machine returns at most 8 files), and the archive has every step's log and table."""
    out = tmp_path / 'out'
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS='1')
    result = subprocess.run(['bash', 'gpu_check.sh', '--tiny'], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ['results.tar.gz', 'summary.txt']
    summary = (out / 'summary.txt').read_text()
    for step in STEPS:
        assert f'\n{step}: exit 0 in ' in summary, (step, summary)
    assert 'check: exit 0' in summary and '10 of 10 cases' in summary
    assert '16 cases (8 per context)' in summary and ', 2 evaluations' in summary
    assert '4 of 4 models' in summary and ' passed in ' in summary
    files = unpack(out, tmp_path / 'results')
    assert (files / 'summary.txt').read_text() == summary
    for step in STEPS:
        assert (files / f'{step}.log').exists(), step
    for table in ('check/bench_check', 'bench/bench_speed', 'bench-in-long/bench_speed',
                  'bench-infini-8gb/bench_speed'):
        assert (files / f'{table}.csv').exists() and (files / f'{table}.md').exists(), table
    assert (files / 'kernels' / 'bench_kernels.md').exists()  # on a CPU it says why the kernels are not timed
    for a in ('causal', 'in', 'infini', 'selective'):
        assert (files / f'train-{a}.csv').exists(), a
    assert not list(tmp_path.rglob('ckpt.pt'))  # checkpoints stay out of the results


@needs_bash
def test_a_killed_check_keeps_every_finished_step(tmp_path):
    """Killed during its fourth step, the check leaves the first three steps in its archive, a line saying it was
    stopped, and no step still running."""
    out, work = tmp_path / 'out', tmp_path / 'work'
    work.mkdir()  # the check's own temporary folder, so that its steps' command lines name it
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS='1', TMPDIR=str(work))
    check = subprocess.Popen(['bash', 'gpu_check.sh', '--tiny'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # summary.txt is replaced after the archive: three lines, three steps archived
            summary = (out / 'summary.txt').read_text() if (out / 'summary.txt').exists() else ''
            if '\ntrain-causal: exit ' in summary:
                break
            time.sleep(0.5)
        else:
            pytest.fail('the first three steps did not finish in 600 s')
        check.terminate()
        assert check.wait(timeout=30) == 130
    finally:
        check.kill()
    assert sorted(p.name for p in out.iterdir()) == ['results.tar.gz', 'summary.txt']
    summary = (out / 'summary.txt').read_text()
    assert 'stopped by a signal during step ' in summary
    files = unpack(out, tmp_path / 'results')
    for step in STEPS[:3]:
        assert f'\n{step}: exit 0 in ' in summary, (step, summary)
        assert (files / f'{step}.log').exists(), step
    assert (files / 'check' / 'bench_check.csv').exists() and (files / 'kernels' / 'bench_kernels.md').exists()
    time.sleep(3)  # the step that was running got the signal through timeout; give it the 2 s timeout would
    running = subprocess.run(['pgrep', '-f', str(work)], capture_output=True, text=True).stdout.split()
    assert running == [], 'a step of the killed check is still running'
    assert list(work.glob('tmp.*')) == []  # and its temporary folder (mktemp's) is gone


def test_without_a_gpu_the_check_stops_at_once_with_one_line(tmp_path):
    """bash gpu_check.sh on a machine without a GPU says so in one line, instead of running for minutes."""
    if shutil.which('bash') is None:
        pytest.skip('needs bash')
    import torch
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    result = subprocess.run(['bash', 'gpu_check.sh'], cwd=ROOT, env=dict(os.environ, OUT=str(tmp_path)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert 'no CUDA GPU' in result.stderr and not list(tmp_path.iterdir())


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


@needs_bash
def test_on_a_gpu_the_suite_starts_with_the_kernel_tests_and_keeps_every_file():
    """The GPU run's pytest step may stop at its limit: it runs the files that differ on a GPU first, the script's
    own CPU dry runs last, and every test file once (the --tiny dry run never runs this branch)."""
    text = open(os.path.join(ROOT, 'gpu_check.sh')).read()
    statement = re.search(r'^  tests="tests/test_kernels\.py.*?"$', text, re.M | re.S).group(0)
    files = subprocess.run(['bash', '-c', statement + '\necho $tests'], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert files[:2] == ['tests/test_kernels.py', 'tests/test_bench.py'] and files[-1] == 'tests/test_gpu_check.py'
    every = sorted(f'tests/{name}' for name in os.listdir(os.path.join(ROOT, 'tests'))
                   if name.startswith('test_') and name.endswith('.py'))
    assert sorted(files) == every
