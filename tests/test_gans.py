"""dcgan.py and lsgan.py end to end: run folder, resume, sampling, signals, NaN, DDP, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import dcgan
import lsgan
import progress
import recipes
import sampling
import training
from common import UserError
from conftest import ROOT, TINY

SCRIPTS = [dcgan, lsgan]
ids = lambda m: m.__name__


def train(module, faces, out, *extra):
    module.main(['--data', faces, '--out', str(out), *TINY, *extra])
    return common.load_checkpoint(os.path.join(out, 'ckpt.pt'))


def assert_same_state(a, b):
    for group in ('models', 'optims'):
        for name in a[group]:
            sa, sb = a[group][name], b[group][name]
            flat = lambda s: [v for v in torch.utils._pytree.tree_leaves(s) if isinstance(v, torch.Tensor)]
            for x, y in zip(flat(sa), flat(sb), strict=True):
                assert torch.equal(x, y), f'{group}/{name} differs'


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_run_folder(module, faces, tmp_path):
    out = tmp_path / 'run'
    ckpt = train(module, faces, out, '--epochs', '2')          # 16 images / batch 8 = 2 steps per epoch
    assert ckpt['step'] == 4 and ckpt['script'] == module.__name__ and ckpt['sample_model'] == 'G'
    assert set(ckpt['models']) == {'G', 'D'} and set(ckpt['optims']) == {'G', 'D'}
    assert json.load(open(out / 'args.json'))['epochs'] == 2
    rows = open(out / 'losses.csv').read().split()
    assert rows[0] == 'step,epoch,loss_d,loss_g,d_real,d_fake,img_per_s' and len(rows) == 5
    assert sorted(os.listdir(out / 'grids')) == [f'step_{s:08d}.png' for s in (0, 2, 4)]
    samples = sorted(os.listdir(out / 'samples'))
    assert samples == [f'{i:06d}.png' for i in range(6)]
    im = Image.open(out / 'samples' / samples[0])
    assert im.size == (64, 64) and im.mode == 'RGB'
    assert Image.open(out / 'progress.gif').n_frames == 3
    assert Image.open(out / 'loss_curve.png').width >= 800      # a panel per logged value (plots.plot_losses)
    assert os.path.exists(out / 'data_64.pt') and 'done' in open(out / 'log.txt').read()
    # the sampling generator rebuilds from the checkpoint alone and makes 64x64 images in [-1, 1]
    G, _ = sampling.load_generator(ckpt)
    x = sampling.generate(G, module.sample_inputs(ckpt['model_args'], 3, 'cpu'))
    assert x.shape == (3, 3, 64, 64) and x.min() >= -1 and x.max() <= 1 and x.std() > 0


def test_default_run_folder_no_samples_and_a_gif_of_many_frames(tmp_path):
    """Without --n-samples a run writes no samples/ (fid.py scores ckpt.pt in memory); without --grid-every
    its grids, and the frames of progress.gif, are ~60 whatever --epochs: >= 30 for the 150-epoch default run
    on the bundled faces (tiny networks, so that it takes seconds)."""
    out = tmp_path / 'run'
    dcgan.main(['--out', str(out), '--device', 'cpu', '--ngf', '8', '--ndf', '8', '--log-every', '100'])
    ckpt = common.load_checkpoint(out / 'ckpt.pt')
    assert ckpt['args']['epochs'] == 150 and ckpt['step'] == 900   # 384 faces, batch 64
    assert not os.path.exists(out / 'samples')
    gif = Image.open(out / 'progress.gif')
    assert gif.n_frames >= 30 and gif.size == (266, 266)    # the top-left 4 x 4 faces
    assert len(os.listdir(out / 'grids')) == 61               # every 15 steps, 0..900
    assert os.path.getsize(out / 'progress.gif') < 8 * 2**20


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_n_samples_writes_pngs(module, faces, tmp_path):
    out = tmp_path / 'run'
    train(module, faces, out, '--epochs', '1', '--n-samples', '100')
    assert sorted(os.listdir(out / 'samples')) == [f'{i:06d}.png' for i in range(100)]


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_resume_equals_uninterrupted(module, faces, tmp_path):
    straight = train(module, faces, tmp_path / 'a', '--epochs', '2')
    train(module, faces, tmp_path / 'b', '--epochs', '1')                 # 2 steps, then stop
    resumed = train(module, faces, tmp_path / 'b', '--epochs', '2', '--resume')   # 2 more
    assert resumed['step'] == straight['step'] == 4
    assert_same_state(straight, resumed)
    col = lambda p: [r.split(',')[:6] for r in open(p).read().split()]   # all but img/s
    assert col(tmp_path / 'a' / 'losses.csv') == col(tmp_path / 'b' / 'losses.csv')


def test_keep_checkpoints_rolls_back(faces, tmp_path):
    """--keep-checkpoints: a snapshot's full checkpoint copied over ckpt.pt resumes from there, exactly
    (a run that collapsed later goes on from before the collapse); losses.csv is cut back to that step."""
    straight = train(dcgan, faces, tmp_path / 'a', '--epochs', '2')
    b = tmp_path / 'b'
    train(dcgan, faces, b, '--epochs', '3', '--snapshot-every', '1', '--keep-checkpoints')
    assert sorted(os.listdir(b / 'snapshots')) == [f'{k}_epoch{e:04d}.pt' for k in ('G', 'ckpt') for e in (1, 2, 3)]
    os.replace(b / 'snapshots' / 'ckpt_epoch0001.pt', b / 'ckpt.pt')
    resumed = train(dcgan, faces, b, '--epochs', '2', '--resume')
    assert resumed['step'] == 4
    assert_same_state(straight, resumed)
    col = lambda p: [r.split(',')[:6] for r in open(p).read().split()]
    assert col(tmp_path / 'a' / 'losses.csv') == col(b / 'losses.csv')


def test_resume_applies_changed_learning_rate(faces, tmp_path):
    """`--resume --lr-g X` trains on with X (loading the optimiser state must not bring the old lr back);
    flags not given again keep the run's values."""
    train(dcgan, faces, tmp_path, '--epochs', '1', '--lr-g', '2e-4', '--beta1', '0.3')
    ckpt = train(dcgan, faces, tmp_path, '--epochs', '2', '--resume', '--lr-g', '1e-4')
    g, d = ckpt['optims']['G']['param_groups'][0], ckpt['optims']['D']['param_groups'][0]
    assert g['lr'] == 1e-4 and d['lr'] == 1e-4 and g['betas'] == d['betas'] == (0.3, 0.999)
    assert json.load(open(tmp_path / 'args.json'))['lr_g'] == 1e-4
    assert 'resume: G optimiser lr 0.0002 -> 0.0001' in open(tmp_path / 'log.txt').read()


