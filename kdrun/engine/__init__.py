"""The one training engine: every stage of every method runs through :func:`kdrun.engine.loop.run`."""
from kdrun.engine.loop import run

__all__ = ["run"]
