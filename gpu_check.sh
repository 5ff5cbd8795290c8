#!/usr/bin/env bash
# The whole GPU check in one command, most important first, within 8 minutes on an H100 or H200.
#
#   bash gpu_check.sh           # on a GPU; results in gpu_check_out/ (or in $OUT when it is set)
#   bash gpu_check.sh --tiny    # the same steps with tiny sizes on a CPU, to check the script itself
#
# Every step has its own time limit, and every step writes as it goes: each finished case is a row of its CSV
# and markdown table at once, and each step's output goes to its own log. So a step that hits its limit still
# leaves every case it finished. summary.txt says, for each step, its time, its exit code (124: stopped at its
# limit) and how many cases it finished; results.tar.gz holds the logs and tables.
#
# The limits add up to 445 s, so the check ends within 8 minutes even when every step uses its 2 s of grace: the
# GPU machine's 15 minutes include its start and the transfers. The limits come from a CPU dry run (--tiny) and from known
# throughput: an H100 runs SDPA's causal forward at 450 TFLOP/s and bf16 matmuls at about 800, and a cold
# torch.compile of a small model takes 10-30 s.
set -u
cd "$(dirname "$0")"
tiny=0
[ "${1:-}" = "--tiny" ] && tiny=1
if [ $tiny = 0 ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check.sh: torch sees no CUDA GPU here; run it on a GPU, or 'bash gpu_check.sh --tiny' to check the script" >&2
  exit 1
fi

# The GPU machine sends back at most 8 files from $OUT. So $OUT holds two: summary.txt, readable on its own, and
# results.tar.gz with every log and table. Both are rebuilt after every step, so a check stopped anywhere still
# returns every step that finished.
out=${OUT:-gpu_check_out}
mkdir -p "$out"
work=$(mktemp -d)  # the logs and tables in $res; checkpoints beside it, since they are large and are not results
res="$work/results"
mkdir -p "$res"
export PYTHONUNBUFFERED=1

publish() {  # copy the summary and a fresh archive of $res into $out; each replaces its old copy at once
  tar -czf "$out/.results.tar.gz.part" -C "$res" . && mv -f "$out/.results.tar.gz.part" "$out/results.tar.gz"
  cp "$res/summary.txt" "$out/.summary.txt.part" && mv -f "$out/.summary.txt.part" "$out/summary.txt"
}

child=""
stopped() {  # on Ctrl-C or kill: end the running step (timeout passes the signal to its whole group), keep the rest
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child" 2>/dev/null
  echo "stopped by a signal during step ${name:-?}" >> "$res/summary.txt"
  publish
  exit 130
}
trap stopped INT TERM
trap 'rm -rf "$work"' EXIT

scale=1  # the limits are a GPU's; a dry run on a busy CPU gets ten times as long, it checks the script only
if [ $tiny = 1 ]; then
  scale=10
  cpu="--device=cpu"
  gpt2="--device=cpu --n_layer=1 --n_head=2 --n_embd=32 --vocab_size=257"
  check_args="--device=cpu --n_head=2 --n_embd=32 --vocab_size=257"
  kernels_args="--device=cpu --n_head=2 --n_embd=32 --contexts=64,128"
  train_args="--device=cpu --n_layer=1 --n_head=2 --n_embd=32 --block_size=64 --batch_size=2"
  contexts="128,256"
  in_long="512"
  infini_long="1k"
  iters=4
  tests="tests/test_model.py"  # the whole suite runs on its own in CI: keep the dry run short
else
  cpu=""
  gpt2=""  # GPT-2 small, bench.py's default shape
  check_args=""
  kernels_args="--n_head=12 --n_embd=768 --contexts=1k,4k,16k,64k"
  train_args=""  # train.py's GPU defaults: 6 layers, 384 wide, 1024 tokens of context, batch 32, bf16
  contexts="1k,4k,16k,64k"
  in_long="256k"
  infini_long="1M"
  iters=60
  # the files that run differently on a GPU first (native kernels; a real out-of-memory), then the rest; the CPU
  # dry runs of this script last, since they are the CPU's check of it
  tests="tests/test_kernels.py tests/test_bench.py $(ls tests/test_*.py | grep -vx -e tests/test_kernels.py \
    -e tests/test_bench.py -e tests/test_gpu_check.py | tr '\n' ' ')tests/test_gpu_check.py"
fi

summary="$res/summary.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  python -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
  echo
} > "$summary" 2>&1
publish

rows() {  # rows FILE...: how many data rows the CSV files hold (their header lines not counted)
  local n=0 f
  for f in "$@"; do
    [ -f "$f" ] && n=$((n + $(wc -l < "$f") - 1))
  done
  echo $n
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit into $res/NAME.log; note time and exit code
  name=$1
  local limit=$(($2 * scale))
  shift 2
  local log="$res/$name.log" start=$SECONDS
  echo "\$ $*" > "$log"
  timeout --kill-after=2 "$limit" "$@" >> "$log" 2>&1 &  # in the background, so that a signal reaches stopped()
  child=$!
  wait "$child"
  code=$?
  child=""
  line="$name: exit $code in $((SECONDS - start)) s (limit $limit)$([ $code = 124 ] && echo ', stopped at its limit')"
}

