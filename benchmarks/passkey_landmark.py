"""Passkey retrieval far beyond the training length: landmark attention against plain RoPE
attention, both trained here from scratch on 512-token passkey windows (issue 6).

1. Train a landmark model (configs/passkey-landmark-cpu.yaml) and the same model with plain
   softmax attention (model.mixers=[softmax], data.seq_len=512) with `longctx train`, in
   three stages (a curriculum), every one from the previous one's weights (init.from_checkpoint):
   `short`: 128-token prompts, batch 32, where copying the key is learnt; `mid`: prompts of
   70-256 tokens (data.passkey_min_len), batch 16; `long`: the 512-token windows with prompts of
   70-512 tokens, batch 8. The two models share the short and mid stages (--landmark-trunk
   plain, the default): the plain model trains them, and the landmark model's long stage starts
   from the plain model's mid-stage weights (the same parameters: landmark attention changes
   which keys a query reads; the landmark token's embedding row learns in the long stage). With
   their own short and mid stages under landmark attention (--landmark-trunk own, the recipe of
   sessions 7-10) copying formed late and at a step that varied with the run: held-out exact
   at 512 of 0.22 after the long stage in one run, 0.86 after three more rounds, 41% at 32K;
   from the plain model's mid stage it was 1.00 after the long stage for two data seeds. Prompts of one fixed length let a
   model tie its copying to the question's position: the short stage's model answers at 128
   tokens and at no other length, 112 or 160 included, so neither longer full attention nor
   retrieval (whose contexts are short and compressed) works from it; the varied lengths make
   copying length-free. On 512-token windows alone neither model learnt to copy within 400
   steps, nor on 70-256 from scratch within 800. Tokens: a word-level tokenizer of the passkey
   vocabulary, digits one token each (written to the work folder; as a subword tokenizer splits
   digits, without the byte-level ambiguity of "sky is " / "key is ").
   Then, while a model's held-out exact rate at 512 (teacher forced, 64 prompts filling the
   window, of a seed no stage trains on) is below --until (0.95), up to --max-rounds more rounds of
   --round-steps (200) on 70-512, each from the last one's weights with a fresh warmup + cosine
   and new prompts. Every stage and round draws its own prompts (data.seed + 17 x its index;
   one seed for all made the long stage repeat the mid stage's keys and depths). Copying forms
   at a step that varies from seed to seed (the short stage's model copied at 0.56 in one run,
   0.80 in another), so a fixed schedule alone can leave a run short. --resume keeps the stages
   and rounds that finished in --work.
2. Evaluate passkey retrieval at each length: `--trials` prompts per length with the key's
   depth spread uniformly over [0, 1] (trial i at depth (i + 0.5) / trials; key, filler count
   and prompt from longctx.eval.tasks.retrieval_sample, as `longctx eval` draws them).
   - landmark: streamed through the retrieval cache (RetrievalStream: the local window of the
     latest LOCAL_GROUPS groups plus the top-k older blocks per head, block K/V offloaded to the
     host store), greedy decoding, --batch prompts decoded together, the prompts taken in
     sorted order and their shared prefix (everything before the first key of the batch)
     computed once by a one-row stream that is then forked (RetrievalStream.generate_shared:
     each row gets its own tokens at its own positions; top-k is chosen per fed call, and the
     group at the fork point and a longer row's last few prompt tokens are fed in smaller calls
     than when a prompt is fed alone, so their selection can differ);
   - plain: one full causal forward over prompt + answer (teacher forcing).
   A trial counts when the greedy continuation is exactly the key's digits followed by a
   non-digit (for a causal model teacher forcing decides this exactly: greedy output starts
   with the answer iff every answer token is the argmax given the ones before).
3. Print the table and the timings, save JSON and a PNG.

    python benchmarks/passkey_landmark.py [--lengths 512,2k,8k,32k] [--trials 200] [--resume]
        [--plain-trials 200,200,40,8] [--top-k 4] [--out docs/passkey_landmark_cpu.json]

The plain model's full attention costs O(T^2) per prompt, so it gets fewer trials at long
lengths (--plain-trials, one count per length); the table prints each count.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from longctx.eval.harness import parse_lengths  # noqa: E402
from longctx.eval.lm import load_eval_model  # noqa: E402
from longctx.eval.tasks import retrieval_sample  # noqa: E402
from longctx.model.landmark import LOCAL_GROUPS, RetrievalStream  # noqa: E402
from longctx.model.transformer import SeqContext  # noqa: E402
from longctx.train import checkpoint as ckpt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "passkey-landmark-cpu.yaml")
PLAIN = ["model.mixers=[softmax]", "data.seq_len=512"]
# the stages before the config's long one (same tokens per step): (name, model -> overrides)
STAGES = [("short", {"landmark": ["data.seq_len=132"], "plain": ["data.seq_len=128"]},  # 4 blocks of 32
           ["data.micro_batch_size=32", "data.passkey_min_len=0"]),
          ("mid", {"landmark": ["data.seq_len=264"], "plain": ["data.seq_len=256"]},  # 8 blocks of 32
           ["data.micro_batch_size=16"])]


def write_word_tokenizer(path: str) -> str:
    """A word-level `tokenizers` JSON of the passkey task's words, punctuation and the ten digits
    (one token each), with <pad>, </s> and <unk>."""
    import re
    from tokenizers import Tokenizer, models, pre_tokenizers
    from longctx.eval import passkey as pk
    text = " ".join([pk.INSTRUCTION, pk.FILLER, pk.KEY_SENTENCE, pk.QUESTION])
    words = sorted(set(re.findall(r"[A-Za-z]+|[^\w\s]", text)) - {"N"})
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + [str(d) for d in range(10)] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens(["<pad>", "</s>"])
    tok.save(path)
    return path


def train(run_dir: str, overrides: List[str], log: str) -> float:
    """`longctx train` in a subprocess (its own process group); returns seconds taken."""
    cmd = [sys.executable, "-m", "longctx.cli", "train", CONFIG, f"train.run_dir={run_dir}",
           "train.progress=false", "train.plot=false"] + overrides
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"training failed (exit {rc}): see {log}\n" + open(log).read()[-3000:])
    return time.perf_counter() - t0


def rounds_on_disk(run: str) -> List[str]:
    """The folders of the more rounds after `run`'s long stage (run-more1, run-more2, ...), in order."""
    import glob
    found = [(int(m.group(1)), d) for d in glob.glob(glob.escape(run) + "-more*")
             if (m := re.fullmatch(r"-more(\d+)", d[len(run):])) and os.path.isdir(d)]
    return [d for _, d in sorted(found)]


