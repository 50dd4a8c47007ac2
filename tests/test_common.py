"""The shared modules: image loading, batches, labels, checkpoints, plots, DiffAugment, threads."""
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dataset
import plots
import recipes
import sampling
from common import UserError
from conftest import ROOT


def write(path, mode, size, colour):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_folder_recursive_odd_modes_crop_and_corrupt(tmp_path, capsys):
    d = tmp_path / 'imgs'
    write(str(d / 'a.png'), 'RGB', (64, 64), (255, 0, 0))
    write(str(d / 'deep' / 'er' / 'b.jpg'), 'L', (64, 64), 128)                   # grayscale
    write(str(d / 'c.png'), 'RGBA', (64, 64), (0, 0, 255, 0))                        # fully transparent
    write(str(d / 'd.bmp'), 'RGB', (128, 64), (0, 255, 0))                           # wide: center crop
    Image.new('P', (32, 32), 3).save(d / 'e.png')                                   # palette, upscaled
    (d / 'broken.jpg').write_bytes(b'not a jpeg at all')
    (d / 'notes.txt').write_text('ignored')
    images, names = dataset.load_images(str(d), 64)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 64, 64)
    assert names == ['a.png', 'c.png', 'd.bmp', 'e.png', 'deep/er/b.jpg']
    assert images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert images[1].min() == 255                       # transparent -> composited on white
    assert images[2, :, 32, 32].tolist() == [0, 255, 0]
    assert (images[4] - 128).abs().max() <= 1          # gray -> equal RGB channels (JPEG rounding)
    assert 'broken.jpg' in capsys.readouterr().out      # the bad file is named, the rest still loads


def test_zip_and_cache(tmp_path, faces):
    z = tmp_path / 'faces.zip'
    with zipfile.ZipFile(z, 'w') as zf:
        for root, _, files in os.walk(faces):
            for f in files:
                zf.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), faces))
    a, na = dataset.load_images(faces, 64, cache=str(tmp_path / 'cache.pt'))
    b, nb = dataset.load_images(str(z), 64)
    assert torch.equal(a, b) and na == nb and len(na) == 16
    # the cache is reused (decoding is skipped: we poison the decoder) and is itself valid --data
    orig = dataset.decode_image
    dataset.decode_image = None
    try:
        c, _ = dataset.load_images(faces, 64, cache=str(tmp_path / 'cache.pt'))
        d, nd = dataset.load_images(str(tmp_path / 'cache.pt'), 64)
    finally:
        dataset.decode_image = orig
    assert torch.equal(a, c) and torch.equal(a, d) and nd == na
    with pytest.raises(UserError, match='--image-size 32'):
        dataset.load_images(str(tmp_path / 'cache.pt'), 32)


def test_bad_data_errors(tmp_path):
    with pytest.raises(UserError, match='no such file or folder'):
        dataset.load_images(str(tmp_path / 'nope'), 64)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='no images .* found'):
        dataset.load_images(str(tmp_path / 'empty'), 64)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'x.png').write_bytes(b'\x89PNG garbage')
    with pytest.raises(UserError, match='none of the 1 image'):
        dataset.load_images(str(tmp_path / 'bad'), 64)
    (tmp_path / 'f.zip').write_bytes(b'PK not really')
    with pytest.raises(UserError, match='not a readable zip'):
        dataset.load_images(str(tmp_path / 'f.zip'), 64)


def test_batches_deterministic_range_flip_and_shards():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    b = dataset.ImageBatches(images, 8, seed=3, flip=True)
    assert b.steps_per_epoch == 5
    x = b.get(7)
    assert x.shape == (8, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, dataset.ImageBatches(images, 8, seed=3, flip=True).get(7))   # pure function of step
    # one epoch visits every image once
    seen = torch.cat([b.get(s) for s in range(5)])
    ref = images.float() / 127.5 - 1
    assert all(any(torch.equal(s, r) or torch.equal(s, r.flip(2)) for r in ref) for s in seen)
    perm, flips = b.order(0)
    assert 0 < flips.sum() < 40
    # two processes split the same global batch
    r0 = dataset.ImageBatches(images, 8, seed=3, rank=0, world=2).get(2)
    r1 = dataset.ImageBatches(images, 8, seed=3, rank=1, world=2).get(2)
    full = dataset.ImageBatches(images, 8, seed=3).get(2)
    assert torch.equal(torch.stack([r0, r1], 1).flatten(0, 1), full)
    with pytest.raises(UserError, match='lower --batch-size'):
        dataset.ImageBatches(images, 64, seed=0)


