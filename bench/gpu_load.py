"""Process start to first answer token with a 7B safetensors checkpoint: the streamed loader against transformers.

Writes random-weight checkpoints at the real shapes (Llama-2-7B; Falcon-7B and FalconMamba-7B with --models) as
bf16 safetensors shards plus model.safetensors.index.json and a tokenizer, to a local folder (default under
/tmp; nothing travels), reads every shard once so the page cache holds it (nothing is dropped from it), then
for each variant starts a fresh Python process that calls ``load_fast_generator`` and streams one answer
token. Measured: wall time from just before the process starts to that token, the child's own split
(imports, load incl. warm-up), its peak host RSS (VmHWM) and peak GPU memory. "transformers" is the path
.bin checkpoints still take (a transformers model first; int4/int8 written to the disk cache on a first load,
read from it on the next). Prints a table; --results appends it to bench/RESULTS.md.

    python bench/gpu_load.py --models llama --variants bf16,int4 --results bench/RESULTS.md \\
        --commit $(git rev-parse --short HEAD)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUANT = {"bf16": "none", "int8": "8bit", "int4": "4bit"}
PROMPT_WORDS = 200


# --- writing the checkpoint ----------------------------------------------------------------------------


def write_checkpoint(config, folder: Path, shard_bytes: int = 5 * 10**9, tokenizer: str = "wordlevel") -> float:
    """Random bf16 weights under ``config``'s tensor names, in shards of at most ``shard_bytes``, and a tokenizer
    (``write_tokenizer``'s word-level one, or with "llama2" Llama-2's kind of files); GB written."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    marker = folder / "written.json"
    if marker.is_file() and json.loads(marker.read_text()) == config.to_dict() | {"tokenizer": tokenizer}:
        return 0.0
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def tensor(name: str, shape) -> torch.Tensor:
        if name.endswith("A_log"):
            return torch.log(torch.arange(1, shape[-1] + 1, device=device, dtype=torch.float32)).expand(shape)
        if len(shape) == 1 and name.endswith(("norm.weight", "norm_f.weight", "layernorm.weight", "ln_f.weight",
                                              ".D")):
            return torch.ones(shape, device=device)
        if len(shape) == 1:
            return torch.zeros(shape, device=device)
        return torch.randn(shape, device=device, generator=gen) * 0.02

    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod()) if shape else 2
        if size + n > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: tensor(n, shapes[n]).to(torch.bfloat16).cpu().contiguous() for n in names}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    if tokenizer == "llama2":  # LlamaTokenizer, tokenizer.json + tokenizer_config.json as on the Hub
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import save_llama2_tokenizer

        save_llama2_tokenizer(folder, vocab_size=config.vocab_size)
    else:
        write_tokenizer(folder, config.vocab_size)
    marker.write_text(json.dumps(config.to_dict() | {"tokenizer": tokenizer}))
    return total / 1e9


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of exactly ``vocab_size`` entries (w3, w4, ...): real files, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(folder)


def warm_page_cache(folder: Path) -> float:
    """Read every file once (so the page cache holds it); seconds taken."""
    started = time.perf_counter()

    def read(f: Path) -> None:
        buf = bytearray(64 << 20)
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(read, [f for f in folder.iterdir() if f.is_file()]))
    return time.perf_counter() - started


# --- one load, in a fresh process -------------------------------------------------------------------------


