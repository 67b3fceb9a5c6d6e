"""FSDP2 on CPU (gloo, 2 processes through torchrun, ``trainer.fsdp=true``): every model sharded, the text
quickstart (tiny) trains the weights one process trains; checkpoints hold full tensors, and a sharded run
killed mid-epoch resumes from them to the weights of the uninterrupted sharded run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun subprocesses

TINY = ["+recipe=text_quickstart", "data.source.tokenizer.train.vocab_size=300", "data.source.seq_len=16",
        "data.source.max_train_blocks=64", "data.source.max_test_blocks=16", "data.batch_size=8",
        "stages.teacher.max_steps=5", "stages.distill.max_steps=7", "teacher.net.config.hidden_size=32",
        "teacher.net.config.intermediate_size=64", "student.net.config.hidden_size=16", "student.net.config.intermediate_size=32",
        "trainer.progress=off", "trainer.tensorboard=false", "trainer.device=cpu", "trainer.eval_every_steps=null",
        "trainer.deterministic=true", "trainer.save_every_steps=3", "trainer.accumulate_grad_batches=2"]


def run(args, cwd, ranks=None, ok=True):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(os.getcwd()), env.get("PYTHONPATH", "")]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks else [sys.executable]
    proc = subprocess.run([*launch, "-m", "kdrun", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def weights(run_dir, name):
    return torch.load(run_dir / f"{name}.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """One uninterrupted 2-rank sharded run, shared by the tests below (torchrun launches are the slow part)."""
    where = tmp_path_factory.mktemp("fsdp")
    proc = run([*TINY, "trainer.fsdp=true", f"hydra.run.dir={where / 'two'}"], where, ranks=2)
    return where, proc


def test_two_sharded_ranks_train_the_weights_of_one_process(sharded_run, tmp_path):
    where, proc = sharded_run
    run([*TINY, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert "fsdp: student sharded over 2 ranks (2 layer units + root)" in proc.stderr + proc.stdout
    for name in ("teacher", "student"):
        a, b = weights(tmp_path / "one", name), weights(where / "two", name)
        assert set(a) == set(b)
        for k in a:  # full tensors, not shards; summation order differs between one process and 2 ranks
            assert a[k].shape == b[k].shape
            assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (name, k, float((a[k] - b[k]).abs().max()))
    ckpt = torch.load(where / "two" / "checkpoints" / "last.pt", weights_only=True)
    emb = ckpt["modules"]["models.student.model.embed_tokens.weight"]
    assert emb.shape == (300, 16) and type(emb) is torch.Tensor


def test_a_sharded_run_killed_mid_epoch_resumes_exactly(sharded_run, tmp_path):
    where, _ = sharded_run
    conf = tmp_path / "conf" / "batch_transform"
    conf.mkdir(parents=True)
    # 4 steps of 2 micro-batches per epoch; call 1 is the trace, the teacher's 5 steps are calls 2-11, distill step k
    # starts at call 12 + 2 (k - 1): dies at the start of distill step 7, after the step-6 checkpoint (mid-epoch 2)
    (conf / "kill.yaml").write_text("_target_: tests.helpers.KillAtCall\nat: 24\n")
    cut = [*TINY, "trainer.fsdp=true", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "batch_transform=kill",
           f"hydra.run.dir={tmp_path / 'cut'}"]
    proc = run(cut, tmp_path, ranks=2, ok=False)
    assert proc.returncode != 0
    record = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["record"]
    assert (record["stage_index"], record["stage_step"], record["batch"]) == (1, 6, 4)
    (conf / "kill.yaml").write_text("_target_: tests.helpers.KillAtCall\nat: 1000000\n")
    run([*cut, "resume=auto"], tmp_path, ranks=2)
    for name in ("teacher", "student"):
        a, b = weights(where / "two", name), weights(tmp_path / "cut", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_fsdp_without_a_distributed_launch_is_refused():
    from kdrun.engine.fsdp import check_supported
    from kdrun.errors import KdrunError
    from kdrun.schema import experiment_config
    from kdrun.config import validate
    from tests.conftest import compose_cfg

    cfg = experiment_config(validate(compose_cfg([t for t in TINY if not t.startswith("+recipe")] + ["trainer.fsdp=true"],
                                                 recipe="text_quickstart")))
    with pytest.raises(KdrunError, match="torchrun"):
        check_supported(cfg, 0)
    check_supported(cfg, 2)
    for extra, word in (("trainer.compile=true", "compile"),):
        bad = experiment_config(validate(compose_cfg([t for t in TINY if not t.startswith("+recipe")] + ["trainer.fsdp=true", extra],
                                                     recipe="text_quickstart")))
        with pytest.raises(KdrunError, match=word):
            check_supported(bad, 2)


def _rollout_args(generate_per: str, recipe: str = "qwen25_onpolicy_rkl") -> list[str]:
    """A rollout recipe on tiny Qwen2 stand-ins: every micro-batch on-policy, 2 micro-batches per step, fp32."""
    from tests.test_recipes import smoke_overrides

    skip = ("trainer.max_steps_per_epoch", "trainer.accumulate_grad_batches")
    return [f"+recipe={recipe}", *[o for o in smoke_overrides(recipe) if not o.startswith(skip)],
            "generation.do_sample=true", "trainer.max_steps_per_epoch=3", "trainer.accumulate_grad_batches=2",
            "trainer.deterministic=true", "trainer.eval_every_steps=null", "trainer.precision=fp32",
            "teacher.net.dtype=float32", "stages.distill.optimizer.lr=0.01", f"batch_transform.generate_per={generate_per}"]


@pytest.mark.parametrize("generate_per,gather,recipe", [("step", True, "qwen25_onpolicy_rkl"),
                                                        ("micro_batch", False, "qwen25_onpolicy_rkl"),
                                                        ("step", True, "qwen25_seqkd_cross_tokenizer")])
def test_a_sharded_student_generates_the_rollouts_of_ddp_and_trains_its_weights(tmp_path, generate_per, gather, recipe):
    """Rollouts under FSDP: the sharded sampler (its units gathered for the call, or kept sharded with ``synced_gpus``)
    draws the tokens that it draws under DDP, with the teacher sharded too; with 2 ranks the gradient sums agree bit
    for bit, so the trained weights are the DDP run's. The sampler is the student, or (sequence-level KD across
    tokenizers) the sharded teacher, whose text the student learns through its own tokenizer. The evaluation's
    generation (rank 0 alone, the sharded student gathered) then writes the DDP run's completions."""
    args = _rollout_args(generate_per, recipe)
    run([*args, f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path, ranks=2)
    sharded = run([*args, "trainer.fsdp=true", f"+batch_transform.gather_sharded={str(gather).lower()}",
                   f"hydra.run.dir={tmp_path / 'fsdp'}"], tmp_path, ranks=2)
    assert "fsdp: student sharded over 2 ranks" in sharded.stderr + sharded.stdout
    assert "fsdp: teacher sharded over 2 ranks" in sharded.stderr + sharded.stdout
    a, b = weights(tmp_path / "ddp", "student"), weights(tmp_path / "fsdp", "student")
    from tests.helpers import initial_weights

    still = initial_weights(recipe, args[1:], "student")
    assert max(float((a[k] - still[k]).abs().max()) for k in a) > 1e-3  # training moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the generation: block: rank 0 samples alone from the gathered student, the DDP run's completions
    ddp_text = (tmp_path / "ddp" / "generations.jsonl").read_text()
    assert ddp_text and (tmp_path / "fsdp" / "generations.jsonl").read_text() == ddp_text
