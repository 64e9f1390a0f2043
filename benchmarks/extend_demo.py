"""Context extension, end to end on a CPU (issue 8 item 5): pretrain a small model at 256 tokens,
export it to Hugging Face format, extend it to 4K with yarn, landmark and hybrid (`extend()`, the
Python side of `longctx extend`), and measure perplexity vs length and passkey retrieval at 4K.

1. Data. The shipped corpus is the seeded synthetic one (longctx/train/data.py: a small English
   grammar, paragraphs as documents). A word-level tokenizer (`tokenizers`, written to the work
   folder; digits one token each so that a key is copied digit by digit; Metaspace pieces so that
   decoding gives the text back) is trained on the corpus and the passkey prompt's words. Token
   files: the corpus of seed 1234 (training) and of seed 7 (held out, for perplexity).
2. Pretrain (`longctx train`, subprocesses) in two stages, a curriculum (benchmarks/passkey_landmark.py
   found that a small model learns to copy the key much sooner on short prompts): --short-steps at
   128 tokens x 32 on passkey samples alone (--short-passkey-fraction 1), constant learning rate,
   then (init.from_checkpoint) --pretrain-steps at 256 tokens x 16 on the corpus mixed with passkey
   samples (data.passkey_fraction 0.5); data.passkey_targets=all (every prompt token is a target),
   --passkey-min-len N: passkey prompts of N..256 tokens after the short stage (data.passkey_min_len;
   a model trained on one prompt length copies at that length only: docs/landmark.md),
   plain RoPE, model.max_seq_len 256. Export with hf.save_pretrained (a Llama folder with the
   tokenizer).
3. Extend to 4K with `extend(...)` (each stage through the trainer, the same data mixture):
   - yarn: staged, 4x per stage (--yarn-per-stage): --steps-yarn at 1K (YaRN factor 4), then as
     many at 4K (factor 16), each stage at lr --lr-yarn (3e-4) with warm-up and cosine decay to
     0.1x (--yarn-min-lr-ratio). One stage at 4K kept 0-60% at 4K (lr 1e-3 / 3e-4), two stages at
     lr 5e-4 52.5% (docs/benchmarks.md);
   - landmark: converted (landmark attention in every layer, block --landmark-block), fine-tuned
     --steps-landmark (800) at 256 tokens with plain RoPE (the landmark paper's recipe), lr 1e-3
     cosine to 0.1x (400 steps kept copying in some runs only; at 800 a constant rate read as
     well), read at 4K through the block retrieval cache (top --retrieval-k 3 blocks per head
     beside a local window of --retrieval-local 2 groups: with the open group, 6 groups of 33 =
     198 positions, inside the 256-token window the model was fine-tuned on. The defaults of issue 6 (4 + 4, 297
     positions, beyond it) read 50-75% at 4K; figures recorded before 2026-11-28 used them, and
     before 2026-11-27 no window);
   - hybrid: --hybrid-layers become lightning attention (from q/k/v/o, attention transfer), the
     softmax layers left get YaRN x16 (set for 4K); fine-tuned at --hybrid-train-len (1K: lightning
     has no length limit, and a 4K step costs ~4x a 1K one here).
4. Evaluate the original and each extended model with the eval harness (longctx/eval): perplexity
   on the held-out corpus at 256, 1K and 4K tokens (--ppl-windows windows each; every token
   predicted from all before it in its window), and passkey accuracy at 256 and 4K (--trials
   prompts per length, the key's depth at (i + 0.5) / trials, samples drawn as `longctx eval`
   draws them). A trial counts when the greedy continuation is exactly the key's digits and then
   a non-digit (eos included). Landmark models decode through the retrieval cache; for the
   others one causal forward over prompt + answer decides it exactly (the greedy output starts
   with the answer iff each answer token is the argmax given the ones before).
5. Print the table, save JSON (--out) and a PNG beside it.

    python benchmarks/extend_demo.py [--short-steps N] [--pretrain-steps N] [--steps-yarn N] ...
        [--threads 2] [--out docs/extend_demo_cpu.json] [--markdown docs/benchmarks.md]
    python benchmarks/extend_demo.py --report-only --markdown docs/benchmarks.md   # table from the JSON

--markdown writes the printed table into that file (a section between markers, replaced on a
rerun); every process uses --threads torch threads (2 by default, for a machine no other job
uses: the recorded run (2026-11-28) took 18.1 min, its pretraining 369 s (303 s for the same
work the day before: about 2 minutes of margin to the issue's 20); an older record with 1 thread
and fixed-length passkey prompts took 26.6 min; pass 1 where another job holds a core, as two
threads per process then ran up to 10x slower). Passkey prompts after the short
stage are of every length from --passkey-min-len (70) to the window: with prompts that always
fill it the original never answered at 256 (0 of 20, session 8), with varied lengths 5 of 20.

Goals (issue 8): each method's perplexity at 4K within 10% of the original's at 256; passkey
>= 90% at 4K for yarn and landmark, where the original fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L0, TARGET = 256, 4096
TRAIN_SEED, EVAL_SEED = 1234, 7
MODELS = ("original", "yarn", "landmark", "hybrid")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ------------------------------------------------------------------------------------------
def write_tokenizer(path: str, corpus: str) -> str:
    """A word-level `tokenizers` JSON trained on the corpus and the passkey prompt: Metaspace
    pieces (a word with its leading space, punctuation apart) so that decoding restores the text,
    each digit its own token; <pad>, </s> (eos) and <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from longctx.eval import passkey as pk
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    prompt = " ".join([pk.INSTRUCTION, pk.FILLER, pk.KEY_SENTENCE.format(N=1234567890), pk.QUESTION])
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"], min_frequency=1)
    tok.train_from_iterator(corpus.split("\n\n") + [prompt], trainer)
    tok.save(path)
    return path