def test_lr_halve_at_schedule_and_resume(faces, tmp_path):
    """--lr-halve-at 1,2: both learning rates halve at the start of epochs 1 and 2 (2 steps per epoch); a run
    stopped at epoch 1 and resumed equals the uninterrupted one, and the resumed optimisers carry the
    halving it had passed, not the flags' values."""
    flags = ['--lr-g', '4e-4', '--lr-d', '2e-4', '--lr-halve-at', '2,1']
    straight = train(dcgan, faces, tmp_path / 'a', '--epochs', '3', *flags)
    lrs = lambda ckpt: [ckpt['optims'][k]['param_groups'][0]['lr'] for k in ('G', 'D')]
    assert lrs(straight) == [1e-4, 5e-5]
    log = open(tmp_path / 'a' / 'log.txt').read()
    assert 'epoch 1: learning rates halved (--lr-halve-at) to G 0.0002, D 0.0001' in log
    assert 'epoch 2: learning rates halved (--lr-halve-at) to G 0.0001, D 5e-05' in log
    stopped = train(dcgan, faces, tmp_path / 'b', '--epochs', '1', *flags)
    assert lrs(stopped) == [2e-4, 1e-4]                        # saved at step 2: epoch 1's halving is in
    resumed = train(dcgan, faces, tmp_path / 'b', '--epochs', '3', '--resume')
    assert 'resume: G optimiser' not in open(tmp_path / 'b' / 'log.txt').read()   # nothing changed by hand
    assert_same_state(straight, resumed)
    assert lrs(resumed) == [1e-4, 5e-5]
    # the flag trains as a decay by hand does (stop at epoch 1, `--resume --lr-g X/2 --lr-d Y/2`)
    one = train(dcgan, faces, tmp_path / 'd', '--epochs', '2', *flags[:4], '--lr-halve-at', '1')
    train(dcgan, faces, tmp_path / 'e', '--epochs', '1', *flags[:4])
    by_hand = train(dcgan, faces, tmp_path / 'e', '--epochs', '2', '--resume', '--lr-g', '2e-4', '--lr-d', '1e-4')
    assert_same_state(one, by_hand)
    # without the flag nothing changes
    assert lrs(train(dcgan, faces, tmp_path / 'c', '--epochs', '3', '--lr-g', '4e-4', '--lr-d', '2e-4')) == [4e-4, 2e-4]
    with pytest.raises(SystemExit):
        dcgan.get_args(['--lr-halve-at', '0,5'])


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_recipe_flags_resume_and_ema(module, faces, tmp_path):
    """--sn --ema-kimg --diffaug --upsample (and dcgan's --loss hinge): EMA G samples and is checkpointed; resume stays exact."""
    flags = ['--sn', '--ema-kimg', '0.02', '--diffaug', 'color,translation,cutout', '--upsample'] + ['--loss', 'hinge'] * (module is dcgan)
    straight = train(module, faces, tmp_path / 'a', '--epochs', '2', *flags)
    assert straight['sample_model'] == 'G_ema' and set(straight['models']) == {'G', 'D', 'G_ema'}
    train(module, faces, tmp_path / 'b', '--epochs', '1', *flags)
    resumed = train(module, faces, tmp_path / 'b', '--epochs', '2', '--resume')
    assert_same_state(straight, resumed)
    G, G_ema = (straight['models'][k] for k in ('G', 'G_ema'))
    w = 'net.0.weight'
    assert not torch.equal(G[w], G_ema[w])                          # it trails G ...
    # ... and samples with BatchNorm statistics of its own weights, not G's
    assert not torch.equal(G['net.1.running_var'], G_ema['net.1.running_var'])
    own = module.Generator(**straight['model_args'])
    own.load_state_dict(G_ema)
    recipes.standing_stats(own, module.sample_inputs, straight['model_args'], batch_size=8, seed=0)
    for k, v in own.state_dict().items():
        assert torch.allclose(v, G_ema[k], rtol=1e-4, atol=1e-6), k
    assert not any('running_mean' in k for k in straight['models']['D'])       # --sn: no BatchNorm in D
    # --upsample: the checkpoint rebuilds a G that grows by resize + conv after its first layer
    assert straight['model_args']['upsample']
    assert [type(m) for m in own.modules() if isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Upsample))] == \
        [torch.nn.ConvTranspose2d] + [torch.nn.Upsample] * 4
    exported, _ = sampling.load_generator(sampling.generator_checkpoint(straight))
    assert torch.equal(exported.state_dict()[w], G_ema[w])           # the export is the EMA generator


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_r1_drops_batchnorm_logs_and_resumes(module, faces, tmp_path):
    """--r1: D without BatchNorm (biases instead), the penalty logged where it is applied, resume exact."""
    flags = ['--r1', '10', '--r1-every', '2']
    straight = train(module, faces, tmp_path / 'a', '--epochs', '2', *flags)
    D = straight['models']['D']
    assert not any('running_mean' in k for k in D) and 'net.2.bias' in D
    train(module, faces, tmp_path / 'b', '--epochs', '1', *flags)
    assert_same_state(straight, train(module, faces, tmp_path / 'b', '--epochs', '2', '--resume'))
    rows = np.genfromtxt(tmp_path / 'a' / 'losses.csv', delimiter=',', names=True)
    assert 'r1' in rows.dtype.names and np.isfinite(rows['r1']).all()
    # the penalty moves D (a tiny D's input gradients are ~1e-9, so a large gamma): same architecture, other weights
    weak, strong = (train(module, faces, tmp_path / g, '--epochs', '1', '--r1', g, '--r1-every', '1')['models']['D']
                    for g in ('1e-30', '1e8'))
    assert not torch.allclose(weak['net.2.weight'], strong['net.2.weight'])
    for bad in (['--r1-every', '0'], ['--r1', '-1']):
        with pytest.raises(SystemExit):
            module.get_args(bad)


