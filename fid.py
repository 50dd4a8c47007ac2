"""FID and KID: how every result of this project is scored.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) is the Frechet distance between Gaussians
fitted to Inception pool3 features of real and generated images. KID (Binkowski et al. 2018,
https://arxiv.org/abs/1801.01401) is an unbiased MMD on the same features, trustworthy at small N.

    python fid.py runs/dcgan/samples data/faces                  # two folders
    python fid.py faces/ --save-stats faces.npz                  # cache a dataset's statistics once
    python fid.py runs/dcgan/ckpt.pt faces.npz --n 10000         # sample a checkpoint, no files written

Each of the two inputs is a folder of images (or a .zip), a statistics .npz (ours or pytorch-fid's),
a data cache .pt from a training run, or a checkpoint of any of our scripts (then --n images are
generated, rounded to uint8 exactly as a saved PNG would be, and scored in memory).

`--inception fid` (default) is the TensorFlow 2015-12-05 FID Inception of the original FID code, as
ported by pytorch-fid, with pytorch-fid's preprocessing (uint8 -> [0, 1] -> bilinear resize to 299 ->
[-1, 1]): its numbers are comparable with published FIDs. `--inception torchvision` uses torchvision's
ImageNet Inception-v3 weights and preprocessing instead: a different network, so different numbers,
comparable only with each other.
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy import linalg
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionC, InceptionE

import common
import dataset
import sampling

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
# Where the FID weights are looked for before downloading: $FID_WEIGHTS, torch's hub cache (where
# pytorch-fid's own download lands), and the copy beside this repository on the project's machines.
WEIGHT_CANDIDATES = [
    os.environ.get('FID_WEIGHTS', ''),
    os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(FID_WEIGHTS_URL)),
    os.path.join(common.HERE, '..', 'shared', 'weights', 'pt_inception-2015-12-05-nofc.pth'),
]
MIN_HELDOUT = 20   # the 1st percentile of fewer held-out distances is just their minimum
# Two faces closer than this in pixel space (L2 over the 64 x 64 x 3 values, 0-255) are the same picture: a
# crawl that stored one image under several names, maybe re-encoded. Measured on the 18,992 shared faces: such
# pairs are 0-500 apart, a face and its nearest other face typically 5,000-6,000 (results/novelty.md).
DUPLICATE_L2 = 500.0
MIN_FID_N = 2048   # below the feature dimension the covariance is singular and FID strongly biased
# A white blotch: a region of pure white (every channel >= 252 of 255) of at least 48 pixels that does not touch
# the border (white that touches it is background). 0.7% of the shared faces have one, 16% of the shipped LSGAN's
# faces: there it is tanh run into saturation in the middle of a face (results/notes/blotches.md).
BLOTCH_WHITE, BLOTCH_AREA = 252, 48


# ----------------------------------------------------------------------------------------------------
# The FID Inception: torchvision's Inception3 blocks with the TF graph's pooling differences

def tf_avg_pool(x):
    """TF's 3x3 average pool does not count the zero padding in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(tf_avg_pool(x))]


class FIDInceptionC(InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))]


class FIDInceptionE(InceptionE):
    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        # the last block of the TF graph max-pools here (likely a bug in that graph, kept for comparability)
        self.pool = (lambda x: F.max_pool2d(x, 3, stride=1, padding=1)) if max_pool else tf_avg_pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1), self.branch_pool(self.pool(x))]


