"""StyleGAN2: Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", 2020.
https://arxiv.org/abs/1912.04958 (StyleGAN: https://arxiv.org/abs/1812.04948)

A compact StyleGAN2 for 64x64 anime faces (up to 256 with --image-size), in plain PyTorch (no custom
CUDA ops), sized to train on a laptop CPU by default. G: an 8-layer mapping network z -> w (learning
rate x0.01), a learned 4x4 constant, per layer a 3x3 convolution whose weights each sample's style
modulates and demodulates (--style adain: the StyleGAN1 form, instance norm then a per-channel scale and
bias from the style), per-layer noise inputs, and toRGB skips summed across resolutions. D: residual,
with minibatch standard deviation. Loss: non-saturating logistic, lazy R1 on reals every 16 steps.
Style-mixing regularisation (p = 0.9), an EMA of G for every sample and FID, the truncation trick
(--psi), optional DiffAugment (--diffaug) for small datasets. Every layer uses the equalized learning
rate: weights are N(0, 1) and scaled at run time by He's constant, so Adam updates all layers alike.

    python stylegan.py --data faces/ --epochs 100                  # train (run folder: runs/stylegan)
    python stylegan.py --data faces/ --recipe best                 # the flags of the shipped StyleGAN
    python stylegan.py --out runs/stylegan --resume                # continue a stopped run exactly
    python stylegan.py --sample 64 --ckpt runs/stylegan/ckpt.pt --psi 0.7   # generate, mixing grid, interpolation

Besides the run folder of every script: style_mixing.png (rows: coarse styles from A, columns: the fine
styles from B) and interpolation.png / .gif (a walk in w). Samples use the noise buffers fixed at
initialisation (as StyleGAN2-ADA's noise_mode='const'), so a z always gives the same face.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import recipes
import sampling
import training


# --recipe best: what trains the shipped generator (results/README.md has each change with its measured effect)
BEST = dict(diffaug='color,translation,cutout', lr_halve_at='20,26', epochs=28)


def get_args(argv=None):
    p = common.base_parser('stylegan', __doc__, epochs=100, batch_size=32, sizes=(32, 64, 128, 256))
    p.add_argument('--z-dim', type=int, default=256, help='size of z and w (default: %(default)s)')
    p.add_argument('--n-mlp', type=int, default=8, help='layers of the mapping network (default: %(default)s)')
    p.add_argument('--ch-base', type=int, default=2048,
                   help='channels at resolution r: min(ch_max, ch_base / r); 2048 gives 256-256-128-64-32 for '
                   '4..64, sized for a CPU; StyleGAN2 itself uses 16384 (default: %(default)s)')
    p.add_argument('--ch-max', type=int, default=256, help='(default: %(default)s)')
    p.add_argument('--style', choices=['mod', 'adain'], default='mod',
                   help='mod = StyleGAN2 weight (de)modulation; adain = StyleGAN1 AdaIN (default: %(default)s)')
    common.add_adam_args(p, lr_g=0.0025, lr_d=0.0025, beta1=0.0, beta2=0.99)   # StyleGAN2's
    common.add_r1_args(p, gamma=None, gamma_help='None = StyleGAN2-ADA\'s heuristic 0.0002 * image_size^2 / batch_size')
    p.add_argument('--mixing', type=float, default=0.9, help='style-mixing probability (default: %(default)s)')
    recipes.add_ema_diffaug_args(p, ema_kimg=10.0)
    p.add_argument('--psi', type=float, default=1.0, help='with --sample: truncation psi, 1 = none (default: %(default)s)')
    common.add_recipe_arg(p, BEST, 'results/stylegan_G.pt, FID 29.9 on 10,000 samples; halvings at fixed epochs '
                          '(the shipped run was halved by hand at 20 and 26.15)')
    args = common.parse_args(p, argv, renamed={'lr': ['lr_g', 'lr_d']})   # runs saved before --lr was split resume
    if args.r1 is None:
        args.r1 = 0.0002 * args.image_size ** 2 / args.batch_size
    return args


# ----------------------------------------------------------------------------------------------------
# Equalized learning rate layers

class EqualLinear(nn.Module):
    def __init__(self, cin, cout, bias_init=0.0, lr_mul=1.0, act=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full((cout,), float(bias_init)))
        self.scale, self.lr_mul, self.act = lr_mul / math.sqrt(cin), lr_mul, act

    def forward(self, x):
        x = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.act else x   # sqrt(2): keeps the variance


class EqualConv2d(nn.Module):
    def __init__(self, cin, cout, k, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale, self.pad = 1 / math.sqrt(cin * k * k), k // 2

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.pad)


def lrelu(x):
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


# ----------------------------------------------------------------------------------------------------
# Generator

def modulated_conv2d(x, weight, style, demodulate=True, fused=False):
    """x: (B, Cin, H, W); weight: (Cout, Cin, k, k); style: (B, Cin). Each sample convolves with its own
    weights weight * style (input channels scaled), divided by their norm per output channel
    (demodulation: unit output variance for unit input variance). fused=True builds those per-sample
    weights and runs one grouped convolution (groups = B); the default computes the same thing as
    conv(x * style, weight) * demod with the shared weights, which is several times faster on CPUs."""
    B, cin, H, W = x.shape
    pad = weight.shape[-1] // 2
    if fused:
        w = weight[None] * style[:, None, :, None, None]                    # (B, Cout, Cin, k, k)
        if demodulate:
            w = w * torch.rsqrt(w.pow(2).sum((2, 3, 4), keepdim=True) + 1e-8)
        out = F.conv2d(x.reshape(1, B * cin, H, W), w.reshape(-1, cin, *w.shape[3:]), padding=pad, groups=B)
        return out.reshape(B, -1, *out.shape[2:])
    out = F.conv2d(x * style[:, :, None, None].to(x.dtype), weight.to(x.dtype), padding=pad)
    if demodulate:   # sum over Cin, k, k of (weight * style)^2 = (style^2) @ (sum over k, k of weight^2)
        demod = torch.rsqrt(style.float().pow(2) @ weight.float().pow(2).sum((2, 3)).t() + 1e-8)   # (B, Cout)
        out = out * demod[:, :, None, None].to(out.dtype)
    return out


class StyledConv(nn.Module):
    """(upsample x2) -> 3x3 conv styled by w -> + scaled noise -> bias, lrelu. style='adain' instead runs a
    plain conv and then AdaIN: instance norm, then a per-channel scale and bias from w (StyleGAN1)."""

    def __init__(self, cin, cout, w_dim, res, upsample=False, style='mod'):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.scale, self.upsample, self.mode = 1 / math.sqrt(cin * 9), upsample, style
        self.affine = EqualLinear(w_dim, cin if style == 'mod' else 2 * cout, bias_init=1.0)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.register_buffer('noise_const', torch.randn(1, 1, res, res))   # the noise used when sampling
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x, w):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)
        if self.mode == 'mod':
            x = modulated_conv2d(x, self.weight * self.scale, self.affine(w))
        else:
            x = F.conv2d(x, self.weight * self.scale, padding=1)
        noise = torch.randn_like(x[:, :1]) if self.training else self.noise_const.to(x.dtype)
        x = lrelu(x + self.noise_strength * noise + self.bias.view(1, -1, 1, 1))
        if self.mode == 'adain':
            scale, shift = self.affine(w).chunk(2, dim=1)   # scale starts at 1: bias_init
            x = F.instance_norm(x) * scale[:, :, None, None] + (shift[:, :, None, None] - 1)
        return x


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB, without demodulation, plus bias."""

    def __init__(self, cin, w_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, cin, 1, 1))
        self.scale = 1 / math.sqrt(cin)
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x, w):
        return modulated_conv2d(x, self.weight * self.scale, self.affine(w), demodulate=False) + self.bias.view(1, -1, 1, 1)


