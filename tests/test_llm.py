"""fastattr.LLMGradientAttribution: parity with Captum's LLMGradientAttribution on random-init
GPT-2 and Llama (built from configs, tokenizer built in code), batching under left and right
padding, completeness per generated token, the seq_attr-only mode, the row cap, model kinds,
baselines. Skipped when transformers is not installed (``pip install -e .[hf]``)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from llm_models import gpt2, llama, prompts, word_tokenizer  # noqa: E402

import fastattr  # noqa: E402
from fastattr.errors import AttributionInputError, OptionError  # noqa: E402
from fastattr.llm.head import HeadLogProb  # noqa: E402

captum_attr = pytest.importorskip("captum.attr")
warnings.filterwarnings("ignore", message=".*attention_mask.*")

WORDS = 200
TOK = word_tokenizer(WORDS, bos=True)
PROMPTS = prompts(3, 3, 9, WORDS, seed=1)
TARGETS = prompts(3, 1, 5, WORDS, seed=2)
BUILD = {"gpt2": gpt2, "llama": llama}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return BUILD[request.param](len(TOK))


def fast_llm(model, method="ig", **kw):
    emb = model.get_input_embeddings()
    inner = fastattr.LayerIntegratedGradients(model, emb, **kw) if method == "ig" else fastattr.LayerGradientXActivation(model, emb, **kw)
    return fastattr.LLMGradientAttribution(inner, TOK)


def captum_llm(model, method="ig", **kw):
    emb = model.get_input_embeddings()
    cls = captum_attr.LayerIntegratedGradients if method == "ig" else captum_attr.LayerGradientXActivation
    return captum_attr.LLMGradientAttribution(cls(model, emb, **kw), TOK)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 5e-5, atol: float = 0.0) -> None:
    """Equal to float32 rounding, relative to the larger magnitude."""
    scale = max(float(b.abs().max()), 1e-12)
    diff = float((a - b).abs().max())
    assert diff <= rtol * scale + atol, f"max diff {diff:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------ parity with Captum
@pytest.mark.parametrize("method,mbi", [("ig", True), ("ig", False), ("gxa", True)])
def test_parity_with_captum_given_target(model, method, mbi):
    kw = {"n_steps": 8} if method == "ig" else {}
    c = captum_llm(model, method, multiply_by_inputs=mbi).attribute(
        captum_attr.TextTokenInput(PROMPTS[0], TOK, baselines=1), target=TARGETS[0], **kw
    )
    fkw = {**kw, "baselines": 1} if method == "ig" else kw
    f = fast_llm(model, method, multiply_by_inputs=mbi).attribute(PROMPTS[0], target=TARGETS[0], **fkw)
    assert f.token_attr.shape == c.token_attr.shape == (len(TOK.encode(TARGETS[0], add_special_tokens=False)), len(TOK.encode(PROMPTS[0])))
    # without the multiplier the values are sums of gradients over the embedding dim, which
    # GPT-2's LayerNorm makes cancel to ~1e-7 (rounding noise): an absolute tolerance there
    atol = 0.0 if mbi else 2e-6
    close(f.token_attr, c.token_attr, atol=atol)
    close(f.seq_attr, c.seq_attr, atol=atol)
    assert f.input_tokens == c.input_tokens and f.output_tokens == c.output_tokens


def test_parity_generated_target_skip_tokens_and_riemann(model):
    inp = captum_attr.TextTokenInput(PROMPTS[1], TOK, skip_tokens=["<s>"])  # Captum's default baseline 0
    gen = {"max_new_tokens": 5, "do_sample": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Llama's zero pad-token baseline (tested below)
        f = fast_llm(model).attribute(inp, gen_args=gen, n_steps=6, method="riemann_trapezoid")
    c = captum_llm(model).attribute(inp, gen_args=gen, n_steps=6, method="riemann_trapezoid")
    assert f.token_attr.shape == c.token_attr.shape == (5, len(TOK.encode(PROMPTS[1])) - 1)  # <s> skipped
    close(f.token_attr, c.token_attr)
    assert f.input_tokens == c.input_tokens and f.output_tokens == c.output_tokens


def test_default_generation_uses_captums_gen_args(model):
    f = fast_llm(model).attribute(PROMPTS[2], n_steps=2, baselines=1)
    assert len(f.target_ids) == 25  # Captum's DEFAULT_GEN_ARGS: max_new_tokens=25, greedy
    with torch.no_grad():
        ids = torch.tensor([TOK.encode(PROMPTS[2])])
        want = model.generate(input_ids=ids, max_new_tokens=25, do_sample=False)[0, ids.shape[1] :]
    assert torch.equal(f.target_ids, want)


# ------------------------------------------------------------------ batching
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seq_only", [False, True])
def test_batched_equals_one_at_a_time(model, side, seq_only):
    llm = fast_llm(model)
    one = [llm.attribute(p, target=t, n_steps=6, baselines=1, seq_only=seq_only) for p, t in zip(PROMPTS, TARGETS)]
    out = llm.attribute_batch(PROMPTS, TARGETS, n_steps=6, baselines=1, padding_side=side, seq_only=seq_only, internal_batch_size=5)
    lmax, tmax = max(len(o.seq_attr) for o in one), max(len(o.target_ids) for o in one)
    assert out.seq_attr.shape == (3, lmax) and out.target_log_probs.shape == (3, tmax)
    assert (out.token_attr is None) == seq_only
    for i, o in enumerate(one):
        r = out[i]
        close(r.seq_attr, o.seq_attr, rtol=1e-4)  # padding changes matmul shapes: rounding
        close(r.target_log_probs, o.target_log_probs, rtol=1e-4)
        assert r.input_tokens == o.input_tokens and r.output_tokens == o.output_tokens
        assert torch.equal(r.target_ids, o.target_ids) and torch.equal(r.input_ids, o.input_ids)
        assert float(out.seq_attr[i, len(o.seq_attr) :].abs().sum()) == 0  # zero padding past L_i
        if not seq_only:
            close(r.token_attr, o.token_attr, rtol=1e-4)
            close(r.delta, o.delta, rtol=1e-3)
            assert float(out.token_attr[i, len(o.target_ids) :].abs().sum()) == 0
    assert [len(r.seq_attr) for r in out] == [len(o.seq_attr) for o in one]


def test_batched_generation_equals_one_at_a_time(model):
    llm = fast_llm(model)
    gen = {"max_new_tokens": 6, "do_sample": False}
    single = [llm.attribute(p, gen_args=gen, n_steps=2, baselines=1).target_ids for p in PROMPTS]
    batch = llm.attribute_batch(PROMPTS, gen_args=gen, n_steps=2, baselines=1)
    assert all(torch.equal(batch[i].target_ids, s) for i, s in enumerate(single))


# ------------------------------------------------------------------ what the numbers mean
def _logprobs(model, prompt_ids, target_ids):
    """log p(y_t | prompt, y_<t), straight from the model."""
    seq = torch.cat([prompt_ids, target_ids])[None]
    with torch.no_grad():
        lp = torch.log_softmax(model(seq).logits[0].double(), -1)
    pos = torch.arange(len(prompt_ids) - 1, len(seq[0]) - 1)
    return lp[pos, target_ids]


def test_completeness_per_generated_token_and_seq_sum(model):
    llm = fast_llm(model)
    r = llm.attribute(PROMPTS[0], target=TARGETS[1], n_steps=64, baselines=1)
    ids, tgt = torch.tensor(TOK.encode(PROMPTS[0])), r.target_ids
    lp_x = _logprobs(model, ids, tgt)
    lp_x0 = _logprobs(model, torch.full_like(ids, 1), tgt)
    close(r.target_log_probs.double(), lp_x, rtol=1e-5)
    gap = lp_x - lp_x0
    close(r.delta.double(), r.token_attr.double().sum(1) - gap, atol=1e-5 * float(gap.abs().max()))  # delta, per token
    assert float(r.delta.abs().max()) <= 1e-3 * float(gap.abs().max())  # completeness per generated token
    close(r.seq_attr, r.token_attr.sum(0))  # seq_attr is the sum over generated tokens
    s = llm.attribute(PROMPTS[0], target=TARGETS[1], n_steps=64, baselines=1, seq_only=True)
    assert s.token_attr is None and s.delta is None
    close(s.seq_attr, r.seq_attr)
    close(s.seq_delta, r.seq_delta, atol=1e-5 * float(gap.abs().sum()))


def test_row_cap_respected_in_every_forward(model):
    rows: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        llm = fast_llm(model)
        for vjp in ("loop", "batched"):
            rows.clear()
            out = llm.attribute_batch(PROMPTS, TARGETS, n_steps=7, baselines=1, internal_batch_size=4, vjp=vjp)
            assert rows and max(rows) <= 4
            assert sum(rows) >= 3 * 7  # every (example, point) pair ran
        rows.clear()
        llm.attribute_batch(PROMPTS, None, gen_args={"max_new_tokens": 3, "do_sample": False}, n_steps=3, baselines=1, internal_batch_size=2)
        assert rows and max(rows) <= 2  # generation too
        ref = llm.attribute_batch(PROMPTS, TARGETS, n_steps=7, baselines=1)
    finally:
        handle.remove()
    close(out.token_attr, ref.token_attr)  # the cap changes chunking, not values


def test_bf16_close_to_fp32(model):
    llm = fast_llm(model)
    a = llm.attribute_batch(PROMPTS, TARGETS, n_steps=6, baselines=1)
    b = llm.attribute_batch(PROMPTS, TARGETS, n_steps=6, baselines=1, precision="bf16")
    err = float((a.token_attr - b.token_attr).norm() / a.token_attr.norm())
    assert err < 5e-2


# ------------------------------------------------------------------ baselines
def test_zero_embedding_baseline_with_rmsnorm_warns():
    m = llama(len(TOK))
    assert float(m.get_input_embeddings().weight[0].detach().abs().sum()) == 0  # pad row zeroed by HF
    llm = fast_llm(m)
    with pytest.warns(RuntimeWarning, match="all-zero embedding.*RMSNorm"):
        bad = llm.attribute_batch(PROMPTS, TARGETS, n_steps=64, baselines=0, seq_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        good = llm.attribute_batch(PROMPTS, TARGETS, n_steps=64, baselines=1, seq_only=True)
    for r in (bad, good):
        r.rel = (r.seq_delta.abs() / (r.seq_attr.sum(1) - r.seq_delta).abs()).median()
    assert float(bad.rel) > 0.1 and float(good.rel) < 1e-3  # the singularity, not the step count


def test_zero_embedding_baseline_without_rmsnorm_is_quiet():
    m = gpt2(len(TOK))
    with torch.no_grad():
        m.get_input_embeddings().weight[0].zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fast_llm(m).attribute(PROMPTS[0], target=TARGETS[0], n_steps=4, baselines=0)


# ------------------------------------------------------------------ model kinds
class PostProcessed(torch.nn.Module):
    """GPT-2 whose logits are scaled after the head: the sparse head must not be used."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        out = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        out.logits = 0.5 * out.logits
        return out


