"""kdrun: a knowledge-distillation experiment runner for PyTorch.

An experiment is a composed Hydra config (data, teacher, student, taps, adapters, weighted loss
terms, stages, trainer); :mod:`kdrun.config` validates it, :mod:`kdrun.build` turns it into a
:class:`kdrun.experiment.Experiment`, and :class:`kdrun.engine.trainer.Trainer` runs every stage with one
training loop. See docs/architecture.md.
"""

__version__ = "0.1.0"
