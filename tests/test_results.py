"""The files committed in results/: each generator samples from the file alone, and the attribute classifier
that scores the conditional models reproduces the held-out accuracy results/labels.md reports for it."""
import glob
import os

import numpy as np
import pytest
import torch

import common
import dataset
import sampling
import label
from conftest import ROOT, SHARED

RESULTS = os.path.join(ROOT, 'results')
GENERATORS = sorted(glob.glob(os.path.join(RESULTS, '*_G.pt')))
CLASSIFIER = os.path.join(RESULTS, 'label_classifier.pt')
SHARED_FACES = os.path.join(SHARED, 'data', 'anime-faces-64')
HAND_LABELS = os.path.join(SHARED, 'data', 'hand-labels-384.csv')


def test_generators_are_committed():
    names = {os.path.basename(p) for p in GENERATORS}
    assert {'dcgan_G.pt', 'lsgan_G.pt', 'stylegan_G.pt', 'acgan_G.pt', 'wacgan_gp_G.pt'} <= names, names


@pytest.mark.parametrize('path', GENERATORS, ids=os.path.basename)
def test_committed_generator_samples(path):
    """fp16, under 25 MB, arguments inside: the script rebuilds G from the file and draws faces."""
    assert os.path.getsize(path) < 25 * 2**20
    ckpt = common.load_checkpoint(path)
    sd = ckpt['models'][ckpt['sample_model']]
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    G, module = sampling.load_generator(ckpt)
    x = sampling.generate(G, module.sample_inputs(ckpt['model_args'], 4, 'cpu', sampling.sample_rng(0)))
    assert x.shape == (4, 3, 64, 64) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert x.std() > 0.1   # faces, not a constant image


@pytest.mark.skipif(not os.path.isfile(HAND_LABELS), reason='shared hand labels not found')
def test_label_classifier_reproduces_its_report():
    """results/labels.md: held-out hair 66/77, eyes 50/71 (six faces without visible eyes), gender 66/77."""
    model, vocab = label.load_classifier(CLASSIFIER)
    files = common.load_checkpoint(CLASSIFIER)['val_files']
    images = np.stack([dataset.decode_image(os.path.join(SHARED_FACES, f), 64) for f in files])
    y, _ = dataset.join_labels(HAND_LABELS, files, vocab=vocab)
    acc = label.evaluate(label.predict_probs(model, torch.from_numpy(images).permute(0, 3, 1, 2)), y, vocab)
    hits = {a: (round(r['accuracy'] * r['n']), r['n']) for a, r in acc.items()}
    assert hits == {'hair': (66, 77), 'eyes': (50, 71), 'gender': (66, 77)}


def test_committed_first_stage_starts_the_conditional_tail():
    """results/dcgan_epoch28_GD.pt is the first stage of `acgan.py --recipe from-dcgan`: a dcgan.py run of `--recipe
    best --diffaug translation,cutout` at epoch 28 exported with its G and D (--export-d), so the second stage needs no
    run folder. acgan.py's --init-g takes all three from it, and D scores faces as a D, not a constant."""
    import acgan
    import recipes
    path = os.path.join(RESULTS, 'dcgan_epoch28_GD.pt')
    ckpt = common.load_checkpoint(path)
    assert ckpt['script'] == 'dcgan' and ckpt['epoch'] == 28 and sorted(ckpt['models']) == ['D', 'G', 'G_ema']
    assert ckpt['args']['recipe'] == 'best' and ckpt['args']['diffaug'] == 'translation,cutout'
    model_args = {**ckpt['model_args'], 'vocab': {'hair': ['a', 'b', 'c'], 'eyes': ['x', 'y']}, 'cond_bn': True}
    G, G_ema = acgan.Generator(**model_args), acgan.Generator(**model_args)
    D = acgan.Discriminator(ckpt['args']['ndf'], [3, 2], bn=False, projection=True)
    line = recipes.init_from_unconditional(G, path, model_args, acgan.CondBatchNorm2d, G_ema, D)
    assert line.startswith('--init-g: G, G_ema and D from') and 'epoch 28.00' in line
    files = sorted(glob.glob(os.path.join(ROOT, 'data', 'faces', '*.jpg')))[:32]
    real = torch.from_numpy(np.stack([dataset.decode_image(f, 64) for f in files])).permute(0, 3, 1, 2) / 127.5 - 1
    y = torch.zeros(32, 2, dtype=torch.long)
    z = torch.randn(32, model_args['z_dim'], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = G_ema.eval()(z, y)
        d_real, d_fake = D(real, y)[0], D(fake, y)[0]
    assert fake.std() > 0.1 and d_real.mean() > d_fake.mean()   # a trained D: real faces score above G's