def fid_inception(weights=None):
    """The FID Inception (1008 classes in the TF graph; the classifier is not used) with its weights."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    for name, block in [('Mixed_5b', FIDInceptionA(192, 32)), ('Mixed_5c', FIDInceptionA(256, 64)),
                        ('Mixed_5d', FIDInceptionA(288, 64)), ('Mixed_6b', FIDInceptionC(768, 128)),
                        ('Mixed_6c', FIDInceptionC(768, 160)), ('Mixed_6d', FIDInceptionC(768, 160)),
                        ('Mixed_6e', FIDInceptionC(768, 192)), ('Mixed_7b', FIDInceptionE(1280, max_pool=False)),
                        ('Mixed_7c', FIDInceptionE(2048, max_pool=True))]:
        setattr(net, name, block)
    sd = load_fid_weights(weights)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith('fc.') for k in missing):   # the file may omit the unused fc
        common.fail(f'FID weights do not fit the FID Inception: missing {missing[:3]}, unexpected {unexpected[:3]}')
    net.fc = nn.Identity()
    return net


def load_fid_weights(path=None):
    for p in ([path] if path else WEIGHT_CANDIDATES):
        if p and os.path.isfile(p):
            return torch.load(p, map_location='cpu', weights_only=True)
    if path:
        common.fail(f'--weights {path}: no such file')
    return download_weights(FID_WEIGHTS_URL, 'the FID Inception weights', 'FID_WEIGHTS')   # cached by torch.hub


def download_weights(url, what, env=None):
    """A state_dict from url, kept in torch's hub folder for next time; without a network, one line that says
    what could not be fetched, from where, and how to point at a copy fetched by hand."""
    try:
        return torch.hub.load_state_dict_from_url(url, map_location='cpu', progress=True)
    except Exception as e:   # URLError, HTTPError, timeouts, a proxy's page: all end the same way
        cache = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
        common.fail(f'could not download {what} from {url} ({type(e).__name__}: {str(e)[:80]}); fetch that file by '
                    f'hand and pass --weights FILE' + (f', set {env}=FILE' if env else '') + f', or put it at {cache}')


@torch.no_grad()
def fold_batchnorm(net):
    """Fold each eval-mode BatchNorm into the conv before it (w' = w * g / sqrt(var + eps), b' = b - mean
    * g / sqrt(var + eps)): the same function to ~1e-6, one pass over memory less per layer. About 1.3x
    faster on CPU."""
    for m in net.modules():
        if isinstance(m, BasicConv2d):
            scale = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
            m.conv.weight.mul_(scale.view(-1, 1, 1, 1))
            m.conv.bias = nn.Parameter(m.bn.bias - m.bn.running_mean * scale)
            m.bn = nn.Identity()
    return net


class Extractor(nn.Module):
    """uint8 images (B, 3, H, W) -> pool3 features (B, 2048), float32."""

    def __init__(self, kind='fid', weights=None):
        super().__init__()
        self.kind = kind
        if kind == 'fid':
            self.net = fid_inception(weights)
        else:   # torchvision's ImageNet weights: downloaded on first use, into torch's hub folder
            self.net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
            self.net.aux_logits, self.net.AuxLogits = False, None
            url = torchvision.models.Inception_V3_Weights.DEFAULT.url
            if weights and not os.path.isfile(weights):
                common.fail(f'--weights {weights}: no such file')
            sd = (torch.load(weights, map_location='cpu', weights_only=True) if weights
                  else download_weights(url, 'torchvision\'s Inception-v3 weights'))
            self.net.load_state_dict(sd, strict=False)
            self.net.fc = nn.Identity()
            self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.net.transform_input = False
        fold_batchnorm(self.net)
        self.eval().requires_grad_(False).to(memory_format=torch.channels_last)

    def forward(self, images):
        x = images.float() / 255   # exactly pytorch-fid's ToTensor()
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1 if self.kind == 'fid' else (x - self.mean) / self.std
        return self.net(x.contiguous(memory_format=torch.channels_last))


# ----------------------------------------------------------------------------------------------------
# Statistics, FID, KID

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64, with scipy's sqrtm."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        common.fail(f'feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}; compute both with the same --inception')
    diff = mu1 - mu2
    with warnings.catch_warnings():   # a singular product is expected below 2048 samples, handled below
        warnings.simplefilter('ignore', linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():   # singular product (too few samples): regularise the diagonal
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            common.fail(f'the matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g}); '
                        f'use more samples (>= {MIN_FID_N})')
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def statistics(feats):
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def kid(f1, f2, subsets=100, subset_size=1000, seed=0):
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
    subsets; returns (mean, std). Both sides need at least 2 samples."""
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    n = min(len(f1), len(f2), subset_size)
    if n < 2:
        common.fail(f'KID needs at least 2 images on each side, got {len(f1)} and {len(f2)}')
    rng = np.random.default_rng(seed)
    d = f1.shape[1]
    vals = []
    for _ in range(subsets):
        x, y = f1[rng.choice(len(f1), n, replace=False)], f2[rng.choice(len(f2), n, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


# ----------------------------------------------------------------------------------------------------
# Precision, recall, novelty: nearest neighbours in pool3 (or pixel) space, block by block

def nearest(a, b, k=1, chunk=1024):
    """For each row of a, its k nearest rows of b (Euclidean) -> (distances (len(a), k), indices).
    Blocks of `chunk` x `chunk` rows go through torch.cdist and a running top-k, so memory stays bounded
    (10k generated against 19k training faces takes seconds). Rows may be uint8 images: each block is
    flattened and converted to float on the fly."""
    flat = lambda t: torch.as_tensor(t).flatten(1)
    a, b = flat(a), flat(b)
    dists, idx = [], []
    for i in range(0, len(a), chunk):
        qa = a[i:i + chunk].float()
        best_d = torch.full((len(qa), 0), float('inf'))
        best_i = torch.zeros((len(qa), 0), dtype=torch.long)
        for j in range(0, len(b), chunk):
            d = torch.cdist(qa, b[j:j + chunk].float())
            d, jj = d.topk(min(k, d.shape[1]), dim=1, largest=False)
            best_d, order = torch.cat([best_d, d], 1).topk(min(k, best_d.shape[1] + d.shape[1]), dim=1, largest=False)
            best_i = torch.cat([best_i, jj + j], 1).gather(1, order)
        dists.append(best_d)
        idx.append(best_i)
    return torch.cat(dists), torch.cat(idx)


def precision_recall(real, fake, k=3, chunk=1024):
    """Improved precision and recall (Kynkaanniemi et al. 2019, https://arxiv.org/abs/1904.06991). Each
    real feature is the centre of a ball reaching its k-th nearest real neighbour; precision is the share
    of fakes inside some real ball (quality), recall the share of reals inside some fake ball, built the
    same way from the fakes (coverage)."""
    real, fake = torch.as_tensor(np.asarray(real)).float(), torch.as_tensor(np.asarray(fake)).float()

    def inside_any(points, centres):
        radii = nearest(centres, centres, k + 1, chunk)[0][:, k]   # the 0th neighbour is the point itself
        hits = [(torch.cdist(points[i:i + chunk], centres) <= radii).any(1) for i in range(0, len(points), chunk)]
        return torch.cat(hits).float().mean().item()

    return inside_any(fake, real), inside_any(real, fake)


def novelty(gen, train, heldout, chunk=1024, copy_distance=None):
    """Are generated faces new? Nearest-training-face distances of generated faces against those of real
    faces never trained on. ratio = median(gen -> train) / median(held-out -> train): about 1 means as new
    as real faces, far below 1 means copies. memorized = share of generated faces closer to a training face
    than `threshold`, the 1st percentile of held-out -> train distances: the held-out faces must have no
    duplicate on the training side (clean_heldout), or that percentile is 0 and nothing can be flagged.
    copy_distance: also the share of generated faces within it of a training face (verbatim copies)."""
    d_gen = nearest(gen, train, 1, chunk)[0][:, 0]
    d_held = nearest(heldout, train, 1, chunk)[0][:, 0]
    threshold = torch.quantile(d_held, 0.01)
    out = {'ratio': (d_gen.median() / d_held.median()).item(), 'memorized': (d_gen < threshold).float().mean().item(),
           'threshold': threshold.item(), 'n_heldout': len(heldout)}
    if copy_distance is not None:
        out['copies'] = (d_gen < copy_distance).float().mean().item()
    return out


def white_blotches(images, white=BLOTCH_WHITE, area=BLOTCH_AREA):
    """Mask of the uint8 (N, 3, H, W) images with a white blotch (BLOTCH_WHITE, BLOTCH_AREA above)."""
    from scipy import ndimage
    found = np.zeros(len(images), bool)
    for i, mask in enumerate((torch.as_tensor(images) >= white).all(1).numpy()):
        regions, n = ndimage.label(mask)
        if n:
            border = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
            sizes = np.bincount(regions.ravel(), minlength=n + 1)
            sizes[border] = 0   # label 0 (not white) is among them whenever any border pixel is not white
            found[i] = sizes[1:].max() >= area
    return found


def duplicate_pairs(images, threshold=DUPLICATE_L2, chunk=1024):
    """Pairs (i, j), i < j, of images closer than threshold in pixel L2, and their distances: the exact and
    near-exact copies in a set of uint8 images. Block by block over the upper triangle: seconds for 19k faces."""
    x = torch.as_tensor(images).flatten(1)
    pairs = [torch.zeros((0, 2), dtype=torch.long)]
    for i in range(0, len(x), chunk):
        a = x[i:i + chunk].float()
        for j in range(i, len(x), chunk):
            d = torch.cdist(a, x[j:j + chunk].float())
            if i == j:   # each pair once, and no image with itself
                d.masked_fill_(torch.ones(d.shape, dtype=torch.bool).tril(), float('inf'))
            ii, jj = (d < threshold).nonzero(as_tuple=True)
            pairs.append(torch.stack([ii + i, jj + j], 1))
    pairs = torch.cat(pairs)
    # the exact distances of the few pairs found (cdist's matrix-product form puts identical images ~10 apart)
    return pairs, (x[pairs[:, 0]].float() - x[pairs[:, 1]].float()).norm(dim=1)


def clean_heldout(heldout, train, threshold=DUPLICATE_L2, chunk=1024):
    """Mask of the held-out faces with no duplicate on the training side (pixel L2 >= threshold to all of them)."""
    return nearest(heldout, train, 1, chunk)[0][:, 0] >= threshold


def nearest_grid(gen, train, idx, path, rows=16):
    """Each row: a generated face, then its nearest training faces in order (uint8 images)."""
    k = idx.shape[1]
    x = torch.cat([torch.cat([gen[i:i + 1], train[idx[i]]]) for i in range(min(rows, len(gen)))])
    sampling.save_grid(x.float() / 127.5 - 1, path, nrow=k + 1)


# ----------------------------------------------------------------------------------------------------
# Inputs: folders, zips, data caches, checkpoints, .npz statistics

@torch.inference_mode()
def extract(extractor, batches, n, device, log=print, what=''):
    """Features of uint8 batches; prints progress and throughput."""
    feats, done, t0 = [], 0, time.time()
    for b in batches:
        feats.append(extractor(b.to(device)).float().cpu())
        done += len(b)
        if len(feats) % 20 == 0 or done == n:
            log(f'  {what}: {done}/{n} images, {done / (time.time() - t0):.1f} img/s')
    return torch.cat(feats).numpy()


def score_generator(G, sample_inputs, model_args, n, stats, extractor, device, seed):
    """-> (FID, KID or None) of n fresh samples of G against a statistics .npz: the in-run score of a training
    run's --fid-every. KID where the .npz keeps features (as --save-stats writes): unlike FID it has no bias
    from the sample count, so scores at different n compare."""
    batches = (as_uint8(x) for x in sampling.sample_batches(G, sample_inputs, model_args, n, device, seed + 2))
    feats = extract(extractor, batches, n, device, log=lambda m: None)
    real, mu, sigma, _ = features_of(stats, extractor, None)
    return frechet_distance(*statistics(feats), mu, sigma), (kid(feats, real, seed=seed)[0] if real is not None else None)


def uint8_batches(images, batch_size):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def as_uint8(x):
    """Generated images in [-1, 1] -> uint8 NCHW, rounded exactly as a saved PNG is (FID depends on it)."""
    return torch.from_numpy(sampling.to_uint8(x)).permute(0, 3, 1, 2)


def checkpoint_batches(ckpt, n, batch_size, device, seed, save_dir=None, keep=None):
    """uint8 batches of n samples of a checkpoint's generator; appended to `keep` (a list) if given."""
    G, module = sampling.load_generator(ckpt, device)
    i = 0
    for x in sampling.sample_batches(G, module.sample_inputs, ckpt['model_args'], n, device, seed, batch_size):
        if save_dir:
            sampling.save_pngs(x, save_dir, start=i)
            i += len(x)
        x = as_uint8(x)
        if keep is not None:
            keep.append(x)
        yield x


def is_checkpoint(path):
    """A .pt is either a checkpoint of our scripts (it has a 'format') or a data cache of images."""
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        common.fail(f'{path}: unreadable ({type(e).__name__}); expected a checkpoint or a data cache .pt')
    return isinstance(obj, dict) and 'format' in obj


def features_of(src, extractor, args, log=print, images_out=None):
    """-> (features or None, mu, sigma, n) for any supported input. images_out (a dict) receives the uint8
    images and their names, for the pixel-space and nearest-neighbour measures."""
    if src.endswith('.npz'):
        try:
            z = np.load(src)
            mu, sigma = z['mu'], z['sigma']
        except Exception:
            common.fail(f'{src}: not a statistics .npz (expected arrays mu and sigma, as --save-stats writes)')
        feats = z['features'] if 'features' in z.files else None
        if 'inception' in z.files and str(z['inception']) != extractor.kind:
            common.fail(f'{src} holds --inception {z["inception"]} statistics; rerun with that, or recompute the .npz')
        return feats, mu, sigma, int(z['n']) if 'n' in z.files else None
    ckpt = common.load_checkpoint(src) if src.endswith('.pt') and is_checkpoint(src) else None
    kept, cache = [], None
    if ckpt:
        batches = checkpoint_batches(ckpt, args.n, args.batch_size, args.device, args.seed, args.save_samples,
                                     kept if images_out is not None else None)   # keep images only when asked
        n, names = args.n, [f'{i:06d}' for i in range(args.n)]
    else:
        images, names = dataset.load_images(src, size=args.image_size, log=log)
        if args.limit:
            images, names = images[:args.limit], names[:args.limit]
        batches, n = uint8_batches(images, args.batch_size), len(images)
        kept = [images]
        if args.cache:   # features of a fixed image set, keyed by what they depend on
            import hashlib
            key = hashlib.sha1(repr((os.path.abspath(src), names, tuple(images.shape), extractor.kind)).encode()).hexdigest()[:16]
            cache = os.path.join(args.cache, f'features-{key}.npy')
    if n < 2:
        common.fail(f'{src}: {n} image(s); FID and KID need at least 2 (and {MIN_FID_N}+ for an unbiased FID)')
    if n < MIN_FID_N and not args.allow_small:
        common.fail(f'{src}: only {n} images; FID is biased below {MIN_FID_N} (the feature size), so it is '
                    f'not comparable with published numbers. Pass --allow-small to compute it anyway')
    if cache and os.path.exists(cache):
        feats = np.load(cache)
        log(f'  {src}: features of {n} images from the cache {cache}')
    else:
        feats = extract(extractor, batches, n, args.device, log, os.path.basename(src.rstrip('/')))
        if cache:
            os.makedirs(args.cache, exist_ok=True)
            np.save(cache + '.tmp.npy', feats)
            os.replace(cache + '.tmp.npy', cache)
    if images_out is not None:
        images_out.update(images=kept[0] if len(kept) == 1 else torch.cat(kept), names=names)
    return (feats, *statistics(feats), n)


def save_stats(path, feats, mu, sigma, kind, max_features=5000):
    """mu, sigma (float64) and up to `max_features` features (a fixed random subset, for KID)."""
    keep = np.random.default_rng(0).permutation(len(feats))[:max_features]
    tmp = path + '.tmp.npz'
    np.savez(tmp, mu=mu, sigma=sigma, n=len(feats), inception=kind, features=feats[np.sort(keep)].astype(np.float32))
    os.replace(tmp, path)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('a', help='folder/.zip of images, statistics .npz, data cache .pt, or a generator checkpoint .pt')
    p.add_argument('b', nargs='?', help='the second input (omit with --save-stats)')
    p.add_argument('--save-stats', metavar='OUT.npz', help='write the statistics of A (mu, sigma, features for KID) and exit')
    p.add_argument('--inception', choices=['fid', 'torchvision'], default='fid',
                   help='fid = the TF FID Inception, comparable with published FIDs; torchvision = ImageNet '
                   'Inception-v3 weights from torchvision (downloaded on first use) (default: %(default)s)')
    p.add_argument('--weights', help='FID Inception weights file (default: $FID_WEIGHTS, the torch hub cache, '
                   '../shared/weights, else downloaded from pytorch-fid\'s release)')
    p.add_argument('--n', type=int, default=10000, help='images generated from a checkpoint (default: %(default)s)')
    p.add_argument('--limit', type=int, default=0, help='use only the first N images of a folder (default: all)')
    p.add_argument('--image-size', type=int, default=None,
                   help='resize images to this before the Inception (default: keep their size, as pytorch-fid)')
    p.add_argument('--batch-size', type=int, default=100, help='(default: %(default)s)')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'], help='(default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='seed of the generated samples and KID subsets (default: %(default)s)')
    p.add_argument('--save-samples', metavar='DIR', help='also write the generated images as PNGs')
    p.add_argument('--allow-small', action='store_true', help=f'allow fewer than {MIN_FID_N} images (FID is biased there)')
    p.add_argument('--kid-subsets', type=int, default=100, help='KID: random subsets averaged (default: %(default)s)')
    p.add_argument('--kid-subset-size', type=int, default=1000, help='KID: images per subset (default: %(default)s)')
    p.add_argument('--pr-k', type=int, default=3,
                   help='k of improved precision/recall, computed whenever both sides have features (default: %(default)s)')
    p.add_argument('--novelty', action='store_true', help='are A\'s faces new? nearest training faces (B, as images) of '
                   'A\'s faces against those of held-out real faces, in pool3 and pixel space')
    p.add_argument('--heldout', metavar='DIR', help='real faces never trained on, for --novelty '
                   '(default: the last --heldout-frac of B by file name, then left out of the training side)')
    p.add_argument('--heldout-frac', type=float, default=0.05, help='(default: %(default)s)')
    p.add_argument('--nearest', type=int, default=0, metavar='K',
                   help='with --out: grids of generated faces each followed by its K nearest training faces; implies --novelty')
    p.add_argument('--out', metavar='DIR', help='write metrics.json (and the --nearest grids) here')
    p.add_argument('--cache', metavar='DIR', help='cache the features of image inputs here, reused while the images are the same')
    p.add_argument('--duplicates', action='store_true', help=f'only list the pairs of A\'s images closer than '
                   f'{DUPLICATE_L2:g} in pixel L2 (the same picture under two names); with --out: duplicates.csv and a grid of pairs')
    p.add_argument('--blotches', action='store_true', help=f'only count A\'s faces with a white blotch (pure white, every '
                   f'channel >= {BLOTCH_WHITE}, over >= {BLOTCH_AREA} pixels not touching the border); with --out: a grid of them')
    args = p.parse_args(argv)
    if not args.save_stats and not args.b and not args.duplicates and not args.blotches:
        p.error('give two inputs to compare, or one with --save-stats OUT.npz')
    args.novelty = args.novelty or args.nearest > 0
    if args.nearest and not args.out:
        p.error('--nearest K writes grids: give --out DIR')
    if args.novelty and any(x.endswith('.npz') for x in (args.a, args.b or '')):
        p.error('--novelty and --nearest compare images: give A and B as checkpoints, folders, .zip or data .pt, not .npz')
    if not 0 < args.heldout_frac < 1 or args.pr_k < 1 or args.nearest < 0:
        p.error('--heldout-frac must be in (0, 1), --pr-k >= 1 and --nearest >= 0')
    return args


def main(argv=None):
    args = get_args(argv)
    if hasattr(sys.stdout, 'reconfigure'):  # progress reaches a log file as it happens (nohup ... > log)
        sys.stdout.reconfigure(line_buffering=True)
    args.device = common.pick_device(args.device)
    if args.device.type == 'cpu':
        common.set_cpu_threads()
    for src in [args.a] + ([args.b] if args.b else []):
        if not os.path.exists(src):
            common.fail(f'{src}: no such file or folder')
    if args.duplicates:
        return duplicates_report(args.a, args.out)
    if args.blotches:
        return blotches_report(args)
    extractor = Extractor(args.inception, args.weights).to(args.device)
    t0 = time.time()
    ima, imb = {}, {}
    fa, mua, sa, na = features_of(args.a, extractor, args, images_out=ima if args.novelty else None)
    if args.save_stats:
        save_stats(args.save_stats, fa, mua, sa, args.inception)
        print(f'wrote {args.save_stats}: statistics of {na} images ({args.inception} Inception) in {time.time() - t0:.0f}s')
        return None
    if args.b == args.a:
        fb, mub, sb, nb, imb = fa, mua, sa, na, ima
    else:
        fb, mub, sb, nb = features_of(args.b, extractor, args, images_out=imb if args.novelty else None)
    result = compare(args, fa, mua, sa, na, fb, mub, sb, nb, t0)
    if args.novelty:
        result.update(novelty_report(args, extractor, fa, ima['images'], fb, imb))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'metrics.json'), 'w') as f:
            json.dump(result, f, indent=2)
    return result