def test_linear_out_has_no_tanh_samples_clamped_and_resumes(faces, tmp_path):
    """dcgan --linear-out: G ends in its conv (values past +-1 reach D, with a gradient), the checkpoint rebuilds
    that G, samples are clamped to [-1, 1]; resume stays exact. Without the flag, old checkpoints keep their tanh."""
    flags = ['--linear-out', '--upsample']
    straight = train(dcgan, faces, tmp_path / 'a', '--epochs', '2', *flags)
    assert straight['model_args']['linear_out']
    train(dcgan, faces, tmp_path / 'b', '--epochs', '1', *flags)
    assert_same_state(straight, train(dcgan, faces, tmp_path / 'b', '--epochs', '2', '--resume'))
    G, _ = sampling.load_generator(straight)
    assert not any(isinstance(m, torch.nn.Tanh) for m in G.modules())
    G.net[-1].bias.data.fill_(3.0)                                  # every pixel far past white before the clamp
    z = dcgan.sample_inputs(straight['model_args'], 4, 'cpu', torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = G(*z)
    assert raw.min() > 1.5                                         # the raw output is not squashed ...
    assert torch.equal(sampling.generate(G, z), torch.ones_like(raw))   # ... the samples are clamped
    old = dict(straight['model_args']); del old['linear_out']      # a checkpoint written before the flag
    assert isinstance(dcgan.Generator(**old).net[-1], torch.nn.Tanh)


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_r1_penalty_against_closed_form(module):
    """For D(x) = w . x + x . A x the input gradient is w + (A + A^T) x: R1 is the batch mean of its squared norm."""
    torch.manual_seed(0)
    w, A = torch.randn(12), torch.randn(12, 12)
    x = torch.randn(5, 12, requires_grad=True)
    logits = x @ w + ((x @ A) * x).sum(1)
    ref = (w + x.detach() @ (A + A.T)).pow(2).sum(1).mean()
    r1 = module.d_r1_loss(logits, x)
    assert torch.allclose(r1, ref)
    r1.backward()                                  # create_graph: the penalty itself has a gradient
    assert torch.allclose(x.grad, 2 * (w + x.detach() @ (A + A.T)) @ (A + A.T).T / 5, rtol=1e-4, atol=1e-5)


def test_standing_stats_are_the_mean_batch_statistics():
    """standing_stats: each BatchNorm's running mean/var become the average over the batches of that layer's
    batch mean/unbiased variance in train mode; weights, momentum and the global RNG are left as they were."""
    torch.manual_seed(0)
    G = dcgan.Generator(z_dim=16, ngf=4)
    G.apply(dcgan.init_weights)
    ref = dcgan.Generator(z_dim=16, ngf=4)
    ref.load_state_dict(G.state_dict())
    seen = {}   # BN name -> list of (batch mean, batch unbiased var), recorded on a copy
    def hook(name):
        def f(m, inp, out):
            x = inp[0].transpose(0, 1).flatten(1)
            seen.setdefault(name, []).append((x.mean(1), x.var(1)))
        return f
    bns = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for n, m in bns.items():
        m.register_forward_hook(hook(n))
    ref.train()
    g = sampling.sample_rng(3)
    with torch.no_grad():
        for _ in range(5):
            ref(*dcgan.sample_inputs({'z_dim': 16}, 6, 'cpu', g))
    weights, rng = {k: v.clone() for k, v in G.named_parameters()}, torch.get_rng_state()
    out = recipes.standing_stats(G, dcgan.sample_inputs, {'z_dim': 16}, batch_size=6, batches=5, seed=3)
    assert out is G and not G.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in G.named_parameters())
    for n, m in G.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            means, vars_ = zip(*seen[n])
            assert torch.allclose(m.running_mean, torch.stack(means).mean(0), atol=1e-5), n
            assert torch.allclose(m.running_var, torch.stack(vars_).mean(0), rtol=1e-4, atol=1e-6), n
            assert m.momentum == 0.1
    assert len(seen) == 4


