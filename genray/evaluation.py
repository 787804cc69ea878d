"""`genray eval`: an artefact's quality on held-out images, next to classical baselines on the same images.

One function per task turns (artefact, held-out images) into an Evaluation: a table of rows (the model first,
then each baseline) and a flat dict of metrics that quality gates read (`psnr_y_gain_over_bicubic_db`,
`psnr_gain_over_nlm_db`, `fid_ratio_vs_vae`, `accuracy`, ...). Image-to-image models run through the same
Predictor the bulk jobs and Serve use, so what is measured is what users get. No Ray here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from genray import storage
from genray.model_artifact import ArtifactError, load_artifact
from genray.images import center_crop, resize
from genray.metrics import psnr, rgb_to_y, ssim, ssim_fits
from genray.tasks import EVAL_TASKS

EVAL_MAX_SIDE = 256  # photos are centre-cropped to at most this per side: a CPU evaluates two photos in seconds
NOISE_SEED = 1234  # fixed evaluation noise: runs and baselines see the same noisy pixels
SAMPLE_SEED = 1  # generated samples, for the model and any reference model alike
DEFAULT_SAMPLES = 500  # generated images per Fréchet distance (as model.json's `fid` for DCGANs)

# What each task returns: rows (method -> metrics, the model first), the flat metrics gates read, notes on how it
# was measured, and a per-class report (classify only).
TaskResult = tuple[dict[str, dict[str, float]], dict[str, float], list[str], dict[str, dict[str, float]]]


class EvalError(ValueError):
    """The evaluation cannot run as asked (no images, unlabelled data, a task the model cannot do); says why."""


@dataclass
class Evaluation:
    task: str
    model_uri: str
    data_uri: str
    family: str
    digest: str
    rows: dict[str, dict[str, float]]  # method -> its metrics; the first row is the model
    metrics: dict[str, float]  # the model's metrics plus comparisons with the baselines: what gates read
    notes: list[str] = field(default_factory=list)  # how it was measured (crops, sigma, sample counts)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # classify: class -> precision/recall/f1

    def table(self) -> str:
        """The rows as a markdown table (also readable in a terminal), then the notes."""
        columns = list(dict.fromkeys(k for row in self.rows.values() for k in row))
        lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for method, row in self.rows.items():
            lines.append(f"| {method} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
        if self.per_class:
            lines += ["", "| class | precision | recall | f1 |", "|---|---|---|---|"]
            lines += [f"| {k} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} |"
                      for k, v in self.per_class.items()]
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model_uri": self.model_uri, "data_uri": self.data_uri, "family": self.family,
                "digest": self.digest, "metrics": self.metrics, "rows": self.rows, "per_class": self.per_class,
                "notes": self.notes}


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


SSIM_NOTE = "SSIM with an 11x11 Gaussian window, sigma 1.5, as papers and BasicSR report it"


# -- shared pieces --------------------------------------------------------------------------------------------

def image_scores(clean: np.ndarray, result: np.ndarray, border: int = 0) -> dict[str, float]:
    """PSNR and SSIM of uint8 HWC images (data range 255) after leaving out `border` pixels at each edge; for RGB
    also on the luma channel Y (BT.601), which super-resolution papers report. SSIM only where the image holds its
    11x11 window."""
    if border:
        clean, result = clean[border:-border, border:-border], result[border:-border, border:-border]
    fits = ssim_fits(clean)
    scores = {"psnr_db": psnr(clean, result, 255)}
    if fits:
        scores["ssim"] = ssim(clean, result, 255, channel_axis=-1)
    if clean.shape[2] == 3:
        y_clean, y_result = rgb_to_y(clean), rgb_to_y(result)
        scores["psnr_y_db"] = psnr(y_clean, y_result, 255)
        if fits:
            scores["ssim_y"] = ssim(y_clean, y_result, 255)
    return scores


def mean_scores(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Each score's mean over the images that have it (SSIM: those large enough for its window)."""
    names = dict.fromkeys(k for s in per_image for k in s)
    return {k: float(np.mean([s[k] for s in per_image if k in s])) for k in names}


