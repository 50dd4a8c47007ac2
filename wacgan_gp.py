"""WACGAN-GP: the ACGAN of acgan.py trained as a Wasserstein GAN with gradient penalty.

Gulrajani et al., "Improved Training of Wasserstein GANs", 2017 (https://arxiv.org/abs/1704.00028), with
the auxiliary classifier of Odena et al., 2017 (https://arxiv.org/abs/1610.09585). The critic has no
sigmoid and no BatchNorm (the penalty is per sample, and BatchNorm would couple the samples of a batch);
it gives an unbounded score plus one classifier head per attribute. The critic takes --n-critic steps
per G step; its loss is E[D(fake)] - E[D(real)] + lambda * E[(||grad D(x_hat)||_2 - 1)^2] on points x_hat
drawn uniformly between pairs of real and fake faces (one mixing coefficient per sample), with lambda = 10
and Adam 1e-4, betas (0.5, 0.9) as in the paper. Flags as in acgan.py, each measured in results/notes/conditional.md:

    --ema-kimg 10             sample from an exponential moving average of G's weights, updated at each G step
    --diffaug translation,cutout   DiffAugment on every image the critic sees, the penalty's interpolates made
                              between augmented faces; leave out `color`: the heads must tell colours apart
    --upsample                G grows by nearest-neighbour resize + 3x3 conv, not transposed convs (Odena et al. 2016)
    --projection              the critic's score also rates the pair (image, labels): + <embed(y), features(x)>
                              (Miyato & Koyama 2018); with --cls-weight 0 there is no classifier at all
    --cond-bn                 labels into G through its BatchNorms' scale and shift (de Vries et al. 2017), not as
                              one-hot inputs, which give G a label-made 4 x 4 pattern z cannot move (measured
                              so far: ahead at epochs 8 and 10, not yet past the critic's swings)
    --init-g results/dcgan_G.pt   with --cond-bn, G starts as the shipped DCGAN for every label (its BatchNorm
                              scales and shifts copied to every class), the critic from scratch (measured: even with
                              the copied layers frozen, --init-g-lr 0, and the class loss at 1, FID goes 42 -> 53.5
                              by epoch 6 with eyes at 40%: results/notes/conditional.md)
    --init-g RUN/ckpt.pt      the same from a dcgan.py run's checkpoint, with its D: the critic starts as that
                              D (new class heads, projection at 0), as old as G (measured from its epoch 32:
                              62.9 one epoch on against the DCGAN's 58.0, 80.4 at two as the labels start)

    python wacgan_gp.py --data faces/ --labels labels.csv --epochs 50
    python wacgan_gp.py --data faces/ --labels labels.csv --recipe best   # the flags of the shipped WACGAN-GP
    python wacgan_gp.py --out runs/wacgan_gp --resume
    python wacgan_gp.py --sample 64 --ckpt runs/wacgan_gp/ckpt.pt --attr hair=blonde --attr eyes=blue

An epoch is one pass of real faces through the critic, so G takes 1 / --n-critic steps per batch. The run
writes attr_<name>.png and control.json as acgan.py does.
"""
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import recipes
import sampling
import training
import dataset


# --recipe best: what trains the shipped generator (results/notes/conditional.md has each change with its measured effect)
BEST = dict(upsample=True, n_critic=1, lr_g=2e-4, lr_d=2e-4, ema_kimg=10.0, diffaug='translation,cutout',
            lr_halve_at='8,28,50', epochs=58)


