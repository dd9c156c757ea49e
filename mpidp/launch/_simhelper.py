"""``python -m mpidp.launch._simhelper netns|node|cut ...``: the helpers a simulated-cluster launch
runs (see ``simcluster``); a module of its own so that running it does not import it twice."""
import sys

from .simcluster import main

if __name__ == "__main__":
    sys.exit(main())
