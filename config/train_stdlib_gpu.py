# What `python train.py` does on a GPU, spelled out: a baby GPT (10.7M parameters) of the Python standard
# library's source, 1024 bytes of context, 98M tokens in all (8 passes over the corpus).
# python train.py config/train_stdlib_gpu.py
out_dir = 'out'
device = 'cuda'  # this file is for a GPU: on a machine without one, train.py stops with one line
dataset = 'python_stdlib'
eval_interval = 500
eval_iters = 100
batch_size = 32
block_size = 1024
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
learning_rate = 1e-3
max_iters = 3000
warmup_iters = 100
min_lr = 1e-4
