"""Label synthesis: from a few hand-labelled faces to attribute labels for a whole dataset.

The conditional models (acgan.py, wacgan_gp.py) need attributes such as hair colour, eye colour and
gender for every face. With a few hundred hand labels this script trains a small CNN attribute
classifier from scratch (one head per CSV column; strong augmentation that never touches hue, since
hue IS the label), uses the unlabelled faces by consistency training (FixMatch, Sohn et al. 2020,
https://arxiv.org/abs/2001.07685: confident predictions on a weak view become targets for a strong
view), reports held-out accuracy against a nearest-colour baseline, and labels every face.

    python label.py train --data faces/ --labels hand-labels.csv --out runs/label
    python label.py predict --ckpt runs/label/ckpt.pt --data faces/ --out labels.csv --min-confidence 0.5
    python label.py score --ckpt runs/label/ckpt.pt --gen runs/dcgan/ckpt.pt     # attributes of samples
    python label.py score --ckpt runs/label/ckpt.pt --gen samples/ --attr hair=blonde
"""
import argparse
import csv
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import dataset
import sampling


# ----------------------------------------------------------------------------------------------------
# Model: a small CNN, one linear head per attribute (logits)

class Classifier(nn.Module):
    def __init__(self, n_classes, width=32):
        super().__init__()
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
                                   nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
        w = width
        self.features = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),              # w x 32 x 32
            *block(w, 2 * w), nn.MaxPool2d(2),          # 2w x 16 x 16
            *block(2 * w, 4 * w), nn.MaxPool2d(2),      # 4w x 8 x 8
            *block(4 * w, 8 * w),                       # 8w x 8 x 8
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3),
        )
        self.heads = nn.ModuleList(nn.Linear(8 * w, n) for n in n_classes)

    def forward(self, x):                               # x in [-1, 1]
        h = self.features(x)
        return [head(h) for head in self.heads]


# ----------------------------------------------------------------------------------------------------
# Augmentation on batches of float images in [-1, 1]; geometry and brightness only, never hue

def augment(x, strong, generator=None):
    B = len(x)
    rnd = lambda *s: torch.rand(*s, generator=generator)
    flip = rnd(B) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    # random scale/translate through an affine grid: zoom 0.8-1.0 (weak) or 0.65-1.0 (strong)
    lo = 0.65 if strong else 0.8
    scale = lo + (1 - lo) * rnd(B)
    shift = (rnd(B, 2) * 2 - 1) * (1 - scale).unsqueeze(1)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    x = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), padding_mode='reflection', align_corners=False)
    if strong:   # brightness and contrast (the same factor on all channels keeps the hue), and a cutout
        b = (rnd(B, 1, 1, 1) - 0.5) * 0.4
        c = 0.7 + 0.6 * rnd(B, 1, 1, 1)
        x = ((x - x.mean((1, 2, 3), keepdim=True)) * c + x.mean((1, 2, 3), keepdim=True) + b).clamp(-1, 1)
        s = x.shape[-1] // 4
        cy, cx = (rnd(B) * (x.shape[-1] - s)).long(), (rnd(B) * (x.shape[-1] - s)).long()
        ys, xs = torch.arange(x.shape[-1]).view(1, -1, 1), torch.arange(x.shape[-1]).view(1, 1, -1)
        hole = ((ys >= cy.view(-1, 1, 1)) & (ys < (cy + s).view(-1, 1, 1)) & (xs >= cx.view(-1, 1, 1)) & (xs < (cx + s).view(-1, 1, 1)))
        x = x.masked_fill(hole.unsqueeze(1), 0.0)
    return x


def to_float(u8):
    return u8.float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------
# Losses

def supervised_loss(logits, y, weights=None):
    """Cross-entropy per attribute on logits (optionally class-weighted); -1 (unknown) is ignored."""
    losses = [F.cross_entropy(lg.float(), y[:, i], weight=weights[i] if weights else None, ignore_index=-1)
              for i, lg in enumerate(logits) if (y[:, i] >= 0).any()]
    return sum(losses) / max(len(losses), 1)


