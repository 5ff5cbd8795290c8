"""
What each position scheme costs a training step on the CPU: CPU seconds per iteration (forward, backward, AdamW),
at train.py's CPU defaults (4 layers of 128, batch 8 x 256 tokens, the byte vocabulary), on one thread. The schemes
take turns, round after round, so a machine that slows down mid-run slows them all alike. Every global is a flag:

  python experiments/position_cost.py
  python experiments/position_cost.py --attention=selective --rounds=5 --iters=50
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, flags_of  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
attention = 'causal'
schemes = 'learned,rope,alibi'
rounds = 4                 # each round times every scheme once
iters = 30                 # timed iterations per scheme and round, after 3 warm-up ones
block_size = 256
batch_size = 8
vocab_size = 257
seed = 1337
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------


def step_seconds(model, optimizer, x, y, n):
    """CPU seconds per training iteration, over n iterations."""
    def step():
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    t0 = time.process_time()
    for _ in range(n):
        step()
    return (time.process_time() - t0) / n


def main(argv):
    cfg, _ = configure(argv, FLAGS, __doc__)
    torch.set_num_threads(1)
    names = cfg.schemes.split(',')
    runs = {}
    for name in names:
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=4, n_head=4, n_embd=128,
                              attention=cfg.attention, positions=name))
        runs[name] = (model, model.configure_optimizers(0.1, 2e-3, (0.9, 0.99), 'cpu'))
    x, y = (torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size)) for _ in range(2))
    seconds = {name: [] for name in names}
    for r in range(cfg.rounds):
        for name in names:
            seconds[name].append(step_seconds(*runs[name], x, y, cfg.iters))
        print(f'round {r + 1}: ' + ', '.join(f'{n} {seconds[n][-1] * 1000:.1f} ms' for n in names), flush=True)
    base = statistics.median(seconds[names[0]])
    print(f'{cfg.attention}, torch {torch.__version__}, one thread, median of {cfg.rounds} rounds of {cfg.iters} '
          f'iterations:')
    for name in names:
        median = statistics.median(seconds[name])
        print(f'  {name}: {median * 1000:.1f} ms per iteration, {median / base:.2f}x {names[0]}')


if __name__ == '__main__':
    main(sys.argv[1:])