def channels(res, ch_base, ch_max):
    return min(ch_max, ch_base // res)


class Generator(nn.Module):
    """z (B, z_dim) -> image (B, 3, size, size). Internally ws (B, num_ws, w_dim): one w per style input,
    ordered coarse (4x4) to fine; num_ws = 2 log2(size) - 2."""

    def __init__(self, size=64, z_dim=256, n_mlp=8, ch_base=2048, ch_max=256, style='mod'):
        super().__init__()
        self.z_dim, self.log_size = z_dim, int(math.log2(size))
        self.mapping = nn.Sequential(*[EqualLinear(z_dim, z_dim, lr_mul=0.01, act=True) for _ in range(n_mlp)])
        self.register_buffer('w_avg', torch.zeros(z_dim))   # running mean of w, the centre of truncation
        ch = lambda r: channels(r, ch_base, ch_max)
        self.const = nn.Parameter(torch.randn(1, ch(4), 4, 4))
        self.convs = nn.ModuleList([StyledConv(ch(4), ch(4), z_dim, 4, style=style)])
        self.to_rgbs = nn.ModuleList([ToRGB(ch(4), z_dim)])
        for i in range(3, self.log_size + 1):   # 8x8 ... size x size: an upsampling conv, a conv, a toRGB
            r = 2 ** i
            self.convs.extend([StyledConv(ch(r // 2), ch(r), z_dim, r, upsample=True, style=style),
                               StyledConv(ch(r), ch(r), z_dim, r, style=style)])
            self.to_rgbs.append(ToRGB(ch(r), z_dim))
        self.num_ws = len(self.convs) + 1   # each toRGB shares the w of the conv after it (as rosinality's)
        self.psi = 1.0                      # truncation used in forward(z); set by --sample --psi

    def map(self, z, psi=1.0):
        """z -> w, normalised to the unit sphere first (pixel norm); truncated towards w_avg by psi."""
        w = self.mapping(z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8))
        return self.w_avg.lerp(w, psi) if psi != 1 else w

    def synthesis(self, ws):                                   # ws: (B, num_ws, w_dim)
        x = self.const.expand(len(ws), -1, -1, -1)
        x = self.convs[0](x, ws[:, 0])                         # 4 x 4
        rgb = self.to_rgbs[0](x, ws[:, 1])
        for i, to_rgb in enumerate(self.to_rgbs[1:]):          # each step doubles the resolution
            x = self.convs[1 + 2 * i](x, ws[:, 1 + 2 * i])
            x = self.convs[2 + 2 * i](x, ws[:, 2 + 2 * i])
            rgb = F.interpolate(rgb, scale_factor=2, mode='bilinear', align_corners=False) + to_rgb(x, ws[:, 3 + 2 * i])
        return rgb

    def forward(self, z, z2=None, crossover=None):
        """z2 and crossover (B,) give style mixing: layers from the crossover index on take z2's w."""
        w = self.map(z, self.psi)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        if z2 is not None:
            w2 = self.map(z2, self.psi)[:, None].expand(-1, self.num_ws, -1)
            later = torch.arange(self.num_ws, device=z.device)[None, :] >= crossover[:, None]
            ws = torch.where(later[:, :, None], w2, ws)
        return self.synthesis(ws)


def sample_inputs(model_args, n, device, generator=None):
    """What G(*inputs) needs for n images: z ~ N(0, I)."""
    return (torch.randn(n, model_args['z_dim'], device=device, generator=generator),)


# ----------------------------------------------------------------------------------------------------
# Discriminator

class ResBlock(nn.Module):
    """conv3x3 -> conv3x3 -> downsample x2, plus a 1x1 downsampled skip; the sum scaled by 1/sqrt(2)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.conv2 = EqualConv2d(cin, cin, 3), EqualConv2d(cin, cout, 3)
        self.skip = EqualConv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        y = F.avg_pool2d(lrelu(self.conv2(lrelu(self.conv1(x)))), 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


class Discriminator(nn.Module):
    def __init__(self, size=64, ch_base=2048, ch_max=256, mbstd_group=4):
        super().__init__()
        ch = lambda r: channels(r, ch_base, ch_max)
        self.from_rgb = EqualConv2d(3, ch(size), 1)
        self.blocks = nn.Sequential(*[ResBlock(ch(2 ** i), ch(2 ** (i - 1))) for i in range(int(math.log2(size)), 2, -1)])
        self.mbstd_group = mbstd_group
        self.conv = EqualConv2d(ch(4) + 1, ch(4), 3)
        self.fc = EqualLinear(ch(4) * 16, ch(4), act=True)
        self.out = EqualLinear(ch(4), 1)

    def minibatch_stddev(self, x):
        """Append the std of each feature over groups of samples, averaged: D sees a batch's variety."""
        B, C, H, W = x.shape
        g = math.gcd(B, self.mbstd_group)
        std = x.float().reshape(g, -1, C, H, W).var(0, unbiased=False).add(1e-8).sqrt().mean((1, 2, 3))   # (B/g,)
        return torch.cat([x, std.to(x.dtype).repeat(g).view(B, 1, 1, 1).expand(B, 1, H, W)], 1)

    def forward(self, x):
        x = self.blocks(lrelu(self.from_rgb(x)))                # -> ch(4) x 4 x 4
        x = lrelu(self.conv(self.minibatch_stddev(x)))
        return self.out(self.fc(x.flatten(1))).flatten()       # logits


# ----------------------------------------------------------------------------------------------------
# Losses (named as in rosinality/stylegan2-pytorch)

def d_logistic_loss(real_logits, fake_logits):
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def g_nonsaturating_loss(fake_logits):
    return F.softplus(-fake_logits).mean()


def d_r1_loss(real_logits, real):
    """R1: E ||grad_x D(x)||^2 on real images (x must require grad); in fp32."""
    grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------------
# Outputs: style-mixing grid and latent interpolation

@torch.no_grad()
def style_mixing_grid(G, path, n=5, coarse=4, seed=0, device='cpu'):
    """Top row: sources B; left column: sources A; cell (i, j): A_i's coarse styles (the first `coarse` ws:
    4x4 and 8x8, pose and face shape) with B_j's fine styles (colours, texture)."""
    g = sampling.sample_rng(seed)
    za, zb = (torch.randn(n, G.z_dim, generator=g).to(device) for _ in range(2))
    G.eval()
    wa, wb = G.map(za, G.psi), G.map(zb, G.psi)
    rep = lambda w: w[:, None].expand(-1, G.num_ws, -1)
    img_a, img_b = G.synthesis(rep(wa)), G.synthesis(rep(wb))
    mixed = [G.synthesis(torch.cat([rep(wa[i:i + 1]).expand(n, -1, -1)[:, :coarse], rep(wb)[:, coarse:]], 1)) for i in range(n)]
    blank = torch.ones_like(img_a[:1])
    rows = [torch.cat([blank, img_b])] + [torch.cat([img_a[i:i + 1], mixed[i]]) for i in range(n)]
    sampling.save_grid(torch.cat(rows).clamp(-1, 1), path, nrow=n + 1)


@torch.no_grad()
def interpolation(G, path_png, path_gif, points=4, steps=8, seed=0, device='cpu'):
    """A walk in w through `points` random faces, `steps` frames between each (linear in w)."""
    g = sampling.sample_rng(seed)
    G.eval()
    w = G.map(torch.randn(points, G.z_dim, generator=g).to(device), G.psi)
    t = torch.linspace(0, 1, steps + 1)[:-1].to(device)
    path = torch.cat([w[i].lerp(w[(i + 1) % points], t[:, None]) for i in range(points)])
    frames = G.synthesis(path[:, None].expand(-1, G.num_ws, -1)).float().clamp(-1, 1).cpu()
    sampling.save_grid(frames[:2 * steps], path_png, nrow=2 * steps)
    ims = [Image.fromarray(a) for a in sampling.to_uint8(frames)]
    ims[0].save(path_gif, save_all=True, append_images=ims[1:], duration=80, loop=0)


def write_extras(G, out, device, seed):
    style_mixing_grid(G, f'{out}/style_mixing.png', seed=seed, device=device)
    interpolation(G, f'{out}/interpolation.png', f'{out}/interpolation.gif', seed=seed, device=device)


# ----------------------------------------------------------------------------------------------------
# Training

def train(args):
    run = training.Run(args, 'stylegan')
    images = run.load_images()
    model_args = dict(size=args.image_size, z_dim=args.z_dim, n_mlp=args.n_mlp, ch_base=args.ch_base,
                      ch_max=args.ch_max, style=args.style)
    G, G_ema = run.prepare(Generator(**model_args)), run.prepare(Generator(**model_args))
    D = run.prepare(Discriminator(args.image_size, args.ch_base, args.ch_max), compilable=False)   # R1: double backward
    recipes.ema_copy(G, G_ema)   # G_ema samples, G trains
    # lazy regularisation: D's R1 step comes every r1_every steps, so its Adam is rescaled (StyleGAN2 App. B)
    c = args.r1_every / (args.r1_every + 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d * c, betas=(args.beta1 ** c, args.beta2 ** c), foreach=True)
    run.setup(G, D, opt_g, opt_d, model_args, sample_inputs, images, G_ema=G_ema)
    ema_beta = recipes.ema_beta(args.batch_size, args.ema_kimg)
    aug = lambda x: recipes.diff_augment(x, args.diffaug)
    B = args.batch_size // run.world
    r1 = torch.zeros((), device=run.device)   # logged between R1 steps as its last value

    def mixed_fakes():
        """G's fakes; with probability --mixing, two zs with a random crossover layer (mixing regularisation)."""
        z, z2 = torch.randn(2, B, args.z_dim, device=run.device)
        mix = torch.rand(B, device=run.device) < args.mixing
        crossover = torch.where(mix, torch.randint(1, G.num_ws, (B,), device=run.device), G.num_ws)
        return G(z, z2, crossover)

    for step, real in run.batches():
        # (1) update D: logistic loss, and every --r1-every steps the R1 penalty on reals (in fp32)
        with run.autocast():
            with torch.no_grad():
                fake = mixed_fakes()
            fake_logits = D(aug(fake))
        loss_d = 0.0
        if step % args.r1_every == 0:
            real = real.detach().requires_grad_(True)
            real_logits = D(aug(real))
            r1 = d_r1_loss(real_logits, real)
            loss_d = args.r1 / 2 * r1 * args.r1_every   # x r1_every: it is applied once per r1_every steps
        else:
            with run.autocast():
                real_logits = D(aug(real))
        loss_d = loss_d + d_logistic_loss(real_logits.float(), fake_logits.float())
        opt_d.zero_grad(set_to_none=True)
        run.backward(loss_d, 'D')
        run.step('D')

        # (2) update G: non-saturating loss through the updated D, then the EMA generator and w_avg
        D.requires_grad_(False)
        with run.autocast():
            loss_g = g_nonsaturating_loss(D(aug(mixed_fakes())).float())
        opt_g.zero_grad(set_to_none=True)
        run.backward(loss_g, 'G')
        run.step('G')
        D.requires_grad_(True)
        with torch.no_grad():
            w = G.map(torch.randn(B, args.z_dim, device=run.device))
            G.w_avg.lerp_(w.float().mean(0), 0.005)
        recipes.accumulate(G_ema, G, ema_beta)

        run.track(loss_d=loss_d, loss_g=loss_g, r1=r1, d_real=torch.sigmoid(real_logits.float()).mean(),
                  d_fake=torch.sigmoid(fake_logits.float()).mean())
    run.finish()
    if run.main:
        write_extras(G_ema, args.out, run.device, args.seed)
        run.log(f'wrote style_mixing.png, interpolation.png and interpolation.gif to {args.out}')


def main(argv=None):
    args = get_args(argv)
    if args.sample or args.export:
        return sampling.sample_main(args, sample_inputs, configure=lambda G: setattr(G, 'psi', args.psi),
                                  extras=lambda G, out, device: write_extras(G, out, device, args.seed + 1))
    train(args)


if __name__ == '__main__':
    common.main_guard(main)
