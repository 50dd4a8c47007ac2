"""ACGAN: Odena, Olah & Shlens, "Conditional Image Synthesis With Auxiliary Classifier GANs", 2017.
https://arxiv.org/abs/1610.09585

Faces on demand: G takes z and one class per attribute (hair colour, eye colour, gender, ... one column
each in a labels CSV); D says real or fake and, with one classifier head per attribute, which classes it
sees. Both players are trained to classify: D on real images by their labels and on fakes by the labels
they were made from, G to make fakes that D reads as the labels asked for. The networks are the DCGAN of
dcgan.py with the labels one-hot into G's input and the classifier heads beside D's real/fake output;
Adam 2e-4 for both, betas (0.5, 0.999) as in the paper, fuzzy labels 0.9 / 0.1 as the reports' DCGAN.
Flags as in dcgan.py, each measured in results/notes/conditional.md:

    --ema-kimg 10             sample from an exponential moving average of G's weights (Karras et al. 2018)
    --diffaug translation,cutout   DiffAugment (Zhao et al. 2020) on every image D sees; leave out `color`
                              here: D's heads must tell hair and eye colours, which it shifts
    --upsample                G grows by nearest-neighbour resize + 3x3 conv, not transposed convs (Odena et al. 2016)
    --r1 GAMMA                R1 penalty on real images (Mescheder et al. 2018) on the real/fake logit, instead
                              of D's BatchNorm; the classifier heads read the same BatchNorm-free features
    --real-cls-only           D's heads learn the classes from real faces only; the paper trains them on fakes too,
                              so G can satisfy them with whatever marks D learns to read in its own fakes
    --g-cls-weight W          the class loss's weight in G's update alone (default: --cls-weight); lower, G is
                              pulled less toward faces the heads read with certainty (measured: no gain at 0.1)
    --projection              D's real/fake logit also scores the pair (image, labels): + <embed(y), features(x)>
                              (Miyato & Koyama 2018); with --cls-weight 0 it is a projection cGAN, no classifier
                              (measured so: the same FID to epoch 20, eye colour obeyed on 43% of faces, not 99%)
    --cond-bn                 labels into G through its BatchNorms' scale and shift (de Vries et al. 2017), not as
                              one-hot inputs, which give G a label-made 4 x 4 pattern z cannot move (measured
                              so far: no gain beside the class loss to epoch 16; results/notes/conditional.md)
    --init-g results/dcgan_G.pt   with --cond-bn, G starts as the shipped DCGAN for every label (its BatchNorm
                              scales and shifts copied to every class), D from scratch (measured: the labels are
                              learnt in 5 epochs, but FID goes 42 -> 53 -> 70-75 as they are, with or without an
                              epoch of D alone first, and 42 -> 51 by epoch 4 with the copied layers frozen,
                              --init-g-lr 0; results/notes/conditional.md)
    --init-g RUN/ckpt.pt      the same from a dcgan.py run's checkpoint, with its D: the D starts as that
                              D (new class heads, projection at 0), as old as G (measured from its epoch 16: 11
                              behind the DCGAN while the eyes are learnt, level with it 8-12 epochs on, every
                              control bar passed, 66.8 against 66.0 at the DCGAN's 28; then flat at 65-68 as
                              the DCGAN fell to 58.0 by 32 after its halving; forked at 28 instead, after the
                              halving, at the halved rate: 58.4 against the DCGAN's 57.9 eight epochs on, on
                              2,048 samples: --recipe from-dcgan)

    python label.py predict ...                                  # labels for a whole dataset (see label.py)
    python acgan.py --data faces/ --labels labels.csv --epochs 50
    python acgan.py --data faces/ --labels labels.csv --recipe best   # the flags of the shipped ACGAN
    python dcgan.py --data faces/ --out runs/dcgan28 --recipe best --diffaug translation,cutout --epochs 28
    python acgan.py --data faces/ --labels labels.csv --recipe from-dcgan --init-g runs/dcgan28/ckpt.pt   # two stages
    python acgan.py --data faces/ --labels labels.csv --recipe from-dcgan --init-g results/dcgan_epoch28_GD.pt   # its tail alone
    python acgan.py --out runs/acgan --resume                    # continue a stopped run exactly
    python acgan.py --sample 64 --ckpt runs/acgan/ckpt.pt --attr hair=blonde --attr eyes=blue

Labels of the fakes are drawn from the data's joint label distribution (kept in the checkpoint), so
asking for blonde hair also draws eye colours that blonde faces have. A run writes attr_<name>.png (a
row per class, the same z down each column) and control.json: how often D's heads read the asked-for
classes on generated faces. `label.py score --gen RUN/ckpt.pt` measures the same with an independent
classifier.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import recipes
import sampling
import training
import dataset


# --recipe best: what trains the shipped generator (results/notes/conditional.md has each change with its measured effect)
BEST = dict(upsample=True, r1=0.1, fake_label=0.0, ema_kimg=10.0, diffaug='translation,cutout', lr_halve_at='28,44',
            epochs=56)
# --recipe from-dcgan: the same networks in two stages. A conditional G learns its labels cheaply once it draws faces,
# and learns faces badly while it learns labels, so the faces come first, from dcgan.py, and this script adds the
# labels in a short tail at the DCGAN's rate after its first halving, labels into G's BatchNorms and D's projection:
#   python dcgan.py --data faces/ --out runs/dcgan28 --recipe best --diffaug translation,cutout --epochs 28
#   python acgan.py --data faces/ --labels labels.csv --recipe from-dcgan --init-g runs/dcgan28/ckpt.pt
# results/dcgan_epoch28_GD.pt is such a first stage, exported with its D (dcgan.py --export-d): the tail alone from it.
FROM_DCGAN = dict(upsample=True, r1=0.1, fake_label=0.0, ema_kimg=10.0, diffaug='translation,cutout', cond_bn=True,
                  projection=True, cls_weight=0.3, lr_g=1e-4, lr_d=1e-4, epochs=8)


def get_args(argv=None):
    p = common.base_parser('acgan', __doc__, epochs=50, batch_size=64)
    common.add_conditional_args(p)
    p.add_argument('--z-dim', type=int, default=100, help='latent size (default: %(default)s)')
    p.add_argument('--ngf', type=int, default=64, help='G width: channels of its last hidden layer (default: %(default)s)')
    p.add_argument('--ndf', type=int, default=64, help='D width: channels of its first layer (default: %(default)s)')
    common.add_adam_args(p, lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999)
    p.add_argument('--real-label', type=float, default=0.9, help='fuzzy target for real images (default: %(default)s)')
    p.add_argument('--fake-label', type=float, default=0.1, help='fuzzy target for fakes in the D loss (default: %(default)s)')
    p.add_argument('--upsample', action='store_true', help='G grows by nearest-neighbour upsampling + 3x3 conv, not transposed convs')
    common.add_r1_args(p)
    p.add_argument('--real-cls-only', action='store_true', help='D\'s class heads learn from real faces only, not from '
                   'fakes by the labels they were made from (against AC-GAN\'s pull toward over-readable faces, Shu et '
                   'al. 2017); G\'s class loss is unchanged (default: off, as the paper)')
    p.add_argument('--g-cls-weight', type=float, default=None, help='weight of the class loss in G\'s update only: '
                   'below --cls-weight, G is pulled less toward the faces D\'s heads read with certainty (default: '
                   '--cls-weight, as the paper)')
    p.add_argument('--projection', action='store_true', help='projection discriminator (Miyato & Koyama 2018): D\'s '
                   'real/fake logit gains a term <embed(y), sum-pooled features(x)> per attribute, so D judges whether '
                   'the face fits its labels; add --cls-weight 0 to drop the classifier loss (default: off, as the paper)')
    p.add_argument('--cond-bn', action='store_true', help='labels into G as the scale and shift of its BatchNorms '
                   '(conditional BatchNorm), not as one-hot inputs beside z (default: off, as the paper)')
    recipes.add_init_g_args(p)
    recipes.add_ema_diffaug_args(p, ema_kimg=0.0)
    common.add_recipe_arg(p, BEST, 'results/acgan_G.pt, FID 66.5 on 10,000 samples, the epoch-56 snapshot of a run '
                          'halved at epochs 28 and 44', more={'from-dcgan': (FROM_DCGAN, 'the second of two stages: '
                          'needs --init-g RUN/ckpt.pt from `dcgan.py --recipe best --diffaug translation,cutout --epochs '
                          '28`, or that first stage as committed, --init-g results/dcgan_epoch28_GD.pt; measured 58.4 '
                          'on 2,048 samples, not yet shipped')})
    return common.parse_args(p, argv)


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
        # average) a learned 4 x 4 pattern that z does not move: measured 30-40 FID points behind dcgan.py at
        # epoch 12 with a single constant label (results/notes/conditional.md). BatchNorm shifts are per channel.
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


class Discriminator(nn.Module):
    """DCGAN discriminator with two outputs from its last features: a real/fake logit and, per attribute,
    class logits (never softmaxed here: cross_entropy takes logits). bn=False (--r1): no BatchNorm, biases
    instead; the R1 penalty on the real/fake logit keeps D smooth, and the heads share its features.
    projection=True: D(x, y) adds, per attribute, the inner product of a learned class embedding with the
    sum-pooled features, so the real/fake logit says "a real face with these labels" (Miyato & Koyama 2018)."""

    def __init__(self, ndf=64, n_classes=(2,), nc=3, bn=True, projection=False):
        super().__init__()
        self.n_classes = list(n_classes)
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 4, 2, 1, bias=not bn), norm(cout), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True),  # nc x 64 x 64 -> ndf x 32 x 32
            *block(ndf, ndf * 2),                                   # -> (ndf*2) x 16 x 16
            *block(ndf * 2, ndf * 4),                               # -> (ndf*4) x 8 x 8
            *block(ndf * 4, ndf * 8),                               # -> (ndf*8) x 4 x 4
        )
        self.adv = nn.Conv2d(ndf * 8, 1, 4, 1, 0)                   # -> 1 x 1 x 1: real/fake logit
        self.cls = nn.Conv2d(ndf * 8, sum(self.n_classes), 4, 1, 0)  # -> all attributes' class logits
        self.embed = nn.ModuleList(nn.Embedding(n, ndf * 8) for n in self.n_classes) if projection else None

    def forward(self, x, y=None):                               # y: (B, attributes) class indices, -1 unknown
        h = self.features(x)
        adv = self.adv(h).flatten()
        if self.embed is not None:
            phi = h.sum((2, 3))                                 # (B, ndf*8): features summed over the 4 x 4 grid
            for i, embed in enumerate(self.embed):              # an unknown label adds nothing
                adv = adv + (embed(y[:, i].clamp(min=0)) * phi).sum(1) * (y[:, i] >= 0)
        return adv, self.cls(h).flatten(1).split(self.n_classes, dim=1)


def init_weights(m):
    """DCGAN paper: all weights from N(0, 0.02); BatchNorm scale from N(1, 0.02), and so the conditional
    BatchNorm's (1 + an embedding from N(0, 0.02)). The projection's class embeddings from N(0, 0.02) too, so
    their term starts at the scale of the real/fake conv's."""
    if isinstance(m, CondBatchNorm2d):   # after its embeddings (apply visits children first): shifts start at 0
        for e in m.bias:
            nn.init.zeros_(e.weight)
    elif isinstance(m, nn.Embedding):   # the projection's class embeddings, and the BatchNorm scales: 1 + N(0, 0.02)
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
# Losses: binary cross-entropy on the real/fake logit, cross-entropy on the class logits

