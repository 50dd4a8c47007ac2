"""Checkpoints written before the shared code was split into modules (tests/legacy, made by the code of
commit 88de5a7 with tests/legacy/make_legacy.py) still sample the same faces and still resume."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import acgan
import common
import dcgan
import sampling
import stylegan
from conftest import FACES, ROOT

LEGACY = os.path.join(ROOT, 'tests', 'legacy')
SCRIPTS = {'dcgan': dcgan, 'acgan': acgan, 'stylegan': stylegan}


@pytest.mark.parametrize('name', SCRIPTS)
def test_old_checkpoint_gives_the_same_samples(name):
    """The generator rebuilt from the old file draws the fixed-grid faces the old code drew (to PNG rounding)."""
    ckpt = common.load_checkpoint(os.path.join(LEGACY, f'{name}_ckpt.pt'))
    G, module = sampling.load_generator(ckpt)
    assert module is SCRIPTS[name]
    got = sampling.to_uint8(sampling.generate(G, tuple(t[:4] for t in ckpt['fixed']))).astype(int)
    want = torch.load(os.path.join(LEGACY, f'{name}_samples.pt'), weights_only=True)['fixed_grid'].numpy().astype(int)
    assert got.shape == want.shape == (4, 64, 64, 3)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01


@pytest.mark.parametrize('name', SCRIPTS)
def test_old_run_resumes(name, tmp_path):
    """A run stopped by the old code at epoch 1 of 2 goes on with the new code from where it stopped, with the
    flags it was started with (stylegan.py's old --lr now sets --lr-g and --lr-d)."""
    faces = tmp_path / 'faces'   # the 16 faces it was trained on
    faces.mkdir()
    for f in sorted(os.listdir(FACES))[:16]:
        shutil.copy(os.path.join(FACES, f), faces)
    out = tmp_path / 'run'
    out.mkdir()
    shutil.copy(os.path.join(LEGACY, f'{name}_ckpt.pt'), out / 'ckpt.pt')
    old = common.load_checkpoint(out / 'ckpt.pt')
    extra = ['--labels', os.path.join(ROOT, 'data', 'labels.csv')] if name == 'acgan' else []
    SCRIPTS[name].main(['--out', str(out), '--resume', '--epochs', '2', '--data', str(faces), *extra])
    new = common.load_checkpoint(out / 'ckpt.pt')
    assert old['step'] == 2 and new['step'] == 4
    assert set(new['models']) == set(old['models']) and new['model_args'] == old['model_args']
    for k, v in old['models']['G'].items():   # the same architecture, trained on from the old weights
        assert new['models']['G'][k].shape == v.shape
    assert not torch.equal(new['models']['G'][next(iter(old['models']['G']))], old['models']['G'][next(iter(old['models']['G']))])
    args = json.load(open(out / 'args.json'))
    for k in ('batch_size', 'z_dim', 'ema_kimg', 'diffaug', 'seed'):
        assert args[k] == old['args'][k], k
    if name == 'stylegan':
        assert args['lr_g'] == args['lr_d'] == old['args']['lr'] == 0.002
        assert new['optims']['G']['param_groups'][0]['lr'] == 0.002
