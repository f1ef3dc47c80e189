"""``python -m nfpi.train --config FILE [--run-dir DIR] [--no-resume] [key=value ...]``
(:func:`nfpi.train.loop.main`)."""

from .loop import main

if __name__ == "__main__":
    main()