def d_adv_loss(real_logits, fake_logits, real_label, fake_label):
    """maximize log D(x) + log(1 - D(G(z, y))), targets softened to real_label / fake_label."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.full_like(fake_logits, fake_label)))


def g_adv_loss(fake_logits, real_label):
    """Non-saturating: maximize log D(G(z, y))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.full_like(fake_logits, real_label))


def d_r1_loss(real_logits, real):
    """R1: E ||grad_x D(x)||^2 of the real/fake logit on real images (x must require grad). Zero at the
    equilibrium whatever G does, it stops D from growing steep slopes around the data."""
    grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


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
    """Per attribute, how often D's classifier head reads a generated face as the class it was asked for."""
    D.eval()
    hits = torch.zeros(len(model_args['vocab']))
    for x, (_, y) in sampling.sample_batches(G, sample_inputs, model_args, n, device, seed, with_inputs=True):
        _, logits = D(x.to(device), y.to(device))   # y: a projection D's logit needs it (the heads do not)
        hits += torch.stack([(lg.argmax(1).cpu() == y[:, i]).sum() for i, lg in enumerate(logits)]).float()
    D.train()
    return {a: round(h.item() / n, 4) for a, h in zip(model_args['vocab'], hits)}


def write_control(run, G, D, model_args, n, seed):
    """control.json in the run folder, and a log line: D's heads on n generated faces."""
    control = control_accuracy(G, D, model_args, n, run.device, seed)
    run.write_json('control.json', {'step': run.global_step, 'n': n, 'd_heads_on_generated': control})
    run.log('control (D\'s heads read the asked-for class on generated faces): '
            + ', '.join(f'{a} {v:.1%}' for a, v in control.items()))


