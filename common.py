"""Plumbing shared by every model script: data, checkpoints, run folder, logging, seeding, devices, DDP.

Nothing in here knows about a particular GAN. Each model script (dcgan.py, lsgan.py, ...) keeps its
own model, losses and training loop and calls into this file for everything else:

    args = common.parse_args(parser)          # the shared CLI; --resume reloads the run's own flags
    run = common.Run(args, 'dcgan')           # device, seed, torchrun/DDP, run folder, signals
    images = run.load_images()                # uint8 (N, 3, H, W), decoded once, cached
    run.setup(models, optims, model_args, fixed=(fixed_z,), sample_inputs=sample_inputs)
    for step, real in run.batches(images):    # logs, grids and checkpoints happen between steps
        ...
    run.finish()                              # final checkpoint, samples/, progress.gif, loss curve

A script also exposes `Generator(**model_args)` and `sample_inputs(model_args, n, device, generator)`,
so that `--sample`, fid.py and the tests rebuild a generator from a checkpoint file alone.
"""
import argparse
import colorsys
import csv
import hashlib
import importlib
import io
import json
import math
import os
import signal
import sys
import time
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

CKPT_FORMAT = 1
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, 'data', 'faces')


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 1, no traceback."""


def fail(msg):
    raise UserError(msg)


# ----------------------------------------------------------------------------------------------------
# CLI

def base_parser(script, doc, epochs, batch_size):
    """The flags every training script shares. Scripts add their own model/optimiser flags."""
    p = argparse.ArgumentParser(prog=f'{script}.py', description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--data', default=DEFAULT_DATA, help='folder of images (recursive), a .zip of images, or a data '
      'cache .pt written by an earlier run (default: the bundled sample, %(default)s)')
    a('--out', default=None, help='run folder (default: runs/<script>; with --sample: <ckpt dir>/sample)')
    a('--epochs', type=int, default=epochs, help='passes over the data (default: %(default)s)')
    a('--batch-size', type=int, default=batch_size, help='global batch size (default: %(default)s)')
    a('--image-size', type=int, default=64, help='images are center-cropped and resized to this (default: %(default)s)')
    a('--flip', action=argparse.BooleanOptionalAction, default=False,
      help='random horizontal flips of the real images (default: %(default)s)')
    a('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'],
      help='auto = cuda, else mps, else cpu (default: %(default)s)')
    a('--precision', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'],
      help='autocast dtype; auto = bf16 on CPUs with native bf16 and on CUDA GPUs with bf16, else fp32; '
      'fp16 only on CUDA, with loss scaling; weights stay fp32 (default: %(default)s)')
    a('--channels-last', action=argparse.BooleanOptionalAction, default=True,
      help='NHWC memory layout, faster convolutions on CPU and tensor cores (default: %(default)s)')
    a('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the models: compiling first (~30 s for dcgan.py on 2 CPU cores), then '
      'faster steps; the scripts with a gradient penalty (wacgan_gp, stylegan) leave D uncompiled (default: off)')
    a('--seed', type=int, default=0, help='seeds weights, noise, data order and the fixed grid z (default: %(default)s)')
    a('--deterministic', action='store_true', help='deterministic kernels only (slower on CUDA)')
    a('--resume', action='store_true', help='continue the run in --out from its ckpt.pt, exactly; '
      'flags not given again keep the values the run started with; flags given again (--epochs, --lr-g, ...) apply from there on')
    a('--log-every', type=int, default=50, help='steps between progress lines / losses.csv rows (default: %(default)s)')
    a('--grid-every', type=int, default=500, help='steps between fixed-z sample grids (default: %(default)s)')
    a('--save-every', type=int, default=1000, help='steps between checkpoints (default: %(default)s)')
    a('--snapshot-every', type=int, default=10,
      help='epochs between generator snapshots in snapshots/, for scoring later; 0 = off (default: %(default)s)')
    a('--keep-checkpoints', action='store_true',
      help='with each snapshot also keep the full checkpoint (G, D, optimisers) as snapshots/ckpt_epochNNNN.pt, so a '
      'run that collapses can go on from before: copy one over <out>/ckpt.pt and --resume (default: off)')
    a('--lr-halve-at', default='', metavar='EPOCHS',
      help='comma list of epochs at which every learning rate is halved, e.g. 28,44 (the step decay of the shipped '
      'DCGAN and LSGAN, results/README.md); a resumed run applies the halvings it has passed (default: none)')
    a('--fid-every', type=int, default=0, metavar='EPOCHS',
      help='score G with FID every this many epochs (needs --fid-stats), logged to losses.csv; 0 = off (default: %(default)s)')
    a('--fid-stats', default=None, help='statistics .npz of the real data, from `python fid.py DATA --save-stats OUT.npz`')
    a('--fid-n', type=int, default=2000, help='generated images per --fid-every score (default: %(default)s)')
    a('--n-samples', type=int, default=10000,
      help='individual PNGs written to samples/ at the end, for FID (default: %(default)s)')
    a('--sample', type=int, default=0, metavar='N',
      help='only generate: write N images and grids from --ckpt, then exit')
    a('--ckpt', default=None, help='checkpoint for --sample and --export (default: <out>/ckpt.pt)')
    a('--export', default=None, metavar='OUT.pt',
      help='only export: write the generator of --ckpt that samples (the EMA one where kept) in fp16 with its '
      'args, small enough to share and to --sample from alone, then exit')
    return p


def add_ema_diffaug_args(parser, ema_kimg):
    """--ema-kimg and --diffaug, for the scripts that offer an EMA generator and DiffAugment."""
    parser.add_argument('--ema-kimg', type=float, default=ema_kimg,
                        help='half-life of the EMA generator, in thousands of images; it samples, makes the grids '
                        'and is scored; 0 = no EMA (default: %(default)s)')
    parser.add_argument('--diffaug', default='', metavar='OPS',
                        help=f'DiffAugment on every image D sees, a comma list of {",".join(AUGMENTS)} (default: off)')


def parse_args(parser, argv=None):
    """Parse flags. With --resume, the run's saved flags become the defaults, so
    `python dcgan.py --out RUN --resume` continues with exactly the settings it started with."""
    args = parser.parse_args(argv)
    run_dir = os.path.join('runs', parser.prog[:-3])   # the default run folder: runs/<script>
    if args.resume and not (args.sample or args.export):
        path = os.path.join(args.out or run_dir, 'ckpt.pt')
        if not os.path.exists(path):
            parser.error(f'--resume: no checkpoint at {path}; start a new run without --resume')
        saved = load_checkpoint(path)['args']
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in ('resume', 'sample', 'ckpt', 'export')})
        args = parser.parse_args(argv)
    if args.sample or args.export:
        args.ckpt = args.ckpt or os.path.join(args.out or run_dir, 'ckpt.pt')
    else:
        args.out = args.out or run_dir
    for name in ('epochs', 'batch_size', 'image_size', 'log_every', 'grid_every', 'save_every'):
        if getattr(args, name) <= 0:
            parser.error(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    if min(args.n_samples, args.sample, args.snapshot_every, args.fid_every) < 0:
        parser.error('--n-samples, --sample, --snapshot-every and --fid-every must be >= 0')
    try:
        ok = all(e > 0 for e in lr_halvings(args.lr_halve_at))
    except ValueError:
        ok = False
    if not ok:
        parser.error(f'--lr-halve-at: expected a comma list of positive epochs such as 28,44, got {args.lr_halve_at!r}')
    bad = set(filter(None, getattr(args, 'diffaug', '').split(','))) - set(AUGMENTS)
    if bad:
        parser.error(f'--diffaug: unknown {",".join(sorted(bad))}; choose from {",".join(AUGMENTS)}')
    if getattr(args, 'r1_every', 1) <= 0 or (getattr(args, 'r1', 0) or 0) < 0:
        parser.error(f'--r1 must be >= 0 and --r1-every positive, got {args.r1} and {args.r1_every}')
    if getattr(args, 'ema_kimg', 0) < 0:
        parser.error(f'--ema-kimg must be >= 0, got {args.ema_kimg}')
    if args.fid_every and args.fid_n < 2:
        parser.error(f'--fid-n must be at least 2 (FID needs a covariance; 2048+ for numbers that compare), got {args.fid_n}')
    if args.fid_every and not (args.fid_stats and os.path.isfile(args.fid_stats)):
        parser.error(f'--fid-every needs --fid-stats FILE.npz (got {args.fid_stats}); make it with '
                     f'`python fid.py DATA --save-stats FILE.npz`')
    return args


def lr_halvings(spec):
    """'28,44' -> [28, 44]: the epochs of --lr-halve-at."""
    return sorted(int(e) for e in spec.split(',') if e.strip())


def main_guard(fn, argv=None):
    """Run a script's main(): user errors become one line on stderr and exit code 1."""
    try:
        return fn(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# Devices, precision, seeding, distributed

def pick_device(name='auto', local_rank=0):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if name == 'cuda':
        if not torch.cuda.is_available():
            fail('--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu')
        return torch.device('cuda', local_rank)
    if name == 'mps' and not torch.backends.mps.is_available():
        fail('--device mps: MPS is not available on this machine; use --device cpu')
    return torch.device(name)


def cpu_has_bf16():
    fn = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    return bool(fn and fn())


def pick_precision(name, device):
    """The autocast dtype, or None for plain fp32."""
    if name == 'auto':
        if device.type == 'cuda':
            name = 'bf16' if torch.cuda.is_bf16_supported() else 'fp32'
        else:
            name = 'bf16' if device.type == 'cpu' and cpu_has_bf16() else 'fp32'
    if name == 'fp16' and device.type != 'cuda':
        fail('--precision fp16 needs CUDA (fp16 on CPU is slow and needs loss scaling); use bf16 or fp32')
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[name]


def seed_everything(seed, deterministic=False):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True   # fixed input shapes: let cuDNN pick the fastest kernels


def setup_distributed(device_name):
    """Set up torchrun's process group if launched by torchrun; returns (rank, world_size, device).

    Gradients are averaged across processes by Run.step with one all_reduce per model. A GAN step runs
    D several times before one backward and back-propagates the G loss through D, which the DDP wrapper
    handles awkwardly; the explicit all-reduce keeps every loop identical to its one-process form."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    device = pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cpu':
        set_cpu_threads(int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    return rank, world, device


def set_cpu_threads(local_world=1):
    """Torch's CPU threads: the physical cores shared between this machine's processes, or, for one process,
    OMP_NUM_THREADS where the user set it (say 1, to score snapshots beside a training run without the two
    fighting over the cores). torchrun sets OMP_NUM_THREADS=1 for its processes itself, so DDP divides the cores."""
    env = os.environ.get('OMP_NUM_THREADS', '')
    n = int(env) if local_world == 1 and env.isdigit() and int(env) > 0 else max(1, physical_cores() // local_world)
    torch.set_num_threads(n)
    return n


def physical_cores():
    """Physical cores (hyper-threads share one core's vector units, so more threads than cores only adds
    contention); from /proc/cpuinfo on Linux, else os.cpu_count()."""
    try:
        pairs, phys = set(), None
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('physical id'):
                    phys = line.split(':')[1].strip()
                elif line.startswith('core id'):
                    pairs.add((phys, line.split(':')[1].strip()))
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        return max(1, min(len(pairs) or allowed, allowed))
    except OSError:
        return os.cpu_count() or 1


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
    log(f'decoding {len(items)} images from {src}' + (' (once: later runs read the cache)' if cache else ''))
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

    def __init__(self, images, batch_size, seed, flip=False, device='cpu', rank=0, world=1, on_device=None, labels=None):
        if len(images) < batch_size:
            fail(f'only {len(images)} images for --batch-size {batch_size}; lower --batch-size or add images')
        if batch_size % world:
            fail(f'--batch-size {batch_size} must be divisible by the number of processes ({world})')
        self.device = torch.device(device)
        on_device = self.device.type == 'cuda' if on_device is None else on_device
        self.images = images.to(self.device) if on_device else images   # a GPU holds 19k faces in 230 MB
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
# Recipe helpers several scripts share: DiffAugment and the EMA generator
#
# DiffAugment (Zhao et al. 2020, https://arxiv.org/abs/2006.10738): the same random, differentiable
# transforms on every image D sees, real and fake, so D cannot memorise a small dataset

def aug_color(x):
    B = x.shape[0]
    x = x + (torch.rand(B, 1, 1, 1, device=x.device) - 0.5)                                  # brightness
    m = x.mean(1, keepdim=True)
    x = (x - m) * (torch.rand(B, 1, 1, 1, device=x.device) * 2) + m                          # saturation
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (torch.rand(B, 1, 1, 1, device=x.device) + 0.5) + m                     # contrast


def aug_translation(x, ratio=0.125):
    """Shift by up to 1/8 of the size, zero padding, via a per-sample integer gather."""
    B, C, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (B, 1, 1), device=x.device)
    ty = torch.randint(-sw, sw + 1, (B, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing='ij')
    gy, gx = (gy[None] + tx).clamp(-1, H), (gx[None] + ty).clamp(-1, W)   # -1 / H: the zero border
    padded = F.pad(x, (1, 1, 1, 1))
    idx = ((gy + 1) * (W + 2) + gx + 1).view(B, 1, -1).expand(-1, C, -1)
    return padded.flatten(2).gather(2, idx).view(B, C, H, W)


def aug_cutout(x, ratio=0.5):
    """Zero a random square of half the image size in each sample."""
    B, C, H, W = x.shape
    h, w = int(H * ratio + 0.5), int(W * ratio + 0.5)
    top = torch.randint(0, H - h + 1, (B, 1, 1), device=x.device)
    left = torch.randint(0, W - w + 1, (B, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing='ij')
    inside = (gy >= top) & (gy < top + h) & (gx >= left) & (gx < left + w)
    return x * (~inside)[:, None].to(x.dtype)


AUGMENTS = {'color': aug_color, 'translation': aug_translation, 'cutout': aug_cutout}


def diff_augment(x, ops):
    for op in filter(None, ops.split(',')):
        x = AUGMENTS[op](x)
    return x


def ema_beta(batch_size, ema_kimg):
    """Per-step EMA decay for a half-life of ema_kimg thousand images (StyleGAN2's convention); 0 = no memory."""
    return 0.5 ** (batch_size / (ema_kimg * 1000)) if ema_kimg > 0 else 0.0


@torch.no_grad()
def accumulate(ema, model, beta):
    """ema = beta * ema + (1 - beta) * model, for parameters; buffers (w_avg, noise) are copied. BatchNorm
    statistics copied from `model` belong to other weights: Run.sampler() recomputes them before ema samples."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - beta)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


@torch.no_grad()
def standing_stats(G, sample_inputs, model_args, batch_size, batches=16, seed=0):
    """Recompute G's BatchNorm running statistics under G's own weights: the average of the batch statistics
    of `batches` train-mode forward passes of `batch_size` samples (BigGAN's "standing statistics"). An EMA
    generator needs them: its weights average G's over thousands of images, while the running statistics
    it would sample with are G's latest. The inputs come from their own stream (global RNG untouched).
    Returns G in eval mode; a generator without BatchNorm is returned as it is."""
    bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return G
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # a cumulative average over the batches below, not a moving one
    G.train()
    device, g = next(G.parameters()).device, sample_rng(seed)
    for _ in range(batches):
        G(*(t.to(device) for t in sample_inputs(model_args, batch_size, 'cpu', g)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return G.eval()


def ema_copy(model, copy):
    """Make `copy` (a new instance of model's class) the EMA of `model`: its weights to start, eval mode, no
    gradients. The copy samples, `model` trains; accumulate(copy, model, beta) after each of model's steps."""
    accumulate(copy, model, 0.0)
    return copy.eval().requires_grad_(False)


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


def add_label_args(parser):
    """The flags of the conditional scripts (acgan.py, wacgan_gp.py)."""
    parser.add_argument('--labels', default=os.path.join(HERE, 'data', 'labels.csv'),
                        help='CSV `file,attr1,attr2,...` joined to --data by file name; empty = unknown; for the shared '
                        'faces use results/anime-faces-64-labels.csv (default: the bundled hand labels, %(default)s)')
    parser.add_argument('--attr', action='append', metavar='K=V', default=None,
                        help='with --sample: ask for this attribute value, repeatable, e.g. --attr hair=blonde --attr eyes=blue')


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


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one self-describing dict, written atomically, read as data (weights_only)

def atomic_save(obj, path):
    """torch.save to a temp file then rename: a crash mid-write never leaves a truncated checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(obj, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location='cpu'):
    if not os.path.isfile(path):
        fail(f'checkpoint {path} not found; train first or pass --ckpt PATH')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        fail(f'checkpoint {path} is unreadable ({type(e).__name__}); it may be truncated: use an earlier one')
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        fail(f'{path} is not a checkpoint of these scripts (format {CKPT_FORMAT})')
    return ckpt


def generator_checkpoint(ckpt, half=False):
    """The part of a training checkpoint needed to sample: small enough to share (fp16 with half=True)."""
    name = ckpt['sample_model']
    sd = {k: (v.half() if half and v.is_floating_point() else v) for k, v in ckpt['models'][name].items()}
    keep = ('format', 'script', 'model_args', 'args', 'step', 'epoch', 'fixed', 'versions')
    return {**{k: ckpt[k] for k in keep}, 'models': {name: sd}, 'sample_model': name}


def load_generator(ckpt, device='cpu'):
    """Rebuild the sampling generator (EMA where the script keeps one) from a checkpoint dict or path.
    Returns (G in eval mode, script module)."""
    if isinstance(ckpt, str):
        ckpt = load_checkpoint(ckpt)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    module = importlib.import_module(ckpt['script'])
    G = module.Generator(**ckpt['model_args'])
    sd = ckpt['models'][ckpt['sample_model']]
    G.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return G.to(device).eval(), module


@torch.no_grad()
def generate(G, inputs, batch_size=256):
    """G(*inputs) in eval mode (BatchNorm uses running statistics, so each image is independent of the
    rest of the batch), in fp32, in batches; returns images in [-1, 1] on the CPU."""
    was_training = G.training
    G.eval()
    n = len(inputs[0])
    out = torch.cat([G(*(t[i:i + batch_size] for t in inputs)).float().cpu() for i in range(0, n, batch_size)])
    G.train(was_training)
    return out.clamp_(-1, 1)


def to_uint8(x):
    """[-1, 1] float -> uint8 (N, H, W, 3), rounded exactly as a saved PNG is (FID must see the same)."""
    return ((x + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow=8, row_labels=None):
    """Images in [-1, 1] -> one PNG grid, optionally with a text label left of each row."""
    import torchvision.utils as vutils
    grid = vutils.make_grid(x.float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    im = Image.fromarray(to_uint8(grid[None] * 2 - 1)[0])
    if row_labels:
        margin, row_h = 7 * max(map(len, row_labels)) + 8, x.shape[2] + 2
        canvas = Image.new('RGB', (im.width + margin, im.height), 'white')
        canvas.paste(im, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        for i, text in enumerate(row_labels):
            draw.text((4, 2 + i * row_h + row_h // 2 - 6), text, fill='black')
        im = canvas
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)


def save_pngs(x, folder, start=0):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(to_uint8(x)):
        Image.fromarray(a).save(os.path.join(folder, f'{start + i:06d}.png'))


def sample_rng(seed):
    """The torch.Generator that draws sample inputs (fixed grids, --sample, FID samples) for a --seed.
    Not seeded with `seed` itself: the CPU generator would then replay the numbers that
    torch.manual_seed(seed) fed to the weight initialisation, and where a first layer's weight rows
    are those numbers (StyleGAN's mapping network: z_i = row i of its first matrix), each z_i meets
    its own row, lands far from the other ws and makes a broken face. A hash keeps the streams apart."""
    digest = hashlib.sha256(f'animegan sample inputs {seed}'.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], 'little') >> 1)


def sample_batches(G, sample_inputs, model_args, n, device, seed, batch_size=250, attrs=None, with_inputs=False):
    """n images from G in [-1, 1], in batches of bounded memory, from inputs drawn with their own seed.
    attrs ({'hair': 'blonde'}) goes to a conditional script's sample_inputs; with_inputs also yields the inputs."""
    g = sample_rng(seed)
    kw = {'attrs': attrs} if attrs else {}
    for i in range(0, n, batch_size):
        inputs = sample_inputs(model_args, min(batch_size, n - i), 'cpu', g, **kw)
        x = generate(G, tuple(t.to(device) for t in inputs))
        yield (x, inputs) if with_inputs else x


def attribute_grids(G, sample_inputs, model_args, out, device, seed, ncols=8, attrs=None):
    """For a conditional generator, inputs (z, labels): one grid per attribute, one row per class of it,
    the same z and other labels down each column, so the control shows at a glance. -> written paths."""
    vocab, paths = model_args['vocab'], []
    for a, name in enumerate(vocab):
        z, y = sample_inputs(model_args, ncols, 'cpu', sample_rng(seed), **({'attrs': attrs} if attrs else {}))
        classes = len(vocab[name])
        z, y = z.repeat(classes, 1), y.repeat(classes, 1)
        y[:, a] = torch.arange(classes).repeat_interleave(ncols)
        paths.append(os.path.join(out, f'attr_{name}.png'))
        save_grid(generate(G, (z.to(device), y.to(device))), paths[-1], nrow=ncols, row_labels=vocab[name])
    return paths


def write_samples(G, sample_inputs, model_args, n, folder, device, seed):
    """n images as individual PNGs (for FID)."""
    i = 0
    for x in sample_batches(G, sample_inputs, model_args, n, device, seed):
        save_pngs(x, folder, start=i)
        i += len(x)


def sample_main(args, sample_inputs, configure=None, extras=None):
    """--sample N: rebuild G from the checkpoint alone, write the fixed-z grid it was trained with, a grid
    of N new images and the N images as PNGs (with the same --seed, the images that training wrote to samples/).
    configure(G), if given, adjusts the loaded generator first (e.g. stylegan.py's truncation psi);
    extras(G, out, device), if given, writes a script's own pictures after (e.g. a style-mixing grid).
    With --export, write the fp16 generator first (and stop there unless --sample N is also given)."""
    path = args.ckpt
    ckpt = load_checkpoint(path)
    if args.export:
        atomic_save(generator_checkpoint(ckpt, half=True), args.export)
        print(f'wrote {args.export} ({os.path.getsize(args.export) / 2**20:.1f} MiB: fp16 {ckpt["sample_model"]} of step '
              f'{ckpt["step"]} of {path}); sample it with: python {ckpt["script"]}.py --sample 64 --ckpt {args.export}')
        if not args.sample:
            return args.export
    device = pick_device(args.device)
    G, _ = load_generator(ckpt, device)
    if configure:   # e.g. stylegan.py's truncation psi
        configure(G)
    model_args = ckpt['model_args']
    conditional = 'vocab' in model_args
    if getattr(args, 'attr', None) and not conditional:
        fail(f'--attr: {path} is an unconditional {ckpt["script"]}.py model; train acgan.py or wacgan_gp.py with --labels')
    attrs = parse_attrs(getattr(args, 'attr', None), model_args['vocab']) if conditional else None
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), 'sample')
    save_grid(generate(G, tuple(t.to(device) for t in ckpt['fixed'])), os.path.join(out, 'fixed_grid.png'))
    x = torch.cat(list(sample_batches(G, sample_inputs, model_args, args.sample, device, args.seed + 1, attrs=attrs)))
    save_grid(x[:256], os.path.join(out, 'grid.png'), nrow=max(1, min(16, int(math.ceil(math.sqrt(min(len(x), 256)))))))
    save_pngs(x, out)
    extra = ''
    if conditional:
        grids = attribute_grids(G, sample_inputs, model_args, out, device, args.seed + 1, attrs=attrs)
        extra = ', ' + ', '.join(os.path.basename(p) for p in grids) + (f' for {attrs}' if attrs else '')
    if extras:
        extras(G, out, device)
    print(f'wrote {args.sample} images, grid.png, fixed_grid.png{extra} to {out} (step {ckpt["step"]} of {path})')
    return out


# ----------------------------------------------------------------------------------------------------
# Run folder, loop bookkeeping, logging

class NonFiniteLoss(UserError):
    pass


class Run:
    """One training run: device/DDP/seed set-up, the run folder, and everything between the steps."""

    def __init__(self, args, script):
        self.args, self.script = args, script
        self.rank, self.world, self.device = setup_distributed(args.device)
        self.main = self.rank == 0
        self.dtype = pick_precision(args.precision, self.device)
        seed_everything(args.seed, args.deterministic)
        self.out = args.out
        self.ckpt_path = os.path.join(self.out, 'ckpt.pt')
        if not args.resume and os.path.exists(self.ckpt_path):
            fail(f'{self.ckpt_path} exists; pass --resume to continue that run, or choose another --out')
        if self.main:
            os.makedirs(self.out, exist_ok=True)
        if self.dtype == torch.bfloat16 and self.device.type == 'cpu' and not cpu_has_bf16():
            self.log('warning: --precision bf16 on a CPU without native bf16 (avx512_bf16) is emulated: a dcgan.py '
                     'step was 23x slower than fp32 on an AVX2 EPYC; --precision auto picks fp32 on such a CPU')
        self._stop_signal = None
        self._fid, self._kid, self._extractor = None, None, None
        self._standing_step = None
        self.models, self.optims, self.scalers = {}, {}, {}
        self._resume_ckpt = None

    def log(self, msg):
        if self.main:
            print(msg, flush=True)
            with open(os.path.join(self.out, 'log.txt'), 'a') as f:
                f.write(msg + '\n')

    def load_images(self):
        cache = os.path.join(self.out, f'data_{self.args.image_size}.pt') if self.main else None
        if self.world > 1:   # rank 0 decodes and writes the cache, the others read it
            if self.main:
                load_images(self.args.data, self.args.image_size, cache, self.log)
            dist.barrier()
            cache = os.path.join(self.out, f'data_{self.args.image_size}.pt')
        images, self.files = load_images(self.args.data, self.args.image_size, cache, self.log)
        return images

    def load_labels(self):
        """--labels for the images load_images returned -> (LongTensor (N, A), -1 = unknown; the label part of
        model_args). A resumed run keeps its checkpoint's classes, so class indices keep their meaning."""
        if self.args.resume:
            saved = self.resume_checkpoint()['model_args']
            y, _ = join_labels(self.args.labels, self.files, saved['vocab'])
            return y, {k: saved[k] for k in ('vocab', 'label_prior')}
        y, vocab = join_labels(self.args.labels, self.files)
        return y, label_model_args(y, vocab, self.args.labels)

    def resume_checkpoint(self):
        """The run's ckpt.pt, read once, on the CPU (load_state_dict moves weights and optimiser state to the
        models' device; the RNG states must stay CPU tensors)."""
        if self._resume_ckpt is None:
            self._resume_ckpt = load_checkpoint(self.ckpt_path)
        return self._resume_ckpt

    def autocast(self):
        """Mixed precision for the forward passes; losses are computed in fp32 by the scripts."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, module, compilable=True):
        """To the device, channels_last, and with --compile compiled in place (its state_dict keeps its keys,
        no `_orig_mod.`). compilable=False for a D whose gradient penalty needs a double backward, which
        torch.compile cannot do."""
        module = module.to(self.device)
        if self.args.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.args.compile and compilable:
            module.compile()
        return module

    # -- model registration and resume ------------------------------------------------------------
    def setup(self, models, optims, model_args, fixed, sample_inputs, sample_model='G', extra=None):
        """Register what a checkpoint holds; with --resume, load it all back (weights, optimisers, step,
        RNG) so the run continues exactly as if it had never stopped.

        models/optims: name -> module/optimizer (an EMA generator is one more model); fixed: the inputs of
        the progress grids; sample_model: the model that samples (e.g. 'G_ema'); extra: a dict of plain
        values a script wants saved and restored with the run (e.g. an augmentation probability)."""
        self.models, self.optims, self.model_args = models, optims, model_args
        self.fixed, self.sample_inputs, self.sample_model = fixed, sample_inputs, sample_model
        self.extra = extra if extra is not None else {}
        if self.dtype == torch.float16:
            self.scalers = {k: torch.amp.GradScaler('cuda') for k in optims}
        self.start_step = 0
        # --lr-halve-at: the learning rates the optimisers were built with, from this invocation's flags
        self.base_lr = {k: [g['lr'] for g in o.param_groups] for k, o in optims.items()}
        self.halve_at = lr_halvings(self.args.lr_halve_at)
        if self.args.resume:
            ckpt = self.resume_checkpoint()
            if ckpt['script'] != self.script:
                fail(f'{self.ckpt_path} was written by {ckpt["script"]}.py, not {self.script}.py')
            self.set_lr(ckpt['epoch'])   # the halvings the run has passed, before the saved state is compared
            for k, m in models.items():
                try:
                    m.load_state_dict(ckpt['models'][k])
                except RuntimeError:   # e.g. `--resume --ndf 128`: the flags build another architecture
                    fail(f'{self.ckpt_path}: its {k} does not fit the model these flags build; resume without '
                         f'changing the architecture flags (--ngf, --ndf, --z-dim, --sn, --r1, --upsample, ...)')
            for k, o in optims.items():
                # load_state_dict also restores the saved lr and betas; the optimisers were built from
                # this invocation's flags (the saved ones unless given again), so `--resume --lr-g 1e-4`
                # must win, e.g. to decay a learning rate by hand
                wanted = [{h: v for h, v in g.items() if h != 'params'} for g in o.param_groups]
                o.load_state_dict(ckpt['optims'][k])
                for g, w in zip(o.param_groups, wanted):
                    changed = {h: (g[h], v) for h, v in w.items() if g.get(h) != v}
                    if changed:
                        self.log(f'resume: {k} optimiser ' + ', '.join(f'{h} {a} -> {b}' for h, (a, b) in changed.items()))
                    g.update(w)
            for k, s in self.scalers.items():
                if k in ckpt.get('scalers', {}):
                    s.load_state_dict(ckpt['scalers'][k])
            self.fixed = tuple(t.to(self.device) for t in ckpt['fixed'])
            self.extra.update(ckpt.get('extra', {}))
            self.start_step = ckpt['step']
            rng = ckpt['rng']
            if len(rng) == self.world:
                torch.set_rng_state(rng[self.rank]['cpu'])
                if 'cuda' in rng[self.rank] and self.device.type == 'cuda':
                    torch.cuda.set_rng_state(rng[self.rank]['cuda'], self.device)
            else:   # a different process count cannot replay the same noise; continue with fresh noise
                torch.manual_seed(self.args.seed + 7919 * self.rank + self.start_step)
            self.log(f'resumed {self.ckpt_path} at step {self.start_step}')
            self._resume_ckpt = None   # its tensors are in the models now
        else:
            if self.world > 1:   # same init everywhere, different noise per process
                for m in models.values():
                    for t in list(m.parameters()) + list(m.buffers()):
                        dist.broadcast(t.data, 0)
                torch.manual_seed(self.args.seed + 7919 * self.rank)
        if self.main:   # the flags of this invocation (a resume may have changed --epochs, say)
            with open(os.path.join(self.out, 'args.json'), 'w') as f:
                json.dump(vars(self.args), f, indent=2)

    def set_lr(self, epoch):
        """Every learning rate = its flag's value / 2 per --lr-halve-at epoch passed by `epoch`."""
        f = 0.5 ** sum(epoch >= e for e in self.halve_at)
        for k, o in self.optims.items():
            for g, lr in zip(o.param_groups, self.base_lr[k]):
                g['lr'] = lr * f

    def checkpoint(self):
        self.sampler()   # the saved EMA generator carries its own BatchNorm statistics
        rng = {'cpu': torch.get_rng_state()}
        if self.device.type == 'cuda':
            rng['cuda'] = torch.cuda.get_rng_state(self.device)
        rngs = [rng]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        return {
            'format': CKPT_FORMAT, 'script': self.script, 'model_args': self.model_args,
            'args': vars(self.args), 'step': self.global_step, 'epoch': self.global_step / self.steps_per_epoch,
            'models': {k: m.state_dict() for k, m in self.models.items()},
            'optims': {k: o.state_dict() for k, o in self.optims.items()},
            'scalers': {k: s.state_dict() for k, s in self.scalers.items()},
            'fixed': [t.cpu() for t in self.fixed], 'sample_model': self.sample_model,
            'rng': [{k: v.cpu() for k, v in r.items()} for r in rngs], 'extra': self.extra,
            'versions': {'torch': str(torch.__version__), 'python': sys.version.split()[0]},
        }

    def save(self):
        """Write ckpt.pt (atomically), but never a checkpoint with NaN/inf weights."""
        for k, m in self.models.items():
            if not all(torch.isfinite(p).all() for p in m.parameters()):
                raise NonFiniteLoss(f'{k} has NaN/inf weights at step {self.global_step}; kept the last good '
                                    f'checkpoint {self.ckpt_path}; try --precision fp32 or a lower learning rate')
        ckpt = self.checkpoint()   # collective in DDP: every rank must get here
        if self.main:
            atomic_save(ckpt, self.ckpt_path)
        return ckpt

    # -- the optimisation helpers the loops call --------------------------------------------------
    def backward(self, loss, name):
        (self.scalers[name].scale(loss) if name in self.scalers else loss).backward()

    def step(self, name):
        """Average gradients over processes (torchrun), then take the optimiser step."""
        model, opt = self.models[name], self.optims[name]
        if self.world > 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(f.view_as(g))
        if name in self.scalers:
            self.scalers[name].step(opt)
            self.scalers[name].update()
        else:
            opt.step()

    def track(self, **scalars):
        """Record this step's scalars (tensors). They are summed on the device and read back only every
        --log-every steps: no host sync in the hot loop."""
        vals = torch.stack([torch.as_tensor(v, device=self.device).detach().float() for v in scalars.values()])
        self._names = list(scalars)
        self._acc = vals if self._acc is None else self._acc + vals
        self._n += 1

    # -- the loop -----------------------------------------------------------------------------------
    def batches(self, images, labels=None):
        """Yield (step, real batch), or (step, real batch, its labels) when labels are given, until --epochs
        are done. Between steps: progress lines and losses.csv, fixed-z grids, checkpoints, generator
        snapshots, and a clean stop on SIGTERM/Ctrl-C."""
        a = self.args
        data = ImageBatches(images, a.batch_size, a.seed, a.flip, self.device, self.rank, self.world, labels=labels)
        self.steps_per_epoch = spe = data.steps_per_epoch
        total = a.epochs * spe
        self.global_step = self.start_step
        self._acc, self._n = None, 0
        csv_path = os.path.join(self.out, 'losses.csv')
        if self.main:
            truncate_log(csv_path, self.global_step)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.log(f'{self.script}: {len(images)} images, {spe} steps/epoch, {a.epochs} epochs, batch {a.batch_size}'
                 f'{f" x{self.world} processes" if self.world > 1 else ""}, device {self.device}, '
                 f'precision {str(self.dtype or "fp32").replace("torch.", "")}, out {self.out}')
        t0, n0 = time.time(), self.global_step
        if self.global_step == 0 and self.main:
            self.grid()
        while self.global_step < total:
            x = data.get(self.global_step)
            x, y = x if labels is not None else (x, None)
            if a.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield (self.global_step, x) if y is None else (self.global_step, x, y)
            self.global_step += 1
            s = self.global_step
            if s % spe == 0 and s // spe in self.halve_at:
                self.set_lr(s // spe)
                self.log(f'epoch {s // spe}: learning rates halved (--lr-halve-at) to ' + ', '.join(
                    f'{k} {o.param_groups[0]["lr"]:g}' for k, o in self.optims.items()))
            fid_due = a.fid_every and s % (a.fid_every * spe) == 0
            if fid_due:   # scoring time is left out of the img/s and ETA of the next log line
                t_fid = time.time()
                self.score_fid()
                t0 += time.time() - t_fid
            if s % a.log_every == 0 or s == total or fid_due:
                t0, n0 = self._log_line(csv_path, total, t0, n0)
            if self.main and (s % a.grid_every == 0 or s == total):
                self.grid()
            if s % a.save_every == 0:
                self.save()
            if a.snapshot_every and s % (a.snapshot_every * spe) == 0:
                self.snapshot()
            if self._should_stop():
                self.save()
                self.plots()
                self.log(f'stopped by signal at step {s} (epoch {s / spe:.2f}); checkpoint {self.ckpt_path}; '
                         f'continue with: python {self.script}.py --out {self.out} --resume')
                sys.exit(128 + self._stop_signal)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C stops at once
        self._stop_signal = signum
        if self.main:
            print(f'\n{signal.Signals(signum).name}: saving a checkpoint after this step...', flush=True)

    def _should_stop(self):
        stop = self._stop_signal is not None
        if self.world > 1:   # every process must stop at the same step, or the next all_reduce hangs
            t = torch.tensor([self._stop_signal or 0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self._stop_signal = int(t.item()) or None
            stop = self._stop_signal is not None
        return stop

    def _log_line(self, csv_path, total, t0, n0):
        if self._acc is None:
            return t0, n0
        vals = self._acc / self._n
        if self.world > 1:
            dist.all_reduce(vals)
            vals /= self.world
        vals = vals.tolist()   # the one host sync per --log-every steps
        self._acc, self._n = None, 0
        row = dict(zip(self._names, vals))
        if not all(math.isfinite(v) for v in vals):
            raise NonFiniteLoss(f'non-finite loss at step {self.global_step} ({", ".join(f"{k}={v:.4g}" for k, v in row.items())}); '
                                f'the last good checkpoint {self.ckpt_path} is kept; try --precision fp32 or a lower learning rate')
        dt = time.time() - t0
        ips = (self.global_step - n0) * self.args.batch_size / max(dt, 1e-9)
        eta = (total - self.global_step) * self.args.batch_size / max(ips, 1e-9)
        epoch = self.global_step / self.steps_per_epoch
        if self.main:
            new = not os.path.exists(csv_path)
            with open(csv_path, 'a', newline='') as f:
                w = csv.writer(f)
                if new:
                    w.writerow(['step', 'epoch', *row, 'img_per_s'] + ['fid', 'kid'] * bool(self.args.fid_every))
                scores = [f'{self._fid:.3f}', f'{self._kid:.6f}' if self._kid is not None else ''] if self._fid is not None else ['', '']
                w.writerow([self.global_step, f'{epoch:.3f}', *(f'{v:.5f}' for v in vals), f'{ips:.1f}']
                           + scores * bool(self.args.fid_every))
            self.log(f'[{self.script}] ep {epoch:6.2f}/{self.args.epochs} step {self.global_step}/{total} | '
                     + ' '.join(f'{k} {v:.3f}' for k, v in row.items())
                     + f' | {ips:.0f} img/s | ETA {fmt_time(eta)}' + (f' | FID {self._fid:.2f}' if self._fid is not None else ''))
        self._fid = self._kid = None
        return time.time(), self.global_step

    def score_fid(self):
        """FID of --fid-n fresh samples against --fid-stats (fid.py's protocol, on the process of rank 0)."""
        if not self.main:
            return
        import fid   # only runs that ask for FID load the Inception
        if self._extractor is None:
            self._extractor = fid.Extractor('fid').to(self.device)
        t = time.time()
        batches = (fid.as_uint8(x) for x in sample_batches(self.sampler(), self.sample_inputs,
                                                            self.model_args, self.args.fid_n, self.device, self.args.seed + 2))
        feats = fid.extract(self._extractor, batches, self.args.fid_n, self.device, log=lambda m: None)
        real, mu, sigma, _ = fid.features_of(self.args.fid_stats, self._extractor, None)
        self._fid = fid.frechet_distance(*fid.statistics(feats), mu, sigma)
        # KID (fid.py's subsets and seed) where the .npz keeps features, as --save-stats writes: unlike FID it
        # has no bias from the sample count, so scores at different --fid-n compare
        self._kid = fid.kid(feats, real, seed=self.args.seed)[0] if real is not None else None
        self.log(f'FID {self._fid:.2f}' + (f' KID {self._kid * 1000:.2f}e-3' if self._kid is not None else '')
                 + f' at step {self.global_step} ({self.args.fid_n} samples vs {self.args.fid_stats}, {time.time() - t:.0f}s)')

    # -- outputs ------------------------------------------------------------------------------------
    def sampler(self):
        """The model that samples. Where that is an EMA copy (a model without an optimiser), its BatchNorm
        statistics are first recomputed under its own weights, once per step (standing_stats)."""
        G = self.models[self.sample_model]
        if self.sample_model not in self.optims and self._standing_step != self.global_step:
            standing_stats(G, self.sample_inputs, self.model_args, self.args.batch_size // self.world, seed=self.args.seed)
            self._standing_step = self.global_step
        return G

    def grid(self):
        save_grid(generate(self.sampler(), self.fixed), os.path.join(self.out, 'grids', f'step_{self.global_step:08d}.png'))

    def snapshot(self):
        name = f'epoch{round(self.global_step / self.steps_per_epoch):04d}.pt'
        full = self.checkpoint() if self.args.keep_checkpoints else None   # collective in DDP
        if self.main:
            atomic_save(generator_checkpoint(self.checkpoint_light()), os.path.join(self.out, 'snapshots', 'G_' + name))
            if full is not None:
                atomic_save(full, os.path.join(self.out, 'snapshots', 'ckpt_' + name))

    def checkpoint_light(self):
        return {'format': CKPT_FORMAT, 'script': self.script, 'model_args': self.model_args, 'args': vars(self.args),
                'step': self.global_step, 'epoch': self.global_step / self.steps_per_epoch, 'sample_model': self.sample_model,
                'models': {self.sample_model: self.sampler().state_dict()},
                'fixed': [t.cpu() for t in self.fixed], 'versions': {'torch': str(torch.__version__)}}

    def write_json(self, name, obj):
        if self.main:
            with open(os.path.join(self.out, name), 'w') as f:
                json.dump(obj, f, indent=2)

    def plots(self):
        if self.main:
            plot_losses(os.path.join(self.out, 'losses.csv'), os.path.join(self.out, 'loss_curve.png'))
            make_gif(os.path.join(self.out, 'grids'), os.path.join(self.out, 'progress.gif'))

    def finish(self):
        """After the last step: checkpoint, plots, GIF, and --n-samples PNGs in samples/ for FID."""
        self.save()
        self.plots()
        if self.main and self.args.n_samples:
            folder = os.path.join(self.out, 'samples')
            write_samples(self.sampler(), self.sample_inputs, self.model_args,
                          self.args.n_samples, folder, self.device, self.args.seed + 1)
            self.log(f'wrote {self.args.n_samples} samples to {folder}')
        if self.main and 'vocab' in self.model_args:
            attribute_grids(self.sampler(), self.sample_inputs, self.model_args, self.out,
                            self.device, self.args.seed + 1)
        self.log(f'done: {self.out} (checkpoint, grids/, progress.gif, loss_curve.png, losses.csv)')
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


def fmt_time(s):
    s = int(s)
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def truncate_log(path, step):
    """On resume, drop losses.csv rows logged after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(keep)


def make_gif(grid_dir, path, max_frames=100, crop=None):
    """The grids of grid_dir, in order, as an animated GIF of at most max_frames evenly spaced frames.
    crop=(w, h) keeps the top-left w x h pixels of each grid: a smaller GIF to commit, e.g. the first
    4 x 4 faces of an 8 x 8 grid of 64 px faces with 2 px padding is crop=(266, 266)."""
    if not os.path.isdir(grid_dir):
        return
    files = sorted(f for f in os.listdir(grid_dir) if f.endswith('.png'))
    if not files:
        return
    files = [files[round(i)] for i in np.linspace(0, len(files) - 1, min(max_frames, len(files)))]
    frames = [Image.open(os.path.join(grid_dir, f)).convert('RGB') for f in files]
    if crop:
        frames = [f.crop((0, 0, *crop)) for f in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0)


COLOURS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#17becf', '#bcbd22',
           '#000000', '#8b4513', '#ff1493', '#006400', '#4b0082', '#daa520', '#800000']  # tab10, then black, brown, pink, dark green, indigo, gold, maroon


def colour(j):
    """Colour of the j-th line: the named palette above first (results/README.md calls lines by these
    names), then hues a golden angle apart, so each new series gets a distinct colour without an edit here."""
    if j < len(COLOURS):
        return COLOURS[j]
    rgb = colorsys.hsv_to_rgb((0.05 + 0.381966 * (j - len(COLOURS))) % 1.0, 0.9, 0.7)
    return '#' + ''.join(f'{round(255 * c):02x}' for c in rgb)


def plot_curves(series, png_path, xlabel, ylabel='', size=(800, 450)):
    """Lines drawn with PIL (no matplotlib dependency): series is a list of (name, xs, ys); NaNs are
    skipped, the y range is the 1st-99th percentile of all values (so one spike does not flatten the
    rest), and the names form a legend in the top-right corner."""
    W, H, L, B, T, R = *size, 60, 40, 20, 20
    xs = np.concatenate([np.asarray(x, float) for _, x, _ in series])
    ys = np.concatenate([np.asarray(y, float) for _, _, y in series])
    x0, x1 = np.nanmin(xs), np.nanmax(xs)
    lo, hi = np.nanpercentile(ys, 1), np.nanpercentile(ys, 99)
    lo, hi = (lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    im = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(im)
    px = lambda v: L + (v - x0) / max(x1 - x0, 1e-9) * (W - L - R)
    py = lambda v: H - B - (min(max(v, lo), hi) - lo) / (hi - lo) * (H - B - T)
    d.rectangle([L, T, W - R, H - B], outline='black')
    for t in np.linspace(lo, hi, 5):
        d.text((5, py(t) - 6), f'{t:.2f}' if hi - lo < 10 else f'{t:.0f}', fill='black')
    for t in np.linspace(x0, x1, 5):
        d.text((px(t) - 15, H - B + 5), f'{t:g}' if x1 - x0 < 10 else f'{int(t)}', fill='black')
    for j, (name, x, y) in enumerate(series):
        col = colour(j)
        pts = [(px(a), py(b)) for a, b in zip(x, y) if np.isfinite(a) and np.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for a, b in (pts if len(pts) <= 60 else []):   # markers for sparse scores, not dense loss logs
            d.ellipse([a - 2, b - 2, a + 2, b + 2], fill=col)
        d.text((W - R - 8 - d.textlength(name), T + 6 + 14 * j), name, fill=col)
    d.text((W // 2 - 3 * len(xlabel), H - 14), xlabel, fill='black')
    d.text((5, 4), ylabel, fill='black')
    im.save(png_path)


def plot_losses(csv_path, png_path, size=(800, 450)):
    """The loss-curve PNG of a run: one line per logged column of its losses.csv against the step."""
    if not os.path.exists(csv_path):
        return
    with open(csv_path, newline='') as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        return
    # a run resumed with other logging flags (e.g. --fid-every turned off) writes rows of another length:
    # missing values are NaN, values beyond the header have no name and are left out
    head = rows[0]
    data = np.array([[float(v) if v else np.nan for v in (r + [''] * len(head))[:len(head)]] for r in rows[1:] if r])
    series = [(h, data[:, 0], data[:, i]) for i, h in enumerate(head)
              if h not in ('step', 'epoch', 'img_per_s', 'fid', 'kid')]
    plot_curves(series, png_path, 'step', size=size)


def plot_score_curves(csv_path, png_path, x='hours', y='fid', xlabel=None, ylabel=None, size=(800, 450)):
    """One line per run from a CSV with a `run` column (results/fid_curve.csv): column y against x."""
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    runs = list(dict.fromkeys(r['run'] for r in rows))
    series = [(run, [float(r[x]) for r in rows if r['run'] == run], [float(r[y]) for r in rows if r['run'] == run])
              for run in runs]
    plot_curves(series, png_path, xlabel or x, ylabel or y, size=size)
