"""
GPT-2's weights in any of the four attentions, as nanoGPT's GPT.from_pretrained does for the causal one.

  python train.py --init_from=gpt2 --attention=selective --dataset=pg19 --out_dir=out-gpt2-selective
  python sample.py --init_from=gpt2-medium --start="The book begins"

The weights come from the Hugging Face hub ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), or from a local
folder holding a GPT-2 as transformers' save_pretrained writes it (config.json and model.safetensors). The hub's
files are fetched with huggingface_hub and read with safetensors, both installed with transformers; the model
code of transformers is never imported (transformers 5 imports a package named `kernels`, which this repo's
kernels.py would hide). The tokenizer is GPT-2's BPE, through tiktoken.

GPT-2 is our causal model with the learned position table and the tanh GELU, so its weights map one to one
(HF's Conv1D stores each matrix transposed). What each attention keeps (docs/gpt2.md):
  causal      everything: the logits are GPT-2's.
  selective   everything, and adds no parameters: head 0 of every layer votes tokens out from the first step.
  in          everything, but its keys and values now come from the initial states x0 = wte + wpe, not from
              each layer's input; only layer 0 sees what it saw before. Its new LayerNorm on x0 (ln_kv) starts
              as a copy of the layer's ln_1, so layer 0 is exactly GPT-2's layer 0.
  infini      everything but the position table: Infini brings its own positions (RoPE inside each segment),
              which GPT-2's queries and keys never saw. It adds one gate logit per head (beta, attention_infini.py).
A --positions other than 'learned' drops the table for the others too: the model must learn its new positions.
"""

import json
import os
import re
from dataclasses import asdict

from model import GPT, GPTConfig

HUB_IDS = {'gpt2': 'openai-community/gpt2', 'gpt2-medium': 'openai-community/gpt2-medium',
           'gpt2-large': 'openai-community/gpt2-large', 'gpt2-xl': 'openai-community/gpt2-xl'}
TOKENIZER = {'kind': 'tiktoken', 'name': 'gpt2'}  # every GPT-2 size reads the same BPE
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')  # stored transposed


def is_gpt2(init_from):
    """True when --init_from names GPT-2 weights: a hub model name or a folder (a checkpoint is a file)."""
    return init_from in HUB_IDS or os.path.isdir(init_from)


def fetch(init_from):
    """The local folder of init_from's config.json and model.safetensors, downloaded from the hub once (then cached
    by huggingface_hub), or a one-line SystemExit saying what is missing."""
    if init_from not in HUB_IDS:
        if not os.path.isfile(os.path.join(init_from, 'config.json')):
            raise SystemExit(f"--init_from={init_from} is a folder without config.json: give a GPT-2 saved by "
                             f"transformers' save_pretrained, one of {', '.join(HUB_IDS)}, or a run's ckpt.pt")
        return init_from
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit(f"--init_from={init_from} needs huggingface_hub and safetensors to fetch GPT-2's weights: "
                         f"pip install transformers") from None
    try:
        return snapshot_download(HUB_IDS[init_from], allow_patterns=['config.json', 'model.safetensors*'])
    except Exception as e:  # offline, a proxy, a full disk: the exception's name says which, its text is long
        raise SystemExit(f"cannot fetch {init_from} from the Hugging Face hub ({type(e).__name__}); it needs the "
                         f"internet once, then it is cached; or give a local folder: --init_from=DIR") from None


def read_config(folder):
    """The GPTConfig fields GPT-2's config.json fixes, or a one-line error for a model this code cannot mirror."""
    try:
        with open(os.path.join(folder, 'config.json')) as f:
            hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # cut short, or not JSON
        raise SystemExit(f"{folder}/config.json is not readable JSON ({type(e).__name__}); save the model "
                         f"again") from None
    if not isinstance(hf, dict):
        raise SystemExit(f"{folder}/config.json is not a GPT-2 config (not a JSON object)")
    missing = [k for k in ('n_layer', 'n_head', 'n_embd', 'n_positions', 'vocab_size') if type(hf.get(k)) is not int]
    if missing:
        raise SystemExit(f"{folder}/config.json has no whole number for {', '.join(missing)}; save the model again")
    gelu = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'none'}.get(hf.get('activation_function'))
    unsupported = [
        (hf.get('model_type') != 'gpt2', f"model_type {hf.get('model_type')!r} is not 'gpt2'"),
        (gelu is None, f"activation_function {hf.get('activation_function')!r}"),
        (hf.get('n_inner') not in (None, 4 * hf.get('n_embd', 0)), "an MLP width other than 4 * n_embd"),
        (hf.get('layer_norm_epsilon', 1e-5) != 1e-5, "a layer_norm_epsilon other than 1e-5"),
        (not hf.get('scale_attn_weights', True) or hf.get('scale_attn_by_inverse_layer_idx', False),
         "attention scores scaled otherwise than by 1/sqrt(head size)"),
        (not hf.get('tie_word_embeddings', True), "an output layer not tied to the token embeddings"),
    ]
    for bad, what in unsupported:
        if bad:
            raise SystemExit(f"{folder}/config.json: {what}; this code mirrors GPT-2 exactly and cannot load it")
    return dict(n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'], block_size=hf['n_positions'],
                vocab_size=hf['vocab_size'], bias=True, head_size=0, gelu=gelu)