def class_weights(y, n_classes):
    """Inverse class frequency, normalised to mean 1: a rare class (male faces) counts as much as a common one."""
    out = []
    for i, k in enumerate(n_classes):
        counts = torch.bincount(y[:, i][y[:, i] >= 0], minlength=k).float().clamp(min=1)
        w = counts.sum() / (k * counts)
        out.append(w / w.mean())
    return out


def consistency_loss(weak_logits, strong_logits, threshold):
    """FixMatch: where the weak view is confident, its argmax is the target of the strong view."""
    total = 0.0
    for w, s in zip(weak_logits, strong_logits):
        conf, target = F.softmax(w.float(), 1).max(1)
        mask = (conf >= threshold).float()
        total = total + (F.cross_entropy(s.float(), target, reduction='none') * mask).mean()
    return total / len(weak_logits)


# ----------------------------------------------------------------------------------------------------
# Training and evaluation

def split(y, val_frac, seed):
    """A fixed random split of the labelled rows: (train indices, validation indices)."""
    labelled = torch.nonzero((y >= 0).any(1)).flatten()
    perm = labelled[torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed))]
    n_val = int(round(len(perm) * val_frac))
    return perm[n_val:], perm[:n_val]


@torch.inference_mode()
def predict_probs(model, images, batch_size=500):
    model.eval()
    out = [[] for _ in model.heads]
    for i in range(0, len(images), batch_size):
        for j, lg in enumerate(model(to_float(images[i:i + batch_size]))):
            out[j].append(F.softmax(lg.float(), 1))
    return [torch.cat(o) for o in out]


def evaluate(probs, y, vocab):
    """Accuracy and confusion matrix (rows: true, columns: predicted) per attribute."""
    res = {}
    for i, (a, values) in enumerate(vocab.items()):
        known = y[:, i] >= 0
        pred, true = probs[i][known].argmax(1), y[known, i]
        cm = torch.zeros(len(values), len(values), dtype=torch.long)
        cm.index_put_((true, pred), torch.ones_like(true), accumulate=True)
        res[a] = {'accuracy': (pred == true).float().mean().item() if len(true) else float('nan'),
                  'n': int(len(true)), 'confusion': cm.tolist()}
    return res


def colour_baseline(images, y, train_idx, val_idx, vocab):
    """Nearest-colour baseline: each class is the mean colour of its training faces (hair: the top third of
    the face, eyes: the middle band, gender: the whole face); a face gets the class of the nearest mean."""
    regions = {'hair': slice(0, 21), 'eyes': slice(24, 40)}
    res = {}
    for i, a in enumerate(vocab):
        r = regions.get(a, slice(None))
        feats = images[:, :, r, :].float().mean((2, 3))
        tr, va = train_idx[y[train_idx, i] >= 0], val_idx[y[val_idx, i] >= 0]
        means = torch.stack([feats[tr][y[tr, i] == c].mean(0) if (y[tr, i] == c).any() else torch.full((3,), 1e9)
                             for c in range(len(vocab[a]))])
        pred = torch.cdist(feats[va], means).argmin(1)
        res[a] = (pred == y[va, i]).float().mean().item() if len(va) else float('nan')
    return res


