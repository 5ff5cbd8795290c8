#!/usr/bin/env bash
# The whole GPU check in one command: tests, kernel timings, training, the bench and sampling, most important
# first. Its time limits add up to 9 minutes, for an H100 or H200. Each step has its own time limit, and everything is
# written to the output folder as it runs, so a step that times out still leaves what came before.
#
#   bash gpu_check.sh                 # on a GPU; results in gpu_check_out/ (or in $OUT when it is set)
#   bash gpu_check.sh --tiny          # the same steps with tiny sizes on a CPU, to check the script itself
#
# The output folder gets at most 8 files: summary.txt (machine, versions, each step's time and exit code),
# pytest.txt, kernels.md, train.txt, bench.md, bench_8gb.md, bench.png and sample.txt.
set -u
cd "$(dirname "$0")"
out=${OUT:-gpu_check_out}
mkdir -p "$out"
work=$(mktemp -d)  # checkpoints and the bench's CSVs stay out of the output folder
export PYTHONUNBUFFERED=1

tiny=0
[ "${1:-}" = "--tiny" ] && tiny=1
if [ $tiny = 1 ]; then
  model="--device=cpu --n_layer=2 --n_head=2 --n_embd=32"
  kernels_args="--device=cpu --n_head=2 --contexts=64,128 --batches=1"
  train_args="--device=cpu --compile=False --n_layer=2 --n_head=2 --n_embd=32 --block_size=64 --batch_size=4"
  bench_args="--contexts=128,256 --decode_tokens=4 --vocab_size=257"
  iters=20
  tests="tests/test_model.py"  # the whole suite is the last step's business on a CPU: keep the dry run short
else
  model=""
  kernels_args="--batches=1,8 --contexts=1k,4k,16k,64k --case_seconds=20"
  train_args=""
  bench_args="--contexts=1k,4k,16k,64k,256k,1M --case_seconds=20"
  iters=100
  tests=""
fi

summary="$out/summary.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  python -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
} > "$summary" 2>&1

step() {  # step NAME SECONDS LOGFILE COMMAND...: run with a time limit, tee the output, note the time and code
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local code=${PIPESTATUS[0]}
  echo "$name: exit $code in $((SECONDS - start)) s$([ "$code" = 124 ] && echo ' (timed out)')" | tee -a "$summary"
  [ "$code" = 0 ] || tail -n 15 "$log" | sed 's/^/    /' >> "$summary"  # why it failed, next to the step
}

# 1. the test suite, natively: kernel tests in bf16, fp16, fp32; the CUDA out-of-memory test
step pytest 120 "$out/pytest.txt" python -m pytest -q -x $tests

# 2. the kernels against their references and SDPA: forward and forward+backward, TFLOP/s, peak memory
step kernels 75 "$work/kernels.log" python bench.py --mode=kernels $kernels_args --out_dir="$work/kernels"
cat "$work"/kernels/*.md > "$out/kernels.md" 2>/dev/null

# 3. training with the GPU defaults (bf16, compile) for each attention: tokens/s, MFU, the loss falls; then the
#    graph breaks torch.compile finds in each model
for a in causal in infini selective; do
  step "train $a" 45 "$out/train.txt" python train.py --attention=$a --max_iters=$iters --eval_interval=$iters \
    --eval_iters=5 --log_interval=10 --out_dir="$work/train-$a" $train_args
  # tqdm's bar hides the last step's numbers from a log: its log.csv has them (tokens/s, MFU, val loss)
  { echo "$a: the last rows of log.csv"; head -n 1 "$work/train-$a/log.csv"; tail -n 3 "$work/train-$a/log.csv"; } \
    >> "$out/train.txt" 2>&1
done
step "graph breaks" 30 "$out/train.txt" python -c "
import torch, torch._dynamo
from model import GPT, GPTConfig
device = 'cuda' if torch.cuda.is_available() else 'cpu'
for a in ('causal', 'in', 'infini', 'selective'):
    model = GPT(GPTConfig(attention=a, n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=257)).to(device)
    x = torch.randint(0, 257, (2, 128), device=device)
    explanation = torch._dynamo.explain(model)(x, x)
    print(a, 'graph breaks:', explanation.graph_break_count, [str(b.reason)[:80] for b in explanation.break_reasons][:3])
"

# 4. the bench: GPT-2 small, every attention, 1k to 1M tokens; then within 8 GiB
step bench 75 "$work/bench.log" python bench.py $model $bench_args --out_dir="$work/bench"
cat "$work"/bench/*.md > "$out/bench.md" 2>/dev/null
cp "$work"/bench/*.png "$out/bench.png" 2>/dev/null
step "bench 8 GiB" 45 "$work/bench8.log" python bench.py $model $bench_args --vram_gb=8 --out_dir="$work/bench8"
cat "$work"/bench8/*.md > "$out/bench_8gb.md" 2>/dev/null

# 5. sampling on the GPU from one of the checkpoints above, past its block size (Infini streams)
step sample 15 "$out/sample.txt" python sample.py --out_dir="$work/train-infini" --max_new_tokens=300 \
  --num_samples=1 $([ $tiny = 1 ] && echo --device=cpu)

rm -rf "$work"
echo "results in $out/"