def read_weights(folder):
    """GPT-2's tensors by name, without the 'transformer.' prefix a saved GPT2LMHeadModel adds, without the
    attention-mask buffers older files hold, and without lm_head (tied to wte)."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):  # a large model saved in shards
        with open(index) as f:
            files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.isfile(os.path.join(folder, 'model.safetensors')):
        files = ['model.safetensors']
    else:
        raise SystemExit(f"no model.safetensors in {folder}: save the model with transformers' save_pretrained")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SystemExit("reading GPT-2's weights needs safetensors: pip install transformers") from None
    weights = {}
    for name in files:
        try:
            tensors = load_file(os.path.join(folder, name))
        except Exception as e:  # empty, cut short, or not safetensors: safetensors' own message says little
            raise SystemExit(f"{folder}/{name} is not a readable safetensors file ({type(e).__name__}); save the "
                             f"model again") from None
        for key, tensor in tensors.items():
            key = key.removeprefix('transformer.')
            if not key.endswith(('.attn.bias', '.attn.masked_bias')) and key != 'lm_head.weight':
                weights[key] = tensor
    return weights


def gpt2_checkpoint(init_from, init_options=None, **model_args):
    """A checkpoint dict (model_args, model, tokenizer), as train.py fine-tunes from, holding GPT-2's weights in the
    model model_args describe. GPT-2 fixes the shape (n_layer, n_head, n_embd, block_size, vocab_size, bias, gelu);
    model_args give the rest (attention, positions, segment_len, ...); positions default to GPT-2's table.
    init_options go to the attention's init_from_causal, which sets the parameters GPT-2 lacks (Infini's
    gate_logit: experiments/gpt2_tiny.py compares its default with 0).
    Also prints one line saying what the attention keeps, drops and adds."""
    folder = fetch(init_from)
    shape = read_config(folder)
    args = {**model_args, **shape, 'positions': model_args.get('positions') or 'learned'}
    try:
        model = GPT(GPTConfig(**args))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    weights = read_weights(folder)
    state = model.state_dict()
    new = []
    for name in state:
        key = name.removeprefix('transformer.')
        if name == 'lm_head.weight':  # tied to wte
            continue
        if key not in weights:
            new.append(key)
            continue
        w = weights.pop(key)
        w = w.t() if key.endswith(CONV1D) else w
        if w.shape != state[name].shape:
            raise SystemExit(f"{init_from}: {key} has shape {tuple(w.shape)}, the model wants "
                             f"{tuple(state[name].shape)}")
        state[name].copy_(w)
    for block in model.transformer.h:  # the parameters GPT-2 does not have: the attention sets its own
        block.attn.init_from_causal(block, **(init_options or {}))
    dropped = sorted(weights)
    positions = 'RoPE in each segment' if model.streams else args['positions']
    print(f"GPT-2 weights from {init_from} into attention={args['attention']}, positions={positions}: "
          f"{model.get_num_params(False) / 1e6:.1f}M parameters"
          + (f"; new: {', '.join(sorted({re.sub(r'^h[.][0-9]+[.]', '', k) for k in new}))}" if new else '')
          + (f"; dropped: {', '.join(dropped)}" if dropped else ''))
    return {'model_args': asdict(model.config), 'model': model.state_dict(), 'tokenizer': dict(TOKENIZER)}


def save_pretrained(model, folder):
    """Write a causal GPT with GPT-2's shape (learned table, biases) as transformers' GPT2LMHeadModel.save_pretrained
    would: config.json and model.safetensors. --init_from=folder reads it back; so does transformers."""
    c = model.config
    if c.attention != 'causal' or c.positions != 'learned' or not c.bias or c.head_size != c.n_embd // c.n_head:
        raise ValueError("only a causal GPT with the learned position table and biases has GPT-2's layout")
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    weights = {name: (w.t() if name.endswith(CONV1D) else w).contiguous() for name, w in model.state_dict().items()
               if name != 'lm_head.weight'}
    save_file(weights, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    config = {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'n_layer': c.n_layer, 'n_head': c.n_head,
              'n_embd': c.n_embd, 'n_positions': c.block_size, 'vocab_size': c.vocab_size, 'n_inner': None,
              'activation_function': {'tanh': 'gelu_new', 'none': 'gelu'}[c.gelu], 'layer_norm_epsilon': 1e-5,
              'tie_word_embeddings': True, 'resid_pdrop': c.dropout, 'embd_pdrop': c.dropout, 'attn_pdrop': c.dropout}
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)


def load_model(init_from, device='cpu', **model_args):
    """GPT-2 as an eval-mode GPT on device (causal unless model_args say otherwise), and its checkpoint dict."""
    checkpoint = gpt2_checkpoint(init_from, **{'attention': 'causal', **model_args})
    model = GPT(GPTConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval(), checkpoint
