"""fid.py: the Frechet distance, KID, the FID Inception against pytorch-fid, inputs and errors."""
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import common
import dataset
import fid
from common import UserError
from conftest import FACES, SHARED, TINY

WEIGHTS = os.path.join(SHARED, 'weights', 'pt_inception-2015-12-05-nofc.pth')
needs_weights = pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason='FID Inception weights not found')


def random_spd(d, rng, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # diagonal Gaussians: sum (sqrt(s1) - sqrt(s2))^2 + ||mu1 - mu2||^2
    ref = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(ref, rel=1e-10)
    # commuting full covariances A and c^2 A: Tr(A) (1 - c)^2
    a = random_spd(6, rng)
    assert fid.frechet_distance(np.zeros(6), a, np.zeros(6), 9 * a) == pytest.approx(4 * np.trace(a), rel=1e-9)
    assert abs(fid.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1))) < 1e-10


def test_frechet_against_direct_numpy():
    rng = np.random.default_rng(1)
    s1, s2 = random_spd(8, rng), random_spd(8, rng)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    # Tr((S1 S2)^1/2) = sum of sqrt of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, real)
    w, v = np.linalg.eigh(s1)
    r = v @ np.diag(np.sqrt(w)) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_singular_and_errors(monkeypatch):
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(16, rng, rank=3), random_spd(16, rng, rank=3)   # too few samples: singular
    d = fid.frechet_distance(np.zeros(16), s1, np.zeros(16), s2)
    assert np.isfinite(d) and d > 0
    with pytest.raises(UserError, match='feature sizes differ: 16 vs 8'):
        fid.frechet_distance(np.zeros(16), s1, np.zeros(8), np.eye(8))
    monkeypatch.setattr(linalg, 'sqrtm', lambda m: m + 1j * np.eye(len(m)))
    with pytest.raises(UserError, match='large imaginary part'):
        fid.frechet_distance(np.zeros(16), s1, np.zeros(16), s2)


def test_kid_unbiased_and_against_definition():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    m, s = fid.kid(x, y, subsets=20, subset_size=200)
    assert abs(m) < 3 * s + 1e-3                                   # same distribution: ~0, can be negative
    assert fid.kid(x, y + 1.0, subsets=20, subset_size=200)[0] > 10 * s
    # one subset of everything equals the textbook unbiased estimator
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    n = 6
    ref = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
           - 2 * sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n ** 2)
    assert fid.kid(x, y, subsets=1, subset_size=6)[0] == pytest.approx(ref, rel=1e-10)
    with pytest.raises(UserError, match='at least 2'):
        fid.kid(x[:1], y)


@pytest.fixture(scope='module')
def extractor():
    if not os.path.isfile(WEIGHTS):
        pytest.skip('FID Inception weights not found')
    return fid.Extractor('fid', WEIGHTS)


@needs_weights
def test_pool3_features_match_pytorch_fid(extractor, monkeypatch):
    pytorch_fid_inception = pytest.importorskip('pytorch_fid.inception')
    sd = torch.load(WEIGHTS, weights_only=True)   # pytorch-fid's file also holds the unused classifier
    monkeypatch.setattr(pytorch_fid_inception, 'load_state_dict_from_url', lambda *a, **k: {
        **sd, 'fc.weight': torch.zeros(1008, 2048), 'fc.bias': torch.zeros(1008)})
    ref = pytorch_fid_inception.InceptionV3([3]).eval()
    g = torch.Generator().manual_seed(0)
    real, _ = dataset.load_images(FACES, None, log=lambda m: None)
    x = torch.cat([real[:2], torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)])
    with torch.inference_mode():
        ours = extractor(x)
        theirs = ref(x.float() / 255)[0].flatten(1)
    assert ours.shape == (4, 2048) and theirs.abs().max() > 1
    assert (ours - theirs).abs().max() < 1e-4


