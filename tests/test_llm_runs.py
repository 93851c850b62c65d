"""Dataset runs of LLMGradientAttribution: fastattr.run(..., method="llm_integrated_gradients") over
a JSONL of prompts (some with targets, some generated) equals LLMGradientAttribution.attribute per
prompt, read back with plain h5py; resume after a failed batch; seq_only; the CLI with a local
Hugging Face directory (``--model hf:DIR``). Skipped when transformers is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
h5py = pytest.importorskip("h5py")

from llm_models import gpt2, prompts, word_tokenizer  # noqa: E402

import fastattr  # noqa: E402
from fastattr.errors import OptionError, SourceError  # noqa: E402
from fastattr.llm import api  # noqa: E402

warnings.filterwarnings("ignore", message=".*attention_mask.*")

WORDS = 120
TOK = word_tokenizer(WORDS, bos=True)
PROMPTS = prompts(5, 3, 8, WORDS, seed=3)
TARGETS = ["w5 w6 w7", None, "w9", None, "w1 w2 w3 w4 w5"]  # None: generated
GEN = {"max_new_tokens": 4, "do_sample": False}
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def model():
    return gpt2(len(TOK), layers=1, dim=32, heads=2)


def write_jsonl(path, rows=None):
    rows = rows if rows is not None else [{"prompt": p, **({"target": t} if t is not None else {})} for p, t in zip(PROMPTS, TARGETS)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def reference(model, seq_only=False):
    llm = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(model, model.get_input_embeddings()), TOK)
    return [
        llm.attribute(p, target=t, gen_args=None if t is not None else GEN, n_steps=STEPS, baselines=1, seq_only=seq_only)
        for p, t in zip(PROMPTS, TARGETS)
    ]


def read_h5(run_dir) -> dict[str, np.ndarray]:
    """Every dataset of every finalized shard, concatenated in sample order, with plain h5py."""
    parts: dict[str, list] = {}
    for shard in sorted(run_dir.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            f.visititems(lambda name, obj: parts.setdefault(name, []).append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


def run(model, data, out, **kw):
    opts = {"method": "llm_integrated_gradients", "tokenizer": TOK, "n_steps": STEPS, "baselines": 1, "gen_args": GEN,
            "examples_per_batch": 2, "shard_size": 2, "progress": False, **kw}  # fmt: skip
    return fastattr.run(model, data, out, **opts)


def check_against(stored, refs, seq_only=False):
    lmax = max(len(r.seq_attr) for r in refs)
    tmax = max(max(len(r.target_ids) for r in refs), GEN["max_new_tokens"])
    assert stored["attributions/seq_attr"].shape == (5, lmax)
    if not seq_only:
        assert stored["attributions/token_attr"].shape == (5, tmax, lmax)
    for i, r in enumerate(refs):
        n, t = len(r.seq_attr), len(r.target_ids)
        assert stored["extras/prompt_length"][i] == n and stored["extras/target_length"][i] == t
        assert bool(stored["extras/generated"][i]) == (TARGETS[i] is None)
        np.testing.assert_array_equal(stored["extras/prompt_ids"][i, :n], r.input_ids.numpy())
        np.testing.assert_array_equal(stored["extras/target_ids"][i, :t], r.target_ids.numpy())
        assert (stored["extras/target_ids"][i, t:] == TOK.pad_token_id).all()
        np.testing.assert_allclose(stored["extras/target_log_probs"][i, :t], r.target_log_probs.numpy(), rtol=1e-4, atol=1e-5)
        scale = float(r.seq_attr.abs().max())
        np.testing.assert_allclose(stored["attributions/seq_attr"][i, :n], r.seq_attr.numpy(), rtol=1e-4, atol=1e-4 * scale)
        assert not stored["attributions/seq_attr"][i, n:].any()
        np.testing.assert_allclose(stored["output"][i], float(r.target_log_probs.sum()), rtol=1e-4)
        np.testing.assert_allclose(stored["delta"][i], float(r.seq_delta), atol=1e-3 * max(1.0, abs(float(r.target_log_probs.sum()))))
        if not seq_only:
            tok = stored["attributions/token_attr"][i]
            np.testing.assert_allclose(tok[:t, :n], r.token_attr.numpy(), rtol=1e-4, atol=1e-4 * float(r.token_attr.abs().max()))
            assert not tok[t:].any() and not tok[:, n:].any()
            np.testing.assert_allclose(stored["extras/token_delta"][i, :t], r.delta.numpy(), atol=1e-3)


def test_run_over_jsonl_equals_attribute_per_prompt(tmp_path, model):
    data = write_jsonl(tmp_path / "prompts.jsonl")
    summary = run(model, data, tmp_path / "r")
    assert summary.complete and summary.computed == 5
    check_against(read_h5(tmp_path / "r"), reference(model))
    meta = fastattr.open(tmp_path / "r").metadata
    assert meta["method"] == "llm_integrated_gradients" and meta["params"]["gen_args"] == GEN
    assert meta["params"]["layer"] == "transformer.wte" and meta["params"]["tokenizer"]["size"] == len(TOK)


def test_token_id_data_and_seq_only(tmp_path, model):
    rows = [{"prompt": TOK.encode(p), **({"target": TOK.encode(t, add_special_tokens=False)} if t else {})} for p, t in zip(PROMPTS, TARGETS)]
    run(model, rows, tmp_path / "s", seq_only=True)
    stored = read_h5(tmp_path / "s")
    assert "attributions/token_attr" not in stored and "extras/token_delta" not in stored
    check_against(stored, reference(model, seq_only=True), seq_only=True)


def test_resume_after_a_failed_batch_gives_the_same(tmp_path, model, monkeypatch):
    data = write_jsonl(tmp_path / "prompts.jsonl")
    real, calls = api.LLMGradientAttribution.attribute_batch, []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second batch")
        return real(self, *a, **k)

    monkeypatch.setattr(api.LLMGradientAttribution, "attribute_batch", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(model, data, tmp_path / "r")
    monkeypatch.setattr(api.LLMGradientAttribution, "attribute_batch", real)
    assert len(fastattr.open(tmp_path / "r")) == 2  # the first batch was written before the failure
    again = run(model, data, tmp_path / "r")
    assert again.complete and again.computed == 3
    check_against(read_h5(tmp_path / "r"), reference(model))


def test_bad_prompt_data_and_options(tmp_path, model):
    with pytest.raises(SourceError, match="line 2"):
        (tmp_path / "b.jsonl").write_text('{"prompt": "w1"}\n{oops\n')
        run(model, tmp_path / "b.jsonl", tmp_path / "x")
    with pytest.raises(SourceError, match="no 'prompt'"):
        run(model, [{"text": "w1"}], tmp_path / "y")
    with pytest.raises(OptionError, match="max_new_tokens"):
        run(model, ["w1 w2"], tmp_path / "z", gen_args={"do_sample": False})
    with pytest.raises(OptionError, match="auto"):
        run(model, ["w1 w2"], tmp_path / "z", n_steps="auto")
    with pytest.raises(OptionError, match="forward_args_inputs"):
        run(model, ["w1 w2"], tmp_path / "f", forward_args_inputs=1)


def test_id_array_data_generates_every_target(tmp_path, model):
    ids = np.array([TOK.encode("w1 w2 w3"), TOK.encode("w4 w5 w6")])  # (N, L): one prompt a row
    run(model, ids, tmp_path / "a", seq_only=True)
    stored = read_h5(tmp_path / "a")
    llm = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(model, model.get_input_embeddings()), TOK)
    for i, row in enumerate(ids):
        ref = llm.attribute(torch.tensor(row), gen_args=GEN, n_steps=STEPS, baselines=1, seq_only=True)
        assert stored["extras/generated"][i] and stored["extras/target_length"][i] == len(ref.target_ids)
        np.testing.assert_array_equal(stored["extras/target_ids"][i, : len(ref.target_ids)], ref.target_ids.numpy())
        np.testing.assert_allclose(stored["attributions/seq_attr"][i], ref.seq_attr.numpy(), rtol=1e-4, atol=1e-6)


def test_cli_runs_a_local_hf_directory(tmp_path, model):
    model_dir = tmp_path / "gpt2"
    model.save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "prompts.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastattr", "--quiet", "run", "--model", f"hf:{model_dir}", "--data", str(data), "--out", str(tmp_path / "c"),
           "--steps", str(STEPS), "--baseline", "1", "--gen-arg", "max_new_tokens=4", "--gen-arg", "do_sample=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    check_against(read_h5(tmp_path / "c"), reference(model))
    bad = subprocess.run([*cmd[:6], f"hf:{tmp_path / 'missing'}", *cmd[7:]], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "hf:" in bad.stderr and "Traceback" not in bad.stderr
    # fastattr render: token-by-token heatmaps labelled with the tokens (in process: the run is on disk)
    pytest.importorskip("matplotlib")
    from fastattr.cli import main
    from fastattr.llm.render import render_llm

    png = tmp_path / "heat.png"
    assert main(["render", str(tmp_path / "c"), "--index", "0:3", "--out", str(png), "--tokenizer", f"hf:{model_dir}"]) == 0
    assert png.stat().st_size > 1000
    with fastattr.open(tmp_path / "c") as store:
        drawn = render_llm(store[0:2], str(tmp_path / "two.png"), tokenizer=TOK)
    for i, (xs, ys) in enumerate(drawn):
        assert xs == TOK.convert_ids_to_tokens(TOK.encode(PROMPTS[i]))
        assert len(ys) == int(read_h5(tmp_path / "c")["extras/target_length"][i]) and all(y.startswith(("w", "<")) for y in ys)
    assert drawn[0][1] == TARGETS[0].split()


def test_audit_text_deletion_against_a_direct_computation(tmp_path, model):
    from fastattr.audit import audit_run

    run(model, write_jsonl(tmp_path / "prompts.jsonl"), tmp_path / "r")
    doc = audit_run(tmp_path / "r", model=model, top_k=2, seed=0).doc
    td = doc["text_deletion"]
    assert td["samples"] == 5 and td["baseline_token"] == 1 and td["k_mean"] == 2
    stored = read_h5(tmp_path / "r")
    drops = []
    for i in range(5):  # replace the two highest-seq_attr prompt tokens by token 1 and score the stored target
        n, t = stored["extras/prompt_length"][i], stored["extras/target_length"][i]
        prompt, target = torch.tensor(stored["extras/prompt_ids"][i, :n]), torch.tensor(stored["extras/target_ids"][i, :t])
        cut = prompt.clone()
        cut[np.argsort(-stored["attributions/seq_attr"][i, :n], kind="stable")[:2]] = 1
        lp = []
        for p in (prompt, cut):
            with torch.no_grad():
                logits = model(torch.cat([p, target[:-1]])[None]).logits[0, n - 1 :].log_softmax(-1)
            lp.append(float(logits.gather(1, target[:, None]).sum()))
        drops.append(lp[0] - lp[1])
        np.testing.assert_allclose(lp[0], stored["extras/target_log_probs"][i, :t].sum(), rtol=1e-4)
    np.testing.assert_allclose(td["drop"]["mean"], np.mean(drops), rtol=1e-5, atol=1e-6)
    assert np.isfinite(td["random_drop"]["mean"]) and td["beats_random"] == (td["drop"]["mean"] > td["random_drop"]["mean"])
    from fastattr.errors import AuditError

    with pytest.raises(AuditError, match="LLM run"):
        audit_run(tmp_path / "r", model=model, data=str(tmp_path / "prompts.jsonl"))


def test_cli_audit_of_an_llm_run(tmp_path, model):
    pytest.importorskip("matplotlib")
    from fastattr.cli import main

    model_dir = tmp_path / "gpt2"
    model.save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    run(model, write_jsonl(tmp_path / "prompts.jsonl"), tmp_path / "r")
    assert main(["--quiet", "audit", str(tmp_path / "r"), "--model", f"hf:{model_dir}", "--top-k", "2", "--report", str(tmp_path / "rep")]) == 0
    doc = json.loads((tmp_path / "rep" / "audit.json").read_text())
    assert doc["text_deletion"]["samples"] == 5 and "Text deletion" in (tmp_path / "rep" / "report.md").read_text()


def test_torchrun_two_ranks_give_the_same_run(tmp_path, model):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = os.path.join(os.path.dirname(sys.executable), "fastattr")
    if not (os.path.exists(torchrun) and os.path.exists(script) and torch.distributed.is_available()):
        pytest.skip("torchrun / the fastattr script / torch.distributed not available")
    model_dir = tmp_path / "gpt2"
    model.save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "prompts.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", script, "--quiet", "run", "--model", f"hf:{model_dir}", "--data", str(data),
           "--out", str(tmp_path / "d"), "--steps", str(STEPS), "--baseline", "1", "--gen-arg", "max_new_tokens=4", "--gen-arg", "do_sample=false",
           "--shard-size", "2", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "d" / "manifest.json").read_text())
    ids = [int(s["file"][len("shard-") : -len(".h5")]) for s in meta["shards"]]
    assert meta["status"] == "complete" and {i % 2 for i in ids} == {0, 1}  # rank r names its shards r, r + 2, ...: both wrote
    check_against(read_h5(tmp_path / "d"), reference(model))