def get_args(argv=None):
    p = common.base_parser('wacgan_gp', __doc__, epochs=50, batch_size=64)
    common.add_conditional_args(p)
    p.add_argument('--z-dim', type=int, default=100, help='latent size (default: %(default)s)')
    p.add_argument('--ngf', type=int, default=64, help='G width: channels of its last hidden layer (default: %(default)s)')
    p.add_argument('--ndf', type=int, default=64, help='critic width: channels of its first layer (default: %(default)s)')
    common.add_adam_args(p, lr_g=1e-4, lr_d=1e-4, beta1=0.5, beta2=0.9)
    p.add_argument('--n-critic', type=int, default=5, help='critic steps per G step (default: %(default)s)')
    p.add_argument('--gp-weight', type=float, default=10.0, help='lambda of the gradient penalty (default: %(default)s)')
    p.add_argument('--gp-precision', choices=('same', 'fp32'), default='same',
                   help='same: the penalty\'s critic pass and double backward under --precision (bf16 on a bf16 CPU: '
                   'the script 2.8x its textbook loop, against 1.6x with fp32, and no FID cost in a two-seed parity '
                   'run, results/speed.md); fp32: always in fp32 (default: %(default)s)')
    p.add_argument('--upsample', action='store_true', help='G grows by nearest-neighbour upsampling + 3x3 conv, not transposed convs')
    p.add_argument('--projection', action='store_true', help='projection critic (Miyato & Koyama 2018): its score gains '
                   'a term <embed(y), sum-pooled features(x)> per attribute, so it rates whether the face fits its labels; '
                   'the penalty\'s interpolates take the real faces\' labels; add --cls-weight 0 to drop the classifier '
                   'loss (default: off, as the paper)')
    p.add_argument('--cond-bn', action='store_true', help='labels into G as the scale and shift of its BatchNorms '
                   '(conditional BatchNorm), not as one-hot inputs beside z (default: off, as the paper)')
    recipes.add_init_g_args(p)
    recipes.add_ema_diffaug_args(p, ema_kimg=0.0)
    common.add_recipe_arg(p, BEST, 'results/wacgan_gp_G.pt, FID 73.3 on 10,000 samples, the epoch-58 snapshot of a '
                          'run halved at epochs 8, 28 and 50')
    args = common.parse_args(p, argv)
    if args.n_critic < 1:
        p.error(f'--n-critic must be >= 1, got {args.n_critic}')
    return args


# ----------------------------------------------------------------------------------------------------
# Model

class CondBatchNorm2d(nn.Module):
    """BatchNorm whose per-channel scale and shift come from the labels (de Vries et al. 2017; the G of SNGAN's
    projection cGAN and of BigGAN): one embedding table per attribute, summed. With a single class it is
    BatchNorm with its own scale and shift, so G is dcgan.py's G exactly."""

    def __init__(self, c, n_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, affine=False)
        self.gain = nn.ModuleList(nn.Embedding(n, c) for n in n_classes)   # scale = 1 + sum of these
        self.bias = nn.ModuleList(nn.Embedding(n, c) for n in n_classes)

    def forward(self, x, y):
        h = self.bn(x)
        gain = 1 + sum(e(y[:, i]) for i, e in enumerate(self.gain))
        bias = sum(e(y[:, i]) for i, e in enumerate(self.bias))
        return h * gain[:, :, None, None].to(h.dtype) + bias[:, :, None, None].to(h.dtype)


