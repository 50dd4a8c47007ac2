"""DCGAN: Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks", 2015. https://arxiv.org/abs/1511.06434

64x64 anime faces with the recipe of the reports this project follows: strided-conv D (BatchNorm,
LeakyReLU 0.2), conv-transpose G (BatchNorm, ReLU, tanh), z = 100, batch 64, Adam lrG 5e-4, lrD 1e-4,
betas (0.5, 0.999), fuzzy labels 0.9 / 0.1, 150 epochs. That recipe is the default; the changes that
train better on the same budget are flags, each measured in results/README.md:

    --loss hinge         hinge loss (Lim & Ye 2017; SAGAN, BigGAN) instead of cross-entropy
    --sn                 spectral normalisation of D's convolutions instead of BatchNorm (Miyato et al. 2018)
    --ema-kimg 10        sample from an exponential moving average of G's weights (Karras et al. 2018)
    --diffaug OPS        DiffAugment (Zhao et al. 2020) on every image D sees
    --upsample           G grows by nearest-neighbour resize + 3x3 conv, not transposed convs (Odena et al. 2016)
    --r1 GAMMA           R1 penalty on real images (Mescheder et al. 2018) instead of D's BatchNorm
    --linear-out         G ends in its last conv, no tanh, as StyleGAN's toRGB; samples are clamped (white blotches
                         18.5% -> 0.1% at epoch 36, FID 5 points worse so far: results/notes/blotches.md)

    python dcgan.py --data faces/ --epochs 150                 # train (run folder: runs/dcgan)
    python dcgan.py --data faces/ --recipe best                # all the flags above that the shipped DCGAN used
    python dcgan.py --recipe quick                              # ~10 minutes on the 384 bundled faces
    python dcgan.py --out runs/dcgan --resume                   # continue a stopped run exactly
    python dcgan.py --sample 64 --ckpt runs/dcgan/ckpt.pt       # only generate
    torchrun --nproc_per_node 2 dcgan.py --data faces/          # data-parallel over 2 processes/GPUs
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import recipes
import sampling
import training


# --recipe best: what trains the shipped generator (results/README.md has each change with its measured effect)
BEST = dict(lr_g=2e-4, lr_d=2e-4, ema_kimg=10.0, diffaug='color,translation,cutout', fake_label=0.0,
            lr_halve_at='28,44,60', upsample=True, r1=0.1, epochs=80)
# --recipe quick: the best faces from a few hundred images in ~10 minutes on 2 CPU cores (the README's first run). BEST
# needs thousands of steps: its halvings, R1 and resize-conv G leave 900 steps blurry (results/notes/quick-start.md)
QUICK = dict(lr_g=2e-4, lr_d=2e-4, ema_kimg=10.0, diffaug='color,translation,cutout')


def get_args(argv=None):
    p = common.base_parser('dcgan', __doc__, epochs=150, batch_size=64)
    p.add_argument('--z-dim', type=int, default=100, help='latent size (default: %(default)s)')
    p.add_argument('--ngf', type=int, default=64, help='G width: channels of its last hidden layer (default: %(default)s)')
    p.add_argument('--ndf', type=int, default=64, help='D width: channels of its first layer (default: %(default)s)')
    common.add_adam_args(p, lr_g=5e-4, lr_d=1e-4, beta1=0.5, beta2=0.999)
    p.add_argument('--real-label', type=float, default=0.9, help='fuzzy target for real images (default: %(default)s)')
    p.add_argument('--fake-label', type=float, default=0.1, help='fuzzy target for fakes in the D loss (default: %(default)s)')
    p.add_argument('--loss', choices=['bce', 'hinge'], default='bce',
                   help='bce = cross-entropy with the fuzzy labels above; hinge ignores them (default: %(default)s)')
    p.add_argument('--sn', action='store_true', help='spectral normalisation in D, in place of its BatchNorm')
    p.add_argument('--upsample', action='store_true', help='G grows by nearest-neighbour upsampling + 3x3 conv, not transposed convs')
    p.add_argument('--linear-out', action='store_true',
                   help="no tanh after G's last conv: a pixel pushed past white still gets D's gradient "
                        '(results/notes/blotches.md); images are clamped to [-1, 1] only when sampled')
    common.add_r1_args(p)
    recipes.add_ema_diffaug_args(p, ema_kimg=0.0)
    common.add_recipe_arg(p, BEST, 'results/dcgan_G.pt, FID 37.6 on 10,000 samples; halvings at fixed epochs, '
                          'measured over an 80-epoch run',
                          more={'quick': (QUICK, 'the best faces from the 384 bundled faces in 150 epochs, ~10 minutes')})
    return common.parse_args(p, argv)


# ----------------------------------------------------------------------------------------------------
# Model

class Generator(nn.Module):
    def __init__(self, z_dim=100, ngf=64, nc=3, upsample=False, linear_out=False):
        super().__init__()
        self.z_dim = z_dim
        # upsample: each 2x step is nearest-neighbour resize + 3x3 conv instead of a stride-2 transposed conv,
        # which builds odd and even output pixels from different taps of its kernel: unequal taps print a
        # checkerboard that training must cancel (Odena et al. 2016, https://distill.pub/2016/deconv-checkerboard/)
        up = ((lambda cin, cout, bias: [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)]) if upsample
              else (lambda cin, cout, bias: [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)]))
        block = lambda cin, cout: [*up(cin, cout, False), nn.BatchNorm2d(cout), nn.ReLU(True)]
        self.net = nn.Sequential(
            nn.ConvTranspose2d(z_dim, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            *block(ngf * 8, ngf * 4),                           # (ngf*8) x 4 x 4 -> (ngf*4) x 8 x 8
            *block(ngf * 4, ngf * 2),                           # -> (ngf*2) x 16 x 16
            *block(ngf * 2, ngf),                               # -> ngf x 32 x 32
            *up(ngf, nc, True),                                 # -> nc x 64 x 64
            # tanh squashes to [-1, 1], but a pixel driven far past white sits where its slope is ~0 and no
            # gradient can bring it back: the white blotches (results/notes/blotches.md). linear_out: D sees
            # the raw values (the data never leaves [-1, 1]: overshoot is D's to punish) and sampling clamps
            *([] if linear_out else [nn.Tanh()]),               # -> in [-1, 1]
        )

    def forward(self, z):                                       # z: (B, z_dim)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, ndf=64, nc=3, sn=False, bn=True):
        super().__init__()
        # sn: every conv divided by its largest singular value (one power iteration per forward), which
        # bounds D's Lipschitz constant; it replaces BatchNorm, so D scores each image on its own.
        # bn=False (--r1): no BatchNorm either; a penalty on D's input gradient keeps it smooth instead
        conv = lambda *a, **k: nn.utils.parametrizations.spectral_norm(nn.Conv2d(*a, **k)) if sn else nn.Conv2d(*a, **k)
        bn = bn and not sn
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        block = lambda cin, cout: [conv(cin, cout, 4, 2, 1, bias=not bn), norm(cout), nn.LeakyReLU(0.2, True)]
        self.net = nn.Sequential(
            conv(nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True),        # nc x 64 x 64 -> ndf x 32 x 32 (no BN on the input layer)
            *block(ndf, ndf * 2),                                   # -> (ndf*2) x 16 x 16
            *block(ndf * 2, ndf * 4),                               # -> (ndf*4) x 8 x 8
            *block(ndf * 4, ndf * 8),                               # -> (ndf*8) x 4 x 4
            conv(ndf * 8, 1, 4, 1, 0),                              # -> 1 x 1 x 1
        )

    def forward(self, x):
        return self.net(x).flatten()   # logits: the sigmoid lives inside the loss, where it is stable


def init_weights(m):
    """DCGAN paper: all weights from N(0, 0.02); BatchNorm scale from N(1, 0.02). Spectrally normalised
    convs keep PyTorch's init: their scale is set by the normalisation, and their power-iteration vectors
    were computed for it."""
    if nn.utils.parametrize.is_parametrized(m):
        return
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def sample_inputs(model_args, n, device, generator=None):
    """What G(*inputs) needs for n images: here only z ~ N(0, I)."""
    return (torch.randn(n, model_args['z_dim'], device=device, generator=generator),)


# ----------------------------------------------------------------------------------------------------
# Losses: binary cross-entropy on logits with fuzzy targets (the reports), or hinge (--loss hinge)

def d_loss(real_logits, fake_logits, real_label, fake_label):
    """maximize log D(x) + log(1 - D(G(z))), targets softened to real_label / fake_label."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.full_like(fake_logits, fake_label)))


