#!/usr/bin/env python
"""Text-path benchmark: kdrun's token-level KD step against a hand-written Hugging Face KD loop, and the
chunked divergence against a naive full-vocabulary one. Prints tables (docs/text.md records them).

1. ``overhead``: the text quickstart's distillation stage (frozen Llama-shaped teacher, student, forward KL
   over batch.token_mask) run by kdrun (``StageRunner.train_epoch``: loader, forward, the engine's global
   token mean, backward, AdamW, periodic metrics flush) against a minimal loop over the same batches with the
   same models, optimizer and arithmetic (``loss = sum_t m_t KL_t / sum_t m_t``; kdrun's term unchunked, so
   both compute the same thing). Alternating rounds of ``--steps`` steps after a warm-up; median
   milliseconds per step and tokens/s; the ratio kdrun / hand is the framework overhead (target <= 1.05).
2. ``trl``: the same pair and batches through TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with on-policy
   generation off (``lmbda=0``, ``seq_kd=False``) and ``beta=0`` (forward KL), constant learning rate, fp32 and no
   gradient checkpointing (TRL's SFT-based configs default to bf16 and gradient checkpointing; kdrun's run has neither), against
   kdrun's step on the same data; only when ``trl`` is importable (install it beside kdrun, e.g.
   ``pip install --no-deps --target DIR trl`` and ``PYTHONPATH=DIR``; it is never a kdrun dependency). Step
   times come from a callback at each step's end (median over the timed steps). TRL shifts inside its loss,
   so it scores L - 1 positions of each block where kdrun scores L.
3. ``memory``: ``TokenDivergence(fkl)`` forward + backward on bf16 logits (B=2, V=32,000) for several
   sequence lengths, with ``chunk_size=256`` and unchunked. Memory: the growth of the process's peak
   resident set (VmHWM, reset before each case through /proc/self/clear_refs) over its resident set before
   the case, on the CPU; ``torch.cuda.max_memory_allocated`` growth on a GPU. The logits themselves are
   allocated before the measurement starts.

4. ``cache``: teacher outputs cached to disk (``kdrun-cache``): bytes per token and write time for each
   ``--cache-k``, then the quickstart's distillation step with the live teacher (full vocabulary; top-K with a
   tail bucket) against the cached top-K (no teacher forward), tokens/s in alternating rounds.

5. ``rollout``: on-policy data: the GKD recipe's step with tiny Qwen2-shaped models at lambda 0, 0.5 and 1 (the
   share of micro-batches the student generates, up to ``--new-tokens`` tokens each); ms per step.

Usage: python scripts/text_benchmark.py [--steps 20 --rounds 5 --device cpu --only overhead|trl|memory|cache|rollout]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def reset_peak(device: torch.device) -> float:
    """Reset the peak counter; return the current level in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS:") / 1024