def train(args):
    common.seed_everything(args.seed)
    images, files = dataset.load_images(args.data, 64)
    _, table = dataset.read_labels_csv(args.labels)
    known = set(files) | {os.path.basename(f) for f in files}
    lost = [k for k in table if k not in known]
    if lost:   # a hand label that trains nothing is a typo or the wrong folder
        common.fail(f'--labels {args.labels}: {len(lost)} labelled file(s) are not in --data {args.data}, e.g. {lost[0]}; '
                    f'fix the names or point --data at the folder they come from')
    y, vocab = dataset.join_labels(args.labels, files, require_all=False)
    train_idx, val_idx = split(y, args.val_frac, args.seed)
    unlabelled = torch.nonzero((y < 0).all(1)).flatten()
    print(f'{len(images)} faces: {len(train_idx)} labelled for training, {len(val_idx)} held out, '
          f'{len(unlabelled)} unlabelled ({"used" if args.unlabelled_weight > 0 else "not used"})', flush=True)
    os.makedirs(args.out, exist_ok=True)
    model = Classifier([len(v) for v in vocab.values()], args.width).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps)
    g = torch.Generator().manual_seed(args.seed)
    weights = class_weights(y[train_idx], [len(v) for v in vocab.values()]) if args.class_balance else None
    bf16 = torch.autocast('cpu', dtype=torch.bfloat16, enabled=common.cpu_has_bf16())
    t0 = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        idx = train_idx[torch.randint(len(train_idx), (args.batch_size,), generator=g)]
        x = augment(to_float(images[idx]), strong=True, generator=g)
        with bf16:
            loss = supervised_loss(model(x.contiguous(memory_format=torch.channels_last)), y[idx], weights)
        if args.unlabelled_weight > 0 and len(unlabelled):
            u = to_float(images[unlabelled[torch.randint(len(unlabelled), (args.batch_size * args.mu,), generator=g)]])
            with torch.no_grad(), bf16:
                weak = model(augment(u, strong=False, generator=g))
            with bf16:
                strong = model(augment(u, strong=True, generator=g))
            ramp = min(1.0, step / (0.3 * args.steps))   # trust the pseudo-labels only once the model is decent
            loss = loss + args.unlabelled_weight * ramp * consistency_loss(weak, strong, args.threshold)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            acc = evaluate(predict_probs(model, images[val_idx]), y[val_idx], vocab) if len(val_idx) else {}
            print(f'[label] step {step}/{args.steps} | loss {loss.item():.3f} | held-out '
                  + ' '.join(f'{a} {r["accuracy"]:.3f}' for a, r in acc.items()) + f' | {time.time() - t0:.0f}s', flush=True)
    result = evaluate(predict_probs(model, images[val_idx]), y[val_idx], vocab)
    base = colour_baseline(images, y, train_idx, val_idx, vocab)
    ckpt = {'format': common.CKPT_FORMAT, 'script': 'label', 'model_args': {'n_classes': [len(v) for v in vocab.values()],
            'width': args.width}, 'vocab': vocab, 'model': model.state_dict(), 'args': vars(args),
            'val_files': [files[i] for i in val_idx.tolist()]}
    common.atomic_save(ckpt, os.path.join(args.out, 'ckpt.pt'))
    write_report(args, result, base, vocab, len(train_idx), len(val_idx), len(unlabelled))
    return result, base


def write_report(args, result, base, vocab, n_train, n_val, n_unlabelled):
    with open(os.path.join(args.out, 'metrics.json'), 'w') as f:
        json.dump({'held_out': result, 'nearest_colour_baseline': base, 'n_train': n_train, 'n_val': n_val,
                   'n_unlabelled': n_unlabelled, 'args': vars(args)}, f, indent=2)
    lines = [f'Held-out accuracy on {n_val} hand-labelled faces never trained on (a fixed {args.val_frac:.0%} split, '
             f'seed {args.seed}); {n_train} labelled and {n_unlabelled if args.unlabelled_weight > 0 else 0} unlabelled '
             f'faces for training.', '', '| attribute | classes | classifier | nearest-colour baseline | n |',
             '| --- | --- | --- | --- | --- |']
    lines += [f'| {a} | {len(vocab[a])} | {r["accuracy"]:.3f} | {base[a]:.3f} | {r["n"]} |' for a, r in result.items()]
    for a, r in result.items():
        lines += ['', f'{a}: confusion matrix (rows: hand label, columns: predicted)', '',
                  '| | ' + ' | '.join(vocab[a]) + ' |', '|---' * (len(vocab[a]) + 1) + '|']
        lines += [f'| {v} | ' + ' | '.join(str(c) for c in row) + ' |' for v, row in zip(vocab[a], r['confusion'])]
    report = '\n'.join(lines) + '\n'
    with open(os.path.join(args.out, 'report.md'), 'w') as f:
        f.write(report)
    print(report)