def g_loss(fake_logits, real_label):
    """Non-saturating G loss: maximize log D(G(z)) rather than minimize log(1 - D(G(z)))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.full_like(fake_logits, real_label))


def d_hinge_loss(real_logits, fake_logits):
    """D is only pushed while a real scores below 1 or a fake above -1: no reward for being surer."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_hinge_loss(fake_logits):
    return -fake_logits.mean()


def d_r1_loss(real_logits, real):
    """R1: E ||grad_x D(x)||^2 on real images (x must require grad). Zero at the equilibrium whatever G does,
    it stops D from growing steep slopes around the data, which is what makes GAN training oscillate."""
    grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------------
# Training

def train(args):
    run = training.Run(args, 'dcgan')
    images = run.load_images()
    model_args = dict(z_dim=args.z_dim, ngf=args.ngf, upsample=args.upsample)
    if args.linear_out:   # only when set: a run from before the flag resumes with the model_args it was saved with
        model_args['linear_out'] = True
    G = run.prepare(Generator(**model_args))
    D = run.prepare(Discriminator(args.ndf, sn=args.sn, bn=not args.r1), compilable=not args.r1)   # R1: double backward
    G.apply(init_weights)
    D.apply(init_weights)
    # a second copy of G whose weights trail G's: it samples, G trains
    G_ema = recipes.ema_copy(G, run.prepare(Generator(**model_args))) if args.ema_kimg else None
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=betas, foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=betas, foreach=True)
    run.setup(G, D, opt_g, opt_d, model_args, sample_inputs, images, G_ema=G_ema)
    ema_beta = recipes.ema_beta(args.batch_size, args.ema_kimg)
    aug = lambda x: recipes.diff_augment(x, args.diffaug)   # identity without --diffaug
    hinge = args.loss == 'hinge'

    r1 = torch.zeros((), device=run.device)   # logged between R1 steps as its last value

    B = args.batch_size // run.world
    for step, real in run.batches():
        z = torch.randn(B, args.z_dim, device=run.device)
        r1_step = args.r1 > 0 and step % args.r1_every == 0

        # (1) update D: maximize log D(x) + log(1 - D(G(z)))  (hinge: min relu(1 - D(x)) + relu(1 + D(G(z))))
        with run.autocast():
            fake = G(z)
        # an R1 step's real pass runs in fp32 (a gradient of a gradient, where bf16 rounding would dominate); other
        # steps keep both D passes in one autocast block, which shares one bf16 cast of D's weights between them
        if r1_step:
            real = real.detach().requires_grad_(True)
            real_logits = D(aug(real)).float()
        with run.autocast():
            if not r1_step:
                real_logits = D(aug(real)).float()
            fake_logits = D(aug(fake.detach())).float()
        loss_d = (d_hinge_loss(real_logits, fake_logits) if hinge
                  else d_loss(real_logits, fake_logits, args.real_label, args.fake_label))
        if r1_step:
            r1 = d_r1_loss(real_logits, real)
            loss_d = loss_d + args.r1 / 2 * r1 * args.r1_every   # x r1_every: applied once per r1_every steps
        opt_d.zero_grad(set_to_none=True)
        run.backward(loss_d, 'D')
        run.step('D')

        # (2) update G: maximize log D(G(z))  (hinge: D(G(z))), through the D just updated
        D.requires_grad_(False)   # D's weight gradients are not needed here: skip computing them
        with run.autocast():
            gen_logits = D(aug(fake)).float()
        loss_g = g_hinge_loss(gen_logits) if hinge else g_loss(gen_logits, args.real_label)
        opt_g.zero_grad(set_to_none=True)
        run.backward(loss_g, 'G')
        run.step('G')
        D.requires_grad_(True)
        if G_ema is not None:
            recipes.accumulate(G_ema, G, ema_beta)

        run.track(loss_d=loss_d, loss_g=loss_g, **({'r1': r1} if args.r1 else {}),
                  d_real=torch.sigmoid(real_logits).mean(), d_fake=torch.sigmoid(fake_logits).mean())
    run.finish()


def main(argv=None):
    args = get_args(argv)
    if args.sample or args.export:
        return sampling.sample_main(args, sample_inputs)
    train(args)


if __name__ == '__main__':
    common.main_guard(main)
