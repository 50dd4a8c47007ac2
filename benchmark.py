"""Speed, measured side by side in one process (run by hand, not by CI).

    python benchmark.py                      # every model script vs. its textbook loop, fid.py vs. pytorch-fid
    python benchmark.py --only dcgan fid     # a subset
    python benchmark.py --only stylegan      # stylegan.py's fast path (bf16, channels-last) vs its fp32 path
    python benchmark.py --only dcgan --script-flags=--compile   # the scripts with extra flags (here torch.compile)

Training: each model script runs as its users run it (its own main(), default model size and batch,
in-memory data, its default precision), and its img/s is read from the run's losses.csv (the logging
intervals after the first, so start-up and warm-up are excluded). The textbook loop is the same model
and losses trained the way pytorch/examples' dcgan/main.py does it: torchvision ImageFolder + DataLoader
(2 workers) + PIL transforms every epoch, fp32, default memory layout, loss.item() every step. The two
alternate --repeats times and the medians are compared.

FID: fid.py's feature extraction against pytorch-fid's InceptionV3 (same weights, same 500 images,
batch 50), alternating chunk by chunk; also the largest difference between their features.
"""
import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import common
import dataset

HERE = os.path.dirname(os.path.abspath(__file__))


def script_img_per_s(module, data, out, steps, extra=()):
    """Train `steps` steps with the script's own main(); median img/s of its logging intervals."""
    shutil.rmtree(out, ignore_errors=True)
    n = len(torch.load(data, weights_only=True)['files'])
    spe = n // module.get_args(['--data', data, '--out', out, *extra]).batch_size
    epochs = max(1, -(-steps // spe))
    with contextlib.redirect_stdout(io.StringIO()):   # its progress lines; the numbers are in losses.csv
        module.main(['--data', data, '--out', out, '--epochs', str(epochs), '--log-every', '10', '--grid-every',
                     '100000', '--save-every', '100000', '--snapshot-every', '0', '--n-samples', '0', *extra])
    rows = [r.split(',') for r in open(os.path.join(out, 'losses.csv')).read().split()[1:]]
    return statistics.median(float(r[-1]) for r in rows[1:])


def textbook_img_per_s(module, folder, steps, batch=64, workers=2):
    """pytorch/examples-style DCGAN loop: ImageFolder + DataLoader + transforms every epoch, fp32."""
    import torchvision.datasets as dset
    import torchvision.transforms as T
    root = tempfile.mkdtemp()
    os.symlink(os.path.abspath(folder), os.path.join(root, 'faces'))   # ImageFolder wants class folders
    ds = dset.ImageFolder(root, transform=T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(),
                                                     T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    G, D = module.Generator(), module.Discriminator()
    G.apply(module.init_weights), D.apply(module.init_weights)
    opt_g = torch.optim.Adam(G.parameters(), lr=5e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.999))
    done, t0, warm = 0, None, 5
    while done < steps + warm:
        for real, _ in loader:
            if done == warm:
                t0 = time.time()
            fake = G(torch.randn(batch, 100))
            loss_d = module.d_loss(D(real), D(fake.detach()), 0.9, 0.1)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = module.g_loss(D(fake), 0.9)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            loss_d.item(), loss_g.item()   # the textbook prints these every step
            done += 1
            if done >= steps + warm:
                break
    shutil.rmtree(root)
    return steps * batch / (time.time() - t0)


def textbook_conditional_img_per_s(module, folder, labels_csv, steps, batch=64, workers=2):
    """The same textbook data path for acgan.py / wacgan_gp.py: a Dataset that opens each image with PIL and
    looks its labels up, DataLoader, fp32, loss.item() every step; the script's own models and losses."""
    import torchvision.transforms as T
    from PIL import Image
    files = [os.path.relpath(f, folder) for f in dataset.list_images(folder)]
    y, vocab = dataset.join_labels(labels_csv, files)
    model_args = dict(z_dim=100, ngf=64, **dataset.label_model_args(y, vocab, labels_csv))
    tf = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    class Faces(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(Image.open(os.path.join(folder, files[i])).convert('RGB')), y[i]

    loader = torch.utils.data.DataLoader(Faces(), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    G = module.Generator(**model_args)
    D = (module.Critic if hasattr(module, 'Critic') else module.Discriminator)(64, G.n_classes)
    G.apply(module.init_weights), D.apply(module.init_weights)
    wgan = hasattr(module, 'Critic')
    betas = (0.5, 0.9) if wgan else (0.5, 0.999)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=betas)
    done, t0, warm = 0, None, 5
    while done < steps + warm:
        for real, y_real in loader:
            if done == warm:
                t0 = time.time()
            z, y_fake = module.sample_inputs(model_args, batch, 'cpu')
            fake = G(z, y_fake)
            (rs, rc), (fs, fc) = D(real), D(fake.detach())
            if wgan:
                gp = module.gradient_penalty(D, module.interpolates(real, fake.detach()))
                loss_d = module.critic_loss(rs, fs) + 10 * gp + module.cls_loss(rc, y_real) + module.cls_loss(fc, y_fake)
            else:
                loss_d = module.d_adv_loss(rs, fs, 0.9, 0.1) + module.cls_loss(rc, y_real) + module.cls_loss(fc, y_fake)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            if not wgan or done % 5 == 4:
                gs, gc = D(fake)
                loss_g = (module.g_wgan_loss(gs) if wgan else module.g_adv_loss(gs, 0.9)) + module.cls_loss(gc, y_fake)
                opt_g.zero_grad()
                loss_g.backward()
                opt_g.step()
                loss_g.item()
            loss_d.item()   # the textbook prints these every step
            done += 1
            if done >= steps + warm:
                break
    return steps * batch / (time.time() - t0)


def step_gflop(module):
    """FLOPs of one default-size training step (forward + backward of D twice, G once), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode
    G, D = module.Generator(), module.Discriminator()
    real = torch.randn(64, 3, 64, 64)
    with FlopCounterMode(display=False) as fc:
        fake = G(torch.randn(64, 100))
        module.d_loss(D(real), D(fake.detach()), 0.9, 0.1).backward()
        D.requires_grad_(False)
        module.g_loss(D(fake), 0.9).backward()
    return fc.get_total_flops() / 1e9


def bench_training(names, data_folder, steps, repeats, labels, script_flags=()):
    work = tempfile.mkdtemp()
    images, files = dataset.load_images(data_folder, 64)
    cache = os.path.join(work, 'data.pt')
    torch.save({'images': images, 'files': files}, cache)
    for name in names:
        module = __import__(name)
        fast, slow = [], []
        for r in range(repeats):
            cond = ['--labels', labels, '--control-n', '0'] if name in ('acgan', 'wacgan_gp') else []
            cond += list(script_flags)
            fast.append(script_img_per_s(module, cache, os.path.join(work, name), steps, cond))
            if name == 'stylegan':   # against its own fp32, default-layout path
                slow.append(script_img_per_s(module, cache, os.path.join(work, name), steps, ['--precision', 'fp32', '--no-channels-last']))
                print(f'  {name} repeat {r + 1}: fast path {fast[-1]:.1f} img/s, fp32 path {slow[-1]:.1f} img/s', flush=True)
                continue
            if name in ('acgan', 'wacgan_gp'):
                slow.append(textbook_conditional_img_per_s(module, data_folder, labels, steps))
            else:
                slow.append(textbook_img_per_s(module, data_folder, steps))
            print(f'  {name} repeat {r + 1}: script {fast[-1]:.1f} img/s, textbook {slow[-1]:.1f} img/s', flush=True)
        f, s = statistics.median(fast), statistics.median(slow)
        if name in ('acgan', 'wacgan_gp'):
            print(f'{name:10s} script {f:7.1f} img/s | textbook {s:7.1f} img/s | ratio {f / s:.2f}x', flush=True)
            continue
        if name == 'stylegan':
            print(f'{name:10s} fast path {f:7.1f} img/s | fp32 path {s:7.1f} img/s | ratio {f / s:.2f}x', flush=True)
            continue
        gflop = step_gflop(module)
        print(f'{name:10s} script {f:7.1f} img/s | textbook {s:7.1f} img/s | ratio {f / s:.2f}x | '
              f'{gflop:.1f} GFLOP/step -> {gflop * f / 64:.0f} GFLOP/s achieved', flush=True)
    shutil.rmtree(work)


def bench_fid(data_folder, weights, n=500, chunk=100):
    import fid
    import pytorch_fid.inception as pfi
    sd = torch.load(weights, weights_only=True)
    pfi.load_state_dict_from_url = lambda *a, **k: {**sd, 'fc.weight': torch.zeros(1008, 2048), 'fc.bias': torch.zeros(1008)}
    ref = pfi.InceptionV3([3]).eval()
    ours = fid.Extractor('fid', weights)
    images, _ = dataset.load_images(data_folder, None, log=lambda m: None)
    images = images[:n]
    t_ours, t_ref, diff = [], [], 0.0
    with torch.inference_mode():
        ours(images[:10]), ref(images[:10].float() / 255)   # warm-up
        for i in range(0, len(images), chunk):
            x = images[i:i + chunk]
            t = time.time()
            a = torch.cat([ours(b) for b in x.split(50)])
            t_ours.append(len(x) / (time.time() - t))
            t = time.time()
            b = torch.cat([ref(b.float() / 255)[0].flatten(1) for b in x.split(50)])   # pytorch-fid's ToTensor: /255
            t_ref.append(len(x) / (time.time() - t))
            diff = max(diff, (a - b).abs().max().item())
    f, s = statistics.median(t_ours), statistics.median(t_ref)
    print(f'fid.py     {f:7.1f} img/s | pytorch-fid {s:7.1f} img/s | ratio {f / s:.2f}x | '
          f'{len(images)} images, max |feature diff| {diff:.2e}', flush=True)


def bench_critic(steps=10, batch=64):
    """wacgan_gp.py's critic step taken apart (ms): real and fake in two calls or one, the penalty in fp32 or
    bf16, and one call over real, fake and interpolates together."""
    import wacgan_gp as w
    torch.manual_seed(0)
    D = w.Critic(64, [10, 6, 2]).to(memory_format=torch.channels_last)
    D.apply(w.init_weights)
    real, fake = (torch.randn(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last) for _ in range(2))
    bf16 = lambda: torch.autocast('cpu', dtype=torch.bfloat16)

    def separate(gp_bf16, one_call=True):
        with bf16():
            rs, fs = w.critic_real_fake(D, real, fake)[:2] if one_call else (D(real)[0], D(fake)[0])
        loss = w.critic_loss(rs.float(), fs.float()) + 10 * w.gradient_penalty(D, w.interpolates(real, fake), bf16() if gp_bf16 else None)
        loss.backward()

    def fused(use_bf16):
        x_hat = w.interpolates(real, fake).requires_grad_(True)
        with bf16() if use_bf16 else contextlib.nullcontext():
            rs, fs, hs = D(torch.cat([real, fake, x_hat]))[0].float().chunk(3)
        grad, = torch.autograd.grad(hs.sum(), x_hat, create_graph=True)
        (w.critic_loss(rs, fs) + 10 * (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()).backward()

    for name, step in [('real + fake in two bf16 calls, fp32 penalty', lambda: separate(False, False)),
                       ('real + fake in one bf16 call, fp32 penalty (default)', lambda: separate(False)),
                       ('real + fake in one bf16 call, bf16 penalty (--gp-precision same)', lambda: separate(True)),
                       ('real, fake, interpolates in one fp32 call', lambda: fused(False)),
                       ('real, fake, interpolates in one bf16 call', lambda: fused(True))]:
        for _ in range(3):
            D.zero_grad(set_to_none=True), step()
        t = time.time()
        for _ in range(steps):
            D.zero_grad(set_to_none=True), step()
        print(f'critic step: {name:62s} {(time.time() - t) / steps * 1000:6.0f} ms', flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', nargs='*', default=['dcgan', 'lsgan', 'acgan', 'wacgan_gp', 'stylegan', 'fid'],
                   help='what to time; also `critic`: wacgan_gp.py\'s critic step taken apart (default: %(default)s)')
    p.add_argument('--data', default=common.DEFAULT_DATA, help='image folder (default: the bundled faces)')
    p.add_argument('--labels', default=os.path.join(HERE, 'data', 'labels.csv'),
                   help='labels CSV of --data, for acgan and wacgan_gp (default: %(default)s)')
    p.add_argument('--steps', type=int, default=60, help='timed steps per training measurement (default: %(default)s)')
    p.add_argument('--script-flags', default='', help='extra flags for every script run, e.g. --script-flags=--compile '
                   '(its compile time falls in the first logging interval, which is not counted)')
    p.add_argument('--repeats', type=int, default=3, help='alternations per model (default: %(default)s)')
    p.add_argument('--weights', default=os.path.join(HERE, '..', 'shared', 'weights', 'pt_inception-2015-12-05-nofc.pth'),
                   help='FID Inception weights for both fid.py and pytorch-fid (default: %(default)s)')
    args = p.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 CPU: {common.cpu_has_bf16()}', flush=True)
    models = [m for m in args.only if m not in ('fid', 'critic')]
    if models:
        bench_training(models, args.data, args.steps, args.repeats, args.labels, args.script_flags.split())
    if 'fid' in args.only:
        bench_fid(args.data, args.weights)
    if 'critic' in args.only:
        bench_critic()


if __name__ == '__main__':
    sys.exit(main())
