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

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizers import ByteTokenizer  # noqa: E402
from data.writing import example_splits, make_examples, parse_flags, seeded_rng, write_dataset  # noqa: E402

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


def main(argv=None):
    def own_flags(parser):
        parser.add_argument('--length', type=int, default=128, help='tokens per example (prompt + answer)')
        parser.add_argument('--min_assign', type=int, default=1)
        parser.add_argument('--max_assign', type=int, default=0, help='0 = as many as fit')
        parser.add_argument('--n_vars', type=int, default=4, help='how many variable names (letters) are used')
    args = parse_flags(argv, __doc__, own_flags, os.path.dirname(os.path.abspath(__file__)), examples=(50000, 1000))
    max_assign = args.max_assign or max_assignments(args.length)
    if not 1 <= args.min_assign <= max_assign:
        fit = f' (0 = as many as fit in --length={args.length})' if not args.max_assign else ''
        raise SystemExit(f'--min_assign={args.min_assign} must be between 1 and --max_assign={max_assign}{fit}')
    rng = seeded_rng(args.seed)

    def make_set(n):  # a uniform number of assignments in [min_assign, max_assign] per example
        return make_examples(lambda n_assign: make_varassign(args.length, int(n_assign), args.n_vars, rng),
                             rng.integers(args.min_assign, max_assign + 1, size=n))
    train_ids, val_ids = example_splits(make_set, args)
    # answer_len = 1: train.py counts the loss of the answer only
    write_dataset(args.out_dir, train_ids, val_ids, ByteTokenizer(), 'varassign', example_len=args.length, answer_len=1)


if __name__ == '__main__':
    main()
