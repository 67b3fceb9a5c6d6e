"""DDP on CPU (gloo, 2 processes through torchrun): global batch B over 2 ranks trains the same
weights as one process with batch B, for the KD quickstart, and only rank 0 writes."""
import json
import os
import subprocess
import sys

import torch
import pytest

pytestmark = pytest.mark.slow  # subprocesses: deselect with -m 'not slow'

# models without BatchNorm: per-rank BN statistics would differ from the full batch's, and
# SyncBatchNorm (trainer.sync_batchnorm) needs CUDA
ARGS = ["data.subset=256", "data.batch_size=32", "data.drop_last=true", "trainer.max_epochs=2", "trainer.progress=off",
        "trainer.tensorboard=false", "trainer.deterministic=true", "trainer.device=cpu",
        "+teacher.net.norm=none", "+student.net.norm=none"]


def run(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def one_and_two_ranks(args, where):
    """Run ``kdrun ARGS`` in one process and on 2 ranks; their run directories."""
    one, two = where / "one", where / "two"
    run([sys.executable, "-m", "kdrun", *args, f"hydra.run.dir={one}"], where)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun", *args,
         f"hydra.run.dir={two}"], where)
    return one, two


def test_two_ranks_match_one_process(tmp_path):
    one = tmp_path / "one"
    run([sys.executable, "-m", "kdrun", *ARGS, f"hydra.run.dir={one}"], tmp_path)
    two = tmp_path / "two"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun", *ARGS,
                f"hydra.run.dir={two}"], tmp_path)
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports, rank 1 is silent
    for name in ("student.pt", "teacher.pt"):
        a = torch.load(one / name, weights_only=True)["model"]
        b = torch.load(two / name, weights_only=True)["model"]
        for k in a:
            # 32 SGD steps at lr 0.1: summation order differs between one all-reduced mean and one
            # process's mean; a sharding or averaging mistake would be off by the weights' own scale
            torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=2e-3)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["steps"] == s2["steps"] == 2 * 2 * (256 // 32)
    assert abs(s1["last_top1"] - s2["last_top1"]) < 1.0
    assert not (tmp_path / "outputs").exists()  # rank 1 made no run directory of its own


def test_two_ranks_co_train_both_models_like_one_process(tmp_path):
    """Deep mutual learning under DDP: both trained models (each in its own optimizer group, updated by
    two routed backward passes) are wrapped and all-reduced, so 2 ranks train the weights 1 process does."""
    args = ["+recipe=cifar100_dml", "data=digits", "data.subset=256", "data.batch_size=32", "data.drop_last=true",
            "student=cnn_tiny", "model@models.peer=cnn_tiny", "+student.net.norm=none", "+models.peer.net.norm=none",
            "stages.main.epochs=1", "stages.main.optimizer.lr=0.1", "trainer.progress=off", "trainer.tensorboard=false",
            "trainer.deterministic=true", "trainer.device=cpu"]
    one, two = one_and_two_ranks(args, tmp_path)
    for name in ("student.pt", "peer.pt"):
        a = torch.load(one / name, weights_only=True)["model"]
        b = torch.load(two / name, weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=2e-3)


def test_sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    """torchrun forwards SIGTERM (SLURM's preemption) to both ranks; they agree at a log row (or an epoch's
    end), rank 0 writes the checkpoint, and the resumed 2-rank run finishes."""
    import signal
    import time

    run_dir = tmp_path / "cut"
    long = [a for a in ARGS if not a.startswith("trainer.max_epochs")] + [
        "stages.teacher.epochs=1", "stages.distill.epochs=40", "trainer.log_every=2", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun"]
    proc = subprocess.Popen([*cmd, *long], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    end = time.time() + 200
    while not (metrics.is_file() and sum(1 for _ in open(metrics)) > 12):
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode != 0 and "kdrun: stopped by SIGTERM in stage 'distill'" in err, err[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["record"]["stage_index"] == 1 and state["record"]["stage_step"] > 0  # stopped inside distill, saved
    done = run([*cmd, f"hydra.run.dir={run_dir}", "resume=auto"], tmp_path)
    assert "resuming from" in done.stdout + done.stderr and (run_dir / "summary.json").is_file()


def test_a_hung_rank_fails_the_others_after_the_timeout_with_a_message_naming_the_rank(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])  # tests.helpers for the ranks
    args = [*ARGS, "stages.teacher.epochs=1", "+batch_transform._target_=tests.helpers.HangOnRank",
            "+batch_transform.at=4", "+batch_transform.seconds=15", "trainer.dist_timeout_s=4", f"hydra.run.dir={tmp_path / 'r'}"]
    started = __import__("time").time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "kdrun: error: rank 0 of 2: a collective operation waited more than 4 s for the other ranks" in proc.stderr, \
        proc.stderr[-3000:]
    assert "rank 0 of 2" in (tmp_path / "r" / "FAILED").read_text()
    assert __import__("time").time() - started < 120  # not PyTorch's 30-minute default


def test_ranks_draw_their_own_random_numbers_and_a_resumed_run_continues_each_ranks_streams(tmp_path):
    """Issue 16: every rank used the same seed, so mixup drew the same weights and permutations on each.
    Now each rank's global generators are seeded from (seed, rank) after the models are built, every
    rank's generator states are saved in the checkpoint, and a 2-rank run preempted mid-epoch and resumed
    trains bit for bit the weights of the uninterrupted run."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])  # tests.helpers for the ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun"]
    args = [a for a in ARGS if not a.startswith("trainer.max_epochs")] + [
        "stages.teacher.epochs=1", "stages.distill.epochs=3", "trainer.log_every=2",
        "+batch_transform._target_=tests.helpers.MixupThenSignal"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"

    def launch(run_dir, at, *extra):
        return subprocess.run([*cmd, *args, f"+batch_transform.at={at}", f"hydra.run.dir={run_dir}", *extra], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    assert launch(whole, 10**6).returncode == 0
    stopped = launch(cut, 19)  # 32 steps in all: stops in the distill stage's second epoch
    assert stopped.returncode != 0 and "kdrun: stopped by SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    state = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["record"]["batch"] < 8  # mid-epoch
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    done = launch(cut, 19, "resume=auto")  # the same config; the 12 steps left never reach call 19
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(whole / "student.pt", weights_only=True)["model"]
    b = torch.load(cut / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trainable_adapters_and_loss_terms_train_under_two_ranks_as_in_one_process(tmp_path):
    """Issue 16, item 7: trainable adapters and loss terms are no longer each wrapped in DDP with
    find_unused_parameters; their gradients are averaged by one all-reduce per optimizer step. A FitNet-style
    projector and CRD's embedding heads (and the student) train on 2 ranks as in one process."""
    args = [*ARGS, "stages.teacher.epochs=1",
            "+adapters.proj={_target_: kdrun.models.adapters.Projector, inputs: {x: student.feat}, target: teacher.feat, "
            "in_dim: auto, out_dim: auto}",
            "+loss.hint={_target_: kdrun.losses.HintLoss, weight: 1, inputs: {student: adapters.proj, teacher: teacher.feat}}",
            "+loss.crd={_target_: kdrun.losses.CRDLoss, weight: 0.5, num_negatives: 64, "
            "inputs: {student: student.feat, teacher: teacher.feat, index: batch.index}}",
            "stages.distill.losses=[ce,kd,hint,crd]"]
    one, two = one_and_two_ranks(args, tmp_path)
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)["modules"]
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)["modules"]
    keys = [k for k in a if k.startswith(("models.student.", "adapters.proj.", "losses.crd.")) and k != "losses.crd._extra_state"]
    assert {"adapters.proj.linear.weight", "losses.crd.embed_s.linear.weight", "losses.crd.memory_s"} <= set(keys)
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=2e-3, msg=k)