def finished(run_dir: str, steps: int, seed: int, start: Optional[str] = None) -> bool:
    """run_dir holds a checkpoint at step `steps` (its stage ran to the end) of a run whose
    config.yaml has data.seed == seed (a folder of another seed scheme is not this stage) and
    started from `start` (init.from_checkpoint; None: from scratch), so a long stage trained
    from the other --landmark-trunk is not kept."""
    try:
        from omegaconf import OmegaConf
        cfg = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
        init = OmegaConf.select(cfg, "init.from_checkpoint")
        same_start = (os.path.abspath(init) if init else None) == (os.path.abspath(start) if start else None)
        return (ckpt.step_of(os.path.basename(ckpt.resolve_folder(run_dir))) == steps
                and int(cfg.data.seed) == seed and same_start)
    except Exception:  # noqa: BLE001 - no checkpoint or config, or an unreadable one: not finished
        return False


def trials(tok, length: int, n: int, seed: int) -> List[dict]:
    """n passkey samples of `length` tokens, depths (i + 0.5) / n."""
    return [retrieval_sample("passkey", tok, seed, length, (i + 0.5) / n, i) for i in range(n)]


def heldout_exact(run: str, n: int = 64, length: int = 512) -> float:
    """Share of n held-out prompts that fill `length` regular tokens (the long stage's window;
    sampler seed 987654, never a training seed) whose answer and eos are all the argmax (teacher
    forcing, full attention: the exact grouped softmax for landmark models): the sweep's
    exact_rate on the run's model."""
    from passkey_sweep import exact_rate
    lm, tok, cfg, _ = load_eval_model(run)
    return exact_rate(lm.model, cfg, tok, length, n, lm.model.head_weight.device)


