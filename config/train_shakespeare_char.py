# nanoGPT's character-level Shakespeare. First: python data/shakespeare_char/prepare.py
# python train.py config/train_shakespeare_char.py
# on a CPU: add --device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
#           --n_embd=128 --max_iters=2000 --dropout=0.0
out_dir = 'out-shakespeare-char'
dataset = 'shakespeare_char'
eval_interval = 250
eval_iters = 200
always_save_checkpoint = False  # the model overfits this small set: keep the best val loss
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3
max_iters = 5000
warmup_iters = 100
min_lr = 1e-4