def compare(args, fa, mua, sa, na, fb, mub, sb, nb, t0):
    """FID of A against B; KID and precision / recall where both sides have features. Prints one line."""
    fid = max(frechet_distance(mua, sa, mub, sb), 0.0)   # a tiny negative from rounding (A against itself) is 0
    result = {'fid': fid, 'n': [na, nb], 'inception': args.inception, 'a': args.a, 'b': args.b}
    line = f'FID {fid:.2f}'
    if fa is not None and fb is not None:
        k, ks = kid(fa, fb, args.kid_subsets, args.kid_subset_size, args.seed)
        m = min(len(fa), len(fb))   # the same N on both sides: k-NN radii shrink as N grows
        rng = np.random.default_rng(args.seed)
        pr, rc = precision_recall(fb[rng.permutation(len(fb))[:m]], fa[rng.permutation(len(fa))[:m]], args.pr_k)
        result.update(kid=k, kid_std=ks, precision=pr, recall=rc, pr_k=args.pr_k, pr_n=m)
        line += f'  KID {k * 1000:.2f} +- {ks * 1000:.2f} (x1e-3)  precision {pr:.3f} recall {rc:.3f} (k={args.pr_k}, N={m})'
    print(f'{line}  | N = {na or "?"} vs {nb or "?"}, inception {args.inception}, pool3 2048-d, '
          f'input resized bilinear to 299, {time.time() - t0:.0f}s')
    return result


