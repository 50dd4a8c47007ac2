"""stylegan.py: modulated convolution, demodulation, R1, mixing, truncation, DiffAugment, run folder, resume."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import sampling
import stylegan
from conftest import ROOT, TINY
from test_gans import assert_same_state

# TINY without the DCGAN width flags, and a StyleGAN small enough for a CPU test
_pairs = [TINY[i:i + 2] for i in range(0, len(TINY), 2)]
SMALL = [a for pair in _pairs if pair[0] not in ('--ngf', '--ndf') for a in pair] + \
    ['--ch-base', '128', '--ch-max', '16', '--z-dim', '16', '--n-mlp', '2']


def train(faces, out, *extra):
    stylegan.main(['--data', faces, '--out', str(out), *SMALL, *extra])
    return common.load_checkpoint(os.path.join(out, 'ckpt.pt'))


def per_sample_reference(x, weight, style, demodulate):
    """The definition, one sample at a time: scale the weights' input channels by the style, normalise each
    output channel's weights, convolve."""
    out = []
    for xi, si in zip(x, style):
        w = weight * si[None, :, None, None]
        if demodulate:
            w = w / w.pow(2).sum((1, 2, 3), keepdim=True).add(1e-8).sqrt()
        out.append(F.conv2d(xi[None], w, padding=weight.shape[-1] // 2))
    return torch.cat(out)


@pytest.mark.parametrize('demodulate', [True, False])
@pytest.mark.parametrize('fused', [True, False])
def test_modulated_conv_equals_per_sample_loop(fused, demodulate):
    torch.manual_seed(0)
    x, weight, style = torch.randn(4, 6, 8, 8), torch.randn(5, 6, 3, 3), torch.randn(4, 6)
    got = stylegan.modulated_conv2d(x, weight, style, demodulate, fused=fused)
    assert torch.allclose(got, per_sample_reference(x, weight, style, demodulate), atol=1e-4)


def test_demodulation_gives_unit_variance():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16)
    weight, style = torch.randn(32, 64, 3, 3), torch.rand(8, 64) * 3 + 0.1   # any scale of weights and styles
    out = stylegan.modulated_conv2d(x, weight, style)
    assert abs(out.var().item() - 1) < 0.1
    assert stylegan.modulated_conv2d(x, weight, style, demodulate=False).var() > 10   # without it: no


def test_r1_penalty_matches_its_definition():
    """For D(x) = <w, x> the gradient is w for every sample: R1 = ||w||^2; and it is differentiable."""
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8, requires_grad=True)
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    r1 = stylegan.d_r1_loss((x * w).flatten(1).sum(1), x)
    assert torch.allclose(r1, w.pow(2).sum())
    r1.backward()
    assert torch.allclose(w.grad, 2 * w)
    # the real D: per-sample gradients from autograd, one sample at a time (D in a batch of one)
    D = stylegan.Discriminator(32, ch_base=64, ch_max=16, mbstd_group=1)
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    want = torch.stack([torch.autograd.grad(D(x[i:i + 1]).sum(), x)[0][i].pow(2).sum() for i in range(3)]).mean()
    assert torch.allclose(stylegan.d_r1_loss(D(x), x), want, rtol=1e-4)


def test_generator_mixing_truncation_and_shapes():
    torch.manual_seed(0)
    G = stylegan.Generator(size=32, z_dim=16, n_mlp=2, ch_base=64, ch_max=16).eval()
    assert G.num_ws == 8
    z = torch.randn(3, 16)
    with torch.no_grad():
        x = G(z)
        assert x.shape == (3, 3, 32, 32)
        assert torch.equal(G(z), x)                          # eval: the fixed noise buffers, deterministic
        # crossover at num_ws is no mixing; at 0 every layer takes z2's w
        assert torch.equal(G(z, torch.randn(3, 16), torch.full((3,), G.num_ws)), x)
        z2 = torch.randn(3, 16)
        assert torch.allclose(G(z2, z, torch.zeros(3, dtype=torch.long)), x, atol=1e-6)
        G.w_avg.normal_()
        G.psi = 0.0                                          # full truncation: every face is the mean face
        t = G(torch.randn(4, 16))
        assert torch.allclose(t, t[:1].expand_as(t), atol=1e-5)
    adain = stylegan.Generator(size=32, z_dim=16, n_mlp=2, ch_base=64, ch_max=16, style='adain')
    assert adain(z).shape == (3, 3, 32, 32)


