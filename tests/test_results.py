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