def duplicates_report(src, out=None, pairs_shown=24):
    """The duplicate pairs of a folder of faces: counts printed; duplicates.csv and duplicates.png written to out."""
    images, names = dataset.load_images(src, 64)
    t0 = time.time()
    pairs, dists = duplicate_pairs(images)
    n_dup = len(torch.unique(pairs)) if len(pairs) else 0
    print(f'{src}: {len(pairs)} pairs closer than {DUPLICATE_L2:g} in pixel L2 ({int((dists == 0).sum())} identical); '
          f'{n_dup} of {len(images)} faces ({n_dup / len(images):.1%}) have a duplicate ({time.time() - t0:.0f}s)')
    result = {'pairs': len(pairs), 'identical': int((dists == 0).sum()), 'faces_with_duplicate': n_dup,
              'faces': len(images), 'threshold': DUPLICATE_L2}
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, 'duplicates.csv'), 'w') as f:
            f.write('file_a,file_b,pixel_l2\n' + ''.join(f'{names[i]},{names[j]},{d:.1f}\n' for (i, j), d in zip(pairs.tolist(), dists.tolist())))
        shown = torch.linspace(0, len(pairs) - 1, min(pairs_shown, len(pairs))).long() if len(pairs) else []
        if len(shown):   # each row: a face and its duplicate, side by side; pairs spread over the whole list
            sampling.save_grid(images[pairs[shown].flatten()].float() / 127.5 - 1, os.path.join(out, 'duplicates.png'), nrow=8)
        with open(os.path.join(out, 'duplicates.json'), 'w') as f:
            json.dump(result, f, indent=2)
        print(f'wrote {out}/duplicates.csv, duplicates.json' + (', duplicates.png (pairs side by side, 4 per row)' if len(shown) else ''))
    return result