def by_prompt_length(samples: List[dict], batch: int):
    """Batches of sample indices whose prompts (and answers) have equal length."""
    groups: Dict[tuple, List[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((len(s["prompt_ids"]), len(s["answer_ids"])), []).append(i)
    for idx in groups.values():
        for a in range(0, len(idx), batch):
            yield idx[a:a + batch]


def is_exact(pred: List[int], answer: np.ndarray, tok) -> bool:
    """pred (>= len(answer) + 1 greedy tokens) starts with the answer, then a non-digit."""
    n = len(answer)
    if list(pred[:n]) != [int(a) for a in answer]:
        return False
    return len(pred) > n and not tok.decode([pred[n]])[:1].isdigit()


def eval_landmark(lm, tok, samples, top_k: int, batch: int, bar) -> List[bool]:
    """Retrieval decoding, `batch` rows at a time; the prompts' shared prefixes (everything before
    each key) are computed once (RetrievalStream.generate_shared), rows of different lengths
    decode in step."""
    cfg = lm.cfg.model
    n_ans = max(len(s["answer_ids"]) for s in samples)
    preds = RetrievalStream.generate_shared(lm.model, cfg.landmark_block, tok.landmark_id,
                                            [s["prompt_ids"] for s in samples], n_ans + 1, batch, progress=bar,
                                            top_k=top_k, offload=True)
    return [is_exact(p, s["answer_ids"], tok) for p, s in zip(preds, samples)]


@torch.no_grad()
def eval_plain(lm, tok, samples, batch: int, bar) -> List[bool]:
    model = lm.model.eval()
    ok = [False] * len(samples)
    for idx in by_prompt_length(samples, batch):
        s0 = samples[idx[0]]
        n_p = len(s0["prompt_ids"])
        ids = torch.as_tensor(np.stack([np.concatenate([samples[i]["prompt_ids"], samples[i]["answer_ids"]])
                                        for i in idx]))
        B, T = ids.shape
        h = model.hidden(ids, SeqContext(positions=torch.arange(T)[None].expand(B, T)))
        logits = torch.nn.functional.linear(h[:, n_p - 1:], model.head_weight)  # answer + the token after
        preds = logits.argmax(-1).tolist()
        for i, p in zip(idx, preds):
            ok[i] = is_exact(p, samples[i]["answer_ids"], tok)
        bar(len(idx))
    return ok


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("landmark", "o-"), ("plain", "s--")):
        rows = res["models"][name]["lengths"]
        xs = [int(L) for L in rows]
        ax.plot(xs, [100 * rows[L]["accuracy"] for L in rows], style, label=res["models"][name]["label"])
    ax.axvline(res["train_len"], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"passkey retrieval, trained at {res['train_len']} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="512,2k,8k,32k")
    ap.add_argument("--trials", type=int, default=200, help="landmark trials per length")
    ap.add_argument("--plain-trials", default="200,200,40,8", help="plain-model trials, one per length")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--plain-batch", type=int, default=64, help="plain model: prompts per forward at 512 (fewer when longer)")
    ap.add_argument("--batch", type=int, default=32,
                    help="prompts decoded together (landmark: after their shared prefix, computed once; 32 ran "
                         "8K fastest here, 43 s against 47 s at 64)")
    ap.add_argument("--short-steps", type=int, default=800, help="steps of the 128-token stage")
    ap.add_argument("--mid-steps", type=int, default=400, help="steps of the 70-256-token stage")
    ap.add_argument("--long-steps", type=int, default=500,
                    help="steps of the 70-512-token stage (the session-9 H100 sweep: 500 reach exact 1.00 at 512 and "
                         "retrieval 1.00 at 2K / 8K, as 700 do; a model short of --until gets more rounds)")
    ap.add_argument("--landmark-trunk", choices=("plain", "own"), default="plain",
                    help="plain: the landmark model's 512-token stage starts from the plain model's mid-stage "
                         "weights (the two share their first two stages, with softmax attention); own: its own short "
                         "and mid stages with landmark attention (the recipe of sessions 7-10)")
    ap.add_argument("--until", type=float, default=0.95,
                    help="after the long stage, train more rounds while the held-out exact rate at 512 "
                         "(teacher forced, 64 prompts filling the window) is below this (0: never)")
    ap.add_argument("--round-steps", type=int, default=200, help="steps of one more round (70-512, lr warmup + cosine)")
    ap.add_argument("--max-rounds", type=int, default=3, help="at most this many more rounds per model")
    ap.add_argument("--work", default="runs/passkey-landmark-bench", help="run folders and logs")
    ap.add_argument("--report", metavar="JSON", help="print the table of a results JSON and exit")
    ap.add_argument("--reuse", action="store_true", help="evaluate existing runs in --work, no training")
    ap.add_argument("--resume", action="store_true",
                    help="keep the stages and rounds in --work that finished (a checkpoint at their last step) "
                         "and train the rest; train_s then counts this invocation only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "passkey_landmark_cpu.json"))
    ap.add_argument("--png", default=None, help="default: --out with .png")
    args = ap.parse_args(argv)
    from longctx.kernels.cpu import tune_allocator
    tune_allocator()  # the in-process evaluation's temporaries reuse heap pages (2K retrieval: 6.5 -> 4.1 s)
    if args.report:
        with open(args.report) as f:
            print(table(json.load(f)))
        return 0
    t_all = time.perf_counter()
    lengths = parse_lengths(args.lengths)
    plain_trials = [int(x) for x in args.plain_trials.split(",")]
    if len(plain_trials) != len(lengths):
        ap.error(f"--plain-trials has {len(plain_trials)} counts for {len(lengths)} lengths: give one per length")
    if args.trials < 1 or min(plain_trials) < 1:
        ap.error("--trials and --plain-trials must be >= 1")
    os.makedirs(args.work, exist_ok=True)
    tok_path = write_word_tokenizer(os.path.join(os.path.abspath(args.work), "words.tokenizer.json"))
    common = [f"data.tokenizer={tok_path}", "model.vocab_size=64"]
    shared = args.landmark_trunk == "plain"
    # with a shared trunk the plain model trains first: its mid stage is where the landmark one starts
    runs = {name: os.path.join(args.work, name) for name in (("plain", "landmark") if shared else ("landmark", "plain"))}
    res = {"machine": f"{os.cpu_count()} CPU threads, torch {torch.__version__}", "top_k": args.top_k,
           "until": args.until, "round_steps": args.round_steps, "landmark_trunk": args.landmark_trunk,
           "local_groups": LOCAL_GROUPS, "train_len": 512, "config": os.path.relpath(CONFIG, ROOT), "models": {},
           "stages": {st: common_ov + ov["landmark"] for st, ov, common_ov in STAGES}}
    stage_steps = {"short": args.short_steps, "mid": args.mid_steps, "": args.long_steps}
    from longctx.config import load_config
    data_seed = int(load_config(CONFIG).data.seed)

    def stage_seed(i: int) -> int:
        """data.seed of stage i (0 short, 1 mid, 2 long, 2 + r round r): each its own prompts."""
        return data_seed + 17 * i

    res["stage_seeds"] = {"short": stage_seed(0), "mid": stage_seed(1), "long": stage_seed(2),
                          "round r": f"{data_seed} + 17 * (2 + r)"}
    trained_now: List[str] = []  # stage folders this invocation trained (a later stage from them retrains too)
    for name, run in runs.items():
        if args.reuse:
            continue
        base = common + (PLAIN if name == "plain" else [])
        # each stage (and round) its own prompts: data.seed + 17 * its index. With one seed for all
        # the stages, sample g of the long stage drew the depth and key of the mid stage's sample g
        # (PasskeySampler: rng = default_rng([seed, g])), so the long stage re-taught known pairs.
        trunk = name == "landmark" and shared  # starts from the plain model's mid stage
        plan = [] if trunk else [(run + "-" + st, ov[name] + common_ov + [f"data.seed={stage_seed(i)}"], st)
                                 for i, (st, ov, common_ov) in enumerate(STAGES)]
        plan += [(run, [f"data.seed={stage_seed(len(STAGES))}"], "")]
        index = {st: i for i, (st, _, _) in enumerate(STAGES)}
        index[""] = len(STAGES)
        start = runs["plain"] + "-mid" if trunk else None
        chain_dirs = [start] + [d for d, _, _ in plan] + [f"{run}-more{r}" for r in range(1, args.max_rounds + 1)]
        targets = {d: (stage_steps[st], stage_seed(index[st]), chain_dirs[i]) for i, (d, _, st) in enumerate(plan)}
        targets.update({f"{run}-more{r}": (args.round_steps, stage_seed(len(STAGES) + r), chain_dirs[len(plan) + r - 1])
                        for r in range(1, args.max_rounds + 1)})
        # kept only while every stage before it is kept (each starts from the last)
        chain = args.resume and start not in trained_now
        for d in list(targets) + [x for x in rounds_on_disk(run) if x not in targets]:
            chain = chain and d in targets and finished(d, *targets[d])
            if os.path.exists(d) and not chain:
                shutil.rmtree(d)
        secs, prev, checks, kept = 0.0, start, [], []
        for d, ov, st in plan:
            if os.path.exists(d):  # --resume: this stage finished in an earlier invocation
                print(f"{name}: {st or 'long'} stage finished before: {d}", flush=True)
                kept.append(os.path.basename(d))
                prev = d
                continue
            print(f"training {name}: {st or 'long'} stage -> {d} ...", flush=True)
            init = [f"init.from_checkpoint={prev}"] if prev else []
            secs += train(d, base + ov + [f"train.steps={stage_steps[st]}"] + init,
                          os.path.join(args.work, f"{os.path.basename(d)}.log"))
            trained_now.append(d)
            print(f"  {secs:.0f} s so far", flush=True)
            prev = d
        # A stage ends on a schedule, not on what the model learnt: copying forms at a step that
        # varies from seed to seed, so a model still short of the held-out rate gets more rounds.
        for r in range(1, args.max_rounds + 2):
            if not args.until:
                break
            rate = heldout_exact(prev)
            checks.append(round(rate, 4))
            print(f"  {name}: held-out exact at 512 (teacher forced) {rate:.2f}", flush=True)
            if rate >= args.until or r > args.max_rounds:
                break
            d = f"{run}-more{r}"
            if os.path.exists(d):
                print(f"{name}: round {r} finished before: {d}", flush=True)
                kept.append(os.path.basename(d))
                prev = d
                continue
            print(f"training {name}: round {r} of at most {args.max_rounds} more ({args.round_steps} steps) -> {d} ...",
                  flush=True)
            seed = [f"data.seed={stage_seed(len(STAGES) + r)}"]  # new prompts, as each stage
            secs += train(d, base + seed + [f"train.steps={args.round_steps}", f"init.from_checkpoint={prev}"],
                          os.path.join(args.work, f"{os.path.basename(d)}.log"))
            print(f"  {secs:.0f} s so far", flush=True)
            prev = d
        used = max(0, len(checks) - 1)  # one check before each round and one after the last
        for d in rounds_on_disk(run)[used:]:  # kept (--resume) rounds this run's --until did not ask for
            shutil.rmtree(d)
        res.setdefault("train_s", {})[name] = round(secs, 1)  # this invocation's training only
        res.setdefault("heldout_exact", {})[name] = checks
        if kept:
            res.setdefault("resumed", {})[name] = kept
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name, run in runs.items():
        rounds = rounds_on_disk(run)
        lm, tok, cfg, label = load_eval_model(rounds[-1] if rounds else run)
        n_params = sum(p.numel() for p in lm.model.parameters())
        first = runs["plain"] if name == "landmark" and shared else run  # the shared stages are the plain model's
        steps = [ckpt.step_of(os.path.basename(ckpt.resolve_folder(r)))
                 for r in [first + "-" + st for st, _, _ in STAGES] + [run] + rounds]
        entry = {"label": f"{name} ({cfg.model.n_layers} layers, d={cfg.model.d_model}, {n_params / 1e6:.2f}M)",
                 "steps": steps, "lengths": {}}
        for L, n_plain in zip(lengths, plain_trials):
            n = args.trials if name == "landmark" else n_plain
            samples = trials(tok, L, n, args.seed)
            t0, done = time.perf_counter(), [0]

            def bar(k, n=n, L=L, t0=t0, done=done, name=name):
                done[0] += k
                el = time.perf_counter() - t0
                eta = el / done[0] * (n - done[0])
                print(f"\r  {name} {L}: {done[0]}/{n} trials, {el:.0f} s, ETA {eta:.0f} s   ", end="", flush=True)

            if name == "landmark":
                ok = eval_landmark(lm, tok, samples, args.top_k, args.batch, bar)
            else:
                ok = eval_plain(lm, tok, samples, max(1, args.plain_batch * 512 // L), bar)
            secs = time.perf_counter() - t0
            print()
            entry["lengths"][str(L)] = {"trials": n, "correct": int(sum(ok)), "accuracy": sum(ok) / n,
                                        "eval_s": round(secs, 1)}
        res["models"][name] = entry
    res["wall_s"] = round(time.perf_counter() - t_all, 1)  # the whole invocation: training, checks, evaluation
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    plot(res, png)
    print(table(res))
    print(f"wrote {args.out} and {png}")
    return 0


def table(res: dict) -> str:
    lines = [f"machine: {res['machine']}; trained at {res['train_len']} tokens; landmark retrieval: "
             f"local window {res.get('local_groups', 0)} groups + top-k = {res['top_k']} blocks per head"
             + (f"; this invocation {res['wall_s'] / 60:.1f} min" if "wall_s" in res else "")]
    for name, e in res["models"].items():
        ts = res.get("train_s", {}).get(name)
        where = (["128 tokens", "512"] if len(e["steps"]) == 2  # older JSON: two stages
                 else ["128 tokens", "70-256", "70-512"] + [f"70-512 (round {r})" for r in range(1, len(e["steps"]) - 2)])
        if name == "landmark" and res.get("landmark_trunk") == "plain" and len(where) > 2:
            where[:3] = ["128 tokens", "70-256 (both the plain model's stages, softmax)", "70-512 with landmarks"]
        checks = res.get("heldout_exact", {}).get(name)
        kept = res.get("resumed", {}).get(name)
        trained = (f", trained in {ts:.0f} s" if ts and not kept else
                   f"; {', '.join(kept)} kept from an earlier invocation (--resume), this one trained {ts or 0:.0f} s"
                   if kept else "")
        lines.append(f"{e['label']}: " + " + ".join(f"{n} steps at {w}" for n, w in zip(e["steps"], where)) + trained
                     + (f"; held-out exact at 512 after the long stage and each round: {checks}" if checks else ""))
    lines.append(f"{'length':>8}  {'landmark':>17}  {'plain':>17}")
    for L in res["models"]["landmark"]["lengths"]:
        cells = []
        for name in ("landmark", "plain"):
            c = res["models"][name]["lengths"].get(L)
            cells.append(f"{100 * c['accuracy']:5.1f}% of {c['trials']:>3} ({c['eval_s']:.0f}s)" if c else "-")
        lines.append(f"{int(L):>8}  {cells[0]:>17}  {cells[1]:>17}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
