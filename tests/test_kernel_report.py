"""kernel_report.py: the kernels of kernels.py compiled for GPUs, no GPU needed."""
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip('triton')
from tools import kernel_report  # noqa: E402
import kernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report_rows(stdout):
    """{kernel: [cell per arch]} from the report's markdown table."""
    rows = [line.strip('|').split(' | ') for line in stdout.splitlines() if line.startswith('| ')]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_report_compiles_every_kernel_for_gaming_and_datacenter_gpus():
    """Each kernel compiles for an RTX 30 (sm_86) and an H100 (sm_90), fitting their shared memory."""
    pytest.importorskip('triton.backends.nvidia')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}  # conftest sets it without a GPU
    result = subprocess.run([sys.executable, 'tools/kernel_report.py', '--archs=86,90'], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = report_rows(result.stdout)
    assert len(rows) == 11 and '| kernel | sm_86 | sm_90 |' in result.stdout
    for kernel, cells in rows.items():
        for cell in cells:
            registers = re.fullmatch(r'(\d+) reg, \d+ B spill, [\d.]+ KiB', cell)
            assert registers and int(registers.group(1)) <= 255, (kernel, cell)


def test_report_marks_what_does_not_fit_or_fails(monkeypatch):
    def fake_compile(fn, data, constexprs, launch, arch, dtype):
        if fn is kernels._infini_memory_bwd_kernel:
            raise RuntimeError('PassManager::run failed')
        return 100, 0, (120 if fn is kernels._selective_fwd_kernel else 10) * 1024  # 120 KiB: not on sm_86

    monkeypatch.setattr(kernel_report, 'compile_kernel', fake_compile)
    results = kernel_report.compiler_report([86, 90])
    status = {(what, arch): kernel_report.fits(r, arch) for (what, arch), r in results.items()}
    assert status['selective forward', 86] == 'TOO MUCH' and status['selective forward', 90] == 'ok'
    assert status['infini memory backward, delta', 90] == 'fails: PassManager::run failed'
    assert status['selective carry', 86] == status['infini memory forward, linear', 90] == 'ok'
    rows = report_rows('\n'.join(kernel_report.report_table(results, [86, 90], 64, torch.bfloat16)))
    assert rows['selective forward'] == ['100 reg, 0 B spill, 120 KiB TOO MUCH', '100 reg, 0 B spill, 120 KiB']


@pytest.mark.parametrize('argv, message', [
    (['--arch=86'], "unknown flag --arch; --help lists the flags"),
    (['--archs=sm86'], '--archs is a comma-separated list of integers like 86,90'),
    (['--head_dim=128'], 'the kernels take head dims (16, 32, 64)'),
])
def test_report_flags_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        kernel_report.main(argv)
