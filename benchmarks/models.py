"""Benchmark models, defined here so no extra package (torchvision, timm) is needed: a bare
GPU machine runs every benchmark. All are random-init (seeded) and in eval mode.

- mlp, small_cnn: the small cases;
- ResNet18, ResNet50: torchvision's layouts (BasicBlock 2-2-2-2; Bottleneck 3-4-6-3, 25.6M
  parameters) for 224x224 inputs (any size >= 32 works: global average pooling);
- ViT: ViT-S/16 by default (dim 384, depth 12, 6 heads, MLP 4x, 22M parameters);
- TokenClassifier + token_batch: the padded token classifier of benchmarks/bench_layer.py;
- word_tokenizer, gpt2, llama, prompts: small random-init causal LMs and a word-level tokenizer
  built in code (transformers and tokenizers imported on use), for bench_llm.py.
The tests load this file too (tests/_bench_models.py): one definition for both, and benchmarks
never import tests/.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (BasicBlocks 2-2-2-2, widths 64-512) for 224x224 inputs."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give eval-mode BatchNorm non-trivial statistics, as a trained network would have."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """ResNet-50's layout (Bottlenecks 3-4-6-3, widths 64-512, stride on the 3x3 as torchvision)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * _Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)
        for m in self.modules():  # torchvision's initialisation (resnet50(weights=None))
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def resnet50(seed: int = 0) -> nn.Module:
    """Random-init ResNet-50 as torchvision builds it (BatchNorm at its initial statistics)."""
    torch.manual_seed(seed)
    return ResNet50().eval()


# --------------------------------------------------------------------------- transformers

PAD = 0  # token id of padding (also the default zero baseline)


class Block(nn.Module):
    """Pre-LN encoder block: multi-head self-attention (with an additive key bias), then a GELU MLP.

    Written out (no nn.TransformerEncoderLayer): torch's fused inference fast path turns padded
    positions into zeros under no_grad but not under autograd."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h: torch.Tensor, key_bias: torch.Tensor | float = 0.0) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + key_bias  # (b, heads, t, t)
        att = scores.softmax(-1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class ViT(nn.Module):
    """Vision transformer (default ViT-S/16): patch embedding, class token, learned positions for
    ``image`` x ``image`` inputs, pre-LN blocks, head on the class token."""

    def __init__(self, image: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6, classes: int = 1000, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


class TokenClassifier(nn.Module):
    """forward(ids (B, T) long, mask (B, T) 1/0) -> (B, classes) logits.

    nn.Embedding (``embed``, the layer to attribute) + learned positions -> blocks with
    padded keys masked out -> mean over real tokens -> linear head.
    """

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 3, max_len: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.pos(torch.arange(t, device=ids.device))
        m = mask.to(h.dtype)
        key_bias = ((1 - m) * -1e4)[:, None, None, :]  # padded keys get no attention
        for block in self.blocks:
            h = block(h, key_bias)
        h = self.norm(h)
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        return self.head(F.gelu(pooled))


def token_batch(batch: int, max_len: int, vocab: int = 50, min_len: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) long, mask (B, T) float 1/0, lengths (B,) long): random lengths in
    [min_len, max_len], real tokens in [1, vocab), PAD after each row's length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len  # at least one full row
    ids = torch.randint(1, vocab, (batch, max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).float()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
    return ids, mask, lengths


# --------------------------------------------------------------------------- language models

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3: pad (zero row in Llama's embedding), unk, bos, eos


def word_tokenizer(n_words: int = 500, bos: bool = False):
    """A PreTrainedTokenizerFast over words w0..w{n-1} (whitespace split), ids after the specials.
    ``bos``: prepend <s> (id 2) when encoding with special tokens, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


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
