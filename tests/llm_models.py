"""Small random-init causal LMs and a word-level tokenizer built in code (nothing downloaded).

Shared by tests/test_llm.py and benchmarks/bench_llm.py. Needs ``transformers`` and
``tokenizers``; callers skip when they are missing.
"""

from __future__ import annotations

import random

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3: pad (zero row in Llama's embedding), unk, bos, eos


def word_tokenizer(n_words: int = 500, bos: bool = False):
    """A PreTrainedTokenizerFast over words w0..w{n-1} (whitespace split), ids after the specials.
    ``bos``: prepend <s> (id 2) when encoding with special tokens, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def gpt2(vocab: int, layers: int = 2, dim: int = 64, heads: int = 4, seed: int = 0, attn: str = "eager", init: float = 0.2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=256, n_embd=dim, n_layer=layers, n_head=heads,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, attn_implementation=attn, initializer_range=init,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def llama(vocab: int, layers: int = 2, dim: int = 64, heads: int = 4, seed: int = 0, attn: str = "sdpa", init: float = 0.2):
    """Llama with pad_token_id=0, so its embedding row 0 is zero (HF's padding_idx init).
    ``init``: weights' std (HF's 0.02 makes near-uniform next-token distributions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, attn_implementation=attn, initializer_range=init,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def prompts(n: int, lo: int, hi: int, n_words: int, seed: int = 0) -> list[str]:
    """n prompts of lo..hi random words."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(n_words)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)]
