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
