"""Small random-init causal LMs and a word-level tokenizer built in code (nothing downloaded).

Defined once in benchmarks/models.py (bench_llm.py uses them too) and loaded by
tests/_bench_models.py. Needs ``transformers`` and ``tokenizers``; callers skip when they are missing.
"""

from __future__ import annotations

from _bench_models import models as _models

SPECIALS = _models.SPECIALS  # ids 0..3: pad (zero row in Llama's embedding), unk, bos, eos
word_tokenizer = _models.word_tokenizer
gpt2 = _models.gpt2
llama = _models.llama
prompts = _models.prompts