class EmbedsOnly(torch.nn.Module):
    """A model that takes only inputs_embeds."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.emb = inner, inner.get_input_embeddings()

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None):
        return self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids).logits


def test_postprocessed_logits_keep_the_models_head():
    m = PostProcessed(gpt2(len(TOK)))
    f = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(m, m.inner.get_input_embeddings()), TOK)
    c = captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(m, m.inner.get_input_embeddings()), TOK)
    a = f.attribute(PROMPTS[0], target=TARGETS[0], n_steps=6, baselines=1)
    b = c.attribute(captum_attr.TextTokenInput(PROMPTS[0], TOK, baselines=1), target=TARGETS[0], n_steps=6)
    close(a.token_attr, b.token_attr)


@pytest.mark.parametrize("kind", ["callable", "embeds"])
def test_plain_callables_and_embeds_models_match_hf(kind):
    hf = gpt2(len(TOK))
    emb = hf.get_input_embeddings()
    ref = fast_llm(hf).attribute_batch(PROMPTS, TARGETS, n_steps=5, baselines=1, padding_side="right")
    if kind == "callable":

        def fn(ids):
            return hf(ids).logits

        llm = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(fn, emb), TOK)
        with pytest.raises(AttributionInputError, match="left padding"):
            llm.attribute_batch(PROMPTS, TARGETS, n_steps=5, baselines=1, padding_side="left")
    else:
        m = EmbedsOnly(hf)
        llm = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(m, m.emb), TOK)
    out = llm.attribute_batch(PROMPTS, TARGETS, n_steps=5, baselines=1, padding_side="right")
    close(out.token_attr, ref.token_attr)
    if kind == "callable":  # no generate(): fastattr's greedy loop gives HF's greedy tokens
        got = llm.attribute(PROMPTS[0], gen_args={"max_new_tokens": 4}, n_steps=2, baselines=1).target_ids
        want = fast_llm(hf).attribute(PROMPTS[0], gen_args={"max_new_tokens": 4, "do_sample": False}, n_steps=2, baselines=1)
        assert torch.equal(got, want.target_ids)


def test_ids_inputs_without_tokenizer():
    m = gpt2(len(TOK))
    llm = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(m, m.get_input_embeddings()))
    ids, tgt = torch.tensor(TOK.encode(PROMPTS[0])), torch.tensor(TOK.encode(TARGETS[0], add_special_tokens=False))
    r = llm.attribute(ids, target=tgt, n_steps=4, baselines=1)
    ref = fast_llm(m).attribute(PROMPTS[0], target=TARGETS[0], n_steps=4, baselines=1)
    close(r.token_attr, ref.token_attr)
    assert r.input_tokens == [str(i) for i in ids.tolist()]
    with pytest.raises(AttributionInputError, match="tokenizer"):
        llm.attribute("w1 w2", target=tgt)


def test_head_logprob_gradient_matches_dense():
    torch.manual_seed(0)
    h = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    y = torch.randint(0, 11, (3, 4))
    dense = torch.log_softmax(h @ w.T + b, -1).gather(2, y[..., None]).squeeze(2)
    fast = HeadLogProb.apply(h, w, b, y)
    torch.testing.assert_close(fast, dense)
    for seed in (torch.eye(4, dtype=torch.float64)[1].expand(3, 4), torch.rand(3, 4, dtype=torch.float64)):
        (g1,) = torch.autograd.grad(dense, h, seed, retain_graph=True)
        (g2,) = torch.autograd.grad(fast, h, seed, retain_graph=True)
        torch.testing.assert_close(g1, g2)


# ------------------------------------------------------------------ argument errors
def test_argument_errors(model):
    llm = fast_llm(model)
    with pytest.raises(AttributionInputError, match="gen_args must be None"):
        llm.attribute(PROMPTS[0], target=TARGETS[0], gen_args={"max_new_tokens": 2})
    with pytest.raises(AttributionInputError, match="TextTokenInput"):
        llm.attribute(captum_attr.TextTokenInput(PROMPTS[0], TOK), target=TARGETS[0], baselines=1)
    with pytest.raises(OptionError, match="n_steps"):
        llm.attribute(PROMPTS[0], target=TARGETS[0], n_steps="auto")
    with pytest.raises(OptionError, match="padding_side"):
        llm.attribute_batch(PROMPTS, TARGETS, padding_side="middle")
    with pytest.raises(AttributionInputError, match="2 targets for 3 prompts"):
        llm.attribute_batch(PROMPTS, TARGETS[:2])
    with pytest.raises(AttributionInputError, match="empty"):
        llm.attribute(PROMPTS[0], target=torch.tensor([], dtype=torch.long))
    with pytest.raises(AttributionInputError, match="supports fastattr's"):
        fastattr.LLMGradientAttribution(fastattr.IntegratedGradients(model), TOK)
    with pytest.raises(OptionError, match="no n_steps"):
        fast_llm(model, "gxa").attribute(PROMPTS[0], target=TARGETS[0], n_steps=4)


def test_baseline_forms_agree(model):
    llm = fast_llm(model)
    n = len(TOK.encode(PROMPTS[0]))
    ref = llm.attribute(PROMPTS[0], target=TARGETS[2], n_steps=4, baselines=1)
    for b in ("<unk>", [1] * n, torch.ones(n, dtype=torch.long)):
        close(llm.attribute(PROMPTS[0], target=TARGETS[2], n_steps=4, baselines=b).token_attr, ref.token_attr, rtol=0)
    with pytest.raises(AttributionInputError, match="baseline ids have shape"):
        llm.attribute(PROMPTS[0], target=TARGETS[2], baselines=[1] * (n + 1))


def test_host_memory_budget_bounds_the_rows_on_cpu(model, monkeypatch):
    """memory_budget bounds the LLM engine's rows per chunk on the CPU too: the first chunk measures
    what autograd saves per row, the next ones fit the budget; results equal an unbounded call's.
    Before: the budget was read only on CUDA and every chunk took the row cap."""
    from fastattr import budget
    from fastattr.llm import shared

    seen: list[int] = []
    real = shared._chunk

    def recording(lm, lay, rows, *args, **kwargs):
        seen.append(int(rows.shape[0]))
        return real(lm, lay, rows, *args, **kwargs)

    monkeypatch.setattr(shared, "_chunk", recording)
    monkeypatch.setattr(budget, "_settled", {})
    monkeypatch.setattr(budget, "_progress", {})
    llm = fast_llm(model)
    kw = {"n_steps": 100, "baselines": 1, "internal_batch_size": 64}  # 3 prompts x 100 steps = 300 rows
    free = llm.attribute_batch(PROMPTS, TARGETS, **kw)
    assert max(seen) == 64, seen
    seen.clear()
    budget._settled.clear()
    budget._progress.clear()
    tight = llm.attribute_batch(PROMPTS, TARGETS, **kw, memory_budget="2MB")
    assert seen[0] == 64 and max(seen[1:]) < 32 and sum(seen) == 300, seen
    for a, b in zip(free.token_attr, tight.token_attr):
        close(a, b, rtol=1e-5)