def peak_growth(device: torch.device, start: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20 - start
    return _rss_kib("VmHWM:") / 1024 - start


def quickstart_trainer(args: argparse.Namespace, extra: list[str]):
    """The text quickstart's distillation stage (random frozen teacher, constant lr), built by kdrun."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hydra import compose, initialize_config_dir

    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from kdrun.paths import config_dir
    from kdrun.registry import register_configs

    register_configs()
    overrides = ["+recipe=text_quickstart", "~stages.teacher", "teacher.allow_random=true", "stages.distill.scheduler=null",
                 "+loss.kd.chunk_size=null", "trainer.eval_every_steps=null", "trainer.eval_every=1000",
                 "trainer.save_checkpoints=false", "trainer.tensorboard=false", "trainer.progress=off",
                 f"trainer.device={args.device}", f"trainer.max_steps_per_epoch={args.steps}",
                 "stages.distill.max_steps=1000000", f"data.batch_size={args.batch_size}", *extra]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = validate(compose("kdrun", overrides=overrides))
    trainer = Trainer(cfg, Path(args.run_dir))
    return cfg, trainer, trainer.prepare()


def trl_comparison(args: argparse.Namespace) -> None:
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        print("\n## trl: skipped (trl is not importable; install it beside kdrun, never as a dependency)")
        return
    from transformers import TrainerCallback

    cfg, trainer, exp = quickstart_trainer(args, [])
    runner = trainer.stage_runner(0)
    runner.set_modes()
    teacher, student = exp.models["teacher"], exp.models["student"]
    trl_student = type(student)(student.config)
    trl_student.load_state_dict(student.state_dict())
    data = exp.data.train
    n = args.steps * (args.rounds + args.warmup_rounds) * args.batch_size
    import datasets

    rows = datasets.Dataset.from_dict({"input_ids": [data["input_ids"][i % len(data["input_ids"])].tolist() for i in range(n)]})

    def collate(batch):
        ids = torch.tensor([b["input_ids"] for b in batch], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class Times(TrainerCallback):
        def __init__(self) -> None:
            self.t = []

        def on_step_end(self, *a, **k):
            self.t.append(time.perf_counter())

    threads = torch.get_num_threads()
    kd_ms = []  # kdrun first: the Hugging Face Trainer may change process-wide settings
    for r in range(args.warmup_rounds + args.rounds):
        t0 = time.perf_counter()
        runner.train_epoch(r)
        if r >= args.warmup_rounds:
            kd_ms.append(1000 * (time.perf_counter() - t0) / args.steps)
    times = Times()
    lr = float(cfg.stages["distill"].optimizer["lr"])
    gkd_args = GKDConfig(output_dir=str(Path(args.run_dir) / "trl"), per_device_train_batch_size=args.batch_size,
                         max_steps=n // args.batch_size, learning_rate=lr, lr_scheduler_type="constant",
                         weight_decay=0.0, warmup_steps=0, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
                         logging_steps=args.steps, report_to=[], save_strategy="no", use_cpu=exp.device.type == "cpu",
                         dataloader_num_workers=0, max_length=int(cfg.data.source.seq_len), disable_tqdm=True,
                         max_grad_norm=0.0, bf16=False, fp16=False, gradient_checkpointing=False)
    gkd = GKDTrainer(model=trl_student, teacher_model=teacher, args=gkd_args, data_collator=collate, train_dataset=rows,
                     processing_class=exp.data.tokenizer)
    gkd.add_callback(times)
    gkd.train()
    skip = args.steps * args.warmup_rounds
    trl_ms = statistics.median([1000 * (b - a) for a, b in zip(times.t[skip:], times.t[skip + 1:])])
    if torch.get_num_threads() != threads:
        print(f"(note: torch threads {threads} for kdrun, {torch.get_num_threads()} after the TRL trainer)")
    tokens = args.batch_size * int(cfg.data.source.seq_len)
    print(f"\n## trl: GKDTrainer (lmbda 0, beta 0 = forward KL) vs kdrun, same pair and batches ({exp.device}, batch "
          f"{args.batch_size} x {cfg.data.source.seq_len})\n")
    print("| side | ms/step (median) | tokens/s |")
    print("|---|---|---|")
    for name, ms in (("kdrun", statistics.median(kd_ms)), ("TRL GKDTrainer", trl_ms)):
        print(f"| {name} | {ms:.1f} | {tokens / ms * 1000:.0f} |")


def overhead(args: argparse.Namespace) -> None:
    cfg, trainer, exp = quickstart_trainer(args, [])
    runner = trainer.stage_runner(0)
    runner.set_modes()
    loader = trainer.ctx.train_loader
    teacher, student = exp.models["teacher"], exp.models["student"]
    # the hand loop trains its own copy of the student with its own AdamW of the same settings
    hand_student = type(student)(student.config).to(exp.device)
    hand_student.load_state_dict(student.state_dict())
    hand_student.train()
    opt_cfg = dict(cfg.stages["distill"].optimizer)
    hand_opt = torch.optim.AdamW(hand_student.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg.get("weight_decay", 0.0),
                                 betas=tuple(opt_cfg.get("betas", (0.9, 0.999))), eps=opt_cfg.get("eps", 1e-8))

    def sync() -> None:
        if exp.device.type == "cuda":
            torch.cuda.synchronize(exp.device)

    def kdrun_round(epoch: int) -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        runner.train_epoch(epoch)
        sync()
        return time.perf_counter() - t0, args.steps

    def hand_round(epoch: int) -> tuple[float, int]:
        loader.set_epoch(10_000 + epoch)
        sync()
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s_logits = hand_student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            log_s, log_t = F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1)
            m = batch["token_mask"].float()
            loss = ((log_t.exp() * (log_t - log_s)).sum(-1) * m).sum() / m.sum().clamp_min(1.0)
            loss.backward()
            hand_opt.step()
            hand_opt.zero_grad(set_to_none=True)
            n += 1
            if n == args.steps:
                break
        sync()
        return time.perf_counter() - t0, n

    tokens_per_step = args.batch_size * int(cfg.data.source.seq_len)
    for w in range(args.warmup_rounds):
        kdrun_round(w)
        hand_round(w)
    times: dict[str, list[float]] = {"kdrun": [], "hand": []}
    mem: dict[str, float] = {}
    for r in range(args.rounds):
        order = [("kdrun", kdrun_round), ("hand", hand_round)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            start = reset_peak(exp.device)
            seconds, steps = fn(args.warmup_rounds + r)
            mem[name] = max(mem.get(name, 0.0), peak_growth(exp.device, start))
            times[name].append(1000 * seconds / steps)
    print(f"\n## overhead: text quickstart distillation step ({exp.device}, batch {args.batch_size} x {cfg.data.source.seq_len} tokens, "
          f"{args.rounds} rounds of {args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| side | ms/step (median) | tokens/s | peak memory growth (MiB) |")
    print("|---|---|---|---|")
    for name in ("kdrun", "hand"):
        ms = statistics.median(times[name])
        print(f"| {name} | {ms:.1f} | {tokens_per_step / ms * 1000:.0f} | {mem[name]:.0f} |")
    ratio = statistics.median(times["kdrun"]) / statistics.median(times["hand"])
    print(f"\nkdrun / hand = {ratio:.3f} (target <= 1.05)")


CACHED_KD = ("+loss.kd={_target_: kdrun.losses.CachedTokenDivergence, chunk_size: null, inputs: {student: student.logits, "
             "ids: batch.cache_ids, logp: batch.cache_logp, tail: batch.cache_tail, mask: batch.token_mask}}")


def cache(args: argparse.Namespace) -> None:
    """Teacher outputs cached to disk: bytes per token and the write time per K, then training tokens/s of
    the quickstart's distillation step with the live teacher (full vocabulary, and top-K with a tail) and
    with the cache (no teacher forward), in alternating rounds."""
    import tempfile

    from kdrun.cache import write_cache
    from kdrun.config import validate
    from kdrun.registry import compose_config

    root = Path(tempfile.mkdtemp(prefix="kdrun-cache-bench-"))
    base = validate(compose_config([f"trainer.device={args.device}", "trainer.progress=off"], "text_quickstart"))
    print(f"\n## cache: the text quickstart's teacher over its training split ({args.device}, float16 log-probabilities)\n")
    print("| K | tokens | write s | bytes/token | size (MB) |")
    print("|---|---|---|---|---|")
    dirs = {}
    for k in args.cache_k:
        torch.manual_seed(0)
        info = write_cache(base, "teacher", root / f"k{k}", k=k, dtype="float16")
        dirs[k] = root / f"k{k}"
        print(f"| {k} | {info['tokens']:,} | {info['seconds']:.1f} | {info['bytes'] / info['tokens']:.1f} | {info['bytes'] / 1e6:.1f} |")
    k = max(args.cache_k)
    sides = {"live, full vocabulary": [], f"live, top-{k} + tail": [f"+loss.kd.top_k={k}"],
             f"cached, top-{k} + tail": [f"data.teacher_cache={dirs[k]}", "~loss.kd", CACHED_KD]}
    runners, tokens = {}, None
    for name, extra in sides.items():
        cfg, trainer, _ = quickstart_trainer(args, extra)
        runners[name] = trainer.stage_runner(0)
        runners[name].set_modes()
        tokens = args.batch_size * int(cfg.data.source.seq_len)
    for w in range(args.warmup_rounds):
        for runner in runners.values():
            runner.train_epoch(w)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        order = list(runners.items())
        for name, runner in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            runner.train_epoch(args.warmup_rounds + r)
            if torch.cuda.is_available() and args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(1000 * (time.perf_counter() - t0) / args.steps)
    print(f"\n## cache: training step, batch {args.batch_size} x {tokens // args.batch_size} tokens, {args.rounds} rounds of "
          f"{args.steps} steps ({args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| teacher | ms/step (median) | tokens/s |")
    print("|---|---|---|")
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"| {name} | {ms:.1f} | {tokens / ms * 1000:.0f} |")


def rollout(args: argparse.Namespace) -> None:
    """On-policy data, with tiny Qwen2-shaped models from configs and a local prompt/response file cut from Python's
    help topics; ms per optimizer step of:

    - the GKD recipe's step (generalized JSD, beta 0.5) at lambda 0 (the data's responses), 0.5 and 1;
    - lambda 1 with 4 micro-batches per step, ``generate_per`` micro_batch (4 generate calls) against step (one);
    - lambda 1 with MiniLLM's teacher-mixed sampling (alpha 0.2: kdrun's own kv-cached loop over both models);
    - GOLD across tokenizers (student 700 ids, teacher 1024): the samples re-tokenised for both models, span loss.

    Then the host cost of re-tokenising alone (decode, two batched tokenizer calls, spans)."""
    import json
    import tempfile

    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from kdrun.registry import compose_config

    root = Path(tempfile.mkdtemp(prefix="kdrun-rollout-bench-"))
    from pydoc_data.topics import topics

    rows = [{"prompt": t[:160], "response": t[160:400]} for t in topics.values() if len(t) > 400]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qwen = lambda width, layers, vocab=1024: ("{model_type: qwen2, hidden_size: %d, intermediate_size: %d, "
                                              "num_hidden_layers: %d, num_attention_heads: 4, num_key_value_heads: 2, "
                                              "max_position_embeddings: 512, vocab_size: %d}" % (width, 2 * width, layers, vocab))
    tok = lambda n: "{train: {corpus: pydoc_topics, vocab_size: %d}}" % n
    base = ["trainer.progress=off", "trainer.tensorboard=false", "trainer.save_checkpoints=false", f"trainer.device={args.device}",
            "trainer.precision=fp32", "trainer.eval_every_steps=null",
            "trainer.eval_every=1000", f"trainer.max_steps_per_epoch={args.steps}", "stages.distill.max_steps=1000000",
            "generation=null", "teacher.net.path=null", "student.net.path=null", "teacher.checkpoint=null",
            f"+teacher.net.config={qwen(128, 2)}", f"data.source.train={root / 'rows.jsonl'}",
            "data.source.chat_template=null", "data.source.max_length=160", f"batch_transform.max_new_tokens={args.new_tokens}",
            "teacher.allow_random=true", "teacher.net.dtype=float32"]
    same = [f"+student.net.config={qwen(64, 2)}", f"data.source.tokenizer={tok(1024)}", "data.source.teacher_tokenizer=null"]
    one = ["trainer.accumulate_grad_batches=1", f"data.batch_size={args.batch_size}"]
    four = ["trainer.accumulate_grad_batches=4", f"data.batch_size={max(1, args.batch_size // 4)}"]
    variants = {
        "GKD, lambda 0": ("qwen25_gkd", [*same, *one, "batch_transform.on_policy_prob=0.0"]),
        "GKD, lambda 0.5": ("qwen25_gkd", [*same, *one, "batch_transform.on_policy_prob=0.5"]),
        "GKD, lambda 1": ("qwen25_gkd", [*same, *one, "batch_transform.on_policy_prob=1.0"]),
        "GKD, lambda 1, 4 micro-batches, generate_per micro_batch": (
            "qwen25_gkd", [*same, *four, "batch_transform.on_policy_prob=1.0", "batch_transform.generate_per=micro_batch"]),
        "GKD, lambda 1, 4 micro-batches, generate_per step": (
            "qwen25_gkd", [*same, *four, "batch_transform.on_policy_prob=1.0", "batch_transform.generate_per=step"]),
        "GKD, lambda 1, teacher-mixed sampling alpha 0.2": (
            "qwen25_gkd", [*same, *one, "batch_transform.on_policy_prob=1.0", "+batch_transform.teacher_mix=0.2"]),
        "GOLD across tokenizers (700 / 1024 ids), lambda 1": (
            "qwen25_gold", [f"+student.net.config={qwen(64, 2, 700)}", f"data.source.tokenizer={tok(700)}",
                            f"data.source.teacher_tokenizer={tok(1024)}", *one, "batch_transform.on_policy_prob=1.0",
                            "loss.kd.student_tokenizer=${data.source.tokenizer}",
                            "loss.kd.teacher_tokenizer=${data.source.teacher_tokenizer}"]),
    }
    sides = {}
    for label, (recipe, extra) in variants.items():
        cfg = validate(compose_config([*base, *extra], recipe))
        trainer = Trainer(cfg, Path(args.run_dir) / f"rollout{len(sides)}")
        trainer.prepare()
        runner = trainer.stage_runner(0)
        runner.set_modes()
        sides[label] = (trainer, runner, int(cfg.trainer.accumulate_grad_batches))
    for w in range(args.warmup_rounds):
        for _, runner, _k in sides.values():
            runner.train_epoch(w)
    times: dict[str, list[float]] = {label: [] for label in sides}
    steps_per_round: dict[str, int] = {}
    order = list(sides.items())
    for r in range(args.rounds):
        for label, (trainer, runner, _k) in order[r % len(order):] + order[:r % len(order)]:
            before = trainer.ctx.record.step
            t0 = time.perf_counter()
            runner.train_epoch(args.warmup_rounds + r)
            taken = trainer.ctx.record.step - before  # the prompt file may give fewer steps than --steps
            times[label].append(1000 * (time.perf_counter() - t0) / max(taken, 1))
            steps_per_round[label] = taken
    print(f"\n## rollout: tiny Qwen2-shaped teacher (width 128) and student (64), {args.batch_size} sequences per step, up to "
          f"{args.new_tokens} new tokens, {args.rounds} rounds of one epoch ({args.device}, {torch.get_num_threads()} threads)\n")
    print("| step | ms/step (median) | steps per round | generate calls (timed and warm-up rounds, + 1 at build) |")
    print("|---|---|---|---|")
    for label, (trainer, runner, _k) in sides.items():
        print(f"| {label} | {statistics.median(times[label]):.1f} | {steps_per_round[label]} | "
              f"{runner.plan.batch_transform.generated} |")
    retokenise_cost(args)


def retokenise_cost(args: argparse.Namespace) -> None:
    """The host cost of re-tokenising sampled completions for a teacher with another tokenizer (700 / 1024 ids):
    decode with the sampler's tokenizer, tokenise with both, align the spans (the tensor rebuild of the fields is not timed)."""
    from kdrun.data.retokenise import completion_texts, tokenise_completions
    from kdrun.data.text import train_tokenizer

    s_tok, t_tok = train_tokenizer(vocab_size=700), train_tokenizer(vocab_size=1024)
    gen = torch.Generator().manual_seed(0)
    print(f"\n## re-tokenising completions across tokenizers (host, {torch.get_num_threads()} threads)\n")
    print("| completions x new tokens | ms per micro-batch (median of 20) | student / teacher tokens |")
    print("|---|---|---|")
    for b, m in ((args.batch_size, 32), (args.batch_size, 128), (4 * args.batch_size, 128)):
        ids = torch.randint(3, 700, (b, m), generator=gen)
        runs = []
        for _ in range(20):
            t0 = time.perf_counter()
            texts, finished = completion_texts(ids, s_tok.eos_token_id, s_tok)
            ct = tokenise_completions(texts, finished, s_tok, t_tok, "spans", torch.device("cpu"))
            runs.append(1000 * (time.perf_counter() - t0))
        print(f"| {b} x {m} | {statistics.median(runs):.2f} | {int(ct.student_lengths.sum())} / {int(ct.teacher_lengths.sum())} |")


