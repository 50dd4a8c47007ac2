"""The recipe helpers several model scripts share: DiffAugment, the EMA generator with its own BatchNorm
statistics, and a conditional G started from an unconditional one. Each is one call in a script:
`x = recipes.diff_augment(x, args.diffaug)` on every image D sees, `recipes.accumulate(G_ema, G, beta)` after
every G step, `recipes.init_from_unconditional(G, ...)` once, before training."""
import argparse
import os

import torch
import torch.nn.functional as F

from common import HERE, fail, load_checkpoint
from sampling import sample_rng


# ----------------------------------------------------------------------------------------------------
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
# A conditional G started from an unconditional one (--init-g): the conditional scripts' G with
# --cond-bn is dcgan.py's G layer for layer, with the labels only in its BatchNorms' scales and shifts

def cond_bn_from_unconditional(G, sd, cond_bn_type):
    """The weights of G (with cond_bn_type norms) that draw what a dcgan.py G with weights sd draws, whatever
    the labels: the convolutions as they are, each BatchNorm's running statistics in its conditional norm, and
    its scale and shift given to every class of the first attribute (the other attributes' tables, summed
    into the same scale and shift, start at 0)."""
    sd, out = dict(sd), {}
    for name, m in G.named_modules():
        if isinstance(m, cond_bn_type):
            for k in ('running_mean', 'running_var', 'num_batches_tracked'):
                out[f'{name}.bn.{k}'] = sd.pop(f'{name}.{k}')
            scale, shift = sd.pop(f'{name}.weight'), sd.pop(f'{name}.bias')
            for i, (gain, bias) in enumerate(zip(m.gain, m.bias)):   # gain: the scale minus 1
                out[f'{name}.gain.{i}.weight'] = ((scale - 1) * (i == 0)).expand_as(gain.weight).clone()
                out[f'{name}.bias.{i}.weight'] = (shift * (i == 0)).expand_as(bias.weight).clone()
    return {**out, **sd}


def load_unconditional(path, model_args):
    """The dcgan.py weights --init-g PATH names, as fp32 state dicts: a generator file (results/dcgan_G.pt) gives
    G (and its EMA) from its sampling weights; a run's ckpt.pt gives its G, its EMA and its D."""
    if not model_args.get('cond_bn'):
        fail(f'--init-g {path} needs --cond-bn: only then is G dcgan.py\'s G with the labels in its BatchNorms')
    if not os.path.isfile(path) and os.path.isfile(os.path.join(HERE, path)):
        path = os.path.join(HERE, path)   # results/dcgan_G.pt of --recipe best, from any folder
    ckpt = load_checkpoint(path)
    theirs = {k: ckpt['model_args'].get(k) or False for k in ('z_dim', 'ngf', 'upsample')}
    ours = {k: model_args.get(k) or False for k in theirs}
    if ckpt['script'] != 'dcgan' or theirs != ours:
        fail(f'--init-g {path}: a {ckpt["script"]}.py generator with {theirs}, not a dcgan.py one with {ours}; '
             'pass one trained with the same --z-dim, --ngf and --upsample')
    models = {k: {n: v.float() if v.is_floating_point() else v for n, v in sd.items()} for k, sd in ckpt['models'].items()}
    sample = models[ckpt['sample_model']]
    return {'G': models.get('G', sample), 'G_ema': sample, 'D': models.get('D'), 'epoch': ckpt['epoch']}


def d_from_unconditional(D, sd, path):
    """D's weights with the layers it shares with a dcgan.py D (the convolutions in order, the real/fake one last)
    taken from sd: the class heads keep theirs and the projection's class embeddings start at 0, so that
    D(x, y) scores every face as the DCGAN's D did, whatever y."""
    own = D.state_dict()
    shared = [k for k in own if not k.startswith(('cls.', 'embed.'))]
    if [own[k].shape for k in shared] != [v.shape for v in sd.values()]:
        fail(f'--init-g {path}: its D does not fit this one; pass the --ndf and --r1 that run was trained with')
    own.update(zip(shared, sd.values()))
    own.update({k: torch.zeros_like(v) for k, v in own.items() if k.startswith('embed.')})
    return own


def init_from_unconditional(G, path, model_args, cond_bn_type, G_ema=None, D=None):
    """--init-g PATH: G and G_ema from a dcgan.py generator file or run checkpoint of the same shape; from a run's
    ckpt.pt also D, so that D starts as old as G. Returns a line for the log saying what was loaded."""
    w = load_unconditional(path, model_args)
    G.load_state_dict(cond_bn_from_unconditional(G, w['G'], cond_bn_type))
    if G_ema is not None:
        G_ema.load_state_dict(cond_bn_from_unconditional(G_ema, w['G_ema'], cond_bn_type))
    loaded = ['G'] + ['G_ema'] * (G_ema is not None)
    if D is not None and w['D'] is not None:
        D.load_state_dict(d_from_unconditional(D, w['D'], path))
        loaded.append('D')
    what = ', '.join(loaded[:-1]) + ' and ' + loaded[-1] if len(loaded) > 1 else 'G'
    return f'--init-g: {what} from {path} (dcgan.py, epoch {w["epoch"]:.2f})'


def finetune_param_groups(G, cond_bn_type, lr, copied_lr_scale):
    """G's parameters for its optimiser after --init-g: the labels' tables (new) at lr, the layers copied from
    the DCGAN at lr * copied_lr_scale, so that the labels are learnt fast while the faces move slowly."""
    new = [p for m in G.modules() if isinstance(m, cond_bn_type) for p in m.parameters()]
    copied = [p for p in G.parameters() if all(p is not q for q in new)]
    return [{'params': new, 'lr': lr}, {'params': copied, 'lr': lr * copied_lr_scale}]


def add_init_g_args(parser):
    """--init-g and --init-g-lr, for the conditional scripts with --cond-bn."""
    parser.add_argument('--init-g', metavar='PATH', default=None, help='start G and its EMA from a dcgan.py generator '
                        'file (results/dcgan_G.pt) or run checkpoint (RUN/ckpt.pt: D too, its heads new and its '
                        'projection at 0) of the same --z-dim, --ngf and --upsample; needs --cond-bn: every '
                        'class starts with the DCGAN\'s BatchNorm scales and shifts, so G draws that generator\'s faces '
                        'whatever the labels, and training teaches it the labels (default: none, G from scratch)')
    parser.add_argument('--init-g-lr', type=float, default=1.0, metavar='SCALE', help='with --init-g: the learning '
                        'rate of the layers copied from the DCGAN, as a fraction of --lr-g; the labels\' tables, new, '
                        'learn at --lr-g (default: %(default)s)')


def diffaug_ops(text):
    """An argparse type for --diffaug: a comma list of AUGMENTS names (or '' for none)."""
    bad = set(filter(None, text.split(','))) - set(AUGMENTS)
    if bad:
        raise argparse.ArgumentTypeError(f'unknown {",".join(sorted(bad))}; choose from {",".join(AUGMENTS)}')
    return text


def add_ema_diffaug_args(parser, ema_kimg):
    """--ema-kimg and --diffaug, for the scripts that offer an EMA generator and DiffAugment."""
    parser.add_argument('--ema-kimg', type=float, default=ema_kimg,
                        help='half-life of the EMA generator, in thousands of images; it samples, makes the grids '
                        'and is scored; 0 = no EMA (default: %(default)s)')
    parser.add_argument('--diffaug', type=diffaug_ops, default='', metavar='OPS',
                        help=f'DiffAugment on every image D sees, a comma list of {",".join(AUGMENTS)} (default: off)')