def child(args) -> None:
    started = time.time()
    import resource

    import torch

    from types import SimpleNamespace

    from localgpt.generation.fast import generator as gen

    if args.path == "transformers":
        gen.safetensors_files = lambda path: []  # the path .bin checkpoints take
    # What load_fast_generator reads of localgpt's settings (the GPU image has no pydantic for Settings itself).
    settings = SimpleNamespace(model=args.child, family=None, quantization=args.quantization, device=args.device,
                               max_new_tokens=1, temperature=0.0, top_p=1.0, context_window=None)
    imported = time.time()
    generator = gen.load_fast_generator(settings, mode=args.mode, cache_dir=Path(args.cache_dir))
    loaded = time.time()
    load_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    prompt = " ".join(f"w{100 + i}" for i in range(PROMPT_WORDS))
    for _ in generator.stream(prompt, max_new_tokens=1, stop=[]):
        break
    token = time.time()
    ids = generator._encode(prompt, 1)[0].tolist()
    first = next(iter(generator.engine.generate(ids, 1)))
    hwm = next((int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")), 0)
    print("RESULT " + json.dumps({
        "child_started": started, "imports_s": imported - started, "load_s": loaded - imported,
        "first_token_at": token, "token_s": token - loaded, "first_token": first,
        "rss_hwm": hwm, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "gpu_peak": max(load_peak, torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0),
        "weights": generator.stats.extra.get("weights"), "decode": generator.stats.extra.get("decode"),
        "warm_up_s": generator.stats.extra.get("warm_up_s"), "stats_load_s": generator.stats.load_s,
        "tokenizer": generator.stats.extra.get("tokenizer"), "configs": generator.stats.extra.get("configs"),
        "load_phases": generator.stats.extra.get("load_phases"), "called_at": imported - started,
        "transformers_modules": sum(m.startswith("transformers") for m in sys.modules)}))


def probe(folder: str) -> None:
    """Where a start's fixed seconds go: each step a fresh process takes before any weight is read."""
    marks = [("start", time.time())]
    import torch

    marks.append(("import torch", time.time()))
    import localgpt.generation.fast.generator  # noqa: F401

    marks.append(("import localgpt's fast engine", time.time()))
    from transformers import AutoConfig, AutoTokenizer

    marks.append(("import transformers (Auto*)", time.time()))
    torch.cuda.is_available()
    marks.append(("torch.cuda.is_available()", time.time()))
    torch.empty(1, device="cuda")
    marks.append(("first CUDA allocation (context)", time.time()))
    AutoTokenizer.from_pretrained(folder, local_files_only=True)
    AutoConfig.from_pretrained(folder, local_files_only=True)
    marks.append(("tokenizer + config", time.time()))
    import transformers.modeling_utils  # noqa: F401

    marks.append(("import transformers.modeling_utils (the transformers path only)", time.time()))
    print("PROBE " + json.dumps([(name, round(t - marks[i][1], 2)) for i, (name, t) in enumerate(marks[1:])]))


def run_child(folder: Path, quantization: str, path: str, mode: str, device: str, cache_dir: Path, log) -> dict:
    trace = os.environ.get("LOCALGPT_IMPORTTIME_DIR")  # set: the child runs with -X importtime, log kept there
    cmd = [sys.executable, *(["-X", "importtime"] if trace else []), str(Path(__file__).resolve()), "--child",
           str(folder), "--quantization", quantization, "--path", path, "--mode", mode, "--device", device,
           "--cache-dir", str(cache_dir)]
    before = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if trace:
        n = len(list(Path(trace).glob("importtime-*.txt")))
        Path(trace, f"importtime-{n + 1}-{quantization}.txt").write_text(out.stderr)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        log(f"child failed ({out.returncode}): {out.stderr[-3000:]}")
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    result = json.loads(lines[-1][len("RESULT "):])
    result["start_to_token_s"] = result["first_token_at"] - before
    result["interpreter_s"] = result["child_started"] - before
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama")
    parser.add_argument("--variants", default="bf16,int4")
    parser.add_argument("--paths", default="stream,transformers")
    parser.add_argument("--reps", type=int, default=2, help="fresh processes per streamed variant")
    parser.add_argument("--mode", default="graph", help="engine mode: graph (CUDA graph) or compile")
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "localgpt-gpu-load"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tokenizer", default="wordlevel", choices=["wordlevel", "llama2"],
                        help="the checkpoint's tokenizer: a word-level one, or Llama-2's kind of files "
                             "(LlamaTokenizer, 32000-token BPE with byte fallback, chat template)")
    parser.add_argument("--no-probe", action="store_true", help="skip the fixed-costs probe process")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this")
    parser.add_argument("--results")
    parser.add_argument("--commit", default="")
    parser.add_argument("--json")
    parser.add_argument("--child")
    parser.add_argument("--probe")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--path", default="stream")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.probe:
        probe(args.probe)
        return

    import torch

    began = time.time()
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    log(f"device {device_name}, torch {torch.__version__}, commit {args.commit or '?'}, "
        f"{os.cpu_count()} CPUs, mode {args.mode}")
    # bench/gpu.py's model table, imported here and not at the top: it imports torch and the engine, and the
    # --child and --probe processes this script starts time their own imports.
    from bench.gpu import configs

    rows, results = [], []
    for key in args.models.split(","):
        label, config = configs(args.tiny)[key]
        folder = Path(args.dir) / (label + ("-llama2-tokenizer" if args.tokenizer == "llama2" else ""))
        t0 = time.perf_counter()
        gb = write_checkpoint(config, folder, tokenizer=args.tokenizer)
        shards = sorted(folder.glob("model-*.safetensors"))
        size = sum(f.stat().st_size for f in shards)
        log(f"{label}: {len(shards)} shards, {size / 1e9:.2f} GB"
            + (f", written in {time.perf_counter() - t0:.1f} s" if gb else " (already written)"))
        log(f"{label}: page cache warmed, read in {warm_page_cache(folder):.1f} s")
        torch.cuda.empty_cache() if device == "cuda" else None
        if device == "cuda" and not args.no_probe:
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", str(folder)],
                                 capture_output=True, text=True, cwd=ROOT, timeout=120)
            steps = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
            log(f"{label}: fixed costs of a start (s): " + (steps[-1][6:] if steps else out.stderr[-500:]))
        for variant in args.variants.split(","):
            for path in args.paths.split(","):
                cache = Path(tempfile.mkdtemp(prefix="localgpt-qcache-"))
                reps = args.reps if path == "stream" or variant != "bf16" else 1
                for rep in range(reps):
                    if time.time() - began > args.budget_s:
                        log(f"{label} {variant} {path} run {rep + 1}: skipped (budget)")
                        continue
                    r = run_child(folder, QUANT[variant], path, args.mode, device, cache, log)
                    r.update(model=label, variant=variant, path=path, run=rep + 1)
                    results.append(r)
                    log(json.dumps(r))
                    rows.append(r)
                shutil.rmtree(cache, ignore_errors=True)
    first = {}
    for r in rows:
        if "first_token" in r:
            first.setdefault((r["model"], r["variant"]), set()).add(r["first_token"])
    header = ("| model | weights | path | run | start → first token (s) | imports (s) | load + warm-up (s) | "
              "peak host RSS (GiB) | peak GPU (GiB) | weights note |")
    table = [header, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['model']} | {r['variant']} | {r['path']} | {r['run']} | failed: {r['error'][:80]} |"
                         + " |" * 5)
            continue
        table.append(f"| {r['model']} | {r['variant']} | {r['path']} | {r['run']} | **{r['start_to_token_s']:.1f}** | "
                     f"{r['imports_s'] + r['interpreter_s']:.1f} | {r['load_s']:.1f} | {(r['rss_hwm'] or r['ru_maxrss']) / 2**30:.2f} | "
                     f"{r['gpu_peak'] / 2**30:.2f} | {r['weights']}; tokenizer: {r.get('tokenizer')}; configs: {r.get('configs')}; "
                     f"transformers modules imported: {r.get('transformers_modules')}; "
                     f"load steps (s from its start): {r.get('load_phases')} |")
    same = all(len(v) == 1 for v in first.values())
    log("\n".join(table))
    log(f"first token equal across paths and runs: {same} ({ {f'{k[0]} {k[1]}': sorted(v) for k, v in first.items()} })")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "results": results}, indent=1))
    if args.results:
        date = datetime.date.today().isoformat()
        with open(args.results, "a") as fh:
            fh.write(f"\n## Loading safetensors checkpoints straight to the GPU (issue 17), {device_name}, {date}\n\n"
                     f"Commit {args.commit or '?'}; `python bench/gpu_load.py --models {args.models} --variants "
                     f"{args.variants} --paths {args.paths} --mode {args.mode} --tokenizer {args.tokenizer}`. Random bf16 weights at the real shapes "
                     f"in safetensors shards on the machine's local disk, in the page cache; each row a fresh process "
                     f"(wall time from just before it starts to its first streamed answer token; 'imports' includes "
                     f"the interpreter's start). 'stream': `load.py`; 'transformers': the path .bin checkpoints "
                     f"take (int4/int8 quantised into a fresh disk cache at run 1, read from it at run 2). Target "
                     f"(issue 17): ≤ 10 s and < 2 GiB host RSS for a 7B model. First token equal across paths: "
                     f"{same}.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
