# What `python train.py` does on a CPU, spelled out: a small byte-level model of the Python standard library's
# source that trains in a few minutes.
# python train.py config/train_stdlib_cpu.py
out_dir = 'out'
dataset = 'python_stdlib'
device = 'cpu'
compile = False
eval_interval = 200
eval_iters = 20
batch_size = 8
block_size = 256
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 2e-3
max_iters = 1000
warmup_iters = 20
min_lr = 1e-4
