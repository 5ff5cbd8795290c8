# Fine-tune GPT-2 (124M) on PG-19's books in any attention (docs/gpt2.md). On one GPU:
# python data/pg19/prepare.py                                                         # 1000 books, GPT-2's BPE
# python train.py config/finetune_gpt2.py --attention=selective --out_dir=out-gpt2-selective
# python train.py config/finetune_gpt2.py --attention=infini --block_size=4096 --segment_len=512 \
#     --out_dir=out-gpt2-infini
init_from = 'gpt2'
dataset = 'pg19'
out_dir = 'out-gpt2'
block_size = 1024       # GPT-2's table; longer tiles it (causal, selective, in) or streams segments (infini)
batch_size = 8
gradient_accumulation_steps = 4   # 32 x 1024 tokens per step
max_iters = 2000
eval_interval = 250
eval_iters = 50
warmup_iters = 100
learning_rate = 6e-5    # a tenth of GPT-2's pretraining rate: move its weights, do not wipe them
min_lr = 6e-6