def test_labels_join_and_errors(tmp_path):
    p = tmp_path / 'labels.csv'
    p.write_text('file,hair,eyes\nsub/a.png,blonde,blue\nb.png,black,\nc.png,blonde,red\n')
    y, vocab = dataset.join_labels(str(p), ['sub/a.png', 'other/b.png', 'c.png'])
    assert vocab == {'hair': ['black', 'blonde'], 'eyes': ['blue', 'red']}
    assert y.tolist() == [[1, 0], [0, -1], [1, 1]]        # '' -> -1 (unknown), basename match for b.png
    with pytest.raises(UserError, match='1 of 4 images have no row, e.g. d.png'):
        dataset.join_labels(str(p), ['sub/a.png', 'b.png', 'c.png', 'd.png'])
    y, _ = dataset.join_labels(str(p), ['d.png', 'c.png'], require_all=False)
    assert y.tolist() == [[-1, -1], [1, 1]]
    with pytest.raises(UserError, match='unknown hair=blonde'):
        dataset.join_labels(str(p), ['c.png'], vocab={'hair': ['black'], 'eyes': ['blue', 'red']})
    bad = tmp_path / 'bad.csv'
    for text, msg in [('name,hair\na.png,x\n', 'header'), ('file,hair\na.png,x,y\n', 'line 2: 3 fields'),
                      ('file,hair\n', 'no rows'), ('file,hair\na.png,x\na.png,y\n', 'listed twice'), ('', 'empty file')]:
        bad.write_text(text)
        with pytest.raises(UserError, match=msg):
            dataset.join_labels(str(bad), ['a.png'])
    with pytest.raises(UserError, match='no such file'):
        dataset.join_labels(str(tmp_path / 'missing.csv'), ['a.png'])


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    common.atomic_save({'format': common.CKPT_FORMAT, 'x': torch.ones(3)}, path)
    before = open(path, 'rb').read()

    def broken_save(obj, f):
        open(f, 'wb').write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        common.atomic_save({'format': common.CKPT_FORMAT, 'x': torch.zeros(3)}, path)
    assert open(path, 'rb').read() == before and os.listdir(tmp_path) == ['ckpt.pt']
    monkeypatch.undo()
    assert torch.equal(common.load_checkpoint(path)['x'], torch.ones(3))
    (tmp_path / 'trunc.pt').write_bytes(before[:50])
    with pytest.raises(UserError, match='unreadable'):
        common.load_checkpoint(str(tmp_path / 'trunc.pt'))


def test_to_uint8_rounds_like_png():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    got = sampling.to_uint8(x)[0, :, :, 0].flatten().tolist()
    assert got == [0, 0, 128, 191, 255, 255]   # round((x + 1) * 127.5), clamped


