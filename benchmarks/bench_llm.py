"""fastattr.LLMGradientAttribution vs Captum's LLMGradientAttribution loop (and inseq), side by side.

Random-init GPT-2 and Llama built from configs with transformers, a word-level tokenizer built
in code (nothing downloaded). The same prompts (``--prompts`` of ``--lo``..``--hi`` words, plus
Llama-style BOS), the same targets (``--new`` tokens generated greedily once, then passed to
every implementation), the same baseline token (id 1, <unk>, whose embedding is not zero; also
inseq's default), Gauss-Legendre with ``--steps`` points, layer IG on the input embeddings.

Rows: Captum's loop (one prompt at a time, one LayerIG call per generated token); inseq (its
"integrated_gradients" with log-probability targets, prompts batched; its path also moves the
generated prefix towards <unk>, so its numbers are a different quantity and get no error
column); fastattr batched (token_attr), one prompt at a time, bf16, and the seq_attr-only mode.
Errors: relative L2 of token_attr (seq_attr for seq-only rows) against fastattr in float64 on a
float64 copy of the model (checked against Captum in float64 on the first prompt: "fp64 parity").
Time: one timed run after a warm-up on the first prompt (benchmarks/_harness.py's measure_once:
wall time synchronized on CUDA, and the process's CPU time); peak memory during that run: sampled
RSS above the start on CPU, the allocator's peak on CUDA. Output and JSON carry card, date, commit.

    python benchmarks/bench_llm.py                         # the RESULTS.md table (several minutes)
    python benchmarks/bench_llm.py --quick                 # 2 short prompts, smoke test
    python benchmarks/bench_llm.py --device cuda --gpu-size --threads 16   # the GPU stage (not run yet)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
from models import gpt2, llama, prompts, word_tokenizer  # noqa: E402

import fastattr  # noqa: E402

warnings.filterwarnings("ignore", message=".*attention_mask.*")
BASELINE_ID = 1  # <unk>


@dataclass
class Row:
    model: str
    impl: str
    seconds: float
    cpu_seconds: float
    peak_mb: float
    rel_err: float | None
    speedup_vs_captum: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- models (nothing downloaded)
# --------------------------------------------------------------------------- the benchmark


def run_model(kind: str, args: argparse.Namespace) -> tuple[list[Row], dict]:
    tok = word_tokenizer(args.words, bos=True)
    build = gpt2 if kind == "gpt2" else llama
    dev = torch.device(args.device)
    model = build(len(tok), layers=args.layers, dim=args.dim, heads=args.heads, init=args.init).to(dev)
    emb = model.get_input_embeddings()
    texts = prompts(args.prompts, args.lo, args.hi, args.words, seed=1)
    with torch.no_grad():
        targets = [
            model.generate(input_ids=torch.tensor([tok.encode(t)], device=dev), max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)[0, -args.new :].cpu()
            for t in texts
        ]
    kw = dict(n_steps=args.steps, baselines=BASELINE_ID)
    fa = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(model, emb), tok)
    m64 = copy.deepcopy(model).double()
    fa64 = fastattr.LLMGradientAttribution(fastattr.LayerIntegratedGradients(m64, m64.get_input_embeddings()), tok)
    ref = fa64.attribute_batch(texts, targets, **kw)
    ref_tok = torch.cat([r.token_attr.reshape(-1).cpu() for r in ref])
    ref_seq = torch.cat([r.seq_attr.cpu() for r in ref])
    info = {"model": kind, "params": sum(p.numel() for p in model.parameters()), "prompt_tokens": [len(tok.encode(t)) for t in texts]}

    from captum.attr import LayerIntegratedGradients as CLIG
    from captum.attr import LLMGradientAttribution as CLLM
    from captum.attr import TextTokenInput

    def captum(texts_: list[str], targets_: list[torch.Tensor], m: torch.nn.Module = model) -> torch.Tensor:
        c = CLLM(CLIG(m, m.get_input_embeddings()), tok)
        res = [c.attribute(TextTokenInput(t, tok, baselines=BASELINE_ID), target=y, n_steps=args.steps) for t, y in zip(texts_, targets_)]
        return torch.cat([r.token_attr.reshape(-1).cpu() for r in res])

    ref0 = ref[0].token_attr.reshape(-1).cpu()
    parity = float((captum(texts[:1], targets[:1], m64) - ref0).abs().max() / ref0.abs().max())
    info["fp64_parity_captum_vs_fastattr"] = parity
    rows: list[Row] = []

    def add(impl: str, fn: Callable[[list[str], list[torch.Tensor]], torch.Tensor], ref_: torch.Tensor | None, note: str = "") -> None:
        fn(texts[:1], targets[:1])  # warm-up on the first prompt
        gc.collect()
        timing = h.measure_once(lambda: fn(texts, targets), dev, memory_on=dev)
        (secs, peak, out), cpu = timing, timing.cpu_seconds
        err = None if ref_ is None else h.rel_err(out, ref_)
        rows.append(Row(kind, impl, secs, cpu, peak, err, note=note))
        print(f"  {kind} {impl}: {secs:.2f} s (cpu {cpu:.2f}), peak {peak:.0f} MB, err {err}", file=sys.stderr, flush=True)

    def fast(precision: str = "fp32", seq_only: bool = False, batched: bool = True) -> Callable:
        def fn(texts_: list[str], targets_: list[torch.Tensor]) -> torch.Tensor:
            if batched:
                res = list(fa.attribute_batch(texts_, targets_, precision=precision, seq_only=seq_only, **kw))
            else:
                res = [fa.attribute(t, target=y, precision=precision, seq_only=seq_only, **kw) for t, y in zip(texts_, targets_)]
            return torch.cat([(r.seq_attr if seq_only else r.token_attr).reshape(-1).cpu() for r in res])

        return fn

    add("captum loop (fp32)", captum, ref_tok)
    if not args.no_inseq and dev.type == "cpu":
        inseq_fn = _inseq(model, tok, args)
        if inseq_fn is not None:
            add("inseq (fp32)", inseq_fn, None, note="different quantity: generated prefix also interpolated")
    add("fastattr batched (fp32)", fast(), ref_tok)
    add("fastattr per prompt (fp32)", fast(batched=False), ref_tok)
    add("fastattr batched (bf16)", fast("bf16"), ref_tok)
    add("fastattr seq_only (fp32)", fast(seq_only=True), ref_seq, note="seq_attr only")
    add("fastattr seq_only (bf16)", fast("bf16", seq_only=True), ref_seq, note="seq_attr only")
    base = rows[0].seconds
    for r in rows:
        r.speedup_vs_captum = base / r.seconds
    return rows, info


def _inseq(model: torch.nn.Module, tok: object, args: argparse.Namespace) -> Callable | None:
    try:
        import inseq
    except ImportError:
        print("  inseq not installed: row skipped", file=sys.stderr)
        return None
    im = inseq.load_model(model, "integrated_gradients", tokenizer=tok)

    def fn(texts_: list[str], targets_: list[torch.Tensor]) -> torch.Tensor:
        gen = [t + " " + tok.decode(y) for t, y in zip(texts_, targets_)]
        out = im.attribute(
            texts_, generated_texts=gen, n_steps=args.steps, attributed_fn="probability",
            attributed_fn_args={"logprob": True}, show_progress=False, batch_size=len(texts_),
        )  # fmt: skip
        return torch.cat([s.target_attributions.nan_to_num().reshape(-1).cpu() for s in out.sequence_attributions])

    return fn


def table(rows: list[Row]) -> str:
    headers = ["model", "implementation", "time (s)", "CPU time (s)", "x vs Captum loop", "peak mem (MB)", "rel. error vs fp64", "note"]
    cells = [
        [r.model, r.impl, h.fmt(r.seconds, ".2f"), h.fmt(r.cpu_seconds, ".2f"), h.fmt(r.speedup_vs_captum, ".2f"), h.fmt(r.peak_mb, ".0f"), h.fmt(r.rel_err, ".2e"), r.note]
        for r in rows
    ]
    return h.markdown(headers, cells, [False, False, True, True, True, True, True, False])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt2,llama")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--lo", type=int, default=32, help="fewest words per prompt")
    p.add_argument("--hi", type=int, default=64, help="most words per prompt")
    p.add_argument("--new", type=int, default=16, help="generated tokens per prompt")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--words", type=int, default=2000)
    p.add_argument("--init", type=float, default=0.1, help="weights' std")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpu-size", action="store_true", help="the GPU stage: 12 layers x 768 (~86M parameters), 32 prompts")
    p.add_argument("--no-inseq", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 prompts of 8-12 words, 4 new tokens, 8 steps")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.lo, args.hi, args.new, args.steps = 2, 8, 12, 4, 8
    if args.gpu_size:
        args.layers, args.dim, args.heads, args.prompts = 12, 768, 12, 32
    h.true_fp32()  # Captum's fp32 is true fp32 too
    torch.set_num_threads(args.threads)
    rows, infos = [], []
    for kind in args.models.split(","):
        r, info = run_model(kind, args)
        rows += r
        infos.append(info)
    info_env = h.env(args.device)
    print(h.env_line(info_env))
    print(table(rows))
    for info in infos:
        print(f"- {info['model']}: {info['params']} parameters, prompt tokens {info['prompt_tokens']}, fp64 parity (max |captum - fastattr| / max |attr|, prompt 0): {info['fp64_parity_captum_vs_fastattr']:.1e}")
    if args.json:
        h.write_json(args.json, {"env": info_env, "date": datetime.date.today().isoformat(), "args": vars(args), "info": infos, "rows": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
