"""Latency and peak-memory benchmark of the attention read-out (issue: performance). Writes a Markdown table.

    python benchmarks/bench.py --model smollm2 --out docs/benchmarks.md

Every measurement runs in a fresh process, so peak RSS (CPU) or peak allocated memory (CUDA) is its own.
`--random-weights mistralai/Mistral-7B-Instruct-v0.2`-style configs can be given with --config-json for GPU runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEM_LIMIT_MB = 20 * 1024  # eager output_attentions runs are capped at this address space so the machine survives


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(model: str, keep: int | None, dtype: str, device: str, config_json: str | None):
    import torch

    from corexp.models import LoadedModel, load_model
    from helpers_bench import compose

    if config_json:  # random weights from a config (architecture-only GPU runs)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from corexp.attention import register
        from corexp.models import DTYPES, truncated_config

        cfg = AutoConfig.for_model(**json.loads(Path(config_json).read_text()))
        cfg, full, kept = truncated_config(cfg, keep)
        torch.manual_seed(0)
        with torch.device(device):
            m = AutoModel.from_config(cfg, attn_implementation=register(), dtype=DTYPES[dtype]).eval()
        tok = AutoTokenizer.from_pretrained(str(ROOT / "benchmarks" / "tokenizer")) if (ROOT / "benchmarks" / "tokenizer").exists() else None
        return LoadedModel(m, tok, "random", full, kept, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.max_position_embeddings, torch.device(device), DTYPES[dtype], None, "random")
    cfg = compose([f"model={model}", f"model.dtype={dtype}", f"model.device={device}"])
    return load_model(cfg.model, Path(cfg.paths.cache_dir), keep_layers=keep)


def _prompt(lm, n_tokens: int | None, n_docs: int | None, max_words: int):
    from corexp.data import load_local
    from corexp.prompt import encode, prepare_text, resolve_template
    from helpers_bench import compose, sample_dir

    cfg = compose([f"prompt.max_words={max_words}"])
    ds = load_local(sample_dir(), "test", "sample")
    docs = [prepare_text(d.title, d.text, "text", max_words) for d in ds.docs.iter_docs()]
    query = next(iter(ds.queries.values()))
    template = resolve_template("chatml" if lm.tokenizer is not None and "im_start" in str(lm.tokenizer.special_tokens_map) else "plain", lm.tokenizer)
    k = n_docs or 5
    while True:
        enc = encode(lm.tokenizer, docs[:k], query, cfg.prompt, template, cfg.prompt.instruction)
        if n_docs or enc.length >= n_tokens:
            return cfg.prompt, template, docs[:k], query, enc
        k += 2


def task(spec: dict) -> dict:
    if spec["kind"] == "eager_attn" and not spec["device"].startswith("cuda"):
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT_MB * 2**20 + 4 * 2**30, resource.RLIM_INFINITY))
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    torch.manual_seed(0)
    lm = _load(spec["model"], spec.get("keep"), spec["dtype"], spec["device"], spec.get("config_json"))
    base = _peak_mb(spec["device"])
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    prompt_cfg, template, docs, query, enc = _prompt(lm, spec.get("tokens"), spec.get("docs"), spec.get("max_words", 300))
    from corexp.data import Document
    from corexp.reranker import AttentionReranker

    heads = None if spec.get("heads") is None else [tuple(h) for h in spec["heads"]]
    rr = AttentionReranker(lm, prompt_cfg, heads, template="plain")
    rr.template = template
    ids = enc.input_ids.to(lm.device)
    kind = spec["kind"]

    def run_once():
        if kind == "rerank":
            rr.score(query, [Document(str(i), "", d) for i, d in enumerate(docs)])
        elif kind == "plain_sdpa":
            lm.model.config._attn_implementation = "sdpa"
            with torch.inference_mode():
                lm.model(ids, use_cache=False)
        elif kind == "eager_attn":
            lm.model.set_attn_implementation("eager")
            with torch.inference_mode():
                out = lm.model(ids, output_attentions=True, use_cache=False)
                torch.stack([a[0, :, enc.q_start:enc.q_end].float().mean(1) for a in out.attentions])
        elif kind == "detection":
            rr.head_doc_masses(query, [Document(str(i), "", d) for i, d in enumerate(docs)])
        if spec["device"].startswith("cuda"):
            torch.cuda.synchronize()

    run_once()  # warm-up
    times, passes = [], []
    for _ in range(spec.get("repeats", 2)):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    if kind == "rerank":
        passes = rr.stats.pass_tokens
    return {"kind": kind, "tokens": enc.length, "docs": len(docs), "seconds": statistics.median(times),
            "peak_mb": _peak_mb(spec["device"]) - base, "kept_layers": lm.kept_layers, "layers": lm.num_layers,
            "pass_tokens": passes}


def _child(spec: dict, conn) -> None:
    conn.send(task(spec))
    conn.close()


def measure(spec: dict) -> dict | None:
    """Run one measurement in a fresh process; None if it died (e.g. killed for memory)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, child))
    proc.start()
    child.close()
    try:
        result = parent.recv() if parent.poll(timeout=3600) else None
    except EOFError:  # the child died before sending (e.g. its allocation failed)
        result = None
    proc.join()
    if proc.exitcode != 0:
        print(f"measurement {spec['kind']} at {spec.get('tokens') or spec.get('docs')} died (exit {proc.exitcode})", file=sys.stderr)
        return None
    return result


