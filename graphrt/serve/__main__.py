"""``python -m graphrt.serve``."""

from graphrt.serve.cli import main

# The guard matters: the engine process is started with "spawn", which imports this module.
if __name__ == "__main__":
    main()
