"""A tiny Qwen2 that answers every chat prompt with `\\boxed{7}`, for the evaluation tests.

Its attention and MLP outputs are zeroed, so the last hidden state is the RMS-normed embedding of
the current token and the model is a bigram table: the head maps each token's embedding to the
next token of the chain <last prompt token> -> "\\" -> "b" -> ... -> "}" -> EOS (every chat prompt ends
in the same token, the generation prompt's).
`margin` sets how sure it is: greedy decoding always writes `\\boxed{7}`, sampling at temperature
0.8 sometimes leaves the chain and rambles, so accuracy, lengths and truncation vary by sample.
"""

from __future__ import annotations

import torch

from rollout_tiny import TINY_QWEN2
from tiny_tokenizer import EOS, SPECIALS, characters, save_tiny_tokenizer


def save_boxing_model(path, answer: str = "7", margin: float = 6.0, seed: int = 0) -> str:
    import transformers

    config = transformers.Qwen2Config(**TINY_QWEN2)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).float()
    from transformers import AutoTokenizer

    chars = characters()
    config.save_pretrained(path)  # first: a qwen2 config.json changes how AutoTokenizer loads the folder
    save_tiny_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False, add_generation_prompt=True)
    last = tok(prompt, add_special_tokens=False)["input_ids"][-1]
    eos = len(chars) + SPECIALS.index(EOS)
    chain = [last] + tok("\\boxed{" + answer + "}", add_special_tokens=False)["input_ids"] + [eos]
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, len(chars), (TINY_QWEN2["vocab_size"],), generator=g)  # off the chain: anywhere
    for a, b in zip(chain, chain[1:]):
        nxt[a] = b
    with torch.no_grad():
        h = TINY_QWEN2["hidden_size"]
        emb = torch.randn(TINY_QWEN2["vocab_size"], h, generator=g)
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        normed = emb / emb.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        head = torch.zeros_like(emb)
        head.index_add_(0, nxt, normed * margin / h)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    return str(path)
