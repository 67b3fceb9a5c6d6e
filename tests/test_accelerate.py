"""Speed settings: mixed precision, channels_last, torch.compile without per-step recompilation."""
import pytest
import torch

from kdrun.config import validate
from kdrun.engine import run
from kdrun.engine.accelerate import fused_kwargs
from tests.conftest import compose_cfg

FAST = ["data.subset=128", "trainer.progress=off", "trainer.tensorboard=false", "trainer.max_epochs=1"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_checkpoints_the_scaler(tmp_path, precision):
    summary = run(validate(compose_cfg(FAST + [f"trainer.precision={precision}", "trainer.channels_last=true"])), tmp_path)
    assert summary["last_top1"] is not None and summary["steps"] > 0
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["stage"]
    assert "scaler" in state


def test_channels_last_gives_the_same_result_as_contiguous(tmp_path):
    a = run(validate(compose_cfg(FAST + ["trainer.deterministic=true"])), tmp_path / "a")
    b = run(validate(compose_cfg(FAST + ["trainer.deterministic=true", "trainer.channels_last=true"])), tmp_path / "b")
    assert a["last_top1"] == pytest.approx(b["last_top1"], abs=1.0)


def test_compile_traces_taps_and_does_not_recompile_every_step(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = validate(compose_cfg(FAST + ["trainer.compile=true", "trainer.compile_backend=aot_eager", "data.batch_size=16",
                                       "data.drop_last=true", "trainer.max_epochs=2"]))
    summary = run(cfg, tmp_path)
    assert summary["steps"] == 2 * 2 * (128 // 16)  # two stages, two epochs each
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # one graph per model per grad mode (teacher: train in stage 1, frozen under no_grad in stage 2), not per step
    assert 0 < graphs <= 6, graphs
    torch._dynamo.reset()


def test_fused_only_where_it_applies():
    assert fused_kwargs(torch.optim.SGD, torch.device("cpu"), True) == {}
    assert fused_kwargs(torch.optim.SGD, torch.device("cuda"), False) == {}
    assert fused_kwargs(torch.optim.AdamW, torch.device("cuda"), True) == {"fused": True}
    # fp16: the scaler's overflow flag stays on the device only with a fused optimizer
    assert fused_kwargs(torch.optim.SGD, torch.device("cuda"), False, "fp16") == {"fused": True}
    assert fused_kwargs(torch.optim.SGD, torch.device("cuda"), False, "bf16") == {}
    assert fused_kwargs(torch.optim.SGD, torch.device("cpu"), False, "fp16") == {}


def test_mixing_transforms_read_nothing_on_the_host(monkeypatch):
    """Mixup/CutMix draw on the batch's device without a host read (Beta's argument check did three)."""
    from kdrun.data.mix import CutMix, Mixup

    reads = []
    for name in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    batch = {"input": torch.rand(8, 3, 8, 8), "target": torch.randint(0, 10, (8,)), "index": torch.arange(8)}
    for transform in (Mixup(10), Mixup(10, per_sample=True, fraction=0.5), CutMix(10), CutMix(10, fraction=0.5)):
        out = transform(batch)
    monkeypatch.undo()
    assert reads == [] and out["soft_target"].shape == (8, 10)


@pytest.mark.parametrize("name", ["KDLoss", "ReverseKLLoss", "BalancedKLLoss", "CrossEntropy"])
def test_logit_losses_compute_in_float32_under_autocast(name):
    from kdrun.losses import logits

    term = getattr(logits, name)() if name == "CrossEntropy" else getattr(logits, name)(temperature=4.0)
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(16, 100, generator=g).bfloat16() * 5 for _ in range(2))
    second = torch.randint(0, 100, (16,), generator=g) if name == "CrossEntropy" else t
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = term(s, second)
    want = term(s.float(), second.float() if second.is_floating_point() else second)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compile_uses_static_shapes(monkeypatch):
    """The epoch's short last batch must not turn the models' graphs dynamic for the rest of the run."""
    from kdrun.engine.accelerate import model_callables

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    model_callables(torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)}), True, backend="aot_eager")
    assert seen == [{"mode": None, "backend": "aot_eager", "dynamic": False}]


def test_sync_batchnorm_leaves_frozen_teachers_alone():
    """Only trained models get SyncBatchNorm (issue 16): a frozen teacher's statistics never change."""
    from kdrun.build import trained_model_names
    from kdrun.schema import experiment_config

    cfg = experiment_config(validate(compose_cfg(["~stages.teacher", "data.subset=128"])))
    assert trained_model_names(cfg) == {"student"}
    cfg = experiment_config(validate(compose_cfg(["data.subset=128"])))
    assert trained_model_names(cfg) == {"teacher", "student"}  # the teacher stage trains it