def _two_stage_rank(rank: int, world: int, init_file: str, run_dir: str, counts: str) -> None:
    import torch.distributed as dist

    import kdrun.engine.stage as stage_module
    from kdrun.config import validate
    from kdrun.engine.distributed import DistInfo
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg

    made = []

    class Counted(stage_module.DistributedDataParallel):
        def __init__(self, module, **kwargs):
            made.append(kwargs)
            super().__init__(module, **kwargs)

    stage_module.DistributedDataParallel = Counted
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = validate(compose_cfg([*ARGS, "trainer.max_epochs=1", "stages.teacher.train=[student]", "stages.teacher.losses=[ce]",
                                    "teacher.checkpoint=null"]))
        Trainer(cfg, run_dir, dist=DistInfo(rank, rank, world)).fit()
        torch.save(made, f"{counts}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_model_trained_in_two_stages_is_wrapped_in_ddp_once(tmp_path):
    """Issue 16, item 7: DDP wrapping (a weight broadcast, new buckets, a new compiled graph) used to be
    redone at every stage; now a model is wrapped once per run for each set of trained parameters."""
    torch.multiprocessing.spawn(_two_stage_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path / "made")),
                                nprocs=2)
    for rank in (0, 1):
        made = torch.load(tmp_path / f"made.{rank}", weights_only=False)
        assert len(made) == 1 and made[0]["broadcast_buffers"] is True  # no SyncBatchNorm: rank 0's BN statistics


