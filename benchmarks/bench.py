"""Latency and peak-memory benchmark of the attention read-out (issue: performance). Writes a Markdown table.

    python benchmarks/bench.py --model smollm2 --out docs/benchmarks.md

Every measurement runs in a fresh process, so peak RSS (CPU) or peak allocated memory (CUDA) is its own.
GPU, random weights of a real architecture (config only, no download):
    python benchmarks/bench.py --config-json benchmarks/configs/mistral-7b-instruct-v0.2.json --tokenizer <folder> \\
        --dtype bfloat16 --device cuda
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


from corexp.engine.memory import PeakMemory  # noqa: E402  (peak above the start: RSS sampled every ms, or CUDA's allocator peak)


def _load(model: str, keep: int | None, dtype: str, device: str, config_json: str | None, tokenizer: str | None = None):
    import torch

    from corexp.engine.models import LoadedModel, load_model

    from helpers_bench import compose

    if config_json:  # random weights from a config (architecture-only GPU runs)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from corexp.engine.attention import register
        from corexp.engine.models import DTYPES, truncated_config

        fields = {k: v for k, v in json.loads(Path(config_json).read_text()).items() if not k.startswith("_")}
        cfg = AutoConfig.for_model(**fields)
        cfg, full, kept = truncated_config(cfg, keep)
        torch.manual_seed(0)
        with torch.device(device):
            m = AutoModel.from_config(cfg, attn_implementation=register(), dtype=DTYPES[dtype]).eval()
        tok = AutoTokenizer.from_pretrained(tokenizer)
        return LoadedModel(m, tok, "random", full, kept, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.max_position_embeddings, torch.device(device), DTYPES[dtype], None, "random")
    job = compose([f"model={model}", f"model.dtype={dtype}", f"model.device={device}"])
    return load_model(job.model, job.paths.cache, keep_layers=keep)


def _prompt(lm, n_tokens: int | None, n_docs: int | None, max_words: int):
    from corexp.data.datasets import load_local
    from corexp.engine.prompt import encode, prepare_text, resolve_template

    from helpers_bench import compose, sample_dir

    job = compose([f"prompt.max_words={max_words}"])
    ds = load_local(sample_dir(), "test", "sample")
    docs = [prepare_text(d.title, d.text, job.prompt.doc_field, max_words, job.prompt.words) for d in ds.docs.iter_docs()]
    query = next(iter(ds.queries.values()))
    chatml = lm.tokenizer is not None and "im_start" in str(lm.tokenizer.special_tokens_map)
    template = resolve_template("chatml" if chatml else "plain", lm.tokenizer)
    k = n_docs or 5
    while True:
        enc = encode(lm.tokenizer, docs[:k], query, job.prompt, template, job.prompt.instruction)
        if n_docs or enc.length >= n_tokens:
            return job.prompt, template, docs[:k], query, enc
        k += 2


def cpu_description() -> str:
    """The CPU model, its cores and whether it has the bf16 instructions that make bfloat16 fast on a CPU."""
    import os

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags]
    native = "has" if {"avx512_bf16", "amx_bf16"} & flags else "no"
    return f"{name}, {os.cpu_count()} cores, {'/'.join(bf16) or 'no AVX'} ({native} bf16 instructions)"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _workload(spec: dict, keep: int | None = None, max_words: int = 300, one_pass: bool = True):
    """Model, prompt and re-ranker of one measurement (the N-token prompt of `spec`, or its N documents)."""
    from corexp.data.datasets import Document
    from corexp.engine.reranker import AttentionReranker

    lm = _load(spec["model"], keep, spec["dtype"], spec["device"], spec.get("config_json"), spec.get("tokenizer"))
    lm.max_context = 10**7  # long-prompt points may exceed the model's trained context: a cost measurement only
    prompt_cfg, template, docs, query, enc = _prompt(lm, spec.get("tokens"), spec.get("docs"), max_words)
    rr = AttentionReranker(lm, prompt_cfg, None, template="plain", one_pass=spec.get("one_pass", one_pass))
    rr.prompt.template = template
    return lm, rr, enc, query, [Document(str(i), "", d) for i, d in enumerate(docs)]


def _plain_forward(lm, ids) -> None:
    """The same model over the same prompt with SDPA and no read-out: the floor a re-rank is compared with."""
    import torch

    from corexp.engine.attention import ATTN_IMPLEMENTATION

    lm.model.config._attn_implementation = "sdpa"
    try:
        with torch.inference_mode():
            lm.model(ids, use_cache=False)
    finally:
        lm.model.config._attn_implementation = ATTN_IMPLEMENTATION


def task(spec: dict) -> dict:
    """One variant in a fresh process: peak memory of its first call, then `repeats` timed calls (median)."""
    if spec["kind"] == "eager_attn" and not spec["device"].startswith("cuda"):
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT_MB * 2**20 + 4 * 2**30, resource.RLIM_INFINITY))
    import torch

    torch.manual_seed(0)
    lm, rr, enc, query, documents = _workload(spec, spec.get("keep"), spec.get("max_words", 300))
    ids = enc.input_ids.to(lm.device)
    kind = spec["kind"]

    def run_once():
        if kind == "rerank":
            rr.score(query, documents)
        elif kind == "plain_sdpa":
            _plain_forward(lm, ids)
        elif kind == "eager_attn":
            lm.model.set_attn_implementation("eager")
            with torch.inference_mode():
                out = lm.model(ids, output_attentions=True, use_cache=False)
                torch.stack([a[0, :, enc.q_start:enc.q_end].float().mean(1) for a in out.attentions])
        elif kind == "detection":
            rr.detection_readout(query, documents)
        _sync(spec["device"])

    with PeakMemory(spec["device"]) as mem:  # the first call: nothing cached yet, so its peak is the real cost
        run_once()
    times = []
    for _ in range(spec.get("repeats", 2)):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    return {"kind": kind, "tokens": enc.length, "docs": len(documents), "seconds": statistics.median(times) if times else None,
            "peak_mb": mem.peak_mb, "kept_layers": lm.kept_layers, "layers": lm.num_layers}


def interleaved(spec: dict) -> dict:
    """Latencies of re-rank, plain forward, detection and truncated re-ranks, interleaved round by round in one
    process, so that drift of a shared machine (other tenants, clocks) hits every variant alike; medians."""
    import torch

    torch.manual_seed(0)
    from corexp.engine.reranker import AttentionReranker

    lm, full, enc, query, documents = _workload(spec)
    two = AttentionReranker(lm, full.spec, None, template="plain", one_pass=False)
    two.prompt.template = full.template
    ids = enc.input_ids.to(lm.device)
    cuts = {keep: _workload(spec, keep)[1] for keep in spec["keeps"]}
    last: dict[str, object] = {}  # each re-ranker's last statistics (returned with its scores)

    def scored(name, rr):
        last[name] = rr.score(query, documents).stats

    fns = {"rerank": lambda: scored("one", full), "rerank_two_pass": lambda: scored("two", two),
           "plain_sdpa": lambda: _plain_forward(lm, ids), "detection": lambda: full.detection_readout(query, documents)}
    fns.update({f"rerank_keep{k}": (lambda r=r: r.score(query, documents)) for k, r in cuts.items()})
    times: dict[str, list[float]] = {k: [] for k in fns}
    passes: dict[str, list[float]] = {"main": [], "na": []}
    for round_ in range(spec.get("repeats", 2) + 1):  # round 0 warms up
        for name, fn in fns.items():
            _sync(spec["device"])
            t0 = time.perf_counter()
            fn()
            _sync(spec["device"])
            if round_:
                times[name].append(time.perf_counter() - t0)
                if name == "rerank_two_pass":
                    passes["main"].append(sum(last["two"].pass_seconds[:-1]))
                    passes["na"].append(last["two"].pass_seconds[-1])
    out = {k: statistics.median(v) for k, v in times.items()}
    one_stats, two_stats = last["one"], last["two"]
    out.update(tokens=enc.length, layers=lm.num_layers, na_tokens=two_stats.pass_tokens[-1],
               main_pass=statistics.median(passes["main"]), na_pass=statistics.median(passes["na"]),
               passes_one=len(one_stats.pass_tokens), passes_two=len(two_stats.pass_tokens),
               one_pass_tokens=one_stats.pass_tokens[0], rounds=spec.get("repeats", 2))
    return out


def agreement_scores(spec: dict) -> dict:
    """ICR scores of the first N test queries (BM25 top-20), one dtype: the embedded SciFact sample, or a BEIR-layout
    folder with a run file (`--agreement-data`, e.g. ../shared/data/dl19)."""
    from corexp.components.first_stage import candidates
    from corexp.data.datasets import load_local, select_queries
    from corexp.engine.reranker import AttentionReranker

    from helpers_bench import compose, sample_dir

    lm = _load(spec["model"], None, spec["dtype"], spec["device"], None)
    job = compose([f"model={spec['model']}"])
    folder = spec.get("data")
    ds = load_local(folder or sample_dir(), "test", Path(folder).name if folder else "sample",
                    run_file=str(Path(folder) / "run.bm25.trec") if folder else None)
    qids = select_queries(ds, spec["queries"], None)
    run = candidates(ds.run, 20, False)
    rr = AttentionReranker(lm, job.prompt, None, job.model.template, job.prompt.instruction)
    out, t0 = {}, time.perf_counter()
    for q in qids:
        ids = [d for d, _ in run[q]]
        found = ds.docs.get_many(ids)
        out[q] = dict(zip(ids, rr.score(ds.queries[q], [found[d] for d in ids], q).scores))
    secs = (time.perf_counter() - t0) / len(qids)
    import ir_measures

    ndcg = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], {q: ds.qrels[q] for q in qids}, out)[ir_measures.nDCG @ 10]
    return {"scores": out, "seconds_per_query": secs, "ndcg10": float(ndcg)}


def agreement(a_scores: dict, b_scores: dict) -> dict:
    """Share of queries with the same top-10 (in order), mean top-10 overlap, mean Kendall tau over all candidates."""
    from scipy.stats import kendalltau

    same, overlap, taus = [], [], []
    for q, a in a_scores.items():
        b = b_scores[q]
        ids = sorted(a)
        top_a = sorted(ids, key=lambda d: -a[d])[:10]
        top_b = sorted(ids, key=lambda d: -b[d])[:10]
        same.append(top_a == top_b)
        overlap.append(len(set(top_a) & set(top_b)) / 10)
        taus.append(kendalltau([a[d] for d in ids], [b[d] for d in ids]).statistic)
    n = len(same)
    return {"queries": n, "identical_top10": sum(same) / n, "top10_overlap": sum(overlap) / n,
            "kendall_tau": sum(taus) / n}


def _child(spec: dict, conn) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))  # helpers_bench, in the spawned process

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    fn = {"agreement": agreement_scores, "interleaved": interleaved}.get(spec["kind"], task)
    conn.send(fn(spec))
    conn.close()


def measure(spec: dict) -> dict | None:
    """Run one measurement in a fresh process; None if it died (e.g. killed for memory)."""
    what = spec.get("tokens") or spec.get("docs") or spec.get("queries")
    print(f"[bench] {spec['kind']} {spec['dtype']} {what} (keep={spec.get('keep')})", file=sys.stderr, flush=True)
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
    print(f"[bench] result {json.dumps({k: v for k, v in result.items() if k != 'scores'})}", file=sys.stderr, flush=True)
    return result


def e2e_default_job(queries: int | None) -> dict:
    """Wall time of the README's default job (`python -m corexp`), process start to exit, model already cached."""
    import subprocess

    cmd = [sys.executable, "-m", "corexp", "force=true", "progress=false", "tracking.experiment=benchmark"]
    if queries:
        cmd.append(f"data.max_queries={queries}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    seconds = time.perf_counter() - t0
    n = queries or 50
    return {"queries": n, "seconds": seconds, "qpm": 60 * n / seconds, "command": " ".join(["python", "-m", "corexp", *cmd[3:]])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, nargs="*", default=[2048, 4096], help="prompt lengths of P1-P5 (none: skip them)")
    ap.add_argument("--scaling", type=int, nargs="*", default=[10, 20, 40, 100])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per measurement (0: torch's default)")
    ap.add_argument("--config-json", default=None, help="random-weight architecture (HF config JSON) instead of --model")
    ap.add_argument("--tokenizer", default=None, help="with --config-json: a tokenizer folder whose ids fit the config's vocab")
    ap.add_argument("--truncate", type=float, nargs="*", default=[0.5], help="P3: fractions of layers to drop")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--long", type=int, nargs="*", default=[], help="long-prompt points (tokens): re-rank vs plain forward")
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 at the first prompt length")
    ap.add_argument("--agreement", type=int, default=0, help="bf16 vs fp32 ranking agreement on N SciFact queries")
    ap.add_argument("--agreement-data", default=None,
                    help="BEIR-layout folder with run.bm25.trec for --agreement (default: the embedded SciFact sample)")
    ap.add_argument("--e2e", type=int, default=-1, help="queries of the default job to time end to end (0: all 50; -1: skip)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    a = ap.parse_args()
    import torch

    common = {"model": a.model, "dtype": a.dtype, "device": a.device, "repeats": a.repeats, "config_json": a.config_json,
              "threads": a.threads, "tokenizer": a.tokenizer}
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else (platform.processor() or platform.machine())
    lines = [f"# Benchmark: {a.model if not a.config_json else Path(a.config_json).stem} ({a.dtype}, {a.device})", "",
             f"CPU: {cpu_description()}", "",
             f"Device: {device_name}, torch {torch.__version__}, threads {a.threads or torch.get_num_threads()}; peak memory "
             "above what was in use before the call (CPU: resident set sampled every ms; CUDA: allocator peak). "
             "Command: `python benchmarks/bench.py "
             + " ".join(sys.argv[1:]) + "`", ""]
    rows = []
    for n in a.tokens:
        mem = {**common, "repeats": 0, "tokens": n}  # fresh process each: peak memory of a first call
        r = {k: measure({**mem, "kind": k}) for k in ("rerank", "plain_sdpa", "detection")}
        r["eager_attn"] = None if a.skip_eager else measure({**mem, "kind": "eager_attn", "repeats": 1})
        layers = r["rerank"]["layers"]
        keeps = [max(1, int((1 - f) * layers)) for f in a.truncate]
        cuts = [measure({**mem, "kind": "rerank", "keep": k}) for k in keeps]
        t = measure({**common, "kind": "interleaved", "tokens": n, "keeps": keeps})
        rows.append((n, r, cuts, t))
    lines += [] if not rows else [f"Latencies: median of {a.repeats} rounds after a warm-up round, the variants interleaved in one process "
              "(eager: its own process, one timed run after a first one). Peak memory: the first call, each in a fresh process.", "",
              "Re-rank = one forward per query (real and N/A query rows in one pass, tree attention; the default); "
              "two-pass = the N/A query as a second pass over the cached documents (`one_pass=False`, the previous path).", "",
              "| prompt tokens | re-rank s (one pass) | two-pass s | plain SDPA forward s | P1 ratio (≤1.1) one pass / two-pass | "
              "eager output_attentions s | P2 speed-up (≥5) | P2 peak MB re-rank / plain / eager | P2 memory ratio (≥20) | "
              "P4 second pass / main pass (≤0.10) one pass / two-pass | forward passes per query one pass / two-pass | "
              "P5 detection / forward (≤1.3) |", "|" + "---|" * 12]
    for _, r, _, t in rows:
        rr_, sd, ea = r["rerank"], r["plain_sdpa"], r["eager_attn"]
        if a.skip_eager:
            eager = "– | – | – | – | "
        elif ea is None:
            eager = (f"killed (> {MEM_LIMIT_MB / 1024:.0f} GB) | eager cannot run | "
                     f"{rr_['peak_mb']:.0f} / {sd['peak_mb']:.0f} / > {MEM_LIMIT_MB} | "
                     f"> {MEM_LIMIT_MB / max(rr_['peak_mb'], 1):.0f}× | ")
        else:
            eager = (f"{ea['seconds']:.2f} | {ea['seconds'] / t['rerank']:.1f}× | "
                     f"{rr_['peak_mb']:.0f} / {sd['peak_mb']:.0f} / {ea['peak_mb']:.0f} | "
                     f"{ea['peak_mb'] / max(rr_['peak_mb'], 1):.1f}× | ")
        lines.append(f"| {t['tokens']} | {t['rerank']:.2f} | {t['rerank_two_pass']:.2f} | {t['plain_sdpa']:.2f} | "
                     f"{t['rerank'] / t['plain_sdpa']:.2f} / {t['rerank_two_pass'] / t['plain_sdpa']:.2f} | {eager}"
                     f"{0 if t['passes_one'] == 1 else float('nan')} / {t['na_pass'] / t['main_pass']:.3f} ({t['na_tokens']} tok) | "
                     f"{t['passes_one']} / {t['passes_two']} | {t['detection'] / t['plain_sdpa']:.2f} |")
    lines += [] if not rows else ["", "P3 truncation (re-rank with the first L' layers; target: latency ratio ≤ 1.1 × L'/L):", "",
              "| prompt tokens | L' / L | latency s | latency ratio | 1.1 × L'/L | peak MB | peak MB full |",
              "|---|---|---|---|---|---|---|"]
    for _, r, cuts, t in rows:
        full = r["rerank"]
        for c in cuts:
            keep = c["kept_layers"]
            sec = t[f"rerank_keep{keep}"]
            lines.append(f"| {t['tokens']} | {keep}/{full['layers']} | {sec:.2f} | {sec / t['rerank']:.2f} | "
                         f"{1.1 * keep / full['layers']:.2f} | {c['peak_mb']:.0f} | {full['peak_mb']:.0f} |")
    if a.bf16 and a.dtype != "bfloat16" and rows:
        n = a.tokens[0]
        b16 = measure({**common, "dtype": "bfloat16", "kind": "interleaved", "tokens": n, "keeps": []})
        f32 = rows[0][3]
        lines += ["", f"bf16 vs {a.dtype} at {b16['tokens']} prompt tokens:", "",
                  f"| | {a.dtype} s | bfloat16 s | bf16 speed-up |", "|---|---|---|---|"]
        for k in ("rerank", "plain_sdpa"):
            lines.append(f"| {k} | {f32[k]:.2f} | {b16[k]:.2f} | {f32[k] / b16[k]:.2f}× |")
    if a.agreement:
        s32 = measure({**common, "kind": "agreement", "queries": a.agreement, "dtype": "float32", "data": a.agreement_data})
        s16 = measure({**common, "kind": "agreement", "queries": a.agreement, "dtype": "bfloat16", "data": a.agreement_data})
        ag = agreement(s32["scores"], s16["scores"])
        where = Path(a.agreement_data).name if a.agreement_data else "embedded SciFact sample"
        lines += ["", f"Ranking agreement, ICR bf16 vs fp32, {where}, first {ag['queries']} test queries, "
                  "BM25 top-20:", "",
                  "| nDCG@10 fp32 | nDCG@10 bf16 | identical top-10 (order) | top-10 overlap | mean Kendall τ (20 candidates) "
                  "| fp32 s/query | bf16 s/query |", "|---|---|---|---|---|---|---|",
                  f"| {s32['ndcg10']:.4f} | {s16['ndcg10']:.4f} | {ag['identical_top10']:.2f} | {ag['top10_overlap']:.3f} | "
                  f"{ag['kendall_tau']:.3f} | {s32['seconds_per_query']:.1f} | {s16['seconds_per_query']:.1f} |"]
    if a.scaling:
        lines += ["", "P6 scaling (re-rank, all passes; short documents: at most 50 words each; one timed run after the "
                  "first, whose peak memory is shown):", "",
                  "| candidates | prompt tokens | seconds | peak MB |", "|---|---|---|---|"]
        for k in a.scaling:
            sc = measure({**common, "kind": "rerank", "docs": k, "max_words": 50, "repeats": 1})
            lines.append(f"| {k} | {sc['tokens']} | {sc['seconds']:.2f} | {sc['peak_mb']:.0f} |" if sc else f"| {k} | – | died | – |")
    if a.long:
        lines += ["", "Long prompts (the papers' sizes: 40-200 documents of 300-400 words): re-rank (one pass, all heads) "
                  "against a plain SDPA forward, each in a fresh process; latency of one timed run after the first, "
                  "peak memory of the first. A point that dies (memory) marks the limit.", "",
                  "| target tokens | prompt tokens | re-rank s | plain SDPA s | ratio | peak MB re-rank | peak MB plain |",
                  "|---|---|---|---|---|---|---|"]
        for n in a.long:
            lr = measure({**common, "kind": "rerank", "tokens": n, "repeats": 1})
            lp = measure({**common, "kind": "plain_sdpa", "tokens": n, "repeats": 1})
            if lr and lp:
                lines.append(f"| {n} | {lr['tokens']} | {lr['seconds']:.2f} | {lp['seconds']:.2f} | {lr['seconds'] / lp['seconds']:.2f} | "
                             f"{lr['peak_mb']:.0f} | {lp['peak_mb']:.0f} |")
            else:
                rs = "died" if not lr else f"{lr['seconds']:.2f}"
                ps = "died" if not lp else f"{lp['seconds']:.2f}"
                lines.append(f"| {n} | – | {rs} | {ps} | – | – | – |")
    if a.e2e >= 0:
        e = e2e_default_job(a.e2e or None)
        lines += ["", f"End to end: `{e['command']}` ({e['queries']} queries, process start to exit, model cached): "
                  f"{e['seconds']:.0f} s, **{e['qpm']:.1f} queries/minute**."]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