def test_fast_preset_turns_on_cudnn_autotuning_and_tf32(monkeypatch):
    from kdrun.engine.trainer import set_cuda_flags

    cfg = validate(compose_cfg(["trainer=fast"]))
    assert cfg.trainer.cudnn_benchmark and cfg.trainer.tf32
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    set_cuda_flags(True, True, deterministic=True)  # deterministic kernels are never chosen by timing
    assert torch.backends.cudnn.benchmark is False and torch.backends.cuda.matmul.allow_tf32 is True
    set_cuda_flags(True, False, deterministic=False)
    assert torch.backends.cudnn.benchmark is True


def test_image_folder_batches_are_channels_last_when_asked(tmp_path):
    from kdrun.data.loaders import make_loader
    from kdrun.data.datasets import DatasetSplits
    from kdrun.schema import DataConfig

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3, 8, 8), i % 2

    data = DataConfig(name="x", num_classes=2, source={}, num_workers=0, batch_size=2)
    loader = make_loader(DatasetSplits(Images(), Images()), "train", data, torch.device("cpu"), train=True, channels_last=True)
    loader.set_epoch(0)
    x = next(iter(loader))["input"]
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_an_op_refused_under_determinism_is_one_message_naming_it_and_the_stage(tmp_path):
    from kdrun.errors import KdrunError

    cfg = validate(compose_cfg(["data.subset=64", "trainer.max_epochs=1", "trainer.progress=off", "trainer.tensorboard=false",
                                "~stages.teacher", "+loss.refused._target_=tests.helpers.RefusedUnderDeterminism",
                                "+loss.refused.inputs.student=student.logits", "stages.distill.losses=[ce,refused]"]))
    with pytest.raises(KdrunError) as info:
        run(cfg, tmp_path)
    text = str(info.value)
    assert text.startswith("trainer.deterministic=true: adaptive_avg_pool2d_backward_cuda has no deterministic implementation")
    assert "stage 'distill' (loss terms ce, refused)" in text and "trainer.deterministic=false" in text


def test_a_model_that_hits_the_recompile_limit_is_named_in_a_warning(monkeypatch, caplog):
    """Issue 16, item 3: models of one class share torch.compile's cache; once it is full the rest run eager
    with only torch's own log line. kdrun raises the limit to 8 per compiled model and names any model whose
    forward still hits it."""
    import logging

    import torch._dynamo
    from torch import nn

    from kdrun.engine.accelerate import RecompileLimitWatch, compile_budget
    from kdrun.models.simple import simple_cnn

    models = nn.ModuleDict({f"peer{i}": simple_cnn(10, 1, width=4 + i, depth=2) for i in range(3)})
    assert compile_budget(models) == 24
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)  # three same-class models, room for two
    watch = RecompileLimitWatch(models).install()
    try:
        with caplog.at_level(logging.WARNING, logger="kdrun"):
            x = torch.randn(2, 1, 8, 8)
            for model in models.values():
                torch.compile(model, backend="eager", dynamic=False)(x)
    finally:
        watch.remove()
        torch._dynamo.reset()
    notes = [r.getMessage() for r in caplog.records if r.name == "kdrun"]
    assert len(notes) == 1 and "the forward of peer0, peer1, peer2 hit the recompile limit (2 graphs)" in notes[0], notes
    assert "UNCOMPILED" in notes[0]


def test_compile_scope_step_compiles_a_stage_forward_as_one_graph_with_the_eager_result(tmp_path):
    """trainer.compile_scope=step (trainer=fast's): the stage's models, adapters and loss terms as one compiled
    function. With the eager backend it trains exactly the weights eager mode trains; traced by aot_eager, the
    KD stage is one graph without breaks (weights and scales stay outside it: no recompile when they change)."""
    import torch._dynamo

    args = FAST + ["trainer.deterministic=true", "data.drop_last=true", "loss.kd.warmup_epochs=2"]
    eager = run(validate(compose_cfg(args + ["trainer.max_epochs=2"])), tmp_path / "eager")
    step = run(validate(compose_cfg(args + ["trainer.max_epochs=2", "trainer.compile=true", "trainer.compile_scope=step",
                                            "trainer.compile_backend=eager"])), tmp_path / "step")
    assert eager["last_top1"] == step["last_top1"]
    a = torch.load(tmp_path / "eager" / "student.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "step" / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run(validate(compose_cfg(args + ["trainer.max_epochs=2", "trainer.compile=true", "trainer.compile_scope=step",
                                     "trainer.compile_backend=aot_eager", "~stages.teacher"])), tmp_path / "aot")
    counters = torch._dynamo.utils.counters
    # one graph for the distill stage's whole forward; the ramped KD weight (0.45 then 0.9) did not recompile it
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_compile_scope_is_checked():
    from kdrun.errors import KdrunError

    with pytest.raises(KdrunError, match="trainer.compile_scope must be models"):
        validate(compose_cfg(["trainer.compile_scope=all"]))
