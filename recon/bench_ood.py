"""Benchmark of the out-of-distribution check (``recon.ood``) on real data.

``recon ood bench --prior ct``
fits the reference on in-distribution images of some patients, sets the
threshold on other patients, and measures AUROC between *held-out*
in-distribution images (patients used for neither) and each class of other
inputs.  Per-image scores go to ``OUT/<prior>_scores.csv``, the tables to
``OUT/<prior>_auroc.md``, the fitted reference to ``OUT/<prior>.ood.json``.

Splits (every image normalised as a reconstruction sees it, 128x128):

* ``ct``: reference from the prior's training folders (``ct/train/tcga_ct_images``,
  ``ct/train/covid19_ny_sbu``), split by patient into a fit part (60 %) and a
  threshold part (40 %); held-out in-distribution = ``ct/val/lung_pet_ct_dx``
  (chest, 1 patient) and ``ct/val/ge_head`` (head, 1 patient), which the prior
  never saw.
* ``brain-mri``: reference from the prior's own validation images (the
  patients ``recon train`` held out, reproduced from the metadata), split into
  fit / threshold / held-out parts by file; held-out in-distribution = the
  rest of those plus ``mri/val/brain_tumor_progression_t1c`` (DICOM) and
  ``mri/val/stroke`` (skull-stripped NIfTI, reported separately too).

Out classes: MRI or CT slices (the other modality), photographs and textures
(``skimage.data``), matplotlib figures rendered to PNG, noise images, phantoms
(Shepp-Logan, random ellipses), and for CT the held-out slices at a wrong
window ([-160, 240] and [0, 80] HU shown as [0, 1]) or a wrong resolution
(4x down- then up-sampled, 4x zoomed centre crop).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from recon import ood
from recon.errors import ReconError

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # ../shared/data beside the repo
SKIMAGE_PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "text", "moon", "page", "horse", "rocket",
                  "coins", "clock", "immunohistochemistry", "hubble_deep_field", "grass", "gravel", "brick",
                  "cell", "cat", "colorwheel", "logo", "microaneurysms", "retina")


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def _evenly(n_total: int, n: int) -> list[int]:
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(v)) for v in np.linspace(0, n_total - 1, n)})


def _volume_slices(path, n, min_fill=0.15):
    """Up to ``n`` evenly spaced slices of a volume with at least ``min_fill`` non-background."""
    from recon.io import read_input

    vol = read_input(path)
    data = np.asarray(vol.data, dtype=np.float32)
    bg = data.min()
    keep = [k for k in range(len(data)) if (data[k] > bg + 1e-3 * (data.max() - bg)).mean() >= min_fill]
    idx = [keep[i] for i in _evenly(len(keep), n)]
    return [data[k] for k in idx], [f"{Path(path).name}#{k}" for k in idx], vol.meta.get("modality")


def _figures(n, seed=0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.io import imread

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        fig, ax = plt.subplots(figsize=(4, 4), dpi=64)
        kind = i % 4
        t = np.linspace(0, 10, 200)
        if kind == 0:
            for _ in range(rng.integers(1, 4)):
                ax.plot(t, np.sin(t * rng.uniform(0.5, 3)) + rng.normal(0, 0.1, t.size))
        elif kind == 1:
            ax.bar(np.arange(6), rng.uniform(1, 10, 6))
        elif kind == 2:
            ax.scatter(rng.normal(size=80), rng.normal(size=80), s=8)
        else:
            ax.hist(rng.normal(size=500), bins=20)
        ax.set_title(f"figure {i}")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        buf.seek(0)
        out.append(np.asarray(imread(buf), dtype=np.float32))
    return out


def _phantoms(n, size=256, seed=0):
    from skimage.data import shepp_logan_phantom
    from skimage.draw import ellipse

    rng = np.random.default_rng(seed)
    out = [shepp_logan_phantom()]
    while len(out) < n:
        img = np.zeros((size, size), np.float32)
        rr, cc = ellipse(size / 2, size / 2, size * rng.uniform(0.3, 0.45), size * rng.uniform(0.25, 0.45),
                         shape=img.shape)
        img[rr, cc] = rng.uniform(0.3, 0.8)
        for _ in range(rng.integers(2, 8)):
            rr, cc = ellipse(rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size,
                             rng.uniform(0.03, 0.12) * size, rng.uniform(0.03, 0.12) * size,
                             rotation=rng.uniform(0, np.pi), shape=img.shape)
            img[rr, cc] = rng.uniform(0, 1)
        out.append(img)
    return out


def _noise_images(n, size=128, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            img = np.clip(rng.normal(0.5, rng.uniform(0.05, 0.3), (size, size)), 0, 1)
        elif kind == 1:
            img = rng.uniform(0, 1, (size, size))
        elif kind == 2:  # smooth random field
            img = gaussian_filter(rng.normal(size=(size, size)), rng.uniform(2, 8))
            img = (img - img.min()) / (img.max() - img.min())
        else:  # salt and pepper on grey
            img = np.full((size, size), rng.uniform(0.2, 0.6))
            m = rng.uniform(size=(size, size))
            img[m < 0.05] = 0
            img[m > 0.95] = 1
        out.append(img.astype(np.float32))
    return out


def _photos(n):
    import skimage.data as skd

    base = []
    for name in SKIMAGE_PHOTOS:
        try:
            base.append((name, np.asarray(getattr(skd, name)(), dtype=np.float32)))
        except Exception:  # noqa: BLE001 - optional datasets needing a download
            continue
    out = []
    for name, img in base:
        out.append((name, img))
    for name, img in base:  # plus a zoomed, flipped crop of each
        if len(out) >= n:
            break
        h, w = img.shape[:2]
        out.append((name + "-crop", img[h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2][:, ::-1]))
    return out[:n]


def _prep(imgs, prior, units="intensity"):
    return np.stack([ood.prepare_image(i, prior, units) for i in imgs])


def _ct_heldout_hu(root, n_each, subs=("lung_pet_ct_dx", "totalseg_example_j2k", "ge_head")):
    """Held-out CT slices in HU from ct/val (patients the CT prior never saw)."""
    out, names = [], []
    for sub in subs:
        imgs, nm, _ = _volume_slices(root / "ct" / "val" / sub, n_each, min_fill=0.0)
        out += imgs
        names += [f"{sub}/{x}" for x in nm]
    return out, names


def _wrong_window(hu_imgs, prior):
    from recon.preprocess import hu_to_unit, square_resize

    size = prior.image_size
    out = []
    for i, img in enumerate(hu_imgs):
        win = (-160.0, 240.0) if i % 2 == 0 else (0.0, 80.0)
        out.append(hu_to_unit(square_resize(img, size), win))
    return np.stack(out)


def _wrong_resolution(x01):
    from skimage.transform import resize

    out = []
    for i, x in enumerate(x01):
        s = x.shape[-1]
        if i % 2 == 0:  # 4x down, then up (bilinear)
            small = resize(x, (s // 4, s // 4), order=1, anti_aliasing=True)
            out.append(resize(small, (s, s), order=1))
        else:  # 4x zoomed centre crop
            c = x[3 * s // 8: 5 * s // 8, 3 * s // 8: 5 * s // 8]
            out.append(resize(c, (s, s), order=1))
    return np.clip(np.stack(out), 0, 1).astype(np.float32)


def _mri_images(prior, n, root):
    """MRI inputs as a reconstruction with ``prior`` sees them: Kaggle JPEGs, BTP DICOM, stroke NIfTI."""
    kag = sorted((root / "mri" / "train" / "brain_tumor_mri" / "Testing").rglob("*.jpg"))
    kag = [kag[i] for i in _evenly(len(kag), n // 3)]
    from skimage.io import imread

    imgs = [np.asarray(imread(str(p)), dtype=np.float32) for p in kag]
    names = [f"kaggle/{p.parent.name}/{p.name}" for p in kag]
    b, bn, _ = _volume_slices(root / "mri" / "val" / "brain_tumor_progression_t1c", n // 3)
    imgs += b
    names += [f"btp/{x}" for x in bn]
    k = n - len(imgs)
    for j, seq in enumerate(("T1", "T2", "FLAIR")):
        s, sn, _ = _volume_slices(root / "mri" / "val" / "stroke" / f"{seq}.nii.gz", k // 3 + (j < k % 3),
                                  min_fill=0.15)
        imgs += s
        names += [f"stroke/{x}" for x in sn]
    return imgs, names


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------
def _sets_ct(prior, n, root, n_ref=100):
    from recon.preprocess import hu_to_unit, square_resize

    ref_imgs, ref_pat, ref_names = ood.load_folder_images(
        [root / "ct" / "train" / "tcga_ct_images", root / "ct" / "train" / "covid19_ny_sbu"], prior,
        max_images=n_ref, seed=0)
    a, b = ood.split_patients(ref_pat, 0.4, seed=0)
    hu, hu_names = _ct_heldout_hu(root, n // 2, ("lung_pet_ct_dx", "totalseg_example_j2k"))
    head, head_names = _ct_heldout_hu(root, n // 2, ("ge_head",))
    win = prior.window
    held = np.stack([hu_to_unit(square_resize(h, prior.image_size), win) for h in hu])
    held_head = np.stack([hu_to_unit(square_resize(h, prior.image_size), win) for h in head])
    # wrong window / resolution: every other chest-abdomen slice and every head slice
    alt = hu[::2] + head
    alt_names = hu_names[::2] + head_names
    alt01 = np.concatenate([held[::2], held_head])
    mri, mri_names = _mri_images(prior, n, root)
    photos = _photos(n)
    sets = {
        "fit": (ref_imgs[a], [ref_names[i] for i in a]),
        "threshold": (ref_imgs[b], [ref_names[i] for i in b]),
        "in:ct-chest-abdomen": (held, hu_names),
        "shift:ct-head": (held_head, head_names),
        "out:mri": (_prep(mri, prior), mri_names),
        "out:photo": (_prep([p for _, p in photos], prior), [nm for nm, _ in photos]),
        "out:figure": (_prep(_figures(n // 2), prior), [f"figure{i}" for i in range(n // 2)]),
        "out:noise": (_prep(_noise_images(n // 2), prior), [f"noise{i}" for i in range(n // 2)]),
        "out:phantom": (_prep(_phantoms(n // 2), prior), [f"phantom{i}" for i in range(n // 2)]),
        "out:ct-wrong-window": (_wrong_window(alt, prior), [f"{x}@{'[-160,240]' if i % 2 == 0 else '[0,80]'}"
                                                           for i, x in enumerate(alt_names)]),
        "out:ct-wrong-resolution": (_wrong_resolution(alt01), [f"{x}@{'down4-up4' if i % 2 == 0 else 'zoom4'}"
                                                               for i, x in enumerate(alt_names)]),
    }
    split = ("reference: ct/train/tcga_ct_images + covid19_ny_sbu (the prior's training folders), "
             f"split by patient: {len(a)} slices ({len(set(ref_pat[i] for i in a))} patients) fit the "
             f"mean/covariance, {len(b)} slices ({len(set(ref_pat[i] for i in b))} other patients) set the "
             f"threshold. Held-out in-distribution (patients the prior never saw, same anatomy): "
             f"ct/val/lung_pet_ct_dx (chest) + ct/val/totalseg_example_j2k (abdomen), {len(held)} slices, "
             f"2 patients. Shifted (anatomy absent from the prior's training): ct/val/ge_head (head, "
             f"{len(held_head)} slices). Wrong window / resolution: every other chest-abdomen slice and every "
             f"head slice")
    return sets, split


def _sets_mri(prior, n, root, n_fit=100, n_thr=60):
    from skimage.io import imread

    _, val_files = ood.prior_validation_files(prior)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(val_files))
    n_held = min(n // 2, max(0, len(val_files) - n_fit - n_thr))
    fit_f = [val_files[i] for i in order[:n_fit]]
    thr_f = [val_files[i] for i in order[n_fit:n_fit + n_thr]]
    held_f = [val_files[i] for i in order[n_fit + n_thr:n_fit + n_thr + n_held]]

    def load(fs):
        return _prep([np.asarray(imread(str(p)), dtype=np.float32) for p in fs], prior), \
            [f"{p.parent.parent.name}/{p.parent.name}/{p.name}" for p in fs]

    btp, btp_n, _ = _volume_slices(root / "mri" / "val" / "brain_tumor_progression_t1c", n // 2)
    stroke, stroke_n = [], []
    for j, seq in enumerate(("T1", "T2", "FLAIR")):
        s, sn, _ = _volume_slices(root / "mri" / "val" / "stroke" / f"{seq}.nii.gz", n // 6 + (j < (n // 2) % 3))
        stroke += s
        stroke_n += [f"stroke/{x}" for x in sn]
    # CT slices as `recon mri` sees a CT DICOM (HU through the CT window)
    from recon.preprocess import CT_WINDOW, hu_to_unit, square_resize

    hu, hu_names = _ct_heldout_hu(root, n // 4)
    tc_imgs, _, tc_names = ood.load_folder_images([root / "ct" / "train" / "tcga_ct_images"],
                                                  _FakeCT(prior.image_size), max_images=n - len(hu), seed=0)
    ct = np.concatenate([np.stack([hu_to_unit(square_resize(h, prior.image_size), CT_WINDOW) for h in hu]),
                         tc_imgs])
    photos = _photos(n)
    sets = {
        "fit": load(fit_f),
        "threshold": load(thr_f),
        "in:kaggle-held-out": load(held_f),
        "in:btp": (_prep(btp, prior), [f"btp/{x}" for x in btp_n]),
        "shift:mri-skull-stripped": (_prep(stroke, prior), stroke_n),
        "out:ct": (ct, hu_names + [Path(t).name for t in tc_names]),
        "out:photo": (_prep([p for _, p in photos], prior), [nm for nm, _ in photos]),
        "out:figure": (_prep(_figures(n // 2), prior), [f"figure{i}" for i in range(n // 2)]),
        "out:noise": (_prep(_noise_images(n // 2), prior), [f"noise{i}" for i in range(n // 2)]),
        "out:phantom": (_prep(_phantoms(n // 2), prior), [f"phantom{i}" for i in range(n // 2)]),
    }
    split = (f"reference: the prior's own validation images (mri/train/brain_tumor_mri files that `recon "
             f"train` held out, {len(val_files)}; reproduced from the metadata), split by file: {len(fit_f)} "
             f"fit the mean/covariance, {len(thr_f)} set the threshold, {len(held_f)} held out. Held-out "
             f"in-distribution: those {len(held_f)} plus mri/val/brain_tumor_progression_t1c ({len(btp)} "
             f"slices, DICOM). Shifted (absent from the prior's training): mri/val/stroke, skull-stripped "
             f"T1/T2/FLAIR ({len(stroke)} slices)")
    return sets, split


class _FakeCT:
    """Stand-in prior for reading CT folders with the CT convention."""

    def __init__(self, size):
        self.meta = {"image_size": size, "window": [-1000.0, 1000.0], "modality": "ct"}


def _cached_features(prior, name, x, sigmas, cache: Path | None, fp: str):
    key = hashlib.sha1(np.ascontiguousarray(x).tobytes() + repr(tuple(sigmas)).encode() + fp.encode()).hexdigest()[:16]
    path = cache / f"{name.replace(':', '_')}-{key}.npy" if cache else None
    if path is not None and path.exists():
        return np.load(path), True
    f = ood.compute_features(prior, torch.from_numpy(np.ascontiguousarray(x)), sigmas)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, f)
    return f, False


def run_bench(prior_name: str = "ct", n: int = 40, out: str | Path = "/work/ood", sigmas=ood.DEFAULT_SIGMAS,
              threads: int | None = 1, cache: bool = True, data=None, log=print) -> dict:
    """Run the benchmark for one prior on ``data`` (default ../shared/data beside the repo)."""
    from recon.prior import load_prior

    root = Path(data) if data is not None else DATA
    if not root.exists():
        raise ReconError(f"benchmark data folder not found: {root} (pass --data DIR)")

    if threads:
        torch.set_num_threads(int(threads))
    t0, c0 = time.time(), time.process_time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prior = load_prior(prior_name)
    fp = ood.weights_fingerprint(prior)
    sets, split = (_sets_ct if ood.prior_task(prior) == "ct" else _sets_mri)(prior, n, root)
    log(f"[{time.time() - t0:.0f}s] inputs: " + ", ".join(f"{k} {len(v[0])}" for k, v in sets.items()))
    feats, hits = {}, 0
    for k, (x, _) in sets.items():
        t1 = time.time()
        feats[k], hit = _cached_features(prior, k, x, sigmas, out / "cache" if cache else None, fp)
        hits += hit
        log(f"[{time.time() - t0:.0f}s] features {k}: {len(x)} images in {time.time() - t1:.0f}s"
            f"{' (cached)' if hit else ''}")
    ref = ood.fit_reference(prior, None, None, sigmas=sigmas, features_fit=feats["fit"],
                            features_threshold=feats["threshold"], data=_data_label(prior_name))
    dist = {k: ood.mahalanobis(f, ref["mean"], ref["precision"]) for k, f in feats.items()}
    in_keys = [k for k in sets if k.startswith("in:")]
    shift_keys = [k for k in sets if k.startswith("shift:")]
    out_keys = [k for k in sets if k.startswith("out:")]
    d_in = np.concatenate([dist[k] for k in in_keys])
    d_out = np.concatenate([dist[k] for k in out_keys])
    thr = ref["threshold"]
    thr95 = float(np.quantile(dist["threshold"], 0.95))
    rows = [(k.split(":", 1)[1], len(dist[k]), ood.auroc(d_in, dist[k]), float(np.mean(dist[k] > thr)),
             float(np.mean(dist[k] > thr95)), float(np.median(dist[k]))) for k in out_keys]
    overall = ood.auroc(d_in, d_out)
    d_in_all = np.concatenate([d_in] + [dist[k] for k in shift_keys])
    overall_with_shift = ood.auroc(d_in_all, d_out)
    seconds, cpu = time.time() - t0, time.process_time() - c0

    with open(out / f"{prior_name}_scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["set", "name", "distance", "flagged_ood"] + ref["features"])
        for k, (_, names) in sets.items():
            for nm, d, f in zip(names, dist[k], feats[k]):
                w.writerow([k, nm, f"{d:.4f}", int(d > thr)] + [f"{v:.5f}" for v in f])
    (out / f"{prior_name}_bench_reference.json").write_text(json.dumps(ref, indent=1))

    def pct(v):
        return f"{100 * v:.0f} %"

    lines = [f"# OOD check, prior `{prior_name}` (weights {fp})", "",
             f"Method: {ref['method']}. Noise levels {', '.join(f'{s:.3g}' for s in ref['sigmas'])} on the "
             f"[0, 1] scale, one fixed noise draw each (seed {ref['seed']}), {len(ref['features'])} features. "
             f"Threshold = {100 * ref['quantile']:g}th percentile of the threshold split's distances = "
             f"**{thr:.2f}** (95th percentile: {thr95:.2f}).", "",
             f"Split: {split}.", "",
             f"**AUROC, held-out in-distribution ({len(d_in)} images) vs all out classes ({len(d_out)}): "
             f"{overall:.3f}**; counting the shifted sources as in-distribution too: {overall_with_shift:.3f}.", "",
             "| out class | n | AUROC | flagged at 99th pct | flagged at 95th pct | median distance |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {m} | {a:.3f} | {pct(fl)} | {pct(f95)} | {md:.2f} |" for c, m, a, fl, f95, md in rows]
    lines += ["", "In-distribution and shifted sources (AUROC: against all out classes):", "",
              "| source | n | median distance | flagged at 99th pct | flagged at 95th pct | AUROC |",
              "|---|---|---|---|---|---|"]
    for k in ["fit", "threshold"] + in_keys + shift_keys:
        au = f"{ood.auroc(dist[k], d_out):.3f}" if k not in ("fit", "threshold") else "-"
        lines.append(f"| {k} | {len(dist[k])} | {np.median(dist[k]):.2f} | {pct(np.mean(dist[k] > thr))} | "
                     f"{pct(np.mean(dist[k] > thr95))} | {au} |")
    lines += ["", f"Runtime {seconds:.0f} s wall, {cpu:.0f} s CPU ({torch.get_num_threads()} thread(s), "
              f"{f'features of {hits} of {len(sets)} sets cached, ' if hits else ''}"
              f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end); "
              f"`recon ood bench --prior {prior_name} --n {n}`."]
    (out / f"{prior_name}_auroc.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    return {"overall": overall, "overall_with_shift": overall_with_shift, "rows": rows, "seconds": seconds,
            "cpu_seconds": cpu, "reference": ref}


def _data_label(prior_name):
    return {"ct": "ct/train tcga_ct_images + covid19_ny_sbu",
            "brain-mri": "held-out brain_tumor_mri images"}.get(prior_name, prior_name)
