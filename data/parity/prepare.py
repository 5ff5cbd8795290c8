"""
Parity, a control for Selective Attention (Leviathan et al. 2024, section 1): a string of bits, then the parity of
their sum. Reading left to right, only the running parity matters, so every earlier bit may be masked once it is
counted:

        0110100111=0

make_parity builds one example of exactly `length` tokens (left-padded with spaces), with a number of bits drawn
between min_bits and max_bits; the answer is '0' (even number of ones) or '1'. Guessing is right half the time.
This script writes train/val sets, byte-level, back to back, with example_len and answer_len = 1 in meta.pkl, so
train.py counts the loss of the answer only.

  python data/parity/prepare.py --length=64 --min_bits=2 --max_bits=16 --out_dir=data/parity/short
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.common import ByteTokenizer, seeded_rng, write_dataset  # noqa: E402

PAD = ' '


def make_parity(length, n_bits, rng):
    """One example of exactly `length` byte ids: (prompt_ids, answer_ids), the answer being '0' or '1'."""
    if not 1 <= n_bits <= length - 2:
        raise ValueError(f'{n_bits} bits do not fit in {length} tokens with "=" and the answer '
                         f'(at most {length - 2})')
    bits = rng.integers(0, 2, size=n_bits)
    prompt = PAD * (length - n_bits - 2) + ''.join(map(str, bits)) + '='
    tok = ByteTokenizer()
    return tok.encode(prompt), tok.encode(str(int(bits.sum()) % 2))


def make_set(n, length, min_bits, max_bits, rng):
    """n examples with a uniform number of bits in [min_bits, max_bits], back to back, as one array."""
    examples = []
    for n_bits in rng.integers(min_bits, max_bits + 1, size=n):
        prompt, answer = make_parity(length, int(n_bits), rng)
        examples.append(prompt + answer)
    return np.array(examples, dtype=np.int64).reshape(-1)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(), allow_abbrev=False)
    parser.add_argument('--length', type=int, default=64, help='tokens per example (prompt + answer)')
    parser.add_argument('--min_bits', type=int, default=1)
    parser.add_argument('--max_bits', type=int, default=0, help='0 = as many as fit')
    parser.add_argument('--n_train', type=int, default=50000)
    parser.add_argument('--n_val', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--out_dir', default=here)
    args = parser.parse_args(argv)
    max_bits = args.max_bits or args.length - 2
    if args.n_train < 1 or args.n_val < 1:
        raise SystemExit('--n_train and --n_val must be at least 1')
    if not 1 <= args.min_bits <= max_bits:
        fit = f' (0 = as many as fit in --length={args.length})' if not args.max_bits else ''
        raise SystemExit(f'--min_bits={args.min_bits} must be between 1 and --max_bits={max_bits}{fit}')
    rng = seeded_rng(args.seed)
    try:
        train_ids = make_set(args.n_train, args.length, args.min_bits, max_bits, rng)
        val_ids = make_set(args.n_val, args.length, args.min_bits, max_bits, rng)
    except ValueError as e:
        raise SystemExit(f'--length={args.length}: {e}') from None
    write_dataset(args.out_dir, train_ids, val_ids, ByteTokenizer(), 'parity', example_len=args.length, answer_len=1)


if __name__ == '__main__':
    main()