class Generator(nn.Module):
    """DCGAN generator whose input is z concatenated with the one-hot class of every attribute (the paper),
    or with cond_bn (--cond-bn) z alone, the labels setting the scale and shift of every BatchNorm.

    vocab: attribute -> class names (from the labels CSV); label_prior: the data's label combinations and
    their counts, unused by the network but kept with its arguments so sampling needs no CSV."""

    def __init__(self, z_dim=100, ngf=64, vocab=None, label_prior=None, nc=3, upsample=False, cond_bn=False):
        super().__init__()
        self.z_dim, self.n_classes, self.cond_bn = z_dim, [len(v) for v in vocab.values()], cond_bn
        # upsample: each 2x step is nearest-neighbour resize + 3x3 conv instead of a stride-2 transposed conv,
        # whose odd and even output pixels come from different kernel taps (a checkerboard training must cancel)
        up = ((lambda cin, cout, bias: [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)]) if upsample
              else (lambda cin, cout, bias: [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)]))
        norm = (lambda c: CondBatchNorm2d(c, self.n_classes)) if cond_bn else nn.BatchNorm2d
        block = lambda cin, cout: [*up(cin, cout, False), norm(cout), nn.ReLU(True)]
        # one-hot inputs to the first transposed conv give every label (and, even for labels G ignores, their
        # average) a learned 4 x 4 pattern that z does not move: in acgan.py, 30-40 FID points behind dcgan.py at
        # epochs 12-16 with a single constant label (results/notes/conditional.md). BatchNorm shifts are per channel.
        n_in = z_dim if cond_bn else z_dim + sum(self.n_classes)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(n_in, ngf * 8, 4, 1, 0, bias=False), norm(ngf * 8), nn.ReLU(True),
            *block(ngf * 8, ngf * 4),                           # (ngf*8) x 4 x 4 -> (ngf*4) x 8 x 8
            *block(ngf * 4, ngf * 2),                           # -> (ngf*2) x 16 x 16
            *block(ngf * 2, ngf),                               # -> ngf x 32 x 32
            *up(ngf, nc, True), nn.Tanh(),                      # -> nc x 64 x 64, in [-1, 1]
        )

    def forward(self, z, y):                                    # z: (B, z_dim), y: (B, attributes) class indices
        if not self.cond_bn:
            onehot = [F.one_hot(y[:, i], n).to(z.dtype) for i, n in enumerate(self.n_classes)]
            return self.net(torch.cat([z, *onehot], 1)[:, :, None, None])
        h = z[:, :, None, None]
        for m in self.net:                                      # the labels enter at every BatchNorm
            h = m(h, y) if isinstance(m, CondBatchNorm2d) else m(h)
        return h


class Critic(nn.Module):
    """Strided-conv critic without normalisation: a Wasserstein score (no sigmoid) and, per attribute,
    class logits. projection=True: the score adds, per attribute, the inner product of a learned class
    embedding with the sum-pooled features, so it rates "a real face with these labels" (Miyato & Koyama 2018)."""

    def __init__(self, ndf=64, n_classes=(2,), nc=3, projection=False):
        super().__init__()
        self.n_classes = list(n_classes)
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(
            *block(nc, ndf),                                        # nc x 64 x 64 -> ndf x 32 x 32
            *block(ndf, ndf * 2),                                   # -> (ndf*2) x 16 x 16
            *block(ndf * 2, ndf * 4),                               # -> (ndf*4) x 8 x 8
            *block(ndf * 4, ndf * 8),                               # -> (ndf*8) x 4 x 4
        )
        self.score = nn.Conv2d(ndf * 8, 1, 4, 1, 0)                 # -> 1 x 1 x 1: the critic's value
        self.cls = nn.Conv2d(ndf * 8, sum(self.n_classes), 4, 1, 0)  # -> all attributes' class logits
        self.embed = nn.ModuleList(nn.Embedding(n, ndf * 8) for n in self.n_classes) if projection else None

    def forward(self, x, y=None):                               # y: (B, attributes) class indices, -1 unknown
        h = self.features(x)
        score = self.score(h).flatten()
        if self.embed is not None:
            phi = h.sum((2, 3))                                 # (B, ndf*8): features summed over the 4 x 4 grid
            for i, embed in enumerate(self.embed):              # an unknown label adds nothing
                score = score + (embed(y[:, i].clamp(min=0)) * phi).sum(1) * (y[:, i] >= 0)
        return score, self.cls(h).flatten(1).split(self.n_classes, dim=1)


def critic_real_fake(D, real, fake, y_real=None, y_fake=None):
    """The critic's scores and class logits of real and fake faces from one pass over both batches: without
    BatchNorm each face's output depends on that face alone, so this is two passes' numbers, at the cost of
    one (one cast of the weights, larger matrix products). -> real_score, fake_score, real_cls, fake_cls."""
    score, cls = D(torch.cat([real, fake]), None if y_real is None else torch.cat([y_real, y_fake]))
    B = len(real)
    return score[:B], score[B:], [c[:B] for c in cls], [c[B:] for c in cls]