def write_corpus(prefix: str, tok, seed: int, n_chars: int) -> dict:
    """The synthetic corpus of `seed` (n_chars characters), one document per paragraph."""
    from longctx.train import data as D
    paras = D.synthetic_text(seed, n_chars).split("\n\n")
    return D._write_token_file(prefix, (tok.encode(p) for p in paras), tok)


def prepare_data(work: str, train_chars: int, eval_chars: int) -> Dict[str, str]:
    from longctx.train.data import HFTokenizer, synthetic_text
    os.makedirs(os.path.join(work, "tok"), exist_ok=True)
    tok_path = os.path.join(work, "tok", "tokenizer.json")
    write_tokenizer(tok_path, synthetic_text(TRAIN_SEED, min(train_chars, 4_000_000)))
    tok = HFTokenizer(tok_path)
    out = {"tokenizer": tok_path, "train": os.path.join(work, "corpus-train"), "eval": os.path.join(work, "corpus-eval")}
    m1 = write_corpus(out["train"], tok, TRAIN_SEED, train_chars)
    m2 = write_corpus(out["eval"], tok, EVAL_SEED, eval_chars)
    say(f"tokenizer: {tok.vocab_size - 1} tokens (+ landmark id {tok.landmark_id}); corpus: {m1['n_tokens']} "
        f"training tokens (seed {TRAIN_SEED}), {m2['n_tokens']} held-out tokens (seed {EVAL_SEED})")
    return out