def blotches_report(args, shown=32):
    """The share of A's faces (--n samples of a checkpoint, or a folder) with a white blotch; a grid of them in --out."""
    if args.a.endswith('.pt') and is_checkpoint(args.a):
        images = torch.cat(list(checkpoint_batches(common.load_checkpoint(args.a), args.n, args.batch_size, args.device, args.seed)))
    else:
        images = dataset.load_images(args.a, size=args.image_size or 64)[0]
    found = white_blotches(images)
    print(f'{args.a}: {found.mean():.1%} of {len(images)} faces have a white blotch (pure white, every channel >= '
          f'{BLOTCH_WHITE}, over >= {BLOTCH_AREA} pixels not touching the border)')
    result = {'blotches': float(found.mean()), 'n': len(images), 'white': BLOTCH_WHITE, 'area': BLOTCH_AREA}
    if args.out and found.any():
        sampling.save_grid(images[torch.from_numpy(found)][:shown].float() / 127.5 - 1, os.path.join(args.out, 'blotches.png'))
        print(f'wrote {args.out}/blotches.png: the first {min(shown, int(found.sum()))} of them')
    return result


def novelty_report(args, extractor, gen_feats, gen_images, real_feats, real):
    """Split B into training and held-out faces, then novelty in pool3 and pixel space, and the grids."""
    if args.heldout:
        held = {}
        held_feats = features_of(args.heldout, extractor, args, images_out=held)[0]
        train_feats, train_images, held_images = real_feats, real['images'], held['images']
        where = f'{args.heldout} ({len(held_images)} faces)'
    else:   # the last faces by file name; they leave the training side so that none is its own neighbour
        order = np.argsort(np.array(real['names'], dtype=object), kind='stable')
        n_held = int(len(order) * args.heldout_frac)
        train_idx, held_idx = np.sort(order[:len(order) - n_held]), np.sort(order[len(order) - n_held:])
        train_feats, held_feats = real_feats[train_idx], real_feats[held_idx]
        train_images, held_images = real['images'][train_idx], real['images'][held_idx]
        where = f'the last {args.heldout_frac:.0%} of {args.b} by file name ({n_held} faces)'
    clean = clean_heldout(held_images, train_images)   # a held-out copy of a training face is no held-out face
    held_feats, held_images, dropped = held_feats[clean.numpy()], held_images[clean], int((~clean).sum())
    if len(held_images) < MIN_HELDOUT:
        common.fail(f'held-out split {where} is too small for --novelty: {len(held_images)} faces without a duplicate '
                    f'in the training side (need >= {MIN_HELDOUT}); raise --heldout-frac or pass --heldout DIR with '
                    f'more real faces never trained on')
    pool = novelty(gen_feats, train_feats, held_feats)
    pixel = novelty(gen_images, train_images, held_images, copy_distance=DUPLICATE_L2)
    print(f'novelty vs {len(train_images)} training faces, held out: {where}, of which {dropped} dropped as duplicates '
          f'of training faces (pixel L2 < {DUPLICATE_L2:g}), {len(held_images)} used\n'
          f'  pool3: median NN distance ratio {pool["ratio"]:.3f}, memorized {pool["memorized"]:.1%} (closer than {pool["threshold"]:.2f})\n'
          f'  pixel: median NN distance ratio {pixel["ratio"]:.3f}, memorized {pixel["memorized"]:.1%} (closer than '
          f'{pixel["threshold"]:.0f}), copies {pixel["copies"]:.1%} (closer than {DUPLICATE_L2:g})'
          f'  (ratio ~1: as new as real faces; << 1: copies)')
    if args.nearest:
        for space, (g, t) in {'pool3': (gen_feats, train_feats), 'pixel': (gen_images, train_images)}.items():
            idx = nearest(g[:16], t, args.nearest)[1]
            nearest_grid(gen_images, train_images, idx, os.path.join(args.out, f'nearest_{space}.png'))
        print(f'wrote {args.out}/nearest_pool3.png and nearest_pixel.png: each generated face, then its '
              f'{args.nearest} nearest training faces')
    return {'novelty_pool3': pool, 'novelty_pixel': pixel, 'heldout': where, 'heldout_dropped': dropped,
            'n_train': len(train_images)}


if __name__ == '__main__':
    common.main_guard(main)