def na_pass_share(spec: dict) -> dict:
    """Time of the N/A suffix pass relative to the main (prefix + query) pass, inside one process."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    lm = _load(spec["model"], None, spec["dtype"], spec["device"], spec.get("config_json"))
    prompt_cfg, template, docs, query, enc = _prompt(lm, spec["tokens"], None, 300)
    from corexp.prompt import encode
    from corexp.reranker import AttentionReranker
    import copy

    rr = AttentionReranker(lm, prompt_cfg, None, template="plain")
    rr.template = template
    na = encode(lm.tokenizer, docs, "N/A", prompt_cfg, template, prompt_cfg.instruction)
    t_main, t_na = [], []
    for _ in range(spec.get("repeats", 2) + 1):
        t0 = time.perf_counter()
        cache = rr._prefix(enc.input_ids, enc.q_start)
        cache2 = copy.deepcopy(cache)
        rr._suffix_readout(enc.input_ids, enc.q_start, enc.q_end, cache, None)
        t1 = time.perf_counter()
        rr._suffix_readout(na.input_ids, na.q_start, na.q_end, cache2, None)
        t2 = time.perf_counter()
        t_main.append(t1 - t0)
        t_na.append(t2 - t1)
    return {"main_s": statistics.median(t_main[1:]), "na_s": statistics.median(t_na[1:]), "tokens": enc.length,
            "na_tokens": na.length - na.q_start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--scaling", type=int, nargs="*", default=[10, 20, 40, 100])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--config-json", default=None, help="random-weight architecture (HF config JSON) instead of --model")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    a = ap.parse_args()
    common = {"model": a.model, "dtype": a.dtype, "device": a.device, "repeats": a.repeats, "config_json": a.config_json}
    lines = [f"# Benchmark: {a.model if not a.config_json else a.config_json} ({a.dtype}, {a.device})", "",
             f"Machine: {platform.processor() or platform.machine()}, torch threads {__import__('torch').get_num_threads()}; median of {a.repeats} runs after a warm-up; "
             "peak memory above the loaded weights (CPU: max RSS, CUDA: max allocated). Command: `python benchmarks/bench.py "
             + " ".join(sys.argv[1:]) + "`", ""]
    rows = []
    for n in a.tokens:
        r = {k: measure({**common, "kind": k, "tokens": n}) for k in ("rerank", "plain_sdpa", "detection")}
        if not a.skip_eager:
            r["eager_attn"] = measure({**common, "kind": "eager_attn", "tokens": n})
        layers = r["rerank"]["layers"]
        half = measure({**common, "kind": "rerank", "tokens": n, "keep": layers // 2})
        na = na_pass_share({**common, "tokens": n})
        rows.append((n, r, half, na))
    lines += ["| prompt tokens | re-rank (2 passes) s | plain SDPA forward s | P1 ratio (≤1.1) | eager output_attentions s | P2 speed-up (≥5) | "
              "P2 peak MB re-rank / eager | P2 memory ratio (≥20) | P3 L/2 latency ratio (≤0.55) | P3 peak MB full → L/2 | "
              "P4 N/A / main pass (≤0.10) | P5 detection / forward (≤1.3) |", "|" + "---|" * 12]
    for n, r, half, na in rows:
        rr_, sd, det = r["rerank"], r["plain_sdpa"], r["detection"]
        ea = r.get("eager_attn")
        if "eager_attn" in r and ea is None:
            ea = {"seconds": float("nan"), "peak_mb": float("nan"), "died": True}
        lines.append(
            f"| {rr_['tokens']} | {rr_['seconds']:.2f} | {sd['seconds']:.2f} | {rr_['seconds'] / sd['seconds']:.2f} | "
            + (("killed (out of memory) | – | " + f"{rr_['peak_mb']:.0f} / >{MEM_LIMIT_MB:.0f} | >{MEM_LIMIT_MB / max(rr_['peak_mb'], 1):.0f}× | ") if ea and ea.get("died") else
               (f"{ea['seconds']:.2f} | {ea['seconds'] / rr_['seconds']:.1f}× | {rr_['peak_mb']:.0f} / {ea['peak_mb']:.0f} | {ea['peak_mb'] / max(rr_['peak_mb'], 1):.1f}× | " if ea else "– | – | – | – | "))
            + f"{half['seconds'] / rr_['seconds']:.2f} (L'={half['kept_layers']}/{rr_['layers']}) | {rr_['peak_mb']:.0f} → {half['peak_mb']:.0f} | "
            f"{na['na_s'] / na['main_s']:.3f} ({na['na_tokens']} tok) | {det['seconds'] / sd['seconds']:.2f} |")
    if a.scaling:
        lines += ["", "P6 scaling (re-rank, both passes; DL-style short documents: 50 words each):", "",
                  "| candidates | prompt tokens | seconds | peak MB |", "|---|---|---|---|"]
        for k in a.scaling:
            s = measure({**common, "kind": "rerank", "docs": k, "max_words": 50})
            lines.append(f"| {k} | {s['tokens']} | {s['seconds']:.2f} | {s['peak_mb']:.0f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