@needs_weights
def test_folder_against_itself_cache_roundtrip_and_kid(tmp_path, capsys, extractor):
    a = ['--weights', WEIGHTS, '--allow-small', '--limit', '24', '--device', 'cpu']
    stats = str(tmp_path / 'faces.npz')
    fid.main([FACES, '--save-stats', stats, *a])
    z = np.load(stats)
    real, _ = dataset.load_images(FACES, None, log=lambda m: None)
    with torch.inference_mode():
        mu, sigma = fid.statistics(extractor(real[:24]).numpy())
    assert z['mu'].dtype == np.float64 and int(z['n']) == 24 and str(z['inception']) == 'fid'
    assert np.allclose(z['mu'], mu, atol=1e-5) and np.allclose(z['sigma'], sigma, atol=1e-5)
    assert z['features'].shape == (24, 2048)
    assert abs(fid.main([stats, FACES, *a])['fid']) < 0.05          # the same images, cached vs. fresh: ~0
    out = capsys.readouterr().out
    assert 'FID -' not in out   # a tiny negative from rounding prints as 0.00
    assert 'KID' in out and 'N = 24 vs 24' in out and 'img/s' in out
    # pytorch-fid's own .npz (mu and sigma only) is accepted; KID then has no features to use
    np.savez(tmp_path / 'plain.npz', mu=z['mu'], sigma=z['sigma'])
    feats, mu2, sigma2, n = fid.features_of(str(tmp_path / 'plain.npz'), extractor, None)
    assert feats is None and n is None and np.array_equal(mu2, z['mu']) and np.array_equal(sigma2, z['sigma'])


@needs_weights
def test_fid_during_training_and_checkpoint_input(faces, tmp_path, monkeypatch):
    import dcgan
    monkeypatch.setenv('FID_WEIGHTS', WEIGHTS)
    monkeypatch.setattr(fid, 'WEIGHT_CANDIDATES', [WEIGHTS])
    stats = str(tmp_path / 'faces.npz')
    fid.main([faces, '--save-stats', stats, '--weights', WEIGHTS, '--allow-small', '--device', 'cpu'])
    seen, kid = [], fid.kid
    # (the sleep stands for a long scoring pause, which must not count against the img/s of training)
    monkeypatch.setattr(fid, 'kid', lambda a, b, *r, **kw: time.sleep(2) or seen.append(((a, b), kid(a, b, *r, **kw))) or seen[-1][1])
    dcgan.main(['--data', faces, '--out', str(tmp_path / 'run'), *TINY, '--epochs', '2', '--n-samples', '0',
                '--log-every', '3', '--fid-every', '2', '--fid-stats', stats, '--fid-n', '8'])
    rows = [r.split(',') for r in open(tmp_path / 'run' / 'losses.csv').read().split()]
    assert rows[0][-2:] == ['fid', 'kid'] and [r[0] for r in rows[1:]] == ['3', '4']   # step 4: FID forces a row
    assert rows[1][-2:] == ['', ''] and float(rows[2][-2]) > 50                  # untrained G: far
    assert float(rows[2][-3]) > float(rows[1][-3]) / 4   # img/s of the FID row: its training step alone, not the pause
    # KID: the samples' features against the features the .npz keeps, fid.py's estimator, logged to the row
    (gen, real), k = seen[0]
    assert gen.shape == (8, 2048) and np.array_equal(real, np.load(stats)['features'])
    assert float(rows[2][-1]) == pytest.approx(k[0], abs=1e-6) and k[0] > 0.01
    with pytest.raises(SystemExit):   # one sample has no covariance: refused before any training
        dcgan.get_args(['--data', faces, '--fid-every', '1', '--fid-stats', stats, '--fid-n', '1'])
    before = sorted(os.listdir(tmp_path / 'run'))
    ckpt = str(tmp_path / 'run' / 'ckpt.pt')
    a = ['--weights', WEIGHTS, '--allow-small', '--n', '10', '--device', 'cpu', '--limit', '10']
    assert fid.main([ckpt, faces, *a, '--save-samples', str(tmp_path / 's')])['fid'] > 50
    assert sorted(os.listdir(tmp_path / 'run')) == before and len(os.listdir(tmp_path / 's')) == 10


