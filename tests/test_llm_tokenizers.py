"""Tokenizers as Captum's tests write them: ``decode`` takes a tensor (Captum passes one) and
calls ``.tolist()`` on it, so fastattr passes tensors too (Captum's TestLLMGradAttr's DummyTokenizer)."""

from __future__ import annotations

from collections import UserDict

import torch

from fastattr.llm import text


class TensorOnlyTokenizer:
    """One character per token (id = ord), like Captum's DummyTokenizer."""

    def decode(self, token_ids: torch.Tensor) -> str:
        ids = token_ids.tolist()  # a list would fail here, as in Captum's test tokenizer
        return chr(ids) if isinstance(ids, int) else " ".join(chr(i) for i in ids)

    def convert_ids_to_tokens(self, token_ids):
        return [chr(i) for i in token_ids]

    def __call__(self, txt: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False):
        enc = UserDict()
        enc["input_ids"] = [ord(t[0]) for t in txt.split(" ")]
        offsets, idx = [], 0
        for t in txt.split(" "):
            offsets.append((idx, idx + len(t)))
            idx += len(t) + 1
        enc["offset_mapping"] = offsets
        return enc


def test_output_tokens_pass_tensors_to_decode():
    tok = TensorOnlyTokenizer()
    assert text.output_tokens(torch.tensor([ord("x"), ord("y"), ord("z")]), tok) == ["x", "y", "z"]


def test_output_tokens_fallback_decodes_one_tensor_per_token():
    class NoOffsets(TensorOnlyTokenizer):
        def __call__(self, *args, **kwargs):
            raise NotImplementedError  # no re-encoding: the token-by-token fallback

    assert text.output_tokens(torch.tensor([ord("m"), ord("n")]), NoOffsets()) == ["m", "n"]
