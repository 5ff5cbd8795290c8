"""
What each Triton kernel of kernels.py costs a GPU, read from the compiler, with no GPU needed; every global below
is a flag:

  python tools/kernel_report.py                                  A100, RTX 30, RTX 40, H100, RTX 50; head dim 64, bf16
  python tools/kernel_report.py --archs=86,90 --head_dim=32 --dtype=float32

Triton ships NVIDIA's ptxas and cuobjdump, so the kernels compile here for any GPU. A kernel that needs more
shared memory than a GPU gives a block does not launch there ("out of resources"), and registers spilled to
local memory ("spill", bytes per thread) make it slow. This reads Triton's internals (ASTSource, GPUTarget), which
change between versions; kernels.py itself does not.
"""

import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root: this script runs as python tools/kernel_report.py
import kernels  # noqa: E402
from configurator import configure, flags_of, parse_ints  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
archs = '80,86,89,90,120'  # compute capabilities: 86 = 8.6
head_dim = 64
dtype = 'bfloat16'
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------

SHARED_MEMORY_KIB = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}  # a block's most, per arch
INTEGER_ARGS = {'H', 'T', 'N', 'Tq', 'h0', 'q_start', 'q_end', 'n_segments'}  # the kernels' integer arguments


def kernel_launches(D, arch):
    """(what, kernel, its pointers in the data dtype (the others are fp32), constexprs, launch settings), as this
    file launches them on a GPU of compute capability arch (86 = 8.6)."""
    selective = dict(BLOCK_M=kernels.BLOCK_M, BLOCK_N=kernels.selective_block_n(arch // 10), BLOCK_D=D)
    infini = dict(BLOCK_T=kernels.BLOCK_T, BLOCK_D=D)
    data, narrow, wide = 'Q K V O DO DQ'.split(), kernels.NARROW, kernels.WIDE
    launches = [('selective carry', kernels._selective_carry_kernel, data, selective, narrow),
                ('selective forward', kernels._selective_fwd_kernel, data, selective, narrow),
                ('selective backward dK dV', kernels._selective_bwd_dkdv_kernel, data, selective, wide),
                ('selective backward dQ', kernels._selective_bwd_dq_kernel, data, selective, narrow),
                ('selective backward selection', kernels._selective_bwd_selection_kernel, data, selective, wide)]
    for update in ('linear', 'delta'):
        rule = dict(infini, DELTA_RULE=update == 'delta')
        launches += [(f'infini memory forward, {update}{", saving for backward" * save}',
                      kernels._infini_memory_fwd_kernel, ['Q', 'K', 'V'], dict(rule, SAVE=save), wide)
                     for save in (False, True)]
        launches.append((f'infini memory backward, {update}', kernels._infini_memory_bwd_kernel, ['Q', 'K', 'V'], rule,
                         wide))
    return launches


def compile_kernel(fn, data, constexprs, launch, arch, dtype):
    """Compile one kernel for one compute capability: (registers, spill bytes per thread, shared memory bytes)."""
    import triton.backends.nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    pointer = {torch.bfloat16: '*bf16', torch.float16: '*fp16', torch.float32: '*fp32'}[dtype]
    signature = {a: 'constexpr' if a in constexprs else 'fp32' if a == 'scale' else 'i32' if a in INTEGER_ARGS else
                 pointer if a in data else '*fp32' for a in fn.arg_names}
    values = {(i,): constexprs[a] for i, a in enumerate(fn.arg_names) if a in constexprs}
    aligned = {(i,): [['tt.divisibility', 16]] for i, a in enumerate(fn.arg_names) if signature[a][0] == '*'}
    compiled = kernels.triton.compile(ASTSource(fn, signature, values, aligned), target=GPUTarget('cuda', arch, 32),
                              options=dict(launch))
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), 'bin', 'cuobjdump')
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'kernel.cubin')
        with open(path, 'wb') as f:
            f.write(compiled.asm['cubin'])
        usage = subprocess.run([tool, '-res-usage', path], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(':') for line in usage.splitlines() if 'REG:' in line for item in line.split())
    return int(fields['REG']), int(fields['STACK']), compiled.metadata.shared


def compiler_report(archs, head_dim=64, dtype=torch.bfloat16):
    """Every kernel compiled for every arch: {(what, arch): (registers, spill, shared bytes) or 'fails: why'}."""
    results = {}
    for arch in archs:
        for what, fn, data, constexprs, launch in kernel_launches(head_dim, arch):
            try:
                results[what, arch] = compile_kernel(fn, data, constexprs, launch, arch, dtype)
            except Exception as e:  # a compiler failure is a result: report it and go on
                results[what, arch] = f"fails: {(str(e).strip().splitlines() or [''])[-1][:80]}"
    return results


def fits(result, arch):
    """'ok', 'TOO MUCH' (more shared memory than the GPU gives a block) or the compiler's failure."""
    if isinstance(result, str):
        return result
    return 'ok' if result[2] <= SHARED_MEMORY_KIB.get(arch, 99) * 1024 else 'TOO MUCH'


def report_table(results, archs, head_dim, dtype):
    """The report as markdown: a row per kernel, a column per arch."""
    limits = ', '.join(f'sm_{arch} {SHARED_MEMORY_KIB.get(arch, 99)} KiB' for arch in archs)
    lines = [f'triton {kernels.triton.__version__}, head dim {head_dim}, {str(dtype).removeprefix("torch.")}; cells: '
             f'registers per thread, bytes per thread spilled to local memory, shared memory per block (TOO MUCH: '
             f'more than the GPU has, {limits})', '',
             '| kernel | ' + ' | '.join(f'sm_{arch}' for arch in archs) + ' |', '|' + '---:|' * (len(archs) + 1)]
    for what in dict.fromkeys(what for what, _ in results):
        cells = []
        for arch in archs:
            r, status = results[what, arch], fits(results[what, arch], arch)
            cells.append(f'{r[0]} reg, {r[1]} B spill, {r[2] / 1024:.3g} KiB' + (' TOO MUCH' if status != 'ok' else '')
                         if isinstance(r, tuple) else r)
        lines.append(f'| {what} | ' + ' | '.join(cells) + ' |')
    return lines


def main(argv):
    cfg, _ = configure(argv, FLAGS, __doc__)
    targets = parse_ints('archs', cfg.archs, '86,90')
    data_dtype = getattr(torch, cfg.dtype, None)
    if cfg.head_dim not in kernels.HEAD_DIMS or data_dtype not in kernels.DTYPES:
        raise SystemExit(f'the kernels take head dims {kernels.HEAD_DIMS} and dtypes float16, bfloat16, float32: '
                         f'got --head_dim={cfg.head_dim} --dtype={cfg.dtype}')
    if kernels.triton is None or os.environ.get('TRITON_INTERPRET') == '1':
        raise SystemExit('the report needs the Triton compiler with its CUDA backend (pip install triton, on Linux '
                         'x86_64), and TRITON_INTERPRET unset')
    print('\n'.join(report_table(compiler_report(targets, cfg.head_dim, data_dtype), targets, cfg.head_dim,
                                  data_dtype)))


if __name__ == '__main__':
    main(sys.argv[1:])
