"""The end of a run: exported model weights and ``summary.json``."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from kdrun.engine.checkpoint import atomic_save
from kdrun.engine.metrics import json_safe

if TYPE_CHECKING:
    from kdrun.engine.record import RunRecord
    from kdrun.experiment import Experiment
    from kdrun.schema import ExperimentConfig

log = logging.getLogger("kdrun")


def export_models(experiment: Experiment, run_dir: Path, states: dict[str, dict] | None = None) -> dict[str, str]:
    """Write ``<name>.pt`` = ``{'model': state_dict}`` for every model trained by some stage.

    Adapters and loss-term modules are not part of an exported model. The files load as
    ``<model>.checkpoint=<file>`` in any other run. A Hugging Face model is also written as a
    ``save_pretrained`` directory ``<name>_hf/`` (with the data's tokenizer), which ``from_pretrained`` and
    ``<model>.net.path`` read; a LoRA model's directory holds its adapter weights only (``peft``).
    ``states``: full state dicts by model, gathered beforehand from sharded (FSDP) models.
    """
    from kdrun.models.hf import is_hf_model

    out = {}
    for name in experiment.trained_models:
        model = experiment.models[name]
        state = states[name] if states is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()}
        path = Path(run_dir) / f"{name}.pt"
        atomic_save({"model": state}, path)
        out[name] = str(path)
        if is_hf_model(model):
            where = Path(run_dir) / f"{name}_hf"
            model.save_pretrained(str(where), **({"state_dict": state} if states is not None else {}))
            tokenizer = getattr(experiment.data, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(where))
            out[f"{name}_hf"] = str(where)
    return out


def published_entry(cfg: ExperimentConfig | Any) -> dict[str, Any] | None:
    """The published number of this run's (teacher, student) pair, if the recipe records one."""
    from kdrun.schema import ExperimentConfig, experiment_config

    if not isinstance(cfg, ExperimentConfig):
        cfg = experiment_config(cfg)
    pub = cfg.published
    if pub is None or cfg.student_name is None:
        return None
    for row in pub.table:
        if row.student == cfg.student_name and row.teacher in (None, cfg.teacher_name):
            return {"source": pub.source, "metric": pub.metric, "top1": float(row.top1), "note": row.note}
    return None


def smoke_reasons(experiment: Experiment, record: RunRecord) -> list[str]:
    """Why this run's numbers are not comparable with a published full run (empty when they are):
    a data subset, capped epochs or steps, or evaluation on a validation split."""
    cfg = experiment.cfg
    out = []
    if cfg.data.subset is not None:
        out.append(f"data.subset={cfg.data.subset}")
    if cfg.data.val_split is not None:
        out.append(f"data.val_split={cfg.data.val_split} (evaluated on held-out training data, not the test set)")
    if cfg.trainer.max_steps_per_epoch is not None:
        out.append(f"trainer.max_steps_per_epoch={cfg.trainer.max_steps_per_epoch}")
    cap = cfg.trainer.max_epochs
    if cap is not None:
        capped = [p.name for p in experiment.stages if p.epochs is not None and p.epochs > cap]
        if capped:
            out.append(f"trainer.max_epochs={cap} (stages {', '.join(capped)} configured for more)")
    return out


def write_summary(experiment: Experiment, record: RunRecord, run_dir: Path, exported: dict[str, str],
                  wall_time_s: float, final_key: str, generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``summary.json``: the final stage's best/last accuracy (``final_key``: its label), every
    stage's, teachers', the published number and the difference, parameters and time."""
    cfg = experiment.cfg
    final = experiment.stages[-1]
    stats = record.stages.get(final_key, {})
    summary: dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method,
        "data": cfg.data.name,
        "teacher": cfg.teacher_name if "teacher" in experiment.models else None,
        "student": cfg.student_name,
        "seed": cfg.seed,
        "eval_model": final.eval_model,
        "best_top1": stats.get("best_top1"),
        "last_top1": stats.get("last_top1"),
        "best_top5": stats.get("best_top5"),
        "last_top5": stats.get("last_top5"),
        "best_epoch": stats.get("best_epoch"),
        "best_ppl": stats.get("best_ppl"),  # language models: test perplexity (lower is better)
        "last_ppl": stats.get("last_ppl"),
        "final_stage": final.name,
        "eval_set": "validation" if cfg.data.val_split else "test",
        "stages": record.stages,
        "frozen_top1": record.frozen_top1,
        "frozen_ppl": record.frozen_ppl,
        "random_models": list(experiment.random_models),
        "params": {name: sum(p.numel() for p in m.parameters()) for name, m in experiment.models.items()},
        "wall_time_s": wall_time_s,
        "train_time_s": record.train_time_s,
        "steps": record.step,
        "exported": exported,
        "run_dir": str(run_dir),
        "overrides": _overrides(run_dir),
    }
    if stats.get("models"):  # co-trained models of the final stage (DML peers, online teachers)
        summary["co_trained"] = stats["models"]
    if cfg.rounds is not None:
        summary["rounds"] = record.rounds
    if record.probe:
        summary.update(record.probe)
    if generation:
        summary["generation"] = generation
    if "last_shot_top1" in stats:  # long-tailed data: many/medium/few-shot accuracy
        summary["shot_top1"] = stats["last_shot_top1"]
        summary["shot_top1_best"] = stats.get("best_shot_top1")
    reasons = smoke_reasons(experiment, record)
    summary["comparable"] = not reasons
    summary["not_comparable"] = reasons
    summary["data_coverage"] = dict(getattr(experiment.data, "class_coverage", {}) or {})
    pub = published_entry(cfg) if not cfg.data.val_split else None  # published numbers are test-set numbers
    if pub is not None:
        got = summary["best_top1"] if pub["metric"] == "best" else summary["last_top1"]
        pub["reproduced"] = got
        pub["comparable"] = not reasons
        pub["delta"] = None if got is None or reasons else got - pub["top1"]
        summary["published"] = pub
    with open(Path(run_dir) / "summary.json", "w", encoding="utf-8") as f:
        json.dump(json_safe(summary), f, indent=2)
    if cfg.trainer.tensorboard:
        _tensorboard_hparams(summary, run_dir)
    return summary


def _tensorboard_hparams(summary: dict[str, Any], run_dir: Path) -> None:
    """One hparams record per run (its overrides, model names, seed -> its accuracies), so that
    TensorBoard's HParams tab compares the runs of a sweep."""
    from torch.utils.tensorboard import SummaryWriter

    hparams: dict[str, Any] = {"method": str(summary["method"]), "teacher": str(summary["teacher"]),
                               "student": str(summary["student"]), "seed": summary["seed"]}
    for item in summary["overrides"]:
        key, _, value = item.lstrip("+~").partition("=")
        if key and not key.startswith("hydra"):
            hparams[key] = value
    metrics = {f"hparam/{k}": float(summary[k]) for k in ("best_top1", "last_top1", "best_ppl", "last_ppl")
               if summary.get(k) is not None}
    with SummaryWriter(str(Path(run_dir) / "tb")) as writer:
        writer.add_hparams(hparams, metrics, run_name="hparams")


def _overrides(run_dir: Path) -> list[str]:
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if path.is_file():
        # as typed: an override may hold an interpolation (``a=${b}``), which a list has no root to resolve against
        return [str(x) for x in OmegaConf.to_container(OmegaConf.load(path), resolve=False)]
    return []