def load_classifier(path):
    ckpt = common.load_checkpoint(path)
    if ckpt.get('script') != 'label':
        common.fail(f'{path} is not a label.py checkpoint (it was written by {ckpt.get("script")}.py)')
    model = Classifier(**ckpt['model_args'])
    model.load_state_dict(ckpt['model'])
    return model.eval(), ckpt['vocab']


def predict(args):
    model, vocab = load_classifier(args.ckpt)
    images, files = dataset.load_images(args.data, 64)
    probs = predict_probs(model, images)
    tmp = args.out + '.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file', *vocab, *(f'{a}_confidence' for a in vocab)])
        for r, name in enumerate(files):
            conf = [p[r].max().item() for p in probs]
            vals = [vocab[a][p[r].argmax().item()] if c >= args.min_confidence else ''
                    for a, p, c in zip(vocab, probs, conf)]
            w.writerow([name, *vals, *(f'{c:.3f}' for c in conf)])
    os.replace(tmp, args.out)
    print(f'wrote {args.out}: {len(files)} faces; class shares (empty = below --min-confidence {args.min_confidence}):')
    for i, a in enumerate(vocab):
        conf, pred = probs[i].max(1)
        counts = {v: int(((pred == c) & (conf >= args.min_confidence)).sum()) for c, v in enumerate(vocab[a])}
        print(f'  {a}: ' + ', '.join(f'{v} {n / len(files):.1%}' for v, n in counts.items()) +
              f', empty {(conf < args.min_confidence).float().mean().item():.1%}')


def score(args):
    """Attribute shares of generated faces, how often the asked-for attributes (--attr) appear, and, for a
    conditional generator, how often each face carries the labels it was generated from (asked = got)."""
    model, vocab = load_classifier(args.ckpt)
    asked = dataset.parse_attrs(args.attr, vocab)
    result = {'n': 0, 'shares': {}, 'asked': {}}
    labels = None
    if os.path.isfile(args.gen) and args.gen.endswith('.pt'):
        ckpt = common.load_checkpoint(args.gen)
        G, module = sampling.load_generator(ckpt)
        gen_vocab = ckpt['model_args'].get('vocab')
        xs, ys = [], []
        for x, inputs in sampling.sample_batches(G, module.sample_inputs, ckpt['model_args'], args.n, 'cpu', args.seed,
                                               attrs=asked if gen_vocab else None, with_inputs=True):
            xs.append(x)
            ys.append(inputs[1] if gen_vocab else None)
        images = torch.from_numpy(sampling.to_uint8(torch.cat(xs))).permute(0, 3, 1, 2)
        if gen_vocab:
            labels = torch.cat(ys)
    else:
        images, _ = dataset.load_images(args.gen, 64)
    probs = predict_probs(model, images)
    result['n'] = len(images)
    if args.real:   # the same classifier on real faces: the shares a generator should match (e.g. male share)
        real_probs = predict_probs(model, dataset.load_images(args.real, 64)[0])
        result['real_shares'] = {a: {v: (real_probs[i].argmax(1) == c).float().mean().item() for c, v in enumerate(vocab[a])}
                                 for i, a in enumerate(vocab)}
    for i, a in enumerate(vocab):
        pred = probs[i].argmax(1)
        result['shares'][a] = {v: (pred == c).float().mean().item() for c, v in enumerate(vocab[a])}
        if a in asked:
            result['asked'][a] = {'value': asked[a], 'hit_rate': (pred == vocab[a].index(asked[a])).float().mean().item()}
    if labels is not None:   # the classifier's reading of each face against the class it was generated from
        result['asked_equals_got'] = {}
        for j, a in enumerate(gen_vocab):
            if a not in vocab:
                continue
            want = torch.tensor([vocab[a].index(v) if v in vocab[a] else -1 for v in gen_vocab[a]])[labels[:, j]]
            got = probs[list(vocab).index(a)].argmax(1)
            result['asked_equals_got'][a] = ((got == want) & (want >= 0)).sum().item() / max(1, (want >= 0).sum().item())
    real = result.get('real_shares')
    for a, s in result['shares'].items():
        print(f'{a}: ' + ', '.join(f'{v} {p:.1%}' + (f' (real {real[a][v]:.1%})' if real else '')
                                   for v, p in sorted(s.items(), key=lambda kv: -kv[1])))
    for a, r in result['asked'].items():
        print(f'asked {a}={r["value"]}: got it in {r["hit_rate"]:.1%} of {len(images)} faces')
    if 'asked_equals_got' in result:
        print(f'asked = got (classifier {args.ckpt} on {len(images)} faces): '
              + ', '.join(f'{a} {v:.1%}' for a, v in result['asked_equals_got'].items()))
    return result