def _predictor(spec, cfg, model, meta):
    from genray.inference import Predictor

    return Predictor(spec, cfg, model, meta, next(model.parameters()).device)


# -- tasks ----------------------------------------------------------------------------------------------------

def eval_superres(loaded, images: list[np.ndarray], **_) -> TaskResult:
    """×scale SR of centre crops against PIL bicubic and Lanczos upscaling of the same LR inputs.

    LR inputs are PIL bicubic downscales of the HR crops (as the training data); `scale` border pixels are left
    out before scoring, as SR papers do."""
    spec, cfg, model, meta = loaded
    s = spec.scale
    hrs = [center_crop(im, EVAL_MAX_SIDE, s) for im in images]
    lrs = [resize(hr, hr.shape[1] // s, hr.shape[0] // s, Image.Resampling.BICUBIC) for hr in hrs]
    outputs = {"model": _predictor(spec, cfg, model, meta)(lrs)}
    for name, method in (("bicubic", Image.Resampling.BICUBIC), ("lanczos", Image.Resampling.LANCZOS)):
        outputs[name] = [resize(lr, hr.shape[1], hr.shape[0], method) for lr, hr in zip(lrs, hrs)]
    rows = {name: mean_scores([image_scores(hr, out, border=s) for hr, out in zip(hrs, outs)])
            for name, outs in outputs.items()}
    metrics = dict(rows["model"])
    for base in ("bicubic", "lanczos"):
        for key in ("psnr_db", "psnr_y_db"):
            if key in rows[base]:
                metrics[f"{key[:-3]}_gain_over_{base}_db"] = rows["model"][key] - rows[base][key]
    notes = [f"{len(hrs)} held-out images, centre crops <= {EVAL_MAX_SIDE} px (sides multiples of {s}); LR = PIL "
             f"bicubic downscale x1/{s}; PSNR/SSIM on uint8 (data range 255) with a {s}-px border left out; "
             f"{SSIM_NOTE}; Y = BT.601 luma in [16, 235]"]
    return rows, metrics, notes, {}


def add_gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 image + N(0, sigma²) in 0..255 units, rounded and clipped: noisy pixels as a camera would store them."""
    return np.clip(np.rint(image + rng.normal(0.0, sigma, image.shape)), 0, 255).astype(np.uint8)


def classical_denoisers(sigma: float) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """scikit-image's non-local means (the settings of its gallery example: h = 0.8 sigma, 5x5 patches, search
    distance 6, fast mode) and total-variation denoising (Chambolle, weight = sigma on [0, 1] pixels); uint8 in
    and out."""
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

    s = sigma / 255.0

    def per_image(fn):
        def run(noisy8: np.ndarray) -> np.ndarray:
            x = noisy8.astype(np.float64) / 255.0
            channel_axis = -1 if x.shape[2] == 3 else None
            out = fn(x if channel_axis is not None else x[:, :, 0], channel_axis)
            out = out if channel_axis is not None else out[:, :, None]
            return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
        return run

    return {
        "nl_means": per_image(lambda x, ax: denoise_nl_means(x, h=0.8 * s, sigma=s, patch_size=5, patch_distance=6,
                                                             fast_mode=True, channel_axis=ax)),
        "tv_chambolle": per_image(lambda x, ax: denoise_tv_chambolle(x, weight=s, channel_axis=ax)),
    }


def eval_denoise(loaded, images: list[np.ndarray], sigma: float | None = None, **_) -> TaskResult:
    """Fixed-seed Gaussian noise of `sigma` on centre crops; the model against the noisy input itself, non-local
    means and TV denoising, all scored against the clean crop."""
    spec, cfg, model, meta = loaded
    if sigma is None and spec.noise_sigma is not None:
        sigma = float(spec.noise_sigma(cfg))
    if sigma is None:
        raise EvalError("--sigma is needed: the model's config does not say which noise it was trained for")
    rng = np.random.default_rng(NOISE_SEED)
    cleans = [center_crop(im, EVAL_MAX_SIDE) for im in images]
    noisy = [add_gaussian_noise(c, sigma, rng) for c in cleans]
    outputs = {"model": _predictor(spec, cfg, model, meta)(noisy), "noisy input": noisy}
    for name, fn in classical_denoisers(sigma).items():
        outputs[name] = [fn(n) for n in noisy]
    rows = {name: mean_scores([image_scores(c, o) for c, o in zip(cleans, outs)]) for name, outs in outputs.items()}
    metrics = {**rows["model"], "sigma": float(sigma)}
    for base, key in (("noisy input", "noisy"), ("nl_means", "nlm"), ("tv_chambolle", "tv")):
        metrics[f"psnr_gain_over_{key}_db"] = rows["model"]["psnr_db"] - rows[base]["psnr_db"]
    notes = [f"{len(cleans)} held-out images, centre crops <= {EVAL_MAX_SIDE} px; Gaussian noise sigma = {sigma:g} "
             f"(0..255 units, seed {NOISE_SEED}, rounded and clipped to uint8); PSNR/SSIM on uint8, data range 255, "
             f"no border crop; {SSIM_NOTE}; NL-means: h = 0.8 sigma, patch 5, distance 6, fast mode; "
             "TV: weight = sigma/255"]
    return rows, metrics, notes, {}


def _features(images: np.ndarray, what: str, inception_weights: str | None) -> np.ndarray:
    """Inception v3 pool features when weights are given (any image size); else genray's digits classifier's,
    which only digits (28x28x1) can go through."""
    from genray.fid import InceptionWeightsError, classifier_features, inception_features

    if inception_weights:
        try:
            return inception_features(images, inception_weights)
        except InceptionWeightsError as err:
            raise EvalError(str(err)) from None
    if images.shape[1:] != (28, 28, 1):
        raise EvalError(f"the Fréchet distance of {what} ({'x'.join(map(str, images.shape[1:]))}) needs Inception "
                        "weights: pass --inception-weights URI (a local or s3:// copy of torchvision's "
                        "inception_v3_google-0cc3c7bd.pth); without them genray's digits classifier only takes "
                        "28x28x1 digits")
    return classifier_features(images)


def eval_generate(loaded, images: list[np.ndarray], num_samples: int | None = None,
                  reference_model: str | None = None, inception_weights: str | None = None, **_) -> TaskResult:
    """Fréchet distance between generated samples and the held-out images — on Inception v3 features given
    Inception weights, else on the digits classifier's — with the real-vs-real floor (two interleaved halves of
    the held-out set) and, given a reference artefact (e.g. a VAE), the same distance for its samples."""
    from genray.fid import frechet_distance

    spec, cfg, model, _ = loaded
    n = num_samples or DEFAULT_SAMPLES
    real = _features(np.stack(images), "the held-out images", inception_weights)
    # Interleaved halves: key-sorted held-out data is class-sorted; the floor must compare like with like.
    floor = frechet_distance(real[0::2], real[1::2])
    fid = frechet_distance(_features(spec.generate(model, n, SAMPLE_SEED, cfg), "the samples", inception_weights),
                           real)
    rows = {"model": {"fid": fid}, "real vs real (floor)": {"fid": floor}}
    metrics = {"fid": fid, "fid_real_floor": floor, "fid_ratio_vs_floor": fid / max(floor, 1e-12)}
    features = (f"the 2048 pool features of Inception v3 ({inception_weights}), inputs resized to 299x299"
                if inception_weights else
                "the 128 pre-activation features of genray's digits classifier (genray/fid.py, not Inception)")
    notes = [f"{n} samples (seed {SAMPLE_SEED}) vs {len(real)} held-out images on {features}; "
             "floor: even vs odd held-out images"]
    if reference_model:
        ref_spec, ref_cfg, ref_model, _ = load_artifact(reference_model)
        if ref_spec.generate is None:
            raise ArtifactError(f"{reference_model}: a {ref_spec.name} model does not generate images")
        ref_fid = frechet_distance(_features(ref_spec.generate(ref_model, n, SAMPLE_SEED, ref_cfg),
                                             "the reference's samples", inception_weights), real)
        rows[f"reference {ref_spec.name}"] = {"fid": ref_fid}
        metrics[f"fid_{ref_spec.name}"] = ref_fid
        metrics[f"fid_ratio_vs_{ref_spec.name}"] = fid / max(ref_fid, 1e-12)
        notes.append(f"reference: {reference_model} (same samples count and seed)")
    return rows, metrics, notes, {}


def family_metrics(loaded, images: list[np.ndarray], labels: list[int] | None) -> dict[str, float]:
    """The family's own held-out metrics (what model.json reports), with a clear error for images it cannot take."""
    spec, cfg, model, _ = loaded
    try:
        return spec.evaluate(model, images, labels, cfg)
    except (ValueError, RuntimeError) as err:  # e.g. 28x28 images into a model built for 16x16
        raise EvalError(f"the {spec.name} model cannot take these images ({images[0].shape[1]}x"
                        f"{images[0].shape[0]}x{images[0].shape[2]}): {str(err).splitlines()[0]}") from None