@needs_weights
def test_bad_inputs(tmp_path):
    w = ['--weights', WEIGHTS, '--device', 'cpu']
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='no images'):
        fid.main([str(tmp_path / 'empty'), FACES, *w])
    with pytest.raises(UserError, match='only 384 images; FID is biased below 2048.*--allow-small'):
        fid.main([FACES, FACES, *w])
    np.savez(tmp_path / 'wrong.npz', mean=np.zeros(3))
    with pytest.raises(UserError, match='not a statistics .npz'):
        fid.main([str(tmp_path / 'wrong.npz'), FACES, *w])
    np.savez(tmp_path / 'small.npz', mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(UserError, match='feature sizes differ: 64 vs 2048'):
        fid.main([str(tmp_path / 'small.npz'), FACES, *w, '--allow-small', '--limit', '4'])
    with pytest.raises(UserError, match='need at least 2'):
        fid.main([FACES, FACES, *w, '--allow-small', '--limit', '1'])
    with pytest.raises(UserError, match='no such file'):
        fid.main([str(tmp_path / 'nope'), FACES, *w])


def test_torchvision_extractor_offline(tmp_path):
    """The torchvision variant is built from a local file here (users download ImageNet weights)."""
    import torchvision
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    torch.save(net.state_dict(), tmp_path / 'tv.pth')
    ex = fid.Extractor('torchvision', str(tmp_path / 'tv.pth'))
    with torch.inference_mode():
        f = ex(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert f.shape == (2, 2048) and torch.isfinite(f).all()


@pytest.mark.parametrize('kind', ['fid', 'torchvision'])
def test_failed_download_is_one_line(kind, tmp_path, monkeypatch, capsys):
    """Offline with no local copy: not a URLError traceback but one line saying what could not be fetched, from
    where, and the flag / variable / folder that takes a copy fetched by hand; exit code 1."""
    import urllib.error

    def offline(url, *a, **k):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    monkeypatch.setattr(fid, 'WEIGHT_CANDIDATES', [str(tmp_path / 'absent.pth')])
    with pytest.raises(SystemExit) as e:
        common.main_guard(fid.main, [FACES, FACES, '--inception', kind, '--allow-small'])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and '\n' not in err and err.startswith('error: could not download')
    assert 'https://' in err and '--weights FILE' in err and 'URLError' in err and 'checkpoints' in err
    assert ('FID_WEIGHTS=FILE' in err) == (kind == 'fid')


# ----------------------------------------------------------------------------------------------------
# Precision / recall, novelty, nearest neighbours (issue: new faces, not copies)

def test_chunked_nearest_equals_cdist():
    torch.manual_seed(0)
    a, b = torch.randn(30, 5), torch.randn(50, 5)
    d, i = fid.nearest(a, b, 3, chunk=7)   # blocks of 7 x 7 and a running top-k
    want_d, want_i = torch.cdist(a, b).topk(3, dim=1, largest=False)
    assert torch.allclose(d, want_d, atol=1e-5) and torch.equal(i, want_i)
    # uint8 images are flattened: the pixel-space distance
    x = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    d, i = fid.nearest(x[:2], x, 1, chunk=4)
    assert torch.equal(i[:, 0], torch.tensor([0, 1])) and d.abs().max() < 1e-3


def test_precision_recall():
    torch.manual_seed(0)
    real, same = torch.randn(500, 16), torch.randn(500, 16)
    p, r = fid.precision_recall(real, same, k=3)
    assert p > 0.7 and r > 0.7                           # two samples of one distribution
    assert fid.precision_recall(real, same + 100) == (0.0, 0.0)   # far apart
    p, r = fid.precision_recall(real, same * 0.3)        # a collapsed generator: good faces, no variety
    assert p > 0.95 and r < 0.1


def test_novelty_flags_copies():
    torch.manual_seed(0)
    train, heldout = torch.randn(400, 8), torch.randn(100, 8)
    copies = fid.novelty(train[:200] + 1e-4 * torch.randn(200, 8), train, heldout)
    assert copies['memorized'] > 0.99 and copies['ratio'] < 0.01
    new = fid.novelty(torch.randn(200, 8), train, heldout)
    assert 0.8 < new['ratio'] < 1.25 and new['memorized'] < 0.05


@needs_weights
def planted(seed=0):
    """Bundled faces without their own duplicate pairs, split into training faces, held-out faces and new faces;
    the held-out side also gets 40 planted duplicates of training faces (30 exact, 10 re-encoded: +-2 per value)."""
    images, _ = dataset.load_images(FACES, 64, log=lambda m: None)
    pairs, _ = fid.duplicate_pairs(images)
    keep = torch.ones(len(images), dtype=torch.bool)
    keep[pairs.flatten()] = False
    images = images[keep]
    train, held, new = images[:200], images[200:260], images[260:320]
    g = torch.Generator().manual_seed(seed)
    noisy = (train[30:40].int() + torch.randint(-2, 3, train[30:40].shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return train, torch.cat([held, train[:30], noisy]), new


def test_duplicates_found_and_held_out_side_cleaned():
    train, held, _ = planted()
    pairs, dists = fid.duplicate_pairs(torch.cat([train, held]), chunk=64)   # blocks smaller than the set
    assert sorted(map(tuple, pairs.tolist())) == [(i, 260 + i) for i in range(40)]
    assert (dists[:30] == 0).all() and (dists[30:] > 0).all() and (dists < fid.DUPLICATE_L2).all()
    clean = fid.clean_heldout(held, train)
    assert clean[:60].all() and not clean[60:].any()


def test_novelty_flags_a_copying_generator_despite_duplicates_in_the_data():
    """With held-out faces that are copies of training faces, the 1st percentile of held-out distances is 0
    and a generator that returns training faces passes as new. Held out without them, it is flagged."""
    train, held, new = planted()
    copying = train[100:160]
    unclean = fid.novelty(copying, train, held)
    assert unclean['threshold'] < fid.DUPLICATE_L2 and unclean['memorized'] < 0.5   # the check that cannot fail
    clean = held[fid.clean_heldout(held, train)]
    copies = fid.novelty(copying, train, clean, copy_distance=fid.DUPLICATE_L2)
    assert copies['memorized'] > 0.9 and copies['copies'] == 1.0 and copies['ratio'] < 0.01
    assert copies['threshold'] > 10 * fid.DUPLICATE_L2 and copies['n_heldout'] == 60
    fresh = fid.novelty(new, train, clean, copy_distance=fid.DUPLICATE_L2)
    assert fresh['memorized'] < 0.1 and fresh['copies'] == 0 and 0.7 < fresh['ratio'] < 1.4


def test_duplicates_cli(tmp_path, capsys):
    train, held, _ = planted()
    folder = tmp_path / 'faces'
    folder.mkdir()
    for i, a in enumerate(torch.cat([train, held])):
        Image.fromarray(a.permute(1, 2, 0).numpy()).save(folder / f'{i:04d}.png')
    res = fid.main([str(folder), '--duplicates', '--out', str(tmp_path / 'dup')])
    assert res == {'pairs': 40, 'identical': 30, 'faces_with_duplicate': 80, 'faces': 300, 'threshold': fid.DUPLICATE_L2}
    rows = open(tmp_path / 'dup' / 'duplicates.csv').read().split()
    assert rows[0] == 'file_a,file_b,pixel_l2' and rows[1].startswith('0000.png,0260.png,0.0') and len(rows) == 41
    assert os.path.isfile(tmp_path / 'dup' / 'duplicates.png')
    assert '80 of 300 faces (26.7%) have a duplicate' in capsys.readouterr().out


def test_white_blotches():
    """A pure-white patch inside a face is a blotch; white touching the border (background), a small highlight,
    or a near-white but tinted patch (skin) is not."""
    faces = torch.full((5, 3, 64, 64), 128, dtype=torch.uint8)
    faces[0, :, 20:30, 20:30] = 255                       # 100 white pixels mid-face: a blotch
    faces[1, :, :, :12] = 255                             # a white band on the left edge: background
    faces[2, :, 30:35, 30:35] = 255                       # 25 pixels: a highlight, below BLOTCH_AREA
    faces[3, :, 20:30, 20:30] = 255
    faces[3, 2, 20:30, 20:30] = 235                       # tinted, not pure white: skin
    faces[4, :, :, :12] = 255
    faces[4, :, 20:27, 20:27] = 255                       # background and, apart from it, a 49-pixel blotch
    assert fid.white_blotches(faces).tolist() == [True, False, False, False, True]
    faces[4, :, 23, 12:20] = 255                          # joined to the background: no longer apart
    assert not fid.white_blotches(faces)[4]


def test_blotches_cli(tmp_path, capsys):
    faces = torch.full((4, 3, 64, 64), 100, dtype=torch.uint8)
    faces[1, :, 10:30, 30:50] = 255
    folder = tmp_path / 'faces'
    folder.mkdir()
    for i, a in enumerate(faces):
        Image.fromarray(a.permute(1, 2, 0).numpy()).save(folder / f'{i}.png')
    res = fid.main([str(folder), '--blotches', '--out', str(tmp_path / 'b')])
    assert res['blotches'] == 0.25 and res['n'] == 4 and os.path.isfile(tmp_path / 'b' / 'blotches.png')
    assert '25.0% of 4 faces have a white blotch' in capsys.readouterr().out


@needs_weights
def test_novelty_cli_drops_held_out_duplicates(tmp_path, capsys):
    """fid.py --novelty with planted duplicates in --heldout: they are dropped and counted, the thresholds
    come from the rest (above 0), and a generator of training faces is flagged in both spaces."""
    train, held, _ = planted()
    for name, faces in (('train', train), ('held', held), ('gen', train[100:160])):
        (tmp_path / name).mkdir()
        for i, a in enumerate(faces):
            Image.fromarray(a.permute(1, 2, 0).numpy()).save(tmp_path / name / f'{i:04d}.png')
    res = fid.main([str(tmp_path / 'gen'), str(tmp_path / 'train'), '--heldout', str(tmp_path / 'held'), '--novelty',
                    '--weights', WEIGHTS, '--allow-small', '--device', 'cpu'])
    assert res['heldout_dropped'] == 40 and res['novelty_pixel']['n_heldout'] == res['novelty_pool3']['n_heldout'] == 60
    assert res['novelty_pixel']['threshold'] > fid.DUPLICATE_L2 and res['novelty_pool3']['threshold'] > 1
    assert res['novelty_pixel']['memorized'] > 0.9 and res['novelty_pool3']['memorized'] > 0.9
    assert res['novelty_pixel']['copies'] == 1.0
    assert 'of which 40 dropped as duplicates' in capsys.readouterr().out


def test_nearest_cli_on_a_copying_generator(tmp_path):
    """A 'generator' whose faces are training faces: memorized ~100% in pixel space, and the grid shows each
    face next to its identical training face."""
    import shutil
    gen = tmp_path / 'gen'
    gen.mkdir()
    names = sorted(os.listdir(FACES))
    for n in names[:24]:                                 # inside the training part of the first 120 faces
        shutil.copy(os.path.join(FACES, n), gen / n)
    out = tmp_path / 'nn'
    a = ['--weights', WEIGHTS, '--allow-small', '--device', 'cpu', '--limit', '120', '--cache', str(tmp_path / 'cache')]
    res = fid.main([str(gen), FACES, *a, '--heldout-frac', '0.2', '--nearest', '2', '--out', str(out)])
    assert res['novelty_pixel']['memorized'] == 1.0 and res['novelty_pixel']['ratio'] < 0.01
    assert res['novelty_pool3']['memorized'] > 0.9 and res['n_train'] == 96 and 0 <= res['precision'] <= 1
    assert json.load(open(out / 'metrics.json'))['novelty_pixel']['memorized'] == 1.0
    grid = np.asarray(Image.open(out / 'nearest_pixel.png'))
    assert grid.shape == (2 + 66 * 16, 2 + 66 * 3, 3)
    first, neighbour = grid[2:66, 2:66], grid[2:66, 68:132]
    assert np.array_equal(first, neighbour)
    assert os.path.exists(out / 'nearest_pool3.png') and len(os.listdir(tmp_path / 'cache')) == 2
    with pytest.raises(UserError, match='held-out split .* too small'):
        fid.main([str(gen), FACES, *a, '--heldout-frac', '0.05', '--novelty'])
    with pytest.raises(SystemExit):
        fid.main([str(gen), FACES, *a, '--nearest', '2'])   # grids need --out
