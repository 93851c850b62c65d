"""Real architectures, built from small configs without weights, against Captum (fp32).

Optional: needs the `models` extra (transformers; torchvision where a build matching the
installed torch imports). Each library's cases are skipped when it is missing or does not import.
Hugging Face models return a ModelOutput: fastattr gets the UNWRAPPED model (it attributes
``.logits``; a causal LM's next-token logits through ``output=``, the attention mask through
``forward_kwargs=``), Captum gets the model wrapped in ``Logits`` as a Captum user writes it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import captum.attr as ca
import numpy as np
import pytest
import torch
from models import assert_attr_close, rel_l2

import fastattr

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("single_thread")]


def _optional(name: str):
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # PyPI's torchvision beside a CPU torch raises RuntimeError, not ImportError
        return None, f"{name} not usable here: {type(exc).__name__}: {exc}"


transformers, NO_TRANSFORMERS = _optional("transformers")
torchvision, NO_TORCHVISION = _optional("torchvision")
needs_transformers = pytest.mark.skipif(transformers is None, reason=NO_TRANSFORMERS)
needs_torchvision = pytest.mark.skipif(torchvision is None, reason=NO_TORCHVISION)

# fp32 parity: the same quadrature, so differences are summation order only (fastattr's chunks vs
# Captum's one expanded batch). Scaled atol as in test_parity_captum.
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}}  # measured here: rel. L2 <= 2.9e-7 (HF ResNet), 1e-7 (GPT-2)
VOCAB, T = 100, 12


class Logits(torch.nn.Module):
    """model(...).logits; for a causal LM the last position's (next-token) logits."""

    def __init__(self, model: torch.nn.Module, last_token: bool = False) -> None:
        super().__init__()
        self.model, self.last_token = model, last_token

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if len(args) == 2:  # (input_ids, attention_mask)
            logits = self.model(input_ids=args[0], attention_mask=args[1]).logits
        else:
            logits = self.model(args[0]).logits
        return logits[:, -1] if self.last_token else logits


def next_token_logits(out) -> torch.Tensor:
    """output= for a causal LM: the last position's logits."""
    return out.logits[:, -1]


def _hf_image(kind: str) -> torch.nn.Module:
    """The model as Hugging Face builds it (returns an ImageClassifierOutput)."""
    torch.manual_seed(0)
    t = transformers
    if kind == "resnet":
        config = t.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=5)
        return t.ResNetForImageClassification(config).eval()
    config = t.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, num_labels=5)
    return t.ViTForImageClassification(config).eval()


def _tv_image(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "resnet":
        return torchvision.models.resnet18(num_classes=5).eval()
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5).eval()


def _check_image_model(model: torch.nn.Module, captum_model: torch.nn.Module | None = None) -> None:
    """fastattr on ``model`` against Captum on ``captum_model`` (a wrapper returning logits) or the model."""
    captum_model = captum_model or model
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = [0, 3]
    got = fastattr.Saliency(model).attribute(x, target=target)
    ref = ca.Saliency(captum_model).attribute(x, target=target)
    assert_attr_close(got, ref, **TOL[x.dtype])
    got, delta = fastattr.IntegratedGradients(model).attribute(x, target=target, n_steps=8, return_convergence_delta=True)
    ref, ref_delta = ca.IntegratedGradients(captum_model).attribute(x, target=target, n_steps=8, return_convergence_delta=True)
    assert rel_l2(got, ref) < TOL[x.dtype]["rtol"], rel_l2(got, ref)
    assert_attr_close(got, ref, **TOL[x.dtype])
    torch.testing.assert_close(delta, ref_delta, rtol=1e-4, atol=1e-5 * float(ref.abs().sum(dim=(1, 2, 3)).max()))


@needs_transformers
@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_hf_image_models_unwrapped_match_captum(kind):
    model = _hf_image(kind)
    _check_image_model(model, Logits(model))


@needs_torchvision
@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_torchvision_models_match_captum(kind):
    _check_image_model(_tv_image(kind))