def test_ema_accumulate():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    recipes.accumulate(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)
    assert recipes.ema_beta(64, 10) == pytest.approx(0.5 ** (64 / 10000)) and recipes.ema_beta(64, 0) == 0.0
    # a half-life of 10 kimg: after 10,000 images at batch 64 the old weights weigh one half
    assert recipes.ema_beta(64, 10) ** (10000 / 64) == pytest.approx(0.5)


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_spectral_norm_bounds_each_layer(module):
    torch.manual_seed(0)
    D = module.Discriminator(16, sn=True)
    D.apply(module.init_weights)   # leaves the normalised convs alone
    for _ in range(30):            # one power iteration per training-mode forward
        D(torch.randn(4, 3, 64, 64))
    convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules())
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.02)


def test_compile_checkpoint_is_plain(faces, tmp_path):
    """--compile compiles in place: the checkpoint has the eager keys (no `_orig_mod.`), the same first
    step's losses, and it resumes without --compile."""
    eager = train(dcgan, faces, tmp_path / 'a', '--epochs', '1', '--precision', 'fp32', '--log-every', '1')
    comp = train(dcgan, faces, tmp_path / 'b', '--epochs', '1', '--precision', 'fp32', '--log-every', '1', '--compile')
    for k in ('G', 'D'):
        assert list(comp['models'][k]) == list(eager['models'][k])
    first = lambda p: [float(v) for v in open(p).read().split()[1].split(',')[2:6]]
    assert first(tmp_path / 'b' / 'losses.csv') == pytest.approx(first(tmp_path / 'a' / 'losses.csv'), rel=1e-3)
    resumed = train(dcgan, faces, tmp_path / 'b', '--epochs', '2', '--resume', '--no-compile')
    assert resumed['step'] == 4 and not resumed['args']['compile']


