"""The data: images decoded once into one uint8 tensor kept in memory, the shuffled batches drawn from it, and
the labels CSV of the conditional scripts (acgan.py, wacgan_gp.py) joined to the images by file name."""
import csv
import io
import os
import time
import zipfile

import numpy as np
import torch
from PIL import Image

from common import atomic_save, fail

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')


# ----------------------------------------------------------------------------------------------------
# Images: decoded once into one uint8 tensor, kept in memory

def list_images(root):
    files = []
    for d, subdirs, names in os.walk(root):
        subdirs.sort()
        files += [os.path.join(d, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTS)]
    return files


def to_rgb(im):
    """Any PIL mode to RGB; transparency is composited on white (a black background would leak into the
    colour statistics of line-art with alpha)."""
    if im.mode == 'P' and 'transparency' in im.info:
        im = im.convert('RGBA')
    if im.mode in ('RGBA', 'LA', 'PA'):
        im = im.convert('RGBA')
        bg = Image.new('RGBA', im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert('RGB')
    return im.convert('RGB')


def decode_image(fp, size):
    """File or file-like -> uint8 array (size, size, 3): RGB, center-cropped to a square, resized.
    size=None keeps the image as it is (fid.py scores images at their own size, as pytorch-fid does)."""
    with Image.open(fp) as im:
        im = to_rgb(im)
    if size is None:
        return np.asarray(im, dtype=np.uint8)
    w, h = im.size
    s = min(w, h)
    if w != h:
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def decode_all(items, size, where, log=print):
    """items: list of (name, opener). Corrupt files are skipped and named; returns (uint8 NCHW, names)."""
    arrays, names, bad = [], [], []
    t0 = time.time()
    for i, (name, opener) in enumerate(items):
        try:
            arrays.append(decode_image(opener(), size))
            names.append(name)
        except Exception as e:   # PIL raises many types for broken files
            bad.append(f'{name} ({type(e).__name__})')
        if (i + 1) % 5000 == 0:
            log(f'decoded {i + 1}/{len(items)} images ({time.time() - t0:.0f}s)')
    if bad:
        log(f'warning: skipped {len(bad)} unreadable image(s) in {where}: {", ".join(bad[:5])}'
            f'{" ..." if len(bad) > 5 else ""} (delete or re-save them to silence this)')
    if not arrays:
        fail(f'none of the {len(items)} image file(s) in {where} could be decoded; check that they are images')
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        fail(f'images in {where} differ in size ({", ".join(str(s[:2]) for s in list(shapes)[:3])}); pass --image-size to resize them')
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), names


def load_images(src, size=64, cache=None, log=print):
    """Images from a folder (recursive), a .zip, or a cache .pt -> (uint8 tensor (N,3,size,size), names).

    Names are paths relative to the folder/zip (what a labels CSV refers to). When `cache` is given, the
    decoded tensor is written there and reused while the source is unchanged, so a resumed or repeated
    run never decodes again."""
    if not os.path.exists(src):
        fail(f'--data {src}: no such file or folder; point --data at a folder of images, a .zip, or a data .pt')
    if src.endswith('.pt'):
        return load_image_cache(src, size)
    if src.endswith('.zip'):
        try:
            zf = zipfile.ZipFile(src)
        except zipfile.BadZipFile:
            fail(f'--data {src}: not a readable zip file; re-download it or pass the unpacked folder')
        members = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTS) and not n.startswith('__MACOSX'))
        stamp = [os.path.abspath(src), os.path.getsize(src), os.path.getmtime(src), size]
        items = [(n, lambda n=n: io.BytesIO(zf.read(n))) for n in members]
    elif os.path.isdir(src):
        files = list_images(src)
        stamp = [os.path.abspath(src), len(files), sum(os.path.getmtime(f) + os.path.getsize(f) for f in files), size]
        items = [(os.path.relpath(f, src).replace(os.sep, '/'), lambda f=f: f) for f in files]
    else:
        fail(f'--data {src}: expected a folder of images, a .zip or a data .pt')
    if not items:
        fail(f'--data {src}: no images ({" ".join(IMAGE_EXTS)}) found (searched recursively); '
             f'put the training images there or point --data elsewhere')
    if cache and os.path.exists(cache):
        saved = torch.load(cache, weights_only=True)
        if saved.get('stamp') == stamp:
            return saved['images'], saved['files']
    log(f'decoding {len(items)} images from {src}' + (f' (once: a resumed run reads {cache})' if cache else ''))
    images, names = decode_all(items, size, src, log)
    if cache:
        atomic_save({'images': images, 'files': names, 'stamp': stamp}, cache)
    return images, names