def test_plots_and_gif(tmp_path):
    csv_path = tmp_path / 'losses.csv'
    csv_path.write_text('step,epoch,loss_d,loss_g,img_per_s\n' + ''.join(f'{i},{i / 10},{1 / i},{i ** 0.5},100\n' for i in range(1, 30)))
    assert plots.plot_losses(str(csv_path), str(tmp_path / 'c.png')) == ['loss_d', 'loss_g']   # not step, epoch, img/s
    assert Image.open(tmp_path / 'c.png').width >= 800
    # rows of another length (a run resumed with --fid-every changed): still a plot, not a crash
    csv_path.write_text('step,epoch,loss_d,fid\n1,0.1,1.0,300\n2,0.2,0.9,\n3,0.3,0.8\n4,0.4,0.7,250,9\n')
    assert plots.plot_losses(str(csv_path), str(tmp_path / 'd.png')) == ['loss_d']
    assert os.path.isfile(tmp_path / 'd.png')
    # the smoothed line: a moving average that skips NaNs and keeps a constant constant
    y = np.array([1.0, np.nan, 1.0, 1.0, 5.0, 1.0, 1.0] * 10)
    assert np.allclose(plots.smooth(np.ones(50)), 1) and np.isfinite(plots.smooth(y)).all() and plots.smooth(y).max() < 5
    # FID curves: a panel per model family (the run name's first word, less -DA), a colour per run within it
    scores = tmp_path / 'fid_curve.csv'
    scores.write_text('run,epoch,hours,fid\nDCGAN a,1,0.5,300\nDCGAN a,2,1.0,200\nDCGAN-DA b,1,0.2,250\n'
                      'DCGAN-DA b,3,1.5,90\nLSGAN c,1,0.4,280\nLSGAN c,2,0.9,120\nWACGAN-GP d,1,2.0,150\n')
    assert plots.plot_score_curves(str(scores), str(tmp_path / 'f.png')) == {
        'DCGAN': ['DCGAN a', 'DCGAN-DA b'], 'LSGAN': ['LSGAN c'], 'WACGAN-GP': ['WACGAN-GP d']}
    pixels = {tuple(p) for p in np.asarray(Image.open(tmp_path / 'f.png').convert('RGB')).reshape(-1, 3)}
    assert {(0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)} <= pixels and (0x2c, 0xa0, 0x2c) not in pixels   # C0, C1; no C2
    # a run name with a comma shifts its numbers a column: refused, naming the line
    scores.write_text('run,epoch,hours,fid\nDCGAN a,1,0.5,300\nDCGAN (--diffaug translation,cutout),2,1.0,200\n')
    with pytest.raises(UserError, match=r'fid_curve.csv line 3: more fields than its header'):
        plots.plot_score_curves(str(scores), str(tmp_path / 'h.png'))
    assert not os.path.exists(tmp_path / 'h.png')
    assert plots.read_scores(os.path.join(ROOT, 'results', 'fid_curve.csv'))   # the committed curve parses
    for i in range(3):
        sampling.save_grid(torch.rand(4, 3, 8, 8) * 2 - 1, str(tmp_path / 'g' / f'{i}.png'), nrow=2)
    sampling.make_gif(str(tmp_path / 'g'), str(tmp_path / 'p.gif'))
    assert Image.open(tmp_path / 'p.gif').n_frames == 3
    sampling.make_gif(str(tmp_path / 'g'), str(tmp_path / 'small.gif'), max_frames=2, crop=(12, 12))
    small = Image.open(tmp_path / 'small.gif')
    assert small.n_frames == 2 and small.size == (12, 12)


def test_diffaugment():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    cut = recipes.aug_cutout(torch.ones(6, 3, 16, 16))
    assert ((cut == 0).flatten(1).sum(1) == 3 * 8 * 8).all()   # a half-size square per sample
    moved = recipes.aug_translation(x)
    assert moved.shape == x.shape and not torch.equal(moved, x)
    recipes.diff_augment(x, 'color,translation,cutout').sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_set_cpu_threads_respects_omp_num_threads_for_one_process(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(common, 'physical_cores', lambda: 8)
    try:
        monkeypatch.setenv('OMP_NUM_THREADS', '1')
        assert common.set_cpu_threads() == 1 == torch.get_num_threads()   # the user shares the machine
        assert common.set_cpu_threads(local_world=4) == 2                  # DDP: torchrun's 1 is its own default
        monkeypatch.setenv('OMP_NUM_THREADS', 'lots')
        assert common.set_cpu_threads() == 8 == torch.get_num_threads()
        monkeypatch.delenv('OMP_NUM_THREADS')
        assert common.set_cpu_threads() == 8 and common.set_cpu_threads(local_world=16) == 1
    finally:
        torch.set_num_threads(before)
