"""Sampling: a generator rebuilt from a checkpoint file alone, samples drawn in bounded memory from their own
random stream, image grids and GIFs, and the --sample / --export modes every script shares.

A model script exposes `Generator(**model_args)` and `sample_inputs(model_args, n, device, generator)`, which
is all that `--sample`, fid.py and the tests need to rebuild and sample a generator from its checkpoint.
"""
import hashlib
import importlib
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import HERE, atomic_save, fail, load_checkpoint, pick_device
from dataset import parse_attrs


def generator_checkpoint(ckpt, half=False, with_d=False):
    """The part of a training checkpoint needed to sample: small enough to share (fp16 with half=True). with_d
    keeps the trained G and D beside it (not the optimisers): what a fine-tune from this run starts from."""
    name = ckpt['sample_model']
    names = [name] + [k for k in ('G', 'D') if with_d and k != name and k in ckpt['models']]
    models = {n: {k: (v.half() if half and v.is_floating_point() else v) for k, v in ckpt['models'][n].items()}
              for n in names}
    keep = ('format', 'script', 'model_args', 'args', 'step', 'epoch', 'fixed', 'versions')
    return {**{k: ckpt[k] for k in keep}, 'models': models, 'sample_model': name}


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
        export = generator_checkpoint(ckpt, half=True, with_d=args.export_d)
        atomic_save(export, args.export)
        print(f'wrote {args.export} ({os.path.getsize(args.export) / 2**20:.1f} MiB: fp16 {", ".join(export["models"])} of step '
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
        fail(f'--attr: {path} is an unconditional {ckpt["script"]}.py model; --attr needs a model trained with --labels')
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