def _flat_pixels(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images).reshape(len(images), -1).astype(np.float64) / 255.0


def eval_classify(loaded, images: list[np.ndarray], labels: list[int] | None = None,
                  train: tuple[list[np.ndarray], list[int]] | None = None, **_) -> TaskResult:
    """Accuracy, macro F1 and a per-class report, against a logistic regression on raw pixels (fitted on the
    training images when given, else 5-fold cross-validated predictions on the held-out set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import cross_val_predict

    spec, cfg, model, _ = loaded
    if labels is None:
        raise EvalError("classification needs labelled images: keys like <split>/<label>/<file>.png")
    metrics = family_metrics(loaded, images, labels)
    truth = np.asarray(labels)
    logreg = LogisticRegression(max_iter=2000)
    if train is not None:
        predicted = logreg.fit(_flat_pixels(train[0]), train[1]).predict(_flat_pixels(images))
        how = f"fitted on {len(train[0])} training images"
    else:
        predicted = cross_val_predict(logreg, _flat_pixels(images), truth, cv=5)
        how = "5-fold cross-validated on the held-out images (no --train-data given)"
    baseline = {"accuracy": float(np.mean(predicted == truth)),
                "macro_f1": float(f1_score(truth, predicted, average="macro"))}
    rows = {"model": {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]},
            "logistic regression (raw pixels)": baseline}
    out = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
           "accuracy_logreg": baseline["accuracy"], "accuracy_gain_over_logreg": metrics["accuracy"] - baseline["accuracy"]}
    per_class = {str(k): {m: metrics[f"{m}_class_{k}"] for m in ("precision", "recall", "f1")}
                 for k in sorted(set(labels))}
    notes = [f"{len(images)} held-out images; logistic regression (scikit-learn, L2, lbfgs) {how}"]
    return rows, out, notes, per_class


def eval_reconstruct(loaded, images: list[np.ndarray], train: tuple | None = None, **_) -> TaskResult:
    """The family's own held-out reconstruction metrics (a VAE: negative ELBO in nats, its terms, PSNR of
    decode(mu)), against PCA with as many components as the model's code (fitted on the training images when
    given, else 2-fold on the held-out set)."""
    from sklearn.decomposition import PCA

    spec, cfg, model, _ = loaded
    metrics = family_metrics(loaded, images, None)
    k = spec.code_size(cfg) if spec.code_size is not None else 16
    x = _flat_pixels(images)
    if train is not None:
        pca = PCA(k).fit(_flat_pixels(train[0]))
        recon = pca.inverse_transform(pca.transform(x))
        how = f"fitted on {len(train[0])} training images"
    else:
        recon = np.empty_like(x)
        for fit, apply in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
            pca = PCA(min(k, len(x[fit]))).fit(x[fit])
            recon[apply] = pca.inverse_transform(pca.transform(x[apply]))
        how = "2-fold on the held-out images (no --train-data given)"
    recon = np.clip(recon, 0, 1)
    pca_psnr = float(np.mean([psnr(a, b, 1.0) for a, b in zip(x, recon)]))
    keys = [key for key in ("neg_elbo", "recon", "kl", "psnr_recon_db", "psnr_denoised_db") if key in metrics]
    rows = {"model": {key: metrics[key] for key in keys}, f"PCA ({k} components)": {"psnr_recon_db": pca_psnr}}
    out = {**{key: metrics[key] for key in keys}, "psnr_recon_pca_db": pca_psnr}
    if "psnr_recon_db" in metrics:
        out["psnr_recon_gain_over_pca_db"] = metrics["psnr_recon_db"] - pca_psnr
    notes = [f"{len(images)} held-out images; negative ELBO in nats per image (one fixed-noise z each); PSNR on "
             f"[0, 1] pixels; PCA {how}"]
    return rows, out, notes, {}


EVALUATORS = {"superres": eval_superres, "denoise": eval_denoise, "generate": eval_generate,
              "classify": eval_classify, "reconstruct": eval_reconstruct}
assert set(EVALUATORS) == set(EVAL_TASKS), "every task the task table calls evaluated has an evaluator"


def default_task(spec) -> str:
    if not spec.eval_tasks:
        raise EvalError(f"there is no held-out evaluation for {spec.task} models ({spec.name}) yet; "
                        f"tasks: {', '.join(EVAL_TASKS)}")
    return spec.eval_tasks[0]


def _check_task(spec, task: str) -> None:
    if task not in EVAL_TASKS:
        raise EvalError(f"unknown task {task!r}; tasks: {', '.join(EVAL_TASKS)}")
    if task not in spec.eval_tasks:
        raise EvalError(f"a {spec.name} model cannot be evaluated on task {task!r} (it is a {spec.task} model)")


def _load_images(uri: str, channels: int | None, limit: int | None) -> tuple[list[np.ndarray], list[str]]:
    from genray.datasets import read_image_prefix

    try:
        return read_image_prefix(uri, channels=channels, limit=limit)
    except ValueError as err:  # "no images under ...", or an undecodable file named by key
        raise EvalError(str(err)) from None


def evaluate_model(model_uri: str, data_uri: str, task: str | None = None, sigma: float | None = None,
                   num_samples: int | None = None, reference_model: str | None = None,
                   train_data: str | None = None, limit: int | None = None,
                   inception_weights: str | None = None) -> Evaluation:
    """Evaluate the artefact at model_uri on the images under data_uri (see the module docstring)."""
    from genray.datasets import labels_from_keys

    loaded = load_artifact(model_uri)
    spec, cfg, model, meta = loaded
    task = task or default_task(spec)
    _check_task(spec, task)
    channels = spec.in_channels(cfg)
    images, keys = _load_images(data_uri, channels, limit)
    train = None
    if train_data and task in ("classify", "reconstruct"):
        train_images, train_keys = _load_images(train_data, channels, None)
        train = (train_images, labels_from_keys(train_keys))
    result = EVALUATORS[task](loaded, images, labels=labels_from_keys(keys), sigma=sigma, num_samples=num_samples,
                              reference_model=reference_model, train=train, inception_weights=inception_weights)
    rows, metrics, notes, per_class = result
    return Evaluation(task=task, model_uri=model_uri, data_uri=data_uri, family=spec.name, digest=meta["digest"],
                      rows=rows, metrics=metrics, notes=notes, per_class=per_class)


def write_evaluation(evaluation: Evaluation, output_uri: str) -> tuple[str, str]:
    """`<output>/eval.json` (everything) and `<output>/eval.md` (the table); returns both URIs."""
    json_uri, md_uri = storage.join_uri(output_uri, "eval.json"), storage.join_uri(output_uri, "eval.md")
    storage.write_bytes(json_uri, json.dumps(evaluation.to_dict(), indent=2).encode())
    header = (f"# {evaluation.task} evaluation of {evaluation.family} `{evaluation.model_uri}`\n\n"
              f"held-out data: `{evaluation.data_uri}`, digest `{evaluation.digest[:19]}`\n\n")
    storage.write_bytes(md_uri, (header + evaluation.table() + "\n").encode())
    return json_uri, md_uri