def _hf_token(kind: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(the unwrapped model, its token-embedding layer, the output= fastattr needs)."""
    torch.manual_seed(0)
    t = transformers
    if kind == "bert":
        config = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, max_position_embeddings=64, num_labels=3)
        model = t.BertForSequenceClassification(config).eval()
        return model, model.bert.embeddings.word_embeddings, {}  # .logits is (B, 3): the default
    if kind == "gpt2":
        config = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
        model = t.GPT2LMHeadModel(config).eval()
        return model, model.transformer.wte, {"output": next_token_logits}
    config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    model = t.LlamaForCausalLM(config).eval()
    return model, model.model.embed_tokens, {"output": next_token_logits}


@needs_transformers
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hf_token_models_unwrapped_layer_ig_match_captum(kind):
    model, embed, output = _hf_token(kind)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (2, T), generator=g)
    mask = torch.ones_like(ids)
    if kind == "bert":
        mask[1, -3:] = 0  # a padded row, the mask through additional_forward_args
    target = [1, 2]
    base = torch.zeros_like(ids)
    # fastattr: the model as it comes, the mask by keyword; Captum: the wrapper, the mask positionally
    got, delta = fastattr.LayerIntegratedGradients(model, embed).attribute(
        ids, baselines=base, target=target, forward_kwargs={"attention_mask": mask}, n_steps=8, return_convergence_delta=True, **output
    )
    ref, ref_delta = ca.LayerIntegratedGradients(Logits(model, last_token=kind != "bert"), embed).attribute(
        ids, baselines=base, target=target, additional_forward_args=(mask,), n_steps=8, return_convergence_delta=True
    )
    assert got.shape == (2, T, 32)
    assert_attr_close(got, ref, **TOL[torch.float32])
    torch.testing.assert_close(delta, ref_delta, rtol=1e-4, atol=1e-5 * float(ref.abs().sum(dim=(1, 2)).max()))


@needs_transformers
@pytest.mark.parametrize("mask_via", ["forward_kwargs", "forward_args_inputs"])
def test_run_over_an_unwrapped_bert_classifier_matches_captum(tmp_path, mask_via):
    """fastattr.run on BertForSequenceClassification as it comes: target="predicted" from .logits,
    the attention mask by keyword (one row per sample) or as the data's second input; read back
    with fastattr.open and compared with Captum's LayerIG over the wrapped model."""
    model, embed, _ = _hf_token("bert")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (7, T), generator=g)
    lengths = torch.tensor([T, 5, T, 9, 3, T, 7])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    if mask_via == "forward_kwargs":
        data, extra = ids.numpy(), {"forward_kwargs": {"attention_mask": mask.numpy()}}
    else:
        data, extra = (ids.numpy(), mask.numpy()), {"forward_args_inputs": 1}
    summary = fastattr.run(
        model, data, tmp_path / "run", method="layer_ig", layer="bert.embeddings.word_embeddings", target="predicted", baselines=0,
        n_steps=8, examples_per_batch=3, progress=False, **extra,
    )  # fmt: skip
    assert summary.complete and summary.computed == 7
    wrapped = Logits(model)
    with torch.no_grad():
        pred = wrapped(ids, mask).argmax(1)
    ref, ref_delta = ca.LayerIntegratedGradients(wrapped, embed).attribute(
        ids, baselines=torch.zeros_like(ids), target=pred, additional_forward_args=(mask,), n_steps=8, return_convergence_delta=True
    )
    store = fastattr.open(tmp_path / "run")
    got = store[:]
    np.testing.assert_array_equal(got["target"], pred.numpy())
    assert_attr_close(torch.from_numpy(got["attributions"]["bert.embeddings.word_embeddings"]), ref, **TOL[torch.float32])
    np.testing.assert_allclose(got["delta"], ref_delta.numpy(), rtol=1e-4, atol=1e-5 * float(ref.abs().sum(dim=(1, 2)).max()))
    assert ("forward_kwargs" in store.metadata) == (mask_via == "forward_kwargs")


FACTORY = textwrap.dedent(
    f"""
    import torch, transformers

    def bert(layers=2):
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size={VOCAB}, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                         intermediate_size=37, max_position_embeddings=64, num_labels=3)
        return transformers.BertForSequenceClassification(config)

    def tokens(n=4, t=9):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, {VOCAB}, (n, t), generator=g)
        return torch.utils.data.TensorDataset(ids, torch.ones_like(ids))
    """
)


@needs_transformers
def test_layers_cli_describes_a_hugging_face_token_model(tmp_path):
    """`fastattr layers` on BERT: token ids from --vocab, or the first samples of a data factory."""
    (tmp_path / "hf_models.py").write_text(FACTORY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the factory module is found in the current directory
    base = [sys.executable, "-P", "-m", "fastattr", "layers", "hf_models:bert", "--model-arg", "layers=1"]
    ids = subprocess.run([*base, "--input-shape", str(T), "--input-dtype", "long", "--vocab", str(VOCAB)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ids.returncode == 0, ids.stderr
    rows = {line.split()[0]: line for line in ids.stdout.splitlines()}
    assert f"(B, {T}, 32)" in rows["bert.embeddings.word_embeddings"]
    assert "logits: (B, 3)" in rows["(model)"]
    assert "bert.encoder.layer.1" not in rows  # --model-arg reached the factory
    data = subprocess.run([*base, "--data", "hf_models:tokens", "--data-arg", "t=7"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert data.returncode == 0, data.stderr
    assert "(B, 7, 32)" in {line.split()[0]: line for line in data.stdout.splitlines()}["bert.embeddings.word_embeddings"]