def memory(args: argparse.Namespace) -> None:
    from kdrun.losses.tokens import TokenDivergence

    device = torch.device(args.device)
    vocab = 32_000
    print(f"\n## memory: TokenDivergence(fkl) forward + backward, bf16 logits, batch 2, vocabulary {vocab:,} ({device})\n")
    print("| length | chunk_size | peak memory growth (MiB) | ms |")
    print("|---|---|---|---|")
    for length in args.lengths:
        for chunk in (256, None):
            s = torch.randn(2, length, vocab, dtype=torch.bfloat16, device=device, requires_grad=True)
            t = torch.randn(2, length, vocab, dtype=torch.bfloat16, device=device)
            mask = torch.ones(2, length, dtype=torch.bool, device=device)
            term = TokenDivergence("fkl", chunk_size=chunk)
            start = reset_peak(device)
            t0 = time.perf_counter()
            term(s, t, mask).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ms = 1000 * (time.perf_counter() - t0)
            print(f"| {length} | {chunk if chunk else 'none'} | {peak_growth(device, start):.0f} | {ms:.0f} |")
            del s, t, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["overhead", "trl", "memory", "cache", "rollout"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cache-k", type=int, nargs="+", default=[8, 32])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--run-dir", default="/tmp/kdrun-text-benchmark")
    args = p.parse_args()
    if args.only in (None, "overhead"):
        overhead(args)
    if args.only in (None, "trl"):
        trl_comparison(args)
    if args.only in (None, "memory"):
        memory(args)
    if args.only in (None, "cache"):
        cache(args)
    if args.only in (None, "rollout"):
        rollout(args)


if __name__ == "__main__":
    main()