# -- pretraining -----------------------------------------------------------------------------------
def pretrain_config(args, data: Dict[str, str], run_dir: str) -> dict:
    from longctx.train.data import HFTokenizer
    vocab = HFTokenizer(data["tokenizer"]).vocab_size
    return {
        "model": {"vocab_size": -(-vocab // 64) * 64, "d_model": args.d_model, "n_layers": args.n_layers,
                  "n_heads": args.n_heads, "n_kv_heads": args.n_heads, "mixers": ["softmax"], "max_seq_len": L0,
                  "tie_embeddings": True},
        "data": {"kind": "tokens", "path": data["train"], "tokenizer": data["tokenizer"], "seq_len": L0,
                 "micro_batch_size": args.batch, "passkey_fraction": args.passkey_fraction,
                 "passkey_targets": "all", "passkey_min_len": args.passkey_min_len, "seed": TRAIN_SEED},
        "train": {"run_dir": run_dir, "steps": args.pretrain_steps, "lr": args.lr, "warmup_steps": 30,
                  "min_lr_ratio": 0.1, "log_every": 25, "progress": False, "plot": False, "peak_flops": 1e11},
        "checkpoint": {"every": args.pretrain_steps, "keep_last": 1},
        "deepspeed": {"zero_stage": 0},
    }


def train(cfg: dict, work: str, name: str) -> float:
    """`longctx train` on cfg in a subprocess; returns seconds taken."""
    from omegaconf import OmegaConf
    path = os.path.join(work, f"{name}.yaml")
    OmegaConf.save(OmegaConf.create(cfg), path)
    log = os.path.join(work, f"{name}.log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "longctx.cli", "train", path], stdout=f, stderr=subprocess.STDOUT,
                             cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"training failed (exit {rc}): see {log}\n" + open(log).read()[-3000:])
    return time.perf_counter() - t0


def export(run_dir: str, out: str, tokenizer_dir: str) -> None:
    """The run's final checkpoint as a Hugging Face (Llama) folder with the tokenizer."""
    from longctx.config import load_config
    from longctx.model import hf
    from longctx.model.transformer import DecoderLM
    from longctx.train import checkpoint as ckpt
    folder = ckpt.resolve_folder(run_dir)
    cfg = load_config(base=ckpt.read_meta(folder)["config"])
    model = DecoderLM(cfg.model)
    model.load_state_dict(ckpt.consolidated_state_dict(folder), strict=True)
    hf.save_pretrained(model.eval(), cfg, out, tokenizer_dir=tokenizer_dir)


# -- evaluation ------------------------------------------------------------------------------------
def passkey_trials(tok, length: int, n: int, seed: int) -> List[dict]:
    """n passkey samples of `length` tokens, the key at depth (i + 0.5) / n (as `longctx eval` draws them)."""
    from longctx.eval.tasks import retrieval_sample
    return [retrieval_sample("passkey", tok, seed, length, (i + 0.5) / n, i) for i in range(n)]


def groups(samples: List[dict], batch: int):
    """Batches of sample indices whose prompts and answers have equal lengths."""
    by: Dict[tuple, List[int]] = {}
    for i, s in enumerate(samples):
        by.setdefault((len(s["prompt_ids"]), len(s["answer_ids"])), []).append(i)
    for idx in by.values():
        for a in range(0, len(idx), batch):
            yield idx[a:a + batch]


def exact(pred: List[int], answer: np.ndarray, tok) -> bool:
    """The greedy continuation is the key's tokens, then a token that is no digit (eos counts)."""
    n = len(answer)
    return (list(pred[:n]) == [int(a) for a in answer] and len(pred) > n
            and not tok.decode([pred[n]])[:1].isdigit())


@torch.no_grad()
def passkey_accuracy(lm, tok, samples: List[dict], retrieval_k: int, batch: int) -> List[bool]:
    """Greedy retrieval of each sample's key. Landmark models: the retrieval stream (top-k blocks
    per head), `batch` prompts decoded together, their shared prefix once
    (RetrievalStream.generate_shared: top-k chosen per fed call, see there). Others: one causal
    forward over prompt + answer, whose argmax at each answer position is the greedy token given
    the answer so far: the greedy output starts with the answer iff every one of them is right."""
    from longctx.model.landmark import RetrievalStream
    from longctx.model.transformer import SeqContext
    model = lm.model.eval()
    if lm.landmark_block:  # shared prompt prefixes computed once, prompts of any length in one batch
        n_a = max(len(s["answer_ids"]) for s in samples)
        preds = RetrievalStream.generate_shared(model, lm.landmark_block, lm.landmark_id,
                                                [s["prompt_ids"] for s in samples], n_a + 1, batch, top_k=retrieval_k,
                                                local_groups=lm.retrieval_local)
        return [exact(p, s["answer_ids"], tok) for p, s in zip(preds, samples)]
    ok = [False] * len(samples)
    for idx in groups(samples, batch):
        n_p = len(samples[idx[0]]["prompt_ids"])
        ids = torch.as_tensor(np.stack([np.concatenate([samples[i]["prompt_ids"], samples[i]["answer_ids"]])
                                        for i in idx]))
        B, T = ids.shape
        h = model.hidden(ids, SeqContext(positions=torch.arange(T)[None].expand(B, T)))
        preds = torch.nn.functional.linear(h[:, n_p - 1:], model.head_weight).argmax(-1).tolist()
        for i, p in zip(idx, preds):
            ok[i] = exact(p, samples[i]["answer_ids"], tok)
    return ok


def evaluate(folder: str, eval_prefix: str, args, retrieval_k: int = 0, retrieval_local: Optional[int] = None) -> dict:
    """Perplexity at --ppl-lengths on the held-out corpus, passkey accuracy at --passkey-lengths."""
    from longctx.eval.harness import run_ppl
    from longctx.eval.lm import load_hf_eval_model
    from longctx.train.data import TokenFile
    t0 = time.perf_counter()
    lm, tok, cfg, _ = load_hf_eval_model(folder, retrieval_k=retrieval_k, retrieval_local=retrieval_local)
    tf = TokenFile(eval_prefix)
    r = run_ppl(lm, tf.read, tf.n_tokens, args.ppl_lengths, args.ppl_windows, None, seed=0, progress=False)
    out = {"ppl": {str(c["length"]): c["ppl"] for c in r["cells"].values()}, "passkey": {}}
    t1 = time.perf_counter()
    for L in args.passkey_lengths:
        samples = passkey_trials(tok, L, args.trials, args.seed)
        # landmark retrieval streams group by group: rows decoded together share the Python overhead
        ok = passkey_accuracy(lm, tok, samples, retrieval_k, args.trials if lm.landmark_block else
                              max(1, args.batch * L0 // L))
        out["passkey"][str(L)] = {"correct": int(sum(ok)), "trials": len(ok), "accuracy": sum(ok) / len(ok),
                                  "depths_missed": [round(s["depth"], 3) for s, o in zip(samples, ok) if not o]}
    out["ppl_s"], out["passkey_s"] = round(t1 - t0, 1), round(time.perf_counter() - t1, 1)
    return out


# -- extension -------------------------------------------------------------------------------------
def extend_one(method: str, src: str, work: str, data: Dict[str, str], args) -> dict:
    """extend() the exported model to TARGET with `method`; returns its results (training only:
    the evaluation is this script's, the same for every model)."""
    from longctx.train.extend import extend
    out = os.path.join(work, method)
    for d in (out, out + ".partial"):
        if os.path.exists(d):
            shutil.rmtree(d)
    common = [f"data.passkey_fraction={args.passkey_fraction}", "data.passkey_targets=all", f"data.seed={TRAIN_SEED + 1}",
              f"data.passkey_min_len={args.passkey_min_len}",
              f"train.threads={args.threads}", "train.peak_flops=1e11", "train.log_every=5", "train.plot=false",
              "checkpoint.keep_last=1"]
    decay = {"yarn": args.yarn_min_lr_ratio, "landmark": args.landmark_min_lr_ratio}.get(method)
    if decay is not None:  # extend() keeps the rate constant after warm-up unless told otherwise
        common.append(f"train.min_lr_ratio={decay}")
    kw = dict(data=data["train"], evaluate=False, progress=True, progress_every=30.0, overrides=common)
    if method == "yarn":
        kw.update(steps=args.steps_yarn, lr=args.lr_yarn, tokens_per_step=args.tokens_4k, per_stage=args.yarn_per_stage)
    elif method == "landmark":
        kw.update(steps=args.steps_landmark, lr=args.lr_landmark, tokens_per_step=args.batch * L0,
                  landmark_block=args.landmark_block, train_len=args.landmark_train_len,
                  per_stage=args.landmark_train_len / L0)
    elif method == "hybrid":
        kw.update(steps=args.steps_hybrid, lr=args.lr_hybrid, tokens_per_step=args.tokens_4k,
                  train_len=args.hybrid_train_len, per_stage=args.hybrid_train_len / L0,
                  hybrid_layers=[int(x) for x in args.hybrid_layers.split(",")], transfer_steps=args.transfer_steps,
                  transfer_lr=args.transfer_lr)
    t0 = time.perf_counter()
    res = extend(src, TARGET, method, out, **kw)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


# -- report ----------------------------------------------------------------------------------------
def goals(res: dict) -> Dict[str, dict]:
    """The issue's goals, checked on the measured figures."""
    base = res["models"]["original"]["eval"]["ppl"][str(L0)]
    out = {}
    for m in MODELS[1:]:
        e = res["models"].get(m, {}).get("eval")
        if not e:
            continue
        ppl = e["ppl"][str(TARGET)]
        g = {"ppl_4k_over_original_256": ppl / base, "ppl_ok": ppl <= 1.1 * base}
        if m in ("yarn", "landmark"):
            g["passkey_4k"] = e["passkey"][str(TARGET)]["accuracy"]
            g["passkey_ok"] = g["passkey_4k"] >= 0.9
        out[m] = g
    o = res["models"]["original"]["eval"]["passkey"]
    out["original"] = {"passkey_256": o[str(L0)]["accuracy"], "passkey_4k": o[str(TARGET)]["accuracy"],
                       "fails_at_4k": o[str(TARGET)]["accuracy"] < 0.9}
    return out


def table(res: dict) -> str:
    lines = [f"machine: {res['machine']}",
             f"model: {res['model']}; pretrained {res['pretrain']['steps']} steps at {L0} tokens "
             f"({res['pretrain']['seconds']:.0f} s); total wall {res['wall_s'] / 60:.1f} min"]
    for m in MODELS[1:]:
        r = res["models"].get(m)
        if r:
            lines.append(f"{m}: {r['how']} ({r['seconds']:.0f} s)")
    pl = res["ppl_lengths"]
    pk = res["passkey_lengths"]
    head = f"{'model':<10}" + "".join(f"{'ppl@' + str(L):>11}" for L in pl) + "".join(f"{'passkey@' + str(L):>16}"
                                                                                       for L in pk)
    lines += [head]
    for m in MODELS:
        e = res["models"].get(m, {}).get("eval")
        if not e:
            continue
        row = f"{m:<10}" + "".join(f"{e['ppl'][str(L)]:>11.3f}" for L in pl)
        row += "".join(f"{100 * e['passkey'][str(L)]['accuracy']:>9.1f}% ({e['passkey'][str(L)]['correct']:>2}/"
                       f"{e['passkey'][str(L)]['trials']})" for L in pk)
        lines.append(row)
    g = res["goals"]
    base = res["models"]["original"]["eval"]["ppl"][str(L0)]
    lines.append(f"goal ppl@{TARGET} <= 1.1 x original ppl@{L0} = {1.1 * base:.3f}: " + ", ".join(
        f"{m} {g[m]['ppl_4k_over_original_256']:.3f}x {'met' if g[m]['ppl_ok'] else 'MISSED'}"
        for m in MODELS[1:] if m in g))
    lines.append(f"goal passkey@{TARGET} >= 90%: " + ", ".join(
        f"{m} {100 * g[m]['passkey_4k']:.1f}% {'met' if g[m]['passkey_ok'] else 'MISSED'}"
        for m in ("yarn", "landmark") if m in g) +
        f"; original {100 * g['original']['passkey_4k']:.1f}% at {TARGET} "
        f"({'fails' if g['original']['fails_at_4k'] else 'does NOT fail'}), {100 * g['original']['passkey_256']:.1f}% "
        f"at {L0}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    pl = res["ppl_lengths"]
    for m, style in zip(MODELS, ("k--", "o-", "s-", "^-")):
        e = res["models"].get(m, {}).get("eval")
        if not e:
            continue
        a.plot(pl, [e["ppl"][str(L)] for L in pl], style, label=m)
        b.plot(res["passkey_lengths"], [100 * e["passkey"][str(L)]["accuracy"] for L in res["passkey_lengths"]],
               style, label=m)
    base = res["models"]["original"]["eval"]["ppl"][str(L0)]
    a.axhline(1.1 * base, color="grey", lw=0.8, ls=":", label=f"1.1 x original @ {L0}")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("context length (tokens)")
    a.set_ylabel("perplexity (held-out corpus)")
    a.legend(fontsize=8)
    b.axhline(90, color="grey", lw=0.8, ls=":")
    b.set_xscale("log", base=2)
    b.set_ylim(-3, 103)
    b.set_xlabel("prompt length (tokens)")
    b.set_ylabel("passkey accuracy (%)")
    fig.suptitle(f"extending a {L0}-token model to {TARGET}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- extend_demo: begin (written by benchmarks/extend_demo.py) -->", "<!-- extend_demo: end -->"


def write_markdown(path: str, res: dict, cmd: str, json_path: str, png_path: str) -> None:
    """Replace (or add before the GPU sections) this demo's section of docs/benchmarks.md."""
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(path)))  # noqa: E731
    body = "\n".join([
        BEGIN, "## Context extension demo (issue 8)", "",
        f"`{cmd}` — pretrain a small model at {L0} tokens on the synthetic corpus mixed with passkey samples, "
        f"export it to Hugging Face format, extend it to {TARGET} with `extend()` (yarn, landmark, hybrid), "
        f"then perplexity on the held-out corpus (seed {EVAL_SEED}) and passkey accuracy (greedy, exact key) for "
        f"each model; settings and per-stage figures in [{os.path.basename(json_path)}]({rel(json_path)}), "
        f"plot [{os.path.basename(png_path)}]({rel(png_path)}).", "",
        f"Machine: {res['machine']}, {res['date']}:", "", "```", table(res), "```", END])
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + body + text[b:]
    else:
        anchor = text.find("\n## GPU")
        text = (text[:anchor + 1] + body + "\n\n" + text[anchor + 1:]) if anchor >= 0 else text.rstrip() + "\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    from longctx.eval.harness import parse_lengths
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "extend-demo"), help="runs, exports, logs")
    ap.add_argument("--methods", default="yarn,landmark,hybrid")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="sequences of 256 tokens per pretraining step")
    ap.add_argument("--lr", type=float, default=3e-3, help="pretraining peak learning rate")
    ap.add_argument("--passkey-fraction", type=float, default=0.5, help="share of passkey samples in all training")
    ap.add_argument("--passkey-min-len", type=int, default=70,
                    help="passkey prompts of this many tokens up to the window after the short stage "
                         "(data.passkey_min_len; 0: every prompt fills the window, the old default)")
    ap.add_argument("--short-steps", type=int, default=800,
                    help="pretraining curriculum: steps at 128 tokens (batch x 2) first, where copying the key is "
                         "learnt sooner; 0: none")
    ap.add_argument("--short-passkey-fraction", type=float, default=1.0,
                    help="share of passkey samples in the 128-token stage (1: passkey only, the lead's recipe of "
                         "benchmarks/passkey_landmark.py)")
    ap.add_argument("--short-lr", type=float, default=1e-3,
                    help="learning rate of the 128-token stage; benchmarks/passkey_sweep.py found "
                         "copying forms sooner at 1e-3 than at 3e-3 for the 3-layer passkey model")
    ap.add_argument("--pretrain-steps", type=int, default=400, help="steps at 256 tokens")
    ap.add_argument("--train-chars", type=int, default=8_000_000, help="characters of training corpus")
    ap.add_argument("--steps-yarn", type=int, default=150, help="steps of each yarn stage")
    ap.add_argument("--yarn-per-stage", type=float, default=4.0,
                    help="yarn: growth factor of each stage (4: 256 -> 1K -> 4K, --steps-yarn steps each; 16: one "
                         "stage at 4K)")
    ap.add_argument("--lr-yarn", type=float, default=3e-4,
                    help="yarn fine-tune peak learning rate (two stages at 5e-4 kept 52.5%% at 4K: docs/benchmarks.md)")
    ap.add_argument("--yarn-min-lr-ratio", type=float, default=0.1,
                    help="yarn: cosine decay to this share of --lr-yarn in each stage (1: constant)")
    ap.add_argument("--steps-landmark", type=int, default=800, help="landmark fine-tune steps at --landmark-train-len")
    ap.add_argument("--steps-hybrid", type=int, default=60)
    ap.add_argument("--hybrid-train-len", type=int, default=1024,
                    help="hybrid LM fine-tune length (rope set for 4K; lightning layers have no length limit)")
    ap.add_argument("--tokens-4k", type=int, default=8192, help="tokens per step of every yarn and hybrid stage")
    ap.add_argument("--lr-hybrid", "--lr-extend", type=float, default=1e-3, help="hybrid fine-tune learning rate")
    ap.add_argument("--lr-landmark", type=float, default=1e-3)
    ap.add_argument("--landmark-min-lr-ratio", type=float, default=0.1,
                    help="landmark fine-tune: cosine decay to this share of --lr-landmark (1: constant)")
    ap.add_argument("--landmark-block", type=int, default=32)
    ap.add_argument("--landmark-train-len", type=int, default=L0,
                    help="landmark fine-tune window (plain RoPE; retrieval reads at compressed positions)")
    ap.add_argument("--retrieval-k", type=int, default=3,
                    help="landmark: blocks retrieved per head (with --retrieval-local, chosen so the compressed "
                         "context fits the fine-tune window: docs/benchmarks.md)")
    ap.add_argument("--retrieval-local", type=int, default=2,
                    help="landmark: latest groups always attended (the local window)")
    ap.add_argument("--hybrid-layers", default="0,2", help="layers that become lightning attention")
    ap.add_argument("--transfer-steps", type=int, default=50)
    ap.add_argument("--transfer-lr", type=float, default=1e-3)
    ap.add_argument("--ppl-lengths", default="256,1k,4k")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--passkey-lengths", default="256,4k")
    ap.add_argument("--trials", type=int, default=40, help="passkey prompts per length")
    ap.add_argument("--seed", type=int, default=0, help="passkey evaluation seed")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every process (training and evaluation)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "extend_demo_cpu.json"))
    ap.add_argument("--png", default=None, help="default: --out with .png")
    ap.add_argument("--markdown", default=None, help="also write the table into this file (docs/benchmarks.md)")
    ap.add_argument("--report-only", action="store_true", help="re-make the table, PNG and markdown from --out")
    args = ap.parse_args(argv)
    from longctx.kernels.cpu import tune_allocator
    tune_allocator()  # large temporaries reuse heap pages, as under the CLI (benchmarks/passkey_landmark.py's retrieval ran faster)
    if args.report_only:
        with open(args.out) as f:
            res = json.load(f)
        return report(res, args, res.get("argv", argv))
    args.ppl_lengths = parse_lengths(args.ppl_lengths)
    args.passkey_lengths = parse_lengths(args.passkey_lengths)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in MODELS[1:]]
    if bad:
        ap.error(f"--methods: {bad} unknown; use some of {', '.join(MODELS[1:])}")
    if args.yarn_per_stage <= 1:  # checked now, not after the pretraining
        ap.error(f"--yarn-per-stage {args.yarn_per_stage}: use a growth factor > 1 (4: 256 -> 1K -> 4K)")
    for key in ("yarn_min_lr_ratio", "landmark_min_lr_ratio"):
        if not 0 <= getattr(args, key) <= 1:
            ap.error(f"--{key.replace('_', '-')} {getattr(args, key)}: use a share of the peak rate in [0, 1]")
    for L in (L0, TARGET):
        for what, ls in (("--ppl-lengths", args.ppl_lengths), ("--passkey-lengths", args.passkey_lengths)):
            if L not in ls:
                ap.error(f"{what} must include {L0} and {TARGET} (the goals are read there)")
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    work = os.path.abspath(args.work)
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    data = prepare_data(work, args.train_chars, max(args.ppl_lengths) * args.ppl_windows * 6 * 5)

    # 1. pretraining (a curriculum: 128 tokens, then 256), export
    cfg = pretrain_config(args, data, os.path.join(work, "pretrain"))
    cfg["train"]["threads"] = args.threads
    t0 = time.perf_counter()
    if args.short_steps:
        short = json.loads(json.dumps(cfg))
        short["data"].update(seq_len=L0 // 2, micro_batch_size=2 * args.batch,
                             passkey_fraction=args.short_passkey_fraction, passkey_min_len=0)
        # constant learning rate after warm-up: with a cosine decay over this stage, copying emerged later
        short["train"].update(run_dir=os.path.join(work, "pretrain-short"), steps=args.short_steps, min_lr_ratio=1.0,
                              lr=args.lr if args.short_lr is None else args.short_lr)
        short["checkpoint"]["every"] = args.short_steps
        say(f"pretraining, stage 1: {args.short_steps} steps at {L0 // 2} tokens x {2 * args.batch} ...")
        train(short, work, "pretrain-short")
        cfg["init"] = {"from_checkpoint": short["train"]["run_dir"]}
    say(f"pretraining{', stage 2' if args.short_steps else ''}: {args.pretrain_steps} steps at {L0} tokens x "
        f"{args.batch} ...")
    train(cfg, work, "pretrain")
    pre_s = time.perf_counter() - t0
    original = os.path.join(work, "original")
    export(cfg["train"]["run_dir"], original, os.path.dirname(data["tokenizer"]))
    n_params = sum(p.numel() for p in __import__("longctx.model.hf", fromlist=["x"]).from_pretrained(original)[0]
                   .parameters())
    say(f"pretrained in {pre_s:.0f} s; exported {original}")
    res = {"machine": f"this project's CI box, {os.cpu_count()} CPU cores shared, no GPU, torch {torch.__version__}, "
                      f"{args.threads} thread(s) per process",
           "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items()},
           "model": f"Llama, {args.n_layers} layers, d={args.d_model}, {args.n_heads} heads, vocab "
                    f"{cfg['model']['vocab_size']} (word-level), {n_params / 1e6:.2f}M params, tied embeddings",
           "pretrain": {"steps": f"{args.short_steps} x {L0 // 2} (passkey share {args.short_passkey_fraction}) + "
                                 f"{args.pretrain_steps}" if args.short_steps
                        else args.pretrain_steps, "seconds": pre_s, "passkey_fraction": args.passkey_fraction,
                        "passkey_min_len": args.passkey_min_len},
           "ppl_lengths": args.ppl_lengths, "passkey_lengths": args.passkey_lengths, "models": {},
           "argv": list(argv if argv is not None else sys.argv[1:])}
    say("evaluating original ...")
    res["models"]["original"] = {"eval": evaluate(original, data["eval"], args)}

    # 2. extension, 3. evaluation
    from longctx.train.extend import stage_lengths
    yarn_lens = stage_lengths(L0, TARGET, args.yarn_per_stage)
    decay = lambda r: "constant" if r == 1 else f"cosine to x{r:g}"  # noqa: E731
    hows = {"yarn": f"YaRN, {len(yarn_lens)} stage(s) at {', '.join(map(str, yarn_lens))} (factor = length / {L0}), "
                    f"{args.steps_yarn} steps each ({args.tokens_4k} tokens/step), lr {args.lr_yarn:g} "
                    f"{decay(args.yarn_min_lr_ratio)}",
            "landmark": f"landmark block {args.landmark_block}, {args.steps_landmark} steps at {args.landmark_train_len}, "
                        f"plain RoPE, lr {args.lr_landmark:g} {decay(args.landmark_min_lr_ratio)}; "
                        f"read with top-{args.retrieval_k} block retrieval beside a local window of "
                        f"{args.retrieval_local} groups",
            "hybrid": f"lightning in layers {args.hybrid_layers} ({args.transfer_steps} transfer steps) + YaRN "
                      f"x{TARGET // L0}, {args.steps_hybrid} steps at {args.hybrid_train_len} ({args.tokens_4k} "
                      f"tokens/step)"}
    for m in methods:
        say(f"extending with {m} ...")
        t0 = time.perf_counter()
        r = extend_one(m, original, work, data, args)
        secs = time.perf_counter() - t0
        say(f"evaluating {m} ...")
        k = args.retrieval_k if m == "landmark" else 0
        res["models"][m] = {"how": hows[m], "seconds": secs, "eval": evaluate(os.path.join(work, m, "model"),
                                                                               data["eval"], args, k, args.retrieval_local),
                            "stages": r.get("stages"), "convert": r.get("convert")}
    res["wall_s"] = time.perf_counter() - t_all
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:  # the measurements first, whatever happens to the report
        json.dump(res, f, indent=1, default=str)
    return report(res, args, argv)


def report(res: dict, args, argv) -> int:
    """Goals, JSON, PNG, the printed table and (with --markdown) the docs section."""
    res["goals"] = goals(res)
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    plot(res, png)
    print(table(res))
    if args.markdown:
        cmd = "python benchmarks/extend_demo.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])
                                                             if a != "--report-only")
        write_markdown(args.markdown, res, cmd, args.out, png)
    print(f"wrote {args.out} and {png}" + (f", section in {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
