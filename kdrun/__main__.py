"""``python -m kdrun`` is the same as the ``kdrun`` command (torchrun starts it this way)."""
from kdrun.cli import main

if __name__ == "__main__":
    main()