def load_image_cache(path, size):
    try:
        saved = torch.load(path, weights_only=True)
        images, names = saved['images'], saved['files']
    except Exception:
        fail(f'--data {path}: not a data cache written by these scripts (expected keys images, files)')
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or size not in (None, images.shape[2]):
        fail(f'--data {path}: holds {tuple(images.shape)} {images.dtype}, expected uint8 (N, 3, {size}, {size}); '
             f're-create it from the image folder with --image-size {size}')
    return images, names


class ImageBatches:
    """Batches drawn from an in-memory uint8 tensor: epoch order and flips are a pure function of
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would have seen."""

    def __init__(self, images, batch_size, seed, flip=False, device='cpu', rank=0, world=1, labels=None):
        if len(images) < batch_size:
            fail(f'only {len(images)} images for --batch-size {batch_size}; lower --batch-size or add images')
        if batch_size % world:
            fail(f'--batch-size {batch_size} must be divisible by the number of processes ({world})')
        self.device = torch.device(device)
        self.images = images.to(self.device) if self.device.type == 'cuda' else images   # a GPU holds 19k faces in 230 MB
        self.labels = None if labels is None else labels.to(self.images.device)
        self.batch_size, self.seed, self.flip, self.rank, self.world = batch_size, seed, flip, rank, world
        self.steps_per_epoch = len(images) // batch_size   # drop the last partial batch: fixed shapes
        self._epoch, self._order = None, None

    def order(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=g), torch.rand(len(self.images), generator=g) < 0.5

    def get(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.order(epoch)
        perm, flips = self._order
        idx = perm[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]
        x = self.images[idx.to(self.images.device)].to(self.device, non_blocking=True).float()
        if self.flip:
            f = flips[idx].to(self.device).view(-1, 1, 1, 1)
            x = torch.where(f, x.flip(3), x)
        x = x.div_(127.5).sub_(1.0)   # [0, 255] -> [-1, 1], the range of G's tanh
        if self.labels is None:
            return x
        return x, self.labels[idx.to(self.labels.device)].to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------
# Labels: CSV `file,attr1,attr2,...` joined to the images by file name

def read_labels_csv(path):
    """-> (attribute names, {file: [value or '' per attribute]}). Values are strings; '' = unknown.
    Columns named `*_confidence` (label.py's scores) are not attributes and are left out."""
    if not os.path.isfile(path):
        fail(f'--labels {path}: no such file; give a CSV with a header `file,attr1,attr2,...`')
    with open(path, newline='', encoding='utf-8-sig') as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip().lower() != 'file' or len(rows[0]) < 2:
        fail(f'--labels {path}: the first line must be a header `file,attr1,attr2,...`, got {rows[0] if rows else "an empty file"}')
    attrs = [a.strip() for a in rows[0][1:]]
    if len(set(attrs)) != len(attrs) or not all(attrs):
        fail(f'--labels {path}: attribute names in the header must be unique and non-empty: {attrs}')
    table = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(attrs) + 1:
            fail(f'--labels {path}, line {n}: {len(row)} fields, expected {len(attrs) + 1} ({",".join(rows[0])})')
        name = row[0].strip()
        if name in table:
            fail(f'--labels {path}, line {n}: {name} is listed twice')
        table[name] = [c.strip() for c in row[1:]]
    # label.py writes a `<attr>_confidence` column beside each attribute: a number, not a class
    keep = [i for i, a in enumerate(attrs) if not a.endswith('_confidence')]
    attrs, table = [attrs[i] for i in keep], {k: [v[i] for i in keep] for k, v in table.items()}
    if not table:
        fail(f'--labels {path}: no rows under the header')
    return attrs, table


def join_labels(path, names, vocab=None, require_all=True):
    """Labels for `names` (image names relative to --data) -> (LongTensor (N, A), vocab).

    vocab maps attribute -> sorted list of values; -1 marks an unknown value ('' in the CSV). Pass the
    vocab of a checkpoint when resuming, so class indices keep their meaning. Rows are matched by the
    relative path, or by the bare file name when that is unique."""
    attrs, table = read_labels_csv(path)
    by_base = {}
    for k in table:
        by_base.setdefault(os.path.basename(k), []).append(k)
    keys, missing = [], []
    for n in names:
        same_base = by_base.get(os.path.basename(n), [])
        k = n if n in table else same_base[0] if len(same_base) == 1 else None
        keys.append(k)
        if k is None:
            missing.append(n)
    if missing and require_all:
        fail(f'--labels {path}: {len(missing)} of {len(names)} images have no row, e.g. {missing[0]}; '
             f'add rows for them or remove them from --data')
    if vocab is None:
        vocab = {a: sorted({row[i] for row in table.values() if row[i]}) for i, a in enumerate(attrs)}
    elif list(vocab) != attrs:
        fail(f'--labels {path}: columns {attrs} differ from the checkpoint\'s {list(vocab)}')
    y = torch.full((len(names), len(attrs)), -1, dtype=torch.long)
    for r, k in enumerate(keys):
        for i, a in enumerate(attrs):
            v = table[k][i] if k else ''
            if v:
                if v not in vocab[a]:
                    fail(f'--labels {path}: unknown {a}={v} for {k}; known values: {"|".join(vocab[a])}')
                y[r, i] = vocab[a].index(v)
    return y, vocab


def label_model_args(y, vocab, path):
    """What a conditional generator's checkpoint keeps about its labels: the class names of each attribute
    and the joint distribution of label combinations in the data (a count per combination seen in rows with
    every attribute known), from which fakes draw their labels, in training and when sampling."""
    complete = y[(y >= 0).all(1)]
    if len(complete) == 0:
        fail(f'--labels {path}: no image has every attribute known; fill in some rows or drop the sparse column')
    combos, counts = complete.unique(dim=0, return_counts=True)
    return {'vocab': vocab, 'label_prior': [[*c, int(n)] for c, n in zip(combos.tolist(), counts)]}


def parse_attrs(pairs, vocab):
    """['hair=blonde', ...] -> {'hair': 'blonde', ...}, checked against vocab (attribute -> class names)."""
    asked = dict(p.partition('=')[::2] for p in pairs or [])
    attr_indices(asked, vocab)
    return asked


def attr_indices(asked, vocab):
    """{'hair': 'blonde'} -> {attribute index: class index}; an unknown name is an error listing the valid ones."""
    out = {}
    for k, v in asked.items():
        if k not in vocab:
            fail(f'--attr {k}={v}: unknown attribute {k!r}; known: {", ".join(vocab)}')
        if v not in vocab[k]:
            fail(f'--attr {k}={v}: unknown {k} {v!r}; known: {"|".join(vocab[k])}')
        out[list(vocab).index(k)] = vocab[k].index(v)
    return out


def draw_labels(model_args, n, device='cpu', generator=None, attrs=None):
    """n label rows (LongTensor (n, A)) drawn from the data's joint label distribution. attrs fixes some
    attributes ({'hair': 'blonde'}); the others are drawn given them, so blonde faces get the eye colours
    blonde faces have in the data (or, for a combination the data never shows, from all rows)."""
    vocab = model_args['vocab']
    table = torch.tensor(model_args['label_prior'])
    combos, counts = table[:, :-1], table[:, -1].float()
    fixed = attr_indices(attrs or {}, vocab)
    match = torch.ones(len(combos), dtype=torch.bool)
    for i, c in fixed.items():
        match &= combos[:, i] == c
    if match.any():
        counts = counts * match
    y = combos[torch.multinomial(counts, n, replacement=True, generator=generator)]
    for i, c in fixed.items():
        y[:, i] = c
    return y.to(device)
