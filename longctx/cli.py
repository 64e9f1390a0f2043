"""`longctx` command line: train | plan | eval | extend | plot | data | info.

Errors that a user can fix (config, data, checkpoints) print one line, `error: ...`, and exit 2.
A collective that failed because a peer rank died or hung prints one line on each rank that saw
it and exits 3 (train/faults.py); the run continues with `--resume auto`.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0"))))


def _user_errors():
    from longctx.config import ConfigError
    from longctx.train.checkpoint import CheckpointError
    from longctx.train.trainer import TrainingError
    return (ConfigError, CheckpointError, TrainingError, FileNotFoundError, FileExistsError, ValueError)


def cmd_train(args) -> int:
    from longctx.config import load_config
    from longctx.train.trainer import train
    extra = [f"train.memory_gib={args.memory_gib}"] if args.memory_gib is not None else []
    cfg = load_config(args.config, list(args.overrides or []) + extra)
    train(cfg, resume=args.resume)
    return 0


def cmd_plan(args) -> int:
    import json

    from longctx.config import ConfigError, load_config
    from longctx.train import planner
    for flag, v, ok, what in (("--world-size", args.world_size, args.world_size >= 1, "an integer >= 1"),
                              ("--seq-len", args.seq_len, args.seq_len is None or args.seq_len >= 1,
                               "an integer >= 1"),
                              ("--memory-gib", args.memory_gib, args.memory_gib is None or args.memory_gib > 0,
                               "a number > 0 (GiB)"),
                              ("--ranks-per-node", args.ranks_per_node,
                               args.ranks_per_node is None or 1 <= args.ranks_per_node <= args.world_size,
                               f"between 1 and --world-size ({args.world_size})"),
                              ("--flops-per-s", args.flops_per_s, args.flops_per_s is None or args.flops_per_s > 0,
                               "a number > 0")):
        if not ok:
            raise ConfigError(f"{flag} {v}: expected {what}")
    cfg = load_config(args.config, list(args.overrides or []), world_size=args.world_size)
    p = planner.plan(cfg, args.world_size, args.seq_len)  # a longer --seq-len raises max_seq_len with it
    if args.json:
        print(json.dumps(p.to_dict(), indent=1))
    else:
        print(planner.format_plan(p, args.flops_per_s))
    here = args.ranks_per_node or args.world_size
    budget = args.memory_gib * planner.GIB if args.memory_gib is not None else planner.available_bytes()
    if budget is None:
        return 0
    ok, _, msg = planner.check_fits(cfg, args.world_size, here, budget, seq_len=args.seq_len)
    src = f"--memory-gib {args.memory_gib:g}" if args.memory_gib is not None else "this machine's available memory"
    if ok:
        print(f"fits: {here} rank(s) x {p.peak_bytes / planner.GIB:.2f} GiB <= {budget / planner.GIB:.2f} GiB ({src})",
              file=sys.stderr if args.json else sys.stdout)
        return 0
    print(f"does not fit ({src}): {msg}", file=sys.stderr)
    return 1


def cmd_data_prepare(args) -> int:
    from longctx.train.data import prepare_token_file
    meta = prepare_token_file(args.inputs, args.out, tokenizer=args.tokenizer, progress=not args.quiet,
                              overwrite=args.overwrite)
    print(f"wrote {args.out}.bin: {meta['n_tokens']:,} tokens, {meta['n_docs']:,} documents, "
          f"vocab {meta['vocab_size']}, {meta['dtype']}")
    return 0


def cmd_data_synth(args) -> int:
    from longctx.train.data import synthetic_text
    text = synthetic_text(args.seed, args.chars)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}: {len(text):,} characters (seed {args.seed})")
    return 0


def cmd_eval(args) -> int:
    from longctx.eval.harness import parse_depths, parse_lengths, run_ppl, run_retrieval
    from longctx.eval.plots import ppl_plot, retrieval_heatmap
    from longctx.eval.tasks import check_task
    task = check_task(args.task)
    lengths = parse_lengths(args.lengths)
    if bool(args.hf) == bool(args.checkpoint):
        raise ValueError("give one of --checkpoint DIR (a run folder, its checkpoints/ folder or a step_N folder) "
                         "or --hf DIR (a Hugging Face model folder)")
    if args.retrieval_local is not None and (args.retrieval_local < 0 or not args.retrieval_k):
        raise ValueError(f"--retrieval-local {args.retrieval_local}: use a count >= 0 of latest groups, with "
                         f"--retrieval-k K (it applies to retrieval only)")
    from longctx.eval.lm import load_eval_model, load_hf_eval_model
    if args.hf:
        model, tok, cfg, name = load_hf_eval_model(args.hf, args.overrides, args.retrieval_k)
    else:
        model, tok, cfg, name = load_eval_model(args.checkpoint, args.overrides, args.retrieval_k)
    if args.retrieval_local is not None:
        model.retrieval_local = args.retrieval_local
    if args.retrieval_k:  # in the result's header and default name: a resume with other settings is refused
        name += f"+retrieval-k{args.retrieval_k}-local{model.retrieval_local}"
    lead = _rank() == 0
    out = args.out or f"eval_{task}_{name.replace('@', '_').replace('/', '_')}.json"
    if task == "ppl":
        from longctx.train.data import TokenFile
        tf = TokenFile(args.data) if args.data else None
        if tf is None:
            from longctx.train.data import default_cache_dir, ensure_synthetic_token_file
            tf = TokenFile(ensure_synthetic_token_file(cfg.data.cache_dir or default_cache_dir(), args.seed + 7,
                                                       max(lengths) * args.windows * 2 + 1024))
        res = run_ppl(model, tf.read, tf.n_tokens, lengths, args.windows, out, args.seed, progress=lead,
                      model_name=name, write=lead)
        if lead:
            png = os.path.splitext(out)[0] + ".png"
            ppl_plot([res], png)
            for c in sorted(res["cells"].values(), key=lambda c: c["length"]):
                print(f"length {c['length']:>8}: ppl {c['ppl']:.3f}  (last quarter {c['tail_ppl']:.3f})")
            print(f"wrote {out} and {png}")
        return 0
    depths = parse_depths(args.depths)
    res = run_retrieval(task, model, tok, lengths, depths, args.trials, out, args.seed, args.keys,
                        progress=lead, model_name=name, write=lead)
    if lead:
        png = os.path.splitext(out)[0] + ".png"
        retrieval_heatmap(res, png)
        for L, acc in res["accuracy_by_length"].items():
            print(f"length {int(L):>8}: accuracy {100 * acc:.1f}%")
        print(f"wrote {out} and {png}")
    return 0


def cmd_extend(args) -> int:
    from longctx.eval.harness import parse_depths, parse_lengths
    from longctx.train.extend import extend, plan, write_plan
    kw = dict(per_stage=args.per_stage, steps=args.steps, lr=args.lr, tokens_per_step=args.tokens_per_step,
              data=args.data, max_tokens_per_rank=args.max_tokens_per_rank, nproc=args.nproc, rope=args.rope,
              train_len=args.train_len, landmark_block=args.landmark_block, hybrid_layers=args.hybrid_layers,
              hybrid_ratio=args.hybrid_ratio, transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr,
              overrides=args.overrides)
    if args.plan_only:
        p = plan(args.from_dir, args.target_len, args.method, args.out, **kw)
        out = write_plan(p, args.out)
        print(f"{args.method}: {p['original_length']} -> {p['target_length']} tokens in {len(p['stages'])} stage(s)")
        for s in p["stages"]:
            print(f"  stage {s['stage']}: length {s['length']:>8} (x{s['factor']:g}), rope_theta "
                  f"{s['rope_theta']:.6g}, {s['rope_scaling']['rope_type']}, sp {s['sp']}: longctx train "
                  f"{s['config_path']}; then export to {s['export']} (longctx.model.hf."
                  f"{'save_native' if p['convert'] else 'save_pretrained'})")
        if p["convert"]:
            print(f"  first: stage 0 (conversion{' and attention transfer' if p['hybrid'] else ''}) into "
                  f"{p['convert']['export']}: run it with `longctx extend` without --plan-only")
        print(f"wrote {out}/plan.json and the stage configs")
        return 0
    res = extend(args.from_dir, args.target_len, args.method, args.out, evaluate=not args.no_eval,
                 eval_lengths=parse_lengths(args.eval_lengths) if args.eval_lengths else None,
                 eval_windows=args.eval_windows,
                 passkey_lengths=parse_lengths(args.passkey_lengths) if args.passkey_lengths else None,
                 passkey_depths=parse_depths(args.passkey_depths), passkey_trials=args.passkey_trials,
                 retrieval_k=args.retrieval_k, eval_data=args.eval_data, eval_seed=args.seed, **kw)
    for tag in ("before", "after"):
        if res.get(tag):
            cells = [f"ppl@{L} {v:.3f}" for L, v in res[tag].get("ppl", {}).items()]
            cells += [f"passkey@{L} {100 * v:.0f}%" for L, v in res[tag].get("passkey", {}).items()]
            print(f"{tag:>6}: {', '.join(cells)}")
    print(f"final model: {res['out']}/model; results: {res['out']}/results.json")
    return 0


def cmd_plot(args) -> int:
    from longctx.eval.plots import plot_paths
    print(f"wrote {plot_paths(args.paths, args.out)}")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    from longctx.model.mixers import MIXERS
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}, "
          f"cpu threads {torch.get_num_threads()}")
    for mod in ("deepspeed", "triton", "omegaconf", "mpi4py", "safetensors", "transformers"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as exc:  # noqa: BLE001 - report, do not fail
            print(f"{mod}: not available ({type(exc).__name__})")
    print(f"mixers: {', '.join(sorted(MIXERS))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longctx", description="distributed long-context training")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a model from a YAML config")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 model.d_model=512")
    t.add_argument("--resume", default=None,
                   help="'auto': continue from the newest complete checkpoint in the run dir (fresh if none); "
                        "a checkpoint folder: continue from it; default: fresh start, refused if the run dir "
                        "already holds checkpoints")
    t.add_argument("--memory-gib", type=float, default=None,
                   help="memory this machine's ranks may use together (GPU: each device), GiB; a run the planner "
                        "says will not fit is refused before anything is allocated (default: what is available)")
    t.set_defaults(func=cmd_train)

    pn = sub.add_parser("plan", help="predict a training step's peak memory per rank and its FLOPs from a config")
    pn.add_argument("config", help="YAML config (see configs/)")
    pn.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.loss_chunk=2048")
    pn.add_argument("--seq-len", type=int, default=None, help="sequence length (default: data.seq_len)")
    pn.add_argument("--world-size", type=int, required=True, help="ranks (dp x sp)")
    pn.add_argument("--memory-gib", type=float, default=None,
                    help="budget for this machine's ranks together, GiB (default: this machine's available memory)")
    pn.add_argument("--ranks-per-node", type=int, default=None,
                    help="ranks sharing one machine's memory (default: all of them)")
    pn.add_argument("--flops-per-s", type=float, default=None,
                    help="achieved FLOP/s per rank: also print a predicted time per step")
    pn.add_argument("--json", action="store_true", help="print the plan as JSON")
    pn.set_defaults(func=cmd_plan)

    d = sub.add_parser("data", help="prepare token files")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="text files or folders -> token file (PREFIX.bin/.docs.npy/.json)")
    dp.add_argument("inputs", nargs="+", help="text files or folders (*.txt, *.md); one file = one document")
    dp.add_argument("--out", required=True, help="output prefix")
    dp.add_argument("--tokenizer", default="byte", help="'byte' or a Hugging Face tokenizer.json")
    dp.add_argument("--overwrite", action="store_true", help="replace an existing token file")
    dp.add_argument("--quiet", action="store_true")
    dp.set_defaults(func=cmd_data_prepare)
    ds = dsub.add_parser("synth", help="write the seeded synthetic demo corpus as text")
    ds.add_argument("--out", required=True)
    ds.add_argument("--chars", type=int, default=4_000_000)
    ds.add_argument("--seed", type=int, default=1234)
    ds.set_defaults(func=cmd_data_synth)

    e = sub.add_parser("eval", help="long-context evaluation: passkey | niah | ppl (JSON + PNG; resumes)")
    e.add_argument("task", help="passkey, niah or ppl")
    e.add_argument("--checkpoint", help="run folder, its checkpoints/ folder or a step_N folder")
    e.add_argument("--hf", help="a Hugging Face model folder (config.json + safetensors; Llama, Mistral, Qwen2)")
    e.add_argument("--lengths", default="1k,4k", help="context lengths, e.g. 1k,4k,16k")
    e.add_argument("--depths", default="0:1:0.25", help="needle depths: start:stop:step or a list")
    e.add_argument("--trials", type=int, default=10, help="trials per (length, depth)")
    e.add_argument("--keys", type=int, default=1, help="niah: needles in the haystack (1 = single)")
    e.add_argument("--data", help="ppl: token file prefix (default: the synthetic corpus, another seed)")
    e.add_argument("--windows", type=int, default=4, help="ppl: windows per length")
    e.add_argument("--retrieval-k", type=int, default=0,
                   help="landmark models: retrieve the top-k blocks per head from the block cache (0: exact)")
    e.add_argument("--retrieval-local", type=int, default=None,
                   help="with --retrieval-k: latest groups always attended at their true distance "
                        "(default longctx.model.landmark.LOCAL_GROUPS)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="result JSON (an existing partial one is resumed); PNG beside it")
    e.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. parallel.sp_ring=2")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("extend", help="extend the context of a Hugging Face model: staged training, evaluation "
                                      "before/after, export (docs/hf.md)")
    x.add_argument("--from", dest="from_dir", required=True, help="Hugging Face model folder")
    x.add_argument("--target-len", type=int, required=True, help="the context length to reach")
    x.add_argument("--method", required=True, help="yarn, ntk, pi, llama3, theta, landmark or hybrid")
    x.add_argument("--out", required=True, help="new folder for the run (built in OUT.partial, renamed when done)")
    x.add_argument("--plan-only", action="store_true",
                   help="only write plan.json and stage_K/config.yaml (run the stages by hand)")
    x.add_argument("--per-stage", type=float, default=4.0, help="length growth per stage")
    x.add_argument("--steps", type=int, default=200, help="training steps per stage")
    x.add_argument("--lr", type=float, default=2e-5)
    x.add_argument("--tokens-per-step", type=int, default=65536, help="sets data.micro_batch_size per stage")
    x.add_argument("--data", help="token file prefix (default: the synthetic corpus)")
    x.add_argument("--max-tokens-per-rank", type=int, help="choose parallel.sp per stage to keep L/sp under this")
    x.add_argument("--nproc", type=int, default=1,
                   help="processes per stage (dp x sp; a stage whose sp is larger uses sp processes)")
    x.add_argument("--rope", help="landmark / hybrid: rope recipe for the attention layers: none, yarn, ntk, pi, "
                                  "llama3, theta (default: landmark none, hybrid yarn)")
    x.add_argument("--train-len", type=int,
                   help="longest training window (default: the target; landmark with --rope none: the model's "
                        "trained length, the context then comes from retrieval)")
    x.add_argument("--landmark-block", type=int, default=64, help="landmark: regular tokens per landmark")
    x.add_argument("--hybrid-layers", help="hybrid: layers that become lightning attention, e.g. 0,2")
    x.add_argument("--hybrid-ratio", type=float,
                   help="hybrid: fraction of the layers that become lightning (default 0.75; the last stays softmax)")
    x.add_argument("--transfer-steps", type=int, default=100, help="hybrid: attention-transfer steps")
    x.add_argument("--transfer-lr", type=float, default=1e-3, help="hybrid: attention-transfer learning rate")
    x.add_argument("--no-eval", action="store_true", help="skip the evaluation before and after")
    x.add_argument("--eval-lengths", help="perplexity lengths (default: the trained length, each stage's, the target)")
    x.add_argument("--eval-windows", type=int, default=4, help="perplexity windows per length")
    x.add_argument("--eval-data", help="perplexity token file (default: --data, else the synthetic corpus, seed 7)")
    x.add_argument("--passkey-lengths", help="passkey lengths (default: the target)")
    x.add_argument("--passkey-depths", default="0,0.5,1", help="passkey depths")
    x.add_argument("--passkey-trials", type=int, default=5, help="passkey trials per (length, depth)")
    x.add_argument("--retrieval-k", type=int, default=4,
                   help="landmark: evaluate with top-k block retrieval beside the local window of "
                        "longctx.model.landmark.LOCAL_GROUPS latest groups (0: the exact grouped softmax)")
    x.add_argument("--seed", type=int, default=0, help="evaluation seed")
    x.add_argument("overrides", nargs="*", help="config key=value for every stage, e.g. deepspeed.zero_stage=2")
    x.set_defaults(func=cmd_extend)

    pl = sub.add_parser("plot", help="a run folder -> curves.png; eval JSON(s) -> heatmap or perplexity plot")
    pl.add_argument("paths", nargs="+")
    pl.add_argument("--out", default="", help="PNG path (default beside the input)")
    pl.set_defaults(func=cmd_plot)

    i = sub.add_parser("info", help="versions, devices, registered mixers")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    # DeepSpeed still calls collectives that torch renamed; the notice repeats every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (argparse stops a positional list at them)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    from longctx.kernels.cpu import tune_allocator
    tune_allocator()  # large CPU temporaries reuse heap pages instead of faulting in new ones
    try:
        code = args.func(args)
    except _user_errors() as exc:
        if os.environ.get("LONGCTX_DEBUG"):
            raise
        from longctx.config import ConfigError
        from longctx.train.checkpoint import CheckpointError
        from longctx.train.trainer import TrainingError
        # Config, checkpoint and training errors are decided alike on every rank: say them once.
        # Anything else may be one rank's own (a file missing on one node): that rank says it.
        agreed = isinstance(exc, (ConfigError, CheckpointError, TrainingError))
        if _rank() == 0 or not agreed:
            print(f"error: {'' if _rank() == 0 else f'[rank {_rank()}] '}{exc}", file=sys.stderr)
        code = 2
    except Exception as exc:  # noqa: BLE001 - only a collective that lost a peer is turned into one line
        from longctx.train import faults
        line = faults.describe_failure(exc)
        if line is None or os.environ.get("LONGCTX_DEBUG"):
            raise
        print(f"error: [rank {_rank()}] {line}", file=sys.stderr)
        code = faults.EXIT_PEER_LOST
    finally:
        try:
            from longctx.parallel.groups import shutdown_distributed
            shutdown_distributed()
        except Exception:  # noqa: BLE001 - shutting down
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
