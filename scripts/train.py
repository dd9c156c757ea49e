#!/usr/bin/env python
"""Data-parallel training job: see `python scripts/train.py --help` (same as `python -m mpidp.train`)."""
from mpidp.train import main

if __name__ == "__main__":
    main()