def test_precision_auto_and_emulated_bf16_warning(faces, tmp_path, monkeypatch):
    """auto = bf16 only where the CPU has it natively; bf16 asked for on a CPU without it (emulated, 23x
    slower measured) trains, but says so in the log."""
    cpu = torch.device('cpu')
    for native in (True, False):
        monkeypatch.setattr(common, 'cpu_has_bf16', lambda: native)
        monkeypatch.setattr(training, 'cpu_has_bf16', lambda: native)   # where Run looks it up
        assert common.pick_precision('auto', cpu) == (torch.bfloat16 if native else None)
        assert common.pick_precision('fp32', cpu) is None and common.pick_precision('bf16', cpu) == torch.bfloat16
        out = tmp_path / str(native)
        train(dcgan, faces, out, '--epochs', '1', '--precision', 'bf16')
        assert ('warning: --precision bf16 on a CPU without native bf16' in (out / 'log.txt').read_text()) != native


@pytest.mark.parametrize('name', ['dcgan', 'lsgan', 'acgan', 'wacgan_gp', 'stylegan'])
def test_recipe_best_sets_exactly_its_values(name):
    """--recipe best changes exactly the flags of the script's BEST and nothing else; reports = the defaults;
    a flag given explicitly wins over the recipe; --help shows the recipe's values."""
    module = __import__(name)
    reports, best = (vars(module.get_args(['--recipe', r])) for r in ('reports', 'best'))
    assert vars(module.get_args([])) == reports
    changed = {k: v for k, v in best.items() if reports[k] != v}
    assert changed == {'recipe': 'best', **{k: v for k, v in module.BEST.items() if reports[k] != v}}
    assert all(best[k] == v for k, v in module.BEST.items())
    assert module.get_args(['--recipe', 'best', '--epochs', '3', '--ema-kimg', '2']).epochs == 3
    assert module.get_args(['--recipe', 'best', '--epochs', '3', '--ema-kimg', '2']).ema_kimg == 2


