import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FACES = os.path.join(ROOT, 'data', 'faces')
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')

# Small widths keep every training test to a second or two on CPU; the architecture is unchanged.
TINY = ['--device', 'cpu', '--ngf', '8', '--ndf', '8', '--batch-size', '8', '--n-samples', '6',
        '--log-every', '1', '--grid-every', '2', '--save-every', '2']


@pytest.fixture
def faces(tmp_path):
    """16 real faces from the bundled sample, half of them one folder down (loading is recursive)."""
    root = tmp_path / 'faces'
    (root / 'sub').mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(FACES))[:16]):
        shutil.copy(os.path.join(FACES, name), root / ('sub' if i % 2 else '') / name)
    return str(root)
