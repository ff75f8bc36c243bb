#!/usr/bin/env python3
"""Fine-tune a timm model with NEAT: ``python train.py --config configs/demo.yaml`` (see ``--help``)."""

from neat_vision.engine import main

if __name__ == "__main__":
    main()