def test_recipe_quick_sets_exactly_its_values(capsys):
    """dcgan.py --recipe quick (the README's first run) changes exactly QUICK's flags; --help names it."""
    reports, quick = vars(dcgan.get_args([])), vars(dcgan.get_args(['--recipe', 'quick']))
    assert {k: v for k, v in quick.items() if reports[k] != v} == {'recipe': 'quick', **dcgan.QUICK}
    assert dcgan.get_args(['--recipe', 'quick', '--lr-g', '1e-3']).lr_g == 1e-3
    with pytest.raises(SystemExit):
        dcgan.get_args(['--help'])
    assert 'quick = --lr-g 0.0002 --lr-d 0.0002' in ' '.join(capsys.readouterr().out.split())


def test_recipe_is_what_the_shipped_run_used_and_resumes(faces, tmp_path):
    """`--recipe best --epochs 80` is the shipped DCGAN's flag soup, value for value, in the run log; a run
    started with a recipe resumes with it, no flags needed."""
    soup = ['--lr-g', '2e-4', '--lr-d', '2e-4', '--ema-kimg', '10', '--diffaug', 'color,translation,cutout',
            '--fake-label', '0', '--lr-halve-at', '28,44,60', '--upsample', '--r1', '0.1', '--epochs', '80']
    a, b = vars(dcgan.get_args(soup)), vars(dcgan.get_args(['--recipe', 'best', '--epochs', '80']))
    assert {k: v for k, v in a.items() if k != 'recipe'} == {k: v for k, v in b.items() if k != 'recipe'}
    out = tmp_path / 'run'
    train(dcgan, faces, out, '--recipe', 'best', '--epochs', '1')
    flags = [line for line in open(out / 'log.txt').read().splitlines() if line.startswith('flags in force:')]
    assert '--r1 0.1' in flags[0] and '--upsample True' in flags[0] and '--lr-halve-at 28,44,60' in flags[0]
    ckpt = train(dcgan, faces, out, '--epochs', '2', '--resume')
    assert ckpt['args']['recipe'] == 'best' and ckpt['args']['r1'] == 0.1 and ckpt['args']['ema_kimg'] == 10
    assert ckpt['model_args']['upsample'] and ckpt['step'] == 4