def get_args(argv=None):
    p = argparse.ArgumentParser(prog='label.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    t = sub.add_parser('train', help='train the attribute classifier on hand labels (+ unlabelled faces)')
    t.add_argument('--data', default=common.DEFAULT_DATA, help='faces: folder, .zip or data .pt (default: %(default)s)')
    t.add_argument('--labels', default=os.path.join(common.HERE, 'data', 'labels.csv'),
                   help='CSV file,attr1,attr2,... (empty = unknown) (default: %(default)s)')
    t.add_argument('--out', default='runs/label', help='run folder (default: %(default)s)')
    t.add_argument('--steps', type=int, default=1500, help='optimiser steps (default: %(default)s)')
    t.add_argument('--batch-size', type=int, default=32, help='labelled faces per step (default: %(default)s)')
    t.add_argument('--mu', type=int, default=3, help='unlabelled faces per labelled face in a step (default: %(default)s)')
    t.add_argument('--unlabelled-weight', type=float, default=1.0,
                   help='weight of the FixMatch consistency loss; 0 = supervised only (default: %(default)s)')
    t.add_argument('--threshold', type=float, default=0.95, help='confidence that makes a pseudo-label (default: %(default)s)')
    t.add_argument('--class-balance', action=argparse.BooleanOptionalAction, default=True,
                   help='weight the cross-entropy by inverse class frequency (default: %(default)s)')
    t.add_argument('--lr', type=float, default=3e-3, help='peak AdamW learning rate, one-cycle (default: %(default)s)')
    t.add_argument('--width', type=int, default=32, help='channels of the first conv block (default: %(default)s)')
    t.add_argument('--val-frac', type=float, default=0.2, help='share of hand labels held out (default: %(default)s)')
    t.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    q = sub.add_parser('predict', help='label every face of a folder')
    q.add_argument('--ckpt', required=True, help='label.py checkpoint')
    q.add_argument('--data', required=True, help='faces: folder, .zip or data .pt')
    q.add_argument('--out', required=True, help='CSV to write: file,attr...,attr_confidence...')
    q.add_argument('--min-confidence', type=float, default=0.0,
                   help='leave an attribute empty below this probability (default: %(default)s)')
    s = sub.add_parser('score', help='attributes of generated faces, and how often the asked-for ones appear')
    s.add_argument('--ckpt', required=True, help='label.py checkpoint')
    s.add_argument('--gen', required=True, help='generator checkpoint of any script here, or a folder of images')
    s.add_argument('--attr', action='append', metavar='K=V', help='the attribute the images were asked to have')
    s.add_argument('--real', metavar='DATA', help='real faces (e.g. the training data) whose attribute shares '
                   'are printed beside the generated ones, e.g. the male share')
    s.add_argument('--n', type=int, default=1000, help='images to sample from a checkpoint (default: %(default)s)')
    s.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    args = p.parse_args(argv)
    if args.cmd == 'train' and not (args.steps > 0 and args.batch_size > 0 and 0 <= args.val_frac < 1):
        p.error('--steps and --batch-size must be positive and --val-frac in [0, 1)')
    return args


def main(argv=None):
    args = get_args(argv)
    common.set_cpu_threads()
    return {'train': train, 'predict': predict, 'score': score}[args.cmd](args)


if __name__ == '__main__':
    common.main_guard(main)
