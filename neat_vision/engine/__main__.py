"""``python -m neat_vision.engine``: the training command (``neat-train``; ``train.py`` in a checkout)."""

from neat_vision.engine import main

if __name__ == "__main__":
    main()