def test_sample_inputs_are_not_the_weight_init_stream():
    """Regression: the fixed grid and FID samples were drawn from torch.Generator().manual_seed(seed), the
    very numbers that torch.manual_seed(seed) had put into the mapping network's first matrix, so z_i was
    row i of it (cosine 1) and those samples came out broken. Sample inputs now have their own stream."""
    common.seed_everything(0)
    G = stylegan.Generator(z_dim=64, n_mlp=2, ch_base=64, ch_max=32)
    rows = G.mapping[0].weight.detach()[:32]
    cos = lambda z: F.cosine_similarity(z, rows, dim=1).abs().max().item()
    old = stylegan.sample_inputs({'z_dim': 64}, 32, 'cpu', torch.Generator().manual_seed(0))[0]
    new = stylegan.sample_inputs({'z_dim': 64}, 32, 'cpu', sampling.sample_rng(0))[0]
    assert cos(old) > 0.999 and cos(new) < 0.6     # independent 64-d directions: |cos| ~ 0.1, rarely 0.4
    with torch.no_grad():                          # and the mapped ws of the new draws are ordinary
        far = lambda z: (G.map(z) - G.map(torch.randn(256, 64)).mean(0)).norm(dim=1).mean().item()
        assert far(new) < 1.5 * far(torch.randn(32, 64))


def test_run_folder_sampling_and_resume(faces, tmp_path):
    out = tmp_path / 'run'
    ckpt = train(faces, out, '--epochs', '2', '--diffaug', 'color,translation,cutout', '--r1-every', '2')
    assert ckpt['sample_model'] == 'G_ema' and set(ckpt['models']) == {'G', 'D', 'G_ema'}
    assert open(out / 'losses.csv').readline().startswith('step,epoch,loss_d,loss_g,r1,')
    for f in ('style_mixing.png', 'interpolation.png', 'interpolation.gif', 'progress.gif'):
        assert os.path.exists(out / f), f
    assert Image.open(out / 'style_mixing.png').size == (2 + 66 * 6, 2 + 66 * 6)    # 5 x 5 plus sources
    assert Image.open(out / 'interpolation.gif').n_frames == 32
    # --sample rebuilds G_ema alone; the fixed grid is the one written at the last step
    stylegan.main(['--sample', '6', '--ckpt', str(out / 'ckpt.pt'), '--device', 'cpu'])
    s = out / 'sample'
    a, b = (np.asarray(Image.open(p), dtype=int) for p in (s / 'fixed_grid.png', out / 'grids' / 'step_00000004.png'))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3   # channels-last in training: last-bit rounding
    a, b = (np.asarray(Image.open(p), dtype=int) for p in (s / '000002.png', out / 'samples' / '000002.png'))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3   # the same z, the same last-bit rounding caveat
    assert os.path.exists(s / 'style_mixing.png')
    stylegan.main(['--sample', '6', '--ckpt', str(out / 'ckpt.pt'), '--psi', '0', '--out', str(tmp_path / 'psi0')])
    a, b = (np.asarray(Image.open(tmp_path / 'psi0' / f'00000{i}.png'), dtype=int) for i in (0, 5))
    assert np.abs(a - b).max() <= 1                           # psi 0: the mean face every time
    # resume: 2 steps + 2 steps equals 4 steps, bitwise (noise, mixing and augmentation included)
    train(faces, tmp_path / 'b', '--epochs', '1', '--diffaug', 'color,translation,cutout', '--r1-every', '2')
    resumed = train(faces, tmp_path / 'b', '--epochs', '2', '--resume')
    assert resumed['step'] == 4
    assert_same_state(ckpt, resumed)
    with pytest.raises(SystemExit):
        stylegan.get_args(['--diffaug', 'rotate'])


def test_import_has_no_side_effects(tmp_path):
    p = subprocess.run([sys.executable, '-c', 'import stylegan, acgan, wacgan_gp, label, fid'], cwd=tmp_path,
                       env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == '' and p.stderr == '' and os.listdir(tmp_path) == []