# ----------------------------------------------------------------------------------------------------
# Training

def build(args, run, label_args):
    """G and D with the DCGAN paper's initial weights, G_ema (None without --ema-kimg), and their Adam
    optimisers. model_args rebuild G from a checkpoint alone."""
    model_args = dict(z_dim=args.z_dim, ngf=args.ngf, upsample=args.upsample, **label_args,
                      **({'cond_bn': True} if args.cond_bn else {}))   # only when set: older runs resume as saved
    G = run.prepare(Generator(**model_args))
    D = run.prepare(Discriminator(args.ndf, G.n_classes, bn=not args.r1, projection=args.projection),
                    compilable=not args.r1)   # R1: double backward
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
    return model_args, G, D, G_ema, opt_g, opt_d


def train(args):
    if args.recipe == 'from-dcgan' and not (args.init_g or args.resume):
        common.fail('--recipe from-dcgan is the second stage of two: pass --init-g RUN/ckpt.pt from `python dcgan.py '
                    '--data faces/ --out RUN --recipe best --diffaug translation,cutout --epochs 28`, or the committed '
                    'first stage, --init-g results/dcgan_epoch28_GD.pt')
    run = training.Run(args, 'acgan')
    images = run.load_images()
    labels, label_args = run.load_labels()
    model_args, G, D, G_ema, opt_g, opt_d = build(args, run, label_args)
    run.setup(G, D, opt_g, opt_d, model_args, sample_inputs, images, labels, G_ema=G_ema)
    ema_beta = recipes.ema_beta(args.batch_size, args.ema_kimg)
    g_cls_weight = args.cls_weight if args.g_cls_weight is None else args.g_cls_weight
    aug = lambda x: recipes.diff_augment(x, args.diffaug)   # identity without --diffaug; the labels stay

    r1 = torch.zeros((), device=run.device)   # logged between R1 steps as its last value

    B = args.batch_size // run.world
    for step, real, y_real in run.batches():
        z, y_fake = sample_inputs(model_args, B, run.device)
        r1_step = args.r1 > 0 and step % args.r1_every == 0

        # (1) update D: maximize log D(x) + log(1 - D(G(z, y))) and classify real and fake faces by their labels
        with run.autocast():
            fake = G(z, y_fake)
        # an R1 step's real pass runs in fp32 (a gradient of a gradient, where bf16 rounding would dominate)
        if r1_step:
            real = real.detach().requires_grad_(True)
            real_logits, real_cls = D(aug(real), y_real)
        with run.autocast():
            if not r1_step:
                real_logits, real_cls = D(aug(real), y_real)
            fake_logits, fake_cls = D(aug(fake.detach()), y_fake)
        # the heads learn from fakes too (the paper), unless --real-cls-only: then they only ever see real faces
        loss_cls = cls_loss(real_cls, y_real) + (0 if args.real_cls_only else cls_loss(fake_cls, y_fake))
        loss_d = (d_adv_loss(real_logits.float(), fake_logits.float(), args.real_label, args.fake_label)
                  + args.cls_weight * loss_cls)
        if r1_step:
            r1 = d_r1_loss(real_logits, real)
            loss_d = loss_d + args.r1 / 2 * r1 * args.r1_every   # x r1_every: applied once per r1_every steps
        opt_d.zero_grad(set_to_none=True)
        run.backward(loss_d, 'D')
        run.step('D')

        # (2) update G: maximize log D(G(z, y)) and make D read y in G(z, y)
        D.requires_grad_(False)
        with run.autocast():
            gen_logits, gen_cls = D(aug(fake), y_fake)
        loss_g = g_adv_loss(gen_logits.float(), args.real_label) + g_cls_weight * cls_loss(gen_cls, y_fake)
        opt_g.zero_grad(set_to_none=True)
        run.backward(loss_g, 'G')
        run.step('G')
        D.requires_grad_(True)
        if G_ema is not None:
            recipes.accumulate(G_ema, G, ema_beta)

        run.track(loss_d=loss_d, loss_g=loss_g, **({'r1': r1} if args.r1 else {}), d_real=torch.sigmoid(real_logits.float()).mean(),
                  d_fake=torch.sigmoid(fake_logits.float()).mean(),
                  acc_real=accuracy(real_cls, y_real), acc_fake=accuracy(gen_cls, y_fake))
    run.finish()
    if run.main and args.control_n and args.cls_weight > 0:   # at --cls-weight 0 the heads never learned
        write_control(run, G_ema if G_ema is not None else G, D, model_args, args.control_n, args.seed + 3)


def main(argv=None):
    args = get_args(argv)
    if args.sample or args.export:
        return sampling.sample_main(args, sample_inputs)
    train(args)


if __name__ == '__main__':
    common.main_guard(main)