def init_weights(m):
    """N(0, 0.02) convolutions and projection embeddings as in DCGAN; BatchNorm (in G only) scale from N(1, 0.02),
    and so the conditional BatchNorm's (1 + an embedding from N(0, 0.02), shifts from 0)."""
    if isinstance(m, CondBatchNorm2d):   # after its embeddings (apply visits children first)
        for e in m.bias:
            nn.init.zeros_(e.weight)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d) and m.affine:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def sample_inputs(model_args, n, device, generator=None, attrs=None):
    """What G(*inputs) needs for n images: z ~ N(0, I) and labels drawn from the data's label
    distribution; attrs ({'hair': 'blonde'}) fixes some attributes, the rest follow the data given them."""
    z = torch.randn(n, model_args['z_dim'], device=device, generator=generator)
    return z, dataset.draw_labels(model_args, n, device, generator, attrs)


# ----------------------------------------------------------------------------------------------------
# Losses

def critic_loss(real_score, fake_score):
    """The critic maximises E[D(real)] - E[D(fake)], an estimate of the Wasserstein-1 distance."""
    return fake_score.mean() - real_score.mean()


def g_wgan_loss(fake_score):
    """G raises the critic's score of its fakes."""
    return -fake_score.mean()


def interpolates(real, fake):
    """Points drawn uniformly on the segments between real and fake faces: one coefficient per sample,
    alpha of shape (B, 1, 1, 1), broadcast over channels and pixels."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    return alpha * real + (1 - alpha) * fake


def gradient_penalty(critic, x, autocast=None):
    """E[(||grad_x D(x)||_2 - 1)^2], the norm taken over each sample's whole gradient (C*H*W values,
    not per channel); create_graph so the penalty itself can be differentiated. The critic pass runs in
    fp32 unless an autocast context is given; the gradient and the norm are fp32 either way."""
    x = x.detach().float().requires_grad_(True)
    with autocast or nullcontext():
        score = critic(x)[0]
    grad, = torch.autograd.grad(score.float().sum(), x, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def cls_loss(logits, y):
    """Sum over attributes of the mean cross-entropy of the class logits; unknown labels (-1) are left out
    (and a batch with none known for an attribute adds 0, not NaN)."""
    loss = 0.0
    for i, lg in enumerate(logits):
        known = y[:, i] >= 0
        ce = F.cross_entropy(lg.float(), y[:, i].clamp(min=0), reduction='none')
        loss = loss + (ce * known).sum() / known.sum().clamp(min=1)
    return loss


def accuracy(logits, y):
    """Mean over attributes of the share of known labels that the heads' argmax gets right."""
    acc = [((lg.argmax(1) == y[:, i]) & (y[:, i] >= 0)).sum() / (y[:, i] >= 0).sum().clamp(min=1)
           for i, lg in enumerate(logits)]
    return torch.stack(acc).float().mean()


@torch.no_grad()
def control_accuracy(G, D, model_args, n, device, seed):
    """Per attribute, how often the critic's classifier head reads a generated face as the class asked for."""
    hits = torch.zeros(len(model_args['vocab']))
    for x, (_, y) in sampling.sample_batches(G, sample_inputs, model_args, n, device, seed, with_inputs=True):
        _, logits = D(x.to(device), y.to(device))   # y: a projection D's logit needs it (the heads do not)
        hits += torch.stack([(lg.argmax(1).cpu() == y[:, i]).sum() for i, lg in enumerate(logits)]).float()
    return {a: round(h.item() / n, 4) for a, h in zip(model_args['vocab'], hits)}


# ----------------------------------------------------------------------------------------------------
# Training

