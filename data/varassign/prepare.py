"""
Variable Assignment, the task that motivates Selective Attention (Leviathan et al. 2024, section 1): a stream of
assignments to a few variables, then a question about one of them. Only the latest assignment of each variable
matters, so a new one may mask the old:

        b=5 a=3 c=0 a=7 b=2 a?7

make_varassign builds one example of exactly `length` tokens (left-padded with spaces): the number of assignments
is drawn between min_assign and max_assign, each assigns a random digit to one of n_vars letters, and the question
asks for a variable that was assigned (uniformly among them); the answer is its last digit. A model that copies the
last digit it saw is right only when the asked variable happened to be the last one assigned. This script writes
train/val sets, byte-level, back to back, with example_len and answer_len = 1 in meta.pkl: train.py then counts
the loss of the answer only. A curriculum is several of these sets, from short examples to long, trained one
after the other with train.py --init_from (experiments/selective_synthetic.py).

  python data/varassign/prepare.py --length=128 --min_assign=1 --max_assign=8 --out_dir=data/varassign/easy
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.common import ByteTokenizer, seeded_rng, write_dataset  # noqa: E402

VARIABLES = 'abcdefghijklmnopqrstuvwxyz'
PAD = ' '
ASSIGNMENT_LEN = 4  # 'a=3 '
QUESTION_LEN = 2    # 'a?'


def max_assignments(length):
    """The most assignments an example of `length` tokens holds: the question and the answer take 3 tokens."""
    return (length - QUESTION_LEN - 1) // ASSIGNMENT_LEN


def make_varassign(length, n_assign, n_vars, rng):
    """One example of exactly `length` byte ids: (prompt_ids, answer_ids), the answer being one digit."""
    if not 1 <= n_vars <= len(VARIABLES):
        raise ValueError(f'n_vars={n_vars} must be between 1 and {len(VARIABLES)}')
    if not 1 <= n_assign <= max_assignments(length):
        raise ValueError(f'{n_assign} assignments do not fit in {length} tokens (at most {max_assignments(length)})')
    names = rng.integers(0, n_vars, size=n_assign)
    values = rng.integers(0, 10, size=n_assign)
    latest, text = {}, ''
    for name, value in zip(names.tolist(), values.tolist()):
        latest[name] = value  # the latest assignment wins
        text += f'{VARIABLES[name]}={value} '
    asked = rng.choice(np.unique(list(latest)))
    answer = str(latest[asked])
    prompt = PAD * (length - len(text) - QUESTION_LEN - 1) + text + VARIABLES[asked] + '?'
    tok = ByteTokenizer()
    return tok.encode(prompt), tok.encode(answer)


def make_set(n, length, min_assign, max_assign, n_vars, rng):
    """n examples with a uniform number of assignments in [min_assign, max_assign], back to back, as one array."""
    examples = []
    for n_assign in rng.integers(min_assign, max_assign + 1, size=n):
        prompt, answer = make_varassign(length, int(n_assign), n_vars, rng)
        examples.append(prompt + answer)
    return np.array(examples, dtype=np.int64).reshape(-1)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(), allow_abbrev=False)
    parser.add_argument('--length', type=int, default=128, help='tokens per example (prompt + answer)')
    parser.add_argument('--min_assign', type=int, default=1)
    parser.add_argument('--max_assign', type=int, default=0, help='0 = as many as fit')
    parser.add_argument('--n_vars', type=int, default=4, help='how many variable names (letters) are used')
    parser.add_argument('--n_train', type=int, default=50000)
    parser.add_argument('--n_val', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--out_dir', default=here)
    args = parser.parse_args(argv)
    max_assign = args.max_assign or max_assignments(args.length)
    if args.n_train < 1 or args.n_val < 1:
        raise SystemExit('--n_train and --n_val must be at least 1')
    if not 1 <= args.min_assign <= max_assign:
        fit = f' (0 = as many as fit in --length={args.length})' if not args.max_assign else ''
        raise SystemExit(f'--min_assign={args.min_assign} must be between 1 and --max_assign={max_assign}{fit}')
    rng = seeded_rng(args.seed)
    try:
        train_ids = make_set(args.n_train, args.length, args.min_assign, max_assign, args.n_vars, rng)
        val_ids = make_set(args.n_val, args.length, args.min_assign, max_assign, args.n_vars, rng)
    except ValueError as e:
        raise SystemExit(f'--length={args.length}: {e}') from None
    # answer_len = 1: train.py counts the loss of the answer only
    write_dataset(args.out_dir, train_ids, val_ids, ByteTokenizer(), 'varassign', example_len=args.length, answer_len=1)


if __name__ == '__main__':
    main()