def test_resume_keeps_flags_and_refuses_overwrite(faces, tmp_path):
    out = tmp_path / 'run'
    train(dcgan, faces, out, '--epochs', '1', '--lr-g', '1e-3', '--deterministic', '--flip')
    args = dcgan.get_args(['--out', str(out), '--resume', '--epochs', '3'])
    assert args.lr_g == 1e-3 and args.ngf == 8 and args.epochs == 3 and args.data == faces and args.flip
    before = open(out / 'ckpt.pt', 'rb').read()
    with pytest.raises(UserError, match='pass --resume'):
        train(dcgan, faces, out, '--epochs', '1')
    assert open(out / 'ckpt.pt', 'rb').read() == before
    # an architecture flag given again with another value: one clear line, the checkpoint untouched
    with pytest.raises(UserError, match=r'its G does not fit .*changed since the run started: .*--ngf'):
        train(dcgan, faces, out, '--epochs', '2', '--resume', '--ngf', '16')
    assert open(out / 'ckpt.pt', 'rb').read() == before
    with pytest.raises(SystemExit):
        dcgan.get_args(['--out', str(tmp_path / 'new'), '--resume'])


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_sample_reproduces_fixed_grid(module, faces, tmp_path, capsys):
    out = tmp_path / 'run'
    train(module, faces, out, '--epochs', '1')
    module.main(['--sample', '6', '--ckpt', str(out / 'ckpt.pt'), '--device', 'cpu'])
    s = out / 'sample'
    trained = np.asarray(Image.open(out / 'grids' / 'step_00000002.png'))
    assert np.array_equal(np.asarray(Image.open(s / 'fixed_grid.png')), trained)
    assert sorted(os.listdir(s)) == [f'{i:06d}.png' for i in range(6)] + ['fixed_grid.png', 'grid.png']
    # same seed: the images the run wrote to samples/ at the end
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(s / f'{i:06d}.png')), np.asarray(Image.open(out / 'samples' / f'{i:06d}.png')))
    # --export: a generator-only fp16 file that samples the same images, to fp16 precision, from itself alone
    small = tmp_path / 'G.pt'
    module.main(['--export', str(small), '--ckpt', str(out / 'ckpt.pt')])
    assert f'wrote {small}' in capsys.readouterr().out
    g = common.load_checkpoint(str(small))
    assert list(g['models']) == [g['sample_model']] and g['model_args'] == common.load_checkpoint(str(out / 'ckpt.pt'))['model_args']
    assert all(v.dtype == torch.float16 for v in g['models'][g['sample_model']].values() if v.is_floating_point())
    assert small.stat().st_size < (out / 'ckpt.pt').stat().st_size / 4
    module.main(['--sample', '6', '--ckpt', str(small), '--out', str(tmp_path / 's2'), '--device', 'cpu'])
    a = np.asarray(Image.open(s / '000003.png'), dtype=int)
    b = np.asarray(Image.open(tmp_path / 's2' / '000003.png'), dtype=int)
    assert np.abs(a - b).mean() < 2


def test_losses_against_definitions():
    r, f = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.2, 1.0])
    sig = torch.sigmoid
    ref = -(0.9 * sig(r).log() + 0.1 * (1 - sig(r)).log()).mean() - (0.1 * sig(f).log() + 0.9 * (1 - sig(f)).log()).mean()
    assert torch.allclose(dcgan.d_loss(r, f, 0.9, 0.1), ref)
    assert torch.allclose(dcgan.g_loss(f, 1.0), -sig(f).log().mean())
    # LSGAN: mean of squares (not square of the mean), no sigmoid
    assert torch.allclose(lsgan.d_loss(r, f, 1.0, 0.0), 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f ** 2).mean())
    assert torch.allclose(lsgan.g_loss(f, 1.0), 0.5 * ((f - 1) ** 2).mean())
    assert lsgan.g_loss(torch.tensor([0.0, 2.0]), 1.0) == 0.5   # the square of the mean would give 0
    # hinge: zero once a real scores >= 1 and a fake <= -1
    assert torch.allclose(dcgan.d_hinge_loss(r, f), (1 - r).clamp(min=0).mean() + (1 + f).clamp(min=0).mean())
    assert dcgan.d_hinge_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -2.0])) == 0
    assert torch.allclose(dcgan.g_hinge_loss(f), -f.mean())


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_models_shapes_and_logits(module):
    G, D = module.Generator(z_dim=16, ngf=8), module.Discriminator(ndf=8)
    G.apply(module.init_weights), D.apply(module.init_weights)
    x = G(torch.randn(5, 16))
    assert x.shape == (5, 3, 64, 64) and x.abs().max() <= 1
    with torch.no_grad():
        D.net[-1].weight.mul_(1000)          # a raw output is unbounded: no sigmoid inside D
    out = D(torch.randn(5, 3, 64, 64))
    assert out.shape == (5,) and (out.abs() > 1).any()