note() {  # note WHAT: the step's summary line, with what it finished; on a failure, the end of its log
  echo "$line, $1" >> "$summary"
  [ "$code" = 0 ] || tail -n 12 "$res/${line%%:*}.log" | sed 's/^/    /' >> "$summary"
  publish
}

# 1. Does it work here? Each kernel against its reference in bf16, fp16, fp32, then one compiled bf16 training
#    step of each attention (10 cases; compiling is most of the time).
step check 80 python bench.py --mode=check $check_args --case_seconds=25 --out_dir="$res/check"
note "$(rows "$res/check/bench_check.csv") of 10 cases"

# 2. The kernels' speed against their references and SDPA, forward and forward+backward, batch 1. Each case is
#    timed for about 0.1 s; a reference that takes longer than 8 s at some length skips the longer ones.
step kernels 60 python bench.py --mode=kernels $kernels_args --batches=1 --case_seconds=8 --out_dir="$res/kernels"
note "$(rows "$res/kernels/bench_kernels.csv") cases (5 per context)"

# 3. Training tokens/s and MFU of each attention at train.py's GPU defaults, not compiled: a cold compile of this
#    model would take most of the step (step 1 checks compiled training). The first run prepares the data (1 s).
for a in causal in infini selective; do
  step "train-$a" 25 python train.py --attention=$a --compile=False --max_iters=$iters --warmup_iters=2 --eval_interval=$iters \
    --eval_iters=2 --log_interval=10 --out_dir="$work/train-$a" $train_args
  cp "$work/train-$a/log.csv" "$res/train-$a.csv" 2>/dev/null
  note "$(tr '\r' '\n' < "$res/train-$a.log" | grep -c '^step ') evaluations, $(rows "$res/train-$a.csv") rows of log.csv"
done

# 4. The bench: GPT-2 small, every attention, inference and training, 1k to 64k tokens (32 cases)
step bench 60 python bench.py $gpt2 --contexts=$contexts --decode_tokens=16 --repeats=2 --case_seconds=8 \
  --out_dir="$res/bench"
note "$(rows "$res/bench/bench_speed.csv") cases (8 per context)"

# 5. The two long-context targets: InAttention's next token after a 256k prompt; Infini streams 1M tokens
#    within 8 GiB
step bench-in-long 20 python bench.py $gpt2 --attentions=in --contexts=$in_long --decode_tokens=16 --repeats=1 \
  --case_seconds=15 --out_dir="$res/bench-in-long"
note "$(rows "$res/bench-in-long/bench_speed.csv") of 2 cases"
step bench-infini-8gb 20 python bench.py $gpt2 --attentions=infini --contexts=$infini_long --decode_tokens=16 \
  --repeats=1 --vram_gb=8 --case_seconds=15 --out_dir="$res/bench-infini-8gb"
note "$(rows "$res/bench-infini-8gb/bench_speed.csv") of 2 cases"

# 6. The test suite, natively (kernel tests in bf16, fp16, fp32; the CUDA out-of-memory test), those files first:
#    the whole suite may not fit in the limit. No -x: one failure hides nothing else; TEST_TIMEOUT
#    (tests/conftest.py) fails one test that runs past 30 s.
step pytest 80 env TEST_TIMEOUT=30 python -m pytest -q -rfE -p no:cacheprovider $tests
note "$(grep -E '(passed|failed|error)' "$res/pytest.log" | tail -n 1)"

# 7. Sampling from a checkpoint of step 3 past its block size (Infini streams)
step sample 10 python sample.py --ckpt="$work/train-infini"/ckpt.pt --max_new_tokens=300 --num_samples=1 $cpu
note "$(wc -c < "$res/sample.log") bytes of output"

# 8. The graph breaks torch.compile finds in each model (the kernels are opaque to it)
step graph-breaks 15 python -c "
import torch, torch._dynamo
from model import GPT, GPTConfig
device = 'cuda' if torch.cuda.is_available() else 'cpu'
for a in ('causal', 'in', 'infini', 'selective'):
    model = GPT(GPTConfig(attention=a, n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=257)).to(device)
    x = torch.randint(0, 257, (2, 128), device=device)
    explanation = torch._dynamo.explain(model)(x, x)
    print(a, 'graph breaks:', explanation.graph_break_count, [str(b.reason)[:80] for b in explanation.break_reasons][:3])
"
note "$(grep -c '^[a-z]* graph breaks:' "$res/graph-breaks.log") of 4 models"

echo "total: $SECONDS s" >> "$summary"
publish
cat "$summary"
echo "results in $out/: summary.txt, and results.tar.gz with every log and table (tar -xzf to read them)"
