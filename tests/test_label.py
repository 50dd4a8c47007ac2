"""label.py on a toy set where the answer is known: solid colours labelled by their colour."""
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dataset
import label
from common import UserError

COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (30, 40, 220)}


@pytest.fixture
def toy(tmp_path):
    """36 noisy solid-colour faces; 30 labelled (colour, and size where known), 6 unlabelled."""
    rng = np.random.default_rng(0)
    d = tmp_path / 'toy'
    d.mkdir()
    rows = []
    for i in range(36):
        name, rgb = list(COLOURS.items())[i % 3]
        img = np.clip(np.array(rgb) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f'{i:03d}.png')
        if i < 30:
            rows.append([f'{i:03d}.png', name, 'big' if i % 2 else ('' if i % 4 == 0 else 'small')])
    with open(tmp_path / 'labels.csv', 'w', newline='') as f:
        csv.writer(f).writerows([['file', 'colour', 'size']] + rows)
    return str(d), str(tmp_path / 'labels.csv')


def train_toy(toy, out, *extra):
    data, labels = toy
    return label.main(['train', '--data', data, '--labels', labels, '--out', str(out), '--steps', '60',
                       '--batch-size', '8', '--mu', '1', '--width', '8', '--val-frac', '0.3', '--lr', '1e-2', *extra])


def test_train_predict_score(toy, tmp_path, capsys):
    data, _ = toy
    out = tmp_path / 'run'
    result, baseline = train_toy(toy, out)
    assert result['colour']['accuracy'] == 1.0 and result['colour']['n'] == 9      # 30% of 30 held out
    assert baseline['colour'] == 1.0                                               # the colour baseline finds it too
    assert sum(map(sum, result['colour']['confusion'])) == 9
    assert {'ckpt.pt', 'metrics.json', 'report.md'} <= set(os.listdir(out))
    assert '| colour | 3 | 1.000 | 1.000 | 9 |' in open(out / 'report.md').read()
    # predict: every face, held-out and unlabelled ones included, gets its true colour
    csv_path = tmp_path / 'pred.csv'
    label.main(['predict', '--ckpt', str(out / 'ckpt.pt'), '--data', data, '--out', str(csv_path)])
    rows = list(csv.DictReader(open(csv_path)))
    assert list(rows[0]) == ['file', 'colour', 'size', 'colour_confidence', 'size_confidence'] and len(rows) == 36
    assert all(r['colour'] == list(COLOURS)[int(r['file'][:3]) % 3] for r in rows)
    # the predicted CSV is valid input for the conditional scripts' label loader, empty values allowed
    label.main(['predict', '--ckpt', str(out / 'ckpt.pt'), '--data', data, '--out', str(csv_path), '--min-confidence', '1.01'])
    assert all(r['colour'] == '' for r in csv.DictReader(open(csv_path)))
    y, vocab = dataset.join_labels(str(csv_path), sorted(os.listdir(data)))
    assert (y == -1).all() and vocab == {'colour': [], 'size': []}
    # score: folder of generated "red" faces asked to be red
    red = tmp_path / 'red'
    red.mkdir()
    for i in range(4):
        Image.fromarray(np.full((64, 64, 3), COLOURS['red'], np.uint8)).save(red / f'{i}.png')
    res = label.main(['score', '--ckpt', str(out / 'ckpt.pt'), '--gen', str(red), '--attr', 'colour=red'])
    assert res['asked']['colour'] == {'value': 'red', 'hit_rate': 1.0} and res['shares']['colour']['red'] == 1.0
    # the real data's shares beside the generated ones (as for the male share of a generator)
    res = label.main(['score', '--ckpt', str(out / 'ckpt.pt'), '--gen', str(red), '--real', data])
    assert res['real_shares']['colour'] == pytest.approx({v: 1 / 3 for v in ('blue', 'green', 'red')})
    with pytest.raises(UserError, match="unknown colour 'pink'; known: blue|green|red"):
        label.main(['score', '--ckpt', str(out / 'ckpt.pt'), '--gen', str(red), '--attr', 'colour=pink'])
    with pytest.raises(UserError, match="unknown attribute 'hair'; known: colour, size"):
        label.main(['score', '--ckpt', str(out / 'ckpt.pt'), '--gen', str(red), '--attr', 'hair=red'])


def test_losses_ignore_unknown_and_mask_unconfident():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 2.0]])]
    y = torch.tensor([[0], [-1]])
    assert torch.allclose(label.supervised_loss(logits, y), torch.nn.functional.cross_entropy(logits[0][:1], y[0]))
    weak = [torch.tensor([[10.0, 0.0], [0.1, 0.0]])]            # confident, then not
    strong = [torch.tensor([[0.0, 1.0], [5.0, 0.0]])]
    ce = torch.nn.functional.cross_entropy(strong[0][:1], torch.tensor([0]))
    assert torch.allclose(label.consistency_loss(weak, strong, 0.95), ce / 2)


def test_augment_keeps_hue_and_shape():
    x = torch.zeros(4, 3, 64, 64)
    x[:, 0], x[:, 1], x[:, 2] = 0.8, -0.6, -0.6                      # red
    for strong in (False, True):
        a = label.augment(x, strong, torch.Generator().manual_seed(0))
        assert a.shape == x.shape
        visible = a.abs().sum(1) > 0                                  # outside the cutout
        assert (a[:, 0][visible] > a[:, 1][visible]).all() and torch.allclose(a[:, 1], a[:, 2])


def test_errors(toy, tmp_path):
    data, labels = toy
    with open(labels, 'a') as f:
        f.write('missing.png,red,big\n')
    with pytest.raises(UserError, match='1 labelled file.*not in --data.*missing.png'):
        train_toy(toy, tmp_path / 'run')
    with pytest.raises(UserError, match='not a label.py checkpoint'):
        dc = tmp_path / 'dc.pt'
        common.atomic_save({'format': common.CKPT_FORMAT, 'script': 'dcgan'}, str(dc))
        label.main(['predict', '--ckpt', str(dc), '--data', data, '--out', str(tmp_path / 'x.csv')])
    with pytest.raises(SystemExit):
        label.main(['train', '--val-frac', '1.5'])


def test_class_weights_balance_rare_classes():
    y = torch.tensor([[0, 1], [0, -1], [0, 0], [1, 0]])
    w = label.class_weights(y, [2, 3])
    assert torch.allclose(w[0], torch.tensor([0.5, 1.5]))       # counts 3 and 1 -> 1/3 : 1, mean 1
    assert torch.allclose(w[1], torch.tensor([1.0, 2.0, 2.0]) / (5 / 3))   # counts 2, 1, 0 (clamped to 1)