@pytest.mark.parametrize('module', SCRIPTS, ids=ids)
def test_nan_stops_and_keeps_last_good_checkpoint(module, faces, tmp_path, monkeypatch):
    calls = {'n': 0}
    real_loss = module.g_loss

    def poisoned(*a):   # G's loss turns NaN at the 3rd step, after the step-2 checkpoint
        calls['n'] += 1
        loss = real_loss(*a)
        return loss * float('nan') if calls['n'] >= 3 else loss
    monkeypatch.setattr(module, 'g_loss', poisoned)
    out = tmp_path / 'run'
    with pytest.raises(progress.NonFiniteLoss, match='non-finite loss at step 3.*last good checkpoint'):
        train(module, faces, out, '--epochs', '3')
    ckpt = common.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['step'] == 2
    assert all(torch.isfinite(v).all() for v in ckpt['models']['G'].values() if v.is_floating_point())


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_cli_errors_are_one_line(tmp_path):
    p = run_cli('dcgan.py', '--data', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o'), '--device', 'cpu')
    assert p.returncode == 1 and p.stderr.strip().count('\n') == 0 and 'missing: no such file' in p.stderr
    p = run_cli('lsgan.py', '--epochs', '0')
    assert p.returncode == 2 and '--epochs must be positive' in p.stderr
    p = run_cli('dcgan.py', '--sample', '4', '--ckpt', str(tmp_path / 'nope.pt'))
    assert p.returncode == 1 and 'nope.pt not found' in p.stderr
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'lsgan.py'), '--sample', '2'], cwd=tmp_path,
                       capture_output=True, text=True)   # default checkpoint: runs/<script>/ckpt.pt
    assert p.returncode == 1 and 'runs/lsgan/ckpt.pt not found' in p.stderr
    p = run_cli('dcgan.py', '--help')
    assert p.returncode == 0 and '--lr-g' in p.stdout and '0.0005' in p.stdout


def test_import_has_no_side_effects(tmp_path):
    p = subprocess.run([sys.executable, '-c', 'from dcgan import Generator; from lsgan import Discriminator; import common'],
                       cwd=tmp_path, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == '' and p.stderr == '' and os.listdir(tmp_path) == []


def test_sigterm_saves_then_resumes(faces, tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, 'dcgan.py', '--data', faces, '--out', str(out), *TINY, '--epochs', '100000', '--save-every', '1000000']
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:            # wait until it is training
        if line.startswith('[dcgan]') and 'step 3/' in line:
            break
    p.send_signal(signal.SIGTERM)
    rest = p.stdout.read()
    assert p.wait(timeout=120) == 128 + signal.SIGTERM, rest
    assert '--resume' in rest
    ckpt = common.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['step'] >= 3 and not os.path.exists(out / 'samples')
    p = run_cli('dcgan.py', '--out', str(out), '--resume', '--epochs', str(ckpt['step'] // 2 + 1))
    assert p.returncode == 0, p.stderr
    assert common.load_checkpoint(str(out / 'ckpt.pt'))['step'] == (ckpt['step'] // 2 + 1) * 2


def test_torchrun_two_processes(faces, tmp_path):
    out = tmp_path / 'ddp'
    p = run_cli('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'dcgan.py',
                '--data', faces, '--out', str(out), *TINY, '--epochs', '2')
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = common.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['step'] == 4 and len(ckpt['rng']) == 2 and 'x2 processes' in p.stdout
    assert len(os.listdir(out / 'samples')) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA GPU')
@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'fp16'])
def test_cuda(faces, tmp_path, precision):
    out = tmp_path / precision
    dcgan.main(['--data', faces, '--out', str(out), *TINY, '--device', 'cuda', '--precision', precision, '--epochs', '1'])
    ckpt = common.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['step'] == 2 and (precision != 'fp16' or ckpt['scalers'])
    dcgan.main(['--out', str(out), '--resume', '--epochs', '2', '--device', 'cuda'])
    assert common.load_checkpoint(str(out / 'ckpt.pt'))['step'] == 4
