"""recognition/train.py with the tiny test backbone of tests/conftest.py (for tests that launch horovodrun)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import patch_backbone  # noqa: E402

if __name__ == "__main__":
    patch_backbone()
    from recognition.train import main
    sys.exit(main(sys.argv[1:]))