def train(args):
    run = training.Run(args, 'wacgan_gp')
    images = run.load_images()
    labels, label_args = run.load_labels()
    model_args = dict(z_dim=args.z_dim, ngf=args.ngf, upsample=args.upsample, **label_args,
                      **({'cond_bn': True} if args.cond_bn else {}))   # only when set: older runs resume as saved
    G = run.prepare(Generator(**model_args))
    D = run.prepare(Critic(args.ndf, G.n_classes, projection=args.projection), compilable=False)   # GP: double backward
    G.apply(init_weights)
    D.apply(init_weights)
    # a second copy of G whose weights trail G's: it samples, G trains
    G_ema = recipes.ema_copy(G, run.prepare(Generator(**model_args))) if args.ema_kimg else None
    if args.init_g and not run.resumed:   # a resumed run loads its own weights: the source may be gone
        run.log(recipes.init_from_unconditional(G, args.init_g, model_args, CondBatchNorm2d, G_ema, D))
    g_params = (recipes.finetune_param_groups(G, CondBatchNorm2d, args.lr_g, args.init_g_lr) if args.init_g
                else G.parameters())
    opt_g = torch.optim.Adam(g_params, lr=args.lr_g, betas=(args.beta1, args.beta2), foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), foreach=True)
    run.setup(G, D, opt_g, opt_d, model_args, sample_inputs, images, labels, G_ema=G_ema)
    ema_beta = recipes.ema_beta(args.batch_size, args.ema_kimg)   # per G step: the half-life counts G's images
    aug = lambda x: recipes.diff_augment(x, args.diffaug)   # identity without --diffaug; the labels stay

    B = args.batch_size // run.world
    loss_g = acc_gen = torch.zeros((), device=run.device)   # reported between G steps
    for step, real, y_real in run.batches():
        z, y_fake = sample_inputs(model_args, B, run.device)

        # (1) update the critic: maximize D(real) - D(fake) under the gradient penalty, and classify
        with run.autocast():
            real, fake = aug(real), aug(G(z, y_fake).detach())   # the critic only ever sees augmented faces
            real_score, fake_score, real_cls, fake_cls = critic_real_fake(D, real, fake, y_real, y_fake)
        # the interpolates' critic pass under the run's precision (bf16: the critic step 1.9x faster, no FID
        # cost in a two-seed parity run); the input gradient and its norm stay fp32 (--gp-precision fp32: all fp32).
        # --projection: an interpolate between a real and a fake face is scored with the real face's labels
        gp = gradient_penalty(lambda x: D(x, y_real), interpolates(real.float(), fake.float()),
                              run.autocast() if args.gp_precision == 'same' else None)
        loss_d = (critic_loss(real_score.float(), fake_score.float()) + args.gp_weight * gp
                  + args.cls_weight * (cls_loss(real_cls, y_real) + cls_loss(fake_cls, y_fake)))
        opt_d.zero_grad(set_to_none=True)
        run.backward(loss_d, 'D')
        run.step('D')

        # (2) every --n-critic steps, update G: raise D(G(z, y)) and make the critic read y in G(z, y)
        if step % args.n_critic == args.n_critic - 1:
            D.requires_grad_(False)
            with run.autocast():
                gen_score, gen_cls = D(aug(G(z, y_fake)), y_fake)
            loss_g = g_wgan_loss(gen_score.float()) + args.cls_weight * cls_loss(gen_cls, y_fake)
            opt_g.zero_grad(set_to_none=True)
            run.backward(loss_g, 'G')
            run.step('G')
            D.requires_grad_(True)
            if G_ema is not None:
                recipes.accumulate(G_ema, G, ema_beta)
            acc_gen = accuracy(gen_cls, y_fake)

        run.track(loss_d=loss_d, loss_g=loss_g, w_dist=real_score.float().mean() - fake_score.float().mean(), gp=gp,
                  acc_real=accuracy(real_cls, y_real), acc_fake=acc_gen)
    run.finish()
    if run.main and args.control_n and args.cls_weight > 0:   # at --cls-weight 0 the heads never learned
        control = control_accuracy(G_ema if G_ema is not None else G, D, model_args, args.control_n, run.device, args.seed + 3)
        run.write_json('control.json', {'step': run.global_step, 'n': args.control_n, 'd_heads_on_generated': control})
        run.log('control (the critic\'s heads read the asked-for class on generated faces): '
                + ', '.join(f'{a} {v:.1%}' for a, v in control.items()))


def main(argv=None):
    args = get_args(argv)
    if args.sample or args.export:
        return sampling.sample_main(args, sample_inputs)
    train(args)


if __name__ == '__main__':
    common.main_guard(main)
