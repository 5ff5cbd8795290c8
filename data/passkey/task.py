"""
The passkey task: one example of any length, with any tokenizer. prepare.py writes training sets of them;
evaluate.py and experiments/infini_passkey.py measure retrieval accuracy with them.
"""

import numpy as np

FILLER = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. '
NEEDLE = '\nThe pass key is {key}. Remember it. {key} is the pass key.\n'
QUESTION = '\nWhat is the pass key? The pass key is '


def make_passkey(length, depth, rng, tok):
    """One example of exactly `length` tokens: (prompt_ids, answer_ids), two lists of ints, the answer being the
    key's 5 digits. The needle starts after round(depth * n_filler) filler tokens, n_filler being all there is.
    Pieces are joined as ids, not as text, so the length is exact with any tokenizer (filler may end mid-word)."""
    key = str(rng.integers(10000, 100000))
    needle = tok.encode(NEEDLE.format(key=key))
    question = tok.encode(QUESTION)
    answer = tok.encode(key)
    n_filler = length - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f'a passkey example needs at least {length - n_filler} tokens, asked for length={length}')
    if not 0 <= depth <= 1:
        raise ValueError(f'depth={depth} must be a fraction of the filler, between 0 and 1')
    n_before = round(depth * n_filler)
    filler = np.array(tok.encode(FILLER))
    before = np.resize(filler, n_before)  # np.resize repeats the filler to the size asked for
    after = np.resize(filler, n_filler - n_before)
    prompt = np.concatenate([before, needle, after, question]).astype(np.int64)
    return prompt.tolist(), answer
