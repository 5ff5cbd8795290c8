# A small passkey fine-tune: teach the default model to find a 5-digit key hidden in filler text and repeat it.
# Examples are as long as the model's context (256 for the CPU default, 1024 for the GPU one):
# python data/passkey/prepare.py --length=256
# python train.py config/passkey.py
init_from = 'out/ckpt.pt'
out_dir = 'out-passkey'
dataset = 'passkey'
max_iters = 200
eval_interval = 50
warmup_iters = 10
learning_rate = 3e-4
min_lr = 3e-5