def test_ddk_domain_weights_agree_across_two_ranks_and_one_process(tmp_path):
    """DDK's sampler draws one global batch and its weights come from all-reduced per-domain sums: two ranks and one
    process train alike and end with the same weights."""
    args = ["+recipe=text_ddk", "trainer.device=cpu", "trainer.progress=off", "trainer.tensorboard=false",
            "trainer.deterministic=true", "data.batch_size=8", "data.source.max_train_blocks=40",
            "data.source.max_test_blocks=4", "stages.teacher.max_steps=10", "stages.distill.max_steps=30",
            "loss.ddk.interval=10", "trainer.eval_every_steps=null"]
    one, two = one_and_two_ranks(args, tmp_path)
    w = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["modules"]["losses.ddk.weights"] for d in (one, two)]
    assert not torch.allclose(w[0], torch.full_like(w[0], 1 / 3))  # the weights moved
    torch.testing.assert_close(w[0], w[1], rtol=1e-4, atol=1e-5)


def test_preference_pairs_train_alike_on_two_ranks_and_one_process(tmp_path):
    """Each rank gets whole pairs (a chosen and a rejected row): REDI's pair terms train the weights of one process."""
    from tests.test_recipes import smoke_overrides

    args = ["+recipe=qwen25_redi", *[o for o in smoke_overrides("qwen25_redi") if not o.startswith("trainer.max_")],
            "trainer.deterministic=true", "stages.sft.epochs=1", "stages.redi.epochs=1", "stages.redi.optimizer.lr=0.01",
            "stages.sft.max_steps=2", "stages.redi.max_steps=3", "data.batch_size=8",
            # SGD: Adam's division by sqrt(v) turns float summation-order noise on near-zero gradients into visible steps
            "optim@stages.sft.optimizer=sgd", "optim@stages.redi.optimizer=sgd", "stages.sft.optimizer.lr=0.5",
            "stages.redi.optimizer.lr=0.5"]
    one, two = one_and_two_ranks(args, tmp_path)
    a = torch.load(one / "student.pt", weights_only=True)["model"]
    b = torch.load(two / "student.pt", weights_only=True)["model"]
    for k in a:  # summation order differs (as in the first test of this file); a pair split across ranks would not
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=2e-3)


def test_cross_tokenizer_distillation_trains_alike_on_two_ranks_and_one_process(tmp_path):
    """Span-aligned KD between two tokenizers: every rank tokenises its own examples twice and the span losses are
    averaged over the global batch, so 2 ranks train the weights of one process."""
    from tests.test_recipes import smoke_overrides

    args = ["+recipe=qwen25_cross_tokenizer",
            *[o for o in smoke_overrides("qwen25_cross_tokenizer") if not o.startswith("trainer.max_")],
            "trainer.deterministic=true", "trainer.max_epochs=1", "stages.distill.max_steps=3", "data.batch_size=8",
            "optim@stages.distill.optimizer=sgd", "stages.distill.optimizer.lr=0.5", "trainer.eval_every_steps=null",
            "trainer.precision=fp32", "teacher.net.dtype=float32"]
    one, two = one_and_two_ranks(args, tmp_path)
    a, b = (torch.load(d / "student.pt", weights_only=True)["model"] for d in (one, two))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recipe,sharded", [("text_cached_kd", True), ("msmarco_margin_mse", True),
                                            ("bert_multiteacher_tokenizers", False), ("text_swing", False),
                                            ("llava_mod_text", True)])
def test_text_method_trains_alike_on_two_ranks_and_one_process(tmp_path, recipe, sharded):
    """The text methods' data paths on 2 ranks: a teacher cache read by each rank's own sample indices (text_cached_kd),
    query/positive/negative rows and a bi-encoder scored twice per row (Margin-MSE), two teachers with their own
    tokenizers, Swing's privacy scores, and preference pairs split whole among ranks in a student's second stage
    (LLaVA-MoD, a mixture-of-experts student). Plain SGD without a schedule on the global batch: DDP, and for three of
    them FSDP, train the student of one process, and the weights really moved. (Under FSDP a second stage used to build
    its optimizer over the root unit's unsharded copies left by the first stage's evaluation: the embeddings and head
    stopped training, max |diff| 2.4.)"""
    from tests.helpers import initial_weights, method_overrides

    overrides = method_overrides(recipe)
    one, two = one_and_two_ranks([f"+recipe={recipe}", *overrides], tmp_path)
    start = initial_weights(recipe, overrides, "student")
    a, b = (torch.load(d / "student.pt", weights_only=True)["model"] for d in (one, two))
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # the student trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    if sharded:
        fsdp = tmp_path / "fsdp"
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun",
             f"+recipe={recipe}", *overrides, "trainer.fsdp=true", f"hydra.run.dir={fsdp}"], tmp_path)
        c = torch.load(fsdp / "student.pt", weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5)
