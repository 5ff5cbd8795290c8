# Context extension (InAttention's recipe): fine-tune a model trained at a short block_size at a longer one.
# InAttention's default ALiBi needs no change for a longer context; a short fine-tune adapts the model to it.
# (With --positions=learned, train.py first tiles the position table to the new length.)
# python train.py --attention=in --out_dir=out-in         # 256 tokens of context on a CPU
# python train.py config/finetune_long.py                   # -> out-in-long, 1024 tokens of context
init_from = 'out-in/ckpt.pt'
out_dir = 'out-in-long'
block_size = 1024
batch_size = 2          # as many tokens per iteration as the CPU default's 8 x 256
max_iters = 300
eval_interval = 100
warmup_iters = 20
learning_rate = 3e-4
min_lr = 3e-5
